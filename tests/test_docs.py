"""The README documents every flag of both scripts and the signatures of the functions it
lists for notebooks, and its test command is what CI runs."""
import inspect
import re
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


def _call(function) -> str:
    """`name(a, b=1, c="x")` as the README writes a signature (no annotations)."""
    def param(p):
        if p.default is inspect.Parameter.empty:
            return p.name
        default = p.default.__name__ if callable(p.default) else repr(p.default).replace("'", '"')
        return f"{p.name}={default}"
    return f"{function.__name__}({', '.join(map(param, inspect.signature(function).parameters.values()))})"


def test_readme_signatures_of_the_python_api_are_current():
    readme = (ROOT / "README.md").read_text()
    listed = re.findall(r"^\| `(main|generate)\.(\w+)\((.*?)\)`", readme, flags=re.M)
    assert len(listed) >= 5, "the README's 'Use it from Python' table moved"
    for module, name, args in listed:
        function = getattr({"main": main, "generate": generate}[module], name)
        assert f"{name}({args})" == _call(function), f"README's {module}.{name} is out of date"
