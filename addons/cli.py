"""The `tollhouse` command: run the gateway, show the CA, report costs, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import logging
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pluggy

import addons
from addons.rules import Rules, RulesError, load_rules, project_key_digest

#: The rules file shipped with the source tree; used when the current folder has no rules.yaml.
BUNDLED_RULES = Path(addons.__file__).resolve().parent.parent / "rules.yaml"


class CommandError(Exception):
    """A failure that `main` prints as one `tollhouse: ...` line on stderr and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def default_rules_path() -> Path:
    local = Path("rules.yaml")
    return local if local.is_file() else BUNDLED_RULES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollhouse", description="An LLM API gateway on mitmproxy.")
    parser.add_argument("--version", action="version", version=f"tollhouse {addons.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the gateway")
    _rules_option(run)
    run.add_argument("--listen", metavar="HOST:PORT", help="forward-proxy address (overrides `listen` in the rules)")
    run.add_argument(
        "--base-url-listen", metavar="HOST:PORT",
        help="base-URL listener address (overrides `base_url_listen` in the rules)",
    )
    run.add_argument(
        "--admin-listen", metavar="HOST:PORT",
        help="admin listener address for /healthz and /metrics (overrides `admin_listen` in the rules)",
    )
    run.add_argument(
        "--log-format", choices=["text", "json"],
        help="log lines as text or as one JSON object per line (overrides `log_format` in the rules; default text)",
    )
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")

    ca = commands.add_parser("ca", help="print where the CA certificate is; optionally write a CA bundle")
    _rules_option(ca)
    ca.add_argument(
        "--bundle", metavar="FILE", type=Path,
        help="write the system CAs plus the gateway's CA to FILE, for clients' SSL_CERT_FILE",
    )

    costs = commands.add_parser("costs", help="print spend by project, model and day")
    _rules_option(costs)
    costs.add_argument("--since", type=_since_date, metavar="YYYY-MM-DD", help="only calls on or after this day (UTC)")
    costs.add_argument("--project", help="only this project")

    commands.add_parser("hash-key", help="read a project key from stdin and print its key_sha256 for the rules file")

    check = commands.add_parser("check", help="validate a rules file and print every problem with its fix (exit 2 if any)")
    _rules_option(check)

    demo = commands.add_parser("demo", help="send a few SDK calls through the gateway to a local fake provider and print the costs")
    demo.add_argument("--keep", metavar="DIR", type=Path, help="keep the demo's data folder (rules, DuckDB file, CA) in DIR")

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except CommandError as e:
        # One line even when the message quotes a multi-line error from a library.
        print(f"tollhouse: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except RulesError as e:
        print(f"tollhouse: invalid rules: {e}", file=sys.stderr)
        return 2
    except pluggy.PluginValidationError as e:
        print(f"tollhouse: invalid plugin {e.plugin!r}: {e}", file=sys.stderr)
        return 2


def _rules_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rules", type=Path, default=None, metavar="FILE",
        help="rules file (default: ./rules.yaml, else the rules.yaml shipped with tollhouse)",
    )


def _since_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid date {text!r}: use YYYY-MM-DD") from None


def _load(args) -> Rules:
    return load_rules(args.rules or default_rules_path())


def _prepare_data_dir(rules: Rules) -> Path:
    """Create `data_dir` and the CA in it; return the CA certificate's path."""
    from addons.ca import ensure_ca

    where = f"in {rules.path}" if rules.path else "in the rules file"
    try:
        rules.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(
            f"cannot create data_dir {rules.data_dir}: {e.strerror or e}. "
            f"Set data_dir {where} to a folder you can write, or fix the permissions of its parent."
        ) from e
    try:
        return ensure_ca(rules.data_dir)
    except OSError as e:
        raise CommandError(
            f"cannot write the CA into data_dir {rules.data_dir}: {e}. "
            f"Make the folder writable, or set data_dir {where} to another folder."
        ) from e


def _configure_hook_plugin(error: BaseException) -> str | None:
    """Name the plugin whose `tollhouse_configure` raised `error`, or return None if none did.

    The plugin's frame is the outermost `tollhouse_configure` frame in the traceback, below pluggy's call.
    """
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "tollhouse_configure":
            return f"{tb.tb_frame.f_globals.get('__name__', '?')} ({code.co_filename})"
        tb = tb.tb_next
    return None


