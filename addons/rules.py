"""The rules file: providers, projects, logging, prices and plugins.

`load_rules` reads a YAML file and returns validated, typed `Rules`. Every problem raises `RulesError`
with the key, the value and the fix, so that a bad file stops the gateway at start rather than on the
first call.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from addons.route_rules import ConfigError, FallbackSettings, Route, parse_config, parse_fallbacks, parse_match

if TYPE_CHECKING:
    from addons.policy_rules import BudgetRules, CacheRules, RateLimitRules

#: API kinds the gateway can price and authenticate, with the hosts their SDKs call by default. Azure
#: resources and OpenAI-compatible servers have no common host: the forward proxy intercepts them only
#: when the provider lists `hosts`, and the base-URL listener reaches them without.
KIND_HOSTS = {
    "openai": ("api.openai.com",),
    "anthropic": ("api.anthropic.com",),
    "azure": (),
    "openai-compatible": (),
}

#: The wire format of each kind: its request and response bodies, error bodies and usage objects.
KIND_FORMATS = {"openai": "openai", "anthropic": "anthropic", "azure": "openai", "openai-compatible": "openai"}

#: genai-prices provider id of each kind. An openai-compatible provider takes `price_provider` from the
#: rules, or `plugins.pricing` finds it from the base URL.
KIND_PRICE_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "azure": "azure"}

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_BASE_URL_LISTEN = "0.0.0.0:8787"
#: The admin listener (`/healthz`, `/metrics`) listens on loopback unless the rules say otherwise.
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
#: Values of `log_format`: one human-readable line per record, or one JSON object per line.
LOG_FORMATS = ("text", "json")
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE = 30.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RulesError(Exception):
    """An invalid rules file. The message names the key, the value and the fix."""

    def __init__(self, key: str, value: Any, problem: str, fix: str):
        self.key = key
        self.value = value
        super().__init__(f"{key}: {problem} (got {value!r}). {fix}")


@dataclass(frozen=True)
class Provider:
    """An upstream API the gateway forwards to."""

    name: str
    #: "openai", "anthropic", "azure" or "openai-compatible": decides the auth headers, error format and
    #: usage parsing (through `api_format`).
    kind: str
    #: Upstream origin the calls are sent to, e.g. "https://api.openai.com" or a test server's "http://127.0.0.1:PORT".
    scheme: str
    host: str
    port: int
    #: Host names clients address; the forward proxy intercepts TLS for these hosts only.
    hosts: tuple[str, ...]
    #: Name of the gateway's environment variable that contains the real key.
    key_env: str
    #: Path prefix of the base URL without a trailing slash (e.g. "/openai" for Groq), or "".
    base_path: str = ""
    #: Azure deployment name -> model name, used to price calls to a deployment.
    deployments: dict[str, str] = field(default_factory=dict, hash=False)
    #: genai-prices provider id, or None when genai-prices has no prices for this provider.
    price_provider: str | None = None

    @property
    def api_format(self) -> str:
        """"openai" or "anthropic": the wire format this provider speaks."""
        return KIND_FORMATS[self.kind]

    @property
    def api_key(self) -> str | None:
        """The real key, read from the gateway's environment at each call (None when unset)."""
        return os.environ.get(self.key_env) or None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True)
class Project:
    """A client project, identified by its own key."""

    name: str
    #: sha256 hex digest of the project key; the key itself is never kept in the rules.
    key_sha256: str | None
    #: The environment variable the key was read from, when the rules name one.
    key_env: str | None = None


@dataclass(frozen=True)
class PriceOverride:
    """Prices for one model in USD per million tokens.

    A missing `cache_read` or `cache_write` is priced at `input`; a missing `cache_write_1h` at
    `cache_write`.
    """

    input: Decimal
    output: Decimal
    cache_read: Decimal | None = None
    cache_write: Decimal | None = None
    cache_write_1h: Decimal | None = None


#: Destinations the forward proxy never tunnels to by default: the gateway host's own loopback
#: services and link-local addresses, where cloud instance metadata lives.
DEFAULT_BLOCKED_NETWORKS = ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10")


@dataclass(frozen=True)
class TunnelRules:
    """Policy of the forward proxy for traffic to hosts that are not providers'."""

    #: Pass such traffic through at all (as an untouched TLS tunnel or plain HTTP).
    allow: bool = True
    #: Ask for a project's credentials in the proxy URL (`http://PROJECT:KEY@host:port`) first.
    require_project_key: bool = False
    #: Destination networks that are never reached, matched against literal IP addresses and
    #: `localhost`. NOTE: a host name that resolves into one of them is not caught.
    blocked_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(n) for n in DEFAULT_BLOCKED_NETWORKS
    )


