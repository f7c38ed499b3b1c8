"""``distac experiment NAME``: run one of the paper's experiments as a resumable pipeline.

``distac seeds RUN_DIR...``: aggregate one experiment's runs over seeds.
"""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import DATA_ROOT_OPTION, EXPERIMENT_SET_OPTION, console, echo


def register(app: typer.Typer) -> None:
    @app.command("experiment")
    def experiment(
        name: str | None = typer.Argument(
            None,
            help="Experiment config: a bundled name (see --list: demo, text8, vision, ...) or a YAML path.",
            show_default=False,
        ),
        run_dir: Path | None = typer.Option(
            None, "--run-dir", help="Where stages are cached (default runs/<name>); rerun to resume."
        ),
        results_dir: Path | None = typer.Option(
            None, "--results-dir", help="Also copy results.json, table1.md and plots here (e.g. results/<name>)."
        ),
        scenario: list[str] = typer.Option(
            [], "--scenario", help="Run only these scenarios (repeatable; default: all in the config)."
        ),
        study: list[str] = typer.Option(
            [], "--study", help="Run only these studies (repeatable; 'none' for none; default: all in the config)."
        ),
        overrides: list[str] = EXPERIMENT_SET_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
        list_only: bool = typer.Option(False, "--list", help="List the bundled experiments and exit."),
    ) -> None:
        """Fine-tune sources, condition them with DisTaC, merge with every method, and tabulate (Table 1)."""
        from distac.experiments.config import available_experiments, load_experiment
        from distac.experiments.pipeline import ExperimentRunner
        from distac.experiments.report import write_report

        if list_only:
            console.print("\n".join(available_experiments()))
            return
        if name is None:
            raise typer.BadParameter(
                "name an experiment (bundled: " + ", ".join(available_experiments()) + ") or a YAML path",
                param_hint="'NAME'",
            )
        config = load_experiment(name, overrides)
        run_dir = run_dir or Path("runs") / config.name
        runner = ExperimentRunner(config, run_dir, data_root=data_root, echo=echo)
        studies = None if not study else [s for s in study if s != "none"]
        runner.run(scenario or None, studies)
        report = write_report(run_dir)
        console.print(report.read_text().split("\n\n")[1])
        if results_dir is not None:
            from distac.atomic import atomic_copy

            results_dir.mkdir(parents=True, exist_ok=True)
            for file in (
                "results.json",
                "table1.md",
                "table1.png",
                "conditioning_history.png",
                "scale_curve.png",
                "label_smoothing_sweep.png",
            ):
                if (run_dir / file).is_file():
                    atomic_copy(run_dir / file, results_dir / file)
            console.print(f"results copied to {results_dir}")

    @app.command("seeds")
    def seeds(
        run_dirs: list[Path] = typer.Argument(..., help="Run dirs of one experiment at different seeds."),
        out: Path = typer.Option(..., "--out", help="Where seeds.json and seeds.md go (e.g. results/<name>)."),
    ) -> None:
        """Aggregate an experiment over seeds: each Table 1 cell's mean ± sd, and each effect per seed."""
        from distac.experiments.seeds import write_seed_report

        path = write_seed_report(list(run_dirs), out)
        console.print(path.read_text(), markup=False, soft_wrap=True)
