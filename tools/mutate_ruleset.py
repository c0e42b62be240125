"""Mutation testing of the ruleset's red-flag and screen rules (data mutations, made in memory).

For every red-flag and screen rule of rulesets/back-hip-pain/1.0.0.yaml this makes small data mutations,
one at a time, and checks that the clinical tests notice:

  drop-branch      drop one item of an all/any/count, one fact of an any_present/count_present list
                   (inline or a named list, inlined for this rule only) or one value of an ``in`` list
  flip             ``is: present`` -> ``is: absent``
  op               gt -> ge, ge -> gt, lt -> le, le -> lt (boundary inclusivity)
  threshold        a threshold one unit up and one unit down (a parameter is inlined for this rule only;
                   1 for whole-number parameters, 0.1 for decimal ones; count thresholds by 1)
  drop-request     one item of a suspect trigger's ``request`` (or a screen's ``require``) dropped
  lower-urgency    the trigger's urgency one step lower
  param            (global) each parameter a red-flag or screen rule reads, and the derived-fact thresholds
                   red flags rely on (fever, NG65), one unit up and down in the ``parameters`` block

Named conditions (``ref``) are expanded on the way to a mutation site, so a mutation inside e.g.
``back_region`` or ``fragility_risk`` affects only the rule being mutated.

Each mutant is written to a temporary registry root (``<tmp>/back-hip-pain/1.0.0.yaml`` plus a lock with
its hash), loaded through ``cds.rulesets.Registry(root=...)`` and run, in this process, through pytest on
the clinical tests (tests/test_red_flag_boundaries.py, tests/test_vignettes.py, tests/test_invariants.py;
with ``--suite all`` also tests/test_mutation_killers.py) with ``-x``: ``cds.rulesets.default_registry`` is
pointed at the mutant's registry, the evaluator cache is cleared and the test modules are re-imported,
so every test (including test_invariants' ``EVALUATORS``) evaluates against the mutant. The tests' own
expectations (thresholds, triggers, requests) are read from the shipped file, as in a normal run.
Hypothesis runs derandomized (profile ``mutation``: 100 examples, no database) so scores are reproducible.

A mutant the ruleset loader refuses (e.g. a suspect trigger left with no request item) is reported as
"invalid" and kept out of the score.

    python tools/mutate_ruleset.py [--suite clinical|all] [--engine reference|durable-rules]
                                   [--only REGEX] [--list] [--jobs N] [--json OUT]
    python tools/mutate_ruleset.py --suite all --summarize BEFORE.json AFTER.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RULESET, VERSION = "back-hip-pain", "1.0.0"
SOURCE = ROOT / "rulesets" / RULESET / f"{VERSION}.yaml"
SUITES = {
    "clinical": ["tests/test_red_flag_boundaries.py", "tests/test_vignettes.py", "tests/test_invariants.py"],
}
SUITES["all"] = ["tests/test_mutation_killers.py", *SUITES["clinical"]]  # same verdicts; killers first is faster
URGENCY = ["routine", "urgent", "emergency"]
CMP = ("gt", "ge", "lt", "le", "eq", "ne")
OP_SWAP = {"gt": "ge", "ge": "gt", "lt": "le", "le": "lt"}
# derived-fact thresholds that decide red flags (fever from temperature; NG65 entry and criterion 1)
DERIVED_PARAMS = ("fever_present_at_or_above_c", "fever_absent_at_or_below_c", "ng65_onset_age_under",
                  "ng65_early_onset_age_under", "ng65_duration_weeks_over")


# ----------------------------------------------------------------------------------- mutants
def _unit(value: float) -> float:
    return 1 if float(value) == int(value) else 0.1


def _shift(value: float, delta: float) -> float:
    out = value + delta
    return int(out) if isinstance(value, int) and float(delta).is_integer() else round(out, 3)


def tree_mutants(node: Any, doc: dict[str, Any], path: str, seen_refs: tuple[str, ...] = ()
                 ) -> Iterator[tuple[str, str, Any]]:
    """(operator, description, mutated node) for every mutation site under ``node``."""
    if not isinstance(node, dict):
        return
    if "ref" in node:
        name = node["ref"]
        if name in seen_refs:
            return
        expanded = doc["conditions"][name]
        for op, desc, new in tree_mutants(expanded, doc, f"{path}<{name}>", (*seen_refs, name)):
            yield op, desc, new
        return
    for form in ("all", "any"):
        if form in node:
            items = node[form]
            if len(items) > 1:
                for i in range(len(items)):
                    yield ("drop-branch", f"{path}.{form}[{i}] dropped",
                           {form: [c for j, c in enumerate(items) if j != i]})
            for i, child in enumerate(items):
                for op, desc, new in tree_mutants(child, doc, f"{path}.{form}[{i}]", seen_refs):
                    yield op, desc, {form: [new if j == i else c for j, c in enumerate(items)]}
            return
    if "not" in node:
        for op, desc, new in tree_mutants(node["not"], doc, f"{path}.not", seen_refs):
            yield op, desc, {"not": new}
        return
    for form in ("any_present", "count_present"):
        if form in node:
            raw = node[form]
            facts = list(doc["lists"][raw["list"]]) if isinstance(raw, dict) else list(raw)
            where = f"{path}.{form}" + (f"<list {raw['list']}>" if isinstance(raw, dict) else "")
            if len(facts) > 1:
                for i, f in enumerate(facts):
                    new = dict(node)
                    new[form] = [x for j, x in enumerate(facts) if j != i]
                    yield "drop-branch", f"{where}: {f} dropped", new
            if form == "count_present":
                yield from _count_threshold(node, where)
            return
    if "count" in node:
        items = node["count"]
        if len(items) > 1:
            for i in range(len(items)):
                new = dict(node)
                new["count"] = [c for j, c in enumerate(items) if j != i]
                yield "drop-branch", f"{path}.count[{i}] dropped", new
        for i, child in enumerate(items):
            for op, desc, sub in tree_mutants(child, doc, f"{path}.count[{i}]", seen_refs):
                new = dict(node)
                new["count"] = [sub if j == i else c for j, c in enumerate(items)]
                yield op, desc, new
        yield from _count_threshold(node, f"{path}.count")
        return
    if "fact" in node:
        fact = node["fact"]
        if node.get("is") == "present":
            yield "flip", f"{path}: {fact} is present -> absent", {"fact": fact, "is": "absent"}
        if "in" in node and len(node["in"]) > 1:
            for i, v in enumerate(node["in"]):
                yield ("drop-branch", f"{path}: {fact} in {node['in']}: {v!r} dropped",
                       {"fact": fact, "in": [x for j, x in enumerate(node["in"]) if j != i]})
        for op in CMP:
            if op in node:
                raw = node[op]
                value = doc["parameters"][raw["param"]]["value"] if isinstance(raw, dict) else raw
                label = f"{raw['param']}={value}" if isinstance(raw, dict) else str(value)
                if op in OP_SWAP:
                    yield ("op", f"{path}: {fact} {op} {label} -> {OP_SWAP[op]}",
                           {"fact": fact, OP_SWAP[op]: raw})
                u = _unit(value)
                for d in (u, -u):
                    yield ("threshold", f"{path}: {fact} {op} {label} -> {_shift(value, d)}",
                           {"fact": fact, op: _shift(value, d)})


def _count_threshold(node: dict[str, Any], where: str) -> Iterator[tuple[str, str, Any]]:
    for op in ("gt", "ge", "eq", "le", "lt"):
        if op in node and isinstance(node[op], int):
            for d in (1, -1):
                if node[op] + d >= 0:
                    new = dict(node)
                    new[op] = node[op] + d
                    yield "threshold", f"{where}: count {op} {node[op]} -> {node[op] + d}", new
            if op in OP_SWAP:
                new = {k: v for k, v in node.items() if k != op}
                new[OP_SWAP[op]] = node[op]
                yield "op", f"{where}: count {op} {node[op]} -> {OP_SWAP[op]}", new


def _params_read(node: Any, doc: dict[str, Any], out: set[str]) -> set[str]:
    if isinstance(node, dict):
        if "param" in node and len(node) == 1:
            out.add(node["param"])
        if "ref" in node and isinstance(node["ref"], str):
            _params_read(doc["conditions"][node["ref"]], doc, out)
        for v in node.values():
            _params_read(v, doc, out)
    elif isinstance(node, list):
        for v in node:
            _params_read(v, doc, out)
    return out


def mutants(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mutant: {id, rule, operator, description, doc}. Deterministic order."""
    out: list[dict[str, Any]] = []

    def add(rule: str, op: str, desc: str, new_doc: dict[str, Any]) -> None:
        out.append({"id": f"M{len(out) + 1:03d}", "rule": rule, "operator": op, "description": desc, "doc": new_doc})

    params: set[str] = set(DERIVED_PARAMS)
    for i, rule in enumerate(doc["rules"]):
        eff = rule["effect"]
        if eff["type"] not in ("red-flag", "screen"):
            continue
        _params_read(rule["when"], doc, params)
        for op, desc, new_when in tree_mutants(rule["when"], doc, "when"):
            d = copy.deepcopy(doc)
            d["rules"][i]["when"] = new_when
            add(rule["id"], op, desc, d)
        for field in ("request", "require"):
            items = eff.get(field) or []
            for j, item in enumerate(items):
                d = copy.deepcopy(doc)
                d["rules"][i]["effect"][field] = [x for k, x in enumerate(items) if k != j]
                add(rule["id"], "drop-request", f"effect.{field}: {item} dropped", d)
        if eff["type"] == "red-flag":
            own = eff.get("urgency", doc["red_flags"][eff["flag"]]["urgency"])
            if URGENCY.index(own) > 0:
                d = copy.deepcopy(doc)
                d["rules"][i]["effect"]["urgency"] = URGENCY[URGENCY.index(own) - 1]
                add(rule["id"], "lower-urgency", f"effect.urgency {own} -> {URGENCY[URGENCY.index(own) - 1]}", d)
    for name in sorted(params):
        value = doc["parameters"][name]["value"]
        u = _unit(value)
        for delta in (u, -u):
            d = copy.deepcopy(doc)
            d["parameters"][name]["value"] = _shift(value, delta)
            add(f"parameters.{name}", "param", f"{name} {value} -> {_shift(value, delta)}", d)
    return out


