"""`make help` lists every target the Makefile declares, each with its one-line description."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.support import REPO


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_help_lists_every_phony_target_with_a_description():
    makefile = (REPO / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())  # type: ignore[union-attr]
    out = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "help"], capture_output=True, text=True, check=True).stdout
    listed = {}
    for line in out.splitlines():
        target, _, doc = line.strip().partition(" ")
        listed[target] = doc.strip()
    assert set(listed) == phony
    assert all(listed.values()), [t for t, d in listed.items() if not d]
