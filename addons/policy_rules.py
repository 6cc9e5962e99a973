"""The `cache`, `rate_limits` and `budgets` sections of the rules file.

`addons.rules.parse_rules` calls the three parsers below. Every section is optional, and a missing
section turns its feature off. Errors raise `RulesError` with the key, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from addons.rules import RulesError, _mapping, _positive_int, _positive_number, _reject_unknown

DEFAULT_CACHE_TTL = 3600.0
DEFAULT_CACHE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_CACHE_MAX_ENTRY_BYTES = 4 * 1024 * 1024
DEFAULT_COALESCE_TIMEOUT = 120.0
DEFAULT_PERSIST_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_OUTPUT_ESTIMATE = 4096
DEFAULT_QUEUE_TIMEOUT = 30.0
DEFAULT_WARN_AT = 0.8


# -- cache -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectCache:
    """The cache settings in effect for one project."""

    enabled: bool
    #: Seconds a stored response stays servable.
    ttl: float
    #: The project name, or the `share_group` whose members see each other's entries.
    namespace: str
    #: Memory bound of the namespace's entries, in bytes.
    max_bytes: int
    #: Identical calls wait for the one in flight instead of going upstream.
    coalesce: bool


@dataclass(frozen=True)
class CacheRules:
    #: Settings of each project named in the rules' `projects`.
    projects: dict[str, ProjectCache] = field(default_factory=dict)
    #: Responses larger than this many bytes (decoded body plus headers) are not stored.
    max_entry_bytes: int = DEFAULT_CACHE_MAX_ENTRY_BYTES
    #: Seconds a coalesced call waits for the call in flight before it goes upstream itself.
    coalesce_timeout: float = DEFAULT_COALESCE_TIMEOUT
    #: Also keep responses in `cache.sqlite3` in the data directory, so that they survive a restart.
    persist: bool = False
    #: Size bound of the persistent store in bytes; the oldest entries are deleted beyond it.
    persist_max_bytes: int = DEFAULT_PERSIST_MAX_BYTES

    @property
    def any_enabled(self) -> bool:
        return any(settings.enabled for settings in self.projects.values())


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise RulesError(key, value, "is not true or false", f"Write {key.rsplit('.', 1)[-1]}: true or false.")
    return value


def _known_names(spec: dict, key: str, known: dict, kind: str) -> None:
    for name in spec:
        if name not in known:
            raise RulesError(f"{key}.{name}", name, f"is not a {kind} declared in the rules", f"Use one of: {', '.join(known)}.")


def parse_cache(raw: Any, project_names: dict) -> CacheRules:
    """Validate the `cache` section; `project_names` are the declared projects."""
    spec = _mapping(raw, "cache")
    _reject_unknown(
        spec,
        "cache",
        {"enabled", "ttl", "max_bytes", "max_entry_bytes", "coalesce", "coalesce_timeout", "persist",
         "persist_max_bytes", "projects"},
    )
    enabled = _bool(spec.get("enabled", False), "cache.enabled")
    ttl = _positive_number(spec.get("ttl", DEFAULT_CACHE_TTL), "cache.ttl")
    max_bytes = _positive_int(spec.get("max_bytes", DEFAULT_CACHE_MAX_BYTES), "cache.max_bytes")
    coalesce = _bool(spec.get("coalesce", True), "cache.coalesce")

    overrides = _mapping(spec.get("projects", {}), "cache.projects")
    _known_names(overrides, "cache.projects", project_names, "project")
    projects = {}
    for name in project_names:
        key = f"cache.projects.{name}"
        override = _mapping(overrides.get(name, {}), key)
        _reject_unknown(override, key, {"enabled", "ttl", "max_bytes", "coalesce", "share_group"})
        group = override.get("share_group")
        if group is not None and (not isinstance(group, str) or not group):
            raise RulesError(f"{key}.share_group", group, "is not a group name", "Give the same name to every project that shares entries.")
        if group is not None and "max_bytes" in override:
            raise RulesError(
                f"{key}.max_bytes", override["max_bytes"], "cannot be set for a project in a share_group",
                "Remove it: a shared group's entries are bounded by cache.max_bytes.",
            )
        projects[name] = ProjectCache(
            enabled=_bool(override.get("enabled", enabled), f"{key}.enabled"),
            ttl=_positive_number(override.get("ttl", ttl), f"{key}.ttl"),
            # Group namespaces get a prefix no project name can have, so a group never mixes with a project.
            namespace=f"group:{group}" if group is not None else f"project:{name}",
            max_bytes=_positive_int(override.get("max_bytes", max_bytes), f"{key}.max_bytes"),
            coalesce=_bool(override.get("coalesce", coalesce), f"{key}.coalesce"),
        )
    return CacheRules(
        projects=projects,
        max_entry_bytes=_positive_int(spec.get("max_entry_bytes", DEFAULT_CACHE_MAX_ENTRY_BYTES), "cache.max_entry_bytes"),
        coalesce_timeout=_positive_number(spec.get("coalesce_timeout", DEFAULT_COALESCE_TIMEOUT), "cache.coalesce_timeout"),
        persist=_bool(spec.get("persist", False), "cache.persist"),
        persist_max_bytes=_positive_int(spec.get("persist_max_bytes", DEFAULT_PERSIST_MAX_BYTES), "cache.persist_max_bytes"),
    )


# -- rate limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProjectLimits:
    """Limits of one project; None means no limit."""

    requests_per_minute: int | None = None
    #: Estimated before the call (input estimate plus max output), settled with the real usage after it.
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent))


@dataclass(frozen=True)
class ProviderLimits:
    """A concurrency cap on one provider, shared by all projects, with a bounded wait queue."""

    max_concurrent: int
    #: Calls that may wait for a slot; one more is rejected at once.
    max_queue: int
    #: Seconds a call waits in the queue before it is rejected.
    queue_timeout: float


@dataclass(frozen=True)
class RateLimitRules:
    projects: dict[str, ProjectLimits] = field(default_factory=dict)
    providers: dict[str, ProviderLimits] = field(default_factory=dict)
    #: Output tokens assumed for the token estimate of a request that sets no max_tokens.
    default_max_tokens: int = DEFAULT_MAX_OUTPUT_ESTIMATE


def _project_limits(raw: Any, key: str) -> ProjectLimits:
    spec = _mapping(raw, key)
    names = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
    _reject_unknown(spec, key, set(names))
    return ProjectLimits(**{name: _positive_int(spec[name], f"{key}.{name}") for name in names if name in spec})


def parse_rate_limits(raw: Any, project_names: dict, provider_names: dict) -> RateLimitRules:
    """Validate the `rate_limits` section against the declared projects and providers."""
    spec = _mapping(raw, "rate_limits")
    _reject_unknown(spec, "rate_limits", {"default", "projects", "providers", "default_max_tokens"})
    default = _project_limits(spec.get("default", {}), "rate_limits.default")

    projects_raw = _mapping(spec.get("projects", {}), "rate_limits.projects")
    _known_names(projects_raw, "rate_limits.projects", project_names, "project")
    projects = {}
    for name in project_names:
        limits = _project_limits(projects_raw[name], f"rate_limits.projects.{name}") if name in projects_raw else default
        if limits.any:
            projects[name] = limits

    providers_raw = _mapping(spec.get("providers", {}), "rate_limits.providers")
    _known_names(providers_raw, "rate_limits.providers", provider_names, "provider")
    providers = {}
    for name, provider_raw in providers_raw.items():
        key = f"rate_limits.providers.{name}"
        provider_spec = _mapping(provider_raw, key)
        _reject_unknown(provider_spec, key, {"max_concurrent", "max_queue", "queue_timeout"})
        if "max_concurrent" not in provider_spec:
            raise RulesError(f"{key}.max_concurrent", None, "is missing", "Give the number of calls the provider may run at once.")
        max_queue = provider_spec.get("max_queue", 0)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise RulesError(f"{key}.max_queue", max_queue, "is not a whole number >= 0", "Give how many calls may wait; 0 rejects at once.")
        providers[name] = ProviderLimits(
            max_concurrent=_positive_int(provider_spec["max_concurrent"], f"{key}.max_concurrent"),
            max_queue=max_queue,
            queue_timeout=_positive_number(provider_spec.get("queue_timeout", DEFAULT_QUEUE_TIMEOUT), f"{key}.queue_timeout"),
        )
    return RateLimitRules(
        projects=projects,
        providers=providers,
        default_max_tokens=_positive_int(spec.get("default_max_tokens", DEFAULT_MAX_OUTPUT_ESTIMATE), "rate_limits.default_max_tokens"),
    )


# -- budgets ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Spend limits of one project in USD per UTC day and UTC month; None means no limit."""

    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None


