"""LoRA adapters (PEFT) as merge sources: the full weight update of each adapted module.

A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, or
``adapter_model.bin``) on top of a base checkpoint is turned into what every merging method
expects: a fine-tuned state dict (base + delta) or a task vector (the deltas). For each adapted
module the update is materialised exactly as ``peft``'s ``merge_and_unload`` does it:

    Linear:     delta_W = (B @ A) * scale            (transposed if ``fan_in_fan_out``, GPT-2 Conv1D)
    Embedding:  delta_W = (B @ A)^T * scale          (``lora_embedding_A/B``)
    Conv:       1x1: (B @ A) reshaped; k x k: conv(A^T, B)^T, * scale   (groups = 1 only)
    scale = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` and
    ``alpha_pattern`` are honoured per module (PEFT's pattern matching).
    lora_bias:  delta_b = B.bias * scale

A and B are never merged as separate parameters (averaging A's and B's is not averaging updates).
Other tensors in the adapter are full replacements of the base tensor at the same key: trained
biases (``bias="all"/"lora_only"``, saved as ``<module>.base_layer.bias``) and ``modules_to_save``
(e.g. a classifier head). Key names: ``base_model.model.<module>.lora_A.weight`` updates the base
key ``<module>.weight``.

Unsupported variants raise :class:`~distac.errors.CheckpointError` instead of being approximated:
non-LoRA PEFT types, DoRA (``use_dora``: the magnitude vector rescales columns), layer replication,
``target_parameters`` and trainable-token adapters.

Safety: ``adapter_model.safetensors`` is read with safetensors; ``adapter_model.bin`` only with
``torch.load(weights_only=True)`` (:mod:`distac.checkpoints`), so nothing is unpickled.

Entry points: :func:`load_lora_adapter`, :meth:`LoraAdapter.materialize` /
:meth:`LoraAdapter.task_vector`, :func:`load_source` (a checkpoint *or* an adapter, as a state dict;
what the in-memory ``distac merge`` uses) and :func:`open_source` (lazy, per key; what the
streaming merge uses).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from distac.checkpoints import CheckpointReader, StateDict, _load_torch_file, load_state_dict, open_checkpoint
from distac.errors import CheckpointError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
_LORA_BIAS_SUFFIX = ".lora_B.bias"
_UNSUPPORTED_MARKERS = ("lora_magnitude_vector", "lora_E", "token_adapter", "trainable_tokens")


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True for a directory holding a PEFT adapter (``adapter_config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / ADAPTER_CONFIG_NAME).is_file()


@dataclass
class LoraFactors:
    """The two factors of one adapted weight and how to combine them."""

    module: str
    kind: str  # "linear" | "embedding"; "linear" with 3-5D factors is a convolution
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    fan_in_fan_out: bool
    a_key: str
    b_key: str

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_shape(self) -> tuple[int, ...]:
        if self.kind == "embedding":
            return (int(self.a.shape[1]), int(self.b.shape[0]))
        if self.a.ndim > 2:  # convolution: A is (r, in, *kernel), B is (out, r, 1, ...)
            return (int(self.b.shape[0]), int(self.a.shape[1]), *map(int, self.a.shape[2:]))
        if self.fan_in_fan_out:
            return (int(self.a.shape[1]), int(self.b.shape[0]))
        return (int(self.b.shape[0]), int(self.a.shape[1]))

    def delta(self) -> torch.Tensor:
        """delta_W in float32 (see the module docstring)."""
        a, b = self.a.float(), self.b.float()
        if self.kind == "embedding":
            return (b @ a).T * self.scale
        if a.ndim > 2:
            if all(int(s) == 1 for s in a.shape[2:]) and a.ndim == 4:
                return (b.flatten(1) @ a.flatten(1)).reshape(self.delta_shape()) * self.scale
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.ndim]
            return conv(a.transpose(0, 1), b).transpose(0, 1) * self.scale
        product = b @ a
        return (product.T if self.fan_in_fan_out else product) * self.scale


@dataclass
class LoraAdapter:
    """A loaded LoRA adapter: factors per base weight key, LoRA bias deltas, full replacements."""

    path: Path
    weights_file: Path
    config: dict
    factors: dict[str, LoraFactors] = field(default_factory=dict)  # base key -> factors
    bias_deltas: dict[str, tuple[torch.Tensor, float, str]] = field(default_factory=dict)  # key -> (B.bias, scale, src)
    replacements: dict[str, tuple[torch.Tensor, str]] = field(default_factory=dict)  # base key -> (tensor, src key)

    def targets(self) -> list[str]:
        """Every base key this adapter changes."""
        return sorted({*self.factors, *self.bias_deltas, *self.replacements})

    def _source_key(self, key: str) -> str:
        if key in self.factors:
            return self.factors[key].a_key
        if key in self.bias_deltas:
            return self.bias_deltas[key][2]
        return self.replacements[key][1]

    def check_base(self, shapes: Mapping[str, Sequence[int]], base_source: object, dtypes: Mapping[str, bool]) -> None:
        """Raise a :class:`CheckpointError` naming the adapter tensor and base key that do not fit.

        ``shapes``: base key -> shape; ``dtypes``: base key -> is floating point.
        """
        for key in self.targets():
            source_key = self._source_key(key)
            if key not in shapes:
                module = key.rsplit(".", 1)[0].split(".")[-1]
                similar = [k for k in shapes if f".{module}." in f".{k}"][:3]
                hint = f"; base keys with {module!r}: {similar}" if similar else ""
                raise CheckpointError(
                    f"{self.weights_file}: adapter tensor {source_key!r} targets {key!r}, which the base checkpoint "
                    f"{base_source} does not have (adapter trained on a different base model?){hint}"
                )
            if not dtypes.get(key, True):
                raise CheckpointError(
                    f"{self.weights_file}: adapter tensor {source_key!r} targets {key!r}, which is not a "
                    f"floating-point tensor in {base_source}"
                )
            base_shape = tuple(int(s) for s in shapes[key])
            if key in self.factors:
                factors = self.factors[key]
                expected = factors.delta_shape()
                what = f"LoRA update (B @ A, rank {factors.rank}) from {factors.a_key!r} and {factors.b_key!r}"
            elif key in self.bias_deltas:
                expected = tuple(self.bias_deltas[key][0].shape)
                what = f"LoRA bias update {source_key!r}"
            else:
                expected = tuple(self.replacements[key][0].shape)
                what = f"trained tensor {source_key!r}"
            if expected != base_shape:
                raise CheckpointError(
                    f"{self.weights_file}: {what} has shape {expected} but {key!r} has shape {base_shape} in the base "
                    f"checkpoint {base_source} (adapter trained on a different base model?)"
                )

    def delta(self, key: str) -> torch.Tensor | None:
        """The float32 update of ``key`` (None if the adapter does not change it additively)."""
        total: torch.Tensor | None = None
        if key in self.factors:
            total = self.factors[key].delta()
        if key in self.bias_deltas:
            bias, scale, _ = self.bias_deltas[key]
            update = bias.float() * scale
            total = update if total is None else total + update
        return total

    def apply(self, key: str, base: torch.Tensor) -> torch.Tensor:
        """The fine-tuned tensor of ``key``: base + delta (or the replacement), in base's dtype."""
        if key in self.replacements:
            return self.replacements[key][0].to(device=base.device, dtype=base.dtype)
        delta = self.delta(key)
        if delta is None:
            return base
        return (base.float() + delta.to(base.device)).to(base.dtype)

    def materialize(self, base: Mapping[str, torch.Tensor], base_source: object = "base checkpoint") -> StateDict:
        """Fine-tuned state dict: every base tensor, with the adapter's updates applied."""
        self.check_base(
            {k: tuple(v.shape) for k, v in base.items()},
            base_source,
            {k: v.is_floating_point() for k, v in base.items()},
        )
        state = dict(base)
        for key in self.targets():
            state[key] = self.apply(key, base[key])
        return state

    def task_vector(
        self, base: Mapping[str, torch.Tensor], base_source: object = "base checkpoint", selector: object = None
    ) -> StateDict:
        """theta_ft - theta_pre over the keys ``selector`` keeps (default: heads and statistics
        excluded, like :class:`~distac.task_vectors.ParameterSelector`); keys the adapter does not
        touch get exact zeros."""
        from distac.task_vectors import ParameterSelector

        selector = selector or ParameterSelector()
        finetuned = self.materialize(base, base_source)
        return {k: finetuned[k].float() - v.float() for k, v in base.items() if selector(k, v)}  # type: ignore[operator]