# ------------------------------------------------------------------------------------ running
class _NoAliasDumper(__import__("yaml").SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # the loader refuses anchors/aliases
        return True


def write_root(doc: dict[str, Any], root: Path) -> None:
    import yaml

    (root / RULESET).mkdir(parents=True, exist_ok=True)
    raw = yaml.dump(doc, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=200).encode("utf-8")
    (root / RULESET / f"{VERSION}.yaml").write_bytes(raw)
    lock = {"released": {f"{RULESET}@{VERSION}": hashlib.sha256(raw).hexdigest()}}
    (root / "lock.json").write_text(json.dumps(lock), encoding="utf-8")


class _Outcome:
    """pytest plugin: the first failing test (or collection error) of a run."""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.passed = 0

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed and self.failed is None:
            self.failed = report.nodeid + (" (XPASS strict)" if getattr(report, "wasxfail", None) is not None else "")
        elif report.passed and report.when == "call":
            self.passed += 1

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed and self.failed is None:
            self.failed = f"collection of {report.nodeid}"


def run_suite(doc: dict[str, Any], files: list[str], tmp: Path) -> tuple[str, str]:
    """('killed'|'survived'|'invalid', detail) for one ruleset document."""
    import pytest

    import cds.evaluator
    import cds.rulesets
    from cds.errors import RulesetError

    root = Path(tempfile.mkdtemp(dir=tmp))
    write_root(doc, root)
    registry = cds.rulesets.Registry(root=root)
    try:
        registry.load(RULESET, VERSION)
    except RulesetError as exc:
        return "invalid", str(exc).splitlines()[0][:200]
    cds.rulesets.default_registry = lambda: registry   # what cds.evaluate / load_ruleset / the tests use
    cds.evaluator._evaluators.clear()
    for name in [m for m in sys.modules if m.startswith("tests.test_")]:
        del sys.modules[name]                           # re-import: module-level EVALUATORS see the mutant
    outcome = _Outcome()
    args = [*files, "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not slow", "--no-header",
            "-p", "no:randomly", "--tb=no", "-W", "ignore"]
    with open(os.devnull, "w") as devnull:
        old = sys.stdout
        sys.stdout = devnull
        try:
            code = pytest.main(args, plugins=[outcome])
        finally:
            sys.stdout = old
    if code == 0:
        return "survived", f"{outcome.passed} tests passed"
    if outcome.failed:
        return "killed", outcome.failed
    return "killed", f"pytest exit code {int(code)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="clinical")
    ap.add_argument("--engine", choices=("reference", "durable-rules"), default="reference",
                    help="engine the tests run (CDS_TEST_ENGINE); the engine and reference agree on every shipped "
                         "case (cross-check), so the cheaper reference is the default here")
    ap.add_argument("--only", help="regex on mutant id, rule or description")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--jobs", type=int, default=1, help="split over N worker processes")
    ap.add_argument("--shard", help=argparse.SUPPRESS)   # k/n, used by --jobs
    ap.add_argument("--json", help="write per-mutant results to this file")
    ap.add_argument("--summarize", nargs="+", metavar="JSON",
                    help="only print the summary of earlier --json results (later files override earlier ones by "
                         "mutant id, e.g. a full run then a re-run of its survivors with --suite all)")
    args = ap.parse_args()
    if args.summarize:
        merged: dict[str, dict[str, Any]] = {}
        for f in args.summarize:
            merged.update({r["id"]: r for r in json.loads(Path(f).read_text(encoding="utf-8"))})
        summarize(sorted(merged.values(), key=lambda r: r["id"]), args.suite)
        return 0

    import yaml

    doc = yaml.safe_load(SOURCE.read_text(encoding="utf-8"))
    todo = mutants(doc)
    if args.only:
        rx = re.compile(args.only)
        todo = [m for m in todo if rx.search(m["id"]) or rx.search(m["rule"]) or rx.search(m["description"])]
    if args.list:
        for m in todo:
            print(f"{m['id']}  {m['rule']:<40} {m['operator']:<14} {m['description']}")
        print(f"{len(todo)} mutants")
        return 0

    if args.jobs > 1 and not args.shard:
        return _fan_out(args, todo)
    if args.shard:
        k, n = map(int, args.shard.split("/"))
        todo = todo[k::n]

    os.environ["CDS_TEST_ENGINE"] = args.engine
    os.environ["HYPOTHESIS_PROFILE"] = "mutation"
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from hypothesis import HealthCheck, settings

    settings.register_profile("mutation", max_examples=100, deadline=None, derandomize=True, database=None,
                              suppress_health_check=list(HealthCheck))
    settings.load_profile("mutation")
    files = SUITES[args.suite]
    results = []
    with tempfile.TemporaryDirectory(prefix="cds-rsmut-") as tmp:
        t0 = time.perf_counter()
        status, detail = run_suite(doc, files, Path(tmp))  # the unmutated ruleset must pass
        if status != "survived":
            print(f"baseline: the unmutated ruleset does not pass the suite ({status}: {detail}); aborting")
            return 2
        print(f"baseline (unmutated, {detail}) in {time.perf_counter() - t0:.1f} s; {len(todo)} mutants, "
              f"suite {args.suite}, engine {args.engine}", flush=True)
        for m in todo:
            t = time.perf_counter()
            status, detail = run_suite(m["doc"], files, Path(tmp))
            r = {k: m[k] for k in ("id", "rule", "operator", "description")}
            r.update(status=status, detail=detail, seconds=round(time.perf_counter() - t, 2))
            results.append(r)
            print(f"{r['id']} {status:<8} {r['rule']:<38} {r['operator']:<13} {r['description']}  [{detail}]",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not args.shard:
        summarize(results, args.suite)
    return 0


def _fan_out(args: argparse.Namespace, todo: list[dict[str, Any]]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="cds-rsmut-shards-"))
    procs = []
    for k in range(args.jobs):
        cmd = [sys.executable, __file__, "--suite", args.suite, "--engine", args.engine, "--shard", f"{k}/{args.jobs}",
               "--json", str(tmp / f"{k}.json")]
        if args.only:
            cmd += ["--only", args.only]
        procs.append(subprocess.Popen(cmd))  # noqa: S603 - ourselves
    codes = [p.wait() for p in procs]
    results = []
    for k in range(args.jobs):
        f = tmp / f"{k}.json"
        if f.exists():
            results += json.loads(f.read_text(encoding="utf-8"))
    results.sort(key=lambda r: r["id"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    summarize(results, args.suite)
    return max(codes)


# Mutants that no valid case can tell apart from the shipped ruleset, keyed "rule: description", with why.
_AAA_SHADOW = ("aaa_screen has the condition of the suspect trigger aaa_sudden_back_pain_over_50 (back region, age > "
               "aaa_suspicion_age_over, sudden onset) and requires exactly the six items the trigger requests. Whenever "
               "the screen applies the trigger fires: its unanswered requests are asked first (rule_id = the trigger) "
               "and the screen adds nothing; with every request answered the red flag is confirmed-complete and screens "
               "are not asked. So a mutant that only narrows aaa_screen (a region dropped, a higher age, an item "
               "dropped) changes no output; mutants that widen it were killed")
_NIGHT_PAIN = ("older_new_pain_malignancy_screen requires only night_pain, which the universal hip screen requires "
               "too and asks first (rule order) for every hip or both-region case; so letting this back screen also "
               "apply to hip/both cases, or taking 'both' away from it, asks exactly the same items")
EQUIVALENT: dict[str, str] = {
    "aaa_screen: when.all[0]<back_region>: region in ['back', 'both']: 'back' dropped": _AAA_SHADOW,
    "aaa_screen: when.all[0]<back_region>: region in ['back', 'both']: 'both' dropped": _AAA_SHADOW,
    "aaa_screen: when.all[1].all[0]: age_years gt aaa_suspicion_age_over=50 -> 51": _AAA_SHADOW,
    **{f"aaa_screen: effect.require: {item} dropped": _AAA_SHADOW for item in (
        "hypotension_or_shock", "systolic_bp_mmhg", "heart_rate_bpm", "pulsatile_abdominal_mass", "collapse_or_syncope",
        "abdominal_pain")},
    "older_new_pain_malignancy_screen: when.all[0] dropped": _NIGHT_PAIN,
    "older_new_pain_malignancy_screen: when.all[0]<back_region>: region in ['back', 'both']: 'both' dropped":
        _NIGHT_PAIN,
}


def _key(r: dict[str, Any]) -> str:
    return f"{r['rule']}: {r['description']}"


def summarize(results: list[dict[str, Any]], suite: str) -> None:
    killed = [r for r in results if r["status"] == "killed"]
    survived = [r for r in results if r["status"] == "survived"]
    invalid = [r for r in results if r["status"] == "invalid"]
    equivalent = [r for r in survived if _key(r) in EQUIVALENT]
    real = [r for r in survived if _key(r) not in EQUIVALENT]
    scored = len(killed) + len(real)
    print()
    print(f"suite {suite}: {len(results)} mutants: {len(killed)} killed, {len(survived)} survived "
          f"({len(equivalent)} argued equivalent), {len(invalid)} refused by the ruleset loader")
    if scored:
        print(f"mutation score: {len(killed)}/{len(killed) + len(survived)} = "
              f"{100 * len(killed) / (len(killed) + len(survived)):.1f}%  (excluding equivalent: "
              f"{len(killed)}/{scored} = {100 * len(killed) / scored:.1f}%)")
    by_op: dict[str, list[int]] = {}
    for r in killed + survived:
        by_op.setdefault(r["operator"], [0, 0])[r["status"] == "survived"] += 1
    for op, (k, s) in sorted(by_op.items()):
        print(f"  {op:<14} killed {k:>3}, survived {s:>3}")
    if real:
        print("survivors:")
        for r in real:
            print(f"  {r['id']} {r['rule']}: {r['operator']}: {r['description']}")
    if equivalent:
        print("equivalent (not counted):")
        for r in equivalent:
            print(f"  {r['id']} {r['rule']}: {r['description']}")
        for why in dict.fromkeys(EQUIVALENT[_key(r)] for r in equivalent):
            print(f"  why: {why}")
    if invalid:
        print("refused by the loader (not counted):")
        for r in invalid:
            print(f"  {r['id']} {r['rule']}: {r['description']} -- {r['detail'][:120]}")


if __name__ == "__main__":
    raise SystemExit(main())
