"""Does the confidence a DisTaC student gains survive BatchNorm re-estimation (which every merge does)?

For each task of an experiment run directory: test accuracy and mean prediction entropy of the normal
source, the label-smoothed source and the low-confidence DisTaC student(s), once under each model's own
BatchNorm statistics and once after re-estimating them on unlabeled training images, as the merged
evaluations do. Writes a markdown table (results/vision-frozen/entropy.md was made with it).

    python scripts/batchnorm_entropy.py runs/vision-frozen --seed 0 \
        --student "frozen BN=runs/vision-frozen" --student "batch BN=runs/vision-frozen-bnbatch" \
        --out results/vision-frozen/entropy.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from distac.atomic import atomic_write_text
from distac.data import load_task
from distac.evaluation.metrics import accuracy, mean_entropy
from distac.models import load_model
from distac.models.batchnorm import estimation_inputs, recompute_batchnorm_statistics
from distac.models.inference import predict_logits


def accuracy_and_entropy(model, task) -> tuple[float, float]:  # noqa: ANN001
    logits = predict_logits(model, task.test.inputs, device="cpu")
    return accuracy(logits, torch.as_tensor(task.test.labels)), mean_entropy(logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student", action="append", default=[], help="LABEL=RUN_DIR of low-confidence students")
    parser.add_argument("--examples", type=int, default=128, help="images for the re-estimation (the merges' 128)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = json.loads((args.run_dir / "config.json").read_text())
    models = {
        "normal source": args.run_dir / "sources/base",
        "label-smoothed source": args.run_dir / "sources/label_smoothing",
    }
    for item in args.student:
        label, run = item.split("=", 1)
        models[f"LS + DisTaC ({label})"] = Path(run) / "conditioned/low_confidence"
    rows = []
    for task_name in config["tasks"]:
        task = load_task(task_name).limit(**config["limits"], seed=args.seed)
        for label, folder in models.items():
            path = folder / task_name if "source" in label else folder / f"label_smoothing-{task_name}"
            model = load_model(path)
            own = accuracy_and_entropy(model, task)
            recompute_batchnorm_statistics(
                model, estimation_inputs(task.train.inputs, args.examples, args.seed), device="cpu"
            )
            fresh = accuracy_and_entropy(model, task)
            rows.append((task_name, label, *own, *fresh))
            print(task_name, label, own, fresh, flush=True)
    lines = [
        f"# Accuracy and entropy, own vs re-estimated BatchNorm statistics ({args.run_dir.name}, seed {args.seed})",
        "",
        "Made with `python scripts/batchnorm_entropy.py` (see its docstring). Re-estimation: "
        f"{args.examples} unlabeled training images, as every merged evaluation does.",
        "",
        "| task | model | accuracy, own statistics | entropy (nats), own | accuracy, re-estimated | entropy, re-est. |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {t} | {m} | {a:.3f} | {e:.3f} | {a2:.3f} | {e2:.3f} |" for t, m, a, e, a2, e2 in rows]
    for label in models:
        mine = [r for r in rows if r[1] == label]
        avg = [sum(r[i] for r in mine) / len(mine) for i in range(2, 6)]
        lines.append(f"| **mean** | {label} | {avg[0]:.3f} | {avg[1]:.3f} | {avg[2]:.3f} | {avg[3]:.3f} |")
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
