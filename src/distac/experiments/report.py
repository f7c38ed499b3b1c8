"""Tables and plots from a pipeline's ``results.json`` (Table 1 analog, Figure 2 analog)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from statistics import fmean, geometric_mean
from typing import Any

from distac.atomic import atomic_write_text, atomic_write_with, visible
from distac.experiments.config import study_kind

METHOD_LABELS = {
    "average": "Weight averaging",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "consensus_ta": "Consensus TA",
    "tall_masks": "TALL masks",
    "emr": "EMR",
    "tsvm": "TSVM",
    "iso_c": "Iso-C",
    "iso_cts": "Iso-CTS",
    "wudi": "WUDI",
}
SCENARIO_LABELS = {
    "original": "Original",
    "norm_mismatch": "Norm mismatch",
    "low_confidence": "Low confidence",
    "mixup": "Mixup",
    "focal": "Focal loss",
}


#: Paper Table 1 (CLIP ViT-B/32, absolute accuracy %, ../shared/REFERENCE.md):
#: (original, norm mismatch, norm mismatch + DisTaC, low confidence, low confidence + DisTaC)
PAPER_TABLE1_VIT_B32: dict[str, tuple[float, float, float, float, float]] = {
    "task_arithmetic": (70.4, 63.6, 70.0, 51.0, 63.6),
    "ties": (74.0, 59.1, 73.1, 54.5, 68.7),
    "consensus_ta": (74.8, 68.8, 73.7, 54.6, 67.7),
    "emr": (88.5, 80.0, 88.1, 39.2, 70.3),
    "tsvm": (83.3, 72.2, 82.9, 60.7, 81.5),
    "iso_cts": (81.0, 78.1, 80.3, 72.5, 69.0),
    "wudi": (85.5, 49.2, 84.4, 38.0, 73.8),
}


def merged_score(results: dict[str, Any], scenario: str, variant: str, row: str) -> float | None:
    """Task-averaged absolute test score, in %, of ``row`` (a method, ``individual`` or ``pretrained``) in
    ``variant`` (``plain``, ``distac``, ``scaling_alone``) of ``scenario``; None where it was not run."""
    entry = results["scenarios"].get(scenario, {}).get("average", {}).get(variant, {}).get(row)
    return None if not entry or "absolute" not in entry else 100 * entry["absolute"]


def paper_comparison_markdown(results: dict[str, Any]) -> str:
    """Our effects next to the paper's, in absolute points: how much each failure mode costs a
    merge (vs original) and how much DisTaC gives back. Scales differ, so compare signs and sizes,
    not levels. ✓: the sign agrees with the paper's; ✗: it does not; ≈: our effect is smaller than
    the noise band (:func:`noise_band_points`), so it shows no measurable effect either way.
    Empty when the run has none of these effects (e.g. only a custom scenario), rather than a table of dashes."""
    band = noise_band_points(results)

    score = partial(merged_score, results)  # (scenario, variant, method) -> % or None

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def agree(ours: float | None, paper: float) -> str:
        if ours is None:
            return "-"
        if abs(ours) < band:
            return f"{ours:+.1f} ≈"
        return f"{ours:+.1f} {'✓' if (ours > 0) == (paper > 0) else '✗'}"

    lines = [
        "### Effects next to the paper's (ViT-B/32 Table 1), absolute points",
        "",
        "| method | NM drop: paper | ours | DisTaC gain on NM: paper | ours "
        "| LC drop: paper | ours | DisTaC gain on LC: paper | ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured = False
    for method in results["config"]["methods"]:
        if method not in PAPER_TABLE1_VIT_B32:
            continue
        p_orig, p_nm, p_nm_d, p_lc, p_lc_d = PAPER_TABLE1_VIT_B32[method]
        orig = score("original", "plain", method)
        nm, nm_d = score("norm_mismatch", "plain", method), score("norm_mismatch", "distac", method)
        lc, lc_d = score("low_confidence", "plain", method), score("low_confidence", "distac", method)
        effects = (diff(nm, orig), diff(nm_d, nm), diff(lc, orig), diff(lc_d, lc))
        measured = measured or any(e is not None for e in effects)
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} | {p_nm - p_orig:+.1f} | {agree(diff(nm, orig), p_nm - p_orig)} "
            f"| {p_nm_d - p_nm:+.1f} | {agree(diff(nm_d, nm), p_nm_d - p_nm)} "
            f"| {p_lc - p_orig:+.1f} | {agree(diff(lc, orig), p_lc - p_orig)} "
            f"| {p_lc_d - p_lc:+.1f} | {agree(diff(lc_d, lc), p_lc_d - p_lc)} |"
        )
    if not measured:
        return ""
    lines += [
        "",
        f"✓ / ✗: our effect has the paper's sign / the opposite sign. ≈: smaller than {band:.1f} points, one "
        "standard error of a difference between two merged averages on these test sets (binomial, p = 0.5), "
        "so no measurable effect.",
    ]
    return "\n".join(lines) + "\n"


def noise_band_points(results: dict[str, Any]) -> float:
    """One standard error, in points, of the difference between two task-averaged test scores:
    sqrt(2) * sqrt(sum_t 0.25 / n_t) / T, the binomial worst case (p = 0.5) with n_t test examples per
    task, treating the two merges as independent (conservative: merges of the same test inputs are
    correlated). Effects below it are not distinguishable from test-set noise."""
    sizes: list[int] = []
    for scenario in results["scenarios"].values():
        tests = scenario.get("average", {}).get("plain", {}).get("individual", {}).get("test", {})
        sizes = [int(entry["n"]) for entry in tests.values() if entry.get("n")]
        if sizes:
            break
    if not sizes:
        return 0.0
    return 100 * math.sqrt(2 * sum(0.25 / n for n in sizes)) / len(sizes)


def _stage_seconds_line(stages: dict[str, float] | None) -> str:
    if not stages:
        return ""
    total = sum(stages.values())
    parts = ", ".join(f"{name.replace('_', ' ')} {seconds / 60:.1f}" for name, seconds in stages.items())
    return f"Compute in the cached stages (all runs that made them): {total / 60:.1f} min ({parts} min).\n"


def is_defined(value: Any) -> bool:
    """Whether ``value`` is a number: an undefined score (a normalized accuracy whose individual reference
    is <= 0, the spread of one seed) is NaN in memory and ``null`` once read back from JSON."""
    return isinstance(value, int | float) and value == value


def _number(value: Any, spec: str, scale: float = 1.0) -> str:
    """``value`` formatted, or ``n/a`` where it is undefined (:func:`is_defined`)."""
    return format(scale * value, spec) if is_defined(value) else "n/a"


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or "absolute" not in entry:
        return "-"
    return f"{_number(entry['absolute'], '.1f', 100)} ({_number(entry.get('normalized'), '.1f', 100)})"


def table1_markdown(results: dict[str, Any]) -> str:
    """Rows: pretrained, individual, each method and method + DisTaC; columns: scenarios.
    Cells: absolute accuracy (normalized accuracy), in percent, averaged over tasks."""
    scenarios = list(results["scenarios"])
    methods = results["config"]["methods"]
    header = "| method | " + " | ".join(SCENARIO_LABELS.get(s, s) for s in scenarios) + " |"
    lines = [header, "|---|" + "---|" * len(scenarios)]

    def variant(scenario: str, name: str) -> dict[str, Any]:
        return results["scenarios"][scenario]["average"].get(name, {})

    for row in ("pretrained", "individual"):
        label = "Pretrained (λ = 0, task heads)" if row == "pretrained" else "Individual (fine-tuned)"
        lines.append(f"| {label} | " + " | ".join(_cell(variant(s, "plain").get(row)) for s in scenarios) + " |")
    for method in methods:
        label = METHOD_LABELS.get(method, method)
        lines.append(f"| {label} | " + " | ".join(_cell(variant(s, "plain").get(method)) for s in scenarios) + " |")
        if any(variant(s, "distac") for s in scenarios):
            lines.append(
                f"| {label} + DisTaC | " + " | ".join(_cell(variant(s, "distac").get(method)) for s in scenarios) + " |"
            )
        if any(variant(s, "scaling_alone") for s in scenarios):
            lines.append(
                f"| {label} + scaling only | "
                + " | ".join(_cell(variant(s, "scaling_alone").get(method)) for s in scenarios)
                + " |"
            )
    return "\n".join(lines) + "\n"


CHOICE_VARIANTS = (("plain", ""), ("distac", " + DisTaC"), ("scaling_alone", " + scaling only"))


def choices_markdown(scenario: str, block: dict[str, Any], methods: list[str]) -> str:
    """One row per choice of the long source: how long its task vector was against the others', κ, and
    each method's merged score plain / + DisTaC / + scaling only, then the average over the choices.
    A second table gives the long task's own test score, alone and inside each merge: whether a merge
    kept the long task or gave it up for the others is what the averages hide."""
    choices: dict[str, dict[str, Any]] = block["choices"]
    variants = [(v, suffix) for v, suffix in CHOICE_VARIANTS if any(v in run for run in choices.values())]
    columns = [(m, v, suffix) for m in methods for v, suffix in variants]
    head = " | ".join(f"{METHOD_LABELS.get(m, m)}{suffix}" for m, _, suffix in columns)
    lines = [
        f"### {SCENARIO_LABELS.get(scenario, scenario)}: merged score per choice of the long source, absolute %",
        "",
        f"| long task | ‖τ_long‖ vs others | κ | {head} |",
        "|---|---|---:|" + "---:|" * len(columns),
    ]

    def score(run: dict[str, Any], variant: str, method: str, task: str | None = None) -> str:
        entry = run.get(variant, {}).get(method)
        if not entry or "absolute" not in entry:
            return "-"
        value = entry["absolute"] if task is None else entry.get("test", {}).get(task, {}).get("score")
        return "-" if value is None else f"{100 * value:.1f}"

    for task, run in choices.items():
        norms = run.get("plain", {}).get("norms", {})
        others = [n for t, n in norms.items() if t != task]
        length = f"{norms[task]:.1f} vs {min(others):.1f}-{max(others):.1f}" if task in norms and others else "-"
        kappa = run.get("kappas", {}).get(task)
        cells = " | ".join(score(run, v, m) for m, v, _ in columns)
        lines.append(f"| {task} | {length} | {'-' if kappa is None else f'{kappa:.3f}'} | {cells} |")
    average = " | ".join(score(block["average"], v, m) for m, v, _ in columns)
    lines += [f"| **average** | | | {average} |", ""]

    lines += [
        "Test score of the long task itself, alone and inside each merge, %:",
        "",
        f"| long task | long source alone | {head} |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for task, run in choices.items():
        alone = run.get("plain", {}).get("individual", {}).get("test", {}).get(task, {}).get("score")
        cells = " | ".join(score(run, v, m, task) for m, v, _ in columns)
        lines.append(f"| {task} | {'-' if alone is None else f'{100 * alone:.1f}'} | {cells} |")
    return "\n".join(lines) + "\n"


def per_task_markdown(run: dict[str, Any], title: str) -> str:
    """Per-task test scores of one merge run (``plain`` or ``distac`` block)."""
    tasks = list(run["individual"]["test"])
    lines = [f"### {title}", "", "| method | " + " | ".join(tasks) + " | avg |", "|---|" + "---|" * (len(tasks) + 1)]
    for name, entry in run.items():
        if not isinstance(entry, dict) or "test" not in entry:
            continue
        scores = [100 * entry["test"][t]["score"] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{s:.1f}" for s in scores) + f" | {sum(scores) / len(scores):.1f} |")
    return "\n".join(lines) + "\n"


def merge_runs(scenario: str, block: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Each merge run of one scenario's results block as (label, variant, run): per choice of the long
    source where the scenario has several, else its single (``average``) run."""
    if "choices" in block:
        for choice, run in block["choices"].items():
            for variant in ("plain", "distac", "scaling_alone"):
                if variant in run:
                    yield f"{scenario}, long source {choice}", variant, run[variant]
    else:
        for variant in ("plain", "distac"):
            if variant in block.get("average", {}):
                yield scenario, variant, block["average"][variant]


