"""Run the real topology as processes on free loopback ports: Envoy + the sidecar (+ an upstream).

with Stack(tmp_path, upstream_url) as s:
    httpx.post(s.url("/v1/chat/completions"), ...)
    entry = s.log_entry(request_id)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from extproc.devtools import envoy_config
from extproc.devtools.dev import envoy_command, free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """The samples of the sidecar's /metrics: (name, labels, value)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **match: str) -> float:
    return sum(v for n, labels, v in samples if n == name and all(labels.get(k) == w for k, w in match.items()))


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a file another process is appending to (Envoy's access log). A read can
    land in the middle of Envoy's write: the unterminated tail is not a line yet and is left for the next
    read, never parsed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


class Stack:
    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        sidecar_config: dict[str, Any] | None = None,
        jwks_json: str | None = None,
        workers: int = 1,
        start_sidecar: bool = True,
        envoy_args: tuple[str, ...] = (),
        envoy_concurrency: int = 2,
        sidecar_env: dict[str, str] | None = None,
        **bootstrap_kw: Any,
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.upstream_url = upstream_url
        self.port = free_port()
        self.admin_port = free_port()
        self.metrics_port = free_port()
        self.sidecar_port = free_port()
        self.access_log = self.dir / "access.log"
        self.sidecar_log = self.dir / "sidecar.log"
        self.envoy_log = self.dir / "envoy.log"
        cfg = {"listen": f"127.0.0.1:{self.sidecar_port}", **(sidecar_config or {})}
        self.sidecar_config_path = self.dir / "sidecar.yaml"
        self.sidecar_config_path.write_text(yaml.safe_dump(cfg))
        self.workers = workers
        self.sidecar_env = sidecar_env or {}  # extra environment for the sidecar process
        self.sidecar: subprocess.Popen | None = None
        self._log_start = 0  # sidecar log offset at its last start
        self.envoy: subprocess.Popen | None = None
        # CI machines are small and busy: a message_timeout miss makes Envoy proceed unobserved
        # (fail open), which would show as lost tokens. Tests about timeouts set their own.
        bootstrap_kw.setdefault("message_timeout_ms", 2000)
        boot = envoy_config.bootstrap(
            upstreams=bootstrap_kw.pop("upstreams", None) or [envoy_config.Upstream("/", upstream_url)],
            listen=f"127.0.0.1:{self.port}",
            extproc=cfg["listen"],
            jwks_json=jwks_json,
            access_log=str(self.access_log),
            admin=f"127.0.0.1:{self.admin_port}",
            **bootstrap_kw,
        )
        self.envoy_config_path = self.dir / "envoy.yaml"
        self.envoy_config_path.write_text(envoy_config.dump(boot))
        self._envoy_args = envoy_args
        self._envoy_concurrency = envoy_concurrency  # Envoy worker threads = HTTP/2 connections to the sidecar
        self._start_sidecar = start_sidecar

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Stack:
        try:
            if self._start_sidecar:
                self.start_sidecar()
            self.envoy = subprocess.Popen(
                envoy_command(self.envoy_config_path, "--concurrency", str(self._envoy_concurrency), *self._envoy_args),
                stdout=subprocess.DEVNULL,
                stderr=self.envoy_log.open("ab"),
            )
            wait_port(self.port, proc=self.envoy)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_sidecar(self, *extra: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "extproc",
            "serve",
            "--config",
            str(self.sidecar_config_path),
            "--metrics-port",
            str(self.metrics_port),
            "--workers",
            str(self.workers),
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.sidecar_env}
        self._log_start = self.sidecar_log.stat().st_size if self.sidecar_log.exists() else 0
        self.sidecar = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.sidecar_log.open("ab"))
        wait_port(self.sidecar_port, proc=self.sidecar)
        # The port accepts connections once bound, before the server serves: wait for every
        # worker's "listening" line, else Envoy's first streams may all reach one worker, or race
        # the start.
        self.wait_listening(self.workers)

    def listening_pids(self) -> set[int]:
        """Pids of the workers that logged "ext_proc listening" since the sidecar last started."""
        with self.sidecar_log.open("rb") as f:
            f.seek(self._log_start)
            data = f.read()
        lines = data[: data.rfind(b"\n") + 1].decode("utf-8", "replace").splitlines()  # complete lines only
        return {json.loads(line)["pid"] for line in lines if line.startswith("{") and '"ext_proc listening"' in line}

    def wait_listening(self, n: int, timeout: float = 20) -> set[int]:
        deadline = time.monotonic() + timeout
        while len(pids := self.listening_pids()) < n:
            assert self.sidecar is not None and self.sidecar.poll() is None, f"sidecar exited: {self.sidecar_stderr()[-2000:]}"
            assert time.monotonic() < deadline, f"{len(pids)} of {n} workers listening: {self.sidecar_stderr()[-2000:]}"
            time.sleep(0.05)
        return pids

    def stop_sidecar(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.sidecar is None:
            return None
        if self.sidecar.poll() is None:
            self.sidecar.send_signal(sig)
        try:
            return self.sidecar.wait(timeout)
        except subprocess.TimeoutExpired:
            self.sidecar.kill()
            return self.sidecar.wait()

    def close(self) -> None:
        for proc in (self.envoy, self.sidecar):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # ---- use ---------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_entries(self) -> list[dict[str, Any]]:
        return json_lines(self.access_log)

    def log_entry(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The access-log line of one request (tests send their own x-request-id)."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.log_entries():
                if entry.get("request_id") == request_id:
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no access-log line for request {request_id} in {timeout}s")
            time.sleep(0.05)

    def sidecar_stderr(self) -> str:
        return self.sidecar_log.read_text() if self.sidecar_log.exists() else ""

    def envoy_stat(self, name: str) -> int:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter={name}") as r:
            for line in r.read().decode().splitlines():
                key, _, value = line.partition(": ")
                if key == name:
                    return int(value)
        return 0
