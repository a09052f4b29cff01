"""Progress of long waits: periodic lines without a terminal, a bar on one, a last line either way."""

from __future__ import annotations

import logging
import time

import pytest

from data.progress import Progress


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "data.progress"]


def test_lines_every_interval_and_a_last_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data.progress")
    with Progress("writing shards", total=4, unit="img", every_s=0.0, bar=False) as progress:
        for _ in range(4):
            progress.update()
    got = lines(caplog)
    assert [line.split(" (")[0] for line in got[:4]] == [f"writing shards: {n}/4 img" for n in range(1, 5)]
    assert got[4].startswith("writing shards: done, 4 img in ")
    assert len(got) == 5


def test_no_line_before_the_interval_and_counts_without_a_total(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data.progress")
    with Progress("eval features", unit="img", every_s=3600.0, bar=False) as progress:
        progress.update(64)
        progress.update(32)
    assert lines(caplog) == [lines(caplog)[0]]
    assert lines(caplog)[0].startswith("eval features: done, 96 img in ")


def test_rate_in_the_line() -> None:
    progress = Progress("k-means", total=20, unit="iter", bar=False)
    progress.update(10)
    time.sleep(0.05)
    text = progress.line()
    assert text.startswith("k-means: 10/20 iter (") and "iter/s" in text
    rate = float(text.split("(")[1].split()[0])
    assert 0 < rate <= 10 / 0.05


def test_failure_says_stopped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data.progress")
    with pytest.raises(OSError), Progress("writing shards", total=4, unit="img", bar=False) as progress:
        progress.update(2)
        raise OSError("disk full")
    assert lines(caplog)[-1].startswith("writing shards: stopped after 2/4 img in ")


def test_disabled_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data.progress")
    with Progress("k-means", total=3, every_s=0.0, bar=False, enabled=False) as progress:
        progress.update(3)
    assert lines(caplog) == []


def test_a_bar_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress("writing shards", total=3, unit="img", bar=True) as progress:
        progress.update(3)
    err = capsys.readouterr().err
    # tqdm draws "writing shards:   0%| | 0/3 [..., ?img/s]", then clears it (the last log line stays).
    assert "writing shards:" in err and "/3 [" in err and "img/s" in err
