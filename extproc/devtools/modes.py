"""The ext_proc modes ``extproc envoy-config --mode`` and ``extproc dev --mode`` offer.

A mode is how Envoy's ext_proc filter talks to the sidecar: which messages it sends and whether it
waits for the replies. Kept apart from ``envoy_config`` (which needs the ``dev`` extra and ~1 s to
import) so the command line can list the modes without loading it. docs/performance.md has the
measurements behind each trade.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    observability: bool  # Envoy's observability_mode: sends messages, never waits, ignores replies
    fewer_messages: bool  # no headers messages (headers read as attributes), both bodies streamed

    def comment(self) -> str:
        """The line a generated config's header gets for this mode ('' for the default)."""
        name = next(n for n, m in MODES.items() if m == self)
        return "" if name == DEFAULT else f"# {name} mode (`--mode {name}`; docs/performance.md).\n"


DEFAULT = "headers"
MODES = {
    DEFAULT: Mode(observability=False, fewer_messages=False),
    "fewer-messages": Mode(observability=False, fewer_messages=True),
    "observability": Mode(observability=True, fewer_messages=False),
    "observability-fewer-messages": Mode(observability=True, fewer_messages=True),
}

HELP = (
    "ext_proc mode. headers (default): Envoy waits for each reply (bounded by the 500 ms message "
    "timeout), and the sidecar's dynamic metadata (tokens, cost_usd) reaches the access log and "
    "budgets. fewer-messages: 2-3 messages per call instead of 4-5, with gaps (body-less responses, "
    "request headers beyond a fixed list). observability: Envoy never waits for the sidecar (a slow "
    "sidecar adds no latency) but ignores its replies, so NO token or cost fields in the access log and no "
    "budgets (metrics and traces only); when the sidecar falls behind, Envoy sheds whole calls "
    "(unobserved) past 128 connections x 8 streams to it. observability-fewer-messages: both. "
    "docs/performance.md"
)
