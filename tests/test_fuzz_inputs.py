"""Fuzzing the loaders: every corrupt or adversarial input either loads correctly or raises a
:class:`~distac.errors.DistacError` (or a documented subclass) that names the file or option at
fault. Never another exception type, never a crash, never code executed from a pickle.

Also: a merge that fails leaves its inputs byte-identical and writes no (partial) output.
All properties are bounded (max_examples <= 100, tiny files) so the whole file stays well under a minute.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes
from typer.testing import CliRunner

from distac.checkpoints import SAFETENSORS_INDEX, load_state_dict, open_checkpoint, save_state_dict
from distac.errors import CheckpointError, ConfigError, DataError, DistacError

#: DISTAC_FUZZ_SCALE=20 runs 20x more examples per property (a longer local fuzzing session).
SCALE = max(1, int(os.environ.get("DISTAC_FUZZ_SCALE", "1")))
FUZZ = settings(
    max_examples=60 * SCALE,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
MORE = settings(FUZZ, max_examples=100 * SCALE)
FEWER = settings(FUZZ, max_examples=40 * SCALE)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.layer.0.weight": torch.randn(4, 3, generator=g),
        "encoder.layer.0.bias": torch.randn(4, generator=g),
        "encoder.layer.1.weight": torch.randn(3, 4, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(7),
    }


VALID_SAFETENSORS = safetensors_bytes(_state())
_buffer = io.BytesIO()
torch.save(_state(), _buffer)
VALID_TORCH = _buffer.getvalue()


def _expect_loads_or_distac_error(call: Callable[[], Any], names: tuple[str, ...], *, kind: type = DistacError) -> Any:
    """Run ``call``: success is fine, a ``kind`` error must name one of ``names``; anything else fails."""
    try:
        return call()
    except kind as exc:
        message = str(exc)
        assert any(n in message for n in names), f"error does not name {names}: {message}"
        assert "\n" not in message.strip() or "Traceback" not in message
        return None


def _check_state(result: Any) -> None:
    if result is not None:
        assert isinstance(result, dict) and result
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in result.items())


# ---------------------------------------------------------------------------------------- byte mutations
mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),  # byte flips
    st.one_of(st.none(), st.integers(0, 10**6)),  # truncate to this many bytes
    st.binary(max_size=32),  # appended garbage
)


def _mutate(data: bytes, mutation: tuple[list[tuple[int, int]], int | None, bytes]) -> bytes:
    flips, cut, tail = mutation
    out = bytearray(data)
    for position, value in flips:
        out[position % len(out)] = value
    if cut is not None:
        out = out[: cut % (len(out) + 1)]
    return bytes(out) + tail


@MORE
@given(mutation=mutations)
def test_mutated_safetensors_load_or_raise_naming_the_file(mutation: tuple) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "fuzzed.safetensors"
        file.write_bytes(_mutate(VALID_SAFETENSORS, mutation))
        _check_state(_expect_loads_or_distac_error(lambda: load_state_dict(file), ("fuzzed.safetensors",)))
        # the lazy path validates the same way before any tensor is read
        _expect_loads_or_distac_error(lambda: open_checkpoint(file).shapes(), ("fuzzed.safetensors",))


@FUZZ
@given(mutation=mutations)
def test_mutated_torch_files_load_or_raise_naming_the_file(mutation: tuple) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        file = model_dir / "pytorch_model.bin"
        file.write_bytes(_mutate(VALID_TORCH, mutation))
        _check_state(_expect_loads_or_distac_error(lambda: load_state_dict(model_dir), ("pytorch_model.bin",)))


def test_truncations_of_both_formats_at_every_boundary(tmp_path: Path) -> None:
    for name, data in (("t.safetensors", VALID_SAFETENSORS), ("t.pt", VALID_TORCH)):
        for cut in sorted({0, 1, 7, 8, 9, 16, len(data) // 2, len(data) - 8, len(data) - 1}):
            file = tmp_path / name
            file.write_bytes(data[:cut])
            with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
                load_state_dict(file)


# ---------------------------------------------------------------------------------------- safetensors headers
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "ZZZ", "f32", "", "F4"]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
sizes = st.one_of(st.integers(0, 64), st.integers(-3, -1), st.integers(2**31, 2**64))
tensor_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(DTYPES), json_values),
        "shape": st.one_of(st.lists(sizes, max_size=3), json_values),
        "data_offsets": st.one_of(st.lists(sizes, min_size=2, max_size=2), st.lists(sizes, max_size=3), json_values),
    },
)
headers = st.dictionaries(
    st.one_of(st.sampled_from(["w", "b", "__metadata__"]), st.text(max_size=6)),
    st.one_of(tensor_entries, json_values),
    max_size=4,
)


@MORE
@given(
    header=st.one_of(headers, json_values),
    data=st.binary(max_size=96),
    declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_random_safetensors_headers_are_refused_or_load(header: Any, data: bytes, declared: int | None) -> None:
    raw = json.dumps(header).encode()
    length = len(raw) if declared is None else declared
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "header.safetensors"
        file.write_bytes(struct.pack("<Q", length) + raw + data)
        _check_state(_expect_loads_or_distac_error(lambda: load_state_dict(file), ("header.safetensors",)))


@pytest.mark.parametrize(
    "header_len, entry",
    [
        (2**64 - 1, None),  # declared header longer than the file
        (2**62, None),
        (0, None),
        (None, {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**12]}),  # offsets beyond the data
        (None, {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}),  # start after end
        (None, {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}),  # negative
        (None, {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}),  # strings
        (None, {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}),  # shape does not fit the bytes
        (None, {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}),  # overflowing shape
        (None, {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}),  # bogus dtype
        (None, {"dtype": 5, "shape": [2], "data_offsets": [0, 8]}),
        (None, {"shape": [2], "data_offsets": [0, 8]}),  # no dtype
    ],
)
def test_specific_header_attacks_are_refused(tmp_path: Path, header_len: int | None, entry: dict | None) -> None:
    raw = json.dumps({"w": entry or {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    file = tmp_path / "attack.safetensors"
    file.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + bytes(8))
    with pytest.raises(CheckpointError, match=r"attack\.safetensors"):
        open_checkpoint(file)


# ---------------------------------------------------------------------------------------- pickles
class _Opaque:
    """A harmless custom class: the weights-only unpickler must refuse it all the same."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


