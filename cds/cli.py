"""The ``cds`` command: evaluate cases, inspect rulesets, run batches.

Bad input prints what is wrong and where, and exits with status 2; no traceback. Output that
other programs read (recommendation JSON) goes to stdout; messages go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from cds.errors import CdsError, FactsError, RulesetError

EXIT_BAD_INPUT = 2


def _read_json(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as exc:
        raise FactsError([_problem("$", f"cannot read {path!r}: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise FactsError([_problem("$", "the file is not UTF-8 text")]) from None
    return parse_json(text)


def parse_json(text: str | bytes) -> Any:
    """Parse one JSON document; any failure becomes a FactsError that says where, never what."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FactsError([_problem("$", f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")]) \
            from None
    except UnicodeDecodeError:
        raise FactsError([_problem("$", "the input is not UTF-8 text")]) from None
    except RecursionError:
        raise FactsError([_problem("$", "JSON nested too deeply")]) from None


def _problem(path: str, message: str) -> Any:
    from cds.errors import Problem

    return Problem(path, message)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cds.evaluator import Evaluator
    from cds.rulesets import parse_ref

    rid, version = parse_ref(args.ruleset)
    ev = Evaluator(rid, version, engine=args.engine, cross_check=not args.no_cross_check)
    status = 0
    for path in args.cases:
        try:
            rec = ev.evaluate(_read_json(path))
        except FactsError as exc:
            where = "stdin" if path == "-" else path
            print(f"cds evaluate: {where}: {exc}", file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(rec.to_json(indent=None if args.compact else 2))
    return status


def cmd_rulesets(args: argparse.Namespace) -> int:
    from cds import governance

    return governance.main(args)


def build_parser() -> argparse.ArgumentParser:
    from cds import __version__

    p = argparse.ArgumentParser(prog="cds", description="Clinician decision support for low back and hip pain.")
    p.add_argument("--version", action="version", version=f"cds {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="evaluate case file(s) and print the recommendation JSON")
    ev.add_argument("cases", nargs="+", metavar="CASE.json", help="case file(s); - reads one case from stdin")
    ev.add_argument("--ruleset", default="back-hip-pain", metavar="ID[@VERSION]",
                    help="ruleset id, optionally pinned to a version (default: newest active back-hip-pain)")
    ev.add_argument("--engine", choices=("durable-rules", "reference"), default="durable-rules")
    ev.add_argument("--no-cross-check", action="store_true",
                    help="do not run the reference evaluator beside the engine")
    ev.add_argument("--compact", action="store_true", help="one line of JSON per case")
    ev.set_defaults(func=cmd_evaluate)

    # Each command group registers itself; heavy imports (starlette, dask) happen only when run.
    from cds import batch, governance
    from cds.fhir import cli as fhir_cli
    from cds.hooks import cli as hooks_cli

    governance.add_parser(sub)
    batch.add_parser(sub)
    fhir_cli.add_parser(sub)
    hooks_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FactsError, RulesetError) as exc:
        print(f"cds {args.command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CdsError as exc:
        print(f"cds {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
