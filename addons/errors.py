"""Error answers in each provider's own JSON format.

The SDKs map the status to an exception class and read the message from the body, so an error made by
the gateway reads to the client like one from the provider.
"""

from __future__ import annotations

import json

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

# Anthropic's `error.type` for each status; unlisted statuses use "api_error".
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# OpenAI's `error.type` for each status; unlisted 4xx use "invalid_request_error".
_OPENAI_TYPES = {
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "server_error",
}


def error_body(kind: str, status: int, message: str, code: str | None = None, request_id: str | None = None) -> dict:
    """Return the JSON error object that `kind` ("openai" or "anthropic") sends for `status`."""
    if kind == "anthropic":
        body: dict = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
        if request_id:
            body["request_id"] = request_id
        return body
    error_type = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def error_response(
    kind: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> http.Response:
    """Build a complete error response in the provider's format.

    `x-should-retry: false` is set for statuses that retrying cannot fix (the official SDKs honour it),
    so a 401 from the gateway is not retried twice by the client.
    """
    body = json.dumps(error_body(kind, status, message, code, request_id)).encode()
    response = http.Response.make(status, body, {"content-type": "application/json"})
    if status in (400, 401, 403, 404, 413, 422):
        response.headers["x-should-retry"] = "false"
    if request_id:
        response.headers["x-tollhouse-request-id"] = request_id
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _json_error_page(status_code: int, message: str = "") -> bytes:
    # mitmproxy answers some failures itself (upstream unreachable, a chunked body over the size limit)
    # where no flow is at hand to tell which provider the client speaks. This body parses as an
    # error in both formats: OpenAI's SDK reads `error.message`, Anthropic's reads `type` and `error.type`.
    error_type = _ANTHROPIC_TYPES.get(status_code, "api_error")
    body = {
        "type": "error",
        "error": {"type": error_type, "message": f"tollhouse: {message}", "param": None, "code": None},
    }
    response = http.Response.make(
        status_code,
        json.dumps(body).encode(),
        {"content-type": "application/json", "connection": "close"},
    )
    if status_code < 500:
        # A 5xx here (upstream unreachable) may pass on a retry; a 4xx (body too large) cannot.
        response.headers["x-should-retry"] = "false"
    return http1.assemble_response(response)


def install_json_error_pages() -> None:
    """Make mitmproxy's own error answers JSON instead of HTML.

    mitmproxy 12.3 renders these in `mitmproxy.proxy.layers.http._http1.make_error_response`, looked up
    at call time, so replacing that module attribute takes effect for every connection.
    """
    _http1.make_error_response = _json_error_page


# Maximum length of an error message stored from an upstream error body, in characters.
_ERROR_MESSAGE_MAX = 500


def error_message(body: bytes) -> str:
    """Return the message of a provider error body, or the start of the body if it is not JSON."""
    try:
        parsed = json.loads(body)
        message = parsed["error"]["message"]
        if isinstance(message, str):
            return message[:_ERROR_MESSAGE_MAX]
    except (ValueError, KeyError, TypeError, RecursionError):
        pass
    return body[:_ERROR_MESSAGE_MAX].decode("utf-8", errors="replace")
