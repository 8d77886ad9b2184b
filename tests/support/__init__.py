"""Test helpers shared by tests/unit and tests/e2e: recordings, the Envoy + sidecar harness,
upstream doubles, OTLP receivers."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_script(path: Path) -> ModuleType:
    """Import a repository script that is not in a package (protos/generate.py, deploy/render_rules.py)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
