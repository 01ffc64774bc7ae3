"""Progress of the many-run commands: plain numbered lines off a terminal, a bar on one that is
redrawn only between measurements (no thread of its own that could draw during one)."""

from __future__ import annotations

import io
import threading

from bench.harness.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_measurement_is_one_plain_line_with_i_of_n():
    lines = []
    with Progress("tune torch", 3, log=lines.append) as p:
        p.line("measuring")
        for note in ("a: 10 img/s", "b: 20 img/s", "c: 30 img/s", "d: 40 img/s"):  # one more than estimated
            p.advance(note)
    assert lines[0] == "measuring"
    assert lines[1].startswith("[1/3, about ") and lines[1].endswith(" left] a: 10 img/s")
    assert lines[3].startswith("[3/3, about 0 s left] c:")
    assert lines[4].startswith("[4/4, ") and "\x1b" not in "".join(lines)  # the estimate grew; no escapes


def test_on_a_terminal_a_bar_with_no_refresh_thread(monkeypatch):
    term = Terminal()
    before = threading.active_count()
    with Progress("sweep", 2, stream=term) as p:
        assert p.bar is not None and threading.active_count() == before
        p.advance("baseline trial 1: 358.1 img/s")
        p.advance("baseline trial 2: 360.0 img/s")
    out = term.getvalue()
    assert "baseline trial 1: 358.1 img/s" in out and "2/2" in out
    assert threading.active_count() == before
