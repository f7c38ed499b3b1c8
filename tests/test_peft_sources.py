"""LoRA adapters as merge sources (``distac.peft_sources``): the materialised weights equal PEFT's
own ``merge_and_unload``, mismatched bases fail clearly, ``distac merge`` accepts adapter dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distac.checkpoints import load_state_dict, open_checkpoint
from distac.cli import app
from distac.errors import CheckpointError
from distac.merging import apply_merge, get_method
from distac.merging.streaming import streaming_merge
from distac.peft_sources import is_adapter_dir, load_lora_adapter, load_source, open_source
from distac.task_vectors import TaskVector

runner = CliRunner()


def _bert(hidden: int = 32):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
    )
    return BertModel(config)


def _lora(model, out: Path, seed: int, **settings) -> dict[str, torch.Tensor]:
    """Wrap ``model`` with a random (non-zero B) LoRA, save the adapter, return merge_and_unload weights.
    With ``bias="all"`` the biases are 'trained' too (perturbed), so the adapter carries new values."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "init_lora_weights": False, **settings}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    if settings.get("bias") == "all":
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if name.endswith(".bias"):
                    parameter.add_(0.1 * torch.randn_like(parameter))
    peft_model.save_pretrained(out)
    return {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lora_base") / "base"
    _bert().save_pretrained(out, max_shard_size="60KB")
    return out


def _fresh(base_dir: Path):
    from transformers import BertModel

    return BertModel.from_pretrained(base_dir)


def _assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, atol=1e-5, rtol=0, msg=key)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"use_rslora": True, "lora_alpha": 16},
        {
            "target_modules": ["query", "key", "dense", "word_embeddings"],
            "rank_pattern": {"key": 2},
            "alpha_pattern": {"query": 3},
            "bias": "all",
        },
    ],
    ids=["plain", "rslora", "patterns-embedding-bias"],
)
def test_materialized_weights_equal_merge_and_unload(base_dir: Path, tmp_path: Path, settings: dict) -> None:
    expected = _lora(_fresh(base_dir), tmp_path / "adapter", seed=1, **settings)
    base = load_state_dict(base_dir)
    adapter = load_lora_adapter(tmp_path / "adapter")
    materialized = adapter.materialize(base, base_dir)
    _assert_close(materialized, expected)
    changed = {k for k in base if not torch.equal(base[k], materialized[k])}
    assert changed == set(adapter.factors) | set(adapter.replacements) and adapter.factors  # nothing else moves
    if settings.get("bias") == "all":  # trained biases are full replacements (<module>.base_layer.bias -> .bias)
        assert "encoder.layer.0.attention.self.query.bias" in adapter.replacements
        assert "embeddings.LayerNorm.bias" in adapter.replacements
        assert "embeddings.word_embeddings.weight" in adapter.factors  # lora_embedding_A/B

    vector = adapter.task_vector(base, base_dir)
    for key, delta in vector.items():
        if key in changed:
            torch.testing.assert_close(delta, expected[key] - base[key], atol=1e-5, rtol=0)
        else:
            assert not delta.any(), key
    assert load_source(tmp_path / "adapter", base).keys() == materialized.keys()


def test_scale_uses_alpha_over_r_or_sqrt_r(base_dir: Path, tmp_path: Path) -> None:
    _lora(_fresh(base_dir), tmp_path / "plain", seed=2, r=4, lora_alpha=8)
    _lora(_fresh(base_dir), tmp_path / "rs", seed=2, r=4, lora_alpha=8, use_rslora=True)
    plain, rs = load_lora_adapter(tmp_path / "plain"), load_lora_adapter(tmp_path / "rs")
    key = "encoder.layer.0.attention.self.query.weight"
    assert plain.factors[key].scale == 2.0 and rs.factors[key].scale == 4.0
    factors = plain.factors[key]
    torch.testing.assert_close(factors.delta(), (factors.b @ factors.a) * 2.0)


