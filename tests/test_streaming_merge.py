"""Streaming merges (``distac.merging.streaming``, ``distac merge --streaming``): equal to the
in-memory merge, valid sharded output, clear errors before any output appears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import distac.merging.streaming as streaming
from distac.checkpoints import load_state_dict, save_state_dict
from distac.cli import app
from distac.errors import CheckpointError
from distac.merging import MergeConfigError, apply_merge, get_method
from distac.merging.streaming import streaming_merge
from distac.task_vectors import ParameterSelector, TaskVector

runner = CliRunner()
SHARD = "40KB"  # the tiny BERT is ~170 KB in float32: several shards


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=48,
    )


@pytest.fixture(scope="module")
def bert_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny random BERT saved sharded with save_pretrained, and three noisy 'fine-tuned' copies."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("streaming_bert")
    torch.manual_seed(0)
    model = BertModel(_bert_config())
    model.save_pretrained(root / "pre", max_shard_size=SHARD)
    generator = torch.Generator().manual_seed(1)
    sources = []
    for i in range(3):
        tuned = BertModel(_bert_config())
        tuned.load_state_dict(model.state_dict())
        with torch.no_grad():
            for parameter in tuned.parameters():
                parameter.add_(0.02 * (i + 1) * torch.randn(parameter.shape, generator=generator))
        tuned.save_pretrained(root / f"ft{i}", max_shard_size=SHARD)
        sources.append(root / f"ft{i}")
    return root / "pre", sources


def _in_memory(pre_dir: Path, sources: list[Path], method: str, coefficient: float, selector=None, **hyper):
    pre = load_state_dict(pre_dir)
    vectors = [TaskVector.from_state_dicts(pre, load_state_dict(s), selector).deltas for s in sources]
    result = get_method(method, **hyper).merge(vectors, task_names=[s.name for s in sources], pretrained=pre)
    return apply_merge(pre, result, coefficient), result


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), f"{key}: max diff {(actual[key].float() - value.float()).abs().max()}"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "tsvm", "iso_cts"])
def test_streaming_equals_in_memory(bert_sources, tmp_path: Path, method: str) -> None:
    pre_dir, sources = bert_sources
    record = streaming_merge(
        pre_dir, sources, method=method, coefficient=0.7, output=tmp_path / "out", max_shard_bytes=40_000
    )
    expected, result = _in_memory(pre_dir, sources, method, 0.7)
    _assert_same(load_state_dict(tmp_path / "out"), expected)

    # a valid Hugging Face shard index covering every key, with the planned total size
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(record["weight_files"])
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for name in files:
        with safe_open(str(tmp_path / "out" / name), framework="pt") as handle:
            assert {k for k, v in index["weight_map"].items() if v == name} == set(handle.keys())
    assert (tmp_path / "out" / "config.json").is_file()

    on_disk = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert on_disk["method"] == method and on_disk["coefficient"] == 0.7 and on_disk["streaming"] is True
    assert on_disk["keys_merged"] == len(result.task_vector) and on_disk["keys_copied"] == 0
    assert on_disk["bytes_written"] == sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert on_disk["peak_rss_bytes"] > 0 and on_disk["seconds"] > 0
    if method == "ties":
        assert on_disk["read_passes"] == 3
        assert on_disk["info"]["trim_thresholds"] == result.info["trim_thresholds"]
        assert on_disk["info"]["kept_fraction"] == pytest.approx(result.info["kept_fraction"])


def test_output_loads_with_transformers(bert_sources, tmp_path: Path) -> None:
    from transformers import BertModel

    pre_dir, sources = bert_sources
    streaming_merge(pre_dir, sources, method="average", output=tmp_path / "out", max_shard_bytes=40_000)
    model = BertModel.from_pretrained(tmp_path / "out")
    merged = load_state_dict(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(value, merged[key]), key
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert hidden.shape == (1, 4, 32) and torch.isfinite(hidden).all()


def test_unselected_keys_are_copied_from_pretrained(bert_sources, tmp_path: Path) -> None:
    pre_dir, sources = bert_sources
    selector = ParameterSelector(exclude=("pooler.*", "*LayerNorm*"))
    record = streaming_merge(
        pre_dir, sources, method="task_arithmetic", coefficient=0.3, output=tmp_path / "out", selector=selector
    )
    pre = load_state_dict(pre_dir)
    merged = load_state_dict(tmp_path / "out")
    expected, _ = _in_memory(pre_dir, sources, "task_arithmetic", 0.3, selector)
    _assert_same(merged, expected)
    assert torch.equal(merged["pooler.dense.weight"], pre["pooler.dense.weight"])
    assert not torch.equal(
        merged["encoder.layer.0.attention.self.query.weight"], pre["encoder.layer.0.attention.self.query.weight"]
    )
    copied = [k for k in pre if k.startswith("pooler.") or "LayerNorm" in k]
    assert record["keys_copied"] == len(copied) and record["keys_merged"] == len(pre) - len(copied)
    assert (tmp_path / "out" / "model.safetensors").is_file()  # no max_shard_bytes: one file, no index


def _toy_sources(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """Plain safetensors files where TIES has coordinates with an exactly zero elected sign (task 0
    and task 1 cancel) while the global majority sign is positive: the patch-after-writing path."""
    generator = torch.Generator().manual_seed(3)
    pre = {"a.weight": torch.randn(6, 5, generator=generator), "b.bias": torch.randn(7, generator=generator)}
    base = {k: v.abs() + 0.5 for k, v in pre.items()}  # positive task-vector entries: majority sign +1
    tau0 = {k: v.clone() for k, v in base.items()}
    tau1 = {k: v.clone() for k, v in base.items()}
    tau1["a.weight"][0, :3] = -tau0["a.weight"][0, :3]  # cancel exactly: elected sign 0
    tau1["b.bias"][2] = -tau0["b.bias"][2]
    pre = {k: v.to(dtype) for k, v in pre.items()}
    save_state_dict(pre, tmp_path / "pre")
    paths = []
    for i, tau in enumerate((tau0, tau1)):
        save_state_dict({k: (pre[k].double() + tau[k]).to(dtype) for k in pre}, tmp_path / f"ft{i}")
        paths.append(tmp_path / f"ft{i}")
    return tmp_path / "pre", paths


def test_ties_zero_sign_coordinates_are_patched_like_in_memory(tmp_path: Path) -> None:
    pre_dir, sources = _toy_sources(tmp_path)
    record = streaming_merge(pre_dir, sources, method="ties", coefficient=1.0, output=tmp_path / "out")
    expected, result = _in_memory(pre_dir, sources, "ties", 1.0)
    assert result.info["zero_sign_coordinates"] > 0 and result.info["majority_sign"] == 1
    assert record["info"]["zero_sign_coordinates"] == result.info["zero_sign_coordinates"]
    _assert_same(load_state_dict(tmp_path / "out"), expected)


@pytest.mark.parametrize(
    ("method", "hyper"), [("ties", {"density": 1.0, "merge_func": "sum"}), ("wudi", {"iterations": 3})]
)
def test_other_settings_equal_in_memory(bert_sources, tmp_path: Path, method: str, hyper: dict) -> None:
    pre_dir, sources = bert_sources
    streaming_merge(pre_dir, sources, method=method, hyperparameters=hyper, coefficient=0.5, output=tmp_path / "o")
    expected, _ = _in_memory(pre_dir, sources, method, 0.5, **hyper)
    _assert_same(load_state_dict(tmp_path / "o"), expected)


def test_bfloat16_checkpoints(tmp_path: Path) -> None:
    pre_dir, sources = _toy_sources(tmp_path, torch.bfloat16)
    streaming_merge(pre_dir, sources, method="task_arithmetic", coefficient=0.3, output=tmp_path / "out")
    merged = load_state_dict(tmp_path / "out")
    expected, _ = _in_memory(pre_dir, sources, "task_arithmetic", 0.3)
    _assert_same(merged, expected)
    assert merged["a.weight"].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ errors
def _copy_with(state_dir: Path, target: Path, change) -> Path:
    state = load_state_dict(state_dir)
    change(state)
    save_state_dict(state, target, max_shard_bytes=40_000)
    return target


def test_mismatched_keys_fail_naming_file_and_key(bert_sources, tmp_path: Path) -> None:
    pre_dir, sources = bert_sources

    def rename(state):
        state["encoder.layer.9.extra.weight"] = state.pop("encoder.layer.1.output.dense.weight")

    bad = _copy_with(sources[0], tmp_path / "renamed", rename)
    with pytest.raises(CheckpointError, match=r"renamed.*missing tensor 'encoder\.layer\.1\.output\.dense\.weight'"):
        streaming_merge(pre_dir, [bad, sources[1]], method="task_arithmetic", output=tmp_path / "out")

    def reshape(state):
        state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(16, 32)

    bad = _copy_with(sources[0], tmp_path / "reshaped", reshape)
    with pytest.raises(CheckpointError) as error:
        streaming_merge(pre_dir, [sources[1], bad], method="tsvm", output=tmp_path / "out")
    message = str(error.value)
    assert "reshaped" in message and ".safetensors" in message  # the shard file that holds the key
    assert "'encoder.layer.0.intermediate.dense.weight'" in message and "(16, 32)" in message and "(64, 32)" in message
    assert not (tmp_path / "out").exists()


def test_sources_follow_the_in_memory_key_rule(bert_sources, tmp_path: Path) -> None:
    """Heads and buffers are not merged: a source may add a head the pretrained checkpoint lacks, or
    lack a non-merged buffer, and the streaming merge still equals the in-memory one; a merged key the
    pretrained checkpoint lacks is refused by both."""
    pre_dir, sources = bert_sources

    def add_buffer(state):  # older transformers saved this integer buffer; newer ones do not
        state["embeddings.position_ids"] = torch.arange(48).unsqueeze(0)

    pre_dir = _copy_with(pre_dir, tmp_path / "pre_with_buffer", add_buffer)

    def add_head(state):  # and, unlike pre_with_buffer, no position_ids
        state["classifier.weight"] = torch.randn(5, 32)
        state["classifier.bias"] = torch.zeros(5)

    headed = _copy_with(sources[0], tmp_path / "headed", add_head)
    inputs = [headed, sources[1]]
    streaming_merge(pre_dir, inputs, method="ties", coefficient=0.5, output=tmp_path / "out", max_shard_bytes=40_000)
    expected, _ = _in_memory(pre_dir, inputs, "ties", 0.5)
    _assert_same(load_state_dict(tmp_path / "out"), expected)

    def poison_head(state):
        state["classifier.weight"] = torch.full((5, 32), float("nan"))

    poisoned = _copy_with(sources[0], tmp_path / "poisoned_head", poison_head)
    with pytest.raises(CheckpointError, match=r"poisoned_head/.*'classifier\.weight' contains 160 NaN/Inf"):
        streaming_merge(pre_dir, [poisoned, sources[1]], method="task_arithmetic", output=tmp_path / "out2")

    def add_layer(state):
        state["encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)

    deeper = _copy_with(sources[0], tmp_path / "deeper", add_layer)
    with pytest.raises(CheckpointError, match=r"deeper: unexpected tensor 'encoder\.layer\.2\.output\.dense\.weight'"):
        streaming_merge(pre_dir, [deeper, sources[1]], method="task_arithmetic", output=tmp_path / "out3")
    with pytest.raises(CheckpointError, match=r"has 1 parameters that pretrained lacks"):
        _in_memory(pre_dir, [deeper, sources[1]], "task_arithmetic", 0.5)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_nan_fails_naming_file_and_key_and_writes_nothing(bert_sources, tmp_path: Path) -> None:
    pre_dir, sources = bert_sources

    def poison(state):
        state["encoder.layer.1.attention.self.key.weight"][3, 4] = float("nan")

    bad = _copy_with(sources[1], tmp_path / "poisoned", poison)
    for method in ("task_arithmetic", "ties"):
        with pytest.raises(
            CheckpointError,
            match=r"poisoned/model-\d+-of-\d+\.safetensors: tensor 'encoder\.layer\.1"
            r"\.attention\.self\.key\.weight' contains 1 NaN/Inf",
        ):
            streaming_merge(pre_dir, [sources[0], bad], method=method, output=tmp_path / "out")
        assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["poisoned"]  # no temporary directory left behind


def test_interrupted_write_leaves_no_partial_output(bert_sources, tmp_path: Path, monkeypatch) -> None:
    pre_dir, sources = bert_sources
    original = streaming._ShardWriter.write
    calls = {"n": 0}

    def write(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 20:  # several shards already complete on disk
            raise KeyboardInterrupt
        return original(self, key, tensor)

    monkeypatch.setattr(streaming._ShardWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        streaming_merge(pre_dir, sources, method="task_arithmetic", output=tmp_path / "out", max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []

    # an existing (distac) output survives an interrupted overwrite untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "merge.json").write_text("{}")
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        streaming_merge(pre_dir, sources, method="task_arithmetic", output=tmp_path / "out", max_shard_bytes=40_000)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["merge.json"]
    # and a directory of the user's own is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    monkeypatch.setattr(streaming._ShardWriter, "write", original)
    with pytest.raises(FileExistsError, match="notes.txt"):
        streaming_merge(pre_dir, sources, method="task_arithmetic", output=tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("method", "hyper", "match"),
    [
        ("emr", {}, "task-conditional"),
        ("tall_masks", {}, "task-conditional"),
        ("consensus_ta", {"use_ties": True}, "use_ties=True"),
    ],
)
def test_unsupported_methods_are_refused(bert_sources, tmp_path: Path, method, hyper, match) -> None:
    pre_dir, sources = bert_sources
    with pytest.raises(MergeConfigError, match=match) as error:
        streaming_merge(pre_dir, sources, method=method, hyperparameters=hyper, output=tmp_path / "out")
    assert "without --streaming" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_consensus_without_ties_is_streamed(bert_sources, tmp_path: Path) -> None:
    pre_dir, sources = bert_sources
    streaming_merge(pre_dir, sources, method="consensus_ta", coefficient=0.4, output=tmp_path / "out")
    expected, _ = _in_memory(pre_dir, sources, "consensus_ta", 0.4)
    _assert_same(load_state_dict(tmp_path / "out"), expected)


def test_bad_inputs(bert_sources, tmp_path: Path) -> None:
    pre_dir, sources = bert_sources
    torch.save(load_state_dict(sources[0]), tmp_path / "ft.pt")
    with pytest.raises(CheckpointError, match="torch pickle"):
        streaming_merge(pre_dir, [tmp_path / "ft.pt"], method="average", output=tmp_path / "out")
    with pytest.raises(MergeConfigError, match="overlaps the input"):
        streaming_merge(pre_dir, sources, method="average", output=sources[0])
    with pytest.raises(MergeConfigError, match="coefficient"):
        streaming_merge(pre_dir, sources, method="average", coefficient=float("nan"), output=tmp_path / "out")
    with pytest.raises(CheckpointError, match="no parameters selected"):
        streaming_merge(
            pre_dir, sources, method="average", output=tmp_path / "out", selector=ParameterSelector(include=("x*",))
        )


# ------------------------------------------------------------------------------------------ CLI
def test_cli_streaming(bert_sources, tmp_path: Path) -> None:
    pre_dir, sources = bert_sources
    args = ["merge", *map(str, sources), "-m", "ties", "-p", str(pre_dir), "-l", "0.6", "--set", "density=0.3"]
    result = runner.invoke(app, [*args, "--streaming", "--max-shard-size", "40KB", "-o", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    in_memory = runner.invoke(app, [*args, "--max-shard-size", "40KB", "-o", str(tmp_path / "m")])
    assert in_memory.exit_code == 0, in_memory.output
    _assert_same(load_state_dict(tmp_path / "s"), load_state_dict(tmp_path / "m"))
    record = json.loads((tmp_path / "s" / "merge.json").read_text())
    assert record["hyperparameters"]["density"] == 0.3 and record["coefficient"] == 0.6
    assert [s["name"] for s in record["sources"]] == [s.name for s in sources]
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()

    refused = runner.invoke(
        app, ["merge", *map(str, sources), "-m", "emr", "-p", str(pre_dir), "--streaming", "-o", str(tmp_path / "e")]
    )
    assert refused.exit_code != 0 and not (tmp_path / "e").exists()
    assert "streaming" in str(refused.exception) + refused.output


def _conv_sources(tmp_path: Path, with_matrix: bool) -> tuple[Path, list[Path]]:
    generator = torch.Generator().manual_seed(5)
    pre = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator),
    }
    if with_matrix:
        pre["block.proj.weight"] = torch.randn(5, 4, generator=generator)
    save_state_dict(pre, tmp_path / "pre")
    paths = []
    for i in range(2):
        save_state_dict(
            {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in pre.items()}, tmp_path / f"{i}"
        )
        paths.append(tmp_path / f"{i}")
    return tmp_path / "pre", paths


@pytest.mark.parametrize("with_matrix", [True, False])
def test_the_no_matrix_warning_looks_at_the_whole_model(
    tmp_path: Path, with_matrix: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Streaming merges a key at a time; a lone conv kernel used to trigger 'selects no key ... pass
    all_2d_and_conv' although the model's matrices were merged as matrices (advice that changes results)."""
    pre_dir, sources = _conv_sources(tmp_path, with_matrix)
    with caplog.at_level("WARNING", logger="distac.merging"):
        record = streaming_merge(pre_dir, sources, method="tsvm", output=tmp_path / "out")
    warnings = caplog.text.count("selects no key")
    assert warnings == (0 if with_matrix else 1), caplog.text
    assert record["info"].get("matrix_keys", []) == (["block.proj.weight"] if with_matrix else [])


def test_a_merge_that_overflows_the_dtype_is_refused_not_written(tmp_path: Path) -> None:
    pre_dir, sources = _toy_sources(tmp_path, torch.float16)
    with pytest.raises(CheckpointError, match=r"NaN/Inf values in a\.weight .*coefficient too large"):
        streaming_merge(pre_dir, sources, method="task_arithmetic", coefficient=1e7, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
