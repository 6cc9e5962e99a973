"""Builds the pluggy plugin manager: built-in plugins, plugins named in the rules, installed plugins."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

import pluggy

from addons import hookspecs
from addons.rules import Rules, RulesError
from plugins import BUILTIN_PLUGINS

logger = logging.getLogger(__name__)

#: Entry-point group through which installed packages provide plugins.
ENTRY_POINT_GROUP = "tollhouse"


def make_plugin_manager(rules: Rules, *, load_entry_points: bool = True) -> pluggy.PluginManager:
    """Register the built-ins, then rules plugins, then entry-point plugins, and configure them all.

    pluggy calls implementations of a hook in reverse registration order, so a plugin registered
    later runs before the built-ins unless an implementation is marked `tryfirst`/`trylast`.
    """
    pm = pluggy.PluginManager("tollhouse")
    pm.add_hookspecs(hookspecs)

    for name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(name), name=name)

    for index, ref in enumerate(rules.plugins):
        module = _load_plugin(ref, f"plugins[{index}]")
        pm.register(module, name=ref)
        logger.info("loaded plugin %s", ref)

    if load_entry_points:
        count = pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        if count:
            logger.info("loaded %d plugin(s) from entry points %r", count, ENTRY_POINT_GROUP)

    pm.check_pending()
    pm.hook.tollhouse_configure.call_historic(kwargs={"rules": rules})
    return pm


def _load_plugin(ref: str, key: str) -> ModuleType:
    if ref.endswith(".py"):
        path = Path(ref)
        if not path.is_file():
            raise RulesError(key, ref, "is not an existing file", "Give a path to a .py file, relative to the rules file.")
        spec = importlib.util.spec_from_file_location(f"tollhouse_plugin_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise RulesError(key, ref, "cannot be loaded as a Python module", "Check the file name ends in .py.")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise RulesError(key, ref, f"failed to import: {type(e).__name__}: {e}", "Fix the plugin file.") from e
        return module
    try:
        return importlib.import_module(ref)
    except ImportError as e:
        raise RulesError(key, ref, f"cannot be imported: {e}", "Install the package or check the module name.") from e
