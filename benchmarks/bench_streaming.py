"""Peak memory of ``distac merge --streaming`` vs the in-memory merge, for BERT-like models of two
sizes and T = 2, 4, 8 fine-tuned sources.

Checkpoints: random tensors with the exact parameter shapes of ``transformers.BertModel`` at two
sizes (``small``: hidden 512, 4 layers, ~28M parameters; ``base``: BERT-base, ~110M), saved as
sharded safetensors (``model.safetensors.index.json``, 100 MB shards) like ``save_pretrained``
does; each "fine-tuned" source is the pretrained model plus N(0, 1e-3^2) noise. No accuracy is
measured or implied, only memory and time.

Each merge runs in a fresh worker process (so one run's freed heap cannot hide the next run's
peak) and is the real code path:

* in-memory: ``distac.commands.merge._merge_checkpoints`` (what ``distac merge`` runs without
  ``--streaming``: load theta_pre, build each task vector, ``method.merge``, ``apply_merge``,
  ``save_state_dict``);
* streaming: :func:`distac.merging.streaming.streaming_merge` (``distac merge --streaming``).

Runs: ``task_arithmetic`` (I/O- and memory-bound) at every size and T; ``ties`` (three read passes
in streaming mode, compute-bound elementwise work) only at ``small``, T = 2 by default (``--extra``
adds method:size:T runs), to keep the whole benchmark near 10 minutes on 2 cores.

Measured per run: wall time, ``VmHWM`` (the process's peak resident set, from /proc/self/status,
which is what the OS must provide; it includes file pages mapped while reading safetensors), and
the peak of ``RssAnon`` (anonymous memory only: tensors and heap), sampled every 5 ms. The
baseline RSS after imports (torch, transformers, distac: the same in both modes) is recorded and
subtracted in the "extra" columns.

    PYTHONPATH=src python benchmarks/bench_streaming.py      # ~12 min wall on 2 shared cores (~7 CPU-min)
    PYTHONPATH=src python benchmarks/bench_streaming.py --sizes small --tasks 2 4 --extra ties:small:4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import distac  # noqa: F401  (installs the torchvision shim before transformers is imported)

from memory_probe import PeakMemory, proc_status

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}
SHARD_BYTES = 100 * 1000**2
NOISE = 1e-3


def bert_shapes(size: str) -> dict[str, tuple[int, ...]]:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **SIZES[size])
    with torch.device("meta"):
        model = BertModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}


def write_checkpoints(root: Path, size: str, tasks: int, seed: int) -> tuple[Path, list[Path]]:
    """theta_pre and ``tasks`` noisy copies as sharded safetensors (written once, reused per T)."""
    from distac.checkpoints import save_state_dict

    shapes = bert_shapes(size)
    generator = torch.Generator().manual_seed(seed)
    pre = {k: 0.02 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    save_state_dict(pre, root / "pre", max_shard_bytes=SHARD_BYTES)
    (root / "pre" / "config.json").write_text(json.dumps({"model_type": "bert", **SIZES[size]}))
    sources = []
    for t in range(tasks):
        state = {k: v + NOISE * torch.randn(v.shape, generator=generator) for k, v in pre.items()}
        save_state_dict(state, root / f"ft{t}", max_shard_bytes=SHARD_BYTES)
        sources.append(root / f"ft{t}")
        del state
    return root / "pre", sources


# ------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import transformers  # noqa: F401  (imported by both paths; part of the baseline)

    from distac.commands.merge import _merge_checkpoints
    from distac.merging.streaming import streaming_merge

    torch.set_num_threads(args.threads)
    pre = Path(args.pretrained)
    sources = [Path(p) for p in args.sources]
    out = Path(args.output)
    gc.collect()
    baseline = proc_status()
    start = time.perf_counter()
    with PeakMemory("cpu", field="RssAnon") as anon:
        if args.worker == "streaming":
            streaming_merge(pre, sources, method=args.method, coefficient=0.3, output=out, max_shard_bytes=SHARD_BYTES)
        else:
            _merge_checkpoints(pre, sources, [p.name for p in sources], args.method, {}, out, 0.3, [], [], SHARD_BYTES)
    seconds = time.perf_counter() - start
    final = proc_status()
    return {
        "mode": args.worker,
        "method": args.method,
        "seconds": seconds,
        "peak_rss_bytes": final["VmHWM"],
        "peak_anon_bytes": anon.peak,
        "baseline_rss_bytes": baseline["VmRSS"],
        "baseline_anon_bytes": baseline["RssAnon"],
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors")),
    }


def run_worker(mode: str, method: str, pre: Path, sources: list[Path], out: Path, threads: int) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--method",
        method,
        "--pretrained",
        str(pre),
        "--output",
        str(out),
        "--threads",
        str(threads),
        "--sources",
        *map(str, sources),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def outputs_equal(mode_a: Path, mode_b: Path) -> bool:
    from distac.checkpoints import load_state_dict

    a, b = load_state_dict(mode_a), load_state_dict(mode_b)
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    rows: list[dict[str, Any]] = []
    scratch = Path(tempfile.mkdtemp(prefix="distac-bench-streaming-", dir=args.scratch))
    started = time.perf_counter()
    runs = [(size, tasks, method) for size in args.sizes for tasks in args.tasks for method in args.methods]
    for spec in args.extra:
        method, size, tasks = spec.split(":")
        if size in args.sizes:
            runs.append((size, int(tasks), method))
    try:
        for size in args.sizes:
            root = scratch / size
            t0 = time.perf_counter()
            wanted = max(t for s, t, _ in runs if s == size)
            pre, sources = write_checkpoints(root, size, wanted, args.seed)
            numel = sum(torch.Size(s).numel() for s in bert_shapes(size).values())
            print(
                f"{size}: {numel / 1e6:.1f}M parameters, {wanted + 1} checkpoints written in "
                f"{time.perf_counter() - t0:.1f}s",
                flush=True,
            )
            for _, tasks, method in [r for r in runs if r[0] == size]:
                outputs = {}
                for mode in ("in_memory", "streaming"):
                    outputs[mode] = scratch / f"out-{mode}"
                    row = run_worker(mode, method, pre, sources[:tasks], outputs[mode], args.threads)
                    row.update(size=size, num_parameters=numel, model_bytes=numel * 4, tasks=tasks)
                    rows.append(row)
                    print(
                        f"  T={tasks} {method:16s} {mode:9s} {row['seconds']:7.1f}s  peak RSS "
                        f"{row['peak_rss_bytes'] / 2**30:5.2f} GiB  peak anon {row['peak_anon_bytes'] / 2**30:5.2f}"
                        " GiB",
                        flush=True,
                    )
                # outside the measured workers: both modes must have written the same weights, bit for bit
                equal = outputs_equal(outputs["in_memory"], outputs["streaming"])
                rows[-1]["bit_identical_to_in_memory"] = equal
                print(f"  outputs bit-identical: {equal}", flush=True)
                for path in outputs.values():
                    shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "benchmark": "peak memory of streaming vs in-memory distac merge, BERT-like random checkpoints",
        "note": "random checkpoints: memory and time depend only on shapes, T and hardware; no accuracy is reported",
        "model_shapes": {
            size: f"transformers.BertModel(BertConfig(vocab_size=30522, {cfg}))"
            for size, cfg in SIZES.items()
            if size in args.sizes
        },
        "storage": f"float32 sharded safetensors, {SHARD_BYTES // 1000**2} MB shards, page cache warm",
        "noise_std": NOISE,
        "coefficient": 0.3,
        "seed": args.seed,
        "torch_threads": args.threads,
        "total_seconds": time.perf_counter() - started,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "distac": distac.__version__,
            "load_average_at_end": list(os.getloadavg()),
        },
        "results": rows,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_markdown(report: dict[str, Any], path: Path) -> None:
    gib = 2**30
    machine = report["machine"]
    lines = [
        "# Streaming merge benchmark (cpu)",
        "",
        "Peak memory and wall time of `distac merge` in memory vs `--streaming`, on random checkpoints with "
        "the parameter shapes of `transformers.BertModel` (float32, sharded safetensors). Each run is a fresh "
        "process; both modes write the same sharded output.",
        "",
        "**Random checkpoints: memory and time depend only on the shapes, T and the hardware; no accuracy is "
        "reported or implied.**",
        "",
        "| model | params | T | method | mode | wall (s) | peak RSS (GiB) | peak anon (GiB) | anon extra / model |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        extra = (row["peak_anon_bytes"] - row["baseline_anon_bytes"]) / row["model_bytes"]
        lines.append(
            f"| {row['size']} | {row['num_parameters'] / 1e6:.1f}M | {row['tasks']} | {row['method']} | "
            f"{row['mode']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / gib:.2f} | "
            f"{row['peak_anon_bytes'] / gib:.2f} | {extra:.2f}x |"
        )
    lines += [
        "",
        "- peak RSS: `VmHWM` of the worker process at the end (everything resident at the peak, including the "
        "imported libraries and file pages mapped while reading safetensors).",
        "- peak anon: the peak of `RssAnon` sampled every 5 ms (tensors and heap only).",
        "- anon extra / model: (peak anon - anon after imports) / size of one float32 model. The in-memory "
        "path holds theta_pre, T task vectors and the merged model, so it grows with T; streaming holds "
        "a few tensors of each key (the 30522 x H word-embedding matrix is the largest here), whatever the model "
        "size and T x model size. That matrix is 54 % of the small model (15.6M of 28.8M parameters) and 21 % of "
        "base, which is why streaming's ratio is larger for small: its working set is T such tensors (plus TIES's "
        "temporaries), not a fraction of the model.",
        f"- baseline after imports (torch, transformers, distac): ~"
        f"{report['results'][0]['baseline_rss_bytes'] / gib:.2f} GiB RSS in every worker.",
        f"- storage: {report['storage']}; coefficient {report['coefficient']}; noise std {report['noise_std']}.",
        "- outputs of the two modes bit-identical (compared after each pair, outside the measured workers): "
        + (
            "yes, every pair"
            if all(r.get("bit_identical_to_in_memory", True) for r in report["results"])
            else "**NO** for some pairs, see the JSON"
        ),
    ]
    lines += [
        "",
        "## Machine",
        "",
        f"- platform: {machine['platform']} ({machine['processor']})",
        f"- CPU count: {machine['cpu_count']} (torch threads per worker: {report['torch_threads']}); memory "
        f"{machine['memory_total_bytes'] / gib:.1f} GiB",
        f"- Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"distac {machine['distac']}",
        f"- seed: {report['seed']}; total benchmark time {report['total_seconds']:.0f} s wall (checkpoint "
        "generation included); load average at the end: "
        f"{[round(x, 2) for x in machine['load_average_at_end']]}",
        f"- date (UTC): {report['date_utc']}",
        "",
        "The machine was not reserved for this run (other work shared its 2 cores), so wall times are indicative; "
        "single runs, no repetitions. Memory peaks do not depend on the load.",
        "",
        "Reproduce: `PYTHONPATH=src python benchmarks/bench_streaming.py`",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=["task_arithmetic"], help="run for every size and T")
    parser.add_argument(
        "--extra",
        nargs="*",
        default=["ties:small:2"],
        help="additional method:size:T runs (TIES is compute-bound: ~20 s per M parameters x T on 2 cores)",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", type=Path, default=None, help="where the checkpoints are written (default: tmp)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["in_memory", "streaming"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--sources", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "streaming_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out_dir / "streaming_cpu.md")
    print(f"wrote {args.out_dir / 'streaming_cpu'}.json and .md")


if __name__ == "__main__":
    main()