@dataclass(frozen=True)
class LoggingRules:
    #: The DuckDB file; relative paths are under the data directory.
    database: Path
    #: Seconds between batched writes; a SIGKILL loses at most this much of the log.
    flush_interval: float = 0.5
    #: Store request and response bodies (with secrets masked) in the log.
    bodies: bool = False
    #: Bodies longer than this many bytes are truncated in the log.
    body_max_bytes: int = 65536


@dataclass(frozen=True)
class Rules:
    path: Path | None
    listen_host: str
    listen_port: int
    data_dir: Path
    providers: dict[str, Provider]
    projects: dict[str, Project]
    logging: LoggingRules
    prices: dict[str, PriceOverride]
    #: Plugin module names or `.py` file paths, loaded in this order after the built-ins.
    plugins: tuple[str, ...]
    #: Free-form settings for plugins, keyed by plugin name.
    plugin_settings: dict[str, Any] = field(default_factory=dict)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Seconds that SIGTERM waits for calls in flight before closing them.
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    #: Address of the base-URL listener (Portkey-compatible `http://HOST:PORT/v1`).
    base_url_listen_host: str = "0.0.0.0"
    base_url_listen_port: int = 8787
    #: Named routing configs, chosen by `x-portkey-config` or by their `match` (`addons.route_rules`).
    routes: dict[str, Route] = field(default_factory=dict)
    #: Retry backoff and circuit-breaker settings of the `fallbacks:` section.
    fallbacks: FallbackSettings = field(default_factory=FallbackSettings)
    #: The `cache`, `rate_limits` and `budgets` sections (`addons.policy_rules`); empty ones turn the feature off.
    cache: CacheRules = field(default_factory=lambda: _policy_rules().CacheRules())
    rate_limits: RateLimitRules = field(default_factory=lambda: _policy_rules().RateLimitRules())
    budgets: BudgetRules = field(default_factory=lambda: _policy_rules().BudgetRules())
    tunnels: TunnelRules = field(default_factory=TunnelRules)
    #: Address of the admin listener, or None when `admin_listen: false` turns it off.
    admin_listen_host: str | None = "127.0.0.1"
    admin_listen_port: int = 9090
    #: "text" or "json" (`LOG_FORMATS`); `tollhouse run --log-format` overrides it.
    log_format: str = "text"

    def with_listen(self, host: str, port: int) -> Rules:
        return dataclasses.replace(self, listen_host=host, listen_port=port)

    def route_for(self, provider: str | None, model: str | None, project: str | None) -> Route | None:
        """Return the first route whose `match` selects the call, in the order of the rules file."""
        for route in self.routes.values():
            if route.match is not None and route.match.matches(provider, model, project):
                return route
        return None

    def provider_for_host(self, host: str) -> Provider | None:
        host = host.lower()
        for provider in self.providers.values():
            if host in provider.hosts:
                return provider
        return None

    @property
    def intercepted_hosts(self) -> set[str]:
        return {host for provider in self.providers.values() for host in provider.hosts}

    @property
    def upstream_addresses(self) -> set[tuple[str, int]]:
        return {provider.address for provider in self.providers.values()}


