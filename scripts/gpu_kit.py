"""Pack what a GPU run needs into ``.device/`` (git-ignored), within the device tool's 64 MiB carry.

The GPU machine has torch, transformers, timm, accelerate, typer, rich, pyyaml and matplotlib, but
neither ``../shared`` nor the backbone packages. This copies all-MiniLM-L6-v2 with its weights
stored in float16 (43 MiB; distac loads them back as float32) and the text tasks of the GPU
experiment. Then, on the device: ``bash scripts/gpu_run.sh`` with ``carry: [".device"]``.

    python scripts/gpu_kit.py            # -> .device/minilm, .device/data/text/<task>
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from distac.data.shared import default_data_root
from distac.models.text import resolve_named_backbone

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("sst2", "agnews_small", "trec", "snli_small")  # text-zeroshot's and text-confident's
LIMIT_MIB = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".device")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    minilm = Path(resolve_named_backbone("all-MiniLM-L6-v2"))
    target = args.out / "minilm"
    target.mkdir(parents=True)
    for file in minilm.iterdir():
        if file.is_file() and file.suffix in {".json", ".txt"}:
            shutil.copyfile(file, target / file.name)
    weights = load_file(minilm / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()}, target / "model.safetensors", {"format": "pt"})

    data_root = args.data_root or default_data_root()
    for task in args.tasks:
        shutil.copytree(Path(data_root) / "text" / task, args.out / "data" / "text" / task)
    summary = Path(data_root) / "text" / "SUMMARY.json"
    if summary.is_file():
        shutil.copyfile(summary, args.out / "data" / "text" / summary.name)

    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 2**20
    print(f"{args.out}: {size:.1f} MiB (device carry limit {LIMIT_MIB} MiB, with the working tree)")
    if size > LIMIT_MIB - 8:
        raise SystemExit(f"{args.out} is {size:.1f} MiB: too close to the {LIMIT_MIB} MiB carry limit")


if __name__ == "__main__":
    main()
