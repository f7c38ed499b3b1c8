"""The paper comparison in the report: our effects (drop, DisTaC gain) next to the paper's, with
sign agreement computed from the numbers."""

from __future__ import annotations

from distac.experiments.report import paper_comparison_markdown


def _entry(absolute: float) -> dict[str, float]:
    return {"absolute": absolute, "normalized": absolute / 0.6}


def test_paper_comparison_reports_differences_and_sign_agreement() -> None:
    results = {
        "config": {"methods": ["task_arithmetic", "emr", "average"]},
        "scenarios": {
            "original": {"average": {"plain": {"task_arithmetic": _entry(0.473), "emr": _entry(0.552)}}},
            "norm_mismatch": {
                "average": {
                    "plain": {"task_arithmetic": _entry(0.403), "emr": _entry(0.571)},
                    "distac": {"task_arithmetic": _entry(0.468), "emr": _entry(0.547)},
                }
            },
        },
    }
    table = paper_comparison_markdown(results)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[4:]}
    assert set(rows) == {"Task arithmetic", "EMR"}  # no paper number for plain averaging
    # TA: paper NM drop 63.6 - 70.4 = -6.8; ours 40.3 - 47.3 = -7.0 (agrees); DisTaC +6.4 vs ours +6.5
    assert rows["Task arithmetic"][:4] == ["-6.8", "-7.0 ✓", "+6.4", "+6.5 ✓"]
    # EMR: the paper's norm mismatch costs 8.5 points; ours gains 1.9 (disagrees); DisTaC then loses 2.4
    assert rows["EMR"][:4] == ["-8.5", "+1.9 ✗", "+8.1", "-2.4 ✗"]
    assert rows["EMR"][5] == "-" and rows["EMR"][7] == "-"  # no low-confidence run: no claim either way
