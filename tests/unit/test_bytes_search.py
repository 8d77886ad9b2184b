"""The per-chunk and per-event code (``extproc.codecs``, ``extproc.apis``) never tests a bytes
literal's presence with ``in``: on CPython 3.11 ``bytes.__contains__`` first tries its operand
as an integer (``b"x" in data`` could mean a byte value), so a bytes operand raises a
``TypeError``, formats its message and clears it before the substring search runs (~70 ns a
test, and every streamed chunk tests at least one). ``data.find(b"x") >= 0`` searches directly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import extproc

ROOT = Path(extproc.__file__).parent
HOT = ("codecs", "apis")


def bytes_literal_in_tests(source: str) -> list[str]:
    """``b"..." in x`` / ``b"..." not in x`` in a module's source, as ``line: source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and isinstance(node.left.value, bytes):
            if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                out.append(f"{node.lineno}: {ast.unparse(node)}")
    return out


def test_the_check_finds_a_bytes_literal_tested_with_in() -> None:
    source = 'def f(data: bytes) -> bool:\n    return data.find(b"x") >= 0 or b"\\r" not in data or "s" in "str"\n'
    assert bytes_literal_in_tests(source) == ["2: b'\\r' not in data"]


def test_no_bytes_literal_is_tested_with_in_on_the_chunk_path() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{hit}"
        for layer in HOT
        for path in sorted((ROOT / layer).rglob("*.py"))
        for hit in bytes_literal_in_tests(path.read_text())
    ]
    assert found == [], "use data.find(b'...') >= 0 (see this module's docstring):\n" + "\n".join(found)
