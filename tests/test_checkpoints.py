"""Checkpoint I/O: every format round-trips; unsafe or broken files give clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from distac.checkpoints import (
    SAFETENSORS_INDEX,
    load_state_dict,
    open_checkpoint,
    save_safetensors,
    save_state_dict,
)
from distac.errors import CheckpointError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.weight": torch.randn(8, 4, generator=g),
        "encoder.layer.0.bias": torch.randn(8, generator=g),
        "encoder.layer.1.weight": torch.randn(4, 8, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_safetensors_file_round_trip(tmp_path: Path) -> None:
    state = _state()
    save_safetensors(state, tmp_path / "w.safetensors")
    _assert_equal(state, load_state_dict(tmp_path / "w.safetensors"))


def test_directory_round_trip_single_and_sharded(tmp_path: Path) -> None:
    state = _state()
    save_state_dict(state, tmp_path / "single")
    assert (tmp_path / "single" / "model.safetensors").is_file()
    _assert_equal(state, load_state_dict(tmp_path / "single"))
    save_state_dict(state, tmp_path / "sharded", max_shard_bytes=100)
    index = json.loads((tmp_path / "sharded" / SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    _assert_equal(state, load_state_dict(tmp_path / "sharded"))
    reader = open_checkpoint(tmp_path / "sharded")
    assert reader.shapes()["encoder.layer.0.weight"] == ((8, 4), "torch.float32")


def test_torch_state_dict_weights_only(tmp_path: Path) -> None:
    state = _state()
    torch.save(state, tmp_path / "w.pt")
    _assert_equal(state, load_state_dict(tmp_path / "w.pt"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "nested.pth")
    _assert_equal(state, load_state_dict(tmp_path / "nested.pth"))


class _Evil:
    def __reduce__(self):  # noqa: ANN204 - the classic pickle payload
        return (Path.touch, (Path("/tmp/distac_pwned_marker"),))


def test_malicious_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    marker = Path("/tmp/distac_pwned_marker")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"weight": _Evil()}, handle)
    with pytest.raises(CheckpointError, match="evil.bin"):
        load_state_dict(tmp_path / "evil.bin")
    assert not marker.exists()


def test_hf_save_pretrained_directories_load(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False)
    state = load_state_dict(tiny_bert_dir)
    assert torch.equal(
        state["encoder.layer.0.attention.self.query.weight"],
        model.state_dict()["encoder.layer.0.attention.self.query.weight"],
    )
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / SAFETENSORS_INDEX).is_file()
    sharded = load_state_dict(tmp_path / "sharded")
    assert set(sharded) == set(state)
    assert all(torch.equal(sharded[k], state[k]) for k in state)


def test_truncated_and_garbage_safetensors(tmp_path: Path) -> None:
    save_safetensors(_state(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 20])
    with pytest.raises(CheckpointError, match="trunc.safetensors.*truncated"):
        open_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")


def test_nan_weights_are_reported_with_the_tensor_name(tmp_path: Path) -> None:
    state = _state()
    state["encoder.layer.0.bias"][3] = float("nan")
    save_safetensors(state, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layer.0.bias.*NaN"):
        load_state_dict(tmp_path / "nan.safetensors")


def test_nan_in_a_directory_names_the_shard_and_the_torch_file_that_hold_it(tmp_path: Path) -> None:
    state = _state()
    bad_key = "encoder.layer.0.bias"
    state[bad_key][3] = float("nan")
    sharded = save_state_dict(state, tmp_path / "sharded", max_shard_bytes=64)
    holder = json.loads((sharded / SAFETENSORS_INDEX).read_text())["weight_map"][bad_key]
    assert len(set(json.loads((sharded / SAFETENSORS_INDEX).read_text())["weight_map"].values())) > 1
    with pytest.raises(CheckpointError, match=f"sharded/{holder}: tensor '{bad_key}' contains 1 NaN"):
        load_state_dict(sharded)
    (tmp_path / "torch").mkdir()
    torch.save(state, tmp_path / "torch" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"torch/pytorch_model.bin: tensor '{bad_key}' contains 1 NaN"):
        load_state_dict(tmp_path / "torch")


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        load_state_dict(tmp_path / "empty")


def test_tied_weights_are_saved(tmp_path: Path) -> None:
    shared = torch.randn(5, 3)
    save_safetensors({"a": shared, "b": shared}, tmp_path / "tied.safetensors")
    out = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(out["a"], out["b"])


def test_interrupted_save_keeps_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _state()
    save_state_dict(state, tmp_path / "out")
    import distac.checkpoints as ck

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_state_dict(_state(1), tmp_path / "out")
    _assert_equal(state, load_state_dict(tmp_path / "out"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
