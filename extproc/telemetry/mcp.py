"""``mcp_requests_total{method,tool,status}``: one count per MCP JSON-RPC request seen.

``status`` is ``ok``, ``error`` (a JSON-RPC error), ``tool_error`` (the tool reported
``isError``), ``http_error`` (HTTP status >= 400 without a JSON-RPC error) or the call's outcome
(``client_abort``, ``no_response``). ``method`` is one of the MCP spec's methods or ``other``, so a
client cannot grow the label set; ``tool`` is the tool name (``tools/call`` only, else empty), a
client's choice: cut to 128 characters, capped at ``stats.maxLabelValues`` distinct values (label
``mcp_tool`` in ``ai_label_values_overflow_total``) and ``stats.maxSeries`` series, like the AI
metrics' labels.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from extproc.apis.mcp import method_label
from extproc.core.bounded import clip
from extproc.core.call import CLIENT_ABORT, NO_RESPONSE, Call
from extproc.core.config import StatsConfig
from extproc.telemetry.labels import LabelGuard, SeriesBudget, folded

MCP_REQUESTS = Counter("mcp_requests", "MCP JSON-RPC requests seen through Envoy.", ["method", "tool", "status"])


def status(call: Call) -> str:
    x = call.obs.extra
    if "jsonrpc.error_code" in x or call.obs.error_type == "jsonrpc_error":
        return "error"
    if call.obs.error_type == "tool_error":
        return "tool_error"
    if call.status >= 400:
        return "http_error"
    if call.outcome in (CLIENT_ABORT, NO_RESPONSE):
        return call.outcome
    return "ok"


class McpMetrics:
    """Call observer counting MCP requests (other calls cost one comparison). ``metrics``: the AI
    metrics' instruments, whose overflow counters count this observer's folds too."""

    def __init__(self, stats: StatsConfig, metrics: Any = None) -> None:
        self.guard = LabelGuard(stats.max_label_values)
        self.budget = SeriesBudget(stats.max_series)
        self.metrics = metrics
        self._children: dict[tuple[str, str, str], Any] = {}

    def on_call_end(self, call: Call) -> None:
        if call.api != "mcp" or "mcp.method" not in call.obs.extra:
            return  # GET /mcp (the server's event stream), DELETE (session end): no JSON-RPC request
        x = call.obs.extra
        method = x["mcp.method"]
        tool = self.guard.fold("mcp_tool", clip(x.get("mcp.tool", ""))) if method == "tools/call" else ""
        labels = (method_label(method), tool, status(call))
        child = self._children.get(labels)
        if child is None:
            if self.budget.admit(MCP_REQUESTS._name, labels):
                child = self._children[labels] = MCP_REQUESTS.labels(*labels)
            else:
                child = MCP_REQUESTS.labels(*folded(labels, (0, 2)))  # method and status: fixed sets
        m = self.metrics
        if m is not None and (self.guard.overflowed or self.budget.folded):
            for label, n in self.guard.take_overflows().items():
                m.overflow.labels(label).inc(n)
            for family, n in self.budget.take_folded().items():
                m.series_overflow.labels(family).inc(n)
        child.inc()
