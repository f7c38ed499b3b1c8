"""Checkpoints as users have them, beyond the plain case: a task-class fine-tune (BertForSequenceClassification,
keys under ``bert.``) against its base encoder (BertModel), a DDP checkpoint (``module.``), and tied weights
saved by ``torch.save`` (every name of the tied tensor) or ``save_pretrained`` (the first only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distac.checkpoints import base_model_prefix, load_state_dict, strip_key_prefix
from distac.cli import app
from distac.errors import CheckpointError
from distac.task_vectors import TaskVector

runner = CliRunner()


def _config():  # noqa: ANN202
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=24,
        num_labels=3,
    )


def test_base_model_prefix_is_found_only_when_it_matches_more_keys() -> None:
    pre = ["embeddings.weight", "encoder.0.weight"]
    assert base_model_prefix(pre, pre + ["classifier.weight"]) == ""
    assert base_model_prefix(pre, ["bert.embeddings.weight", "bert.encoder.0.weight", "classifier.weight"]) == "bert."
    assert base_model_prefix(pre, ["module.embeddings.weight", "module.encoder.0.weight"]) == "module."
    assert base_model_prefix(pre, ["other.weight"]) == ""  # nothing matches: the usual missing-key error follows
    with pytest.raises(CheckpointError, match="both 'bert.a' and 'a' are stored"):
        strip_key_prefix({"a": torch.zeros(1), "bert.a": torch.zeros(1)}, "bert.", "src")


@pytest.fixture(scope="module")
def classification_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A BertModel base and two BertForSequenceClassification fine-tunes of it (HF Trainer's layout)."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("cls_sources")
    torch.manual_seed(0)
    base = BertModel(_config())
    base.save_pretrained(root / "base")
    sources = []
    for i in range(2):
        tuned = BertForSequenceClassification(_config())
        tuned.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in tuned.bert.parameters():
                parameter.add_(0.01 * (i + 1) * torch.randn_like(parameter))
        tuned.save_pretrained(root / f"cls{i}")
        sources.append(root / f"cls{i}")
    return root / "base", sources


def test_task_class_fine_tunes_merge_onto_their_base_encoder(classification_sources, tmp_path: Path) -> None:  # noqa: ANN001
    """It used to fail: 'missing 39 parameters ... (different architecture?)'."""
    base, sources = classification_sources
    pre = load_state_dict(base)
    expected = {}
    for key, value in pre.items():
        taus = [load_state_dict(s)[f"bert.{key}"].float() - value.float() for s in sources]
        expected[key] = value + 0.5 * sum(taus)
    for extra in ([], ["--streaming"]):
        out = tmp_path / f"merged{len(extra)}"
        args = ["merge", *map(str, sources), "-p", str(base), "-m", "task_arithmetic", "-l", "0.5", "-o", str(out)]
        result = runner.invoke(app, args + extra)
        assert result.exit_code == 0, result.output
        merged = load_state_dict(out)
        assert set(merged) == set(pre)  # the base encoder's layout, loadable as BertModel
        # the task heads are not in it, and the record (and the console, in memory) says so
        record = json.loads((out / "merge.json").read_text())
        assert record["left_out"] == {s.name: ["classifier.bias", "classifier.weight"] for s in sources}
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6)


def test_a_ddp_checkpoint_gives_the_same_task_vector(classification_sources, tmp_path: Path) -> None:  # noqa: ANN001
    base, sources = classification_sources
    state = {k[len("bert.") :]: v for k, v in load_state_dict(sources[0]).items() if k.startswith("bert.")}
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    plain = TaskVector.from_checkpoints(base, sources[0])
    ddp = TaskVector.from_checkpoints(base, tmp_path / "ddp.pt")
    keys = plain.keys()
    assert keys == ddp.keys() and all(torch.equal(plain.deltas[k], ddp.deltas[k]) for k in keys)


def test_tied_weights_count_once_however_the_checkpoint_was_saved(tmp_path: Path) -> None:
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    base = BertForMaskedLM(_config())
    base.save_pretrained(tmp_path / "base")
    tuned = BertForMaskedLM(_config())
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.bert.embeddings.word_embeddings.weight.add_(0.1)  # tied to the decoder: both names change
    tuned.save_pretrained(tmp_path / "tuned")
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    assert "cls.predictions.decoder.weight" in torch.load(tmp_path / "tuned.pt", weights_only=True)
    assert "cls.predictions.decoder.weight" not in load_state_dict(tmp_path / "tuned.pt")
    reference = TaskVector.from_checkpoints(tmp_path / "base", tmp_path / "tuned").norm()
    assert TaskVector.from_checkpoints(tmp_path / "base.pt", tmp_path / "tuned.pt").norm() == pytest.approx(reference)
    assert TaskVector.from_checkpoints(tmp_path / "base.pt", tmp_path / "tuned").norm() == pytest.approx(reference)
