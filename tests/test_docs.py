"""The docs document every flag of both scripts (the full reference is docs/reference.md),
the README lists the current signatures of the functions it offers for notebooks, every
relative link of the docs points to a file that exists, and the README's test command is
what CI runs."""
import inspect
import re
from pathlib import Path

import generate
import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _flags(parser):
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"]


def test_readme_lists_every_flag():
    text = "\n".join(page.read_text() for page in [README, *DOCS])
    missing = [f for f in _flags(main.build_parser()) + _flags(generate.build_parser())
               if f"`{f}" not in text]
    assert not missing, f"flags missing from README.md and docs/*.md: {missing}"


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
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
    readme = README.read_text()
    listed = re.findall(r"^\| `(main|generate)\.(\w+)\((.*?)\)`", readme, flags=re.M)
    assert len(listed) >= 5, "the README's 'Use it from Python' table moved"
    for module, name, args in listed:
        function = getattr({"main": main, "generate": generate}[module], name)
        assert f"{name}({args})" == _call(function), f"README's {module}.{name} is out of date"


# [text](target) and ![alt](target), outside code spans and fenced code blocks
_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return _LINK.findall(text)


def test_every_relative_link_of_the_docs_points_to_a_file_that_exists():
    broken = []
    for page in [README, *DOCS]:
        for target in _links(page):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not (path.exists() and path.is_relative_to(ROOT)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"
    assert DOCS, "docs/*.md is missing"
