"""Shared fixtures: tiny random models for unit tests, the real shared data, real backbones."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import distac  # noqa: F401  (installs the torchvision shim before transformers is imported)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


class SimulatedKill(Exception):
    """Raised by :func:`killed_after_saving`: a run stopped right after it wrote a resume state."""


@contextlib.contextmanager
def killed_after_saving(monkeypatch: pytest.MonkeyPatch, module: object, name: str = "_save_state") -> Iterator[None]:
    """Run the block with ``module.<name>`` (a loop's resume-state writer) raising right after its first
    write, as if the run were killed there; the block must end that way, and the writer is restored."""
    original = getattr(module, name)

    def save_then_crash(*args: object, **kwargs: object) -> None:
        original(*args, **kwargs)
        raise SimulatedKill

    monkeypatch.setattr(module, name, save_then_crash)
    try:
        with pytest.raises(SimulatedKill):
            yield
    finally:
        monkeypatch.setattr(module, name, original)


def cli_ok(args: list[str]) -> str:
    """Run the distac CLI in-process; it must succeed. Its output."""
    from typer.testing import CliRunner

    from distac.cli import app

    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def cli_failure(args: list[str], *needles: str) -> str:
    """Run the distac CLI in-process; it must fail as its users see it: a DistacError (one red line, exit 2)
    or a usage error (exit 2), whose message holds every needle. The message (a usage error's with rich's
    box characters and line wrapping removed)."""
    from typer.testing import CliRunner

    from distac.cli import app
    from distac.errors import DistacError

    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, DistacError), repr(result.exception)
        message = str(result.exception)
    else:
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.replace("│", " ").split())
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="session")
def data_root() -> Path:
    from distac.data import default_data_root

    return default_data_root()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from distac.models.text import resolve_named_backbone

    return resolve_named_backbone("all-MiniLM-L6-v2")


def save_tiny_bert(out: Path, tokenizer: str | Path, hidden_size: int = 32) -> Path:
    """A 2-layer random BERT with a real tokenizer, saved with save_pretrained into ``out`` (unit tests only)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A 2-layer random BERT (hidden size 32) with MiniLM's real tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), minilm_path)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP saved with save_pretrained, with a real-format BPE tokenizer and processor."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    out = tmp_path_factory.mktemp("tiny_clip")
    # A minimal byte-level BPE vocabulary in CLIP's format: every byte symbol, with and without '</w>'.
    symbols = list(_byte_symbols())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": vocab["<|endoftext|>"],
            "bos_token_id": vocab["<|startoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE tokenizers (GPT-2, CLIP) use for raw bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]