class _Evil:
    marker: Path = Path(tempfile.gettempdir()) / "distac_fuzz_pwned_marker"

    def __reduce__(self):  # noqa: ANN204 - the classic payload: runs Path.touch on unpickling
        return (Path.touch, (self.marker,))


def _leaf_objects() -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**40), 2**40),
        st.floats(),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.builds(lambda n: torch.randn(n), st.integers(0, 3)),
        st.builds(lambda n: torch.ones(n).to_sparse(), st.integers(1, 3)),
        st.builds(lambda n: np.zeros(n), st.integers(0, 2)),
        st.builds(_Opaque, st.integers(0, 3)),
        st.just(_Evil()),
        st.builds(lambda: torch.nn.Linear(2, 2)),
        st.just(len),
    )


nested_objects = st.recursive(
    _leaf_objects(),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(0, 5)), inner, max_size=3),
        st.fixed_dictionaries({"state_dict": st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3)}),
    ),
    max_leaves=8,
)


@FUZZ
@given(obj=nested_objects, plain_pickle=st.booleans(), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_nested_pickles_are_refused_or_load_and_never_execute(obj: Any, plain_pickle: bool, protocol: int) -> None:
    _Evil.marker.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "nested.pt"
        try:
            if plain_pickle:
                file.write_bytes(pickle.dumps(obj, protocol=protocol))
            else:
                torch.save(obj, file, pickle_protocol=max(protocol, 2))
        except Exception:  # noqa: BLE001 - some generated objects cannot be pickled at all; nothing to load then
            return
        _check_state(_expect_loads_or_distac_error(lambda: load_state_dict(file), ("nested.pt",)))
    assert not _Evil.marker.exists(), "unpickling executed code"


def test_malicious_pickle_in_a_sharded_torch_checkpoint_is_never_executed(tmp_path: Path) -> None:
    _Evil.marker.unlink(missing_ok=True)
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    with open(tmp_path / "pytorch_model-00002-of-00002.bin", "wb") as handle:
        pickle.dump({"b": _Evil()}, handle)
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="00002-of-00002.bin.*refused to unpickle"):
        load_state_dict(tmp_path)
    assert not _Evil.marker.exists()


