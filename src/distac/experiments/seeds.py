"""Table 1 over several seeds: each cell's mean and standard deviation, and each effect per seed.

One run's task-averaged merge score moves by a few points with the training seed and the
sampled data subsets. A claim such as "label smoothing costs task arithmetic 17 points and
DisTaC gives 14 back" needs the spread of those differences over independent runs. ``distac seeds
RUN_DIR...`` reads the runs' ``results.json`` (one experiment, different seeds) and writes
``seeds.json`` and ``seeds.md``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from distac.atomic import atomic_write_json, atomic_write_text
from distac.errors import ConfigError
from distac.experiments.report import METHOD_LABELS, SCENARIO_LABELS, is_defined, merged_score

#: Config keys that may differ between the runs being aggregated: the seed, and which scenarios and
#: studies each run went through (only the scenarios every run has are aggregated).
FREE_KEYS = frozenset({"seed", "scenarios", "studies"})
VARIANT_LABELS = {"plain": "", "distac": " + DisTaC", "scaling_alone": " + scaling only"}


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Each run's results, checked to be the same experiment at different seeds."""
    if len(run_dirs) < 2:
        raise ConfigError(f"aggregating seeds needs at least two run dirs, got {len(run_dirs)}")
    runs = []
    for run_dir in run_dirs:
        file = Path(run_dir) / "results.json"
        if not file.is_file():
            raise ConfigError(f"{file}: not found (run `distac experiment` with --run-dir {run_dir} first)")
        runs.append(json.loads(file.read_text()))
    first = runs[0]["config"]
    for run_dir, run in zip(run_dirs[1:], runs[1:], strict=True):
        differing = sorted(
            key
            for key in set(first) | set(run["config"])
            if key not in FREE_KEYS and first.get(key) != run["config"].get(key)
        )
        if differing:
            raise ConfigError(f"{run_dir}: not the same experiment as {run_dirs[0]} (differs in {differing})")
    seeds = [run["config"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"two runs share a seed (seeds {seeds}): their spread would not be a seed spread")
    return runs


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over ``runs`` of every Table 1 cell (absolute %, task-averaged), and per-seed effects:
    ``drop`` (a scenario's plain merge minus the original plain merge) and ``gain`` (a variant minus the
    plain merge of its own scenario)."""
    methods = runs[0]["config"]["methods"]
    seen = list(dict.fromkeys(s for run in runs for s in run["scenarios"]))
    scenarios = [s for s in seen if all(s in run["scenarios"] for run in runs)]
    # a scenario some runs lack cannot have a seed spread; name it instead of dropping it unseen
    left_out = {
        s: [run["config"]["seed"] for run in runs if s not in run["scenarios"]] for s in seen if s not in scenarios
    }
    for scenario in scenarios:  # a scenario's cells are comparable only if every run defined it alike
        specs = [run["config"].get("scenarios", {}).get(scenario) for run in runs]
        if any(spec != specs[0] for spec in specs[1:]):
            raise ConfigError(
                f"scenario {scenario!r} is defined differently in the runs ({specs}): e.g. averages over "
                "different long tasks are not comparable; rerun them with the same definition"
            )

    def collect(scenario: str, variant: str, row: str) -> list[float] | None:
        values = [merged_score(run, scenario, variant, row) for run in runs]
        return None if any(v is None for v in values) else [float(v) for v in values]  # type: ignore[arg-type]

    cells: dict[str, dict[str, Any]] = {s: {} for s in scenarios}
    effects: list[dict[str, Any]] = []
    for scenario in scenarios:
        for row in ("individual", *methods):
            for variant in VARIANT_LABELS if row != "individual" else ("plain",):
                values = collect(scenario, variant, row)
                if values is not None:
                    cells[scenario][f"{row}/{variant}"] = _stats(values)
        for method in methods:
            plain = collect(scenario, "plain", method)
            if plain is None:
                continue
            original = collect("original", "plain", method) if "original" in scenarios else None
            if scenario != "original" and original is not None:
                effects.append(
                    {
                        "scenario": scenario,
                        "method": method,
                        "effect": "drop",
                        **_stats([p - o for p, o in zip(plain, original, strict=True)]),
                    }
                )
            for variant in ("distac", "scaling_alone"):
                other = collect(scenario, variant, method)
                if other is not None:
                    effects.append(
                        {
                            "scenario": scenario,
                            "method": method,
                            "effect": f"gain ({variant})",
                            **_stats([v - p for v, p in zip(other, plain, strict=True)]),
                        }
                    )
    return {
        "experiment": runs[0]["experiment"],
        "seeds": [run["config"]["seed"] for run in runs],
        "methods": methods,
        "scenarios": scenarios,
        "left_out_scenarios": left_out,
        "cells": cells,
        "effects": effects,
        "choice_effects": choice_effects(runs, scenarios, methods),
    }


#: Per-choice effects: name -> (variant, minus this variant of the same choice, or the original merge).
CHOICE_EFFECTS = {
    "drop": ("plain", "original"),
    "gain (distac)": ("distac", "plain"),
    "distac − scaling only": ("distac", "scaling_alone"),
}


def _choice_score(run: dict[str, Any], scenario: str, choice: str, variant: str, method: str) -> float | None:
    entry = run["scenarios"][scenario]["choices"][choice].get(variant, {}).get(method)
    return None if not entry or "absolute" not in entry else 100 * float(entry["absolute"])


def choice_effects(runs: list[dict[str, Any]], scenarios: list[str], methods: list[str]) -> list[dict[str, Any]]:
    """Each effect per choice of the long source and per seed, for scenarios run over several long
    tasks (norm mismatch averaged over choices). The average over choices hides which long task a
    method fails or DisTaC pays on (on text, the scale-sensitive AG News and TREC), and whether that
    repeats with the seed; only choices every run has are compared."""
    out: list[dict[str, Any]] = []
    for scenario in scenarios:
        if not all("choices" in run["scenarios"][scenario] for run in runs):
            continue
        shared = [
            c
            for c in runs[0]["scenarios"][scenario]["choices"]
            if all(c in run["scenarios"][scenario]["choices"] for run in runs)
        ]
        for choice in shared:
            for method in methods:
                for effect, (variant, reference) in CHOICE_EFFECTS.items():
                    values = []
                    for run in runs:
                        value = _choice_score(run, scenario, choice, variant, method)
                        base = (
                            merged_score(run, "original", "plain", method)
                            if reference == "original"
                            else _choice_score(run, scenario, choice, reference, method)
                        )
                        if value is None or base is None:
                            break
                        values.append(value - base)
                    else:
                        out.append(
                            {
                                "scenario": scenario,
                                "choice": choice,
                                "method": method,
                                "effect": effect,
                                **_stats(values),
                            }
                        )
    return out


def _mean_sd(stats: dict[str, Any] | None, signed: bool = False) -> str:
    if not stats:
        return ""
    sign = "+" if signed else ""
    sd = stats.get("sd")  # undefined for one seed
    spread = f" ± {sd:.1f}" if is_defined(sd) else ""
    return f"{stats['mean']:{sign}.1f}{spread}"


def seeds_markdown(summary: dict[str, Any]) -> str:
    scenarios, methods = summary["scenarios"], summary["methods"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [
        f"## {summary['experiment']} over seeds {seeds}: merged test accuracy (absolute %), mean ± sd",
        "",
        "| method | " + " | ".join(SCENARIO_LABELS.get(s, s) for s in scenarios) + " |",
        "|---|" + "---:|" * len(scenarios),
    ]
    rows = [("individual", "plain")] + [(m, v) for m in methods for v in VARIANT_LABELS]
    for row, variant in rows:
        cells = [summary["cells"][s].get(f"{row}/{variant}") for s in scenarios]
        if not any(cells):
            continue
        label = "Individual (fine-tuned)" if row == "individual" else METHOD_LABELS.get(row, row)
        lines.append(f"| {label}{VARIANT_LABELS[variant]} | " + " | ".join(_mean_sd(c) for c in cells) + " |")
    left_out = summary.get("left_out_scenarios") or {}
    if left_out:
        lines += [
            "",
            "Left out, missing from some runs: "
            + "; ".join(
                f"{SCENARIO_LABELS.get(s, s)} (not run at seed {', '.join(str(x) for x in missing)})"
                for s, missing in left_out.items()
            )
            + ".",
        ]
    lines += [
        "",
        "### Effects per seed (points): drop = scenario − original, gain = variant − plain merge",
        "",
        "| scenario | method | effect | per seed | mean ± sd |",
        "|---|---|---|---|---:|",
    ]
    for effect in summary["effects"]:
        per_seed = " / ".join(f"{v:+.1f}" for v in effect["values"])
        lines.append(
            f"| {SCENARIO_LABELS.get(effect['scenario'], effect['scenario'])} "
            f"| {METHOD_LABELS.get(effect['method'], effect['method'])} | {effect['effect']} "
            f"| {per_seed} | {_mean_sd(effect, signed=True)} |"
        )
    lines += choice_effects_markdown(summary)
    return "\n".join(lines) + "\n"


def choice_effects_markdown(summary: dict[str, Any]) -> list[str]:
    """One row per (scenario, long task, method): each per-choice effect as 'per seed (mean)'."""
    effects = summary.get("choice_effects") or []
    if not effects:
        return []
    lines = [
        "",
        "### Effects per choice of the long source (points)",
        "",
        "Each cell: the effect at each seed, then the mean in brackets. drop = the choice's plain merge − the "
        "original merge; gain (distac) = + DisTaC − the choice's plain merge; distac − scaling only = + DisTaC − "
        "+ scaling only.",
        "",
        "| scenario | long task | method | " + " | ".join(CHOICE_EFFECTS) + " |",
        "|---|---|---|" + "---:|" * len(CHOICE_EFFECTS),
    ]
    table: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for effect in effects:
        table.setdefault((effect["scenario"], effect["choice"], effect["method"]), {})[effect["effect"]] = effect
    for (scenario, choice, method), row in table.items():
        cells = []
        for name in CHOICE_EFFECTS:
            stats = row.get(name)
            cells.append(
                "" if stats is None else " / ".join(f"{v:+.1f}" for v in stats["values"]) + f" ({stats['mean']:+.1f})"
            )
        lines.append(
            f"| {SCENARIO_LABELS.get(scenario, scenario)} | {choice} | {METHOD_LABELS.get(method, method)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def write_seed_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Aggregate ``run_dirs`` into ``out_dir/seeds.json`` and ``out_dir/seeds.md``; return the markdown path."""
    summary = aggregate(load_runs(run_dirs))
    summary["run_dirs"] = [str(d) for d in run_dirs]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "seeds.json", summary)
    path = out_dir / "seeds.md"
    atomic_write_text(path, seeds_markdown(summary))
    return path
