"""Progress of long phases (encoding, evaluation, mining, export, dataset preparation) that shows in a terminal
and in log files alike.

    with progress(total=len(docs), desc="encode corpus scifact", unit="doc") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

On a terminal it is a tqdm bar. When stderr is not a terminal (a log file, `tpu/logs.sh` on a pod, a notebook
cell captured to a file) it logs a line `desc: done/total unit (pct), rate, ETA` at the first update after
`every` seconds (30 by default, `EMBEDJAX_PROGRESS_SECONDS`) and one at the end, so a phase of minutes is
never silent. `show=False` turns both off; `show=None` (the default) and `show=True` pick by the terminal.
`initial`: work already done before this run (a resumed job): counted in done/total, not in the rate and ETA.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger("embedjax.progress")


def _every() -> float:
    try:
        return float(os.environ.get("EMBEDJAX_PROGRESS_SECONDS", "30"))
    except ValueError:
        raise ValueError(f"EMBEDJAX_PROGRESS_SECONDS={os.environ['EMBEDJAX_PROGRESS_SECONDS']!r}: expected "
                         "a number of seconds") from None


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A tqdm-like counter: `update(n)`, `close()`, a context manager; see the module docstring."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", show: bool | None = None,
                 every: float | None = None, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, int(initial)
        self._n0 = self.n
        self._bar = None
        self._lines = False
        self._t0 = self._last = time.time()
        self._every = _every() if every is None else every
        if show is False:
            return
        if is_terminal():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=self.n)
        else:
            self._lines = True

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._lines and time.time() - self._last >= self._every:
            self._log()

    def _log(self, final: bool = False) -> None:
        self._last = now = time.time()
        el = now - self._t0
        rate = (self.n - self._n0) / el if el > 0 else 0.0
        if self.total:
            pct = f" ({100.0 * self.n / self.total:.0f}%)"
            done = f"{self.n}/{self.total}"
            eta = ("" if final or rate <= 0 else f", ETA {fmt_duration((self.total - self.n) / rate)}")
        else:
            pct, done, eta = "", str(self.n), ""
        took = f" in {fmt_duration(el)}" if final else ""
        log.info("%s: %s %s%s%s, %.1f %s/s%s", self.desc, done, self.unit, pct, took, rate, self.unit, eta)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines:
            if time.time() - self._t0 >= self._every:   # a phase long enough to have logged: say it ended
                self._log(final=True)
            self._lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "it", show: bool | None = None,
             initial: int = 0) -> Progress:
    return Progress(total, desc, unit, show, initial=initial)


def track(items: Iterable[Any], desc: str, unit: str = "it", show: bool | None = None,
          total: int | None = None) -> Iterator[Any]:
    """Iterates `items`, counting one per item (tqdm(items) that also logs)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(total, desc, unit, show) as bar:
        for x in items:
            yield x
            bar.update(1)
