"""The documentation stays navigable: README is a front door of at most 200 lines, and every
relative link in README.md, tests/README.md and docs/*.md reaches an existing file (and heading)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import REPO

PAGES = [REPO / "README.md", REPO / "tests" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '# comment' in a code block is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_readme_is_a_front_door_of_at_most_200_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


# A source path the docs or a module's docstring name: `extproc/server/processor.py`, `tests/unit/test_docs.py`.
SOURCE_PATH = re.compile(r"(?<![\w/.])((?:extproc|tests|bench)/[\w/]+\.py)\b")
# Named on purpose although absent: the file a reader would create (docs/providers.md's example).
TO_BE_WRITTEN = {"extproc/apis/acme.py"}
NAMING_PATHS = [*PAGES, *sorted((REPO / "extproc").rglob("*.py")), *sorted((REPO / "tests").rglob("*.py"))]


def test_every_source_path_named_in_the_docs_and_docstrings_exists():
    """A renamed or removed file leaves no reader at a dead end: every ``extproc/``, ``tests/`` or
    ``bench/`` path README.md, tests/README.md, docs/*.md and the package and test sources name
    is a file of the repository."""
    named: dict[str, set[str]] = {}
    for page in NAMING_PATHS:
        for path in SOURCE_PATH.findall(page.read_text()):
            named.setdefault(path, set()).add(str(page.relative_to(REPO)))
    assert len(named) > 20  # the pattern finds the paths the docs name
    missing = {path: sorted(where) for path, where in named.items() if not (REPO / path).is_file() and path not in TO_BE_WRITTEN}
    assert missing == {}


# A name docs/architecture.md gives with its file: `extproc/server/processor.py:Stream.handle`.
CODE_NAME = re.compile(r"(extproc/[\w/]+\.py):([A-Za-z_][\w.]*)")


def test_every_name_architecture_md_gives_with_its_file_is_defined_there():
    """docs/architecture.md sends a reader to a function or class in one hop: each ``file.py:name``
    it gives must be defined in that file (a wrong name is worse than none)."""
    refs = CODE_NAME.findall((REPO / "docs" / "architecture.md").read_text())
    assert len(refs) > 20
    missing = []
    for path, dotted in refs:
        source = REPO / path
        code = source.read_text() if source.is_file() else ""
        for name in dotted.split("."):
            if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]", code, re.M):
                missing.append(f"{path}:{dotted}")
                break
    assert missing == []
