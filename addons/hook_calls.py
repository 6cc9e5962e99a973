"""Calls the implementations of a hook one by one, so that one failing plugin does not stop the rest.

The hooks that run after the answer has started (`tollhouse_response_headers`, `tollhouse_sse_event`,
`tollhouse_response`, `tollhouse_price`, `tollhouse_log_row`, `tollhouse_call_end`) are called this
way: the answer is already on its way, so an exception in one plugin is recorded and the built-in
usage, pricing and logging still run. The order is pluggy's (`tryfirst`, then the latest registered,
then `trylast`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

#: Receives the plugin's name and the exception it raised.
ErrorHandler = Callable[[str, Exception], None]


class HookImplementations:
    """The implementations of one hook in call order, each with the argument names it accepts.

    New-style wrappers (`@hookimpl(wrapper=True)`) are supported as pluggy runs them: each wrapper runs
    up to its `yield` before the plain implementations, then receives their results and may replace
    them with its return value. Old-style `hookwrapper=True` implementations are rejected.
    """

    __slots__ = ("name", "wrappers", "entries")

    def __init__(self, caller: pluggy.HookCaller):
        self.name = caller.name
        implementations = caller.get_hookimpls()
        for implementation in implementations:
            if implementation.hookwrapper:
                raise pluggy.PluginValidationError(
                    implementation.plugin,
                    f"{self.name} in plugin {implementation.plugin_name!r} uses hookwrapper=True; use wrapper=True",
                )
        # pluggy calls the last entry of get_hookimpls() first.
        ordered = [(i.plugin_name, i.function, tuple(i.argnames), i.wrapper) for i in reversed(implementations)]
        self.wrappers = [entry[:3] for entry in ordered if entry[3]]
        self.entries = [entry[:3] for entry in ordered if not entry[3]]

    def call_each(self, kwargs: dict[str, Any], on_error: ErrorHandler, skip: set[str] | None = None) -> list:
        """Call every implementation not in `skip`; return the results that are not None."""
        started = self._start_wrappers(kwargs, on_error, skip) if self.wrappers else ()
        results = []
        for plugin_name, function, argnames in self.entries:
            if skip and plugin_name in skip:
                continue
            try:
                result = function(*[kwargs[name] for name in argnames])
            except Exception as e:
                on_error(plugin_name, e)
                continue
            if result is not None:
                results.append(result)
        for plugin_name, generator in reversed(started):
            try:
                generator.send(results)
            except StopIteration as stop:
                results = stop.value
            except Exception as e:
                on_error(plugin_name, e)
            else:
                on_error(plugin_name, RuntimeError("wrapper did not return after its yield"))
        return results

    def _start_wrappers(self, kwargs: dict[str, Any], on_error: ErrorHandler, skip: set[str] | None) -> list:
        started = []
        for plugin_name, function, argnames in self.wrappers:
            if skip and plugin_name in skip:
                continue
            try:
                generator = function(*[kwargs[name] for name in argnames])
                next(generator)
            except Exception as e:
                on_error(plugin_name, e)
                continue
            started.append((plugin_name, generator))
        return started

    def first_result(self, kwargs: dict[str, Any], on_error: ErrorHandler) -> Any:
        """Call implementations until one returns something other than None, and return that.

        Wrappers are not run for first-result hooks.
        """
        for plugin_name, function, argnames in self.entries:
            try:
                result = function(*[kwargs[name] for name in argnames])
            except Exception as e:
                on_error(plugin_name, e)
                continue
            if result is not None:
                return result
        return None
