"""Model adapters: shapes, what trains, save/load, and the real pretrained weights."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distac.errors import CheckpointError, ConfigError, DataError
from distac.models import ModelSpec, build_model, load_model, save_model
from distac.models.inference import predict_logits


def test_text_classifier_shapes_pairs_and_round_trip(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model = build_model(ModelSpec("hf-text", str(tiny_bert_dir), 3, task="toy"))
    raw = [("a first sentence", None), ("premise here", "hypothesis there"), ("x", "")]
    logits = model(model.encode(raw))
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    selector = model.task_vector_selector()
    assert not selector("head.weight") and selector("backbone.encoder.layer.0.attention.self.query.weight")
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert torch.allclose(again(again.encode(raw)), logits, atol=1e-6)


def test_label_check_names_the_source(tiny_bert_dir: Path) -> None:
    model = build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy"))
    with pytest.raises(DataError, match="train.tsv.*\\[0, 4\\].*2 classes"):
        model.check_labels([0, 1, 4], "train.tsv")


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("load_model must take the zero-shot head from the checkpoint, not recompute it")


def test_clip_zero_shot_head_and_trainable_part(
    tiny_clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ModelSpec("clip", str(tiny_clip_dir), 3, task="toy", class_names=["cat", "dog", "car"])
    model = build_model(spec)
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)  # gray, off-size
    logits = model(model.encode(images))
    assert logits.shape == (5, 3)
    assert torch.allclose(model.head.weight.norm(dim=-1), torch.ones(3), atol=1e-5)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.backbone.parameters()}
    assert not any(k.startswith("backbone.text") for k in model.state_dict())  # text tower is not kept
    save_model(model, tmp_path / "clip")
    monkeypatch.setattr("distac.models.clip.build_zeroshot_embeddings", _refuse)
    again = load_model(tmp_path / "clip")
    assert torch.allclose(again(again.encode(images)), logits, atol=1e-5)


def test_clip_needs_class_names(tiny_clip_dir: Path) -> None:
    with pytest.raises(DataError, match="class names"):
        build_model(ModelSpec("clip", str(tiny_clip_dir), 3, task="toy", class_names=["cat"]))


def test_minilm_real_weights_sentence_similarity(minilm_path: str) -> None:
    """The real all-MiniLM-L6-v2 with mean pooling ranks a paraphrase above an unrelated sentence."""
    model = build_model(ModelSpec("hf-text", "all-MiniLM-L6-v2", 2, task="probe"))
    model.eval()
    raw = [
        ("A man is playing a guitar.", None),
        ("Someone is playing an instrument.", None),
        ("The stock market fell sharply today.", None),
        ("A person plays music on a guitar.", None),
    ]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.features(model.encode(raw)), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 3] > sim[0, 1] > sim[0, 2]
    assert sim[0, 3] > 0.6 and sim[0, 2] < 0.3


def test_efficientnet_lite0_imagenet_weights_recognise_daisies(data_root: Path) -> None:
    """Real ImageNet EfficientNet-Lite0: daisy photos (Flowers) put ImageNet class 985 'daisy' in the top 5."""
    from distac._compat import import_timm
    from distac.checkpoints import load_state_dict
    from distac.data import load_task
    from distac.models.vision import (
        LITE0_MEAN,
        LITE0_STD,
        convert_lite0_state_dict,
        efficientnet_lite0_weights_file,
        images_to_tensor,
    )

    timm = import_timm()
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(
        convert_lite0_state_dict(load_state_dict(efficientnet_lite0_weights_file()), full.state_dict())
    )
    flowers = load_task("flowers5", data_root)
    daisies = flowers.test.inputs[flowers.test.labels == 0][:24]
    x = images_to_tensor(
        daisies, 224, torch.tensor(LITE0_MEAN).view(1, 3, 1, 1), torch.tensor(LITE0_STD).view(1, 3, 1, 1)
    )
    with torch.no_grad():
        top5 = full(x).topk(5, dim=1).indices
    hit_rate = float((top5 == 985).any(dim=1).float().mean())
    assert hit_rate >= 0.35, hit_rate  # ~0.5 measured; a random network gives ~0
    # the distac adapter uses the same backbone without the ImageNet classifier
    model = build_model(ModelSpec("timm", "efficientnet-lite0", 5, task="flowers5", options={"image_size": 96}))
    logits = predict_logits(model, daisies[:6], batch_size=3, device="cpu")
    assert logits.shape == (6, 5)
    assert any("running_mean" in k for k in model.state_dict())
    assert not model.task_vector_selector()("backbone.bn1.running_mean")


def test_mixed_precision_request_without_bf16_hardware_is_float32_with_a_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distac.models.inference import bf16_autocast

    monkeypatch.setattr("distac.models.inference.cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="distac.models"):
        assert bf16_autocast(True, torch.device("cpu")) is False
    assert "native bf16" in caplog.text and "float32 on cpu" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="distac.models"):
        assert bf16_autocast(True, torch.device("mps")) is False
    assert "float32 on mps" in caplog.text
    caplog.clear()
    assert bf16_autocast(False, torch.device("cpu")) is False
    assert bf16_autocast(True, torch.device("cuda")) is True
    assert bf16_autocast(False, torch.device("cuda")) is False
    monkeypatch.setattr("distac.models.inference.cpu_has_native_bf16", lambda: True)
    assert bf16_autocast(True, torch.device("cpu")) is True  # AVX-512 BF16 / AMX: autocast pays
    assert bf16_autocast(False, torch.device("cpu")) is False
    assert caplog.text == ""


@pytest.mark.parametrize("family", ["hf-text", "clip"])
def test_a_float16_checkpoint_loads_as_float32(
    family: str, tiny_bert_dir: Path, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    """Half-precision checkpoints (the usual way to ship weights) train and merge in float32:
    transformers 5 would otherwise keep them in float16."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    source = tiny_bert_dir if family == "hf-text" else tiny_clip_dir
    half = tmp_path / "half"
    shutil.copytree(source, half)
    weights = load_file(half / "model.safetensors")
    save_file({k: v.half() for k, v in weights.items()}, half / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((half / "config.json").read_text())
    config["dtype"] = "float16"  # as save_pretrained writes it for a model in half precision
    (half / "config.json").write_text(json.dumps(config))
    names = ["cat", "dog"]
    model = build_model(ModelSpec(family, str(half), 2, task="toy", class_names=names))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference = build_model(ModelSpec(family, str(source), 2, task="toy", class_names=names)).state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("backbone.") and value.is_floating_point():
            assert torch.equal(value, reference[key].half().float()), key  # the file's values, widened


def test_text_zero_shot_head_is_frozen_class_name_embeddings(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLIP-style head for text: scale * cos(features, embedding of the class name), never trained."""
    import torch.nn.functional as F

    from distac.models.base import ZeroShotHead

    names = ["negative", "positive"]
    spec = ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy", class_names=names, options={"head": "zero_shot"})
    model = build_model(spec)
    assert isinstance(model.head, ZeroShotHead) and not list(model.head.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.backbone.parameters()}
    expected = F.normalize(model.features(model.encode(names)), dim=-1)
    assert torch.allclose(model.head.weight, expected, atol=1e-6)
    raw = ["a fine film", "a dull film", ("premise", "hypothesis")]
    logits = model(model.encode(raw))
    cosine = F.normalize(model.features(model.encode(raw)), dim=-1) @ expected.t()
    assert torch.allclose(logits, 100.0 * cosine, atol=1e-4)
    # each class name is classified as itself
    assert model(model.encode(names)).argmax(-1).tolist() == [0, 1]
    save_model(model, tmp_path / "zs")
    with monkeypatch.context() as patched:
        patched.setattr("distac.models.text.TextClassifier._zero_shot_head", _refuse)
        again = load_model(tmp_path / "zs")
    assert isinstance(again.head, ZeroShotHead)
    assert torch.allclose(again(again.encode(raw)), logits, atol=1e-5)
    with pytest.raises(DataError, match="needs 2 class names"):
        build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy", options={"head": "zero_shot"}))
    with pytest.raises(ConfigError, match=r"head: must be one of \['linear', 'zero_shot'\], got 'mlp'"):
        build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy", options={"head": "mlp"}))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['max_len'\]"):
        build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy", options={"max_len": 10}))


def test_predict_logits_with_autocast_without_bf16_hardware_warns_and_matches_float32(
    tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("distac.models.inference.cpu_has_native_bf16", lambda: False)
    model = build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy"))
    raw = ["one text", "another text"]
    with caplog.at_level("WARNING", logger="distac.models"):
        logits = predict_logits(model, raw, device="cpu", autocast=True)
    assert "native bf16" in caplog.text
    assert torch.equal(logits, predict_logits(model, raw, device="cpu"))


def test_predict_logits_under_cpu_bf16_autocast_is_float32_and_close(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the CPU has bf16 kernels the request is honoured: logits differ from float32 by bf16
    rounding only, and come back as float32 like every other prediction."""
    monkeypatch.setattr("distac.models.inference.cpu_has_native_bf16", lambda: True)
    model = build_model(ModelSpec("hf-text", str(tiny_bert_dir), 2, task="toy"))
    raw = ["one text", "another text", "a third, longer text than the others"]
    mixed = predict_logits(model, raw, device="cpu", autocast=True)
    exact = predict_logits(model, raw, device="cpu")
    assert mixed.dtype == torch.float32
    assert not torch.equal(mixed, exact)  # autocast really ran
    assert torch.allclose(mixed, exact, atol=0.05, rtol=0.05)


def _timm_hub_directory(directory: Path, arch: str = "test_resnet") -> dict[str, torch.Tensor]:
    """A local timm model directory as the hub has them: config.json naming the architecture, and
    model.safetensors with the (here: seeded random) "pretrained" weights, classifier included."""
    import json

    from safetensors.torch import save_file

    from distac._compat import import_timm

    torch.manual_seed(1)
    model = import_timm().create_model(arch, num_classes=7)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 7}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, directory / "model.safetensors")
    return state


