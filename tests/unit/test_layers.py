"""The package's layers, lowest first; a module may import its own layer and the ones below,
never one above (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import extproc

LAYERS = (
    ("extproc._pb", "extproc.core"),  # generated stubs; config, the call record, CEL, logging
    ("extproc.codecs",),  # framing and Content-Encoding: SSE, AWS event stream, gzip/br/zstd
    ("extproc.apis",),  # one parser per API schema, routing
    ("extproc.telemetry",),  # dynamic metadata, metrics, tracing: observers of finished calls
    ("extproc.server",),  # the ext_proc servicer, gRPC server, workers, supervisor
    ("extproc.devtools",),  # dev stack, mock LLM, Envoy config generation
    ("extproc.cli", "extproc.__main__", "extproc.spend"),  # the command line and its reports
)
ROOT = Path(extproc.__file__).parent


def layer_of(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names if n.startswith("extproc")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("extproc")]
    return out


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def test_every_module_has_a_layer():
    unplaced = [m for m, _ in modules() if m != "extproc" and layer_of(m) is None]
    assert unplaced == []


def test_lower_layers_never_import_upper_ones():
    violations = []
    for module, path in modules():
        own = layer_of(module)
        if own is None:
            continue
        for line, target in imports(path):
            # `from extproc.x import y` names both extproc.x and extproc.x.y: judge the deepest known
            target_layer = layer_of(target)
            if target_layer is not None and target_layer > own:
                violations.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert violations == []


def test_serve_never_imports_envoy_data_plane(tmp_path):
    """envoy-data-plane is for config generation (the `dev` extra, ~1 s to import): a running
    `extproc serve`, its workers included, must not import it (the sidecar image lacks it)."""
    import signal
    import subprocess
    import sys
    import time

    from extproc.devtools.dev import free_port, wait_port

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "extproc",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-port",
        str(free_port()),
        "--workers",
        "1",
    ]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_port(port, proc=proc)
            deadline = time.monotonic() + 20
            while b"ext_proc listening" not in log.read_bytes():
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    imported = [line.rsplit("|", 1)[-1].strip() for line in log.read_text().splitlines() if line.startswith("import time:")]
    assert "extproc.server.processor" in imported  # the trace covers the serving path
    assert not [m for m in imported if m.startswith(("envoy_data_plane", "betterproto2", "extproc.devtools.envoy_config"))]
