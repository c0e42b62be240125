"""``cds fhir``: show how FHIR resources become case facts, or print the case file."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any


def _load(path: str) -> Any:
    from cds.errors import FactsError, Problem

    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        return json.loads(text)
    except OSError as exc:
        raise FactsError([Problem("$", f"cannot read {path!r}: {exc.strerror}")]) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FactsError([Problem("$", f"not valid JSON ({exc.__class__.__name__})")]) from None


def _mapping(args: argparse.Namespace) -> Any:
    from cds.fhir import facts_from_bundle

    ref = dt.date.fromisoformat(args.reference_date) if args.reference_date else dt.date.today()
    return facts_from_bundle(_load(args.bundle), reference_date=ref, case_id=args.case_id)


def cmd_explain(args: argparse.Namespace) -> int:
    from cds.fhir import explain

    print(explain(_mapping(args)))
    return 0


def cmd_facts(args: argparse.Namespace) -> int:
    print(json.dumps(_mapping(args).case, indent=2, sort_keys=True, ensure_ascii=False))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fhir", help="FHIR R4 -> case facts")
    fsub = p.add_subparsers(dest="fhir_command", required=True)
    for name, func, text in (("explain", cmd_explain, "show each fact with the resources it came from, and data issues"),
                             ("facts", cmd_facts, "print the case file built from a Bundle")):
        c = fsub.add_parser(name, help=text)
        c.add_argument("bundle", metavar="BUNDLE.json", help="a FHIR R4 Bundle of one patient (- reads stdin)")
        c.add_argument("--reference-date", metavar="YYYY-MM-DD",
                       help="the date the facts describe (age, recency); default today")
        c.add_argument("--case-id", default=None)
        c.set_defaults(func=func)
