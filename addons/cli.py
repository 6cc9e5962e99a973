"""The `tollhouse` command: run the gateway, show the CA, report costs, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import logging
import sys
from datetime import date
from pathlib import Path

import pluggy

import addons
from addons.rules import Rules, RulesError, load_rules, project_key_digest

#: The rules file shipped with the source tree; used when the current folder has no rules.yaml.
BUNDLED_RULES = Path(addons.__file__).resolve().parent.parent / "rules.yaml"


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
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default INFO)")

    ca = commands.add_parser("ca", help="print where the CA certificate is; optionally write a CA bundle")
    _rules_option(ca)
    ca.add_argument(
        "--bundle", metavar="FILE", type=Path,
        help="write the system CAs plus the gateway's CA to FILE, for clients' SSL_CERT_FILE",
    )

    costs = commands.add_parser("costs", help="print spend by project, model and day")
    _rules_option(costs)
    costs.add_argument("--since", type=date.fromisoformat, metavar="YYYY-MM-DD", help="only calls on or after this day (UTC)")
    costs.add_argument("--project", help="only this project")

    commands.add_parser("hash-key", help="read a project key from stdin and print its key_sha256 for the rules file")

    demo = commands.add_parser("demo", help="send a few SDK calls through the gateway to a local fake provider and print the costs")
    demo.add_argument("--keep", metavar="DIR", type=Path, help="keep the demo's data folder (rules, DuckDB file, CA) in DIR")

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
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


def _load(args) -> Rules:
    return load_rules(args.rules or default_rules_path())


def cmd_run(args) -> int:
    from addons.engine import configure_logging, serve
    from addons.rules import parse_listen

    configure_logging(getattr(logging, args.log_level))
    rules = _load(args)
    if args.listen:
        host, port = parse_listen(args.listen, "--listen")
        rules = rules.with_listen(host, port)
    if args.base_url_listen:
        host, port = parse_listen(args.base_url_listen, "--base-url-listen")
        rules = dataclasses.replace(rules, base_url_listen_host=host, base_url_listen_port=port)
    return asyncio.run(serve(rules))


def cmd_ca(args) -> int:
    from addons.ca import ensure_ca, write_bundle

    rules = _load(args)
    cert = ensure_ca(rules.data_dir)
    print(f"CA certificate: {cert}")
    if args.bundle:
        target = write_bundle(rules.data_dir, args.bundle)
        print(f"CA bundle (system CAs + tollhouse CA): {target}")
        print(f"Use it in clients with: SSL_CERT_FILE={target} (Python/httpx), CURL_CA_BUNDLE={target} (curl)")
    print(f"Node.js: NODE_EXTRA_CA_CERTS={cert}")
    return 0


def cmd_costs(args) -> int:
    from addons.costs import format_report, spend_report

    rules = _load(args)
    database = rules.logging.database
    if not database.exists():
        print(f"tollhouse: no log yet at {database}; run the gateway first", file=sys.stderr)
        return 1
    print(format_report(spend_report(database, since=args.since, project=args.project)))
    return 0


def cmd_hash_key(args) -> int:
    key = getpass.getpass("project key: ") if sys.stdin.isatty() else sys.stdin.read().strip()
    if not key:
        print("tollhouse: no key given on stdin", file=sys.stderr)
        return 2
    print(project_key_digest(key))
    return 0


def cmd_demo(args) -> int:
    from addons.demo import run_demo

    return run_demo(keep=args.keep)


_COMMANDS = {"run": cmd_run, "ca": cmd_ca, "costs": cmd_costs, "hash-key": cmd_hash_key, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
