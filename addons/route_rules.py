"""Routing configs in Portkey's shape: strategy, targets, retry and request_timeout.

A config is a tree. A leaf names one upstream target (a provider, optionally with `model` and
`override_params`); a node has a `strategy` and `targets`, which may be nodes again:

    strategy: {mode: fallback, on_status_codes: [429, 503]}   # fallback | loadbalance | single
    targets:
      - {provider: anthropic, model: claude-sonnet-4-20250514, retry: {attempts: 2}, request_timeout: 20000}
      - {provider: openai, override_params: {model: gpt-4o}, weight: 1}

The same parser reads the rules' `routes:` section and the `x-portkey-config` request header, so that a
config written for Portkey works in both. `override_params`, `retry` and `request_timeout` given on a
node apply to every target under it; a target's own values win. A leaf without `provider` uses the
provider the request would have gone to without the config.

`parse_config` raises `ConfigError`, whose message names the member by its path (`targets[1].retry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from addons.rules import Provider

MODES = ("fallback", "loadbalance", "single")

#: Statuses that move a fallback to its next target when the strategy lists none: rate limits and
#: server errors, Anthropic's 529 (overloaded) included. Other 4xx mean the request itself is wrong.
DEFAULT_FALLBACK_STATUSES = frozenset({429, *range(500, 600)})
#: Statuses that are retried on the same target when `retry.on_status_codes` is not given.
DEFAULT_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
#: Upper bound of `retry.attempts`; Portkey allows 5.
MAX_RETRY_ATTEMPTS = 5
#: Upper bound of targets in one config, nested ones included.
MAX_TARGETS = 32
#: Upper bound of nested `targets` levels below the top of a config.
MAX_DEPTH = 8
#: Upper bound of `request_timeout`, in milliseconds (one hour).
MAX_REQUEST_TIMEOUT_MS = 3_600_000

# Members of a config object. Portkey members that tollhouse does not act on (`cache`, `virtual_key`,
# `api_key`, `name`) are accepted and ignored, so that existing configs load. The provider keys always
# come from the gateway's environment.
_MEMBERS = {
    "provider", "model", "override_params", "weight", "retry", "request_timeout", "strategy", "targets",
    "cache", "virtual_key", "api_key", "name",
}


_NO_VALUE = object()


class ConfigError(ValueError):
    """An invalid routing config; the message starts with the member's path.

    `value` and `fix`, when given, let the rules loader report the error in its own
    "KEY: problem (got VALUE). Fix." form.
    """

    def __init__(self, message: str, value: Any = _NO_VALUE, fix: str = ""):
        self.message = message
        self.value = value
        self.fix = fix
        text = message
        if value is not _NO_VALUE:
            text += f" (got {value!r})"
        if fix:
            text += f". {fix}"
        super().__init__(text)

    @property
    def has_value(self) -> bool:
        return self.value is not _NO_VALUE

    @property
    def path(self) -> str:
        return self.message.split(" ", 1)[0].rstrip(":")

    @property
    def problem(self) -> str:
        return self.message.partition(" ")[2]


@dataclass(frozen=True)
class Retry:
    """Retries of one target: `attempts` more tries after the first, on these statuses."""

    attempts: int
    on_status_codes: frozenset[int] = DEFAULT_RETRY_STATUSES
    #: Wait at least as long as upstream's `Retry-After` (up to the gateway's cap).
    use_retry_after: bool = True


@dataclass(frozen=True)
class Target:
    """A node of a routing config: a leaf target, or a strategy over child targets.

    The leaf settings (`provider`, `override_params`, `retry`, `request_timeout`) are the effective
    ones, with the values of the enclosing nodes already applied.
    """

    #: Portkey's name for this node in responses: "config", "config.targets[1]", ...
    option: str
    #: None for nodes, and for leaves that keep the request's default provider.
    provider: Provider | None = None
    override_params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    weight: float = 1.0
    retry: Retry | None = None
    #: Seconds to wait for the first byte of the answer's body. None sets no such limit (the relay still
    #: ends an upstream read that stalls for 600 s).
    request_timeout: float | None = None
    #: "fallback", "loadbalance" or "single" for a node, None for a leaf.
    mode: str | None = None
    #: Statuses that make a fallback node move on; None means `DEFAULT_FALLBACK_STATUSES`.
    on_status_codes: frozenset[int] | None = None
    targets: tuple[Target, ...] = ()

    @property
    def is_leaf(self) -> bool:
        return self.mode is None

    @property
    def model(self) -> str | None:
        model = self.override_params.get("model")
        return model if isinstance(model, str) else None

    def leaves(self) -> list[Target]:
        if self.is_leaf:
            return [self]
        return [leaf for target in self.targets for leaf in target.leaves()]

    @property
    def needs_relay(self) -> bool:
        """Tell whether calls need more than one upstream request or a first-byte timeout."""
        if not self.is_leaf:
            return True
        return self.request_timeout is not None or (self.retry is not None and self.retry.attempts > 0)


@dataclass(frozen=True)
class RouteMatch:
    """The calls that a route of the rules applies to. An empty tuple matches every value."""

    providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    projects: tuple[str, ...] = ()

    def matches(self, provider: str | None, model: str | None, project: str | None) -> bool:
        return (
            (not self.providers or provider in self.providers)
            and (not self.models or model in self.models)
            and (not self.projects or project in self.projects)
        )


@dataclass(frozen=True)
class Route:
    """A named routing config of the rules.

    It is chosen by name in `x-portkey-config`, or applied to every call that `match` selects.
    """

    name: str
    config: Target
    #: None: the route is used only when a request names it.
    match: RouteMatch | None = None

    @property
    def provider(self) -> str | None:
        """Name of the first target's provider (None keeps the request's provider)."""
        first = self.config.leaves()[0]
        return first.provider.name if first.provider is not None else None

    @property
    def override_params(self) -> dict[str, Any]:
        return self.config.leaves()[0].override_params


@dataclass(frozen=True)
class _Inherited:
    provider: Provider | None = None
    override_params: dict[str, Any] = field(default_factory=dict)
    retry: Retry | None = None
    request_timeout: float | None = None


def parse_config(spec: Any, providers: dict[str, Provider], where: str = "config") -> Target:
    """Validate a config object (parsed JSON or YAML) against the rules' providers.

    `where` prefixes the member paths in error messages. The targets' `option` names start with
    "config", as in Portkey's `x-portkey-last-used-option-index` header.
    """
    counter = [0]
    return _parse_node(spec, providers, where, "config", _Inherited(), counter)


def _parse_node(
    spec: Any, providers: dict[str, Provider], where: str, option: str, parent: _Inherited, counter: list[int]
) -> Target:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object, got {spec!r}")
    if option.count(".targets[") > MAX_DEPTH:
        raise ConfigError(f"{where} is nested too deeply; a config may nest targets at most {MAX_DEPTH} levels")
    unknown = sorted(str(name) for name in spec if name not in _MEMBERS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a config member; accepted members: {', '.join(sorted(_MEMBERS))}")

    inherited = _Inherited(
        provider=_provider(spec, providers, where) or parent.provider,
        override_params=_override_params(spec, where, parent.override_params),
        retry=_retry(spec.get("retry"), f"{where}.retry") if "retry" in spec else parent.retry,
        request_timeout=_timeout(spec.get("request_timeout"), f"{where}.request_timeout")
        if "request_timeout" in spec
        else parent.request_timeout,
    )
    weight = _weight(spec.get("weight", 1), f"{where}.weight")

    if "targets" not in spec:
        if "strategy" in spec:
            raise ConfigError(f"{where}.strategy needs targets: add a targets list under it")
        counter[0] += 1
        if counter[0] > MAX_TARGETS:
            raise ConfigError(f"{where}: a config may have at most {MAX_TARGETS} targets")
        return Target(
            option=option,
            provider=inherited.provider,
            override_params=inherited.override_params,
            weight=weight,
            retry=inherited.retry,
            request_timeout=inherited.request_timeout,
        )

    mode, on_status_codes = _strategy(spec.get("strategy"), f"{where}.strategy")
    targets_spec = spec["targets"]
    if not isinstance(targets_spec, list) or not targets_spec:
        raise ConfigError(f"{where}.targets must be a non-empty list of targets, got {targets_spec!r}")
    targets = tuple(
        _parse_node(child, providers, f"{where}.targets[{i}]", f"{option}.targets[{i}]", inherited, counter)
        for i, child in enumerate(targets_spec)
    )
    if mode == "loadbalance" and not any(target.weight > 0 for target in targets):
        raise ConfigError(f"{where}.targets: a loadbalance strategy needs at least one target with a weight above 0")
    return Target(option=option, weight=weight, mode=mode, on_status_codes=on_status_codes, targets=targets)


def _provider(spec: dict, providers: dict[str, Provider], where: str) -> Provider | None:
    if "provider" not in spec:
        return None
    name = spec["provider"]
    if not isinstance(name, str):
        raise ConfigError(f"{where}.provider must be a string, got {name!r}")
    if name in providers:
        return providers[name]
    # Portkey names providers by kind; accept a kind when the rules have a provider of it.
    kind = {"azure-openai": "azure"}.get(name, name)
    provider = next((p for p in providers.values() if p is not None and p.kind == kind), None)
    if provider is None:
        raise ConfigError(
            f"{where}.provider is not a provider of the rules", value=name, fix=f"Use one of: {', '.join(providers)}."
        )
    return provider


def _override_params(spec: dict, where: str, inherited: dict[str, Any]) -> dict[str, Any]:
    params = dict(inherited)
    own = spec.get("override_params", {})
    if not isinstance(own, dict):
        raise ConfigError(f"{where}.override_params must be an object, got {own!r}")
    params.update(own)
    if "model" in spec:
        model = spec["model"]
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}.model must be a model name, got {model!r}")
        params["model"] = model
    return params


def _status_codes(value: Any, where: str) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where} must be a non-empty list of HTTP statuses such as [429, 503], got {value!r}")
    for code in value:
        if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
            raise ConfigError(f"{where} contains {code!r}, which is not an HTTP status from 100 to 599")
    return frozenset(value)


def _strategy(spec: Any, where: str) -> tuple[str, frozenset[int] | None]:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object like {{\"mode\": \"fallback\"}}, got {spec!r}")
    unknown = sorted(str(name) for name in spec if name not in ("mode", "on_status_codes"))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a strategy member; accepted members: mode, on_status_codes")
    mode = spec.get("mode")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode must be one of {', '.join(MODES)}, got {mode!r}")
    codes = _status_codes(spec["on_status_codes"], f"{where}.on_status_codes") if "on_status_codes" in spec else None
    return mode, codes


def _retry(spec: Any, where: str) -> Retry:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object like {{\"attempts\": 3}}, got {spec!r}")
    unknown = sorted(str(name) for name in spec if name not in ("attempts", "on_status_codes", "use_retry_after_header"))
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]} is not a retry member; accepted members: attempts, on_status_codes, use_retry_after_header"
        )
    attempts = spec.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= MAX_RETRY_ATTEMPTS:
        raise ConfigError(f"{where}.attempts must be a whole number from 0 to {MAX_RETRY_ATTEMPTS}, got {attempts!r}")
    codes = (
        _status_codes(spec["on_status_codes"], f"{where}.on_status_codes")
        if "on_status_codes" in spec
        else DEFAULT_RETRY_STATUSES
    )
    use_retry_after = spec.get("use_retry_after_header", True)
    if not isinstance(use_retry_after, bool):
        raise ConfigError(f"{where}.use_retry_after_header must be true or false, got {use_retry_after!r}")
    return Retry(attempts=attempts, on_status_codes=codes, use_retry_after=use_retry_after)


def _timeout(value: Any, where: str) -> float:
    # Portkey gives request_timeout in milliseconds.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a positive number of milliseconds, got {value!r}")
    if value > MAX_REQUEST_TIMEOUT_MS:
        raise ConfigError(f"{where} must be at most {MAX_REQUEST_TIMEOUT_MS} milliseconds (one hour), got {value!r}")
    return float(value) / 1000.0


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a number of 0 or more, got {value!r}")
    return float(value)


def parse_match(spec: Any, where: str, providers: dict[str, Provider], projects: dict[str, Any]) -> RouteMatch:
    """Validate a route's `match` object: `provider`, `model` and `project`, each a name or a list."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object with provider, model or project, got {spec!r}")
    unknown = sorted(str(name) for name in spec if name not in ("provider", "model", "project"))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a match member; accepted members: provider, model, project")

    def names(key: str, known: dict | None) -> tuple[str, ...]:
        value = spec.get(key, [])
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{where}.{key} must be a name or a list of names, got {value!r}")
        for name in values:
            if known is not None and name not in known:
                raise ConfigError(f"{where}.{key} is not in the rules", value=name, fix=f"Use one of: {', '.join(known)}.")
        return tuple(values)

    match = RouteMatch(providers=names("provider", providers), models=names("model", None), projects=names("project", projects))
    if not (match.providers or match.models or match.projects):
        raise ConfigError(f"{where} is empty; name at least one provider, model or project")
    return match


