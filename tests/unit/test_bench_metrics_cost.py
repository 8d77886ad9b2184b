"""`python -m bench.metrics_cost --checkout DIR`: each checkout measured with its own ``extproc``."""

from __future__ import annotations

from pathlib import Path

import pytest

import extproc
from bench import metrics_cost


def _checkout(path: Path) -> Path:
    """A checkout of its own: this repository's ``extproc`` linked under another directory, so
    the code is the same but the path it is imported from tells the checkouts apart."""
    path.mkdir()
    (path / "extproc").symlink_to(Path(extproc.__file__).parent, target_is_directory=True)
    return path


def test_each_checkout_is_measured_with_the_extproc_it_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _checkout(tmp_path / "a"), _checkout(tmp_path / "b")
    metrics_cost.main(["--checkout", str(a), "--checkout", str(b), "--mode", "single", "-n", "200", "--reps", "1"])
    out = capsys.readouterr().out
    for c in (a, b):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{c.resolve()}:"))
        assert float(line.split("median ")[1].split()[0]) > 0


def test_a_checkout_without_extproc_is_an_error_not_a_measurement_of_the_installed_code(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not of the checkout"):
        metrics_cost.main(["--checkout", str(tmp_path), "--mode", "single", "-n", "200", "--reps", "1"])
