"""`tollhouse check`: validate a rules file and report every problem, not only the first.

`addons.rules.load_rules` stops at the first `RulesError`. This module runs the same parse functions
on one section, entry or setting at a time and collects each error, so a file with several mistakes
is fixed in one pass. A final `parse_rules` of the whole file makes sure that `check` never calls a
file valid that the gateway would reject.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from addons import policy_rules
from addons.rules import (
    _fallbacks,
    DEFAULT_BASE_URL_LISTEN,
    DEFAULT_LISTEN,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SHUTDOWN_GRACE,
    Provider,
    RulesError,
    duplicate_keys,
    _check_hosts_unique,
    _list,
    _logging,
    _mapping,
    _path,
    _plugin_ref,
    _positive_int,
    _positive_number,
    _price,
    _project,
    _provider,
    _reject_unknown,
    _route,
    _tunnels,
    DEFAULT_ADMIN_LISTEN,
    parse_admin_listen,
    parse_listen,
    parse_log_format,
    parse_rules,
)

#: Top-level settings of a rules file, as `addons.rules.parse_rules` accepts them.
TOP_LEVEL_KEYS = {
    "listen", "data_dir", "providers", "projects", "logging", "prices", "plugins", "settings",
    "max_request_bytes", "shutdown_grace", "base_url_listen", "routes", "cache", "rate_limits", "budgets",
    "tunnels", "admin_listen", "log_format", "fallbacks",
}


@dataclass
class CheckReport:
    """The outcome of checking one rules file."""

    #: One message per problem, each `KEY: problem (got VALUE). Fix.`
    problems: list[str] = field(default_factory=list)
    #: Settings that load but leave part of the gateway without a key, such as an unset variable.
    warnings: list[str] = field(default_factory=list)
    #: A one-line description of a valid file: providers, projects and listeners.
    summary: str = ""

    def add(self, error: RulesError) -> None:
        message = str(error)
        if message not in self.problems:
            self.problems.append(message)


def check_rules(path: Path) -> CheckReport:
    """Validate the rules file at `path` and return every problem and warning found."""
    report = CheckReport()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        report.add(RulesError("rules file", str(path), f"cannot be read: {e.strerror}", "Pass an existing file with --rules."))
        return report
    except UnicodeDecodeError as e:
        report.add(RulesError("rules file", str(path), f"is not UTF-8 text: {e.reason}", "Save the file as UTF-8."))
        return report

    try:
        raw = _parse_yaml(text, report)
    except yaml.YAMLError as e:
        # Nothing can be checked after a syntax error. A repeated key is only reported, and its last value is checked.
        report.problems.append(_yaml_error_message(e))
        return report
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        _collect(report, lambda: _mapping(raw, "rules file"))
        return report

    _check_sections(raw, path.resolve().parent, report)
    if not report.problems:
        # The section checks mirror parse_rules, and this full parse catches any rule they miss.
        try:
            rules = parse_rules(raw, base_dir=path.resolve().parent, path=path)
        except RulesError as e:
            report.add(e)
        else:
            report.summary = _summary(rules)
    return report


def _collect(report: CheckReport, check: Callable[[], Any]) -> Any:
    """Run one parse function and return its result, or record its RulesError and return None."""
    try:
        return check()
    except RulesError as e:
        report.add(e)
        return None


# -- YAML ------------------------------------------------------------------------------------------


def _parse_yaml(text: str, report: CheckReport) -> Any:
    """Parse `text` with PyYAML's safe loader and record every repeated key; raise yaml.YAMLError on bad syntax."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return None
    for error in duplicate_keys(node):
        report.add(error)
    # A repeated key keeps its last value, as in PyYAML, so the rest of the file can still be checked.
    return yaml.load(text, Loader=yaml.SafeLoader)