def _read_config(path: Path) -> dict:
    try:
        config = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG_NAME}: unreadable adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / ADAPTER_CONFIG_NAME}: not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: PEFT type {peft_type} is not supported (only LoRA adapters are)")
    for flag, why in (
        ("use_dora", "DoRA rescales columns with a magnitude vector"),
        ("layer_replication", "layer replication changes the model's structure"),
        ("target_parameters", "LoRA on raw parameters"),
        ("trainable_token_indices", "trainable-token adapters"),
    ):
        if config.get(flag):
            raise CheckpointError(f"{path}: {flag} is set ({why}); only plain LoRA adapters are supported")
    try:
        float(config.get("lora_alpha", 8))
        int(config.get("r", 8))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG_NAME}: r and lora_alpha must be numbers: {exc}") from exc
    return config


def _read_tensors(path: Path) -> tuple[Path, StateDict]:
    file = path / ADAPTER_SAFETENSORS
    if file.is_file():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                return file, {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: unreadable adapter weights: {exc}") from exc
    file = path / ADAPTER_BIN
    if file.is_file():
        return file, _load_torch_file(file)  # weights_only=True: pickles with code are refused
    raise CheckpointError(f"{path}: no adapter weights ({ADAPTER_SAFETENSORS} or {ADAPTER_BIN})")


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """PEFT's ``get_pattern_key``: the first pattern p with ``(.*\\.)?(p)$`` matching the module."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _base_name(key: str) -> str:
    name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    return name.replace(".base_layer.", ".")


def load_lora_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Read and check a LoRA adapter directory (shapes are checked against a base later)."""
    path = Path(path)
    if not is_adapter_dir(path):
        raise CheckpointError(f"{path}: not a PEFT adapter directory (no {ADAPTER_CONFIG_NAME})")
    config = _read_config(path)
    weights_file, tensors = _read_tensors(path)
    if not tensors:
        raise CheckpointError(f"{weights_file}: the adapter contains no tensors")
    adapter = LoraAdapter(path=path, weights_file=weights_file, config=config)
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    def scale_of(module: str) -> tuple[int, float]:
        rank = int(_pattern_value(rank_pattern, module, r_default))  # type: ignore[arg-type]
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))  # type: ignore[arg-type]
        if rank <= 0:
            raise CheckpointError(f"{path / ADAPTER_CONFIG_NAME}: rank {rank} for {module!r} is not positive")
        return rank, alpha / math.sqrt(rank) if rslora else alpha / rank

    pending: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    kinds: dict[str, str] = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights_file}: adapter tensor {key!r} is not floating point ({tensor.dtype})")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights_file}: adapter tensor {key!r} contains NaN/Inf values")
        if any(marker in key for marker in _UNSUPPORTED_MARKERS):
            raise CheckpointError(f"{weights_file}: adapter tensor {key!r} belongs to an unsupported PEFT variant")
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        suffix = next((s for s in _FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            module = name[: -len(suffix)]
            kind, factor = _FACTOR_SUFFIXES[suffix]
            pending.setdefault(module, {})[factor] = (key, tensor)
            kinds[module] = kind
        elif name.endswith(_LORA_BIAS_SUFFIX):
            module = name[: -len(_LORA_BIAS_SUFFIX)]
            _, scale = scale_of(module)
            adapter.bias_deltas[f"{module}.bias"] = (tensor, scale, key)
        elif ".lora_" in name:
            raise CheckpointError(f"{weights_file}: adapter tensor {key!r} is not a LoRA factor distac understands")
        else:
            adapter.replacements[_base_name(key)] = (tensor, key)
    for module, parts in pending.items():
        if set(parts) != {"A", "B"}:
            have = next(iter(parts.values()))[0]
            raise CheckpointError(f"{weights_file}: {have!r} has no matching lora_{'B' if 'A' in parts else 'A'}")
        (a_key, a), (b_key, b) = parts["A"], parts["B"]
        rank, scale = scale_of(module)
        if kinds[module] == "embedding":
            consistent = a.ndim == 2 and b.ndim == 2 and a.shape[0] == rank and b.shape[1] == rank
        else:
            consistent = a.ndim >= 2 and b.ndim == a.ndim and a.shape[0] == rank and b.shape[1] == rank
        if not consistent:
            raise CheckpointError(
                f"{weights_file}: {a_key!r} {tuple(a.shape)} and {b_key!r} {tuple(b.shape)} are not rank-{rank} "
                f"LoRA factors of one module (r / rank_pattern in {ADAPTER_CONFIG_NAME})"
            )
        base_key = f"{module}.weight"
        adapter.factors[base_key] = LoraFactors(
            module=module,
            kind=kinds[module],
            a=a,
            b=b,
            scale=scale,
            fan_in_fan_out=fan_in_fan_out and kinds[module] == "linear" and a.ndim == 2,
            a_key=a_key,
            b_key=b_key,
        )
    overlap = sorted(set(adapter.replacements) & (set(adapter.factors) | set(adapter.bias_deltas)))
    if overlap:
        raise CheckpointError(f"{weights_file}: {overlap[0]!r} is both replaced and LoRA-updated by the adapter")
    return adapter


class LoraSource:
    """Lazy, per-key view of base + adapter with the interface the streaming merge needs."""

    kind = "lora"

    def __init__(self, adapter: LoraAdapter, base: CheckpointReader) -> None:
        self.adapter = adapter
        self.base = base
        self.path = adapter.path
        shapes = base.shapes()
        adapter.check_base(
            {k: s for k, (s, _) in shapes.items()},
            base.path,
            {
                k: d in {"torch.float64", "torch.float32", "torch.float16", "torch.bfloat16"}
                for k, (_, d) in shapes.items()
            },
        )
        self._shapes = shapes

    def keys(self) -> list[str]:
        return self.base.keys()

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return dict(self._shapes)

    def file_of(self, key: str) -> Path:
        return self.adapter.weights_file if key in self.adapter.targets() else self.base.files[key]

    def finetuned(self, key: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """The fine-tuned tensor given the base tensor of ``key`` (already read by the caller)."""
        return self.adapter.apply(key, base_tensor)

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.finetuned(key, self.base.get(key, device))


def open_source(path: str | os.PathLike[str], base: CheckpointReader) -> CheckpointReader | LoraSource:
    """A fine-tuned source, lazily: a LoRA adapter directory on ``base``, or any checkpoint."""
    if is_adapter_dir(path):
        return LoraSource(load_lora_adapter(path), base)
    return open_checkpoint(path)


def load_source(
    path: str | os.PathLike[str],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    base_source: object = "base checkpoint",
    check_finite: bool = True,
) -> StateDict:
    """A fine-tuned state dict from a checkpoint or from a LoRA adapter directory on ``base``."""
    if is_adapter_dir(path):
        if base is None:
            raise CheckpointError(f"{path}: a LoRA adapter needs its base checkpoint (pass --pretrained / base=)")
        return load_lora_adapter(path).materialize(base, base_source)
    return load_state_dict(path, check_finite=check_finite)