# ---------------------------------------------------------------------------------------- shard indexes
TRAVERSALS = [
    "../../etc/passwd",
    "../outside.safetensors",
    "/etc/passwd",
    "sub/../../outside.safetensors",
    "..",
    "C:\\Windows\\system.ini",
    "..\\outside.safetensors",
    "\\\\server\\share\\x.safetensors",
    "ok.safetensors\x00.txt",
]
shard_names = st.one_of(
    st.sampled_from([*TRAVERSALS, "ok.safetensors", "missing.safetensors", "", ".", "sub"]),
    st.text(max_size=12),
    json_values,
)


def _is_traversal(name: object) -> bool:
    if not isinstance(name, str):
        return False
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


@MORE
@given(
    weight_map=st.dictionaries(st.sampled_from(["w", "b", "x"]), shard_names, max_size=3),
    wrapper=st.sampled_from(["index", "bare", "list"]),
)
def test_shard_indexes_refuse_paths_outside_the_checkpoint(weight_map: dict, wrapper: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "outside.safetensors").write_bytes(VALID_SAFETENSORS)  # a readable target one level up
        model = root / "model"
        (model / "sub").mkdir(parents=True)
        (model / "ok.safetensors").write_bytes(safetensors_bytes({"w": torch.ones(2), "b": torch.zeros(3)}))
        payload: Any = {"metadata": {}, "weight_map": weight_map}
        if wrapper == "bare":
            payload = weight_map
        elif wrapper == "list":
            payload = list(weight_map.items())
        (model / SAFETENSORS_INDEX).write_text(json.dumps(payload))
        result = _expect_loads_or_distac_error(lambda: load_state_dict(model), (SAFETENSORS_INDEX, "ok.safetensors"))
        _check_state(result)
        if result is not None:  # only files inside the directory can have been read
            assert wrapper == "index" and set(weight_map.values()) == {"ok.safetensors"}
        if wrapper == "index" and any(_is_traversal(v) for v in weight_map.values()):
            assert result is None