def _yaml_error_message(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "rules file"
    return f"{where}: is not valid YAML: {' '.join(str(problem).split())}. Fix the YAML syntax at that line."


# -- sections --------------------------------------------------------------------------------------


def _check_sections(top: dict, base_dir: Path, report: CheckReport) -> None:
    for name in top:
        _collect(report, lambda name=name: _reject_unknown({name: top[name]}, "", TOP_LEVEL_KEYS))

    listen = _collect(report, lambda: parse_listen(top.get("listen", DEFAULT_LISTEN), "listen"))
    base_url_value = top.get("base_url_listen", DEFAULT_BASE_URL_LISTEN)
    base_url = _collect(report, lambda: parse_listen(base_url_value, "base_url_listen"))
    if listen and base_url:
        overlapping = base_url[0] == listen[0] or "0.0.0.0" in (base_url[0], listen[0])
        if base_url[1] != 0 and base_url[1] == listen[1] and overlapping:
            report.add(RulesError(
                "base_url_listen", base_url_value, f"uses the port of listen ({listen[1]})",
                "Give the base-URL listener its own port, like 0.0.0.0:8787.",
            ))
    _collect(report, lambda: parse_admin_listen(top.get("admin_listen", DEFAULT_ADMIN_LISTEN)))
    _collect(report, lambda: parse_log_format(top.get("log_format", "text"), "log_format"))
    data_dir = _collect(report, lambda: _path(top.get("data_dir", "data"), "data_dir", base_dir))

    providers_raw = _collect(report, lambda: _mapping(top.get("providers"), "providers"))
    if providers_raw == {}:
        report.add(RulesError("providers", {}, "is empty", "Declare at least one provider (see rules.yaml)."))
    providers = _check_providers(providers_raw or {}, report)

    projects_raw = _collect(report, lambda: _mapping(top.get("projects"), "projects"))
    if projects_raw == {}:
        report.add(RulesError("projects", {}, "is empty", "Declare at least one project with key_env or key_sha256."))
    projects = {}
    for name, spec in (projects_raw or {}).items():
        project = _collect(report, lambda name=name, spec=spec: _project(name, spec))
        if project is not None:
            projects[name] = project
            if project.key_env and not os.environ.get(project.key_env):
                report.warnings.append(
                    f"projects.{name}.key_env: {project.key_env} is unset in this environment, so the project "
                    "rejects every call. Set it in the gateway's environment."
                )

    # Entries that failed their own check still count as declared, so that one mistake in a provider
    # or project is not reported again by every section that names it.
    declared_providers = {name: None for name in providers_raw or {}}
    declared_projects = {name: None for name in projects_raw or {}}
    routes_raw = _collect(report, lambda: _mapping(top.get("routes", {}), "routes")) or {}
    for name, spec in routes_raw.items():
        _collect(report, lambda name=name, spec=spec: _route(name, spec, declared_providers, declared_projects))
    _collect(report, lambda: _fallbacks(top.get("fallbacks")))

    if data_dir is not None:
        _check_settings(top.get("logging", {}), "logging", lambda spec: _logging(spec, data_dir), report)
    prices_raw = _collect(report, lambda: _mapping(top.get("prices", {}), "prices")) or {}
    for model, spec in prices_raw.items():
        _collect(report, lambda model=model, spec=spec: _price(str(model), spec))
    plugins_raw = _collect(report, lambda: _list(top.get("plugins", []), "plugins")) or []
    for index, ref in enumerate(plugins_raw):
        _collect(report, lambda index=index, ref=ref: _plugin_ref(ref, f"plugins[{index}]", base_dir))
    _collect(report, lambda: _mapping(top.get("settings", {}), "settings"))
    _collect(report, lambda: _positive_int(top.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES), "max_request_bytes"))
    _collect(report, lambda: _positive_number(top.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE), "shutdown_grace"))

    _check_settings(top.get("tunnels", {}), "tunnels", _tunnels, report)
    _check_settings(top.get("cache", {}), "cache", lambda spec: policy_rules.parse_cache(spec, declared_projects), report)
    _check_settings(
        top.get("rate_limits", {}), "rate_limits",
        lambda spec: policy_rules.parse_rate_limits(spec, declared_projects, declared_providers), report,
    )
    _check_settings(top.get("budgets", {}), "budgets", lambda spec: policy_rules.parse_budgets(spec, declared_projects), report)


def _check_providers(providers_raw: dict, report: CheckReport) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for name, spec in providers_raw.items():
        provider = _collect(report, lambda name=name, spec=spec: _provider(name, spec))
        if provider is None:
            continue
        # A provider whose hosts clash with an earlier one is reported and left out of later comparisons.
        try:
            _check_hosts_unique({**providers, name: provider})
        except RulesError as e:
            report.add(e)
            continue
        providers[name] = provider
        if not os.environ.get(provider.key_env):
            report.warnings.append(
                f"providers.{name}.key_env: {provider.key_env} is unset in this environment, so calls to "
                f"{name} fail. Set it in the gateway's environment."
            )
    return providers


def _check_settings(raw: Any, key: str, parse: Callable[[dict], Any], report: CheckReport) -> None:
    """Run a section's parser on each of its settings alone, so that each wrong setting is reported.

    A section's settings are independent of each other, apart from defaults, so a parser given one
    setting fails exactly when that setting is wrong.
    """
    spec = _collect(report, lambda: _mapping(raw, key))
    if not spec:
        return
    for name, value in spec.items():
        if isinstance(value, dict) and name in ("projects", "providers"):
            # Per-project and per-provider entries are checked one entry at a time as well.
            for entry, entry_value in value.items():
                _collect(report, lambda name=name, entry=entry, entry_value=entry_value: parse({name: {entry: entry_value}}))
        else:
            _collect(report, lambda name=name, value=value: parse({name: value}))


# -- summary ---------------------------------------------------------------------------------------


def _summary(rules) -> str:
    def counted(names: list[str], noun: str) -> str:
        return f"{len(names)} {noun}{'' if len(names) == 1 else 's'} ({', '.join(names)})"

    return (
        f"{counted(list(rules.providers), 'provider')}, {counted(list(rules.projects), 'project')}; "
        f"proxy on {rules.listen_host}:{rules.listen_port}, "
        f"base URL on {rules.base_url_listen_host}:{rules.base_url_listen_port}"
    )


def run_check(path: Path) -> int:
    """Print the report for `path`, one line per problem and warning, and return 0 if it is valid, else 2."""
    report = check_rules(path)
    for problem in report.problems:
        print(f"{path}: {problem}")
    for warning in report.warnings:
        print(f"{path}: warning: {warning}")
    if report.problems:
        count = len(report.problems)
        print(f"{path}: {count} problem{'' if count == 1 else 's'} found")
        return 2
    print(f"{path}: ok: {report.summary}")
    return 0