def test_fan_in_fan_out_conv1d_layers(tmp_path: Path) -> None:
    """GPT-2 stores its linear weights transposed (Conv1D): the update is (B @ A)^T."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = _lora(model, tmp_path / "gpt2", seed=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    adapter = load_lora_adapter(tmp_path / "gpt2")
    assert adapter.factors["h.0.attn.c_attn.weight"].fan_in_fan_out
    _assert_close(adapter.materialize(base), expected)


def test_convolution_layers(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3)
            self.pointwise = torch.nn.Conv2d(8, 4, 1)

    torch.manual_seed(0)
    model = Net()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = _lora(model, tmp_path / "conv", seed=4, r=2, lora_alpha=4, target_modules=["stem", "pointwise"])
    _assert_close(load_lora_adapter(tmp_path / "conv").materialize(base), expected)


def test_adapter_on_a_mismatched_base_fails_clearly(base_dir: Path, tmp_path: Path) -> None:
    _lora(_fresh(base_dir), tmp_path / "adapter", seed=5)
    torch.manual_seed(0)
    wider = {k: v.detach() for k, v in _bert(hidden=48).state_dict().items()}
    adapter = load_lora_adapter(tmp_path / "adapter")
    with pytest.raises(CheckpointError) as error:
        adapter.materialize(wider, "wider-bert")
    message = str(error.value)
    assert "adapter_model.safetensors" in message and "wider-bert" in message
    assert "lora_A.weight" in message and "(32, 32)" in message and "(48, 48)" in message

    prefixed = {f"bert.{k}": v for k, v in load_state_dict(base_dir).items()}  # a base with other key names
    with pytest.raises(
        CheckpointError,
        match=r"targets 'encoder\.layer\.\d\.attention\.self\.(query|value)\.weight'"
        r", which the base checkpoint prefixed-bert does not have",
    ):
        adapter.materialize(prefixed, "prefixed-bert")

    # the lazy (streaming) path checks the shapes from the headers before reading anything
    torch.manual_seed(0)
    _bert(hidden=48).save_pretrained(tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"has shape \(32, 32\) but .* has shape \(48, 48\)"):
        open_source(tmp_path / "adapter", open_checkpoint(tmp_path / "wider"))


def test_unsupported_and_unsafe_adapters(base_dir: Path, tmp_path: Path) -> None:
    _lora(_fresh(base_dir), tmp_path / "dora", seed=6, use_dora=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        load_lora_adapter(tmp_path / "dora")

    # adapter_model.bin is read with weights_only=True: tensors load, a pickled object is refused
    _lora(_fresh(base_dir), tmp_path / "bin", seed=7)
    tensors = load_state_dict(tmp_path / "bin" / "adapter_model.safetensors", check_finite=False)
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "bin" / "adapter_model.bin")
    assert set(load_lora_adapter(tmp_path / "bin").factors)
    torch.save({"weights": tensors, "hook": Path("x")}, tmp_path / "bin" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_lora_adapter(tmp_path / "bin")

    assert is_adapter_dir(tmp_path / "dora") and not is_adapter_dir(base_dir)
    with pytest.raises(CheckpointError, match="PEFT adapter, not a full checkpoint"):
        open_checkpoint(tmp_path / "dora")


def test_distac_merge_accepts_adapter_dirs(base_dir: Path, tmp_path: Path) -> None:
    """In memory and streaming: adapters merge like the full fine-tuned models they stand for."""
    adapters = []
    for i in range(2):
        _lora(_fresh(base_dir), tmp_path / f"lora{i}", seed=10 + i, target_modules=["query", "value", "dense"])
        adapters.append(tmp_path / f"lora{i}")
    pre = load_state_dict(base_dir)
    finetuned = [load_lora_adapter(a).materialize(pre) for a in adapters]
    vectors = [TaskVector.from_state_dicts(pre, state).deltas for state in finetuned]
    expected = apply_merge(pre, get_method("ties").merge(vectors, task_names=["lora0", "lora1"]), 0.8)

    args = ["merge", *map(str, adapters), "-m", "ties", "-p", str(base_dir), "-l", "0.8"]
    for flag, out in ((), tmp_path / "memory"), (("--streaming", "--max-shard-size", "60KB"), tmp_path / "stream"):
        result = runner.invoke(app, [*args, *flag, "-o", str(out)])
        assert result.exit_code == 0, result.output
        merged = load_state_dict(out)
        for key, value in expected.items():
            assert torch.equal(merged[key], value), (flag, key)
    record = json.loads((tmp_path / "stream" / "merge.json").read_text())
    assert [s["kind"] for s in record["sources"]] == ["lora", "lora"]

    # a plain checkpoint and an adapter mixed as sources
    record = streaming_merge(
        base_dir, [adapters[0], base_dir], method="average", output=tmp_path / "mixed", task_names=["a", "b"]
    )
    assert [s["kind"] for s in record["sources"]] == ["lora", "safetensors"]
    mixed = load_state_dict(tmp_path / "mixed")
    key = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(mixed[key], (finetuned[0][key] + pre[key]) / 2, atol=1e-6, rtol=0)
