"""Merging methods behind one interface.

>>> from distac.merging import get_method, apply_merge
>>> method = get_method("ties", density=0.2)
>>> result = method.merge([tau_a, tau_b], task_names=["a", "b"])      # doctest: +SKIP
>>> theta = apply_merge(theta_pre, result, coefficient=0.4)            # doctest: +SKIP

Every method takes task vectors (state dicts of deltas theta_t - theta_pre) and returns a
:class:`MergeResult` whose update is applied at a scaling coefficient chosen by
:func:`search_coefficient` or the method's ``default_coefficient``. Task-conditional methods (EMR,
TALL masks) also return one update per task; :func:`apply_merge` then needs ``task=``.

Methods: ``average``, ``task_arithmetic``, ``ties``, ``tall_masks``, ``consensus_ta``, ``emr``,
``tsvm``, ``iso_c``, ``iso_cts``, ``wudi``. Each module's docstring states the paper, the defaults
and what happens to non-matrix parameters.
"""

from distac.merging.averaging import SimpleAverage
from distac.merging.base import (
    MATRIX_RULES,
    KeyPredicate,
    MergeConfigError,
    MergeMethod,
    MergeResult,
    StateDict,
    apply_merge,
    is_2d_matrix,
    is_block_linear,
    validate_task_vectors,
)
from distac.merging.coefficient_search import (
    CoefficientSearchResult,
    default_grid,
    search_coefficient,
    wide_grid,
)
from distac.merging.emr import EMR
from distac.merging.iso import IsoC, IsoCTS
from distac.merging.registry import METHODS, available_methods, get_method, method_class
from distac.merging.tall_masks import (
    TALL_LAMBDA_GRID,
    ConsensusTA,
    TallLambdaSearchResult,
    TallMasks,
    search_tall_lambdas,
)
from distac.merging.task_arithmetic import TaskArithmetic
from distac.merging.ties import Ties
from distac.merging.tsvm import TSVM
from distac.merging.wudi import WUDI

__all__ = [
    "EMR",
    "MATRIX_RULES",
    "METHODS",
    "TALL_LAMBDA_GRID",
    "TSVM",
    "WUDI",
    "CoefficientSearchResult",
    "ConsensusTA",
    "IsoC",
    "IsoCTS",
    "KeyPredicate",
    "MergeConfigError",
    "MergeMethod",
    "MergeResult",
    "SimpleAverage",
    "StateDict",
    "TallLambdaSearchResult",
    "TallMasks",
    "TaskArithmetic",
    "Ties",
    "apply_merge",
    "available_methods",
    "default_grid",
    "get_method",
    "is_2d_matrix",
    "is_block_linear",
    "method_class",
    "search_coefficient",
    "search_tall_lambdas",
    "validate_task_vectors",
    "wide_grid",
]