def load_rules(path: str | os.PathLike) -> Rules:
    """Read and validate a rules file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RulesError(
            "rules file", str(path), f"cannot be read: {e.strerror}", "Pass an existing file with --rules."
        ) from e
    try:
        raw = yaml.load(text, Loader=_RulesLoader)
    except yaml.YAMLError as e:
        raise RulesError("rules file", str(path), f"is not valid YAML: {e}", "Fix the YAML syntax.") from e
    return parse_rules(raw if raw is not None else {}, base_dir=path.resolve().parent, path=path)


def parse_rules(raw: Any, base_dir: Path, path: Path | None = None) -> Rules:
    """Validate the parsed YAML of a rules file. Relative paths are resolved against `base_dir`."""
    top = _mapping(raw, "rules file")
    _reject_unknown(
        top,
        "",
        {"listen", "data_dir", "providers", "projects", "logging", "prices", "plugins", "settings",
         "max_request_bytes", "shutdown_grace", "base_url_listen", "routes", "cache", "rate_limits", "budgets",
         "tunnels", "admin_listen", "log_format", "fallbacks"},
    )

    listen_host, listen_port = parse_listen(top.get("listen", DEFAULT_LISTEN), "listen")
    base_url_host, base_url_port = parse_listen(top.get("base_url_listen", DEFAULT_BASE_URL_LISTEN), "base_url_listen")
    overlapping = base_url_host == listen_host or "0.0.0.0" in (base_url_host, listen_host)
    if base_url_port != 0 and base_url_port == listen_port and overlapping:
        raise RulesError(
            "base_url_listen", top.get("base_url_listen", DEFAULT_BASE_URL_LISTEN), f"uses the port of listen ({listen_port})",
            "Give the base-URL listener its own port, like 0.0.0.0:8787.",
        )
    data_dir = _path(top.get("data_dir", "data"), "data_dir", base_dir)
    admin_host, admin_port = parse_admin_listen(top.get("admin_listen", DEFAULT_ADMIN_LISTEN))
    log_format = parse_log_format(top.get("log_format", "text"), "log_format")

    providers_raw = _mapping(top.get("providers"), "providers")
    if not providers_raw:
        raise RulesError("providers", providers_raw, "is empty", "Declare at least one provider (see rules.yaml).")
    providers = {name: _provider(name, spec) for name, spec in providers_raw.items()}
    _check_hosts_unique(providers)

    projects_raw = _mapping(top.get("projects"), "projects")
    if not projects_raw:
        raise RulesError("projects", projects_raw, "is empty", "Declare at least one project with key_env or key_sha256.")
    projects = {name: _project(name, spec) for name, spec in projects_raw.items()}
    routes = {
        name: _route(name, spec, providers, projects) for name, spec in _mapping(top.get("routes", {}), "routes").items()
    }
    fallbacks = _fallbacks(top.get("fallbacks"))

    logging_rules = _logging(top.get("logging", {}), data_dir)
    prices = {str(model): _price(str(model), spec) for model, spec in _mapping(top.get("prices", {}), "prices").items()}
    plugins = tuple(_plugin_ref(ref, f"plugins[{i}]", base_dir) for i, ref in enumerate(_list(top.get("plugins", []), "plugins")))
    settings = _mapping(top.get("settings", {}), "settings")

    return Rules(
        path=path,
        listen_host=listen_host,
        listen_port=listen_port,
        data_dir=data_dir,
        providers=providers,
        projects=projects,
        logging=logging_rules,
        prices=prices,
        plugins=plugins,
        plugin_settings=dict(settings),
        max_request_bytes=_positive_int(top.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES), "max_request_bytes"),
        shutdown_grace=_positive_number(top.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE), "shutdown_grace"),
        base_url_listen_host=base_url_host,
        base_url_listen_port=base_url_port,
        routes=routes,
        fallbacks=fallbacks,
        cache=_policy_rules().parse_cache(top.get("cache", {}), projects),
        rate_limits=_policy_rules().parse_rate_limits(top.get("rate_limits", {}), projects, providers),
        budgets=_policy_rules().parse_budgets(top.get("budgets", {}), projects),
        tunnels=_tunnels(top.get("tunnels", {})),
        admin_listen_host=admin_host,
        admin_listen_port=admin_port,
        log_format=log_format,
    )


def project_key_digest(key: str) -> str:
    """Return the sha256 hex digest under which a project key is stored in the rules."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _RulesLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key repeated in one mapping, where PyYAML keeps the last value."""

    def construct_document(self, node: yaml.Node) -> Any:
        for error in duplicate_keys(node):
            raise error
        return super().construct_document(node)


def duplicate_keys(node: yaml.Node) -> Iterator[RulesError]:
    """Yield a RulesError for every key repeated within one mapping of a composed YAML document."""
    yield from _walk_duplicate_keys(node, (), set())


