"""Envoy's names (filters, extensions, metadata namespaces, the ext_proc service) are spelled once,
in ``extproc.core.envoy_names``: no other module under ``extproc/`` writes one as a string literal
(docstrings and comments may name them in prose)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import extproc
from extproc.core import envoy_names

ROOT = Path(extproc.__file__).parent
NAMES = {k: v for k, v in vars(envoy_names).items() if k.isupper() and isinstance(v, str)}
# Any dotted Envoy name, so a new one added elsewhere is caught too (not "envoy.yaml").
ENVOY_DOTTED = re.compile(r"\benvoy\.[a-z0-9_]+\.[a-z0-9_]")


def docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def spelled_names(source: str) -> list[tuple[int, str]]:
    """(line, literal) of each string literal, docstrings aside, that spells an Envoy name."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            if ENVOY_DOTTED.search(text) or any(text == v or ("." in v and v in text) for v in NAMES.values()):
                found.append((node.lineno, text))
    return found


def test_the_names_module_defines_the_shared_names():
    assert NAMES["EXT_PROC_FILTER"] == "envoy.filters.http.ext_proc"
    assert NAMES["JWT_AUTHN_NAMESPACE"] == "envoy.filters.http.jwt_authn"
    assert NAMES["AI_GATEWAY_NAMESPACE"] == "ai.gateway.kgateway.dev"
    assert NAMES["EXT_PROC_METHOD"] == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def test_the_check_finds_a_name_spelled_as_a_literal():
    src = 'X = 1\nF = f"%DYNAMIC_METADATA(envoy.filters.http.jwt_authn:{X})%"\nN = "ai.gateway.kgateway.dev"\n'
    assert sorted(line for line, _ in spelled_names(src)) == [2, 3]
    assert spelled_names('"""Reads ``envoy.filters.http.ext_proc`` attributes."""\nPATH = "envoy.yaml"\n') == []


def test_no_module_but_envoy_names_spells_an_envoy_name():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "_pb" or rel == Path("core/envoy_names.py"):
            continue  # generated stubs; the one definition
        offenders += [f"{rel}:{line}: {text!r}" for line, text in spelled_names(path.read_text())]
    assert offenders == []
