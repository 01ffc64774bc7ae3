"""Progress of the commands made of many measurements (sweep, tune, doctor, plan): i of n, the
last figure and the time left, estimated from the measurements done.

On a terminal, a rich bar on stderr; elsewhere (a log file, CI), plain lines. The bar is redrawn
only when a measurement ends (no refresh thread), so nothing draws while one is measured: sweep,
tune and doctor measure in child processes, plan in this one between two redraws."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``advance(note)`` after each measurement; ``line(text)`` for anything else worth a line.
    ``total`` is an estimate where the command decides as it goes (a sweep skips steps a machine
    cannot run): it grows when passed, so the bar never reads more than done."""

    def __init__(self, what: str, total: int, log=print, stream=None):
        self.what, self.total, self.done, self.log = what, max(1, total), 0, log
        self.start = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        self.bar = None
        if log is print and stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[left]}"),
                TextColumn("{task.fields[note]}"),
                console=Console(file=stream),
                auto_refresh=False,  # no thread: redrawn in advance() and line() only
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.task = self.bar.add_task(what, total=self.total, left="", note="")
            self.bar.start()

    def left(self) -> str:
        if not self.done:
            return ""
        per = (time.monotonic() - self.start) / self.done
        return f"about {_duration(per * (self.total - self.done))} left"

    def line(self, text: str) -> None:
        if self.bar is None:
            self.log(text)
            return
        self.bar.console.print(text, markup=False, highlight=False)
        self.bar.refresh()

    def advance(self, note: str = "") -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        if self.bar is None:
            self.log(f"[{self.done}/{self.total}, {self.left()}] {note}".replace(", ]", "]"))
            return
        self.bar.console.print(note, markup=False, highlight=False)
        self.bar.update(self.task, completed=self.done, total=self.total, left=self.left(), note=note[:60])
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