def test_a_named_timm_backbone_without_weights_is_refused_not_random() -> None:
    """It used to build a randomly initialised backbone, a different one per call, so theta_pre (and every
    task vector) differed between commands."""
    with pytest.raises(CheckpointError, match="no pretrained weights here"):
        build_model(ModelSpec("timm", "test_resnet", 3, task="toy"))
    with pytest.raises(CheckpointError, match="no pretrained weights here"):
        build_model(ModelSpec("timm", "torchvision:resnet18", 3, task="toy"))
    with pytest.raises(ConfigError, match="no_such_net"):
        build_model(ModelSpec("timm", "no_such_net", 3, task="toy", options={"weights": "hub"}))
    with pytest.raises(CheckpointError, match="config.json"):
        build_model(ModelSpec("timm", str(Path(__file__)), 3, task="toy"))  # a file is no timm directory


def test_a_local_timm_directory_is_a_backbone_with_its_weights(tmp_path: Path) -> None:
    state = _timm_hub_directory(tmp_path / "timm_resnet")
    spec = ModelSpec("timm", str(tmp_path / "timm_resnet"), 3, task="toy")
    first, second = build_model(spec), build_model(spec)
    backbone = first.backbone.state_dict()
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)  # the directory's weights, not random ones
    assert all(torch.equal(v, second.backbone.state_dict()[k]) for k, v in backbone.items())
    # the same weights given as a file to the named architecture
    weights = str(tmp_path / "timm_resnet" / "model.safetensors")
    named = build_model(ModelSpec("timm", "test_resnet", 3, task="toy", options={"weights": weights}))
    assert all(torch.equal(v, named.backbone.state_dict()[k]) for k, v in backbone.items())
    # a saved fine-tuned model loads without the backbone directory
    save_model(first, tmp_path / "saved")
    shutil.rmtree(tmp_path / "timm_resnet")
    again = load_model(tmp_path / "saved")
    images = np.random.default_rng(0).integers(0, 255, (2, 40, 40, 3), dtype=np.uint8)
    assert torch.allclose(predict_logits(again, images), predict_logits(first, images), atol=1e-6)