def test_index_pointing_at_a_missing_shard_names_it(tmp_path: Path) -> None:
    save_state_dict(_state(), tmp_path / "m", max_shard_bytes=40)
    index = json.loads((tmp_path / "m" / SAFETENSORS_INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard}"):
        open_checkpoint(tmp_path / "m")


# ---------------------------------------------------------------------------------------- configs
yaml_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from(["sst2", "trec", "ties", "base", "cpu", "auto", "cuda:7", "1e-5", "original"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
EXPERIMENT_KEYS = [
    "name",
    "family",
    "backbone",
    "tasks",
    "model_options",
    "limits",
    "limits.train",
    "seed",
    "device",
    "finetune",
    "finetune.steps",
    "finetune.lr",
    "finetune.loss",
    "finetune.loss.kind",
    "finetune.warmup_ratio",
    "recipes",
    "recipes.lr_x10",
    "recipes.lr_x10.lr_multiplier",
    "scenarios",
    "scenarios.original",
    "scenarios.original.recipe",
    "scenarios.norm_mismatch.long_tasks",
    "methods",
    "method_options",
    "method_options.ties",
    "method_options.ties.density",
    "method_options.wudi.iterations",
    "grid",
    "condition",
    "condition.kappa",
    "condition.beta",
    "condition.steps",
    "condition.lr",
    "condition.student_temperature",
    "condition_per_scenario.norm_mismatch.teacher_temperature",
    "evaluation",
    "evaluation.batch_size",
    "studies",
    "no_such_option",
    "finetune.no_such_option",
]


@FUZZ
@given(
    changes=st.lists(
        st.tuples(st.one_of(st.sampled_from(EXPERIMENT_KEYS), st.text(min_size=1, max_size=8)), yaml_values),
        min_size=1,
        max_size=3,
    )
)
def test_random_experiment_configs_load_or_raise_a_config_error(changes: list[tuple[str, Any]]) -> None:
    from distac.experiments.config import CONFIG_DIR, ExperimentConfig, load_experiment

    config = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    for key, value in changes:
        node = config
        *parents, last = key.split(".")
        for part in parents:
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[last] = value
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "fuzzed_experiment.yaml"
        try:
            file.write_text(yaml.safe_dump(config))
        except (ValueError, yaml.YAMLError):  # e.g. a NUL character; not a YAML file anyone can write
            return
        result = _expect_loads_or_distac_error(lambda: load_experiment(str(file)), ("fuzzed_experiment.yaml",))
        if result is not None:
            assert isinstance(result, ExperimentConfig)


@MORE
@given(overrides=st.lists(st.text(max_size=20), max_size=3))
def test_random_set_overrides_apply_or_raise_a_config_error(overrides: list[str]) -> None:
    from distac.config import apply_overrides
    from distac.experiments.config import load_experiment

    try:
        apply_overrides({"a": {"b": 1}}, overrides)
    except ConfigError as exc:
        assert "override" in str(exc)
    try:
        load_experiment("demo", overrides)
    except ConfigError:
        pass


def _tiny_task_vectors() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"blocks.0.attn.weight": torch.randn(4, 3, generator=g), "blocks.0.bias": torch.randn(4, generator=g)}
        for _ in range(3)
    ]


@MORE
@given(data=st.data())
def test_random_merge_hyperparameters_are_validated_at_construction(data: st.DataObject) -> None:
    from distac.merging.base import MergeConfigError
    from distac.merging.registry import available_methods, get_method, method_hyperparameters

    name = data.draw(st.one_of(st.sampled_from(available_methods()), st.text(max_size=8)), label="method")
    accepted = list(method_hyperparameters(name)) if name in available_methods() else ["density"]
    values = st.one_of(
        yaml_values, st.sampled_from([0, 1, -1, 0.5, 1.5, 10**30, math.nan, math.inf, "cuda:9", "all_2d", "mean"])
    )
    hyper = data.draw(
        st.dictionaries(st.one_of(st.sampled_from(accepted), st.text(max_size=6)), values, max_size=3),
        label="hyperparameters",
    )
    try:
        method = get_method(name, **hyper)
    except MergeConfigError as exc:
        message = str(exc)
        named = [k for k in [name, *hyper] if k in message or repr(k) in message]
        assert named, f"error names neither the method nor a parameter: {message}"
        return
    if name == "wudi" and int(getattr(method, "iterations", 0)) > 20:
        return  # valid but slow; the point here is validation, not WUDI's optimiser
    try:
        method.merge(_tiny_task_vectors(), task_names=["a", "b", "c"])
    except DistacError:
        pass


@MORE
@given(data=st.data())
def test_condition_and_finetune_configs_name_the_bad_option(data: st.DataObject) -> None:
    from distac.conditioning.distac import ConditionConfig
    from distac.config import build_dataclass
    from distac.training.finetune import FinetuneConfig
    from distac.training.losses import LossConfig

    cls = data.draw(st.sampled_from([ConditionConfig, FinetuneConfig, LossConfig]), label="config")
    fields = list(cls.__dataclass_fields__)
    numbers = st.sampled_from([0, -1, 1, 2.5, -0.5, 1e-5, 10**30, math.nan, math.inf, -math.inf, True, "x", None])
    values = data.draw(st.dictionaries(st.sampled_from(fields), st.one_of(numbers, yaml_values), max_size=3))
    try:
        cls(**values)
    except ConfigError as exc:
        assert any(k in str(exc) for k in values), f"error names no option of {sorted(values)}: {exc}"
    try:
        build_dataclass(cls, values, "fuzz-section")
    except ConfigError as exc:
        assert "fuzz-section" in str(exc)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"kappa": 0}, "kappa"),
        ({"kappa": 11}, "kappa"),
        ({"teacher_temperature": 0}, "teacher_temperature"),
        ({"student_temperature": -1}, "student_temperature"),
        ({"beta": -0.1}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0}, "lr"),
        ({"lr": math.inf}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"schedule": "linear"}, "schedule"),
    ],
)
def test_condition_config_out_of_range_values(kwargs: dict, name: str) -> None:
    from distac.conditioning.distac import ConditionConfig

    with pytest.raises(ConfigError, match=rf"condition\.{name}\b"):
        ConditionConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [({"lr": -1e-5}, "lr"), ({"lr": math.nan}, "lr"), ({"steps": 0}, "steps"), ({"warmup_ratio": 2}, "warmup_ratio")],
)
def test_finetune_config_out_of_range_values(kwargs: dict, name: str) -> None:
    from distac.training.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match=rf"finetune\.{name}\b"):
        FinetuneConfig(**kwargs)


