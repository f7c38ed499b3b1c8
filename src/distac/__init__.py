"""distac: robust model merging with DisTaC task-vector conditioning.

The package is organised by concept, one obvious place for each:

* :mod:`distac.checkpoints` - reading and writing checkpoints safely (no pickle).
* :mod:`distac.task_vectors` - task-vector algebra (theta_t - theta_pre).
* :mod:`distac.models` - adapters that turn a backbone + task head into logits.
* :mod:`distac.data` - real tasks with train / validation / test splits.
* :mod:`distac.merging` - every merging method behind one interface.
* :mod:`distac.conditioning` - DisTaC itself (rescale + distill).
* :mod:`distac.training` - fine-tuning of source models and their losses.
* :mod:`distac.evaluation` - accuracy, entropy, calibration error, temperature scaling.
* :mod:`distac.experiments` - the paper's experiments as runnable pipelines.
"""

__version__ = "0.1.0"

# Must run before transformers/timm import torchvision (see distac._compat for why).
from distac._compat import ensure_torchvision_importable as _ensure_torchvision_importable  # noqa: E402

_ensure_torchvision_importable()