def cmd_run(args) -> int:
    from addons.engine import configure_logging, serve
    from addons.logstore import LogStoreError

    level = getattr(logging, args.log_level)
    configure_logging(level, args.log_format or "text")
    overrides = _run_overrides(args)
    rules = overrides(_load(args))
    configure_logging(level, rules.log_format)
    _prepare_data_dir(rules)
    try:
        return asyncio.run(serve(rules, overrides))
    except LogStoreError as e:
        # For example a second gateway on the same request log: the message names the file and the fix.
        raise CommandError(str(e)) from e
    except Exception as e:
        # main reports a RulesError from a plugin. Any other error from a plugin's configure hook is a bug
        # or a bad setting in that plugin, so name the plugin instead of printing pluggy's frames.
        plugin = None if isinstance(e, RulesError) else _configure_hook_plugin(e)
        if plugin is None:
            raise
        raise CommandError(
            f"plugin {plugin} failed in tollhouse_configure: {type(e).__name__}: {e}. "
            "Fix the plugin or its settings, or remove it from the rules file's plugins.",
            exit_code=2,
        ) from e


def _run_overrides(args) -> Callable[[Rules], Rules]:
    """Return a function that applies the `run` options to rules from the file, at start and on reload."""
    from addons.rules import parse_listen

    replacements = {}
    if args.listen:
        replacements["listen_host"], replacements["listen_port"] = parse_listen(args.listen, "--listen")
    if args.base_url_listen:
        host, port = parse_listen(args.base_url_listen, "--base-url-listen")
        replacements["base_url_listen_host"], replacements["base_url_listen_port"] = host, port
    if args.admin_listen:
        host, port = parse_listen(args.admin_listen, "--admin-listen")
        replacements["admin_listen_host"], replacements["admin_listen_port"] = host, port
    if args.log_format:
        replacements["log_format"] = args.log_format

    def apply(rules: Rules) -> Rules:
        return dataclasses.replace(rules, **replacements)

    return apply


def cmd_ca(args) -> int:
    from addons.ca import write_bundle

    rules = _load(args)
    cert = _prepare_data_dir(rules)
    print(f"CA certificate: {cert}")
    if args.bundle:
        target = write_bundle(rules.data_dir, args.bundle)
        print(f"CA bundle (system CAs + tollhouse CA): {target}")
        print(f"Use it in clients with: SSL_CERT_FILE={target} (Python/httpx), CURL_CA_BUNDLE={target} (curl)")
    print(f"Node.js: NODE_EXTRA_CA_CERTS={cert}")
    return 0


def cmd_costs(args) -> int:
    from addons.costs import format_report, spend_report
    from addons.logstore import DatabaseLockedError

    rules = _load(args)
    database = rules.logging.database
    if not database.exists():
        print(f"tollhouse: no log yet at {database}; run the gateway first", file=sys.stderr)
        return 1
    try:
        report = spend_report(database, since=args.since, project=args.project)
    except DatabaseLockedError as e:
        raise CommandError(f"cannot read the request log: {e}") from e
    print(format_report(report))
    return 0


def cmd_hash_key(args) -> int:
    try:
        key = getpass.getpass("project key: ") if sys.stdin.isatty() else sys.stdin.read().strip()
    except EOFError:
        # Ctrl-D at the prompt; getpass leaves the cursor after the prompt.
        print(file=sys.stderr)
        key = ""
    if not key:
        raise CommandError(
            "no key given: type the project key at the prompt, or pipe it in: printf %s KEY | tollhouse hash-key",
            exit_code=2,
        )
    print(project_key_digest(key))
    return 0


def cmd_demo(args) -> int:
    from addons.demo import run_demo

    return run_demo(keep=args.keep)


def cmd_check(args) -> int:
    from addons.check import run_check

    return run_check(args.rules or default_rules_path())


_COMMANDS = {
    "run": cmd_run, "ca": cmd_ca, "costs": cmd_costs, "hash-key": cmd_hash_key, "demo": cmd_demo, "check": cmd_check,
}


if __name__ == "__main__":
    sys.exit(main())
