"""Cases per second for three ways of deciding which of 40 rules fire (printed, never asserted).

  (a) reference   the conditions compiled to Python closures (cds.conditions.compile_predicate)
  (b) network     cds.engine.Network.fired: the C core driven directly, one long-lived session,
                  fixed fact id, assert / drain actions / retract
  (c) stock Host  durable_rules' own Python layer (durable.engine.Host, as durable.lang uses it): the
                  same compiled definitions with one Python action per rule, assert_fact +
                  retract_fact per case through Host (stdlib JSON both ways, timer threads running)

The ruleset is synthetic but shaped like a clinical one: 32 tri-state findings, 4 enums and 8 numbers
(some censored, some unknown), 40 rules mixing single red flags, numeric thresholds, any-present
lists, unknown-is-not-absent checks and counts (one large enough to need a helper field).

    python benchmarks/engine_paths.py [--n 20000] [--seed 7] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cds.conditions import And, Cmp, Count, In, Is, Not, Or, compile_predicate  # noqa: E402
from cds.engine import Network, durable_rules_version  # noqa: E402
from cds.facts import Censored  # noqa: E402

FINDINGS = [f"f{i:02d}" for i in range(32)]
ENUMS = {"region": ("back", "hip", "both"), "duration_category": ("acute", "subacute", "chronic"),
         "sex": ("female", "male"), "laterality": ("left", "right", "bilateral")}
NUMBERS = {"age": (16, 95), "weeks": (0, 200), "temp": (35.0, 40.5), "nrs": (0, 10), "esr": (0, 120),
           "crp": (0, 200), "bmi": (15.0, 45.0), "stiffness": (0, 120)}


def P(f: str) -> Is:
    return Is(f, "present")


def ruleset() -> list[tuple[str, object]]:
    back = In("region", ("back", "both"))
    hip = In("region", ("hip", "both"))
    rules: list[tuple[str, object]] = []
    for i in range(12):                                   # single red flags, some region-specific
        f = FINDINGS[i]
        rules.append((f"red-flag-{f}", P(f) if i % 3 else And((P(f), back if i % 2 else hip))))
    rules += [
        ("fever", Cmp("temp", "ge", 38.0)),
        ("older-new-pain", And((Cmp("age", "ge", 50), In("duration_category", ("acute",)), P("f12")))),
        ("inflammatory-markers", Or((Cmp("esr", "gt", 30), Cmp("crp", "gt", 10)))),
        ("young-chronic", And((Cmp("age", "lt", 35), Cmp("weeks", "gt", 12)))),
        ("severe-pain", Cmp("nrs", "ge", 8)),
        ("obesity-hip", And((hip, Cmp("bmi", "ge", 30.0)))),
        ("morning-stiffness", And((Cmp("stiffness", "gt", 30), Not(Is("f13", "absent"))))),
        ("any-neuro", Or(tuple(P(f) for f in FINDINGS[14:18]))),
        ("any-systemic", Or(tuple(P(f) for f in FINDINGS[18:21]))),
        ("any-trauma", And((Or((P("f21"), P("f22"))), Cmp("age", "ge", 70)))),
        ("bilateral", In("laterality", ("bilateral",))),
        ("screen-unknown-back", And((back, Or(tuple(Is(f, "unknown") for f in FINDINGS[0:4]))))),
        ("screen-unknown-hip", And((hip, Or(tuple(Is(f, "unknown") for f in FINDINGS[4:8]))))),
        ("age-unknown", Is("age", "unknown")),
        ("no-red-flags", Not(Or(tuple(P(f) for f in FINDINGS[0:12])))),
        ("acute-no-neuro", And((In("duration_category", ("acute",)), Not(Or(tuple(P(f) for f in FINDINGS[14:18])))))),
        ("two-of-five", Count(tuple(P(f) for f in FINDINGS[23:28]), "ge", 2)),
        ("three-of-nine", Count(tuple(P(f) for f in FINDINGS[23:32]), "eq", 3)),   # C(9,3) = 84: helper field
        ("at-most-one-of-four", Count(tuple(P(f) for f in FINDINGS[28:32]), "le", 1)),
        ("female-hip-young", And((In("sex", ("female",)), hip, Cmp("age", "lt", 40)))),
        ("chronic-severe", And((In("duration_category", ("chronic",)), Cmp("nrs", "ge", 6)))),
        ("weeks-window", And((Cmp("weeks", "ge", 6), Cmp("weeks", "le", 12)))),
        ("not-improving", And((P("f31"), Not(In("duration_category", ("acute",)))))),
        ("known-temp-normal", And((Is("temp", "known"), Cmp("temp", "lt", 37.5)))),
        ("crp-normal-esr-high", And((Cmp("crp", "le", 5), Cmp("esr", "gt", 20)))),
        ("nested", Or((And((P("f00"), Cmp("age", "gt", 60))), And((P("f01"), Not(Cmp("age", "le", 18))))))),
        ("bmi-not-low", Not(Cmp("bmi", "lt", 18.5))),
        ("sex-known", Is("sex", "known")),
    ]
    assert len(rules) == 40, len(rules)
    return rules


def case(rng: random.Random) -> dict[str, object]:
    values: dict[str, object] = {}
    for f in FINDINGS:
        r = rng.random()
        if r < 0.06:
            values[f] = "present"
        elif r < 0.70:
            values[f] = "absent"
        elif r < 0.80:
            values[f] = "unknown"
    for f, options in ENUMS.items():
        if rng.random() < 0.9:
            values[f] = rng.choice(options)
    for f, (lo, hi) in NUMBERS.items():
        r = rng.random()
        if r < 0.12:
            continue
        x = rng.uniform(lo, hi)
        x = round(x, 1) if isinstance(lo, float) else int(x)
        values[f] = Censored(rng.choice(("gt", "ge", "lt", "le")), x) if r > 0.92 else x
    return values


def run_reference(rules, cases):
    preds = [(rid, compile_predicate(node)) for rid, node in rules]
    return [frozenset(rid for rid, p in preds if p(v) is True) for v in cases]


def run_network(net, cases):
    fired = net.fired
    return [fired(v) for v in cases]


def _action(rid, fired):
    def run(c):  # one parameter: durable treats a second one as an async completion callback
        fired.add(rid)
    return run


def make_host(net):
    """A stock durable_rules Host holding the same compiled rulesets, with one Python action per rule."""
    from durable import engine

    fired: set[str] = set()
    host = engine.Host()
    names = []
    for i, text in enumerate(net.definitions):
        definition = json.loads(text)
        for action in definition:
            definition[action]["run"] = _action(net._rule_of_action[action], fired)
        name = f"{net.name}#stock{i}"
        host.register_rulesets({name: definition})
        names.append(name)
    return host, names, fired


def run_host(host, names, fired, net, cases):
    from durable.engine import MessageNotHandledException

    out = []
    for v in cases:
        fired.clear()
        for name, payload in zip(names, net._encode(v), strict=True):
            fact = json.loads(payload)
            try:
                host.assert_fact(name, fact)
            except MessageNotHandledException:
                pass
            host.retract_fact(name, {"sid": fact["sid"], "id": fact["id"]})
        out.append(frozenset(fired))
    return out


def interleaved(paths, repeat: int):
    """Best wall time per path over ``repeat`` rounds, the paths taking turns within each round."""
    best = {label: float("inf") for label, _ in paths}
    results = {}
    for _ in range(repeat):
        for label, fn in paths:
            t0 = time.perf_counter()
            results[label] = fn()
            best[label] = min(best[label], time.perf_counter() - t0)
    return best, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="cases per path (default 20000)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3, help="runs per path; the best is reported")
    ap.add_argument("--no-host", action="store_true", help="skip the stock Host path")
    args = ap.parse_args()

    rng = random.Random(args.seed)  # noqa: S311 - synthetic benchmark data, not security
    rules = ruleset()
    cases = [case(rng) for _ in range(args.n)]
    t0 = time.perf_counter()
    net = Network.compile("synthetic-40@1.0.0", rules)
    compile_s = time.perf_counter() - t0

    paths = [("(a) reference closures", lambda: run_reference(rules, cases)),
             ("(b) Network.fired", lambda: run_network(net, cases))]
    if not args.no_host:
        host, names, fired = make_host(net)
        paths.append(("(c) stock engine.Host, 1 action/rule", lambda: run_host(host, names, fired, net, cases)))
    best, results = interleaved(paths, args.repeat)
    ref, t_ref = results[paths[0][0]], best[paths[0][0]]
    rows = [(label, best[label], results[label]) for label, _ in paths]

    fired_per_case = sum(map(len, ref)) / len(ref)
    payload_fields = net._encode(cases[0])[0].count(":")
    print(f"durable-rules {durable_rules_version()}, Python {sys.version.split()[0]}; {args.n} cases, "
          f"best of {args.repeat} interleaved rounds")
    print(f"network: {net!r}; compiled in {compile_s * 1000:.0f} ms; helper fields {net.helper_fields}; "
          f"~{payload_fields} fields per fact; {fired_per_case:.2f} rules fired per case")
    print(f"{'path':40} {'cases/s':>10} {'vs (a)':>8} {'us/case':>8}  agrees with (a)")
    for label, t, res in rows:
        wrong = sum(1 for x, y in zip(res, ref, strict=True) if x != y)
        print(f"{label:40} {args.n / t:10,.0f} {t_ref / t:7.2f}x {t / args.n * 1e6:8.1f}  "
              f"{'yes' if not wrong else f'NO: {wrong} cases differ'}")


if __name__ == "__main__":
    main()