# ---------------------------------------------------------------------------------------- datasets
tsv_text = st.one_of(
    st.text(alphabet=st.sampled_from("ab01-2\t\n\r\"' x"), max_size=80),
    st.builds(
        lambda rows: "text_a\ttext_b\tlabel\n" + "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows),
        st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4), st.sampled_from(["0", "1", "2", "-1", "", "x"]))),
    ),
)


@FEWER
@given(train=tsv_text, test=tsv_text, binary=st.binary(max_size=16))
def test_random_tsv_tasks_load_or_raise_a_data_error(train: str, test: str, binary: bytes) -> None:
    from distac.data import TaskData, load_task

    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp) / "fuzz_task"
        task.mkdir()
        (task / "train.tsv").write_text(train, encoding="utf-8")
        (task / "test.tsv").write_bytes(test.encode("utf-8") + binary)
        result = _expect_loads_or_distac_error(lambda: load_task(str(task)), ("fuzz_task",), kind=DataError)
        if result is not None:
            assert isinstance(result, TaskData)
            for split in (result.train, result.validation, result.test):
                assert len(split) and split.labels.min() >= 0 and split.labels.max() < result.num_classes


array_strategy = st.one_of(
    st.builds(lambda n: np.zeros((n, 4, 4, 3), np.uint8), st.integers(0, 12)),
    st.builds(lambda n: np.zeros((n, 4, 4), np.float32), st.integers(0, 4)),
    st.builds(lambda n: np.zeros(n, np.uint8), st.integers(0, 4)),
    st.builds(lambda n, k: np.arange(n) % k - 1, st.integers(0, 12), st.integers(1, 4)),
    st.builds(lambda n: np.arange(n) * 0.5, st.integers(0, 12)),
    st.builds(lambda n: np.array(["a"] * n), st.integers(0, 4)),
)


