"""Runs mitmproxy with the gateway addon: options, logging, signals and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import sys
from collections.abc import Callable

from mitmproxy import ctx
from mitmproxy.options import Options
from mitmproxy.proxy.mode_specs import ReverseMode
from mitmproxy.tools.dump import DumpMaster

from addons.admin import AdminServer
from addons.ca import ca_dir, ensure_ca
from addons.errors import install_json_error_pages
from addons.gateway import Gateway
from addons.log_format import make_formatter
from addons.logstore import LogStore
from addons.plugin_manager import make_plugin_manager
from addons.routing import BASE_URL_PLACEHOLDER
from addons.reload import plan_reload
from addons.rules import Rules, RulesError, load_rules
from addons.secrets import Redactor, install_log_redaction

logger = logging.getLogger("tollhouse")

#: Name of the stderr handler that `configure_logging` adds.
_HANDLER_NAME = "tollhouse-stderr"

#: Bytes above the rules' `max_request_bytes` at which mitmproxy stops reading a request body.
BODY_SIZE_SLACK = 16 * 1024 * 1024


def configure_logging(level: int = logging.INFO, log_format: str = "text") -> None:
    """Log tollhouse at `level` to stderr; keep mitmproxy's per-connection messages quiet.

    `log_format` is "text" or "json" (`addons.log_format`). Calling it again changes the format of
    the handler it added.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        root.addHandler(handler)
    for handler in root.handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.setFormatter(make_formatter(log_format))
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

    def __init__(self, admin: AdminServer | None = None) -> None:
        self.address: tuple[str, int] | None = None
        self.base_url_address: tuple[str, int] | None = None
        self.admin = admin

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
        if self.admin is not None:
            admin_host, admin_port = self.admin.address
            print(f"tollhouse admin listening on {admin_host}:{admin_port}", flush=True)


def _drop_cancelled(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


async def serve(rules: Rules, overrides: Callable[[Rules], Rules] | None = None) -> int:
    """Run the gateway until SIGTERM or SIGINT; reload the rules on SIGHUP; return the process exit code.

    `overrides` applies the command line's settings to rules read from the file; a reload applies it
    to the new rules too.
    """
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

    admin: AdminServer | None = None
    if rules.admin_listen_host is not None:
        admin = AdminServer(
            rules.admin_listen_host,
            rules.admin_listen_port,
            lambda: health(gateway, store),
            database=rules.logging.database,
        )
        try:
            await admin.start()
        except OSError as e:
            logger.error(
                "cannot listen on admin_listen %s:%d: %s. Set admin_listen in the rules to a free port, "
                "or to false to turn the admin listener off.",
                rules.admin_listen_host, rules.admin_listen_port, e.strerror or e,
            )
            return 1
    store.start()

    master = DumpMaster(
        Options(mode=proxy_modes(rules), confdir=str(ca_dir(rules.data_dir))),
        with_termlog=False,
        with_dumper=False,
    )
    # mitmproxy forwards every log record to its event loop as a deprecated `add_log` event. No addon
    # of the gateway reads those, and a record logged after the loop closed would fail.
    master._legacy_log_events.uninstall()
    master.options.update(**mitmproxy_options(rules))
    gateway = Gateway(rules, pm, store, redactor)
    ready = _Ready(admin)
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
        grace = gateway.rules.shutdown_grace
        logger.info(
            "stopping: no new connections; waiting up to %.0f s for %d call(s) in flight",
            grace,
            gateway.in_flight,
        )
        master.options.update(server=False)
        if not await gateway.wait_idle(grace):
            logger.warning("%d call(s) still in flight after %.0f s; closing them", gateway.in_flight, grace)
        # Shutdown cancels the handlers of idle keep-alive connections, and asyncio reports each one
        # as an error; they are expected here.
        logging.getLogger("asyncio").addFilter(_drop_cancelled)
        # Close the relay: its streams still in flight end with an error event, which mitmproxy gets a
        # moment to pass on before it shuts down.
        await gateway.relay.close()
        if gateway.in_flight:
            await asyncio.sleep(0.2)
        master.shutdown()

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def on_signal() -> None:
        task = loop.create_task(stop_gracefully())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if rules.path is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_rules(gateway, redactor, overrides))

    try:
        await master.run()
    finally:
        if admin is not None:
            await admin.close()
        store.close()
        logger.info("log flushed to %s; stopped", rules.logging.database)
    return 0 if ready.address else 1


def health(gateway: Gateway, store: LogStore) -> dict:
    """Return the `/healthz` fields besides status and uptime."""
    return {"calls_in_flight": gateway.in_flight, "log_writer": store.writer_state()}


def reload_rules(gateway: Gateway, redactor: Redactor, overrides: Callable[[Rules], Rules] | None) -> bool:
    """Re-read the rules file and apply what can change at run time (`addons.reload`).

    Invalid new rules leave the current ones in place, with a warning that gives the reason. Return
    True when the new rules were applied.
    """
    current = gateway.rules
    path = current.path
    logger.info("SIGHUP: reloading the rules from %s", path)
    try:
        new = load_rules(path)
        if overrides is not None:
            new = overrides(new)
        new, pending = plan_reload(current, new)
    except RulesError as e:
        logger.warning("reload failed, keeping the current rules: invalid rules in %s: %s", path, e)
        return False
    except Exception:
        # Any other error is a bug in the validation, and the gateway keeps running with the rules it has.
        logger.exception("reload failed, keeping the current rules: reading %s raised an unexpected error", path)
        return False

    # NOTE: the plugins start afresh, so rate-limit windows restart empty and the in-memory response
    # cache is emptied. Budgets read the spend back from the request log, which lacks unflushed rows.
    try:
        gateway.pm.hook.tollhouse_configure.call_historic(kwargs={"rules": new})
    except Exception as e:
        logger.warning(
            "reload failed, keeping the current rules: a plugin rejected the new rules from %s: %s: %s",
            path, type(e).__name__, e,
        )
        try:
            gateway.pm.hook.tollhouse_configure.call_historic(kwargs={"rules": current})
        except Exception:
            logger.exception("a plugin failed to take back the current rules after a failed reload")
        return False

    redactor.update([p.api_key for p in new.providers.values() if p.api_key])
    gateway.apply_rules(new)
    logger.info("reloaded the rules from %s: %d project(s), %d provider(s)", path, len(new.projects), len(new.providers))
    if pending:
        logger.warning("these changed settings take effect only after a restart: %s", ", ".join(pending))
    return True
