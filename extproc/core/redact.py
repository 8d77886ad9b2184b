"""Which request headers may carry a credential: any whose name contains one of these words.

A pattern, not a list of known names: gateways and SDKs invent their own (``x-portkey-api-key``,
``cf-aig-authorization``, ``helicone-auth``, ``x-auth-token``...). Such headers never reach a span
(the ``request.headers`` CEL variable), a log line or a metric label (``stats.customLabels[].header``
refuses them); see docs/security.md.
"""

from __future__ import annotations

import re
from functools import lru_cache

CREDENTIAL_WORDS = ("auth", "key", "token", "secret", "cookie", "password", "passwd", "session", "credential", "signature")
_CREDENTIAL = re.compile("|".join(CREDENTIAL_WORDS))


@lru_cache(maxsize=1024)
def is_credential_header(name: str) -> bool:
    """True if the (any-case) header name contains a credential word."""
    return _CREDENTIAL.search(name.lower()) is not None


def safe_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` without pseudo-headers and without any header that may carry a credential."""
    return {k: v for k, v in headers.items() if k[:1] != ":" and not is_credential_header(k)}
