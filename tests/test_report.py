"""The paper comparison in the report: our effects (drop, DisTaC gain) next to the paper's, with
sign agreement computed from the numbers."""

from __future__ import annotations

import math

import pytest

from distac.experiments.report import (
    calibration_markdown,
    choices_markdown,
    noise_band_points,
    paper_comparison_markdown,
    plot_table1,
)


def _entry(absolute: float) -> dict[str, float]:
    return {"absolute": absolute, "normalized": absolute / 0.6}


def test_paper_comparison_reports_differences_and_sign_agreement() -> None:
    results = {
        "config": {"methods": ["task_arithmetic", "emr", "average"]},
        "scenarios": {
            "original": {
                "average": {
                    "plain": {
                        "individual": {"test": {"a": {"n": 2000}, "b": {"n": 2000}}},
                        "task_arithmetic": _entry(0.473),
                        "emr": _entry(0.552),
                    }
                }
            },
            "low_confidence": {"average": {"plain": {"task_arithmetic": _entry(0.468)}}},
            "norm_mismatch": {
                "average": {
                    "plain": {"task_arithmetic": _entry(0.403), "emr": _entry(0.571)},
                    "distac": {"task_arithmetic": _entry(0.468), "emr": _entry(0.547)},
                }
            },
        },
    }
    table = paper_comparison_markdown(results)
    body = [line for line in table.splitlines()[4:] if line.startswith("|")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in body}
    assert set(rows) == {"Task arithmetic", "EMR"}  # no paper number for plain averaging
    # TA: paper NM drop 63.6 - 70.4 = -6.8; ours 40.3 - 47.3 = -7.0 (agrees); DisTaC +6.4 vs ours +6.5
    assert rows["Task arithmetic"][:4] == ["-6.8", "-7.0 ✓", "+6.4", "+6.5 ✓"]
    # EMR: the paper's norm mismatch costs 8.5 points; ours gains 1.9 (disagrees); DisTaC then loses 2.4
    assert rows["EMR"][:4] == ["-8.5", "+1.9 ✗", "+8.1", "-2.4 ✗"]
    # a 0.5-point change is inside the noise band (1.1 points for 2 x 2000 test examples): no claim
    assert rows["Task arithmetic"][5] == "-0.5 ≈"
    assert rows["EMR"][5] == "-" and rows["EMR"][7] == "-"  # no low-confidence run: no claim either way
    assert "smaller than 1.1 points" in table


def test_paper_comparison_is_omitted_without_any_effect_to_compare() -> None:
    # a run of one custom scenario (e.g. conditioning normal sources): no drop or gain the paper reports
    scenario = {"average": {"plain": {"task_arithmetic": _entry(0.62)}, "distac": {"task_arithmetic": _entry(0.64)}}}
    results = {"config": {"methods": ["task_arithmetic"]}, "scenarios": {"sharpened": scenario}}
    assert paper_comparison_markdown(results) == ""
    # one low-confidence run alone has its DisTaC gain: the table is kept
    results["scenarios"] = {"low_confidence": scenario}
    assert "+2.0" in paper_comparison_markdown(results)


def test_calibration_table_averages_each_merge_over_tasks_and_skips_uncalibrated_records() -> None:
    def row(entropy: float, ece: float, nll: float, t: float, after: tuple[float, float, float]) -> dict:
        calibrated = dict(zip(("entropy", "ece", "nll"), after, strict=True)) | {"temperature": t}
        return {"score": 0.5, "entropy": entropy, "ece": ece, "nll": nll, "calibrated": calibrated}

    calibrated = {
        "absolute": 0.5,
        "test": {"a": row(0.1, 0.2, 1.0, 2.0, (0.3, 0.1, 0.8)), "b": row(0.3, 0.4, 2.0, 4.0, (0.5, 0.3, 1.0))},
    }
    old_record = {"absolute": 0.6, "test": {"a": {"score": 0.6, "entropy": 0.1, "ece": 0.1, "nll": 1.0}}}
    results = {
        "config": {"methods": ["ties", "tsvm"]},
        "scenarios": {"low_confidence": {"average": {"distac": {"ties": calibrated, "tsvm": old_record}}}},
    }
    lines = [line for line in calibration_markdown(results).splitlines() if line.startswith("| low_confidence")]
    assert lines == ["| low_confidence | distac | TIES | 50.0 | 0.200 | 0.300 | 1.500 | 2.83 | 0.400 | 0.200 | 0.900 |"]
    results["scenarios"]["low_confidence"]["average"]["distac"] = {"tsvm": old_record}
    assert calibration_markdown(results) == ""  # merges recorded before calibration existed: no table


