"""The README documents every flag of both scripts, and its test command is what CI runs."""
from pathlib import Path

import generate
import main

ROOT = Path(__file__).resolve().parents[1]


def _flags(parser):
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


def test_readme_lists_every_flag():
    readme = (ROOT / "README.md").read_text()
    missing = [f for f in _flags(main.build_parser()) + _flags(generate.build_parser())
               if f"`{f}" not in readme]
    assert not missing, f"flags missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q" in readme
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
