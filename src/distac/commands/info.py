"""``distac tasks`` / ``distac task-vector`` / ``distac inspect``: look at data and checkpoints."""

from __future__ import annotations

from pathlib import Path

import typer

from distac.atomic import atomic_write_json
from distac.commands.common import DATA_ROOT_OPTION, console, print_table


def register(app: typer.Typer) -> None:
    @app.command("tasks")
    def tasks(data_root: Path | None = DATA_ROOT_OPTION) -> None:
        """List the real tasks found in the data directory with their split sizes."""
        from distac.data import available_tasks, default_data_root, load_task
        from distac.errors import DataError

        root = data_root or default_data_root()
        if not root.is_dir():
            raise DataError(f"{root}: no such data directory")
        rows, problems = [], []
        for name in available_tasks(root):
            try:
                s = load_task(name, root).summary()
            except DataError as error:  # one unreadable folder must not hide the other tasks
                problems.append(f"{name}: {error}")
                continue
            rows.append([name, s["kind"], s["classes"], s["metric"], s["train"], s["validation"], s["test"]])
        print_table("tasks", ["task", "kind", "classes", "metric", "train", "validation", "test"], rows)
        for problem in problems:
            console.print(f"not a usable dataset: {problem}", markup=False)

    @app.command("inspect")
    def inspect(
        checkpoint: Path = typer.Argument(..., help="Model directory, .safetensors, or torch state dict."),
    ) -> None:
        """Show the tensors of a checkpoint (shapes and dtypes) without loading the weights."""
        from distac.checkpoints import human_bytes, open_checkpoint

        reader = open_checkpoint(checkpoint)
        shapes = reader.shapes()
        total = 0
        rows = []
        for key, (shape, dtype) in shapes.items():
            numel = 1
            for d in shape:
                numel *= d
            total += numel
            rows.append([key, "x".join(map(str, shape)) or "scalar", dtype.replace("torch.", ""), numel])
        print_table(
            f"{checkpoint} ({reader.kind}, {len(rows)} tensors)", ["name", "shape", "dtype", "numel"], rows[:200]
        )
        console.print(f"total parameters: {total:,} ({human_bytes(total * 4)} as float32)")

    @app.command("task-vector")
    def task_vector(
        pretrained: Path = typer.Argument(
            ..., help="Pretrained checkpoint (theta_pre), or a bundled backbone's name (all-MiniLM-L6-v2)."
        ),
        finetuned: Path = typer.Argument(..., help="Fine-tuned checkpoint (theta_t) or distac model directory."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Save tau as a safetensors directory."),
        include: list[str] = typer.Option([], "--include", help="Glob of parameters to include (repeatable)."),
        exclude: list[str] = typer.Option(
            [], "--exclude", help="Glob of parameters to exclude (repeatable), besides heads and BN statistics."
        ),
        json_out: Path | None = typer.Option(None, "--json", help="Write norms to this JSON file."),
        top: int = typer.Option(15, help="Show the layers with the largest update norms."),
    ) -> None:
        """Compute tau = finetuned - pretrained; print its global and per-layer norms."""
        from distac.checkpoints import check_output_path
        from distac.task_vectors import ParameterSelector, TaskVector

        if output is not None:
            check_output_path(output, [pretrained, finetuned])
        if json_out is not None:
            check_output_path(json_out, [pretrained, finetuned], kind="file")
        from distac.models.text import resolve_named_backbone

        if not pretrained.exists():  # the name `finetune --backbone` takes, for the backbone shipped in a package
            pretrained = Path(resolve_named_backbone(str(pretrained)))
        selector = ParameterSelector.from_patterns(include, exclude)
        tv = TaskVector.from_checkpoints(pretrained, finetuned, selector)
        layers = tv.layer_norms()
        console.print(
            f"task vector over {len(tv.deltas)} tensors, {tv.numel():,} parameters; ||tau|| = {tv.norm():.6g}"
        )
        largest = sorted(layers.items(), key=lambda kv: -kv[1])[:top]
        print_table("largest per-layer norms", ["layer", "norm"], [[k, v] for k, v in largest])
        if output is not None:
            tv.save(output)
            console.print(f"saved task vector to {output}")
        if json_out is not None:
            atomic_write_json(
                json_out,
                {
                    "norm": tv.norm(),
                    "numel": tv.numel(),
                    "layer_norms": layers,
                    "parameter_norms": tv.parameter_norms(),
                },
            )
