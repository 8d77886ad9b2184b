"""Command line: ``extproc serve``, ``extproc dev``, ``extproc mock-llm``, ``extproc envoy-config``."""
from __future__ import annotations

import argparse
import os
import sys

from extproc.config import ConfigError


def _serve(args: argparse.Namespace) -> int:
    from extproc import app, config, logs, server

    try:
        cfg = config.load(args.config)
        if args.listen or args.metrics_port is not None:
            data = cfg.model_dump(by_alias=True)
            if args.listen:
                data["listen"] = args.listen
            if args.metrics_port is not None:
                data["stats"]["port"] = args.metrics_port
            cfg = config.parse(data, "command line")
    except ConfigError as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.logging.level)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    try:
        return server.serve(cfg, workers, app.observers)
    except OSError as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 1


def _envoy_config(args: argparse.Namespace) -> int:
    from extproc import envoy_config

    sys.stdout.write(envoy_config.dump(envoy_config.reference(), envoy_config.HEADER))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="extproc", description="Envoy ext_proc sidecar for LLM traffic observability")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the ext_proc gRPC service")
    s.add_argument("--config", help="YAML config file (see README)")
    s.add_argument("--listen", help="override config 'listen' (host:port or unix:/path)")
    s.add_argument("--workers", type=int, help="worker processes sharing the port (default: CPU count)")
    s.add_argument("--metrics-port", type=int, help="override config 'stats.port'")
    s.set_defaults(func=_serve)

    d = sub.add_parser("dev", help="run Envoy + sidecar + mock LLM locally (what `make run` does)")
    from extproc import dev

    dev.add_arguments(d)
    d.set_defaults(func=dev.run)

    m = sub.add_parser("mock-llm", help="run the built-in OpenAI-compatible mock upstream")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8000)
    m.set_defaults(func=lambda a: __import__("extproc.mock_llm", fromlist=["main"]).main(["--host", a.host, "--port", str(a.port)]) or 0)

    e = sub.add_parser("envoy-config", help="print the reference Envoy config")
    e.set_defaults(func=_envoy_config)

    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
