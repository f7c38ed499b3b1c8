"""Linear probing and frozen-head fine-tuning (``finetune.head``: probe / frozen_probe).

The probe is L2-regularised logistic regression on standardised features, folded back into the
linear head; under ``frozen_probe`` only the backbone trains and every recipe of a task ends with
the same head, as every CLIP source of a task shares its zero-shot head.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distac.data import load_task
from distac.data.tasks import Split
from distac.errors import ConfigError
from distac.models import ModelSpec, build_model
from distac.models.inference import predict_features
from distac.training.finetune import FinetuneConfig, finetune
from distac.training.probe import PROBE_L2_GRID, _fit, fit_linear_probe

MAX_LENGTH = 16


@pytest.fixture(scope="module")
def sst2(data_root: Path):
    return load_task("sst2", data_root).limit(train=64, validation=32, test=32, seed=0)


def _model(tiny_bert_dir: Path, task, **options):
    spec = ModelSpec(
        "hf-text", str(tiny_bert_dir), task.num_classes, task=task.name, class_names=task.class_names,
        options={"max_length": MAX_LENGTH, **options},
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(spec)


def test_probe_is_logistic_regression_on_standardised_features_folded_into_the_head(tiny_bert_dir: Path, sst2) -> None:
    model = _model(tiny_bert_dir, sst2)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    result = fit_linear_probe(model, sst2.train, None, iterations=50, l2=0.1, device="cpu")
    # the backbone is untouched; the head is the standardised fit, folded: W_z (x - mean) / std + b_z
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())
    features = predict_features(model, sst2.train.inputs, device="cpu")
    mean, std = features.mean(0), features.std(0)
    labels = torch.as_tensor(sst2.train.labels)
    weight, bias = _fit((features - mean) / std, labels, 2, 0.1, 50)
    expected = ((features - mean) / std) @ weight.T + bias
    actual = model.head(features)
    assert torch.allclose(actual, expected, atol=1e-4)
    assert result.l2 == 0.1 and result.validation_accuracy is None and result.validation_loss_by_l2 == {}
    assert result.train_accuracy == pytest.approx(float((actual.argmax(-1) == labels).float().mean()))
    # the optimum: the regularised loss's gradient vanishes there
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(((features - mean) / std) @ w.T + b, labels) + 0.05 * w.pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3


def test_probe_picks_the_l2_with_the_lowest_validation_loss(tiny_bert_dir: Path, sst2) -> None:
    model = _model(tiny_bert_dir, sst2)
    result = fit_linear_probe(model, sst2.train, sst2.validation, iterations=50, l2=None, device="cpu")
    assert set(result.validation_loss_by_l2) == {repr(c) for c in PROBE_L2_GRID}
    assert result.l2 == min(PROBE_L2_GRID, key=lambda c: result.validation_loss_by_l2[repr(c)])
    logits = model(model.encode(sst2.validation.inputs))
    loss = float(nn.functional.cross_entropy(logits.detach(), torch.as_tensor(sst2.validation.labels)))
    assert loss == pytest.approx(result.validation_loss_by_l2[repr(result.l2)], abs=1e-4)
    assert result.validation_accuracy == pytest.approx(
        float((logits.argmax(-1) == torch.as_tensor(sst2.validation.labels)).float().mean())
    )


def test_probe_is_invariant_to_the_scale_of_the_features(tiny_bert_dir: Path, sst2) -> None:
    """Standardisation: a backbone whose features are 10x larger gets the same predictions."""
    model = _model(tiny_bert_dir, sst2)
    fit_linear_probe(model, sst2.train, None, iterations=50, l2=0.1, device="cpu")
    scaled = _model(tiny_bert_dir, sst2)
    original_features = scaled.features
    scaled.features = lambda inputs: 10.0 * original_features(inputs)  # type: ignore[method-assign]
    fit_linear_probe(scaled, sst2.train, None, iterations=50, l2=0.1, device="cpu")
    inputs = model.encode(sst2.test.inputs)
    with torch.no_grad():
        assert torch.allclose(model(inputs), scaled(inputs), atol=1e-3)
        assert torch.allclose(scaled.head.weight * 10.0, model.head.weight, rtol=1e-3, atol=1e-3)


def test_frozen_probe_trains_the_backbone_only_and_every_recipe_shares_the_head(tiny_bert_dir: Path, sst2) -> None:
    heads, backbones = [], []
    start = _model(tiny_bert_dir, sst2).backbone.state_dict()
    for lr, loss in ((1e-3, "ce"), (1e-2, "label_smoothing")):  # a normal and a long, low-confidence recipe
        model = _model(tiny_bert_dir, sst2)
        config = FinetuneConfig(steps=4, lr=lr, batch_size=16, head="frozen_probe", loss={"kind": loss}, device="cpu")
        result = finetune(model, sst2, config, progress=False)
        assert result.probe is not None and result.to_json()["probe"]["l2"] in PROBE_L2_GRID
        probed = _model(tiny_bert_dir, sst2)
        fit_linear_probe(probed, sst2.train, sst2.validation, iterations=100, l2=None, device="cpu")
        assert torch.equal(model.head.weight, probed.head.weight) and torch.equal(model.head.bias, probed.head.bias)
        assert all(p.requires_grad for p in model.parameters())  # the model leaves as it came
        heads.append(model.head.state_dict())
        backbones.append(model.backbone.state_dict())
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    for backbone in backbones:
        assert max((backbone[k] - start[k]).abs().max() for k in start if start[k].is_floating_point()) > 1e-4


def test_probe_head_starts_at_the_probe_and_then_trains(tiny_bert_dir: Path, sst2) -> None:
    model = _model(tiny_bert_dir, sst2)
    finetune(model, sst2, FinetuneConfig(steps=4, lr=1e-2, batch_size=16, head="probe", device="cpu"), progress=False)
    probed = _model(tiny_bert_dir, sst2)
    fit_linear_probe(probed, sst2.train, sst2.validation, iterations=100, l2=None, device="cpu")
    assert (model.head.weight - probed.head.weight).abs().max() > 1e-5


def test_zero_shot_heads_and_bad_options_are_refused(tiny_bert_dir: Path, sst2) -> None:
    model = _model(tiny_bert_dir, sst2, head="zero_shot")
    with pytest.raises(ConfigError, match=r"sst2.*ZeroShotHead has no linear head to probe.*finetune.head=train"):
        finetune(model, sst2, FinetuneConfig(steps=1, head="frozen_probe", device="cpu"), progress=False)
    with pytest.raises(ConfigError, match=r"finetune.head must be one of \['train', 'probe', 'frozen_probe'\]"):
        FinetuneConfig(head="frozen")
    with pytest.raises(ConfigError, match="finetune.probe_iterations"):
        FinetuneConfig(probe_iterations=0)
    with pytest.raises(ConfigError, match="finetune.probe_l2"):
        FinetuneConfig(probe_l2=-1.0)
    empty = Split(sst2.train.inputs[:0], sst2.train.labels[:0])
    with pytest.raises(Exception, match="no training examples"):
        fit_linear_probe(_model(tiny_bert_dir, sst2), empty, None, iterations=5, l2=0.1, device="cpu", source="x")


def test_cli_finetune_head_option(tiny_bert_dir: Path, data_root: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from distac.cli import app
    from distac.models import load_model

    args = ["finetune", "--task", "sst2", "--backbone", str(tiny_bert_dir), "--data-root", str(data_root),
            "--steps", "2", "--batch-size", "8", "--train-examples", "32", "--max-length", str(MAX_LENGTH),
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--head", "frozen_probe", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m" / "finetune.json").read_text())
    assert record["config"]["head"] == "frozen_probe" and record["result"]["probe"]["l2"] in PROBE_L2_GRID
    model = load_model(tmp_path / "m")
    task = load_task("sst2", data_root).limit(train=32, seed=0)
    probed = _model(tiny_bert_dir, task)
    fit_linear_probe(probed, task.train, task.validation, iterations=100, l2=None, device="cpu")
    assert torch.allclose(model.head.weight, probed.head.weight, atol=1e-6)
    result = CliRunner().invoke(app, [*args, "--head", "frozen", "-o", str(tmp_path / "bad")])
    assert result.exit_code != 0 and "finetune.head must be one of" in str(result.exception or result.output)
    assert not (tmp_path / "bad").exists()


class _BatchNormClassifier(nn.Module):
    """features = BatchNorm(linear(x)); a linear head: the smallest model with statistics to re-estimate."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        self.head = nn.Linear(6, 2)

    def encode(self, raw):  # noqa: ANN001, ANN201
        return {"x": torch.as_tensor(raw, dtype=torch.float32)}

    def features(self, inputs):  # noqa: ANN001, ANN201
        return self.backbone(inputs["x"])

    def forward(self, inputs):  # noqa: ANN001, ANN201
        return self.head(self.features(inputs))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def test_probe_fits_features_under_the_tasks_batchnorm_statistics() -> None:
    """Training-mode BatchNorm and distac's merged evaluations both use the task's statistics, so the
    head is fitted under them, not under the pretrained ones (which this task's inputs are far from)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(128, 4)).astype(np.float32)  # one estimation batch: the exact mean
    labels = (x[:, 0] + x[:, 1] > 10.0).astype(np.int64)
    train = Split(x, labels)
    model = _BatchNormClassifier()
    result = fit_linear_probe(model, train, None, iterations=100, l2=1e-3, device="cpu")
    assert result.batchnorm_layers == 1
    hidden = model.backbone[0](torch.as_tensor(x)).detach()
    torch.testing.assert_close(model.backbone[1].running_mean, hidden.mean(0))
    torch.testing.assert_close(model.backbone[1].running_var, hidden.var(0, unbiased=True))
    with torch.no_grad():
        logits = model.eval()(model.encode(x))
    accuracy = float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())
    assert accuracy == pytest.approx(result.train_accuracy) and accuracy > 0.95
