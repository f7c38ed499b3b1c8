"""Time every merging method on task vectors with the exact parameter shapes of CLIP ViT-B/32's
vision tower (``transformers.CLIPVisionModel(CLIPVisionConfig())``, randomly initialised only to
read its shapes, ~88M parameters).

The task vectors are random perturbations (N(0, scale^2) per entry), so the timings depend only on
the shapes, T and the hardware; no accuracy is measured or implied.

Measured per method: wall time of ``merge()`` and the peak extra resident memory during it (RSS
sampled every 5 ms from /proc, minus the RSS before the call; on CUDA the peak allocated device
memory instead). ``tracemalloc`` is not used: it does not see torch's C++ allocations. Each method
runs in a fresh worker process (same seed, same task vectors), because memory freed by one method
stays in the process heap and would hide the next method's peak.

WUDI at its paper budget (300 Adam steps per matrix) is expensive on a small CPU, so it is timed at
0 and at ``--wudi-iters`` iterations and the 300-iteration time is extrapolated linearly
(setup + iterations x per-iteration time); the table labels such rows as extrapolated.

    PYTHONPATH=src python benchmarks/bench_merging.py                 # CPU, T = 8
    PYTHONPATH=src python benchmarks/bench_merging.py --device cuda --wudi-iters 300
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distac.merging import available_methods, get_method

from memory_probe import PeakMemory, release_free_heap

PAPER_WUDI_ITERATIONS = 300
RESULTS = Path(__file__).resolve().parent / "results"


def clip_vit_b32_shapes() -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the HF CLIP ViT-B/32 vision tower (default CLIPVisionConfig)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    del model
    gc.collect()
    return shapes


def make_task_vectors(
    shapes: dict[str, tuple[int, ...]], tasks: int, scale: float, seed: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {key: (scale * torch.randn(shape, generator=generator)).to(device) for key, shape in shapes.items()}
        for _ in range(tasks)
    ]


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, int]:
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    del result
    gc.collect()
    return seconds, memory.peak_extra


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this (fresh) process and return its row."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    shapes = clip_vit_b32_shapes()
    task_vectors = make_task_vectors(shapes, args.tasks, args.scale, args.seed, device)
    names = [f"task_{i}" for i in range(args.tasks)]
    release_free_heap()
    if args.worker == "wudi":
        return bench_wudi(task_vectors, names, args, device)
    method = get_method(args.worker)
    seconds, peak = timed(lambda: method.merge(task_vectors, task_names=names), device)
    return {"method": args.worker, "seconds": seconds, "peak_extra_bytes": peak, "extrapolated": False}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    shapes = clip_vit_b32_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    start = time.perf_counter()
    make_task_vectors(shapes, args.tasks, args.scale, args.seed, torch.device("cpu"))
    generation = time.perf_counter() - start
    print(f"{len(shapes)} tensors, {numel / 1e6:.1f}M parameters, T={args.tasks}, generated in {generation:.1f}s")
    gc.collect()
    rows: list[dict[str, Any]] = []
    for name in args.methods:
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            name,
            "--device",
            args.device,
            "--tasks",
            str(args.tasks),
            "--wudi-iters",
            str(args.wudi_iters),
            "--scale",
            str(args.scale),
            "--seed",
            str(args.seed),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"worker for {name} failed:\n{completed.stderr}")
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:16s} {row['seconds']:8.2f}s  peak +{row['peak_extra_bytes'] / 2**30:.2f} GiB", flush=True)
    return {
        "benchmark": "distac.merging merge() on CLIP ViT-B/32 vision-tower shapes",
        "note": "random task vectors: timing depends only on shapes, T and hardware; no accuracy is reported",
        "model_shapes": "transformers.CLIPVisionModel(CLIPVisionConfig()), randomly initialised",
        "num_tensors": len(shapes),
        "num_parameters": numel,
        "tasks": args.tasks,
        "perturbation_std": args.scale,
        "seed": args.seed,
        "device": str(device),
        "task_vector_generation_seconds": generation,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "results": rows,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def bench_wudi(task_vectors: list, names: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time WUDI at ``--wudi-iters`` iterations (memory measured here) and at 0 iterations (setup:
    Gram matrices and the initial gradient); extrapolate linearly to 300 if fewer were run."""

    def merge(iterations: int) -> tuple[float, int]:
        method = get_method("wudi", iterations=iterations)
        return timed(lambda: method.merge(task_vectors, task_names=names), device)

    seconds, peak = merge(args.wudi_iters)
    setup_seconds, _ = merge(0)
    per_iteration = max(seconds - setup_seconds, 0.0) / args.wudi_iters
    extrapolated = args.wudi_iters != PAPER_WUDI_ITERATIONS
    total = setup_seconds + PAPER_WUDI_ITERATIONS * per_iteration if extrapolated else seconds
    return {
        "method": "wudi",
        "seconds": total,
        "peak_extra_bytes": peak,
        "extrapolated": extrapolated,
        "iterations_run": args.wudi_iters,
        "seconds_at_iterations_run": seconds,
        "setup_seconds": setup_seconds,
        "seconds_per_iteration": per_iteration,
        "iterations_reported": PAPER_WUDI_ITERATIONS,
    }