def _bert_copy_with(tiny_bert_dir: Path, target: Path, change) -> Path:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_bert_dir, target)
    state = load_file(str(target / "model.safetensors"))
    change(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_pretrained_backbone_missing_weights_or_with_nan_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """transformers fills missing weights with a fresh random init (a different theta_pre at every rebuild);
    NaN weights train to a model distac refuses to load. Both are errors naming the checkpoint."""
    key = "encoder.layer.1.output.dense.weight"
    missing = _bert_copy_with(tiny_bert_dir, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=rf"{missing}: the pretrained checkpoint lacks 1 weight.*{key}"):
        build_model(ModelSpec("hf-text", str(missing), 2))

    def poison(state: dict) -> None:
        state[key][0, 0] = float("nan")

    nan = _bert_copy_with(tiny_bert_dir, tmp_path / "nan", poison)
    with pytest.raises(CheckpointError, match=r"nan: tensor .*output\.dense\.weight' contains 1 NaN/Inf"):
        build_model(ModelSpec("hf-text", str(nan), 2))


def test_clip_image_tower_alone_is_refused_not_replaced_by_a_random_clip(tiny_clip_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel, CLIPVisionModel

    vision_only = tmp_path / "vision_only"
    full = CLIPModel.from_pretrained(tiny_clip_dir)
    CLIPVisionModel(full.config.vision_config).save_pretrained(vision_only)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        if (tiny_clip_dir / name).is_file():
            shutil.copy(tiny_clip_dir / name, vision_only)
    spec = ModelSpec("clip", str(vision_only), 2, task="t", class_names=["a", "b"])
    with pytest.raises(CheckpointError, match=r"model_type 'clip_vision_model', not a full CLIP checkpoint"):
        build_model(spec)


def test_backbone_weights_drop_the_files_classifier_and_refuse_another_architecture(tmp_path: Path) -> None:
    """A torchvision / timm weights file with its own classifier (any class count) is a backbone; a file of
    another architecture used to load in part (timm) or crash with a raw size-mismatch traceback."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cifar = torchvision.models.resnet18(num_classes=10)
    save_file(cifar.state_dict(), str(tmp_path / "resnet18_cifar10.safetensors"))
    spec = ModelSpec(
        "timm",
        "torchvision:resnet18",
        3,
        task="toy",
        options={"weights": str(tmp_path / "resnet18_cifar10.safetensors")},
    )
    model = build_model(spec)
    assert torch.equal(
        model.backbone.state_dict()["layer4.1.conv2.weight"], cifar.state_dict()["layer4.1.conv2.weight"]
    )

    other = timm.create_model("test_vit", num_classes=5)
    save_file(other.state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"vit\.safetensors: not test_resnet backbone weights: lacks .*another arch"
    ):
        build_model(
            ModelSpec("timm", "test_resnet", 3, task="toy", options={"weights": str(tmp_path / "vit.safetensors")})
        )
    with pytest.raises(CheckpointError, match=r"not torchvision:resnet34 backbone weights: lacks"):
        build_model(dataclasses.replace(spec, backbone="torchvision:resnet34"))
