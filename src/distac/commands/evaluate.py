"""``distac evaluate`` and ``distac calibrate``."""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import (
    DATA_ROOT_OPTION,
    DEVICE_OPTION,
    console,
    expand_model_dirs,
    print_table,
    report_directory,
)

#: ``distac calibrate --help``, one line per paragraph (the help keeps the text's line breaks). It says where
#: the result goes, since there is no -o: the model directory itself is changed.
CALIBRATE_HELP = (
    "Temperature scaling: fit a temperature on the validation split, report accuracy, ECE, NLL and entropy on "
    "the test split before and after it, and store it in MODEL/calibration.json."
    "\n\nThe model directory is changed in place (there is no -o): calibration.json is written into it, "
    "replacing an earlier one, and distac evaluate applies that temperature from then on (--uncalibrated "
    "ignores it; delete the file to undo). A distac merge output folder has each of its per-task models "
    "calibrated."
)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        models: list[Path] = typer.Argument(
            ...,
            help="distac model directories (fine-tuned or merged). A distac merge output folder stands for its "
            "per-task models (OUTPUT/<task>/), in the order of the merge's sources.",
        ),
        split: str = typer.Option("test", help="train, validation or test."),
        examples: int | None = typer.Option(None, help="Evaluate at most this many examples per task."),
        individual: list[Path] = typer.Option(
            [],
            "--individual",
            help="The individual fine-tuned model of each evaluated model, in the same order, for normalized "
            "accuracy. Give the option once per model: --individual A --individual B (in --individual A B, "
            "B is taken as one more model to evaluate).",
        ),
        output: Path | None = typer.Option(
            None,
            "--output",
            "-o",
            help="Write evaluation.json/.md and reliability plots into this directory (written atomically; a "
            "later run may replace it).",
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

            # the report directory replaces the output: never over a model it reads
            check_output_path(output, [*models, *individual])
        models = expand_model_dirs(models)
        with report_directory(output) as directory:  # written only once every model was evaluated
            table = evaluate_paths(
                models,
                individual or None,
                split=split,
                examples=examples,
                device=device,
                data_root=data_root,
                output=directory,
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

    @app.command("calibrate", help=CALIBRATE_HELP)
    def calibrate_command(
        model: Path = typer.Argument(
            ...,
            help="distac model directory (e.g. a merged model for one task); a distac merge output folder "
            "calibrates each of its per-task models.",
        ),
        examples: int | None = typer.Option(None, help="Use at most this many validation / test examples."),
        device: str = DEVICE_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Fit a temperature on validation, report test before/after, store it in the model (CALIBRATE_HELP)."""
        from distac.evaluation.evaluate import calibrate_path

        for path in expand_model_dirs([model]):
            report = calibrate_path(path, examples=examples, device=device, data_root=data_root)
            before, after = report["before"], report["after"]
            print_table(
                f"{path.name}: temperature scaling, T = {report['temperature']:.3f} (fitted on validation, "
                "scored on test)",
                ["test split", "accuracy", "ECE", "NLL", "entropy"],
                [
                    ["before (test)", before["accuracy"], before["ece"], before["nll"], before["entropy"]],
                    ["after (test)", after["accuracy"], after["ece"], after["nll"], after["entropy"]],
                ],
            )
            console.print(
                f"temperature saved to {path}/calibration.json; distac evaluate applies it from now on",
                markup=False,
            )
