"""Plugin loading: built-ins, rules entries (module and file), the `tollhouse` entry-point group."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pluggy
import pytest

from addons.rules import RulesError, parse_rules
from addons.plugin_manager import make_plugin_manager
from plugins import BUILTIN_PLUGINS

PLUGIN_SOURCE = '''
from addons import hookimpl

configured = []


@hookimpl
def tollhouse_configure(rules):
    configured.append(sorted(rules.providers))
'''


def make_rules(tmp_path: Path, plugins: list[str]):
    raw = {
        "providers": {"openai": {"base_url": "http://127.0.0.1:1", "key_env": "OPENAI_API_KEY"}},
        "projects": {"alpha": {"key_sha256": "a" * 64}},
        "plugins": plugins,
    }
    return parse_rules(raw, base_dir=tmp_path)


def test_builtins_registered_in_order(tmp_path):
    pm = make_plugin_manager(make_rules(tmp_path, []), load_entry_points=False)

    names = [pm.get_name(plugin) for plugin in pm.get_plugins()]
    assert sorted(names) == sorted(BUILTIN_PLUGINS)


def test_file_plugin_loaded_and_configured(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "probe.py").write_text(PLUGIN_SOURCE, encoding="utf-8")

    pm = make_plugin_manager(make_rules(tmp_path, ["local/probe.py"]), load_entry_points=False)

    plugin = pm.get_plugin(str(tmp_path / "local" / "probe.py"))
    assert plugin.configured == [["openai"]]


def test_module_plugin_loaded(tmp_path, monkeypatch):
    (tmp_path / "th_probe_module.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))

    pm = make_plugin_manager(make_rules(tmp_path, ["th_probe_module"]), load_entry_points=False)

    assert pm.get_plugin("th_probe_module").configured == [["openai"]]
    monkeypatch.delitem(sys.modules, "th_probe_module")


def test_entry_point_plugin_loaded(tmp_path, monkeypatch):
    (tmp_path / "th_probe_entry.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    dist = tmp_path / "th_probe_entry-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: th-probe-entry\nVersion: 1.0\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text("[tollhouse]\nprobe = th_probe_entry\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))

    pm = make_plugin_manager(make_rules(tmp_path, []))

    plugin = pm.get_plugin("probe")
    assert plugin is not None
    assert plugin.configured == [["openai"]]
    monkeypatch.delitem(sys.modules, "th_probe_entry")


def test_missing_file_plugin(tmp_path):
    with pytest.raises(RulesError, match=r"^plugins\[0\]: is not an existing file"):
        make_plugin_manager(make_rules(tmp_path, ["absent.py"]), load_entry_points=False)


def test_unimportable_module_plugin(tmp_path):
    with pytest.raises(RulesError, match=r"^plugins\[0\]: cannot be imported"):
        make_plugin_manager(make_rules(tmp_path, ["th_no_such_module"]), load_entry_points=False)


def test_misspelled_hook_rejected(tmp_path):
    (tmp_path / "typo.py").write_text(
        textwrap.dedent(
            """
            from addons import hookimpl

            @hookimpl
            def tollhouse_reqest(call, flow):
                pass
            """
        ),
        encoding="utf-8",
    )

    with pytest.raises(pluggy.PluginValidationError, match="tollhouse_reqest"):
        make_plugin_manager(make_rules(tmp_path, ["typo.py"]), load_entry_points=False)


ASYNC_PLUGIN = '''
import asyncio

from addons import hookimpl
from addons.errors import error_response


@hookimpl
async def tollhouse_request(call, flow):
    await asyncio.sleep(0)
    if flow.request.headers.get("x-answer-locally"):
        flow.response = error_response(call.provider.kind, 429, "answered by an async plugin")
'''


def test_async_request_hook_awaited(tmp_path, monkeypatch):
    import asyncio

    from mitmproxy.test import tflow

    from addons.call import Call
    from addons.gateway import CALL_KEY, Gateway
    from addons.secrets import Redactor

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-real-key-0000000000")
    (tmp_path / "slow.py").write_text(ASYNC_PLUGIN, encoding="utf-8")
    rules = make_rules(tmp_path, ["slow.py"])
    gateway = Gateway(rules, make_plugin_manager(rules, load_entry_points=False), store=None, redactor=Redactor())
    flow = tflow.tflow()
    flow.request.headers["x-answer-locally"] = "1"
    call = Call(request_id="t", listener="proxy", provider=rules.providers["openai"])
    flow.metadata[CALL_KEY] = call

    pending = gateway.request(flow)

    assert pending is not None
    assert flow.response is None
    asyncio.run(pending)
    assert flow.response.status_code == 429
    assert call.answered_by_gateway is True
