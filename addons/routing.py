"""Routing of the base-URL listener: which provider a request goes to, and at which path.

Clients of the base-URL listener (Portkey-compatible, `http://gateway:8787/v1`) name no provider host,
so each request is routed by its path and its Portkey headers:

- `/v1/messages` and `/v1/messages/count_tokens` go to Anthropic; `/v1/chat/completions`,
  `/v1/responses`, `/v1/embeddings` and `/v1/models` go to OpenAI; Azure paths (`/openai/...`) go to
  Azure. The default provider of a kind is the one named like the kind, else the first of that kind.
- `x-portkey-config` carries a JSON config in Portkey's shape (`addons.route_rules`) or the name of a
  route from the rules' `routes:` section. Its first target's provider wins over `x-portkey-provider`,
  which names a provider of the rules (or a kind, meaning that kind's default provider) and is used
  for targets that name none.

Every problem raises `RoutingError`, and the gateway sends the client a 400 in its own format.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from addons.call import endpoint_for
from addons.route_rules import ConfigError, Target, parse_config
from addons.rules import Provider, Rules

#: Fixed target of the reverse-mode listener. Every request is routed before mitmproxy could connect,
#: and the egress guard blocks a connection to this address in case routing did not run.
BASE_URL_PLACEHOLDER = ("127.0.0.1", 9)

PROVIDER_HEADER = "x-portkey-provider"
CONFIG_HEADER = "x-portkey-config"
API_KEY_HEADER = "x-portkey-api-key"
TRACE_ID_HEADER = "x-portkey-trace-id"
METADATA_HEADER = "x-portkey-metadata"
#: Prefix of the headers that are read by the gateway and never sent upstream.
PORTKEY_PREFIX = "x-portkey-"

# Kind of the default provider for each native path, without query and trailing slash.
_NATIVE_KINDS = {
    "/v1/messages": "anthropic",
    "/v1/messages/count_tokens": "anthropic",
    "/v1/chat/completions": "openai",
    "/v1/responses": "openai",
    "/v1/embeddings": "openai",
    "/v1/models": "openai",
}

# Names Portkey uses for a kind, where they differ from tollhouse's kind names.
_KIND_ALIASES = {"azure-openai": "azure"}

_AZURE_DEPLOYMENT = re.compile(r"^/openai/deployments/([^/]+)(/.*)$")


class RoutingError(ValueError):
    """A request the base-URL listener cannot route; the message names the header and the accepted values."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


@dataclass
class Route:
    """The routing decision for one request of the base-URL listener."""

    provider: Provider
    #: "openai" or "anthropic": the wire format of the client, known from the path.
    client_format: str
    #: The upstream path, query string included.
    path: str
    endpoint: str
    #: The provider for config targets that name none: from `x-portkey-provider` or from the path.
    default_provider: Provider | None = None
    #: The routing config from `x-portkey-config`, or None.
    config: Target | None = None
    #: The route's name, or "x-portkey-config" for a JSON config in the header.
    route_name: str | None = None


def client_format_for(path: str) -> str:
    """Return the wire format a client speaks on `path`: "anthropic" for /v1/messages..., else "openai"."""
    bare = path.split("?", 1)[0].rstrip("/")
    return "anthropic" if bare in ("/v1/messages", "/v1/messages/count_tokens") else "openai"


def azure_deployment(path: str) -> str | None:
    """Return the deployment name of an Azure deployment path (`/openai/deployments/NAME/...`), or None."""
    match = _AZURE_DEPLOYMENT.match(path.split("?", 1)[0])
    return match.group(1) if match else None


def native_path(path: str) -> str:
    """Return the `/v1/...` path that a client path stands for, without its query.

    Azure's deployment form `/openai/deployments/{deployment}/chat/completions` and its v1 form
    `/openai/v1/chat/completions` both stand for `/v1/chat/completions`.
    """
    bare = path.split("?", 1)[0].rstrip("/")
    deployment = _AZURE_DEPLOYMENT.match(bare)
    if deployment:
        return "/v1" + deployment.group(2)
    if bare.startswith("/openai/v1/"):
        return bare.removeprefix("/openai")
    return bare


def upstream_path(provider: Provider, client_path: str, path: str) -> str:
    """Return the path to request from `provider` for the native `path` (`/v1/...`).

    `client_path` is the path the client sent, and its query string is kept. An Azure path is kept
    unchanged when the request stays on Azure and on the same endpoint.
    """
    bare, sep, query = client_path.partition("?")
    suffix = sep + query
    if provider.kind == "azure":
        if bare.startswith("/openai/") and native_path(bare) == path:
            return client_path
        # The v1 form needs no api-version and takes the deployment name as the body's model.
        return "/openai" + path + suffix
    return provider.base_path + path + suffix


