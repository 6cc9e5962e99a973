"""Replaces the client's project key with the provider's real key from the gateway's environment.

Runs last among `tollhouse_upstream_request` implementations, so no other plugin receives the real key
in the request, and every credential header the client sent is removed before the call goes upstream.
"""

from __future__ import annotations

from addons import hookimpl
from addons.errors import error_response

# Headers that may carry a client credential; all are removed before the real key is set.
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "proxy-authorization")


@hookimpl(trylast=True)
def tollhouse_upstream_request(call, flow) -> None:
    if flow.response is not None or call.provider is None:
        return
    provider = call.provider
    real_key = provider.api_key
    if real_key is None:
        call.answered_by_gateway = True
        flow.response = error_response(
            call.client_format or provider.api_format,
            500,
            f"tollhouse has no key for provider {provider.name!r}: set {provider.key_env} in the gateway's "
            "environment and restart it.",
            request_id=call.request_id,
        )
        call.error = f"gateway has no key for provider {provider.name} ({provider.key_env} unset)"
        return

    headers = flow.request.headers
    for name in _CREDENTIAL_HEADERS:
        headers.pop(name, None)
    if provider.kind == "anthropic":
        headers["x-api-key"] = real_key
    elif provider.kind == "azure":
        headers["api-key"] = real_key
    else:
        headers["authorization"] = f"Bearer {real_key}"
