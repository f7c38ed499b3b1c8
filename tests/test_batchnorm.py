"""BatchNorm running statistics after rescaling and merging (distac.models.batchnorm).

The invariant used throughout: scaling every convolution of a conv -> BatchNorm network by kappa
leaves its function unchanged once the statistics are re-estimated on the same inputs (BatchNorm
divides the scale out), while the stale statistics of the unscaled network change it completely.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distac.conditioning.distac import ConditionConfig, condition, scaled_student
from distac.data import load_task
from distac.errors import DataError
from distac.experiments.merge_eval import EvalSettings, TaskModelBank
from distac.models import ModelSpec, build_model
from distac.models.base import ClassifierModel
from distac.models.batchnorm import (
    batchnorm_buffers,
    estimation_inputs,
    has_batchnorm,
    recompute_batchnorm_statistics,
    resolve_batchnorm_choice,
)
from distac.models.inference import predict_logits


class _DropoutThenBatchNorm(nn.Module):
    """Dropout in front of a BatchNorm layer: an estimate with dropout on would see other inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(3)

    def encode(self, raw: np.ndarray) -> dict[str, torch.Tensor]:
        return {"x": torch.as_tensor(np.asarray(raw), dtype=torch.float32)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.bn(self.drop(inputs["x"]))


def test_statistics_are_the_exact_average_with_dropout_off() -> None:
    model = _DropoutThenBatchNorm()
    model.bn.momentum = 0.3
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(64, 3)).astype(np.float32)
    assert recompute_batchnorm_statistics(model, x, batch_size=64, device="cpu") == 1
    t = torch.as_tensor(x)
    torch.testing.assert_close(model.bn.running_mean, t.mean(0))
    # dropout on (torch's update_bn puts the whole model in train mode) would inflate this ~2x
    torch.testing.assert_close(model.bn.running_var, t.var(0, unbiased=True))
    assert model.bn.momentum == 0.3 and not model.training and not model.bn.training
    # two batches: each counts equally (momentum None), whatever their order
    recompute_batchnorm_statistics(model, x, batch_size=32, device="cpu")
    torch.testing.assert_close(model.bn.running_mean, t.mean(0))
    with pytest.raises(DataError, match="no unlabeled inputs"):
        recompute_batchnorm_statistics(model, x[:0], device="cpu")


def test_models_without_batchnorm_are_left_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not has_batchnorm(model)
    assert recompute_batchnorm_statistics(model, np.zeros((4, 3)), device="cpu") == 0  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not resolve_batchnorm_choice("recompute", model)
    bn = _DropoutThenBatchNorm()
    assert resolve_batchnorm_choice("auto", bn) and not resolve_batchnorm_choice("auto", bn, weights_changed=False)
    assert resolve_batchnorm_choice("recompute", bn, weights_changed=False)
    assert not resolve_batchnorm_choice("keep", bn)
    with pytest.raises(ValueError, match="batchnorm_statistics"):
        resolve_batchnorm_choice("sometimes", bn)


def test_estimation_inputs_are_a_seeded_spread_subset() -> None:
    labels = np.repeat(np.arange(4), 50)  # a split file sorted by class
    picked = estimation_inputs(labels, 40, seed=0)
    assert len(picked) == 40 and len(set(picked.tolist())) == 4  # the first 40 rows would be class 0 only
    assert np.array_equal(picked, estimation_inputs(labels, 40, seed=0))
    as_list = estimation_inputs(list(labels), 40, seed=0)
    assert isinstance(as_list, list) and as_list == picked.tolist()
    assert estimation_inputs(labels, 500) is labels


@pytest.fixture(scope="module")
def mnist(data_root: Path):  # noqa: ANN201
    return load_task("mnist", data_root).limit(train=64, validation=48, test=64, seed=0)


class _TinyCNN(ClassifierModel):
    """conv -> BatchNorm -> ReLU twice, random weights (a unit-test model, not a result)."""

    family = "test-cnn"

    def __init__(self, num_labels: int = 10) -> None:
        super().__init__(ModelSpec("test-cnn", "tiny", num_labels))
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 8, 3, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, num_labels)
        nn.init.normal_(self.head.weight, std=3.0)  # confident logits, so a changed function shows in entropy

    def encode(self, raw: np.ndarray) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.as_tensor(np.asarray(raw), dtype=torch.float32).unsqueeze(1) / 255.0}

    def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(inputs["pixel_values"])


