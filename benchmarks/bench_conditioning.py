"""Cost of DisTaC conditioning: time per step with cached teacher logits vs the teacher run on-line
(the straightforward implementation, as in the released code), and with bf16 autocast where distac
uses it (CUDA, and CPUs with native bf16 kernels). On a CPU a separate measurement times one
training step of the same student in float32 and under CPU bf16 autocast, which is the evidence for
distac's choice on the machine at hand; CPU results are written per vector unit
(``conditioning_cpu_avx2``, ``conditioning_cpu_avx512``).

The source is the REAL all-MiniLM-L6-v2 fine-tuned for a few steps on real SST-2 (a quick source:
only speed is measured here, accuracy numbers are not reported). Every variant conditions the same
source with the same seed for ``--steps`` steps; the table reports wall time per step (excluding
the one-off teacher pass, reported separately), the resulting speed-up, and the peak memory of each
``condition()`` call, total and over what was live before it (``memory_probe.PeakMemory``: sampled
RSS on CPU, peak allocated on CUDA). Variants run one after another in this process.

    PYTHONPATH=src python benchmarks/bench_conditioning.py                      # CPU
    PYTHONPATH=src python benchmarks/bench_conditioning.py --device cuda --batch-size 128 --steps 100
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from distac.conditioning.distac import ConditionConfig, condition
from distac.data import load_task
from distac.environment import environment_record
from distac.models import ModelSpec, build_model
from distac.models.inference import bf16_autocast
from distac.training.finetune import FinetuneConfig, finetune

from memory_probe import PeakMemory

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backbone", default="all-MiniLM-L6-v2", help="all-MiniLM-L6-v2 or a copy of it (e.g. the GPU kit's)"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--unlabeled", type=int, default=640)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default=str(RESULTS / "conditioning_{device}"))
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    task = load_task("sst2", args.data_root).limit(train=args.unlabeled, validation=64, test=64, seed=args.seed)
    spec = ModelSpec(
        "hf-text",
        args.backbone,
        task.num_classes,
        task=task.name,
        class_names=task.class_names,
        options={"max_length": args.max_length},
    )
    teacher = build_model(spec)
    selector = teacher.task_vector_selector()
    pretrained = {k: v.detach().clone() for k, v in teacher.state_dict().items() if selector(k, v)}
    finetune(teacher, task, FinetuneConfig(steps=10, lr=1e-4, batch_size=16, device=args.device), progress=False)

    base = ConditionConfig(
        kappa=0.5,
        steps=args.steps,
        lr=1e-5,
        batch_size=args.batch_size,
        num_unlabeled=args.unlabeled,
        log_every=args.steps,
        eval_examples=32,
        checkpoint_every=None,
        device=args.device,
        seed=args.seed,
    )
    variants: list[tuple[str, ConditionConfig]] = [
        ("teacher on-line (straightforward)", replace(base, cache_teacher_logits=False)),
        ("cached teacher logits (default)", base),
    ]
    if bf16_autocast(True, torch.device(args.device)):  # CUDA, or a CPU with native bf16 kernels
        variants += [
            ("teacher on-line + bf16", replace(base, cache_teacher_logits=False, mixed_precision=True)),
            ("cached teacher logits + bf16", replace(base, mixed_precision=True)),
        ]
    rows: list[dict[str, Any]] = []
    for label, config in variants:
        with PeakMemory(args.device) as memory:
            t0 = time.perf_counter()
            result = condition(teacher, pretrained, task, config, progress=False)
            total = time.perf_counter() - t0
        loop = result.seconds  # the distillation loop only: starts after the teacher-logit cache is built
        rows.append(
            {
                "variant": label,
                "cache_teacher_logits": config.cache_teacher_logits,
                "mixed_precision": config.mixed_precision,
                "steps": config.steps,
                "batch_size": config.batch_size,
                "total_seconds": total,
                "seconds_per_step": loop / config.steps,
                "final_kl": result.history[-1].get("kl"),
                "peak_memory_gib": memory.peak / 2**30,
                "peak_extra_memory_gib": memory.peak_extra / 2**30,
            }
        )
        print(
            f"{label:<40} {loop / config.steps:.3f} s/step  total {total:.1f} s  "
            f"extra memory {memory.peak_extra / 2**30:.2f} GiB",
            flush=True,
        )
        del result
    reference = rows[0]["seconds_per_step"]
    for row in rows:
        row["speedup_vs_online"] = reference / row["seconds_per_step"]
    cpu_autocast = None
    if not args.device.startswith("cuda"):
        texts = list(task.train.inputs[: args.batch_size])
        cpu_autocast = _cpu_autocast_step_times(teacher, texts, repeats=max(3, args.steps // 4))
        print(
            f"training step, float32 {cpu_autocast['float32_seconds']:.3f} s, bf16 autocast "
            f"{cpu_autocast['bf16_seconds']:.3f} s ({_ratio(cpu_autocast['bf16_speedup'])})",
            flush=True,
        )
    record = {
        "benchmark": "conditioning",
        "source": "all-MiniLM-L6-v2 fine-tuned 10 steps on SST-2 (speed only)",
        "args": vars(args),
        "rows": rows,
        "cpu_autocast": cpu_autocast,
        "environment": environment_record(),
        "load_average_end": list(os.getloadavg()),
        "wall_seconds": time.perf_counter() - start,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "platform": platform.platform(),
    }
    output = Path(args.output.format(device=_device_label(args.device)))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    output.with_suffix(".md").write_text(_markdown(record))
    print(f"wrote {output.with_suffix('.json')} and .md")


def _cpu_autocast_step_times(model: Any, texts: list[Any], repeats: int) -> dict[str, Any]:
    """Seconds per forward + backward pass of ``model`` on one batch, in float32 and under CPU bf16
    autocast, interleaved (so a change in machine load hits both) after one warm-up pass each."""

    def step(autocast: bool) -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(model.encode(texts))
        torch.nn.functional.cross_entropy(logits.float(), torch.zeros(len(texts), dtype=torch.long)).backward()
        return time.perf_counter() - t0

    model = copy.deepcopy(model).train().to("cpu")  # the teacher is frozen; the student trains
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for autocast in (False, True):  # warm-up
        step(autocast)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for autocast in (False, True):
            times[autocast].append(step(autocast))
    fp32, bf16 = (sorted(times[a])[len(times[a]) // 2] for a in (False, True))  # medians
    return {
        "batch_size": len(texts),
        "repeats": repeats,
        "float32_seconds": fp32,
        "bf16_seconds": bf16,
        "bf16_speedup": fp32 / bf16,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def _device_label(device: str) -> str:
    """``cuda``, or ``cpu_<capability>`` (``cpu_avx2``, ``cpu_avx512``): CPU results differ by vector unit,
    bf16 autocast most of all, so each kind of CPU keeps its own result files."""
    kind = device.split(":")[0]
    return f"cpu_{torch.backends.cpu.get_cpu_capability().lower()}" if kind == "cpu" else kind


def _ratio(speedup: float) -> str:
    return f"a {speedup:.2f}x speed-up" if speedup >= 1 else f"{1 / speedup:.1f}x slower"


def _markdown(record: dict[str, Any]) -> str:
    env = record["environment"]
    args = record["args"]
    lines = [
        f"# Conditioning cost ({args['device']})",
        "",
        f"DisTaC on {record['source']}: {args['steps']} steps, batch {args['batch_size']}, max length "
        f"{args['max_length']}, {args['unlabeled']} unlabeled inputs. Time per step excludes the one-off "
        "teacher pass of the cached variants (included in total).",
        "",
        "| variant | s / step | speed-up vs on-line | total (s) | final KL | peak extra memory (GiB) "
        "| peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        lines.append(
            f"| {row['variant']} | {row['seconds_per_step']:.3f} | {row['speedup_vs_online']:.2f}x | "
            f"{row['total_seconds']:.1f} | {row['final_kl']:.4f} | {row['peak_extra_memory_gib']:.2f} | "
            f"{row['peak_memory_gib']:.2f} |"
        )
    autocast = record.get("cpu_autocast")
    if autocast:
        lines += [
            "",
            f"Mixed precision on this CPU (median of {autocast['repeats']} interleaved forward + backward passes "
            f"of the student, batch {autocast['batch_size']}): float32 {autocast['float32_seconds']:.3f} s, bf16 "
            f"autocast {autocast['bf16_seconds']:.3f} s, {_ratio(autocast['bf16_speedup'])} "
            f"(CPU capability {autocast['cpu_capability']}, oneDNN bf16 "
            f"{'supported' if autocast['mkldnn_bf16_supported'] else 'not supported'}). "
            + (
                "distac honours `mixed_precision` on such a CPU (the bf16 rows above)."
                if autocast["mkldnn_bf16_supported"]
                else "distac ignores `mixed_precision` on such a CPU, with a warning."
            ),
        ]
    lines += [
        "",
        "Peak extra memory: what `condition()` needed at its worst moment, over what was live when it was "
        "called (the teacher, the pretrained weights, the data): the student, its optimizer state, the "
        "teacher-logit cache and the activations. Peak memory: the total at that moment. On CPU both are "
        "the resident set sampled every 5 ms (freed heap handed back to the OS before each variant); on "
        "CUDA the allocator's peak of allocated device memory.",
        "",
        f"Machine: {env['machine']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}, CUDA "
        f"{env['cuda']}; torch {env['torch']}, transformers {env['transformers']}, distac {env['distac']}; "
        f"seed {args['seed']}; load average at the end {record['load_average_end']}; "
        f"wall time {record['wall_seconds']:.0f} s.",
        "",
        f"Reproduce: `PYTHONPATH=src {record['command']}`",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
