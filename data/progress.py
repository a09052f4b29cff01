"""Progress of a long wait: a bar on a terminal, periodic log lines elsewhere (a Ray job's log).

Used by shard writing, the objectives' preparation (k-means), evaluation feature
extraction and artifact downloads. It lives on the lowest floor so that every layer can
use it. On a terminal it draws a tqdm bar on stderr; without one (a Ray worker, a job, a
pipe) it logs `<what>: <done>/<total> <unit> (<rate> <unit>/s, <elapsed> s)` every
`every_s` seconds, and a last line when it closes, so a job log shows that work goes on.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

# Seconds between two log lines where no bar can be drawn.
LINE_EVERY_S = 10.0


def on_terminal() -> bool:
    """Whether stderr is a terminal (a bar can be drawn) rather than a log."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class Progress:
    """`with Progress("writing shards", total=N, unit="img") as p: ... p.update(k)`.

    total may be None (unknown): the bar and the lines then show counts and rates only.
    `bar=None` decides by `on_terminal()`; `enabled=False` makes every call a no-op (e.g.
    on ranks other than 0). The final line (or the bar's last state) gives the count and
    the time taken.
    """

    def __init__(
        self,
        what: str,
        *,
        total: int | None = None,
        unit: str = "it",
        logger: logging.Logger | None = None,
        every_s: float = LINE_EVERY_S,
        bar: bool | None = None,
        enabled: bool = True,
    ) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.log = logger or logging.getLogger("data.progress")
        self.every_s, self.enabled = every_s, enabled
        self.done = 0
        self._bar: Any = None
        self._started = self._last_line = time.monotonic()
        if enabled and (on_terminal() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, dynamic_ncols=True, leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(stopped=exc_type is not None)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def line(self) -> str:
        """The current state as one line (what the periodic log lines say)."""
        seconds = self.elapsed
        rate = self.done / seconds if seconds > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.what}: {self.done}{of} {self.unit} ({rate:.1f} {self.unit}/s, {seconds:.0f} s)"

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self.log.info("%s", self.line())

    def close(self, stopped: bool = False) -> None:
        """End the bar and log the last line (`stopped`: the work failed part way); once."""
        if not self.enabled:
            return
        self.enabled = False
        if self._bar is not None:
            self._bar.close()
        of = f"/{self.total}" if self.total is not None and self.total != self.done else ""
        how = "stopped after" if stopped else "done,"
        self.log.info("%s: %s %d%s %s in %.1f s", self.what, how, self.done, of, self.unit, self.elapsed)
