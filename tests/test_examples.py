"""The examples run: each is a user's first contact with the Python API, so a renamed function or a
changed signature must fail here, not in their hands. Small settings; the real MiniLM and data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_python_api_example_conditions_the_long_source_and_merges(data_root: Path) -> None:
    args = ["--finetune-steps", "6", "--condition-steps", "3", "--train", "64", "--validation", "16"]
    args += ["--test", "32", "--methods", "task_arithmetic", "--grid", "0.5", "1.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTAC_DATA": str(data_root)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "python_api.py"), *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    # the 10x-lr source is the longest; DisTaC shrinks it to about kappa * its norm
    norm_line = out.split("task-vector norms:")[1].splitlines()[0]
    norms = {k: float(v) for k, v in re.findall(r"'(\w+)': ([\d.]+)", norm_line)}
    assert norms["sst2"] > max(norms["agnews_small"], norms["trec"])
    kappa, norm = map(float, re.search(r"kappa ([\d.]+), norm ([\d.]+)", out).groups())
    assert 0 < kappa < 1 and norm < norms["sst2"]
    row = re.search(r"task_arithmetic\s+([\d.]+)\s+([\d.]+)", out)
    assert row is not None and all(0 <= float(x) <= 100 for x in row.groups())