@FEWER
@given(
    arrays=st.dictionaries(
        st.sampled_from(["x_train", "y_train", "x_test", "y_test", "x_all", "y_all", "classes"]), array_strategy
    )
)
def test_random_npz_datasets_load_or_raise_a_data_error(arrays: dict[str, np.ndarray]) -> None:
    from distac.data.shared import load_vision_npz

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "fuzz.npz"
        np.savez(file, **arrays)
        _expect_loads_or_distac_error(lambda: load_vision_npz(file, "fuzz"), ("fuzz.npz",), kind=DataError)
        file.write_bytes(file.read_bytes()[: max(1, len(file.read_bytes()) // 2)])  # and truncated
        _expect_loads_or_distac_error(lambda: load_vision_npz(file, "fuzz"), ("fuzz.npz",), kind=DataError)


@FUZZ
@given(
    spec=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {},
            optional={
                "family": json_values | st.sampled_from(["hf-text", "clip"]),
                "backbone": json_values,
                "num_labels": json_values | st.integers(-2, 5),
                "task": json_values,
                "class_names": json_values | st.lists(st.text(max_size=3), max_size=4),
                "options": json_values,
            },
        ),
    )
)
def test_random_model_specs_are_refused_or_read(spec: Any) -> None:
    from distac.models.base import SPEC_FILE, ModelSpec

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SPEC_FILE).write_text(json.dumps(spec))
        result = _expect_loads_or_distac_error(lambda: ModelSpec.read(tmp), (SPEC_FILE,), kind=CheckpointError)
        if result is not None:
            assert result.num_labels >= 1 and (not result.class_names or len(result.class_names) == result.num_labels)


def test_pretrained_and_finetuned_must_have_the_same_architecture(tmp_path: Path) -> None:
    from distac.task_vectors import TaskVector

    pre = {"encoder.w": torch.zeros(2, 2), "encoder.b": torch.zeros(2)}
    cases = {
        "extra": {**pre, "encoder.extra": torch.zeros(3)},  # a parameter the pretrained model lacks
        "missing": {"encoder.w": torch.zeros(2, 2)},
        "shape": {"encoder.w": torch.zeros(3, 2), "encoder.b": torch.zeros(2)},
        "dtype": {"encoder.w": torch.zeros(2, 2, dtype=torch.int64), "encoder.b": torch.zeros(2)},
    }
    save_state_dict(pre, tmp_path / "pre")
    for name, state in cases.items():
        save_state_dict(state, tmp_path / f"ft_{name}")
        with pytest.raises(CheckpointError, match=f"ft_{name}"):
            TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / f"ft_{name}")
    save_state_dict({**pre, "head.weight": torch.zeros(3, 2)}, tmp_path / "ft_head")  # heads are not compared
    assert set(TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "ft_head").keys()) == set(pre)


def test_class_count_must_match_the_head() -> None:
    from distac.data import Split, TaskData
    from distac.models.base import ClassifierModel, ModelSpec

    class Tiny(ClassifierModel):
        family = "toy"

        def __init__(self, spec: ModelSpec) -> None:
            super().__init__(spec)
            self.backbone = torch.nn.Identity()
            self.head = torch.nn.Linear(2, spec.num_labels)

        def encode(self, raw: Any) -> dict[str, torch.Tensor]:
            return {"x": torch.as_tensor(raw, dtype=torch.float32)}

        def features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return inputs["x"]

    split = Split(np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 1]))
    task = TaskData("toy", "image", ["a", "b", "c"], split, split, split, source="toy.npz")
    Tiny(ModelSpec("toy", "none", 3)).check_task(task, "test")
    with pytest.raises(DataError, match=r"toy\.npz.*3 classes.*head.*has 5"):
        Tiny(ModelSpec("toy", "none", 5)).check_task(task)


