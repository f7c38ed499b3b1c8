"""Multi-process conditioning and fine-tuning (``accelerate launch``, DDP over gloo on 2 CPU
processes) end with the same weights as a single-process run, and a single-process resume state
resumes under 2 processes.

One launch runs the real CLI (``distac.cli``) five times: fine-tune, fine-tune resumed from a
state file an interrupted single-process run left behind, condition, and condition resumed
likewise. The references run in this process. The tiny BERT has no dropout, so fine-tuning is
deterministic on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distac.conditioning.distac import STATE_FILE, ConditionConfig, condition, scaled_student
from distac.data import load_task
from distac.distributed import Runtime
from distac.errors import ConfigError
from distac.models import ModelSpec, build_model, load_model, save_model
from distac.training.finetune import FinetuneConfig, finetune

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "good", "bad", "great", "awful", "fine", "poor", "nice", "dull",
    "fun", "sad", "warm", "cold", "bright", "dark", "kind", "mean",
]  # fmt: skip
FINETUNE = dict(steps=4, lr=1e-3, batch_size=8, seed=0, device="cpu")
CONDITION = dict(
    kappa=0.5, steps=4, lr=1e-3, batch_size=8, num_unlabeled=32, log_every=2, checkpoint_every=2, eval_examples=16,
    device="cpu",
)  # fmt: skip
MAX_LENGTH = 16

DRIVER = """
import json, sys
from distac.cli import app
for args in json.loads(sys.argv[1]):
    app(args, standalone_mode=False)
"""

# accelerate enables FSDP only on GPUs; this driver forces its FSDP2 mode onto the CPU/gloo processes
# (a test device, not a way to run), so the sharded code path can be checked without GPUs. An
# interrupted run (exit right after the first sharded checkpoint of the command that
# DISTAC_TEST_INTERRUPT names) is resumed by the next launch.
FSDP_DRIVER = """
import json, os, sys
import distac.conditioning.distac as conditioning
import distac.distributed as distributed
import distac.training.finetune as training
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

plain = distributed.runtime

def fsdp_runtime(device="auto"):
    rt = plain(device)
    if rt.accelerator.state.distributed_type != DistributedType.FSDP:
        rt.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["BertLayer"],
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
        )
        rt.accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert rt.sharded
    return rt

conditioning.runtime = training.runtime = fsdp_runtime
def then_exit(save, command):
    def save_then_exit(*args, **kwargs):
        save(*args, **kwargs)
        if os.environ.get("DISTAC_TEST_INTERRUPT") == command:
            os._exit(0)
    return save_then_exit

conditioning._save_sharded_state = then_exit(conditioning._save_sharded_state, "condition")
training.save_sharded_state = then_exit(training.save_sharded_state, "finetune")
from distac.cli import app
for args in json.loads(sys.argv[1]):
    app(args, standalone_mode=False)
