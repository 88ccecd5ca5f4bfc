"""The README's main command on the real demo pair (needs the `demo` extra; minutes on CPU)."""

from __future__ import annotations

import pytest

from optimal_sampling.cli import main

README_PROMPT = "Write a Python function that checks whether a number is prime."


@pytest.mark.slow
def test_readme_command_on_the_demo_pair(capsys):
    from optimal_sampling.models import demo

    base, teacher = demo.resolve_demo_pair()  # assembles, verifies the pinned SHA-256, converts once
    assert base.name.endswith(demo.DEMO_BASE_MODEL.sha256[:12])
    assert teacher.name.endswith(demo.DEMO_TEACHER_MODEL.sha256[:12])
    assert main(["generate", "--prompt", README_PROMPT, "--max-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("--- prompt 0, sample 0 (")
    assert lines[1].strip() and lines[2].startswith("[alpha mean")
