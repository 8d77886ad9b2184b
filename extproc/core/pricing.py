"""The price of one LLM call in US dollars, from the usage the provider reported.

Prices come from configured overrides first (``pricing.models``: negotiated discounts, self-hosted
models, fine-tunes, models newer than the catalogue), then from the ``genai-prices`` catalogue
(pinned in pyproject; its data ships in the wheel, no network). See docs/cost.md.

The usage it reads is already in one meaning whatever the API (the parsers normalise it:
``extproc.core.observation.Usage``): ``input`` = every prompt token, cache reads and writes
included; ``output`` = every generated token, reasoning included. That is also ``genai-prices``'
form, so no schema knowledge lives here: the breakdowns (cache read, cache write) set the rates.

:meth:`Pricer.price` never raises: a model nobody prices, a call without usage, or usage the
catalogue finds inconsistent becomes :class:`Unpriced` with a reason.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from extproc.core.observation import Usage

log = logging.getLogger("extproc.core.pricing")

UnpricedReason = Literal["disabled", "unknown_model", "no_usage", "error"]
_LOOKUP_CACHE_MAX = 4096


# ---- configuration ----------------------------------------------------------------------------
class _Section(BaseModel):
    # Same rules as extproc.core.config's sections (camelCase keys, unknown keys refused); declared here
    # so this module does not import extproc.core.config, which imports it.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


# The most a pricing override may charge, USD per million tokens (public prices are below $1,000).
MAX_PER_MILLION = 1e6


class ModelPrice(_Section):
    """One override: ``{model: acme-large, inputPerMillion: 2.0, outputPerMillion: 8.0}``.

    ``model`` is an exact name, ``modelRegex`` a regular expression (searched, like
    ``providers.routes.pathRegex``: anchor it with ``^...$`` for a whole-name match). Either is
    tried against the request model and the response model. ``provider`` limits it to one of our
    provider names (the ``llm`` label). Rates are USD per million tokens.
    """

    model: str | None = Field(None, min_length=1)
    model_regex: str | None = Field(None, min_length=1)
    provider: str | None = Field(None, min_length=1)
    # Each rate 0 .. MAX_PER_MILLION (finite): with token counts bounded too (apis.base.MAX_TOKENS)
    # a call's cost, and every total and charge summed from it, stays finite.
    input_per_million: float = Field(ge=0, le=MAX_PER_MILLION, allow_inf_nan=False)  # non-cached input
    output_per_million: float = Field(ge=0, le=MAX_PER_MILLION, allow_inf_nan=False)  # output, reasoning included
    cached_input_per_million: float | None = Field(None, ge=0, le=MAX_PER_MILLION, allow_inf_nan=False)  # default: input rate
    cache_write_per_million: float | None = Field(None, ge=0, le=MAX_PER_MILLION, allow_inf_nan=False)  # default: input rate

    @field_validator("model_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v

    @model_validator(mode="after")
    def _one_name(self) -> ModelPrice:
        if (self.model is None) == (self.model_regex is None):
            raise ValueError("set exactly one of model or modelRegex")
        return self


class PricingConfig(_Section):
    """The ``pricing`` section: on by default; overrides are checked first, in order."""

    enabled: bool = True
    models: list[ModelPrice] = Field(default_factory=list)


# ---- results ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Cost:
    """A priced call, in USD. ``model`` is the name it was priced as (catalogue id or the
    override's model/modelRegex); ``source`` is ``override`` or ``catalogue``."""

    total: float
    input: float
    output: float
    model: str
    source: Literal["override", "catalogue"]


@dataclass(frozen=True, slots=True)
class Unpriced:
    reason: UnpricedReason


DISABLED = Unpriced("disabled")
UNKNOWN_MODEL = Unpriced("unknown_model")
NO_USAGE = Unpriced("no_usage")
ERROR = Unpriced("error")


# ---- the calculator ---------------------------------------------------------------------------
class _Override:
    __slots__ = ("spec", "name", "regex", "provider", "rates")

    def __init__(self, spec: ModelPrice) -> None:
        self.spec = spec
        self.name = spec.model
        self.regex = re.compile(spec.model_regex) if spec.model_regex is not None else None
        self.provider = spec.provider
        inp = spec.input_per_million
        self.rates = (
            inp,
            spec.output_per_million,
            inp if spec.cached_input_per_million is None else spec.cached_input_per_million,
            inp if spec.cache_write_per_million is None else spec.cache_write_per_million,
        )

    def matches(self, provider: str, models: tuple[str, ...]) -> bool:
        if self.provider is not None and self.provider != provider:
            return False
        if self.regex is not None:
            return any(self.regex.search(m) for m in models)
        return self.name in models

    def cost(self, u: Usage) -> Cost | Unpriced:
        cache_read, cache_write = u.cached_input_tokens or 0, u.cache_creation_input_tokens or 0
        uncached = (u.input_tokens or 0) - cache_read - cache_write
        if uncached < 0:
            return ERROR
        inp, out, read, write = self.rates
        in_usd = (uncached * inp + cache_read * read + cache_write * write) / 1e6
        out_usd = (u.output_tokens or 0) * out / 1e6
        return _rounded(in_usd + out_usd, in_usd, out_usd, self.spec.model or self.spec.model_regex or "", "override")


# A Cost's fields set through their slots: the frozen dataclass's ``__init__`` sets each with
# ``object.__setattr__`` looked up per field (~0.43 us a Cost; this ~0.25). Only here, where a Cost
# is made per priced call; the object is the same (``tests/unit/test_response_parse.py``).
_new_cost = object.__new__
_cost_fields = tuple(Cost.__dict__[name].__set__ for name in ("total", "input", "output", "model", "source"))
assert tuple(f.name for f in fields(Cost)) == ("total", "input", "output", "model", "source")


def _rounded(total: float, in_usd: float, out_usd: float, model: str, source: Literal["override", "catalogue"]) -> Cost:
    """A cost to the pico-dollar: 7.5e-06, not 7.499999999999999e-06."""
    cost = _new_cost(Cost)
    set_total, set_input, set_output, set_model, set_source = _cost_fields
    set_total(cost, round(total, 12))
    set_input(cost, round(in_usd, 12))
    set_output(cost, round(out_usd, 12))
    set_model(cost, model)
    set_source(cost, source)
    return cost


class Pricer:
    """Prices calls with one configuration; build a new one on reload. Not thread-safe (one per
    worker event loop). The catalogue is imported on first use, only when pricing is enabled."""

    def __init__(self, config: PricingConfig | None = None, catalogue: Mapping[str, tuple[str, ...]] | None = None) -> None:
        """``catalogue``: our provider name -> its ``genai-prices`` provider ids, tried in order
        (each provider module declares its own; ``extproc.apis.routing.catalogue_ids``). A
        provider absent from it (Ollama, a self-hosted server, ``unknown``) is priced only by
        an override."""
        self.config = config or PricingConfig()
        self._ids = dict(catalogue or {})
        self.enabled = self.config.enabled
        self._overrides = tuple(_Override(m) for m in self.config.models)
        self._override_cache: dict[tuple[str, tuple[str, ...]], _Override | None] = {}
        # (our provider, model) -> (genai-prices Provider, ModelInfo), or None: not in the catalogue
        self._lookup: dict[tuple[str, str], tuple[Any, Any] | None] = {}
        self._snapshot: Any = None
        # (id(ModelInfo), service tier) -> (monotonic expiry, _Plan or None: use the library)
        self._plans: dict[tuple[int, str | None], tuple[float, _Plan | None]] = {}
        self.errors = 0  # calls the catalogue refused (inconsistent usage, library failure)

    def price(
        self,
        provider: str,
        request_model: str | None,
        response_model: str | None,
        usage: Usage,
        service_tier: str | None = None,
    ) -> Cost | Unpriced:
        """The call's cost, or why there is none. Never raises.

        ``provider`` is our provider name (``Call.provider``), ``usage`` the call's normalised
        usage, and ``service_tier`` the tier the response reported (OpenAI ``service_tier``),
        which selects the catalogue's tier rates where it has them.
        """
        if not self.enabled:
            return DISABLED
        try:
            return self._price(provider, request_model, response_model, usage, service_tier)
        except Exception:  # the catalogue raises on usage it finds inconsistent; never propagate
            self.errors += 1
            if self.errors <= 10 or self.errors % 1000 == 0:
                log.warning("pricing failed", exc_info=True, extra={"provider": provider, "model": response_model or request_model})
            return ERROR

    def _price(
        self, provider: str, request_model: str | None, response_model: str | None, usage: Usage, service_tier: str | None
    ) -> Cost | Unpriced:
        if response_model:
            models: tuple[str, ...] = (response_model, request_model) if request_model else (response_model,)
        elif request_model:
            models = (request_model,)
        else:
            return UNKNOWN_MODEL
        # Usage counts as known when input or output is (a total alone prices nothing).
        known = usage.input_tokens is not None or usage.output_tokens is not None
        override = self._override(provider, models) if self._overrides else None
        if override is not None:
            return override.cost(usage) if known else NO_USAGE
        found = None
        for model in models:  # the response model first: it is what served (and is billed)
            found = self._find(provider, model)
            if found is not None:
                break
        if found is None:
            return UNKNOWN_MODEL
        if not known:
            return NO_USAGE
        return self._catalogue_cost(found, usage, service_tier)

    def _override(self, provider: str, models: tuple[str, ...]) -> _Override | None:
        key = (provider, models)
        try:
            return self._override_cache[key]
        except KeyError:
            pass
        hit = next((o for o in self._overrides if o.matches(provider, models)), None)
        if len(self._override_cache) >= _LOOKUP_CACHE_MAX:
            self._override_cache.clear()
        self._override_cache[key] = hit
        return hit

    def _find(self, provider: str, model: str) -> tuple[Any, Any] | None:
        key = (provider, model)
        try:
            return self._lookup[key]
        except KeyError:
            pass
        found = None
        ids = self._ids.get(provider, ())
        if ids:
            snapshot = self._catalogue()
            for provider_id in ids:
                try:
                    found = snapshot.find_provider_model(model, None, provider_id, None)
                    break
                except LookupError:
                    continue
        if len(self._lookup) >= _LOOKUP_CACHE_MAX:
            self._lookup.clear()
        self._lookup[key] = found
        return found

    def warm(self) -> None:
        """Load the catalogue now (about a second, once per process) rather than on the first
        priced call, where it would stall that worker's event loop past Envoy's message timeout."""
        if self.enabled:
            self._catalogue()

    def _catalogue(self) -> Any:
        if self._snapshot is None:
            from genai_prices import data_snapshot

            self._snapshot = data_snapshot.get_snapshot()
        return self._snapshot

    def _catalogue_cost(self, found: tuple[Any, Any], u: Usage, service_tier: str | None) -> Cost | Unpriced:
        provider, model = found
        key = (id(model), service_tier)
        now = time.monotonic()
        entry = self._plans.get(key)
        if entry is None or entry[0] < now:
            if len(self._plans) >= _LOOKUP_CACHE_MAX:
                self._plans.clear()
            entry = self._plans[key] = (now + PLAN_TTL_SECONDS, _plan(provider, model, service_tier))
        plan = entry[1]
        if plan is not None:
            return plan.cost(u, model.id)
        return _library_cost(provider, model, u, service_tier)


PLAN_TTL_SECONDS = 60.0  # resolved rates are re-read this often (dated prices, off-peak hours)
_BASE_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")


class _Plan:
    """A model's resolved catalogue rates when they only involve what providers report to us:
    then the catalogue's own arithmetic (tiers by total input, cache reads and writes as parts
    of input) is done here in a few microseconds instead of the library's generic unit algebra
    (~300 us). tests/unit/test_pricing.py checks both agree on every catalogue model."""

    __slots__ = ("input", "output", "cache_read", "cache_write", "tiered", "rates")

    def __init__(self, prices: dict[str, Any]) -> None:
        self.input, self.output, self.cache_read, self.cache_write = (prices.get(k) for k in _BASE_KEYS)
        self.tiered = any(not isinstance(p, Decimal) for p in prices.values() if p is not None)
        # flat rates as the floats _rate gives for them, converted once
        self.rates = None if self.tiered else tuple(_rate(p, 0) for p in (self.input, self.output, self.cache_read, self.cache_write))

    def cost(self, u: Usage, model_id: str) -> Cost | Unpriced:
        total_input = uncached = u.input_tokens or 0
        cache_read, cache_write = u.cached_input_tokens or 0, u.cache_creation_input_tokens or 0
        if self.cache_read is not None:
            uncached -= cache_read
        if self.cache_write is not None:
            uncached -= cache_write
        if uncached < 0:  # the library refuses cached > input too
            return ERROR
        rates = self.rates
        if rates is None:
            t = total_input
            rates = (_rate(self.input, t), _rate(self.output, t), _rate(self.cache_read, t), _rate(self.cache_write, t))
        input_rate, output_rate, read_rate, write_rate = rates
        in_usd = (input_rate * uncached + read_rate * cache_read + write_rate * cache_write) / 1e6
        out_usd = output_rate * (u.output_tokens or 0) / 1e6
        return _rounded(in_usd + out_usd, in_usd, out_usd, model_id, "catalogue")


def _rate(price: Any, total_input: int) -> float:
    """USD per million tokens; a TieredPrices applies one rate to all tokens once the call's total
    input exceeds a tier's start (the catalogue's cliff model)."""
    if price is None:
        return 0.0
    if isinstance(price, Decimal):
        return float(price)
    rate = price.base
    for tier in reversed(price.tiers):
        if total_input > tier.start:
            rate = tier.price
            break
    return float(rate)


def _zero_unit(dimensions: Any) -> bool:
    """A unit we never report a count for, and that no reported count implies: it prices 0."""
    if dimensions.get("family") != "tokens":
        return True  # searches, pages, seconds... (but not "requests": see _plan)
    return (
        dimensions.get("modality") in ("audio", "image", "video")
        or dimensions.get("cache_ttl") == "1h"
        or dimensions.get("token_type") in ("tool", "citation")
    )


def _plan(provider: Any, model: Any, service_tier: str | None) -> _Plan | None:
    """The fast plan for ``model``'s current rates, or None: let the library price it."""
    from datetime import UTC, datetime

    from genai_prices.units import _get_registry

    own = any(model is m for m in provider.models)  # the library applies variants only then
    prices = model.get_prices(datetime.now(tz=UTC), {"service_tier": service_tier} if service_tier and own else None)
    registry = _get_registry()
    base: dict[str, Any] = {}
    for key, value in vars(prices).items():
        if value is None or key.startswith("_"):
            continue
        if key in _BASE_KEYS:
            base[key] = value
            continue
        try:
            unit = registry.unit_for_price_key(key)
        except KeyError:
            return None
        if unit.usage_key == "requests" or not _zero_unit(unit.dimensions):
            return None
    return _Plan(base)


def _library_cost(provider: Any, model: Any, u: Usage, service_tier: str | None) -> Cost | Unpriced:
    """The library's own calculation (reasoning or text-modality rates, per-request fees...)."""
    from genai_prices import Usage as LibUsage

    usage = LibUsage(
        input_tokens=u.input_tokens or 0,
        output_tokens=u.output_tokens or 0,
        cache_read_tokens=u.cached_input_tokens or None,
        cache_write_tokens=u.cache_creation_input_tokens or None,
        output_reasoning_tokens=u.reasoning_tokens or None,
    )
    context = {"service_tier": service_tier} if service_tier else None
    calc = model.calc_price(usage, provider, price_context=context)
    total = float(calc.total_price)
    if not math.isfinite(total):
        return ERROR
    return _rounded(total, float(calc.input_price), float(calc.output_price), model.id, "catalogue")