@pytest.mark.parametrize(
    "files, fragment",
    [
        ({"train.tsv": "text_a\tlabel\na\t0\nb\t1\n", "test.tsv": "text_a\tlabel\nc\t7\n"}, r"test\.tsv.*'7'"),
        ({"train.tsv": "text_a\tlabel\na\t-1\nb\t1\n", "test.tsv": "text_a\tlabel\nc\t1\n"}, r"train\.tsv:2.*negative"),
        ({"train.tsv": "sentence\ty\na\t0\n", "test.tsv": "text_a\tlabel\nc\t1\n"}, r"train\.tsv.*missing column"),
        ({"train.tsv": "text_a\tlabel\n", "test.tsv": "text_a\tlabel\nc\t1\n"}, r"train\.tsv.*no examples"),
        ({"train.tsv": "text_a\tlabel\na\t0\tx\n", "test.tsv": "text_a\tlabel\nc\t0\n"}, r"train\.tsv:2.*more fields"),
    ],
)
def test_mislabeled_text_datasets_are_refused_naming_the_file(tmp_path: Path, files: dict, fragment: str) -> None:
    from distac.data import load_task

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=fragment):
        load_task(str(tmp_path))


# ---------------------------------------------------------------------------------------- failed runs
def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _sources(tmp_path: Path) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(0)
    pre = {"encoder.0.weight": torch.randn(6, 4, generator=g), "classifier.weight": torch.randn(3, 6, generator=g)}
    save_state_dict(pre, tmp_path / "pre")
    fts = []
    for i in range(2):
        save_state_dict({k: v + 0.1 * (i + 1) for k, v in pre.items()}, tmp_path / f"ft{i}")
        fts.append(tmp_path / f"ft{i}")
    return tmp_path / "pre", fts


@pytest.mark.parametrize("method", ["task_arithmetic", "emr"])
def test_failed_merge_leaves_inputs_untouched_and_no_output(tmp_path: Path, method: str) -> None:
    from distac.cli import app

    pre, fts = _sources(tmp_path)
    bad = {"encoder.0.weight": torch.full((6, 4), math.nan), "classifier.weight": torch.zeros(3, 6)}
    save_state_dict(bad, tmp_path / "nan_source")
    before = _snapshot(tmp_path)
    args = ["merge", str(fts[0]), str(fts[1]), str(tmp_path / "nan_source"), "--method", method]
    result = CliRunner().invoke(app, [*args, "--pretrained", str(pre), "--output", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert isinstance(result.exception, CheckpointError)
    assert "nan_source" in str(result.exception) and "NaN" in str(result.exception)
    assert not (tmp_path / "out").exists()
    assert _snapshot(tmp_path) == before  # inputs byte-identical, no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "nan_source", "pre"]


def test_merge_refuses_to_write_over_an_input(tmp_path: Path) -> None:
    from distac.cli import app

    pre, fts = _sources(tmp_path)
    before = _snapshot(tmp_path)
    for output in (fts[0], tmp_path):  # the same directory, or a directory containing the inputs
        args = ["merge", *map(str, fts), "--method", "task_arithmetic", "--pretrained", str(pre)]
        result = CliRunner().invoke(app, [*args, "--output", str(output)])
        assert isinstance(result.exception, CheckpointError), result.output
        assert "refusing to write" in str(result.exception)
    assert _snapshot(tmp_path) == before


def test_task_conditional_merge_interrupted_while_writing_leaves_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distac.checkpoints as ck
    from distac.cli import app

    pre, fts = _sources(tmp_path)
    before = _snapshot(tmp_path)
    real_save = ck.save_file
    calls = {"n": 0}

    def fail_second(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real_save(*args, **kwargs)

    monkeypatch.setattr(ck, "save_file", fail_second)
    args = ["merge", *map(str, fts), "--method", "emr", "--pretrained", str(pre), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, OSError)
    assert not (tmp_path / "out").exists()
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft0", "ft1", "pre"]


def test_cli_reports_a_bad_input_as_one_line_and_exit_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from distac import cli

    pre, fts = _sources(tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(VALID_SAFETENSORS[:-5])
    argv = ["distac", "merge", str(fts[0]), str(tmp_path / "broken.safetensors"), "-m", "ties", "-p", str(pre)]
    monkeypatch.setattr(sys, "argv", [*argv, "-o", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "broken.safetensors" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1 or err.count("broken.safetensors") >= 1
    assert not (tmp_path / "out").exists()
