"""``distac diagnose``: find the sources that will break a merge (long task vectors, low confidence)."""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import (
    DATA_ROOT_OPTION,
    DEVICE_OPTION,
    console,
    expand_model_dirs,
    report_directory,
    require_distinct_sources,
)


def register(app: typer.Typer) -> None:
    @app.command("diagnose")
    def diagnose_command(
        sources: list[Path] = typer.Argument(
            ...,
            help="distac model directories (distac finetune outputs); a distac merge output stands for its "
            "per-task models.",
        ),
        output: Path | None = typer.Option(
            None,
            "--output",
            "-o",
            help="Write diagnosis.json/.md/.png into this directory (written atomically; a later run may replace it).",
        ),
        examples: int = typer.Option(200, help="Held-out examples per task for entropy / ECE."),
        split: str = typer.Option("validation", help="Split used for entropy / ECE: validation or test."),
        long_threshold: float = typer.Option(1.5, help="Flag a source whose norm exceeds this x the others' mean."),
        underconfidence: float = typer.Option(
            0.1, help="Flag low confidence when accuracy minus mean max-probability exceeds this."
        ),
        entropy_ratio: float = typer.Option(
            3.0,
            help="Also flag low confidence when normalized entropy is above --entropy-threshold and this x the "
            "others' median (label-smoothed or mixup sources among normal ones); 0 turns it off.",
        ),
        entropy_threshold: float = typer.Option(0.3, help="Normalized-entropy floor for --entropy-ratio."),
        device: str = DEVICE_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Report task-vector norms, disparity, cosine similarity, entropy and ECE; flag and recommend."""
        from distac.conditioning.diagnose import SourceModel, diagnose
        from distac.data import load_model_task
        from distac.models import build_model, load_model
        from distac.models.registry import backbone_state, check_same_backbone

        if output is not None:
            from distac.checkpoints import check_output_path

            check_output_path(output, sources)  # the report directory replaces the output: never an input
        if examples < 1:
            raise typer.BadParameter(f"--examples must be at least 1, got {examples}")
        sources = expand_model_dirs(sources)
        require_distinct_sources(sources)  # a duplicate would count twice in the norm disparity and the flags
        models = [load_model(p) for p in sources]
        check_same_backbone({str(p): m for p, m in zip(sources, models, strict=True)})
        pretrained = backbone_state(build_model(models[0].spec))
        items = [
            SourceModel(p.name, m, load_model_task(m.spec, data_root, default=p.name))
            for p, m in zip(sources, models, strict=True)
        ]
        for path, item in zip(sources, items, strict=True):
            item.model.check_task(item.task, split, model_source=path)
        report = diagnose(
            pretrained,
            items,
            num_examples=examples,
            split=split,
            long_threshold=long_threshold,
            entropy_threshold=entropy_threshold,
            entropy_ratio=entropy_ratio,
            underconfidence_threshold=underconfidence,
            device=device,
        )
        console.print(report.markdown())
        with report_directory(output) as directory:
            if directory is not None:
                report.write(directory)
        if output is not None:
            console.print(f"wrote {output}/diagnosis.json, diagnosis.md, diagnosis.png")
