"""Checkpoint I/O without arbitrary unpickling.

Supported inputs (all read by :func:`load_state_dict` / :func:`open_checkpoint`):

* a Hugging Face model directory: ``model.safetensors``, sharded
  ``model.safetensors.index.json`` + shards, or ``pytorch_model.bin`` (+ index);
* a bare ``.safetensors`` file;
* a torch state dict (``.pt``/``.pth``/``.bin``) loaded with ``weights_only=True`` only, so a
  malicious pickle is rejected instead of executed;
* a distac model directory (``model.safetensors`` + ``distac_model.json``).

Outputs are always safetensors, written atomically (see :mod:`distac.atomic`); large state dicts
are split into shards with a Hugging Face compatible index.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from distac.atomic import atomic_directory, atomic_path, atomic_write_json
from distac.errors import CheckpointError

log = logging.getLogger("distac.checkpoints")

StateDict = dict[str, torch.Tensor]

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAMES = ("pytorch_model.bin", "model.pt", "model.pth")
TORCH_INDEX = "pytorch_model.bin.index.json"
#: Files copied from an input model directory next to a saved output so the result stays loadable.
CONFIG_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "distac_model.json",
)
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")


@dataclass
class CheckpointReader:
    """Lazy, key-by-key access to a checkpoint (one tensor in memory at a time for safetensors).

    ``files`` maps each key to the file that holds it. Torch pickles cannot be read lazily,
    so for them the whole state dict is loaded (with ``weights_only=True``) on first access.
    """

    path: Path
    files: dict[str, Path]
    kind: str  # "safetensors" | "torch"
    _loaded: StateDict | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __len__(self) -> int:
        return len(self.files)

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if key not in self.files:
            raise CheckpointError(f"{self.path}: no tensor named {key!r}")
        if self.kind == "torch":
            if self._loaded is None:
                self._loaded = _load_torch_files(self.files)
            return self._loaded[key].to(device)
        file = self.files[key]
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                return handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - any failure to decode an untrusted file is a bad input
            raise CheckpointError(f"{file}: cannot read tensor {key!r}: {exc}") from exc

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shape and dtype of every tensor without loading the data (safetensors headers only)."""
        if self.kind == "torch":
            return {k: (tuple(self.get(k).shape), str(self.get(k).dtype)) for k in self.files}
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for file in sorted(set(self.files.values())):
            header = _read_safetensors_header(file)
            for key, info in header.items():
                if key != "__metadata__":
                    out[key] = (tuple(info["shape"]), _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]))
        return out

    def items(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.files:
            yield key, self.get(key, device)

    def load_all(self, device: str | torch.device = "cpu") -> StateDict:
        return dict(self.items(device))


_SAFETENSORS_DTYPES = {
    "F64": "torch.float64",
    "F32": "torch.float32",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "I64": "torch.int64",
    "I32": "torch.int32",
    "I16": "torch.int16",
    "I8": "torch.int8",
    "U8": "torch.uint8",
    "BOOL": "torch.bool",
}


#: Bytes per element of the safetensors dtypes whose size is a whole number of bytes.
_SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_safetensors_header(file: Path) -> dict:
    """Parse and validate a safetensors header, so truncation/corruption is reported before use.

    Every entry must have a known dtype, a shape of non-negative integers and in-range data offsets
    whose length matches shape x dtype; the safetensors library then re-checks the whole layout
    (no overlaps or gaps). Any problem is a :class:`CheckpointError` naming the file.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len <= 0 or header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: corrupt safetensors header length {header_len} (file is {size} bytes)")
            header = json.loads(handle.read(header_len))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: corrupt safetensors header: __metadata__ must map strings to strings")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        _check_header_entry(file, key, info, data_len)
    try:  # the library's own checks: offsets cover the data section exactly, no overlaps
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except Exception as exc:  # noqa: BLE001 - any failure to decode an untrusted file is a bad input
        raise CheckpointError(f"{file}: corrupt safetensors file: {exc}") from exc
    return header


def _check_header_entry(file: Path, key: str, info: object, data_len: int) -> None:
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: corrupt entry for tensor {key!r} in header (not a JSON object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{file}: corrupt entry for tensor {key!r} in header: dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{file}: corrupt entry for tensor {key!r} in header: shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{file}: corrupt entry for tensor {key!r} in header: data_offsets {offsets!r}")
    start, end = offsets
    if end > data_len or start > end:
        raise CheckpointError(
            f"{file}: truncated or corrupt: tensor {key!r} needs bytes {start}..{end} but the data section "
            f"has {data_len} bytes"
        )
    itemsize = _SAFETENSORS_ITEMSIZE.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - start:
        raise CheckpointError(
            f"{file}: corrupt entry for tensor {key!r}: shape {shape} of {dtype} needs "
            f"{math.prod(shape) * itemsize} bytes but its data_offsets span {end - start}"
        )


def _load_torch_file(file: Path) -> StateDict:
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to unpickle: not a plain tensor state dict (it contains Python objects other than "
            f"tensors, or is corrupt); distac only loads torch files with weights_only=True. "
            f"Details: {(str(exc).splitlines() or [''])[0]}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure to decode an untrusted file is a bad input
        raise CheckpointError(f"{file}: not a readable torch checkpoint: {type(exc).__name__}: {exc}") from exc
    return _as_state_dict(obj, file)


def _load_torch_files(files: Mapping[str, Path]) -> StateDict:
    """Load the torch files of a (possibly sharded) checkpoint; every key the index lists must be there."""
    loaded: StateDict = {}
    for file in sorted(set(files.values())):
        state = _load_torch_file(file)
        expected = [k for k, f in files.items() if f == file]
        absent = [k for k in expected if k not in state]
        if absent:
            raise CheckpointError(f"{file}: the shard index lists tensors this file does not contain: {absent[:5]}")
        loaded.update({k: state[k] for k in expected})
    return loaded


def _as_state_dict(obj: object, file: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for nested in _NESTED_STATE_KEYS:
            inner = obj.get(nested)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{file}: not a state dict: entries {bad[:5]} are not tensors")
        if not obj:
            raise CheckpointError(f"{file}: the state dict is empty")
        unusable = [k for k, v in obj.items() if v.layout != torch.strided or v.is_meta or v.is_quantized]
        if unusable:
            raise CheckpointError(
                f"{file}: tensors {unusable[:5]} are sparse, quantized or have no data (meta); "
                "distac reads dense tensors only"
            )
        keys = [str(k) for k in obj]
        if len(set(keys)) != len(keys):
            raise CheckpointError(f"{file}: not a state dict: keys collide when converted to strings")
        return _drop_tied_copies({str(k): v for k, v in obj.items()})
    raise CheckpointError(f"{file}: not a state dict (found {type(obj).__name__})")


def _drop_tied_copies(state: StateDict) -> StateDict:
    """Keep the first of several keys that are one tensor (tied weights: a decoder sharing the word
    embeddings). ``torch.save`` stores every name of a tied tensor, ``save_pretrained`` only the first, so
    without this the same fine-tune would have a longer task vector (the tied tensor counted twice) and a
    different key set depending on how it was saved."""
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]] = set()
    out: StateDict = {}
    for key, tensor in state.items():
        ident = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor
    return out


def base_model_prefix(pretrained_keys: Iterable[str], source_keys: Iterable[str]) -> str:
    """The prefix under which a fine-tuned checkpoint stores the pretrained model's keys, or "".

    A checkpoint fine-tuned from a base encoder by a task class stores the encoder under the class's
    base-model prefix (``BertModel``'s ``embeddings.*`` is ``bert.embeddings.*`` in
    ``BertForSequenceClassification``), and a DDP-wrapped one under ``module.``. The prefix is the one
    that makes the most pretrained keys present, if that is more than without a prefix."""
    pretrained_keys = list(pretrained_keys)
    source = set(source_keys)
    found = sum(k in source for k in pretrained_keys)
    absent = next((k for k in pretrained_keys if k not in source), None)
    if absent is None:
        return ""
    candidates = {s[: -len(absent)] for s in source if s.endswith("." + absent)}
    best, best_found = "", found
    for prefix in sorted(candidates, key=len):
        count = sum(prefix + k in source for k in pretrained_keys)
        if count > best_found:
            best, best_found = prefix, count
    return best


def align_to_pretrained(state: StateDict, pretrained_keys: Iterable[str], source: object) -> StateDict:
    """``state`` under the pretrained model's key names: its :func:`base_model_prefix`, if any, removed."""
    prefix = base_model_prefix(pretrained_keys, state)
    if prefix:  # e.g. a BertForSequenceClassification (bert.*) fine-tuned from a BertModel base
        log.info("%s: the pretrained model's parameters are stored under %r here; matched by it", source, prefix)
    return strip_key_prefix(state, prefix, source)


def strip_key_prefix(state: Mapping[str, Any], prefix: str, source: object) -> dict[str, Any]:
    """``state`` with ``prefix`` removed from the keys that have it (the others, a task head, stay)."""
    if not prefix:
        return dict(state)
    out: StateDict = {}
    for key, tensor in state.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in out:
            raise CheckpointError(f"{source}: both {key!r} and {name!r} are stored; cannot tell which is the model's")
        out[name] = tensor
    return out


def _check_shard_name(index_file: Path, key: object, name: object) -> str:
    """A shard must be a file next to the index: no absolute paths, no ``..``, nothing odd."""
    if not isinstance(key, str) or not isinstance(name, str) or not name:
        raise CheckpointError(f"{index_file}: corrupt shard index: entry {key!r} -> {name!r} is not a file name")
    pure = PurePosixPath(name.replace("\\", "/"))
    if (
        pure.is_absolute()
        or PureWindowsPath(name).drive
        or ".." in pure.parts
        or "\x00" in name
        or pure.name in {"", "."}
    ):
        raise CheckpointError(
            f"{index_file}: refused shard path {name!r} for tensor {key!r}: shards must be files inside the "
            "checkpoint directory (no absolute paths or '..')"
        )
    return name


def _index_files(index_file: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{index_file}: corrupt shard index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_file}: corrupt shard index: expected a JSON object with a 'weight_map' object")
    if not weight_map:
        raise CheckpointError(f"{index_file}: the shard index lists no tensors")
    files = {k: index_file.parent / _check_shard_name(index_file, k, v) for k, v in weight_map.items()}
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise CheckpointError(f"{index_file}: shard files listed in the index are missing: {missing}")
    return files


def resolve_weights(path: str | os.PathLike[str]) -> tuple[str, list[Path], Path | None]:
    """Find the weight files of ``path``: returns (kind, files, index_file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / SAFETENSORS_INDEX).is_file():
            return "safetensors", [], path / SAFETENSORS_INDEX
        if (path / SAFETENSORS_NAME).is_file():
            return "safetensors", [path / SAFETENSORS_NAME], None
        if (path / TORCH_INDEX).is_file():
            return "torch", [], path / TORCH_INDEX
        for name in TORCH_NAMES:
            if (path / name).is_file():
                return "torch", [path / name], None
        if (path / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{path}: a PEFT adapter, not a full checkpoint: it needs its base model (distac merge accepts it "
                "as a source with --pretrained BASE; in Python use distac.peft_sources.load_source(path, base))"
            )
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return "safetensors", singles, None
        raise CheckpointError(
            f"{path}: no model weights found (looked for {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, "
            f"{TORCH_INDEX}, {', '.join(TORCH_NAMES)})"
        )
    if path.suffix == ".json" and path.name.endswith(".index.json"):
        kind = "safetensors" if "safetensors" in path.name else "torch"
        return kind, [], path
    if path.suffix == ".safetensors":
        return "safetensors", [path], None
    if path.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        return "torch", [path], None
    raise CheckpointError(f"{path}: unknown checkpoint format (expected a directory, .safetensors, .pt, .pth or .bin)")


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint lazily. Headers are validated now; tensors are read on demand."""
    kind, files, index = resolve_weights(path)
    loaded: StateDict | None = None
    if index is not None:
        key_files = _index_files(index)
        if kind == "safetensors":
            for file in sorted(set(key_files.values())):
                header = _read_safetensors_header(file)
                absent = [k for k, f in key_files.items() if f == file and k not in header]
                if absent:
                    raise CheckpointError(
                        f"{file}: the shard index {index.name} lists tensors this file does not contain: {absent[:5]}"
                    )
        elif key_files:
            loaded = _load_torch_files(key_files)
    else:
        key_files = {}
        for file in files:
            if kind == "safetensors":
                header = _read_safetensors_header(file)
                key_files.update({k: file for k in header if k != "__metadata__"})
            else:
                loaded = _load_torch_file(file)
                key_files.update({k: file for k in loaded})
    if not key_files:
        raise CheckpointError(f"{path}: the checkpoint contains no tensors")
    return CheckpointReader(path=Path(path), files=key_files, kind=kind, _loaded=loaded)


def validate_checkpoint(path: str | os.PathLike[str]) -> None:
    """Cheap checks before any work: the path exists in a known format and, for safetensors, every
    header and the shard index are valid. A torch pickle is fully checked only when it is loaded
    (loading it is the only way to check it), so here it must merely exist."""
    kind, files, index = resolve_weights(path)
    if kind == "safetensors":
        open_checkpoint(path)
    elif index is not None:
        _index_files(index)


def check_output_path(
    output: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    *,
    kind: str = "directory",
) -> None:
    """Refuse, before any work, an output that cannot be written or would destroy something:

    * one that would replace an input: writing a directory atomically swaps the whole target, so an
      output equal to an input, or containing one, would delete that input;
    * a directory output where a file is (it would be replaced by a directory), or a file output
      where a directory is (``kind``: ``directory`` or ``file``);
    * one below a regular file, which no command could create;
    * a directory output over the working directory, or over a directory distac did not write (the
      swap would delete the user's files: :func:`distac.atomic.replacement_problem`)."""
    from distac.atomic import replacement_problem

    target = Path(output).resolve()
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{output}: cannot write here, {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):  # a read-only disk, or no permission: fail before work
                raise CheckpointError(f"{output}: cannot write here, {parent} is not writable")
            break
    if kind == "directory" and target.exists() and not target.is_dir():
        raise CheckpointError(
            f"{output}: exists and is a file; the output is a directory and would replace it. Remove it or choose "
            "another output"
        )
    if kind == "file" and target.is_dir():
        raise CheckpointError(f"{output}: is a directory; give a file name for this output")
    for item in inputs:
        if item is None:
            continue
        source = Path(item).resolve()
        if source == target or target in source.parents:
            raise CheckpointError(
                f"{output}: refusing to write the output over the input {item} "
                f"({'the same path' if source == target else 'it lies inside the output'}); choose another output"
            )
    if kind == "directory":
        problem = replacement_problem(Path(output))
        if problem:
            raise CheckpointError(f"{output}: {problem}; refusing to replace it. Choose another output")


def load_state_dict(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", check_finite: bool = True
) -> StateDict:
    """Load every tensor of a checkpoint; NaN/Inf weights are an error naming the tensor."""
    reader = open_checkpoint(path)
    state = reader.load_all(device)
    if check_finite:
        check_state_finite(state, path, files=reader.files)
    return state


def check_state_finite(
    state: Mapping[str, torch.Tensor], source: object, *, files: Mapping[str, Path] | None = None
) -> None:
    """Raise naming the tensor and where it came from: the file that holds it when ``files`` (key -> file,
    as ``CheckpointReader.files``) is given, so a directory or shard index points at the right shard."""
    for key, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        try:
            finite = torch.isfinite(tensor)
        except RuntimeError:  # e.g. float8 dtypes have no isfinite kernel
            finite = torch.isfinite(tensor.float())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            where = files.get(key, source) if files else source
            raise CheckpointError(f"{where}: tensor {key!r} contains {bad} NaN/Inf values")


def _unshare(state: Mapping[str, torch.Tensor]) -> StateDict:
    """safetensors refuses tensors sharing storage (tied weights); give each its own contiguous copy."""
    seen: set[tuple[int, int]] = set()
    out: StateDict = {}
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        ident = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if (
            ident in seen
            or not tensor.is_contiguous()
            or tensor.numel() != tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
        ):
            tensor = tensor.contiguous().clone()
        else:
            seen.add(ident)
        out[key] = tensor
    return out


def save_safetensors(
    state: Mapping[str, torch.Tensor], file: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write one safetensors file atomically."""
    tensors = _unshare(state)
    with atomic_path(file) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))
    return Path(file)


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
    copy_config_from: str | os.PathLike[str] | None = None,
    extra_json: Mapping[str, object] | None = None,
) -> Path:
    """Save ``state`` as a model directory (``model.safetensors`` or shards + index), atomically.

    ``copy_config_from``: a model directory whose config/tokenizer files are copied alongside,
    so a merged Hugging Face model stays loadable with ``from_pretrained``.
    ``extra_json``: ``{filename: payload}`` JSON files written into the directory.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        write_weights(state, tmp, max_shard_bytes=max_shard_bytes, metadata=metadata)
        if copy_config_from is not None:
            copy_config_files(copy_config_from, tmp)
        for name, payload in (extra_json or {}).items():
            atomic_write_json(tmp / name, payload)
    return out_dir


def write_weights(
    state: Mapping[str, torch.Tensor],
    directory: Path,
    *,
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    meta = {"format": "pt", **dict(metadata or {})}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(state, directory / SAFETENSORS_NAME, meta)
        return
    shards = list(_plan_shards(state, max_shard_bytes))
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({k: state[k] for k in keys}, directory / name, meta)
        weight_map.update({k: name for k in keys})
    atomic_write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _plan_shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> Iterable[list[str]]:
    current: list[str] = []
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            yield current
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        yield current


def copy_config_files(source: str | os.PathLike[str], target: Path) -> list[str]:
    source = Path(source)
    if source.is_file():
        source = source.parent
    copied = []
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def state_dict_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024**i:.1f} {units[i]}"
