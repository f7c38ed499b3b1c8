"""Peak-memory measurement shared by the benchmarks: one place that knows how to read a process's
memory on Linux and how to watch it while a block of code runs.

``tracemalloc`` is not used: it does not see torch's C++ allocations. On CPU the probe samples
``/proc/self/status`` every 5 ms in a thread and keeps the highest value of one field (``VmRSS``:
everything resident; ``RssAnon``: tensors and heap only, without file pages mapped while reading
safetensors). On CUDA it reads the allocator's peak instead, which is exact.

Memory freed inside a process often stays in its heap, so a baseline taken after an earlier
measurement can hide the next one's peak; :func:`release_free_heap` hands freed pages back to the
OS before a baseline is taken, and benchmarks that compare variants run each in a fresh process
where that is not enough.
"""

from __future__ import annotations

import gc
import resource
import threading
import time

import torch

SAMPLE_SECONDS = 0.005


def proc_status() -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon`` and ``RssFile`` of this process in bytes (empty off Linux)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    values[name] = int(rest.split()[0]) * 1024
    except OSError:  # not Linux: the lifetime peak is all there is (coarser)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        values = {"VmHWM": peak, "VmRSS": peak, "RssAnon": peak, "RssFile": 0}
    return values


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a baseline is what is really live."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory while the ``with`` block runs, and how much of it is new since the block began.

    ``baseline`` and ``peak`` are bytes of ``field`` (CPU) or of allocated device memory (CUDA);
    ``peak_extra = peak - baseline`` is what the block itself needed at its worst moment.
    """

    def __init__(self, device: torch.device | str = "cpu", field: str = "VmRSS") -> None:
        self.device = torch.device(device)
        self.field = field
        self.baseline = self.peak = self.peak_extra = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> int:
        return proc_status()[self.field]

    def __enter__(self) -> PeakMemory:
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.baseline = self.peak = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(SAMPLE_SECONDS)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, self._read())
        self.peak_extra = self.peak - self.baseline