def _conv_free_pretrained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A 'pretrained' state equal to the model except zero convolutions: theta_pre + kappa * tau
    then scales exactly the convolutions by kappa and keeps everything else."""
    selector = model.task_vector_selector()
    return {
        k: (torch.zeros_like(v) if v.dim() == 4 else v.clone()) for k, v in model.state_dict().items() if selector(k, v)
    }


def _teacher(mnist) -> _TinyCNN:  # noqa: ANN001
    """The tiny CNN with statistics estimated on the 64 unlabeled inputs, as conditioning will."""
    model = _TinyCNN()
    recompute_batchnorm_statistics(model, mnist.train.inputs, batch_size=64, device="cpu")
    return model


def test_rescaled_cnn_needs_fresh_statistics(mnist) -> None:  # noqa: ANN001
    teacher = _teacher(mnist)
    reference = predict_logits(teacher, mnist.test.inputs, device="cpu")
    student = scaled_student(teacher, _conv_free_pretrained(teacher), 0.25)
    stale = predict_logits(student, mnist.test.inputs, device="cpu")
    assert float((stale - reference).abs().max()) > 1.0  # the teacher's statistics no longer fit
    recompute_batchnorm_statistics(student, mnist.train.inputs, batch_size=64, device="cpu")
    torch.testing.assert_close(predict_logits(student, mnist.test.inputs, device="cpu"), reference, atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    ("choice", "kappa", "recomputed"), [("auto", 0.25, True), ("keep", 0.25, False), ("auto", 1.0, False)]
)
def test_conditioning_reestimates_statistics_after_rescaling(
    mnist, choice: str, kappa: float, recomputed: bool
) -> None:  # noqa: ANN001
    teacher = _teacher(mnist)
    teacher_statistics = batchnorm_buffers(teacher)
    reference = predict_logits(teacher, mnist.test.inputs, device="cpu")
    config = ConditionConfig(
        kappa=kappa, steps=1, lr=1e-12, batch_size=64, batchnorm_statistics=choice, device="cpu", eval_examples=16,
        student_batchnorm="frozen",  # statistics stay as the rescaling left them
    )  # fmt: skip
    result = condition(teacher, _conv_free_pretrained(teacher), mnist, config, progress=False)
    student_statistics = batchnorm_buffers(result.student)
    same = all(torch.equal(v, student_statistics[k]) for k, v in teacher_statistics.items())
    ours = predict_logits(result.student, mnist.test.inputs, device="cpu")
    assert result.config["batchnorm_recomputed_layers"] == (2 if recomputed else 0)
    assert same is not recomputed
    if recomputed or kappa == 1.0:  # the distillation starts from the teacher's function
        torch.testing.assert_close(ours, reference, atol=2e-2, rtol=0)
    else:  # kept statistics: a different function, the bug this option fixes
        assert float((ours - reference).abs().max()) > 1.0


@pytest.mark.parametrize("mode", ["frozen", "batch"])
def test_student_batchnorm_batch_distills_under_batch_statistics_then_reestimates(mnist, mode: str) -> None:  # noqa: ANN001
    """ "batch": the student's BatchNorm layers normalise with batch statistics in its training
    steps (frozen: never), and the saved student carries statistics re-estimated for its weights."""
    teacher = _teacher(mnist)
    seen: list[bool] = []
    teacher.backbone[1].register_forward_pre_hook(lambda module, args: seen.append(module.training))
    config = ConditionConfig(
        kappa=1.0, steps=3, lr=1e-2, batch_size=32, student_temperature=2.0, device="cpu", eval_examples=16,
        log_every=100, student_batchnorm=mode,
    )  # fmt: skip
    seen.clear()  # the hook is copied into the student: count its training forwards only
    result = condition(teacher, _conv_free_pretrained(teacher), mnist, config, progress=False)
    # batch: 3 training steps, then 2 estimation batches (64 inputs in batches of 32) at the end
    assert seen.count(True) == (3 + 2 if mode == "batch" else 0)
    assert result.config["batchnorm_reestimated_after_layers"] == (2 if mode == "batch" else 0)
    assert not any(m.training for m in result.student.modules())
    statistics = batchnorm_buffers(result.student)
    reestimated = copy.deepcopy(result.student)
    recompute_batchnorm_statistics(
        reestimated, estimation_inputs(mnist.train.inputs, 256, 0), batch_size=32, device="cpu"
    )
    fits = all(torch.allclose(v, batchnorm_buffers(reestimated)[k]) for k, v in statistics.items())
    assert fits is (mode == "batch")
    with pytest.raises(Exception, match="condition.student_batchnorm must be one of"):
        ConditionConfig(student_batchnorm="train")


def test_merge_evaluation_reestimates_per_merged_backbone_and_restores_the_source(mnist) -> None:  # noqa: ANN001
    model = _teacher(mnist)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    pretrained = _conv_free_pretrained(model)
    state = model.state_dict()
    scaled = {k: 0.25 * state[k] if state[k].dim() == 4 else state[k].clone() for k in pretrained}
    scores = {}
    for choice in ("auto", "keep"):
        settings = EvalSettings(device="cpu", batch_size=64, batchnorm_statistics=choice, batchnorm_examples=64)
        bank = TaskModelBank({"mnist": model}, {"mnist": mnist}, settings)
        assert bank.batchnorm_mode() == ("recompute" if choice == "auto" else "keep")
        scores[choice] = bank.score("mnist", scaled, "test")
        # the source's own weights and statistics are back for the next caller
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in own.items())
    individual = TaskModelBank({"mnist": model}, {"mnist": mnist}, EvalSettings(device="cpu")).score(
        "mnist", None, "test"
    )
    # fresh statistics: the scaled backbone computes the source's function (same loss, same entropy)
    assert scores["auto"].nll == pytest.approx(individual.nll, abs=1e-3)
    assert scores["auto"].entropy == pytest.approx(individual.entropy, abs=1e-3)
    assert abs(scores["keep"].nll - individual.nll) > 0.3  # measured 0.87


def test_timm_batchnorm_act_layers_are_found(mnist) -> None:  # noqa: ANN001
    """timm's EfficientNet uses BatchNormAct2d (BatchNorm + activation in one module): a subclass of
    BatchNorm2d, so every one of its 49 layers is re-estimated."""
    spec = ModelSpec("timm", "efficientnet-lite0", 10, task="mnist", options={"image_size": 32})
    model = build_model(spec, pretrained=True)
    assert recompute_batchnorm_statistics(model, mnist.train.inputs[:16], batch_size=16, device="cpu") == 49
    assert not model.training


def test_merge_cli_writes_cnns_with_statistics_of_the_merged_weights(tmp_path: Path, data_root: Path) -> None:
    """``distac merge`` on distac model dirs of a CNN: each merged model gets BatchNorm statistics
    estimated for the merged weights on its own task's unlabeled inputs (``--batchnorm-statistics
    keep``: the source's, as before)."""
    from typer.testing import CliRunner

    from distac.cli import app
    from distac.models import load_model, save_model

    sources = []
    for i, task in enumerate(("mnist", "pneumoniamnist")):
        classes = load_task(task, data_root).num_classes
        model = build_model(ModelSpec("timm", "efficientnet-lite0", classes, task=task, options={"image_size": 32}))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # a stand-in task vector on every convolution
            for name, p in model.named_parameters():
                if name.startswith("backbone.") and p.dim() == 4:
                    p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
        sources.append(save_model(model, tmp_path / task))
    outputs = {}
    for choice in ("auto", "keep"):
        out = tmp_path / f"merged-{choice}"
        args = ["merge", *map(str, sources), "-m", "task_arithmetic", "-l", "0.5", "-o", str(out)]
        result = CliRunner().invoke(app, [*args, "--data-root", str(data_root), "--batchnorm-statistics", choice])
        assert result.exit_code == 0, result.output
        outputs[choice] = load_model(out / "mnist")
        assert json.loads((out / "merge.json").read_text())["batchnorm_statistics"] == (
            "recompute" if choice == "auto" else "keep"
        )
    source = batchnorm_buffers(load_model(sources[0]))
    kept, fresh = batchnorm_buffers(outputs["keep"]), batchnorm_buffers(outputs["auto"])
    assert all(torch.equal(v, kept[k]) for k, v in source.items())
    # re-estimating the kept model by hand, on the same inputs, gives exactly what the CLI wrote
    expected = outputs["keep"]
    mnist_task = load_task("mnist", data_root)
    recompute_batchnorm_statistics(expected, estimation_inputs(mnist_task.unlabeled(), 256), device="cpu")
    for k, v in batchnorm_buffers(expected).items():
        torch.testing.assert_close(fresh[k], v)
    assert not all(torch.equal(v, fresh[k]) for k, v in source.items())
    bad = CliRunner().invoke(app, [*args, "--batchnorm-statistics", "sometimes"])
    assert bad.exit_code != 0 and "--batchnorm-statistics" in bad.output


