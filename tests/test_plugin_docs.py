"""The plugin documentation covers every hook with its exact signature."""

from __future__ import annotations

import re
from pathlib import Path

import pluggy
import pytest

from addons import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def documented_signatures() -> dict[str, list[str]]:
    text = DOCS.read_text(encoding="utf-8")
    found = {}
    for name, args in re.findall(r"^### `(tollhouse_\w+)\(([^)]*)\)`", text, flags=re.MULTILINE):
        found[name] = [a.strip() for a in args.split(",") if a.strip()]
    return found


def spec_signatures() -> dict[str, list[str]]:
    pm = pluggy.PluginManager("tollhouse")
    pm.add_hookspecs(hookspecs)
    return {
        name: list(getattr(pm.hook, name).spec.argnames)
        for name in dir(pm.hook)
        if name.startswith("tollhouse_")
    }


def hook_order_in_specs() -> list[str]:
    source = Path(hookspecs.__file__).read_text(encoding="utf-8")
    return re.findall(r"^def (tollhouse_\w+)\(", source, flags=re.MULTILINE)


@pytest.mark.parametrize("name", sorted(spec_signatures()))
def test_hook_documented_with_signature(name):
    docs = documented_signatures()
    assert name in docs, f"{name} has no section in {DOCS.name}"
    assert docs[name] == spec_signatures()[name]


def test_docs_list_no_unknown_hooks():
    assert set(documented_signatures()) == set(spec_signatures())


def test_docs_follow_call_order():
    assert list(documented_signatures()) == hook_order_in_specs()