def test_noise_band_is_one_standard_error_of_a_difference_of_averages() -> None:
    def results(*sizes: int) -> dict:
        tests = {f"t{i}": {"n": n} for i, n in enumerate(sizes)}
        return {"scenarios": {"original": {"average": {"plain": {"individual": {"test": tests}}}}}}

    # one task of n examples: sqrt(2 * 0.25 / n), in points
    assert noise_band_points(results(200)) == pytest.approx(100 * math.sqrt(0.5 / 200))
    # T equal tasks: the average is T times less noisy in variance
    assert noise_band_points(results(200, 200, 200, 200)) == pytest.approx(100 * math.sqrt(0.5 / 200) / 2)
    assert noise_band_points({"scenarios": {}}) == 0.0  # no test sizes recorded: no band


def _choice(long_task: str, norms: dict[str, float], kappa: float, scores: dict[str, tuple[float, float]]) -> dict:
    """A per-choice block: variant -> method -> (absolute, the long task's own test score)."""
    run: dict = {"kappas": {long_task: kappa}}
    for variant, (absolute, own) in scores.items():
        run[variant] = {
            "norms": norms,
            "individual": {"test": {long_task: {"score": 0.9}}},
            "task_arithmetic": {"absolute": absolute, "test": {long_task: {"score": own}}},
        }
    return run


def test_choices_table_lists_every_long_task_with_its_norms_kappa_and_scores() -> None:
    norms_a = {"a": 30.0, "b": 3.0, "c": 4.5}
    norms_b = {"a": 3.5, "b": 28.0, "c": 4.0}
    block = {
        "choices": {
            "a": _choice("a", norms_a, 0.125, {"plain": (0.40, 0.85), "distac": (0.50, 0.70)}),
            "b": _choice("b", norms_b, 0.134, {"plain": (0.44, 0.80), "distac": (0.54, 0.60)}),
        },
        "average": {
            "plain": {"task_arithmetic": {"absolute": 0.42}},
            "distac": {"task_arithmetic": {"absolute": 0.52}},
        },
    }
    table = choices_markdown("norm_mismatch", block, ["task_arithmetic"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    header, first, second, average, own_header, own_a, own_b = rows
    # no scaling-only run in either choice: no column for it
    assert header == ["long task", "‖τ_long‖ vs others", "κ", "Task arithmetic", "Task arithmetic + DisTaC"]
    assert first == ["a", "30.0 vs 3.0-4.5", "0.125", "40.0", "50.0"]
    assert second == ["b", "28.0 vs 3.5-4.0", "0.134", "44.0", "54.0"]
    assert average == ["**average**", "", "", "42.0", "52.0"]
    assert own_header[:2] == ["long task", "long source alone"]
    assert own_a == ["a", "90.0", "85.0", "70.0"] and own_b == ["b", "90.0", "80.0", "60.0"]


def test_table1_plot_draws_scaling_only_bars_where_the_study_ran(tmp_path) -> None:
    def block(score: float) -> dict:
        return {m: {"absolute": score, "normalized": score / 0.6} for m in ("task_arithmetic", "tsvm")}

    plain = {**block(0.4), "individual": {"absolute": 0.6}}
    results = {
        "config": {"methods": ["task_arithmetic", "tsvm"]},
        "scenarios": {
            "original": {"average": {"plain": {**block(0.5), "individual": {"absolute": 0.6}}}},
            "norm_mismatch": {"average": {"plain": plain, "distac": block(0.5), "scaling_alone": block(0.45)}},
        },
    }
    drawn = plot_table1(results, tmp_path / "table1.png")
    assert drawn == {"original": ["merge"], "norm_mismatch": ["merge", "+ DisTaC", "+ scaling only"]}
    assert (tmp_path / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_shows_an_undefined_normalized_score_as_n_a_before_and_after_json() -> None:
    """A normalized score is undefined when the individual reference is <= 0 (a CoLA MCC of 0): NaN in
    memory, null in results.json; the table shows n/a either way instead of crashing on the null."""
    import json

    from distac.atomic import json_text
    from distac.experiments.report import table1_markdown

    results = {
        "config": {"methods": ["task_arithmetic"]},
        "scenarios": {
            "original": {"average": {"plain": {"task_arithmetic": {"absolute": 0.25, "normalized": float("nan")}}}}
        },
    }
    for version in (results, json.loads(json_text(results))):
        assert "| Task arithmetic | 25.0 (n/a) |" in table1_markdown(version)