def calibration_markdown(results: dict[str, Any]) -> str:
    """The merged models' confidence before and after post-merge temperature scaling (the paper's
    recalibration step): per merge, the test means over tasks of entropy, ECE and NLL, the fitted
    temperature (one per task, on validation; geometric mean here) and ECE / NLL under it. Merges
    evaluated before calibration was recorded have no ``calibrated`` rows and are left out."""
    runs = [run for scenario, block in results["scenarios"].items() for run in merge_runs(scenario, block)]
    lines: list[str] = []
    for label, variant, run in runs:
        for method, entry in run.items():
            if method == "pretrained" and variant != "plain":
                continue  # the same model in every variant of a scenario
            rows = list(entry.get("test", {}).values()) if isinstance(entry, dict) else []
            if not rows or not all("calibrated" in r for r in rows):
                continue
            before = {k: fmean(r[k] for r in rows) for k in ("entropy", "ece", "nll")}
            after = {k: fmean(r["calibrated"][k] for r in rows) for k in ("entropy", "ece", "nll")}
            # a scale factor: the geometric mean, so T = 0.2 and T = 5 on two tasks average to 1, not 2.6
            after["temperature"] = geometric_mean(r["calibrated"]["temperature"] for r in rows)
            lines.append(
                f"| {label} | {variant} | {METHOD_LABELS.get(method, method)} | {100 * entry['absolute']:.1f} "
                f"| {before['entropy']:.3f} | {before['ece']:.3f} | {before['nll']:.3f} | {after['temperature']:.2f} "
                f"| {after['entropy']:.3f} | {after['ece']:.3f} | {after['nll']:.3f} |"
            )
    if not lines:
        return ""
    return (
        "\n".join(
            [
                "### Calibration of the merged models: test means over tasks, before and after temperature scaling",
                "",
                "One temperature per task, fitted on the task's validation logits at the chosen coefficient; it "
                "leaves accuracy unchanged.",
                "",
                "| scenario | variant | method | accuracy % | entropy | ECE | NLL | T (geo. mean) | entropy, scaled "
                "| ECE, scaled "
                "| NLL, scaled |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                *lines,
            ]
        )
        + "\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write ``table1.md`` and plots next to ``results.json``; return the markdown path."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    env = results.get("environment", {})
    parts = [
        f"# {results['experiment']}: merged accuracy, absolute (normalized), %",
        "",
        table1_markdown(results),
        paper_comparison_markdown(results),
        f"Backbone `{results['config']['backbone']}`, tasks {', '.join(results['config']['tasks'])}; "
        f"limits {results['config']['limits']}; seed {results['config']['seed']}; "
        f"wall time {_number(results.get('wall_seconds'), '.0f')} s on {env.get('machine')} "
        f"({env.get('cpu_count')} CPUs, CUDA: {env.get('cuda')}); torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, distac {env.get('distac')}.",
        "",
        _stage_seconds_line(results.get("stage_seconds")),
    ]
    for scenario, block in results["scenarios"].items():
        if "choices" in block:
            parts.append(choices_markdown(scenario, block, results["config"]["methods"]))
        for label, variant, run in merge_runs(scenario, block):
            parts.append(per_task_markdown(run, f"{label}, {variant}"))
    calibration = calibration_markdown(results)
    if calibration:
        parts.append(calibration)
    studies = results.get("studies", {})
    if studies.get("label_smoothing_sweep"):
        parts.append(smoothing_sweep_markdown(studies["label_smoothing_sweep"]))
    for name, study in studies.items():
        if study and study_kind(name) == "unlabeled_data":
            parts.append(unlabeled_data_markdown(study))
    path = run_dir / "table1.md"
    atomic_write_text(path, "\n".join(parts))
    plot_table1(results, run_dir / "table1.png")
    plot_condition_histories(run_dir, run_dir / "conditioning_history.png", _scenario_recipes(results))
    curve = studies.get("scale_curve")
    if curve:
        plot_scale_curve(curve, run_dir / "scale_curve.png")
    if studies.get("label_smoothing_sweep"):
        plot_smoothing_sweep(studies["label_smoothing_sweep"], run_dir / "label_smoothing_sweep.png")
    return path


def smoothing_sweep_markdown(sweep: dict[str, Any]) -> str:
    """Figure 4 analog as a table: one row per label-smoothing strength."""
    methods = sweep["methods"]
    head = " | ".join(f"{METHOD_LABELS.get(m, m)} | + DisTaC" for m in methods)
    lines = [
        "### Merged accuracy vs label-smoothing strength (Figure 4 analog), absolute (normalized) %",
        "",
        f"| alpha | source entropy | source ECE | {head} |",
        "|---:|---:|---:|" + "---|---|" * len(methods),
    ]
    for point in sweep["points"]:
        cells = " | ".join(
            f"{_cell(point.get('plain', {}).get(m))} | {_cell(point.get('distac', {}).get(m))}" for m in methods
        )
        lines.append(
            f"| {point['alpha']:g} | {_number(point.get('source_entropy'), '.3f')} | "
            f"{_number(point.get('source_ece'), '.3f')} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def unlabeled_data_markdown(study: dict[str, Any]) -> str:
    """Tables 3-4 analog: the conditioned sources (the long one, or every low-confidence one) conditioned
    on less, or corrupted, unlabeled data."""
    methods = study["methods"]
    if study.get("long_task"):
        what = f"the long source `{study['long_task']}` (κ = {study['kappa']:.3f})"
    else:
        tasks = study.get("conditioned_tasks") or []
        what = f"every `{study.get('scenario')}` source ({len(tasks)}, κ = {study['kappa']:g})"
    lines = [
        f"### Unlabeled data for conditioning {what}; Tables 3-4 analog, absolute (normalized) %",
        "",
        "| variant | unlabeled inputs | corruption | conditioned val acc | "
        + " | ".join(METHOD_LABELS.get(m, m) for m in methods)
        + " |",
        "|---|---:|---|---:|" + "---|" * len(methods),
    ]
    for row in study["rows"]:
        corruption = (
            f"{row['unlabeled_corruption']} {row['corruption_strength']:g}" if row.get("unlabeled_corruption") else "-"
        )
        accuracy = row.get("conditioned_val_accuracy")
        lines.append(
            f"| {row['variant']} | {row.get('num_unlabeled', '-')} | {corruption} | "
            f"{'-' if accuracy is None else f'{accuracy:.3f}'} | "
            + " | ".join(_cell(row["merges"].get(m)) for m in methods)
            + " |"
        )
    return "\n".join(lines) + "\n"


@contextmanager
def _figure(path: Path, *, ncols: int = 1, figsize: tuple[float, float]) -> Iterator[Any]:
    """A row of ``ncols`` axes (an array, even for one); on exit the figure is laid out,
    written to ``path`` atomically as a PNG, and closed. Headless (Agg): reports run on servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    try:
        yield axes[0]
        fig.tight_layout()
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_smoothing_sweep(sweep: dict[str, Any], path: Path) -> None:
    """Figure 4 analog: merged absolute score against label-smoothing alpha, with and without DisTaC."""
    with _figure(path, figsize=(5.5, 3.8)) as axes:
        ax = axes[0]
        alphas = [p["alpha"] for p in sweep["points"]]
        for i, method in enumerate(sweep["methods"]):
            color = f"C{i}"
            label = METHOD_LABELS.get(method, method)
            for variant, style, suffix in (("plain", "--", ""), ("distac", "-", " + DisTaC")):
                ys = [100 * p[variant][method]["absolute"] if variant in p else float("nan") for p in sweep["points"]]
                ax.plot(alphas, ys, style, marker="o", color=color, label=label + suffix)
        ax.set_xlabel("label smoothing alpha of every source")
        ax.set_ylabel("merged test score (%)")
        ax.set_title("merge vs source confidence")
        ax.legend(fontsize=7)


def plot_scale_curve(curve: dict[str, Any], path: Path) -> None:
    """Figure 3 analog: single-task test score against the task-vector scale s (theta_pre + s * tau)."""
    with _figure(path, figsize=(5.5, 3.8)) as axes:
        ax = axes[0]
        for task, points in curve["curves"].items():
            ax.plot([p["scale"] for p in points], [100 * p["score"] for p in points], marker="o", label=task)
        ax.axvline(1.0, color="k", linestyle=":", linewidth=1)
        ax.set_xlabel("task-vector scale s")
        ax.set_ylabel("single-task test score (%)")
        ax.set_title("accuracy of theta_pre + s * tau")
        ax.legend(fontsize=7)


def plot_table1(results: dict[str, Any], path: Path) -> dict[str, list[str]]:
    """Table 1 as bars: per scenario, each method's merge, + DisTaC and + scaling only where run.
    Returns the series drawn per scenario."""
    scenarios = list(results["scenarios"])
    methods = results["config"]["methods"]
    series = [(variant, suffix.strip() or "merge") for variant, suffix in CHOICE_VARIANTS]
    drawn: dict[str, list[str]] = {}
    with _figure(path, ncols=len(scenarios), figsize=(4.5 * len(scenarios), 3.6)) as axes:
        for ax, scenario in zip(axes, scenarios, strict=True):
            avg = results["scenarios"][scenario]["average"]
            shown = [(key, label) for key, label in series if key in avg]
            drawn[scenario] = [label for _, label in shown]
            width = 0.8 / len(shown)
            ind = 100 * avg["plain"]["individual"]["absolute"]
            tallest = ind
            for i, (key, label) in enumerate(shown):
                offset = (i - (len(shown) - 1) / 2) * width
                heights = [100 * avg[key].get(m, {}).get("absolute", 0) for m in methods]
                ax.bar([x + offset for x in range(len(methods))], heights, width=width, label=label)
                tallest = max(tallest, *heights)
            ax.axhline(ind, color="k", linestyle="--", linewidth=1, label="individual")
            ax.set_ylim(top=tallest * 1.3)  # headroom keeps the legend off the bars
            ax.set_xticks(
                range(len(methods)), [METHOD_LABELS.get(m, m) for m in methods], rotation=45, ha="right", fontsize=8
            )
            ax.set_title(SCENARIO_LABELS.get(scenario, scenario))
            ax.set_ylabel("avg accuracy (%)")
        # the legend goes where every series appears (the Original column has no DisTaC bars)
        legend_ax = max(axes, key=lambda ax: len(ax.get_legend_handles_labels()[1]))
        legend_ax.legend(fontsize=7, loc="upper center", ncol=2)
    return drawn


def _scenario_recipes(results: dict[str, Any]) -> dict[str, set[str]]:
    """scenario -> the recipes its conditioned sources come from (studies add others)."""
    out: dict[str, set[str]] = {}
    for name, spec in results["config"]["scenarios"].items():
        out[name] = {spec.get("recipe", "base"), *([spec["long_recipe"]] if spec.get("long_recipe") else [])}
    return out


def plot_condition_histories(run_dir: Path, path: Path, scenarios: dict[str, set[str]] | None = None) -> bool:
    """Figure 2 analog: accuracy, relative task-vector norm and entropy over conditioning steps.

    With ``scenarios`` (name -> recipes), only the scenarios' own runs are drawn, not study variants."""
    found = visible((run_dir / "conditioned").glob("*/*/condition.json"), run_dir)
    records = [json.loads(f.read_text()) for f in sorted(found)]
    if scenarios is not None:
        records = [
            r for r in records if not r.get("tag") and r.get("recipe") in scenarios.get(r.get("scenario", ""), set())
        ]
    if not records:
        return False
    with _figure(path, ncols=3, figsize=(13, 3.6)) as axes:
        for record in records:
            history = [h for h in record.get("history", []) if isinstance(h, dict)]
            label = f"{record['scenario']}:{record['task']}"
            steps = [h.get("step", i) for i, h in enumerate(history)]
            for ax, key in zip(axes, ("val_accuracy", "norm_ratio_to_original", "entropy"), strict=True):
                ys = [h.get(key) for h in history]
                if any(y is not None for y in ys):
                    ax.plot(
                        [s for s, y in zip(steps, ys, strict=True) if y is not None],
                        [y for y in ys if y is not None],
                        label=label,
                    )
        for ax, title in zip(
            axes, ("validation accuracy", "||tau|| / ||tau_original||", "prediction entropy"), strict=True
        ):
            ax.set_title(title)
            ax.set_xlabel("step")
        runs = len(axes[0].get_legend_handles_labels()[1])
        axes[-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), ncol=max(1, -(-runs // 14)))
        return True
