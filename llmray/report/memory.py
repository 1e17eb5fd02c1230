"""Peak memory in use on this machine while a block runs, sampled by a background thread."""

from __future__ import annotations

import threading
from typing import Self

GIB = 1024**3


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.peak_gib` (machine-wide RAM in use, which covers the Ray
    workers and the object store too) and `m.start_gib`. Sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.start_gib = self.peak_gib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def in_use_gib() -> float:
        import psutil

        vm = psutil.virtual_memory()
        return (vm.total - vm.available) / GIB

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_gib = max(self.peak_gib, self.in_use_gib())

    def __enter__(self) -> Self:
        self.start_gib = self.peak_gib = self.in_use_gib()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.peak_gib = max(self.peak_gib, self.in_use_gib())
