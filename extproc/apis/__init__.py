"""One parser module per API schema, discovered here.

Each module (every one but ``base``, ``finish`` and ``routing``) declares:

- ``ROUTES``: path patterns mapped to its parser classes (``extproc.apis.routing.route``);
- ``PROVIDERS``: the providers it serves (``routing.Provider``: label name, GenAI
  semantic-convention name, host suffixes, price catalogue ids); may be empty;
- ``FINISH_REASONS``: its API's raw finish reasons -> the six normalised ones
  (``extproc.apis.finish``); may be empty;
- ``ORDER``: where its routes stand in the match order, lowest first. Specific patterns go
  first; the OpenAI module's generic suffixes (``/chat/completions``...) come last.

Adding a provider is adding its module (plus its recordings and case rows in the tests; see
docs/providers.md): the router, the host table, the tracing names, the price catalogue ids and
the finish-reason table are built from these.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from types import ModuleType

from extproc.apis.routing import Provider, Route

_NOT_PARSERS = frozenset({"base", "finish", "routing"})


@lru_cache(maxsize=1)
def modules() -> tuple[ModuleType, ...]:
    found = [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if m.name not in _NOT_PARSERS and not m.name.startswith("_")
    ]
    for module in found:
        for attr in ("ROUTES", "PROVIDERS", "ORDER", "FINISH_REASONS"):
            if not hasattr(module, attr):
                raise TypeError(f"{module.__name__} must declare {attr} (see extproc/apis/__init__.py)")
    return tuple(sorted(found, key=lambda m: (m.ORDER, m.__name__)))


def all_routes() -> list[Route]:
    return [r for m in modules() for r in m.ROUTES]


def all_providers() -> list[Provider]:
    return [p for m in modules() for p in m.PROVIDERS]
