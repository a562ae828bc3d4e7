"""The README's set-up commands stay true: CI runs the test command exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _commands_after(heading: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    (command,) = _commands_after("Run the tests")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines


def test_try_it_runs_the_reference_app_suite() -> None:
    (command,) = _commands_after("Try it")
    assert command.endswith(
        ".venv/bin/python -m pytest examples/reference_app -v -p no:randomly --fastsched-timeline"
    )
    assert (ROOT / "examples" / "reference_app" / "tests").is_dir()


@pytest.mark.parametrize("heading", ["Try it", "Run the tests"])
def test_readme_commands_install_every_example(heading: str) -> None:
    (command,) = _commands_after(heading)
    examples = sorted(path.parent.name for path in (ROOT / "examples").glob("*/pyproject.toml"))
    assert examples == ["reference_app", "reference_app_sync"]
    for example in examples:
        assert f" -e examples/{example} " in command