"""


def _write_task(root: Path) -> Path:
    """A tiny two-class text task; every sentence is five single-token words (no padding)."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for split, n in {"train": 48, "validation": 16, "test": 16}.items():
        lines = ["text_a,label"]
        for _ in range(n):
            words = rng.choice(WORDS, 5)
            label = int(sum(WORDS.index(w) % 2 == 0 for w in words) >= 3)
            lines.append(f"{' '.join(words)},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, Path]:
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(root / "bert")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(root / "bert")
    task_dir = _write_task(root / "toy")
    # a source with a non-trivial task vector: the pretrained model plus a fixed perturbation
    source = build_model(_spec(root / "bert", task_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_model(source, root / "source")
    return {"root": root, "bert": root / "bert", "task": task_dir, "source": root / "source"}


def _spec(bert: Path, task_dir: Path) -> ModelSpec:
    task = load_task(str(task_dir))
    return ModelSpec(
        "hf-text", str(bert), task.num_classes, task=task.name, class_names=task.class_names,
        options={"max_length": MAX_LENGTH},
    )  # fmt: skip


def _pretrained(teacher) -> dict[str, torch.Tensor]:  # noqa: ANN001
    selector = teacher.task_vector_selector()
    return {k: v for k, v in build_model(teacher.spec).state_dict().items() if selector(k, v)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# An attention key bias has an identically zero gradient (softmax ignores a shift shared by all keys)
# and no effect on the model's function: its "gradient" is float noise, which Adam normalises into
# steps of up to lr, so two runs that sum in a different order move it differently. It is held to
# that bound; every other parameter must match to float precision.
FUNCTION_FREE = ".attention.self.key.bias"


def _compare(
    single: dict[str, torch.Tensor], other: dict[str, torch.Tensor], start: dict[str, torch.Tensor], bound: float
) -> tuple[float, float]:
    """Max |single - other| over the parameters that matter, and that relative to the largest update
    |single - start|; the function-free key biases must stay within ``bound``."""
    assert single.keys() == other.keys()
    diffs = {k: float((single[k].float() - other[k].float()).abs().max()) for k in single}
    update = max(float((single[k].float() - start[k].float()).abs().max()) for k in single)
    assert update > 1e-4, "the run did not move the weights"
    assert all(d <= bound for k, d in diffs.items() if k.endswith(FUNCTION_FREE))
    abs_diff = max(d for k, d in diffs.items() if not k.endswith(FUNCTION_FREE))
    return abs_diff, abs_diff / update


def _launch(root: Path, driver: str, runs: list[list[str]], **extra_env: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` 2 CPU processes (gloo) running ``driver`` with the CLI argument lists."""
    (root / "driver.py").write_text(driver)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra_env,
    }
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU"):
        if var not in extra_env:
            env.pop(var, None)
    # --multi_gpu starts the processes (torchrun); --device cpu makes distac pick gloo. (--cpu would
    # start a single process.)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(root / "driver.py"), json.dumps(runs),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _finetune_args(setup: dict[str, Path], output: Path) -> list[str]:
    return [
        "finetune", "--task", str(setup["task"]), "--output", str(output), "--backbone", str(setup["bert"]),
        "--steps", "4", "--lr", "1e-3", "--batch-size", "8", "--max-length", str(MAX_LENGTH), "--seed", "0",
        "--device", "cpu",
    ]  # fmt: skip


def _condition_args(setup: dict[str, Path], output: Path, work_dir: Path) -> list[str]:
    return [
        "condition", str(setup["source"]), "--task", str(setup["task"]), "--kappa", "0.5", "--steps", "4",
        "--lr", "1e-3", "--batch-size", "8", "--unlabeled", "32", "--device", "cpu", "--set", "log_every=2",
        "--set", "checkpoint_every=2", "--set", "eval_examples=16", "--output", str(output),
        "--work-dir", str(work_dir),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def launched(setup: dict[str, Path]) -> dict[str, Path]:
    """Single-process interrupted run (leaves a resume state), then one 2-process launch."""
    root = setup["root"]
    # an interrupted single-process run leaves condition_state.pt after step 2 (of 4)
    import distac.conditioning.distac as mod

    class Crash(Exception):
        pass

    original = mod._save_state

    def save_then_crash(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        original(*args, **kwargs)
        raise Crash

    teacher = load_model(setup["source"])
    task = load_task(str(setup["task"]))
    mod._save_state = save_then_crash
    try:
        with pytest.raises(Crash):
            condition(teacher, _pretrained(teacher), task, ConditionConfig(**CONDITION), work_dir=root / "resume.work",
                      progress=False)  # fmt: skip
    finally:
        mod._save_state = original
    assert (root / "resume.work" / STATE_FILE).is_file()
    # and an interrupted single-process fine-tuning run leaves finetune_state.pt after step 2 (of 4)
    import distac.training.finetune as training

    original_finetune_save = training._save_state

    def finetune_save_then_crash(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        original_finetune_save(*args, **kwargs)
        raise Crash

    training._save_state = finetune_save_then_crash
    try:
        with pytest.raises(Crash):
            config = FinetuneConfig(**FINETUNE, checkpoint_every=2)
            model = build_model(_spec(setup["bert"], setup["task"]))
            finetune(model, task, config, work_dir=root / "ft-resume.work", progress=False)
    finally:
        training._save_state = original_finetune_save
    resume_ft = root / "ft-resume.work"
    assert (resume_ft / training.STATE_FILE).is_file()

    runs = [
        # checkpoints at step 2: every process's generator state is gathered, the main process saves
        [*_finetune_args(setup, root / "ft"), "--set", "checkpoint_every=2"],
        [*_finetune_args(setup, root / "ft-resumed"), "--set", "checkpoint_every=2", "--work-dir", str(resume_ft)],
        _condition_args(setup, root / "cond", root / "cond.work"),
        _condition_args(setup, root / "resumed", root / "resume.work"),
    ]
    proc = _launch(root, DRIVER, runs)
    # only the main process reports (and writes): one line per command
    assert proc.stdout.count("saved ") == 2 and proc.stdout.count("conditioned ") == 2, proc.stdout
    return setup


@pytest.mark.slow
def test_two_process_finetune_matches_single_process(launched: dict[str, Path]) -> None:
    model = build_model(_spec(launched["bert"], launched["task"]))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, load_task(str(launched["task"])), FinetuneConfig(**FINETUNE), progress=False)
    for name in ("ft", "ft-resumed"):  # ft-resumed: resumed from a single-process state after step 2
        distributed = load_model(launched["root"] / name)
        abs_diff, rel_diff = _compare(
            model.state_dict(), distributed.state_dict(), start, FINETUNE["steps"] * FINETUNE["lr"]
        )
        print(f"finetune ({name}): max abs diff {abs_diff:.3g}, relative to the update {rel_diff:.3g}")
        assert abs_diff < 1e-6 and rel_diff < 1e-3  # a float32 ulp at 1.0 (LayerNorm weights) is 1.2e-7
        saved = json.loads((launched["root"] / name / "finetune.json").read_text())["result"]
        assert abs(saved["final_loss"] - result.losses[-1]) < 1e-5  # the logged loss is the global-batch mean
    # the main process removed the resume states at the end
    assert not (launched["root"] / "ft-resume.work" / "finetune_state.pt").exists()
    assert not (launched["root"] / "ft.work" / "finetune_state.pt").exists()


@pytest.mark.slow
def test_two_process_conditioning_matches_single_process(launched: dict[str, Path]) -> None:
    teacher = load_model(launched["source"])
    task = load_task(str(launched["task"]))
    single = condition(teacher, _pretrained(teacher), task, ConditionConfig(**CONDITION), progress=False)
    reference = single.student.state_dict()
    start = scaled_student(teacher, _pretrained(teacher), CONDITION["kappa"]).state_dict()
    for name in ("cond", "resumed"):
        distributed = load_model(launched["root"] / name)
        abs_diff, rel_diff = _compare(reference, distributed.state_dict(), start, CONDITION["steps"] * CONDITION["lr"])
        print(f"condition ({name}): max abs diff {abs_diff:.3g}, relative to the update {rel_diff:.3g}")
        assert abs_diff < 1e-6 and rel_diff < 1e-3
        history = json.loads((launched["root"] / name / "condition.json").read_text())["history"]
        assert [h["step"] for h in history] == [h["step"] for h in single.history] == [0, 2, 4]
        for ours, theirs in zip(history, single.history, strict=True):
            for key in ("kl", "norm", "val_accuracy"):
                if key in theirs:
                    assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-7), (name, key)
            for key in ("l2", "loss"):  # include the key biases' noise-driven drift
                if key in theirs:
                    assert ours[key] == pytest.approx(theirs[key], rel=1e-2), (name, key)
    # the main process removed the resume states at the end
    assert not (launched["root"] / "resume.work" / STATE_FILE).exists()
    assert not (launched["root"] / "cond.work" / STATE_FILE).exists()


def test_global_batch_split_and_loss_weights() -> None:
    class Fake:
        def __init__(self, n: int, i: int) -> None:
            self.num_processes, self.process_index = n, i

    def rt(n: int, i: int) -> Runtime:
        r = Runtime(torch.device("cpu"))
        r.accelerator = Fake(n, i)
        return r

    batch = np.arange(10, 20)
    assert rt(1, 0).local(batch).tolist() == batch.tolist()
    assert np.concatenate([rt(2, i).local(batch) for i in range(2)]).tolist() == batch.tolist()
    parts = [rt(3, i).local(batch) for i in range(3)]
    assert [len(p) for p in parts] == [4, 3, 3] and np.concatenate(parts).tolist() == batch.tolist()
    # uneven slices: DDP's average of the weighted local means is the global batch mean
    losses = np.random.default_rng(0).random(len(batch))
    local_means = [losses[p - 10].mean() * rt(3, i).loss_weight(len(p), len(batch)) for i, p in enumerate(parts)]
    assert np.mean(local_means) == pytest.approx(losses.mean())
    with pytest.raises(ConfigError, match="cannot be split over 4 processes"):
        rt(4, 0).local(np.arange(3))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DISTAC_TEST_FSDP_CPU"), reason="opt-in (DISTAC_TEST_FSDP_CPU=1): ~1-2 min")
def test_fsdp2_on_two_cpu_processes_matches_single_process(setup: dict[str, Path]) -> None:
    root = setup["root"] / "fsdp"
    root.mkdir()
    # 1: condition, interrupted after the step-2 sharded checkpoint; 2: condition resumed, then
    # fine-tune, interrupted likewise; 3: fine-tune resumed
    condition_args = _condition_args(setup, root / "cond", root / "cond.work")
    finetune_args = [*_finetune_args(setup, root / "ft"), "--set", "checkpoint_every=2"]
    _launch(root, FSDP_DRIVER, [condition_args], DISTAC_TEST_INTERRUPT="condition")
    assert (root / "cond.work" / "condition_state_fsdp" / "distac_state.json").is_file()
    assert not (root / "cond").exists()
    _launch(root, FSDP_DRIVER, [condition_args, finetune_args], DISTAC_TEST_INTERRUPT="finetune")
    assert not (root / "cond.work" / "condition_state_fsdp").exists()
    assert json.loads((root / "ft.work" / "finetune_state_fsdp" / "distac_state.json").read_text())["step"] == 2
    assert not (root / "ft").exists()
    _launch(root, FSDP_DRIVER, [finetune_args])
    assert not (root / "ft.work" / "finetune_state_fsdp").exists()

    teacher = load_model(setup["source"])
    single = condition(
        teacher, _pretrained(teacher), load_task(str(setup["task"])), ConditionConfig(**CONDITION), progress=False
    )
    start = scaled_student(teacher, _pretrained(teacher), CONDITION["kappa"]).state_dict()
    bound = CONDITION["steps"] * CONDITION["lr"]
    abs_diff, rel_diff = _compare(single.student.state_dict(), load_model(root / "cond").state_dict(), start, bound)
    print(f"FSDP2 condition (resumed): max abs diff {abs_diff:.3g}, relative to the update {rel_diff:.3g}")
    assert abs_diff < 1e-6 and rel_diff < 1e-3

    model = build_model(_spec(setup["bert"], setup["task"]))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, load_task(str(setup["task"])), FinetuneConfig(**FINETUNE), progress=False)
    bound = FINETUNE["steps"] * FINETUNE["lr"]
    abs_diff, rel_diff = _compare(model.state_dict(), load_model(root / "ft").state_dict(), start, bound)
    print(f"FSDP2 finetune (resumed): max abs diff {abs_diff:.3g}, relative to the update {rel_diff:.3g}")
    assert abs_diff < 1e-6 and rel_diff < 1e-3