def test_pipeline_redoes_conditioned_cnns_cached_before_the_option(tmp_path: Path, data_root: Path) -> None:
    """Conditioned models cached by a run before ``batchnorm_statistics`` kept the teacher's
    statistics: a run now redoes those of a BatchNorm model with kappa != 1 and keeps every other
    cached one. Those cached before ``student_batchnorm`` (or under its old default) were distilled
    under frozen statistics: redone when batch statistics are asked for (the default now)."""
    from dataclasses import replace

    from distac.experiments.config import ExperimentConfig
    from distac.experiments.pipeline import ExperimentRunner

    config = ExperimentConfig(
        name="cnn", family="timm", backbone="efficientnet-lite0", tasks=["mnist"], model_options={"image_size": 32}
    )
    runner = ExperimentRunner(config, tmp_path, data_root=data_root, echo=lambda _: None)
    out = tmp_path / "conditioned"
    out.mkdir()
    old_record = {"kappa": 0.1, "config": {"kappa": 0.1}}
    (out / "condition.json").write_text(json.dumps(old_record))
    shrink = ConditionConfig(kappa=0.1, student_batchnorm="frozen")
    keep_scale = ConditionConfig(kappa=1.0, student_batchnorm="frozen")
    assert not runner._conditioned_batchnorm_current(out, shrink)
    assert runner._conditioned_batchnorm_current(out, keep_scale)  # kappa 1: nothing to re-estimate
    assert runner._conditioned_batchnorm_current(out, replace(shrink, batchnorm_statistics="keep"))
    assert not runner._conditioned_batchnorm_current(out, replace(keep_scale, batchnorm_statistics="recompute"))
    (out / "condition.json").write_text(json.dumps({**old_record, "batchnorm_recomputed_layers": 49}))
    assert runner._conditioned_batchnorm_current(out, shrink)
    # distilled under frozen statistics (no record of the option): redone for the default, batch
    assert ConditionConfig().student_batchnorm == "batch"
    assert not runner._conditioned_batchnorm_current(out, replace(keep_scale, student_batchnorm="batch"))
    batch_record = {**old_record, "batchnorm_recomputed_layers": 49, "config": {"student_batchnorm": "batch"}}
    (out / "condition.json").write_text(json.dumps(batch_record))
    assert runner._conditioned_batchnorm_current(out, replace(shrink, student_batchnorm="batch"))
    assert not runner._conditioned_batchnorm_current(out, shrink)
    # a text model has no BatchNorm: its old records stay valid
    text_config = replace(config, family="hf-text", backbone="x", model_options={})
    text = ExperimentRunner(text_config, tmp_path, echo=lambda _: None)
    text._pretrained, text._has_batchnorm = {}, False
    (out / "condition.json").write_text(json.dumps(old_record))
    assert text._conditioned_batchnorm_current(out, shrink)
    assert text._conditioned_batchnorm_current(out, replace(shrink, student_batchnorm="batch"))