def route_request(rules: Rules, path: str, headers) -> Route:
    """Choose the provider and the upstream path of a request received by the base-URL listener."""
    client_format = client_format_for(path)
    native = native_path(path)
    config, route_name = read_config(rules, headers.get(CONFIG_HEADER))

    if headers.get(PROVIDER_HEADER, "").strip():
        default = _named_provider(rules, headers[PROVIDER_HEADER].strip(), PROVIDER_HEADER)
    else:
        default = None
    first = config.leaves()[0] if config is not None else None
    if first is not None and first.provider is not None:
        provider = first.provider
    else:
        provider = default or _default_provider(rules, path, native)

    return Route(
        provider=provider,
        default_provider=default or _default_provider_or_none(rules, path, native) or provider,
        client_format=client_format,
        path=upstream_path(provider, path, native),
        endpoint=endpoint_for(client_format, native),
        config=config,
        route_name=route_name,
    )


def _default_provider_or_none(rules: Rules, path: str, native: str) -> Provider | None:
    try:
        return _default_provider(rules, path, native)
    except RoutingError:
        return None


def _default_provider(rules: Rules, path: str, native: str) -> Provider:
    bare = path.split("?", 1)[0]
    if bare.startswith("/openai/"):
        kind = "azure"
    else:
        kind = _NATIVE_KINDS.get(native)
        if kind is None and native.startswith("/v1/models/"):
            kind = "openai"
    if kind is None:
        raise RoutingError(
            f"tollhouse: the base-URL listener does not serve {bare}. Use one of {', '.join(_NATIVE_KINDS)} "
            f"or an Azure path /openai/..., or name a provider with the {PROVIDER_HEADER} header.",
            status=404,
        )
    provider = _provider_of_kind(rules, kind)
    if provider is None:
        raise RoutingError(
            f"tollhouse: no provider of kind {kind} is configured for {bare}. Name one with the "
            f"{PROVIDER_HEADER} header; configured providers: {', '.join(rules.providers)}."
        )
    return provider


def _provider_of_kind(rules: Rules, kind: str) -> Provider | None:
    named = rules.providers.get(kind)
    if named is not None and named.kind == kind:
        return named
    return next((p for p in rules.providers.values() if p.kind == kind), None)


def _named_provider(rules: Rules, name: str, header: str) -> Provider:
    provider = rules.providers.get(name)
    if provider is not None:
        return provider
    kind = _KIND_ALIASES.get(name, name)
    provider = _provider_of_kind(rules, kind)
    if provider is not None:
        return provider
    raise RoutingError(
        f"tollhouse: {header}: unknown provider {name!r}. Use one of: {', '.join(rules.providers)}."
    )


def read_config(rules: Rules, value: str | None) -> tuple[Target | None, str | None]:
    """Return (config, route name) from an `x-portkey-config` header value; (None, None) without one.

    The value is a JSON config object, or the name of a route of the rules. A JSON config gets the route
    name "x-portkey-config" in the log.
    """
    if value is None or not value.strip():
        return None, None
    value = value.strip()
    if not value.startswith("{"):
        route = rules.routes.get(value)
        if route is None:
            names = ", ".join(rules.routes) or "none are configured"
            raise RoutingError(
                f"tollhouse: {CONFIG_HEADER}: {value!r} is neither a JSON object nor a route of the rules "
                f"(routes: {names}). Send a JSON object like "
                '{"provider": "anthropic", "override_params": {"model": "..."}} or a route name.'
            )
        return route.config, route.name

    try:
        config = json.loads(value)
    except RecursionError as e:
        raise RoutingError(f"tollhouse: {CONFIG_HEADER} is nested too deeply to parse.") from e
    except ValueError as e:
        raise RoutingError(
            f"tollhouse: {CONFIG_HEADER} is not valid JSON: {e}. Send a JSON object like "
            '{"provider": "anthropic", "override_params": {"model": "..."}} or a route name.'
        ) from e
    if not isinstance(config, dict):
        raise RoutingError(f"tollhouse: {CONFIG_HEADER} must be a JSON object.")
    try:
        return parse_config(config, rules.providers), CONFIG_HEADER
    except ConfigError as e:
        raise RoutingError(f"tollhouse: {CONFIG_HEADER}: {str(e).rstrip('.')}.") from e


def read_portkey_metadata(value: str | None) -> dict[str, str]:
    """Return the labels of an `x-portkey-metadata` header (a JSON object), as strings for `call.tags`."""
    if value is None or not value.strip():
        return {}
    try:
        metadata = json.loads(value)
    except RecursionError as e:
        raise RoutingError(f"tollhouse: {METADATA_HEADER} is nested too deeply to parse.") from e
    except ValueError as e:
        raise RoutingError(
            f'tollhouse: {METADATA_HEADER} is not valid JSON: {e}. Send a JSON object like {{"team": "search"}}.'
        ) from e
    if not isinstance(metadata, dict):
        raise RoutingError(f'tollhouse: {METADATA_HEADER} must be a JSON object like {{"team": "search"}}.')
    return {str(key): item if isinstance(item, str) else json.dumps(item) for key, item in metadata.items()}


def strip_portkey_headers(headers) -> None:
    """Remove every `x-portkey-*` header, so that none goes upstream."""
    for name in [name for name in headers if name.lower().startswith(PORTKEY_PREFIX)]:
        headers.pop(name, None)
