"""``distac diagnose``: find the sources that will break a merge (long task vectors, low confidence)."""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import DATA_ROOT_OPTION, DEVICE_OPTION, console, require_distinct_sources


def register(app: typer.Typer) -> None:
    @app.command("diagnose")
    def diagnose_command(
        sources: list[Path] = typer.Argument(..., help="distac model directories (distac finetune outputs)."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Write diagnosis.json/.md/.png here."),
        examples: int = typer.Option(200, help="Held-out examples per task for entropy / ECE."),
        split: str = typer.Option("validation", help="Split used for entropy / ECE: validation or test."),
        long_threshold: float = typer.Option(1.5, help="Flag a source whose norm exceeds this x the others' mean."),
        underconfidence: float = typer.Option(
            0.1, help="Flag low confidence when accuracy minus mean max-probability exceeds this."
        ),
        entropy_ratio: float | None = typer.Option(
            None, help="Also flag normalized entropy above --entropy-threshold and this x the others' median."
        ),
        entropy_threshold: float = typer.Option(0.3, help="Normalized-entropy floor for --entropy-ratio."),
        device: str = DEVICE_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Report task-vector norms, disparity, cosine similarity, entropy and ECE; flag and recommend."""
        from distac.conditioning.diagnose import SourceModel, diagnose
        from distac.data import load_task
        from distac.models import build_model, load_model
        from distac.models.registry import backbone_state, check_same_backbone

        if output is not None:
            from distac.checkpoints import check_output_path

            check_output_path(output)
        if examples < 1:
            raise typer.BadParameter(f"--examples must be at least 1, got {examples}")
        require_distinct_sources(sources)  # a duplicate would count twice in the norm disparity and the flags
        models = [load_model(p) for p in sources]
        check_same_backbone({str(p): m for p, m in zip(sources, models, strict=True)})
        pretrained = backbone_state(build_model(models[0].spec))
        items = [
            SourceModel(p.name, m, load_task(m.spec.task or p.name, data_root))
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
        if output is not None:
            report.write(output)
            console.print(f"wrote {output}/diagnosis.json, diagnosis.md, diagnosis.png")
