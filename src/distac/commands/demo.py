"""``distac demo``: the README's first command. A real, small DisTaC pipeline on CPU in minutes.

all-MiniLM-L6-v2 is fine-tuned on four real text tasks; the SST-2 source gets a 10x learning rate
(norm mismatch). The demo diagnoses the sources, conditions the long one with DisTaC, merges
before and after with several methods and prints the comparison table.
"""

from __future__ import annotations

from pathlib import Path

import typer

from distac.commands.common import DATA_ROOT_OPTION, EXPERIMENT_SET_OPTION, console, echo, print_table


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="Working directory (resumable)."),
        overrides: list[str] = EXPERIMENT_SET_OPTION,
        data_root: Path | None = DATA_ROOT_OPTION,
    ) -> None:
        """Diagnose -> condition -> merge -> evaluate on real MiniLM text tasks; prints the table."""
        import time

        from distac.experiments.config import load_experiment
        from distac.experiments.pipeline import ExperimentRunner
        from distac.experiments.report import write_report

        start = time.perf_counter()
        config = load_experiment("demo", overrides)
        runner = ExperimentRunner(config, run_dir, data_root=data_root, echo=echo)
        runner.open_run_dir()  # before the sources: a resumed demo with other settings is refused
        console.rule("1. fine-tune sources (one with a 10x learning rate)")
        spec = config.scenarios["norm_mismatch"]
        long_task = (spec.get("long_tasks") or config.tasks)[0]
        recipes = {
            t: (spec.get("long_recipe", "lr_x10") if t == long_task else spec.get("recipe", "base"))
            for t in config.tasks
        }
        sources = {t: runner.ensure_source(r, t) for t, r in recipes.items()}
        console.rule("2. diagnose")
        _diagnose(runner, sources)
        console.rule("3-4. condition with DisTaC, merge, evaluate")
        results = runner.run()
        report = write_report(run_dir)
        _print_summary(results)
        console.print(f"demo finished in {time.perf_counter() - start:.0f} s; full report in {report}")


def _diagnose(runner: object, sources: dict[str, Path]) -> None:
    from distac.conditioning.diagnose import SourceModel, diagnose

    models = {t: runner.load(p) for t, p in sources.items()}  # type: ignore[attr-defined]
    report = diagnose(
        runner.pretrained_backbone(),  # type: ignore[attr-defined]
        [SourceModel(t, m, runner.task_data(t)) for t, m in models.items()],  # type: ignore[attr-defined]
        num_examples=100,
    )
    rows = [
        [s["name"], s["norm"], s.get("entropy"), s.get("ece"), ", ".join(s.get("flags", [])) or "-"]
        for s in report.to_json()["sources"]
    ]
    print_table("source diagnosis", ["source", "||tau||", "entropy", "ECE", "flags"], rows)


def _print_summary(results: dict) -> None:
    """Merged test score averaged over the tasks, absolute (normalized to the fine-tuned models), %."""
    from distac.experiments.report import METHOD_LABELS

    def cell(scenario: str, variant: str, method: str) -> str:
        entry = results["scenarios"].get(scenario, {}).get("average", {}).get(variant, {}).get(method)
        if not entry:
            return "-"
        return f"{100 * entry['absolute']:.1f} ({100 * entry['normalized']:.1f})"

    rows = [[label, cell("original", "plain", key), cell("norm_mismatch", "plain", key), "-"]
            for key, label in (("pretrained", "pretrained"), ("individual", "individual (fine-tuned)"))]  # fmt: skip
    for method in results["config"]["methods"]:
        rows.append(
            [
                METHOD_LABELS.get(method, method),
                cell("original", "plain", method),
                cell("norm_mismatch", "plain", method),
                cell("norm_mismatch", "distac", method),
            ]
        )
    print_table(
        "merged test score, absolute (normalized) %",
        ["method", "all sources normal", "one source 10x lr", "... + DisTaC"],
        rows,
    )
