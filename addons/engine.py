"""Runs mitmproxy with the gateway addon: options, logging, signals and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import sys

from mitmproxy import ctx
from mitmproxy.options import Options
from mitmproxy.proxy.mode_specs import ReverseMode
from mitmproxy.tools.dump import DumpMaster

from addons.ca import ca_dir, ensure_ca
from addons.errors import install_json_error_pages
from addons.gateway import Gateway
from addons.logstore import LogStore
from addons.plugin_manager import make_plugin_manager
from addons.routing import BASE_URL_PLACEHOLDER
from addons.rules import Rules
from addons.secrets import Redactor, install_log_redaction

logger = logging.getLogger("tollhouse")

#: Bytes above the rules' `max_request_bytes` at which mitmproxy stops reading a request body.
BODY_SIZE_SLACK = 16 * 1024 * 1024


def configure_logging(level: int = logging.INFO) -> None:
    """Log tollhouse at `level` to stderr; keep mitmproxy's per-connection messages quiet."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)


def proxy_modes(rules: Rules) -> list[str]:
    """Return mitmproxy's mode specs: the forward proxy first, then the base-URL listener.

    The base-URL listener is a reverse proxy whose fixed target is a placeholder: `Gateway.requestheaders`
    routes every request it receives, and the egress guard blocks the placeholder if routing did not run.
    """
    placeholder_host, placeholder_port = BASE_URL_PLACEHOLDER
    base_url_port = rules.base_url_listen_port
    if base_url_port == 0 and rules.listen_port == 0 and rules.base_url_listen_host == rules.listen_host:
        # mitmproxy 12.3 rejects two servers with the same address spec, port 0 included, whenever
        # the options change (the graceful stop does), so the base-URL listener gets a port here.
        base_url_port = _free_port(rules.base_url_listen_host)
    return [
        f"regular@{rules.listen_host}:{rules.listen_port}",
        f"reverse:http://{placeholder_host}:{placeholder_port}@{rules.base_url_listen_host}:{base_url_port}",
    ]


def _free_port(host: str) -> int:
    """Return a TCP port that is free on `host` now (another process may take it before mitmproxy binds)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def mitmproxy_options(rules: Rules) -> dict:
    """Return the mitmproxy options the gateway depends on, beyond mode and confdir."""
    hosts = "|".join(re.escape(host) for host in sorted(rules.intercepted_hosts))
    placeholder = re.escape("%s:%d" % BASE_URL_PLACEHOLDER)
    return {
        # Never connect upstream before the request hooks have rerouted the call.
        "connection_strategy": "lazy",
        # Intercept TLS for provider hosts only; every other host passes as an untouched tunnel. The
        # base-URL listener's placeholder target must match too, or mitmproxy would pass its
        # connections through as raw TCP without parsing HTTP.
        "allow_hosts": [rf"^(?:{hosts})(?::\d+)?$", rf"^{placeholder}$"] if hosts else [rf"^{placeholder}$"],
        # The gateway answers bodies over max_request_bytes itself, in the provider's error format, but
        # mitmproxy reads such a body before the answer goes out. mitmproxy's own limit, which cuts a
        # body off while it arrives (with a less specific JSON error), sits higher and bounds the
        # memory one request can take.
        "body_size_limit": str(rules.max_request_bytes + BODY_SIZE_SLACK),
        # HTTP/1.1 only: mitmproxy's HTTP/2 layer answers its own errors with an HTML page, where the
        # HTTP/1.1 layer uses the JSON body from `addons.errors`. The official SDKs speak HTTP/1.1.
        "http2": False,
    }


class _Ready:
    """Reports the listening addresses once mitmproxy is running."""

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self.base_url_address: tuple[str, int] | None = None

    def running(self) -> None:
        for server in ctx.master.addons.get("proxyserver").servers:
            if not server.listen_addrs:
                continue
            host, port = server.listen_addrs[0][:2]
            if isinstance(server.mode, ReverseMode):
                self.base_url_address = (host, port)
            else:
                self.address = (host, port)
        # The lines tests and scripts wait for, the proxy's first; stdout so they are not mixed with log output.
        if self.address:
            print(f"tollhouse listening on {self.address[0]}:{self.address[1]}", flush=True)
        if self.base_url_address:
            print(f"tollhouse base-url listening on {self.base_url_address[0]}:{self.base_url_address[1]}", flush=True)


def _drop_cancelled(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


async def serve(rules: Rules) -> int:
    """Run the gateway until SIGTERM or SIGINT; return the process exit code."""
    redactor = Redactor([p.api_key for p in rules.providers.values() if p.api_key])
    for project in rules.projects.values():
        if project.key_sha256 is None:
            logger.warning(
                "project %s has no key: %s is unset in the gateway's environment, so it rejects every call",
                project.name, project.key_env,
            )
    for provider in rules.providers.values():
        if provider.api_key is None:
            logger.warning("provider %s has no key: set %s in the gateway's environment", provider.name, provider.key_env)

    install_json_error_pages()
    rules.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_ca(rules.data_dir)
    pm = make_plugin_manager(rules)
    store = LogStore(rules.logging.database, rules.logging.flush_interval)
    store.start()

    master = DumpMaster(
        Options(mode=proxy_modes(rules), confdir=str(ca_dir(rules.data_dir))),
        with_termlog=False,
        with_dumper=False,
    )
    # mitmproxy forwards every log record to its event loop as a deprecated `add_log` event; the
    # gateway has no addon that reads those, and a record logged after the loop closed would fail.
    master._legacy_log_events.uninstall()
    master.options.update(**mitmproxy_options(rules))
    gateway = Gateway(rules, pm, store, redactor)
    ready = _Ready()
    master.addons.add(gateway, ready)
    install_log_redaction(redactor)

    stopping = False

    async def stop_gracefully() -> None:
        nonlocal stopping
        if stopping:
            logger.warning("second stop signal: shutting down now")
            master.shutdown()
            return
        stopping = True
        logger.info(
            "stopping: no new connections; waiting up to %.0f s for %d call(s) in flight",
            rules.shutdown_grace,
            gateway.in_flight,
        )
        master.options.update(server=False)
        if not await gateway.wait_idle(rules.shutdown_grace):
            logger.warning("%d call(s) still in flight after %.0f s; closing them", gateway.in_flight, rules.shutdown_grace)
        # Shutdown cancels the handlers of idle keep-alive connections, and asyncio reports each one
        # as an error; they are expected here.
        logging.getLogger("asyncio").addFilter(_drop_cancelled)
        master.shutdown()

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def on_signal() -> None:
        task = loop.create_task(stop_gracefully())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    try:
        await master.run()
    finally:
        store.close()
        logger.info("log flushed to %s; stopped", rules.logging.database)
    return 0 if ready.address else 1
