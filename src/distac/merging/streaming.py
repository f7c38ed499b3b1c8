"""Streaming merges: tensor by tensor from (sharded) safetensors, memory ~ one tensor per source.

``distac merge --streaming`` and :func:`streaming_merge` never hold a whole model in memory. For
each key of the pretrained checkpoint (in its order) they read theta_pre[key] and the T fine-tuned
tensors of that key, form the T task vectors of that key (``theta_t.float() - theta_pre.float()``,
exactly as :class:`~distac.task_vectors.TaskVector` does), run the method on that key alone, and
append ``theta_pre + coefficient * update`` to the output shard being written. Peak memory is
therefore O(T x the largest tensor) plus the safetensors page cache, independent of model size
and of T x model size.

Inputs: Hugging Face directories (``model.safetensors`` or ``model.safetensors.index.json`` +
shards), bare ``.safetensors`` files, and PEFT LoRA adapter directories on top of the pretrained
checkpoint (:mod:`distac.peft_sources`; each adapted tensor is base + (B @ A) * scale, computed
per key). Torch pickles cannot be read lazily and are refused: use the in-memory ``distac merge``.

Output: a Hugging Face compatible directory, built in a temporary sibling and renamed into place
(:func:`distac.atomic.atomic_directory`), so an interrupted merge leaves no partial output. Shards
are planned up front from the pretrained headers (same plan as :func:`distac.checkpoints.
write_weights`: ``model.safetensors`` if it fits in ``max_shard_bytes``, else
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``), each shard's header is
written first and tensors are appended as they are merged, so not even one shard is buffered.
Config and tokenizer files of the pretrained directory are copied, and ``merge.json`` records the
run (method, coefficient, keys, bytes, seconds, peak RSS).

Methods:

* key-local (``average``, ``task_arithmetic``, ``tsvm``, ``iso_c``, ``iso_cts``, ``wudi``, and
  ``consensus_ta`` with ``use_ties=False``): the registry's method object is called on
  single-key state dicts, ``method.merge([{key: tau_1}, ..., {key: tau_T}])``, so the streaming
  result is the in-memory result, bit for bit (every one of these methods computes each key from
  that key's T tensors only).
* ``ties``: its trim threshold is global (one per task over *all* selected entries) and the
  elected sign's tie-break is a global majority. Three read passes, exact, no approximation:
  (1) a 32768-bin histogram of the high 16 bits of |tau_t| (non-negative float32 bit patterns sort
  like the floats), which locates the bin holding the k-th smallest magnitude; (2) a 65536-bin
  histogram of the low 16 bits inside that bin, which gives the k-th smallest value exactly, the
  same number ``kthvalue`` returns in memory; (3) trim/elect/disjoint-merge key by key and write.
  The rare coordinates whose elected sign is exactly 0 depend on the global majority sign, known
  only at the end: they are kept sparsely and patched in place in the written shard afterwards
  (in the temporary directory, before the rename). Memory: O(T x 65536) counters on top of the
  per-key tensors.
* ``emr``, ``tall_masks`` (task-conditional: one model per task) and ``consensus_ta`` with
  ``use_ties=True`` (needs the full TIES vector first) raise :class:`MergeConfigError`: use the
  in-memory path.

Validation happens on the headers before any tensor is read, by the in-memory rule
(:meth:`~distac.task_vectors.TaskVector.from_state_dicts`): every source has every merged key of
the pretrained checkpoint, with its shape and a floating-point dtype, and no merged key the
pretrained checkpoint lacks (errors name the file and key). Parameters not selected for the task
vectors (heads, BatchNorm statistics, integer buffers; see
:class:`~distac.task_vectors.ParameterSelector`) are copied from the pretrained checkpoint: a
source may lack them, have them in another shape, or have ones the pretrained checkpoint lacks
(a classification head on a base-model checkpoint). Every tensor read is checked for NaN/Inf (error names the file and
key); as the output only appears at the final rename, a failure at any point leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distac.atomic import atomic_directory, atomic_write_json
from distac.checkpoints import (
    SAFETENSORS_INDEX,
    SAFETENSORS_NAME,
    CheckpointReader,
    _plan_shards,
    base_model_prefix,
    copy_config_files,
    open_checkpoint,
    strip_key_prefix,
)
from distac.errors import CheckpointError
from distac.merging.base import (
    MERGE_RECORD,
    MergeConfigError,
    MergeMethod,
    json_float,
    one_key_at_a_time,
    warn_if_no_matrix_keys,
)
from distac.merging.registry import get_method
from distac.merging.ties import Ties, _disjoint
from distac.task_vectors import ParameterSelector

#: Methods whose merge of a key depends on that key's T tensors only.
KEY_LOCAL_METHODS = ("average", "task_arithmetic", "tsvm", "iso_c", "iso_cts", "wudi", "consensus_ta")
STREAMING_METHODS = (*KEY_LOCAL_METHODS, "ties")

_TORCH_TO_SAFETENSORS = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _TORCH_TO_SAFETENSORS[getattr(torch, _name)] = _code
_SAFETENSORS_TO_TORCH = {code: dtype for dtype, code in _TORCH_TO_SAFETENSORS.items()}

_HIGH_BINS = 1 << 15  # high 16 bits of a non-negative float32 (sign bit 0)
_LOW_BINS = 1 << 16


# ------------------------------------------------------------------------------------------ sources
class _Source:
    """One fine-tuned input: a lazily read safetensors checkpoint or a LoRA adapter on the base."""

    def __init__(self, name: str, path: Path, pretrained: CheckpointReader) -> None:
        from distac.peft_sources import LoraSource, open_source

        self.name = name
        self.path = path
        opened = open_source(path, pretrained)
        if isinstance(opened, LoraSource):
            self.adapter: LoraSource | None = opened
            self.reader: CheckpointReader | None = None
        else:
            if opened.kind != "safetensors":
                raise CheckpointError(
                    f"{path}: streaming merges need safetensors inputs, this is a torch pickle (it cannot be read "
                    "tensor by tensor); convert it or merge without --streaming"
                )
            self.adapter, self.reader = None, opened
        #: the stored name of each key under the pretrained model's naming: a task-class checkpoint keeps the
        #: base encoder under its prefix (bert.*), a DDP one under module. (see base_model_prefix)
        self._stored: dict[str, str] = {}
        self._shapes: dict[str, tuple[tuple[int, ...], str]] | None = None
        if self.reader is not None:
            stored_keys = self.reader.keys()
            prefix = base_model_prefix(pretrained.keys(), stored_keys)
            self._stored = strip_key_prefix({k: k for k in stored_keys}, prefix, path)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype per key, from the headers (read once)."""
        if self._shapes is None:
            if self.adapter is not None:
                self._shapes = self.adapter.shapes()
            else:
                stored = self.reader.shapes()  # type: ignore[union-attr]
                self._shapes = {name: stored[raw] for name, raw in self._stored.items()}
        return self._shapes

    def file_of(self, key: str) -> Path:
        return self.adapter.file_of(key) if self.adapter is not None else self.reader.files[self._stored[key]]  # type: ignore[union-attr]

    def has(self, key: str) -> bool:
        return key in self.shapes()

    def extra_tensor(self, key: str) -> torch.Tensor:
        """A tensor the pretrained checkpoint lacks (a task head, a buffer): read as stored. Only
        checkpoint sources have such keys: an adapter's key set is its base's (``LoraSource.shapes``)."""
        assert self.reader is not None, "adapter sources have no keys beyond the pretrained checkpoint's"
        return self.reader.get(self._stored[key])

    def tensor(self, key: str, pretrained: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            return self.adapter.finetuned(key, pretrained)
        return self.reader.get(self._stored[key])  # type: ignore[union-attr]


def _check_finite(tensor: torch.Tensor, file: Path, key: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{file}: tensor {key!r} contains {bad} NaN/Inf values")


def _torch_dtype(name: str, file: Path, key: str) -> torch.dtype:
    if name.startswith("torch."):
        dtype = getattr(torch, name.split(".", 1)[1], None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if name in _SAFETENSORS_TO_TORCH:
        return _SAFETENSORS_TO_TORCH[name]
    raise CheckpointError(f"{file}: tensor {key!r} has dtype {name}, which distac cannot stream")


@dataclass
class _Plan:
    """What the validation found: key order, selected keys, and each key's shape and dtype."""

    keys: list[str]
    selected: list[str]
    meta: dict[str, torch.Tensor]  # meta-device tensors: shape and dtype of each pretrained key
    source_extras: list[list[str]]  # per source: its keys the pretrained checkpoint lacks (heads, buffers)

    def numel(self, keys: Sequence[str]) -> int:
        return sum(self.meta[k].numel() for k in keys)


def _validate(pretrained: CheckpointReader, sources: Sequence[_Source], selector: ParameterSelector) -> _Plan:
    pre_shapes = pretrained.shapes()
    keys = pretrained.keys()
    meta = {
        key: torch.empty(
            pre_shapes[key][0], dtype=_torch_dtype(pre_shapes[key][1], pretrained.files[key], key), device="meta"
        )
        for key in keys
    }
    selected = [key for key in keys if selector(key, meta[key])]
    if not selected:
        raise CheckpointError(
            f"{pretrained.path}: no parameters selected for the task vectors (check --include/--exclude)"
        )
    key_set = set(keys)
    extras: list[list[str]] = []
    for source in sources:
        shapes = source.shapes()
        missing = [k for k in selected if k not in shapes]
        if missing:
            raise CheckpointError(
                f"{source.path}: missing tensor {missing[0]!r} that the pretrained checkpoint {pretrained.path} has "
                f"({len(missing)} missing; different architecture?)"
            )
        extra = [k for k in shapes if k not in key_set]
        merged_extra = [
            k for k in extra if selector(k, torch.empty(0, dtype=_torch_dtype(shapes[k][1], source.file_of(k), k)))
        ]
        if merged_extra:
            raise CheckpointError(
                f"{source.path}: unexpected tensor {merged_extra[0]!r} ({source.file_of(merged_extra[0]).name}) that "
                f"the pretrained checkpoint {pretrained.path} does not have ({len(merged_extra)} unexpected; different "
                "architecture? exclude them with --exclude if they are task heads)"
            )
        extras.append(extra)  # task heads and buffers the output does not keep; still checked for NaN/Inf
        for key in selected:
            shape, dtype = shapes[key]
            if tuple(shape) != tuple(meta[key].shape):
                raise CheckpointError(
                    f"{source.file_of(key)}: tensor {key!r} has shape {tuple(shape)} but the pretrained checkpoint "
                    f"{pretrained.files[key]} has {tuple(meta[key].shape)} (different architecture?)"
                )
            if not _torch_dtype(dtype, source.file_of(key), key).is_floating_point:
                raise CheckpointError(
                    f"{source.file_of(key)}: tensor {key!r} has dtype {dtype}, but it is a floating-point parameter "
                    f"({meta[key].dtype}) in {pretrained.files[key]}"
                )
    return _Plan(keys=keys, selected=selected, meta=meta, source_extras=extras)


# ------------------------------------------------------------------------------------------ writer
@dataclass
class _Slot:
    file: Path
    offset: int  # absolute byte offset of the tensor data in ``file``
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class _ShardWriter:
    """Writes safetensors shards whose layout is fixed up front; tensors arrive in plan order.

    Each shard's header (names, dtypes, shapes, offsets) is written when its first tensor arrives,
    then raw little-endian bytes are appended, so nothing beyond the current tensor is buffered.
    """

    directory: Path
    meta: Mapping[str, torch.Tensor]
    max_shard_bytes: int | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sys.byteorder != "little":
            raise CheckpointError("streaming merges write safetensors (little-endian) only on little-endian hosts")
        self.total = sum(t.numel() * t.element_size() for t in self.meta.values())
        if self.max_shard_bytes is None or self.total <= self.max_shard_bytes:
            groups = [list(self.meta)]
            names = [SAFETENSORS_NAME]
        else:
            groups = list(_plan_shards(self.meta, self.max_shard_bytes))
            names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
        self.sharded = len(names) > 1 or names[0] != SAFETENSORS_NAME
        self.groups = list(zip(names, groups, strict=True))
        self.slots: dict[str, _Slot] = {}
        self.order = [k for _, keys in self.groups for k in keys]
        self._next = 0
        self._group = -1
        self._handle: Any = None
        self._remaining: set[str] = set()
        self.bytes_written = 0

    def _open_group(self, index: int) -> None:
        name, keys = self.groups[index]
        header: dict[str, Any] = {"__metadata__": {"format": "pt", **dict(self.metadata)}}
        offset = 0
        for key in keys:
            tensor = self.meta[key]
            nbytes = tensor.numel() * tensor.element_size()
            header[key] = {
                "dtype": _TORCH_TO_SAFETENSORS[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        path = self.directory / name
        self._handle = open(path, "wb")  # noqa: SIM115  (closed in _close_group)
        self._handle.write(len(raw).to_bytes(8, "little"))
        self._handle.write(raw)
        start = 8 + len(raw)
        for key in keys:
            begin, end = header[key]["data_offsets"]
            self.slots[key] = _Slot(path, start + begin, end - begin, self.meta[key].dtype, tuple(self.meta[key].shape))
        self._group = index
        self._remaining = set(keys)
        self.bytes_written += start

    def _close_group(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next] if self._next < len(self.order) else None
        if key != expected:
            raise RuntimeError(f"internal error: tensor {key!r} written out of order (expected {expected!r})")
        reference = self.meta[key]
        if tuple(tensor.shape) != tuple(reference.shape) or tensor.dtype != reference.dtype:
            raise RuntimeError(
                f"internal error: {key!r} is {tuple(tensor.shape)} {tensor.dtype}, planned "
                f"{tuple(reference.shape)} {reference.dtype}"
            )
        if self._handle is None:
            self._open_group(self._group + 1)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._handle.write(memoryview(data))
        self.bytes_written += data.nbytes
        self._remaining.discard(key)
        self._next += 1
        if not self._remaining:
            self._close_group()

    def patch(self, key: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite ``flat[index] = values`` of an already written tensor, in place on disk."""
        slot = self.slots[key]
        with open(slot.file, "r+b") as handle:
            handle.seek(slot.offset)
            buffer = bytearray(handle.read(slot.nbytes))
            flat = torch.frombuffer(buffer, dtype=slot.dtype)
            flat[index] = values.to(slot.dtype)
            handle.seek(slot.offset)
            handle.write(buffer)
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self) -> list[str]:
        if self._next != len(self.order):
            raise RuntimeError(f"internal error: {len(self.order) - self._next} tensors were never written")
        if self.sharded:
            weight_map = {key: name for name, keys in self.groups for key in keys}
            atomic_write_json(
                self.directory / SAFETENSORS_INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            )
        return [name for name, _ in self.groups]

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# ------------------------------------------------------------------------------------------ methods
def _method_object(method: str | MergeMethod, hyperparameters: Mapping[str, Any] | None) -> MergeMethod:
    if isinstance(method, MergeMethod):
        if hyperparameters:
            raise MergeConfigError("pass hyperparameters either in the method object or as hyperparameters=, not both")
        merger = method
    else:
        merger = get_method(method, **dict(hyperparameters or {}))
    if merger.name not in STREAMING_METHODS:
        reason = (
            "it is task-conditional (one model per task)"
            if merger.task_conditional
            else "it needs statistics over the whole model"
        )
        raise MergeConfigError(
            f"method {merger.name!r} cannot be merged in streaming mode: {reason}; run distac merge without "
            f"--streaming (in memory). Streaming supports: {', '.join(STREAMING_METHODS)}"
        )
    if merger.name == "consensus_ta" and getattr(merger, "use_ties", False):
        raise MergeConfigError(
            "consensus_ta with use_ties=True cannot be merged in streaming mode (its TIES multi-task vector needs "
            "global statistics first); use use_ties=False or run distac merge without --streaming"
        )
    return merger


def _task_names(task_names: Sequence[str] | None, finetuned: Sequence[Path]) -> list[str]:
    names = list(task_names) if task_names is not None else [Path(p).name for p in finetuned]
    if len(names) != len(finetuned):
        raise MergeConfigError(f"task_names has {len(names)} names for {len(finetuned)} sources")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise MergeConfigError(f"task names must be distinct non-empty strings, got {names!r}; pass task_names=")
    return names


class _InfoCollector:
    """Folds the ``info`` of each per-key ``merge()`` into one record: per-key lists and dicts
    (``matrix_keys``, ``loss``, ``rank_per_task``, ``subspaces``) are concatenated/merged."""

    _LIST_KEYS = ("matrix_keys",)
    _DICT_KEYS = ("loss", "rank_per_task", "subspaces")

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def add(self, info: Mapping[str, Any]) -> None:
        for name in self._LIST_KEYS:
            if name in info:
                self.info.setdefault(name, []).extend(info[name])
        for name in self._DICT_KEYS:
            if name in info:
                self.info.setdefault(name, {}).update(info[name])


# ------------------------------------------------------------------------------------------ TIES
def _float_bits(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as int32 bit patterns; for non-negative float32 their order is the order of the values."""
    return tau.abs().reshape(-1).view(torch.int32)


def _ties_thresholds(
    density: float,
    plan: _Plan,
    read_taus: Callable[[str, bool], list[torch.Tensor]],
    num_tasks: int,
) -> list[float]:
    """Exact per-task global trim thresholds (the k-th smallest |tau_t|, as ``kthvalue`` in memory).

    Two streamed passes of bit-pattern histograms (see the module docstring). The first pass also
    validates every tensor (NaN/Inf); it runs even when nothing is trimmed, so validation always
    precedes writing.
    """
    total = plan.numel(plan.selected)
    kth = total - int(total * density)
    high = torch.zeros(num_tasks, _HIGH_BINS, dtype=torch.int64)
    for key in plan.keys:
        taus = read_taus(key, True)
        if kth <= 0:
            continue
        for task, tau in enumerate(taus):
            high[task] += torch.bincount(_float_bits(tau) >> 16, minlength=_HIGH_BINS)
    if kth <= 0:
        return [float("-inf")] * num_tasks
    cumulative = high.cumsum(dim=1)
    bins = [int(torch.searchsorted(cumulative[t], kth)) for t in range(num_tasks)]
    ranks = [kth - (int(cumulative[t, b - 1]) if b > 0 else 0) for t, b in enumerate(bins)]
    low = torch.zeros(num_tasks, _LOW_BINS, dtype=torch.int64)
    for key in plan.selected:
        for task, tau in enumerate(read_taus(key, False)):
            bits = _float_bits(tau)
            inside = bits[(bits >> 16) == bins[task]]
            if inside.numel():
                low[task] += torch.bincount(inside & 0xFFFF, minlength=_LOW_BINS)
    thresholds = []
    for task in range(num_tasks):
        position = int(torch.searchsorted(low[task].cumsum(dim=0), ranks[task]))
        bits = torch.tensor([(bins[task] << 16) | position], dtype=torch.int32)
        thresholds.append(float(bits.view(torch.float32)[0]))
    return thresholds


@dataclass
class _TiesState:
    thresholds: list[float]
    mean: bool
    kept: list[int]
    sign_total: int = 0
    undecided: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def merge_key(self, key: str, taus: list[torch.Tensor], pre: torch.Tensor, coefficient: float) -> torch.Tensor:
        """TIES of one key, as :func:`distac.merging.ties.ties_merge` does it (float32 update).
        ``taus`` is emptied (its tensors live on in the stack only)."""
        stack = torch.stack(taus)
        taus.clear()
        shape = (-1,) + (1,) * (stack.ndim - 1)
        threshold = torch.tensor(self.thresholds, dtype=stack.dtype).view(shape)
        trimmed = torch.where(stack.abs() >= threshold, stack, torch.zeros((), dtype=stack.dtype))
        del stack
        nonzero = trimmed != 0
        for task, count in enumerate(nonzero.reshape(nonzero.shape[0], -1).sum(dim=1).tolist()):
            self.kept[task] += int(count)
        gamma = torch.sign(trimmed.sum(dim=0))
        self.sign_total += int((gamma > 0).sum()) - int((gamma < 0).sum())
        merged = _disjoint(trimmed, gamma, self.mean)
        ambiguous = (gamma == 0) & nonzero.any(dim=0)
        if bool(ambiguous.any()):
            index = ambiguous.flatten().nonzero().squeeze(1)
            positive = torch.ones(index.numel(), dtype=trimmed.dtype)
            values = _disjoint(trimmed.reshape(trimmed.shape[0], -1)[:, index], positive, self.mean)
            patched = (pre.reshape(-1)[index].float() + coefficient * values).to(pre.dtype)
            self.undecided.append((key, index, values, patched))
        return merged

    @property
    def majority(self) -> int:
        return 1 if self.sign_total > 0 else (-1 if self.sign_total < 0 else 0)


# ------------------------------------------------------------------------------------------ memory
def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ main
def streaming_merge(
    pretrained: str | os.PathLike[str],
    finetuned: Sequence[str | os.PathLike[str]],
    *,
    method: str | MergeMethod,
    coefficient: float | None = None,
    output: str | os.PathLike[str],
    max_shard_bytes: int | None = None,
    selector: ParameterSelector | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    task_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Merge ``finetuned`` onto ``pretrained`` tensor by tensor and write ``output``; return the record.

    ``method``: a registry name (with ``hyperparameters``) or a :class:`MergeMethod` instance.
    ``coefficient``: lambda in theta_pre + lambda * update (default: the method's default).
    ``selector``: which keys form the task vectors (default :class:`ParameterSelector`: everything
    but heads and BatchNorm statistics); the other keys are copied from ``pretrained``.
    The record (also written as ``output/merge.json``) holds the method, hyperparameters,
    coefficient, sources, key counts, bytes written, wall seconds and the process's peak RSS.
    """
    start = time.perf_counter()
    merger = _method_object(method, hyperparameters)
    coef = merger.default_coefficient if coefficient is None else coefficient
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not math.isfinite(coef):
        raise MergeConfigError(f"coefficient must be a finite number, got {coef!r}")
    coef = float(coef)
    sources_paths = [Path(p) for p in finetuned]
    if not sources_paths:
        raise MergeConfigError("give at least one fine-tuned checkpoint")
    names = _task_names(task_names, sources_paths)
    output = Path(output)
    pretrained = Path(pretrained)
    for path in (pretrained, *sources_paths):
        resolved, target = path.resolve(), output.resolve()
        if resolved == target or target in resolved.parents or resolved in target.parents:
            raise MergeConfigError(f"output {output} overlaps the input {path}; write the merge somewhere else")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise MergeConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")

    pre_reader = open_checkpoint(pretrained)
    if pre_reader.kind != "safetensors":
        raise CheckpointError(
            f"{pretrained}: streaming merges need safetensors inputs, this is a torch pickle (it cannot be read "
            "tensor by tensor); convert it or merge without --streaming"
        )
    sources = [_Source(name, path, pre_reader) for name, path in zip(names, sources_paths, strict=True)]
    selector = selector or ParameterSelector()
    plan = _validate(pre_reader, sources, selector)
    selected = set(plan.selected)
    rss_start = peak_rss_bytes()
    for source, extra in zip(sources, plan.source_extras, strict=True):
        for key in extra:  # not merged (the output has the pretrained keys), but corrupt is still an error
            _check_finite(source.extra_tensor(key), source.file_of(key), key)

    def read(key: str, check: bool) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """theta_pre[key] and, for selected keys, the T task-vector tensors of key (float32)."""
        pre = pre_reader.get(key)
        if check:
            _check_finite(pre, pre_reader.files[key], key)
        if key not in selected:
            if check:  # unused here, but a corrupt source is still an error, as in the in-memory path
                for source in sources:
                    if source.has(key):
                        _check_finite(source.tensor(key, pre), source.file_of(key), key)
            return pre, None
        taus = []
        pre_float = pre.float()
        for source in sources:
            tensor = source.tensor(key, pre)
            if check:
                _check_finite(tensor, source.file_of(key), key)
            taus.append(tensor.float() - pre_float)
        return pre, taus

    info = _InfoCollector()
    ties_state: _TiesState | None = None
    passes = 1
    if isinstance(merger, Ties):

        def read_taus(key: str, check: bool) -> list[torch.Tensor]:
            _, taus = read(key, check)
            return taus or []

        thresholds = _ties_thresholds(merger.density, plan, read_taus, len(sources))
        passes = 3 if math.isfinite(thresholds[0]) else 2
        ties_state = _TiesState(thresholds=thresholds, mean=merger.merge_func == "mean", kept=[0] * len(sources))

    is_matrix = getattr(merger, "is_matrix", None)  # TSVM, Iso-C/CTS, WUDI: the whole model's check, once
    if is_matrix is not None:
        merged_meta = [plan.meta[k] for k in plan.selected]
        warn_if_no_matrix_keys(merger, merged_meta, [k for k in plan.selected if is_matrix(k, plan.meta[k])])
    metadata = {"distac": "streaming_merge", "method": merger.name, "coefficient": repr(coef)}
    with atomic_directory(output) as tmp, one_key_at_a_time():
        writer = _ShardWriter(tmp, plan.meta, max_shard_bytes, metadata)
        try:
            for key in plan.keys:
                pre, taus = read(key, check=ties_state is None)
                if taus is None:
                    writer.write(key, pre)
                    continue
                if ties_state is not None:
                    update = ties_state.merge_key(key, taus, pre, coef)
                else:
                    result = merger.merge([{key: tau} for tau in taus], task_names=names)
                    info.add(result.info)
                    update = result.task_vector[key]
                del taus
                value = (pre.float() + coef * update.to(dtype=torch.float32)).to(pre.dtype)
                if not torch.isfinite(value).all():  # as the in-memory merge: never write a model distac refuses
                    raise CheckpointError(
                        f"the {merger.name} merge at lambda={coef} has NaN/Inf values in {key} "
                        f"({pre.dtype}); a coefficient too large for the weights' dtype?"
                    )
                writer.write(key, value)
                del value, update
            if ties_state is not None and ties_state.majority > 0:
                for key, index, _, patched in ties_state.undecided:
                    writer.patch(key, index, patched)
            files = writer.finish()
        finally:
            writer.abort()
        copied = copy_config_files(pretrained, tmp)
        seconds = time.perf_counter() - start
        record = _record(
            merger,
            coef,
            pretrained,
            sources,
            names,
            plan,
            writer,
            files,
            copied,
            passes,
            seconds,
            rss_start,
            info,
            ties_state,
        )
        atomic_write_json(tmp / MERGE_RECORD, record)
    return record


def _record(
    merger: MergeMethod,
    coefficient: float,
    pretrained: Path,
    sources: Sequence[_Source],
    names: Sequence[str],
    plan: _Plan,
    writer: _ShardWriter,
    files: list[str],
    copied: list[str],
    passes: int,
    seconds: float,
    rss_start: int,
    collector: _InfoCollector,
    ties_state: _TiesState | None,
) -> dict[str, Any]:
    from distac.environment import environment_record

    num_parameters = plan.numel(plan.selected)
    info: dict[str, Any] = {
        "method": merger.name,
        "task_conditional": False,
        "default_coefficient": merger.default_coefficient,
        "hyperparameters": merger.hyperparameters,
        "num_tasks": len(sources),
        "task_names": list(names),
        "num_keys": len(plan.selected),
        "num_parameters": num_parameters,
        **collector.info,
    }
    if ties_state is not None:
        info.update(
            trim_thresholds=[json_float(t) for t in ties_state.thresholds],
            kept_fraction=[k / num_parameters for k in ties_state.kept],
            majority_sign=ties_state.majority,
            zero_sign_coordinates=int(sum(index.numel() for _, index, _, _ in ties_state.undecided)),
        )
    return {
        "method": merger.name,
        "hyperparameters": merger.hyperparameters,
        "coefficient": coefficient,
        "pretrained": str(pretrained),
        "sources": [
            {"name": name, "path": str(source.path), "kind": "lora" if source.adapter is not None else "safetensors"}
            for name, source in zip(names, sources, strict=True)
        ],
        "streaming": True,
        "read_passes": passes,
        "keys_total": len(plan.keys),
        "keys_merged": len(plan.selected),
        "keys_copied": len(plan.keys) - len(plan.selected),
        "parameters_merged": num_parameters,
        "bytes_written": writer.bytes_written,
        "weight_files": files,
        "config_files": copied,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_bytes_before_merge": rss_start,
        "info": info,
        "task_conditional": False,
        # per source: its keys the pretrained checkpoint lacks (task heads), which the output does not have
        "left_out": {name: extra for name, extra in zip(names, plan.source_extras, strict=True) if extra},
        "environment": environment_record(),
    }
