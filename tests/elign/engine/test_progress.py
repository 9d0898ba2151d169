"""Progress: tqdm on a terminal, a plain line every total // 20 iterations (and the last) otherwise."""

import io
import re

import pytest

from elign.engine.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(progress, total, initial=0):
    progress.start(total, initial)
    for i in range(initial, total):
        progress.update(i, {"reward/total": -1.5 + i / 100, "train/loss": 0.25, "other": 3.0})
    progress.close()


def test_a_log_file_gets_plain_lines_not_carriage_returns():
    log = io.StringIO()
    run(Progress(show=True, stream=log), total=100)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [int(re.match(r"iterations (\d+)/100 ", line).group(1)) for line in lines] == list(range(5, 101, 5))
    assert re.fullmatch(r"iterations 100/100 reward/total=-0\.51 train/loss=0\.25 \| \S+ s/it, eta 0m00s", lines[-1])


def test_plain_lines_after_a_resume_and_for_short_runs():
    log = io.StringIO()
    run(Progress(show=True, stream=log), total=100, initial=37)
    assert [line.split()[1] for line in log.getvalue().splitlines()] == [f"{i}/100" for i in range(40, 101, 5)]
    log = io.StringIO()
    run(Progress(show=True, stream=log), total=3)  # fewer iterations than lines: every one, the last included
    assert [line.split()[1] for line in log.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]


def test_a_terminal_gets_the_tqdm_bar():
    tty = Terminal()
    progress = Progress(show=True, stream=tty)
    progress.start(10)
    progress.write("resumed from x")
    for i in range(10):
        progress.update(i, {"reward/total": 2.0})
    progress.close()
    text = tty.getvalue()
    assert "\r" in text and "10/10" in text and "total=2" in text
    assert "resumed from x\n" in text


def test_off_and_non_main_ranks():
    log = io.StringIO()
    quiet = Progress(show=False, stream=log)
    run(quiet, total=10)
    quiet.write("resumed from x")  # messages still reach rank 0's log
    assert log.getvalue() == "resumed from x\n"
    other = io.StringIO()
    rank1 = Progress(show=True, is_main=False, stream=other)
    run(rank1, total=10)
    rank1.write("resumed from x")
    assert other.getvalue() == ""
    with pytest.raises(ValueError, match="lines"):
        Progress(show=True, lines=0)
