"""Reloading the rules file on SIGHUP while the gateway runs.

A reload changes at once: projects and their keys, prices, providers' `base_url`, `key_env`,
deployments and price ids, routes, `logging.bodies` and `logging.body_max_bytes`, tunnels and
`shutdown_grace`. The `cache`, `rate_limits`, `budgets` and `settings` sections change too, because
the plugins get a new `tollhouse_configure` call. Calls in flight finish under the rules they started
with, because each call keeps the provider and project objects it was given.

The settings in `RESTART_ONLY` stay as they were until a restart; a reload that changes them logs a
warning naming them. A reload that changes the set of intercepted host names is rejected as a whole,
because mitmproxy decides which TLS connections it intercepts from that set at start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from addons.rules import Rules, RulesError

#: Settings that a running gateway cannot change, with how to read each from `Rules`.
RESTART_ONLY: dict[str, Callable[[Rules], Any]] = {
    "listen": lambda rules: (rules.listen_host, rules.listen_port),
    "base_url_listen": lambda rules: (rules.base_url_listen_host, rules.base_url_listen_port),
    "admin_listen": lambda rules: (rules.admin_listen_host, rules.admin_listen_port),
    "data_dir": lambda rules: rules.data_dir,
    "logging.database": lambda rules: rules.logging.database,
    "logging.flush_interval": lambda rules: rules.logging.flush_interval,
    "plugins": lambda rules: rules.plugins,
    "max_request_bytes": lambda rules: rules.max_request_bytes,
    "log_format": lambda rules: rules.log_format,
    # The relay's httpx pool is built with the connect timeout once, at start.
    "fallbacks.connect_timeout": lambda rules: rules.fallbacks.connect_timeout,
}


def plan_reload(current: Rules, new: Rules) -> tuple[Rules, list[str]]:
    """Return the rules to apply and the changed settings that wait for a restart.

    The returned rules are `new` with every `RESTART_ONLY` setting kept at its current value.

    :raises RulesError: when `new` intercepts other host names than `current`.
    """
    if new.intercepted_hosts != current.intercepted_hosts:
        added = sorted(new.intercepted_hosts - current.intercepted_hosts)
        removed = sorted(current.intercepted_hosts - new.intercepted_hosts)
        raise RulesError(
            "providers", {"added hosts": added, "removed hosts": removed},
            "change the host names the forward proxy intercepts, which a reload cannot change",
            "Restart the gateway to apply them, or keep the providers' hosts as they are.",
        )
    pending = [name for name, read in RESTART_ONLY.items() if read(current) != read(new)]
    applied = dataclasses.replace(
        new,
        listen_host=current.listen_host,
        listen_port=current.listen_port,
        base_url_listen_host=current.base_url_listen_host,
        base_url_listen_port=current.base_url_listen_port,
        admin_listen_host=current.admin_listen_host,
        admin_listen_port=current.admin_listen_port,
        data_dir=current.data_dir,
        logging=dataclasses.replace(
            new.logging, database=current.logging.database, flush_interval=current.logging.flush_interval
        ),
        plugins=current.plugins,
        max_request_bytes=current.max_request_bytes,
        log_format=current.log_format,
        fallbacks=dataclasses.replace(new.fallbacks, connect_timeout=current.fallbacks.connect_timeout),
    )
    return applied, pending
