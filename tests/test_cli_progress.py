"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import io

from optimal_sampling.jobs.progress import Progress, format_duration


def test_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=4, done=1, stream=stream, interval_s=0.0)
    progress.add_tokens(10)
    progress.add_sample()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("optimal-sampling: 1/4 samples (25%), 10 tokens")
    assert "2/4 samples (50%)" in lines[1] and "tok/s" in lines[1] and "ETA" in lines[1]
    assert lines[-1].startswith("optimal-sampling: 1 samples, 10 tokens in")


def test_bar_on_a_terminal():
    stream = io.StringIO()
    progress = Progress(total=3, stream=stream, tty=True)
    progress.add_tokens(5)
    progress.add_sample()
    progress.close()
    text = stream.getvalue()
    assert "1/3" in text and "tok/s" in text and "\r" in text


def test_quiet_and_duration_format():
    stream = io.StringIO()
    progress = Progress(total=2, stream=stream, enabled=False, interval_s=0.0)
    progress.add_sample()
    progress.close()
    assert stream.getvalue() == ""
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"
