"""Merging methods by name: ``get_method("ties", density=0.2)``.

Unknown names and unknown hyperparameters raise :class:`~distac.merging.base.MergeConfigError`
listing what is accepted, so a typo in a config file fails with a useful message instead of a
bare ``TypeError``.
"""

from __future__ import annotations

import inspect
from typing import Any

from distac.merging.averaging import SimpleAverage
from distac.merging.base import MergeConfigError, MergeMethod
from distac.merging.emr import EMR
from distac.merging.iso import IsoC, IsoCTS
from distac.merging.tall_masks import ConsensusTA, TallMasks
from distac.merging.task_arithmetic import TaskArithmetic
from distac.merging.ties import Ties
from distac.merging.tsvm import TSVM
from distac.merging.wudi import WUDI

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls
    for cls in (SimpleAverage, TaskArithmetic, Ties, TallMasks, ConsensusTA, EMR, TSVM, IsoC, IsoCTS, WUDI)
}


def available_methods() -> list[str]:
    """Registered method names, in the order of the paper's tables (baselines first)."""
    return list(METHODS)


def method_class(name: str) -> type[MergeMethod]:
    if name not in METHODS:
        raise MergeConfigError(f"unknown merging method {name!r}; known methods: {', '.join(available_methods())}")
    return METHODS[name]


def method_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters a method accepts and their defaults (``inspect.Parameter.empty`` if none)."""
    signature = inspect.signature(method_class(name).__init__)
    return {p.name: p.default for p in signature.parameters.values() if p.name != "self"}


def get_method(name: str, /, **hyperparameters: Any) -> MergeMethod:
    """An instance of the method called ``name`` with the given hyperparameters (defaults otherwise)."""
    cls = method_class(name)
    accepted = method_hyperparameters(name)
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise MergeConfigError(
            f"method {name!r} has no hyperparameter {unknown[0]!r}; it accepts: {', '.join(accepted) or 'none'}"
        )
    return cls(**hyperparameters)