@dataclass(frozen=True)
class FallbackSettings:
    """Gateway-wide settings of retries and the circuit breaker (the rules' `fallbacks:` section)."""

    #: Seconds before the first retry; each further retry doubles it, up to `backoff_max`.
    backoff_initial: float = 0.5
    backoff_max: float = 8.0
    #: Longest `Retry-After` in seconds that a retry waits for; a longer one moves on to the next target.
    retry_after_max: float = 30.0
    #: Consecutive failures of a target that open its circuit breaker.
    breaker_failures: int = 5
    #: Seconds a target with an open breaker is skipped before one probe call may try it again.
    breaker_cooldown: float = 30.0
    #: Seconds to wait for an upstream TCP and TLS connection.
    connect_timeout: float = 10.0


def parse_fallbacks(spec: Any, where: str = "fallbacks") -> FallbackSettings:
    """Validate the `fallbacks:` section; missing members keep their defaults."""
    if spec is None:
        return FallbackSettings()
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping, got {spec!r}")
    numbers = {"backoff_initial", "backoff_max", "retry_after_max", "breaker_cooldown", "connect_timeout"}
    allowed = numbers | {"breaker_failures"}
    unknown = sorted(str(name) for name in spec if name not in allowed)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a known setting; allowed here: {', '.join(sorted(allowed))}")
    values: dict[str, Any] = {}
    for name in sorted(numbers & set(spec)):
        value = spec[name]
        zero_allowed = name in ("backoff_initial", "retry_after_max")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}.{name} must be a number of seconds, got {value!r}")
        if value < 0 or (value == 0 and not zero_allowed):
            kind = "0 or more" if zero_allowed else "greater than 0"
            raise ConfigError(f"{where}.{name} must be {kind} seconds, got {value!r}")
        values[name] = float(value)
    if "breaker_failures" in spec:
        value = spec["breaker_failures"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.breaker_failures must be a whole number of 1 or more, got {value!r}")
        values["breaker_failures"] = value
    settings = FallbackSettings(**values)
    if settings.backoff_max < settings.backoff_initial:
        raise ConfigError(f"{where}.backoff_max ({settings.backoff_max}) must not be below backoff_initial ({settings.backoff_initial})")
    return settings