def _walk_duplicate_keys(node: yaml.Node, path: tuple[str, ...], visited: set[int]) -> Iterator[RulesError]:
    # An alias makes the node graph share (or even contain) a node, so each node is visited once.
    if id(node) in visited:
        return
    visited.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            parent = path[:-1] + (f"{path[-1]}[{index}]",) if path else (f"[{index}]",)
            yield from _walk_duplicate_keys(item, parent, visited)
        return
    if not isinstance(node, yaml.MappingNode):
        return

    # Keyed by resolved tag and text, so that `1:` and `"1":` stay different keys.
    first_lines: dict[tuple[str, str], int] = {}
    for key_node, value_node in node.value:
        # Keys merged in with `<<: *anchor` may be overridden by the mapping's own keys.
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = key_node.value
        line = key_node.start_mark.line + 1
        identity = (key_node.tag, key)
        if identity in first_lines:
            yield RulesError(
                ".".join(path + (key,)), key, f"is defined twice, on lines {first_lines[identity]} and {line}",
                "Remove one of them, or merge them into one entry: YAML would silently keep only the last one.",
            )
        else:
            first_lines[identity] = line
        yield from _walk_duplicate_keys(value_node, path + (key,), visited)


# -- sections --------------------------------------------------------------------------------------


def _provider(name: Any, spec: Any) -> Provider:
    key = f"providers.{name}"
    _check_name(name, key)
    spec = _mapping(spec, key)
    _reject_unknown(spec, key, {"kind", "base_url", "key_env", "hosts", "deployments", "price_provider"})

    kind = spec.get("kind", name if name in KIND_HOSTS else None)
    if kind not in KIND_HOSTS:
        raise RulesError(f"{key}.kind", kind, "is not a supported API kind", f"Use one of: {', '.join(KIND_HOSTS)}.")

    base_url = spec.get("base_url")
    if not isinstance(base_url, str):
        raise RulesError(f"{key}.base_url", base_url, "is missing or not a string", "Set it like https://api.openai.com.")
    parts = urlsplit(base_url)
    # Checked first, because the other base_url errors show the URL.
    if "@" in parts.netloc:
        hidden = parts._replace(netloc="<hidden>@" + parts.netloc.rpartition("@")[2]).geturl()
        raise RulesError(
            f"{key}.base_url", hidden, "contains a user name or password, and the rules file must not contain credentials",
            "Remove user:password@ from the URL and put the key in key_env, the environment variable the gateway reads it from.",
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RulesError(f"{key}.base_url", base_url, "is not an http(s) URL", "Set it like https://api.openai.com.")
    base_path = parts.path.rstrip("/")
    if parts.query or (base_path and kind != "openai-compatible"):
        raise RulesError(
            f"{key}.base_url", base_url, "has a path or query",
            "Give scheme, host and port only; request paths such as /v1/messages are kept as the client sent them.",
        )
    if base_path.endswith("/v1"):
        raise RulesError(
            f"{key}.base_url", base_url, "ends with /v1",
            "Leave out the trailing /v1: request paths such as /v1/chat/completions are appended to the base URL.",
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise RulesError(f"{key}.base_url", base_url, f"has an invalid port: {e}", "Give a port from 1 to 65535, like http://127.0.0.1:8000.") from e

    key_env = spec.get("key_env")
    if not isinstance(key_env, str) or not _ENV.match(key_env):
        raise RulesError(f"{key}.key_env", key_env, "is not an environment variable name", "Set it like OPENAI_API_KEY.")

    hosts = spec.get("hosts", list(KIND_HOSTS[kind]))
    hosts = _list(hosts, f"{key}.hosts")
    # Kinds without a default host may leave `hosts` out: the base-URL listener reaches them anyway.
    if (not hosts and KIND_HOSTS[kind]) or not all(isinstance(h, str) and h for h in hosts):
        example = KIND_HOSTS[kind][0] if KIND_HOSTS[kind] else "myresource.openai.azure.com"
        raise RulesError(f"{key}.hosts", hosts, "must be a non-empty list of host names", f"For example: [{example}].")

    deployments = _mapping(spec.get("deployments", {}), f"{key}.deployments")
    if deployments and kind != "azure":
        raise RulesError(f"{key}.deployments", deployments, "is only valid for kind azure", "Remove it, or set kind: azure.")
    for deployment, model in deployments.items():
        if not isinstance(deployment, str) or not isinstance(model, str) or not model:
            raise RulesError(
                f"{key}.deployments.{deployment}", model, "is not a model name",
                "Map each deployment name to the model it serves, like prod-gpt4o: gpt-4o.",
            )

    price_provider = spec.get("price_provider", KIND_PRICE_PROVIDERS.get(kind))
    if price_provider is not None and (not isinstance(price_provider, str) or not _NAME.match(price_provider)):
        raise RulesError(
            f"{key}.price_provider", price_provider, "is not a provider id",
            "Give a genai-prices provider id such as groq, mistral or openrouter, or leave it out.",
        )

    return Provider(
        name=name,
        kind=kind,
        scheme=parts.scheme,
        host=parts.hostname.lower(),
        port=port,
        hosts=tuple(h.lower() for h in hosts),
        key_env=key_env,
        base_path=base_path,
        deployments=dict(deployments),
        price_provider=price_provider,
    )


def _route(name: Any, spec: Any, providers: dict[str, Provider], projects: dict[str, Project]) -> Route:
    key = f"routes.{name}"
    _check_name(name, key)
    spec = dict(_mapping(spec, key))
    match_spec = spec.pop("match", None)
    try:
        config = parse_config(spec, providers, key)
        match = parse_match(match_spec, f"{key}.match", providers, projects) if match_spec is not None else None
    except ConfigError as e:
        fix = e.fix or "README.md shows the format of strategy and targets."
        raise RulesError(e.path, e.value if e.has_value else spec, e.problem, fix) from e
    return Route(name=name, config=config, match=match)


def _fallbacks(spec: Any) -> FallbackSettings:
    try:
        return parse_fallbacks(spec)
    except ConfigError as e:
        raise RulesError(e.path, spec, e.problem, "README.md lists the settings of the fallbacks section.") from e


def _project(name: Any, spec: Any) -> Project:
    key = f"projects.{name}"
    _check_name(name, key)
    spec = _mapping(spec, key)
    if "key" in spec or "api_key" in spec:
        raise RulesError(
            f"{key}.key", "<hidden>", "is a plaintext key; the rules file must not contain keys",
            "Use key_env: VARIABLE, or key_sha256: <output of: printf %s KEY | tollhouse hash-key>.",
        )
    _reject_unknown(spec, key, {"key_env", "key_sha256"})

    has_env = "key_env" in spec
    has_hash = "key_sha256" in spec
    if has_env == has_hash:
        raise RulesError(
            key, dict(spec), "needs exactly one of key_env and key_sha256",
            "Set key_env: VARIABLE or key_sha256: <output of: printf %s KEY | tollhouse hash-key>.",
        )

    if has_hash:
        digest = spec["key_sha256"]
        if not isinstance(digest, str) or not _SHA256.match(digest.lower()):
            raise RulesError(
                f"{key}.key_sha256", digest, "is not a sha256 hex digest",
                "Compute it with: printf %s KEY | tollhouse hash-key (or printf %s KEY | sha256sum, "
                "dropping the trailing ' -' that sha256sum prints).",
            )
        return Project(name=name, key_sha256=digest.lower())

    env = spec["key_env"]
    if not isinstance(env, str) or not _ENV.match(env):
        raise RulesError(f"{key}.key_env", env, "is not an environment variable name", "Set it like TOLLHOUSE_KEY_ALPHA.")
    value = os.environ.get(env)
    # NOTE: a project whose variable is unset has no key and rejects every call; startup logs a warning.
    return Project(name=name, key_sha256=project_key_digest(value) if value else None, key_env=env)


def _tunnels(spec: Any) -> TunnelRules:
    spec = _mapping(spec, "tunnels")
    _reject_unknown(spec, "tunnels", {"allow", "require_project_key", "blocked_networks"})
    for name in ("allow", "require_project_key"):
        if name in spec and not isinstance(spec[name], bool):
            raise RulesError(f"tunnels.{name}", spec[name], "is not true or false", f"Write {name}: true or {name}: false.")
    networks = []
    for index, value in enumerate(_list(spec.get("blocked_networks", list(DEFAULT_BLOCKED_NETWORKS)), "tunnels.blocked_networks")):
        try:
            networks.append(ipaddress.ip_network(str(value), strict=False))
        except ValueError as e:
            raise RulesError(
                f"tunnels.blocked_networks[{index}]", value, "is not a network", "Write it like 10.0.0.0/8 or ::1/128."
            ) from e
    return TunnelRules(
        allow=spec.get("allow", True),
        require_project_key=spec.get("require_project_key", False),
        blocked_networks=tuple(networks),
    )


def _logging(spec: Any, data_dir: Path) -> LoggingRules:
    spec = _mapping(spec, "logging")
    _reject_unknown(spec, "logging", {"database", "flush_interval", "bodies", "body_max_bytes"})
    database = _path(spec.get("database", "tollhouse.duckdb"), "logging.database", data_dir)
    flush_interval = _positive_number(spec.get("flush_interval", 0.5), "logging.flush_interval")
    if flush_interval > 1.0:
        raise RulesError(
            "logging.flush_interval", flush_interval, "is above 1 second",
            "Keep it at most 1: a killed gateway loses the rows of the last interval.",
        )
    bodies = spec.get("bodies", False)
    if not isinstance(bodies, bool):
        raise RulesError("logging.bodies", bodies, "is not true or false", "Write bodies: true or bodies: false.")
    return LoggingRules(
        database=database,
        flush_interval=flush_interval,
        bodies=bodies,
        body_max_bytes=_positive_int(spec.get("body_max_bytes", 65536), "logging.body_max_bytes"),
    )


def _price(model: str, spec: Any) -> PriceOverride:
    key = f"prices.{model}"
    spec = _mapping(spec, key)
    fields = ("input", "output", "cache_read", "cache_write", "cache_write_1h")
    _reject_unknown(spec, key, set(fields))
    values: dict[str, Decimal] = {}
    for name in fields:
        if name not in spec:
            if name in ("input", "output"):
                raise RulesError(f"{key}.{name}", None, "is missing", "Give the price in USD per million tokens, e.g. 2.50.")
            continue
        try:
            value = Decimal(str(spec[name]))
        except InvalidOperation as e:
            raise RulesError(f"{key}.{name}", spec[name], "is not a number", "Give USD per million tokens, e.g. 2.50.") from e
        if not value.is_finite() or value < 0:
            raise RulesError(f"{key}.{name}", spec[name], "is not a non-negative number", "Give USD per million tokens, e.g. 2.50.")
        values[name] = value
    return PriceOverride(**values)


def _plugin_ref(ref: Any, key: str, base_dir: Path) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise RulesError(key, ref, "is not a module name or file path", "Write a module like mypkg.plugin or a path like plugins/team.py.")
    if ref.endswith(".py"):
        return str((base_dir / ref).resolve())
    return ref


def _check_hosts_unique(providers: dict[str, Provider]) -> None:
    seen: dict[str, str] = {}
    for provider in providers.values():
        for host in provider.hosts:
            if host in seen:
                raise RulesError(
                    f"providers.{provider.name}.hosts", host, f"is already intercepted for provider {seen[host]!r}",
                    "Give each provider its own hosts.",
                )
            seen[host] = provider.name


# -- value checks ----------------------------------------------------------------------------------


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RulesError(key, value, "is not a mapping", "Write it as `key: value` lines indented under it.")
    return value


def _list(value: Any, key: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RulesError(key, value, "is not a list", "Write it as `- item` lines or [a, b].")
    return value


def _reject_unknown(spec: dict, key: str, allowed: set[str]) -> None:
    """Raise RulesError for the first name in `spec` not in `allowed`; `key` is "" for the top level."""
    for name in spec:
        if name in allowed:
            continue
        fix = f"Allowed here: {', '.join(sorted(allowed))}."
        close = difflib.get_close_matches(str(name), allowed, n=1)
        if close:
            fix = f"Did you mean {close[0]}? {fix}"
        raise RulesError(f"{key}.{name}" if key else str(name), spec[name], "is not a known setting", fix)


def _check_name(name: Any, key: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RulesError(key, name, "is not a valid name", "Use letters, digits, '_', '-' and '.'.")


def parse_listen(value: Any, key: str) -> tuple[str, int]:
    """Parse HOST:PORT; raise RulesError naming `key` when it is malformed."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise RulesError(key, value, "is not HOST:PORT", "Write it like 0.0.0.0:8080 (port 0 picks a free port).")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_admin_listen(value: Any) -> tuple[str | None, int]:
    """Parse `admin_listen`: HOST:PORT, or false to turn the admin listener off (host None)."""
    if value is False:
        return None, 0
    return parse_listen(value, "admin_listen")


def parse_log_format(value: Any, key: str) -> str:
    if value not in LOG_FORMATS:
        raise RulesError(key, value, "is not a log format", f"Use one of: {', '.join(LOG_FORMATS)}.")
    return value


def _path(value: Any, key: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise RulesError(key, value, "is not a path", "Write a file or folder path.")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path)


def _positive_number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise RulesError(key, value, "is not a positive number", "Give a number greater than 0.")
    return float(value)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RulesError(key, value, "is not a positive whole number", "Give a whole number greater than 0.")
    return value


def _policy_rules():
    # Imported late: addons.policy_rules imports this module's helpers.
    from addons import policy_rules

    return policy_rules
