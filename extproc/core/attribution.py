"""Who a call was for: the end user, the session, and an id for the caller's API key.

Read once per call from its request headers (the parsers add the body's end user, see
``extproc.apis``), configured by ``attribution`` (``extproc.core.config.AttributionConfig``).

- ``session_id``: the first configured session header present (default ``x-session-id``, then
  ``agent-session-id``). This explicit read is separate from the generic ``request.headers``
  export, which still drops every header whose name contains "session" (``extproc.core.redact``).
- ``end_user``: ``attribution.endUserHeader`` when set and present, else what the request body
  says (OpenAI ``user``/``safety_identifier``, Anthropic ``metadata.user_id``).
- ``key_id``: ``HMAC-SHA256(secret, api_key)``, the first 12 hex characters, from
  ``authorization: Bearer <key>``, else ``x-api-key``, ``api-key``, ``x-goog-api-key``. Off unless
  a secret is configured (a bare hash of a key could be brute-forced from a leaked id; the keyed
  hash cannot without the secret). The key itself never leaves this function. Operators map ids
  to owners offline with the same computation (docs/security.md).

Values are strings cut to 128 characters; nothing here decodes a token.
"""

from __future__ import annotations

import hashlib
import hmac

from extproc.core.bounded import clip
from extproc.core.call import Call
from extproc.core.config import AttributionConfig

KEY_ID_CHARS = 12
# Headers that carry the caller's API key, in the order they are looked at.
KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


def key_id(secret: bytes, key: str) -> str:
    """The id of ``key`` under ``secret`` (what ``key_id`` shows; also for mapping ids offline)."""
    return hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:KEY_ID_CHARS]


def api_key(headers: dict[str, str]) -> str | None:
    """The caller's API key from its request headers (lower-case names), or None."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for name in KEY_HEADERS:
        key = headers.get(name, "").strip()
        if key:
            return key
    return None


class Attribution:
    """The ``attribution`` settings, applied to each call's request headers."""

    __slots__ = ("session_headers", "end_user_header", "_secret")

    def __init__(self, cfg: AttributionConfig) -> None:
        self.session_headers = tuple(cfg.session_headers)
        self.end_user_header = cfg.end_user_header
        self._secret = cfg.secret()

    def read(self, call: Call) -> None:
        headers = call.headers
        for name in self.session_headers:
            value = headers.get(name)
            if value:
                call.session_id = clip(value)
                break
        if self.end_user_header is not None:
            value = headers.get(self.end_user_header)
            if value:
                call.end_user_header = clip(value)
        if self._secret is not None:
            key = api_key(headers)
            if key is not None:
                call.key_id = key_id(self._secret, key)
