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
import math
import os
import pickle
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from distac.atomic import atomic_directory, atomic_path, atomic_write_json
from distac.errors import CheckpointError

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
                self._loaded = {}
                for file in sorted(set(self.files.values())):
                    self._loaded.update(_load_torch_file(file))
            return self._loaded[key].to(device)
        file = self.files[key]
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
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


def _read_safetensors_header(file: Path) -> dict:
    """Parse and validate a safetensors header, so truncation/corruption is reported before use."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len <= 0 or header_len > min(size - 8, 100_000_000):
                raise CheckpointError(f"{file}: corrupt safetensors header length {header_len} (file is {size} bytes)")
            header = json.loads(handle.read(header_len))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: corrupt entry for tensor {key!r} in header") from exc
        if end > data_len or start > end:
            raise CheckpointError(
                f"{file}: truncated or corrupt: tensor {key!r} needs bytes {start}..{end} but the data section "
                f"has {data_len} bytes"
            )
    return header


def _load_torch_file(file: Path) -> StateDict:
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file}: refused to unpickle: the file contains Python objects other than tensors "
            f"(distac only loads torch files with weights_only=True). Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: not a readable torch checkpoint: {exc}") from exc
    return _as_state_dict(obj, file)


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
        return {str(k): v for k, v in obj.items()}
    raise CheckpointError(f"{file}: not a state dict (found {type(obj).__name__})")


def _index_files(index_file: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_file.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_file}: corrupt shard index: {exc}") from exc
    files = {str(k): index_file.parent / str(v) for k, v in weight_map.items()}
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
    if index is not None:
        key_files = _index_files(index)
    else:
        key_files = {}
        for file in files:
            if kind == "safetensors":
                header = _read_safetensors_header(file)
                key_files.update({k: file for k in header if k != "__metadata__"})
            else:
                key_files.update({k: file for k in _load_torch_file(file)})
    if kind == "safetensors":
        for file in sorted(set(key_files.values())):
            _read_safetensors_header(file)
    if not key_files:
        raise CheckpointError(f"{path}: the checkpoint contains no tensors")
    return CheckpointReader(path=Path(path), files=key_files, kind=kind)


def load_state_dict(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", check_finite: bool = True
) -> StateDict:
    """Load every tensor of a checkpoint; NaN/Inf weights are an error naming the tensor."""
    reader = open_checkpoint(path)
    state = reader.load_all(device)
    if check_finite:
        check_state_finite(state, path)
    return state


def check_state_finite(state: Mapping[str, torch.Tensor], source: object) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} contains {bad} NaN/Inf values")


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