@dataclass(frozen=True)
class BudgetRules:
    projects: dict[str, Budget] = field(default_factory=dict)
    #: Fraction of a budget at which a warning is logged, once per project and period.
    warn_at: float = DEFAULT_WARN_AT


def _usd(value: Any, key: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation as e:
        raise RulesError(key, value, "is not a number", "Give US dollars, e.g. 25 or 2.50.") from e
    if isinstance(value, bool) or not amount.is_finite() or amount <= 0:
        raise RulesError(key, value, "is not a positive number", "Give US dollars, e.g. 25 or 2.50.")
    return amount


def parse_budgets(raw: Any, project_names: dict) -> BudgetRules:
    """Validate the `budgets` section against the declared projects."""
    spec = _mapping(raw, "budgets")
    _reject_unknown(spec, "budgets", {"warn_at", "projects"})
    warn_at = spec.get("warn_at", DEFAULT_WARN_AT)
    if isinstance(warn_at, bool) or not isinstance(warn_at, (int, float)) or not 0 < warn_at <= 1:
        raise RulesError("budgets.warn_at", warn_at, "is not a fraction in (0, 1]", "Write it like 0.8 for a warning at 80 %.")

    projects_raw = _mapping(spec.get("projects", {}), "budgets.projects")
    _known_names(projects_raw, "budgets.projects", project_names, "project")
    projects = {}
    for name, budget_raw in projects_raw.items():
        key = f"budgets.projects.{name}"
        budget_spec = _mapping(budget_raw, key)
        _reject_unknown(budget_spec, key, {"daily_usd", "monthly_usd"})
        budget = Budget(
            daily_usd=_usd(budget_spec["daily_usd"], f"{key}.daily_usd") if "daily_usd" in budget_spec else None,
            monthly_usd=_usd(budget_spec["monthly_usd"], f"{key}.monthly_usd") if "monthly_usd" in budget_spec else None,
        )
        if budget.daily_usd is not None or budget.monthly_usd is not None:
            projects[name] = budget
    return BudgetRules(projects=projects, warn_at=float(warn_at))
