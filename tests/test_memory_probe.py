"""The benchmarks' peak-memory probe must see memory that a block allocates and frees again before it
ends (the case a before/after difference misses), and must not charge a block for memory that was
live before it began."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from memory_probe import PeakMemory, proc_status  # noqa: E402

MIB = 2**20

pytestmark = pytest.mark.skipif(not proc_status().get("RssAnon"), reason="needs Linux /proc/self/status")


@pytest.mark.parametrize("field", ["VmRSS", "RssAnon"])
def test_peak_sees_a_transient_allocation(field: str) -> None:
    with PeakMemory("cpu", field=field) as memory:
        block = torch.ones(64 * MIB // 4)  # 64 MiB, every page touched
        time.sleep(0.1)  # several sampling periods
        del block
        time.sleep(0.02)
    assert 56 * MIB < memory.peak_extra < 128 * MIB
    assert memory.peak == memory.baseline + memory.peak_extra


def test_memory_live_before_the_block_is_not_charged_to_it() -> None:
    held = torch.ones(64 * MIB // 4)
    with PeakMemory("cpu") as memory:
        time.sleep(0.05)
    assert memory.peak_extra < 16 * MIB
    assert memory.baseline > held.numel() * 4
