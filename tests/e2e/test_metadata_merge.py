"""How a real Envoy combines the dynamic metadata of successive ext_proc replies.

The sidecar's replies each carry some of the call's fields (``extproc.telemetry.metadata``); what
the access log prints depends on whether Envoy merges a reply's namespace struct field by field
into what earlier replies set, or replaces it. Here a sidecar whose replies carry chosen fields
(reply 1: ``model``, reply 2: ``provider``, every reply: ``prompt_tokens`` = its number) shows it,
in each ext_proc mode.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from extproc._pb.envoy_api import external_processor_pb2 as pb
from extproc.core import config
from extproc.devtools.envoy_config import DEFAULT_NAMESPACE
from extproc.server.processor import Processor, Stream
from tests.support.harness import Stack
from tests.support.inproc_sidecar import InProcessSidecar

pytestmark = pytest.mark.integration

MODES = {"default": {}, "fewer-messages": {"fewer_messages": True}, "observability": {"observability_mode": True}}


class _NumberedReplies:
    """A stream whose every reply carries only the fields chosen for its number (and, in
    observability mode, a reply at all: the real sidecar sends none there)."""

    def __init__(self, inner: Stream, sent: list[int]) -> None:
        self._inner = inner
        self._sent = sent
        self._n = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def handle(self, req: pb.ProcessingRequest) -> bytes:
        reply = self._inner.handle(req)
        r = pb.ProcessingResponse.FromString(reply) if reply is not None else pb.ProcessingResponse()
        if reply is None:
            getattr(r, req.WhichOneof("request")).SetInParent()  # a plain continue
        self._n += 1
        fields: dict[str, Any] = {"prompt_tokens": self._n}
        if self._n == 1:
            fields["model"] = "set-by-reply-1"
        if self._n == 2:
            fields["provider"] = "set-by-reply-2"
        r.ClearField("dynamic_metadata")
        r.dynamic_metadata.fields[DEFAULT_NAMESPACE].struct_value.update(fields)
        self._sent.append(self._n)
        return r.SerializeToString()

    def handle_body_chunk(self, body: bytes) -> bytes:  # a streamed chunk read from its bytes: numbered too
        return self.handle(pb.ProcessingRequest(response_body=pb.HttpBody(body=body)))


class _NumberingProcessor(Processor):
    sent: list[int] = []

    def open_stream(self, metadata: Mapping[str, Any] | None = None) -> Any:
        return _NumberedReplies(super().open_stream(metadata), self.sent)

    def close_stream(self, stream: Any) -> None:
        super().close_stream(stream._inner)


@pytest.mark.parametrize("mode", MODES)
def test_envoy_merges_each_replys_metadata_field_by_field(tmp_path, mock_llm, mode):
    """Default and fewer-messages modes: a field set by an earlier reply survives later replies
    that do not mention it, and a field set again takes the later value (``prompt_tokens`` is the
    last reply's number): Envoy merges the namespace field by field, so a reply need only carry
    the fields that changed. Observability mode: Envoy ignores every reply, metadata included."""
    stack = Stack(tmp_path, mock_llm, start_sidecar=False, **MODES[mode])
    cfg = config.parse({"listen": f"127.0.0.1:{stack.sidecar_port}"})
    _NumberingProcessor.sent = sent = []
    sidecar = InProcessSidecar(cfg, [], processor=_NumberingProcessor)
    try:
        with stack:
            rid = str(uuid.uuid4())
            r = httpx.post(
                stack.url("/v1/chat/completions"),
                headers={"x-request-id": rid},
                timeout=20,
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12
            entry = stack.log_entry(rid)
    finally:
        sidecar.close()
    assert len(sent) >= 2, sent  # at least the two replies the check needs
    if mode == "observability":
        assert (entry["model"], entry["provider"], entry["prompt_tokens"]) == (None, None, None), entry
    else:
        assert entry["model"] == "set-by-reply-1", entry
        assert entry["provider"] == "set-by-reply-2", entry
        assert entry["prompt_tokens"] == len(sent), (entry, sent)
