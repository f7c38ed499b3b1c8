"""``distac evaluate`` and ``distac calibrate``."""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import DATA_ROOT_OPTION, DEVICE_OPTION, console, print_table


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        models: list[Path] = typer.Argument(..., help="distac model directories (merged or individual)."),
        split: str = typer.Option("test", help="train, validation or test."),
        examples: int | None = typer.Option(None, help="Evaluate at most this many examples per task."),
        individual: list[Path] = typer.Option(
            [], "--individual", help="Individual fine-tuned models, same order, for normalized accuracy."
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Write evaluation.json/.md and reliability plots."
        ),
        uncalibrated: bool = typer.Option(
            False, "--uncalibrated", help="Ignore a temperature stored by distac calibrate (calibration.json)."
        ),
        device: str = DEVICE_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Accuracy (MCC for CoLA), normalized accuracy, entropy and ECE per task and averaged; a model
        with a temperature from distac calibrate is scored with it (column T)."""
        from distac.evaluation.evaluate import evaluate_paths

        if output is not None:
            from distac.checkpoints import check_output_path

            check_output_path(output)
        table = evaluate_paths(
            models,
            individual or None,
            split=split,
            examples=examples,
            device=device,
            data_root=data_root,
            output=output,
            use_temperature=not uncalibrated,
        )
        keys = ["model", "task", "score", "normalized", "temperature", "entropy", "ece", "n"]
        rows = [[r.get(k, "-") for k in keys] for r in table["rows"]]
        rows.append(
            [
                "average",
                "",
                table["average"]["score"],
                table["average"].get("normalized", "-"),
                "",
                table["average"]["entropy"],
                table["average"]["ece"],
                "",
            ]
        )
        columns = ["model", "task", "score", "normalized", "T", "entropy", "ECE", "n"]
        print_table(f"evaluation ({split})", columns, rows)

    @app.command("calibrate")
    def calibrate_command(
        model: Path = typer.Argument(..., help="distac model directory (e.g. a merged model for one task)."),
        examples: int | None = typer.Option(None, help="Use at most this many validation / test examples."),
        device: str = DEVICE_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Temperature scaling on validation data; reports ECE before/after and stores the temperature."""
        from distac.evaluation.evaluate import calibrate_path

        report = calibrate_path(model, examples=examples, device=device, data_root=data_root)
        before, after = report["before"], report["after"]
        print_table(
            f"temperature scaling: T = {report['temperature']:.3f}",
            ["", "accuracy", "ECE", "NLL", "entropy"],
            [
                ["before", before["accuracy"], before["ece"], before["nll"], before["entropy"]],
                ["after", after["accuracy"], after["ece"], after["nll"], after["entropy"]],
            ],
        )
        console.print(f"temperature saved to {model}/calibration.json; distac evaluate applies it from now on")
