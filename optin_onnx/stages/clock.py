"""Wall seconds per stage, and the process's peak memory as each stage ends, for the report's
"time per stage" table: a run that needs too much memory shows in which stage it rose."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from optin_onnx.report import peak_memory
from optin_onnx.runtime import release_memory


@dataclass
class Clock:
    """Seconds per stage name. A name entered again adds to its total: in rounds, ``score`` and
    ``search`` run once per round and the report states their sums. ``peaks``: the process's
    peak resident memory so far (GiB) when the stage last ended; empty where the platform keeps
    no such record."""

    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        release_memory()  # what the stage freed goes back before the next one allocates
        peak = peak_memory().get("process_gib")
        if peak is not None:
            self.peaks[name] = peak
