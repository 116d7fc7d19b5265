"""A one-line text progress bar for ringcc's commands when tqdm is not there."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class TextProgress:
    """``[#####.....] done/total what  elapsed`` redrawn in place on a terminal.

    Draws nothing when disabled or when the stream is not a terminal (a log file would
    fill with carriage returns)."""

    WIDTH = 30

    def __init__(self, total: int, enabled: bool = True, desc: str = "", stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.desc = total, 0, desc
        self.enabled = enabled and self.stream.isatty()
        self.t0 = time.monotonic()
        self._last_len = 0

    def update(self, n: int = 1, what: str = "") -> None:
        self.done += n
        if not self.enabled:
            return
        filled = int(self.WIDTH * min(self.done, self.total) / max(1, self.total))
        line = (f"{self.desc}[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                f"{what:<32} {time.monotonic() - self.t0:6.1f}s")
        self.stream.write("\r" + line.ljust(self._last_len))
        self._last_len = len(line)
        self.stream.flush()

    def step(self, what: str = "") -> None:
        self.update(1, what)

    def close(self) -> None:
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
