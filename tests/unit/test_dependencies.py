"""Every third-party module the package imports comes from a distribution pyproject.toml
declares: a module that arrives only as another package's dependency can vanish (or change) with
that package's next release, and the wheel's users would get an ImportError at run time."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import extproc

ROOT = Path(extproc.__file__).parent
PYPROJECT = ROOT.parent / "pyproject.toml"


def _declared() -> dict[str, set[str]]:
    """Normalised distribution names per group: the dependencies, and each optional extra."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project.get("optional-dependencies", {})}
    return {group: {_norm(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0]) for spec in specs} for group, specs in groups.items()}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared = _declared()
    allowed = declared["dependencies"] | declared.get("dev", set())  # devtools need the dev extra (cli says so)
    distributions = packages_distributions()
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        if "_pb" in path.parts:  # generated stubs: protobuf and grpc, both declared
            continue
        for module in sorted(_top_level_imports(path)):
            if module in sys.stdlib_module_names or module in ("extproc", "__future__"):
                continue
            dists = {_norm(d) for d in distributions.get(module, [])}
            if not dists & allowed:
                missing.append(f"{path.relative_to(ROOT.parent)}: {module} (from {sorted(dists) or 'no installed distribution'})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import multidict\nfrom h2.connection import H2Connection\nimport os\n")
    assert _top_level_imports(module) == {"multidict", "h2", "os"}
    assert "multidict" in {_norm(d) for d in packages_distributions()["multidict"]}