def write_markdown(report: dict[str, Any], path: Path) -> None:
    machine = report["machine"]
    lines = [
        f"# Merging benchmark ({report['device']})",
        "",
        f"`merge()` wall time for T = {report['tasks']} task vectors with the exact parameter shapes of CLIP "
        f"ViT-B/32's vision tower: {report['model_shapes']}, {report['num_tensors']} tensors, "
        f"{report['num_parameters'] / 1e6:.1f}M parameters per task vector. Each method runs in a fresh "
        "worker process on the same seeded task vectors.",
        "",
        f"**The task vectors are random perturbations (N(0, {report['perturbation_std']:g}^2) per entry). Timing "
        "depends only on the shapes, T and the hardware; no accuracy is reported or implied.**",
        "",
        "| method | merge() wall time (s) | peak extra memory (GiB) | notes |",
        "|---|---:|---:|---|",
    ]
    for row in report["results"]:
        note = ""
        if row["method"] == "wudi":
            if row["extrapolated"]:
                note = (
                    f"**extrapolated** to {row['iterations_reported']} Adam iterations: measured "
                    f"{row['seconds_at_iterations_run']:.1f} s at {row['iterations_run']} iterations, setup (0 "
                    f"iterations) {row['setup_seconds']:.1f} s, {row['seconds_per_iteration']:.3f} s per iteration "
                    "(all 72 block-linear matrices); memory measured at the run iterations"
                )
            else:
                note = f"measured at {row['iterations_reported']} Adam iterations"
        lines.append(f"| {row['method']} | {row['seconds']:.2f} | {row['peak_extra_bytes'] / 2**30:.2f} | {note} |")
    lines += [
        "",
        "Peak extra memory: resident-set size sampled every 5 ms during `merge()` minus the RSS before the call "
        "(CUDA: peak allocated device memory). It includes the merged output (one full state dict; T of them for "
        "the task-conditional `tall_masks` and `emr`), on top of the "
        f"{report['tasks']} x {report['num_parameters'] * 4 / 2**30:.2f} GiB of input task vectors.",
        "",
        "Defaults used: every method at its registry defaults (TIES density 0.2 dis-mean; TALL/Consensus "
        "lambda 0.6, k = 2; TSV-M k = r/T; Iso-CTS common fraction 0.8; WUDI official key selection, lr 1e-5).",
        "",
        "## Machine",
        "",
        f"- platform: {machine['platform']} ({machine['processor']})",
        f"- CPU count: {machine['cpu_count']} (torch threads: {machine['torch_threads']})",
        f"- Python {machine['python']}, torch {machine['torch']}",
        f"- device: {report['device']}" + (f" ({machine['cuda_device']})" if machine["cuda_device"] else ""),
        f"- seed: {report['seed']}; load average at the end: {machine['load_average_at_end']}",
        f"- date (UTC): {report['date_utc']}",
        "",
        "The machine was not reserved for this run (other work may have shared its cores); the load average "
        "above is the only record of that. Single runs, no repetitions: read the numbers as orders of magnitude "
        "between methods, not as precise timings.",
        "",
        "Reproduce: `PYTHONPATH=src python benchmarks/bench_merging.py "
        f"--device {report['device']} --tasks {report['tasks']} --wudi-iters "
        f"{next((r['iterations_run'] for r in report['results'] if r['method'] == 'wudi'), PAPER_WUDI_ITERATIONS)}`",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument(
        "--wudi-iters",
        type=int,
        default=None,
        help="WUDI iterations actually run (default: 300 on CUDA, 20 on CPU, extrapolated to 300)",
    )
    parser.add_argument("--methods", nargs="+", default=available_methods(), choices=available_methods())
    parser.add_argument("--scale", type=float, default=1e-3, help="std of the random task-vector entries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=available_methods(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.wudi_iters is None:
        args.wudi_iters = PAPER_WUDI_ITERATIONS if args.device.startswith("cuda") else 20
    if args.wudi_iters < 1:
        parser.error("--wudi-iters must be >= 1")
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"merging_{torch.device(args.device).type}"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out_dir / f"{stem}.md")
    print(f"wrote {args.out_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
