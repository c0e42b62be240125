"""The engine on the shipped ruleset: speed of each path, where the time goes, and memory (printed, never asserted).

Paths, all in one run on the same generated cases (derived facts computed once beforehand for the
three rule paths, so they compare rule evaluation only):

  reference      the ruleset's conditions as Python closures (cds.conditions): the ceiling
  fast engine    cds.engine.Network.fired: durable-rules' C core driven directly
  stock engine   durable-rules' own Python layer (durable.engine.Host, as durable.lang uses it) with one
                 Python action per rule, assert_fact + retract_fact per case
  cds.evaluate   the whole Evaluator with the cross-check on: validation, derived facts, both
                 evaluators, the pathway and the recommendation (without serialising it)

Then the split of cds.evaluate's time inside the two evaluators and outside them, and, with
--memory, RSS after 10k, 100k and 1,000,000 evaluations in one process.

    python benchmarks/engine.py [--n 100000] [--memory] [--memory-n 1000000] [--seed 11]
"""

from __future__ import annotations

import argparse
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cds  # noqa: E402
from cds.facts import PatientFacts, catalogue  # noqa: E402
from cds.scores import START_BACK_ITEMS, derive  # noqa: E402

NUMBER_RANGES = {"age_years": (8, 95), "pain_duration_weeks": (0, 200), "temperature_c": (35.5, 40.0),
                 "systolic_bp_mmhg": (70, 190), "heart_rate_bpm": (45, 140), "esr_mm_h": (2, 110),
                 "wbc_10e9_l": (3, 20), "morning_stiffness_minutes": (0, 120), "back_pain_severity_nrs": (0, 10),
                 "leg_pain_severity_nrs": (0, 10), "bmi_kg_m2": (16, 45)}


def generate(n: int, seed: int) -> list[dict[str, Any]]:
    """Realistic-looking valid cases: most screens answered, a few findings present, some unknown."""
    rng = random.Random(seed)  # noqa: S311 - synthetic benchmark data
    cat = catalogue()
    tri = [k for k, v in cat.findings.items() if v["kind"] == "tri_state"]
    out = []
    for i in range(n):
        findings: dict[str, Any] = {}
        for f in rng.sample(tri, rng.randint(10, 60)):
            r = rng.random()
            findings[f] = "present" if r < 0.06 else ("unknown" if r < 0.15 else "absent")
        for f, (lo, hi) in NUMBER_RANGES.items():
            if f in cat.findings and rng.random() < 0.3:
                findings[f] = round(rng.uniform(lo, hi), 1)
        context = {"region": rng.choice(("back", "back", "hip", "both")), "age_years": rng.randint(8, 95),
                   "sex": rng.choice(("female", "male")), "pain_duration_weeks": round(rng.uniform(0, 60), 1),
                   "onset": rng.choice(("sudden", "gradual", "unknown"))}
        case: dict[str, Any] = {"case_id": f"bench-{i}", "context": context, "findings": findings}
        if rng.random() < 0.5:
            answers: dict[str, Any] = {q: rng.random() < 0.3 for q in START_BACK_ITEMS[:8]}
            answers["q9_bothersomeness"] = rng.choice(["not-at-all", "slightly", "moderately", "very-much", "extremely"])
            case["start_back"] = answers
        if rng.random() < 0.4:
            case["treatments"] = [{"step": rng.choice(("self-care", "physical-therapy", "medical")),
                                   "weeks": rng.randint(1, 16),
                                   "outcome": rng.choice(("improved", "partial", "no-improvement", "worse"))}
                                  for _ in range(rng.randint(1, 3))]
        out.append(case)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def timed(fn: Any, items: list[Any]) -> tuple[float, list[float], list[Any]]:
    """Total seconds, per-item latencies (s) and results."""
    lat, results = [], []
    clock = time.perf_counter
    t0 = clock()
    for x in items:
        a = clock()
        results.append(fn(x))
        lat.append(clock() - a)
    return clock() - t0, lat, results


def stock_host(net: Any) -> Any:
    """A stock durable_rules Host with the same compiled definitions and one Python action per rule."""
    from engine_paths import make_host, run_host  # the same stock path the synthetic benchmark measures

    host, names, fired = make_host(net)
    return lambda values: run_host(host, names, fired, net, [values])[0]


def pct(lat: list[float], q: float) -> float:
    return statistics.quantiles(lat, n=100)[int(q) - 1] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--stock-n", type=int, default=10_000, help="cases for the (slow) stock path")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--memory", action="store_true", help="also measure RSS over --memory-n evaluations")
    ap.add_argument("--memory-n", type=int, default=1_000_000)
    args = ap.parse_args()

    cases = generate(args.n, args.seed)
    ev = cds.Evaluator("back-hip-pain")          # durable-rules + reference cross-check (the default)
    rs, net = ev.ruleset, ev.ruleset.network()
    params = rs.parameters
    values = [derive(PatientFacts.from_dict(c), params) for c in cases]
    rules = rs.rules

    def reference(v: Any) -> frozenset[str]:
        return frozenset(r.id for r in rules if r.predicate(v) is True)

    print(f"cds {cds.__version__}, ruleset {rs.key} ({len(rules)} rules, {len(net.widths)} durable rulesets, "
          f"widths {list(net.widths)}); Python {platform.python_version()} on {platform.machine()}, "
          f"{platform.processor() or 'cpu'}; {args.n:,} generated cases")
    rows = []
    t_ref, lat_ref, res_ref = timed(reference, values)
    rows.append(("reference evaluator", args.n, t_ref, lat_ref))
    t_net, lat_net, res_net = timed(net.fired, values)
    rows.append(("fast engine (Network.fired)", args.n, t_net, lat_net))
    disagree = sum(1 for a, b in zip(res_ref, res_net, strict=True) if a != b)
    stock = stock_host(net)
    sn = min(args.stock_n, args.n)
    t_stock, lat_stock, res_stock = timed(stock, values[:sn])
    rows.append(("stock durable-rules Host", sn, t_stock, lat_stock))
    disagree_stock = sum(1 for a, b in zip(res_ref[:sn], res_stock, strict=True) if a != b)
    t_full, lat_full, _ = timed(ev.evaluate, cases)
    rows.append(("cds.evaluate (cross-check on)", args.n, t_full, lat_full))

    fired_per_case = sum(map(len, res_ref)) / len(res_ref)
    print(f"{fired_per_case:.1f} rules fire per case on average; engine vs reference disagreements: {disagree} "
          f"of {args.n:,}; stock vs reference: {disagree_stock} of {sn:,}\n")
    ref_rate = args.n / t_ref
    print(f"{'path':34} {'cases':>9} {'cases/s':>10} {'p50 us':>8} {'p99 us':>8} {'vs reference':>13}")
    for label, n, t, lat in rows:
        rate = n / t
        print(f"{label:34} {n:9,} {rate:10,.0f} {pct(lat, 50):8.1f} {pct(lat, 99):8.1f} {rate / ref_rate:12.2f}x")
    fast, stock_rate = args.n / t_net, sn / t_stock
    print(f"\nfast engine / reference: {fast / ref_rate:.2f}x (target >= 0.5x)")
    print(f"fast engine / stock path: {fast / stock_rate:.1f}x (target >= 5x)")
    # Where cds.evaluate's time goes, each stage timed inside one loop so machine load hits all alike.
    from cds.pathway import combine

    stages = dict.fromkeys(("validate", "derive", "reference", "engine", "pathway + input hash"), 0.0)
    clock = time.perf_counter
    for c in cases:
        t0 = clock()
        facts = PatientFacts.from_dict(c)
        t1 = clock()
        v = derive(facts, params)
        t2 = clock()
        ref = [r.id for r in rules if r.predicate(v) is True]
        t3 = clock()
        by_engine = net.fired(v)
        t4 = clock()
        fired = [rs.rules_by_id[i] for i in ref if i in by_engine]
        combine(rs, facts.case_id, v, fired, {"input_sha256": facts.sha256()})
        t5 = clock()
        for key, dt_ in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[key] += dt_
    inside = stages["reference"] + stages["engine"]
    outside = stages["validate"] + stages["derive"] + stages["pathway + input hash"]
    print("cds.evaluate, per case and stage: " + ", ".join(f"{k} {t / args.n * 1e6:.1f} us" for k, t in stages.items()))
    print(f"outside the two evaluators / inside them = {outside / inside:.2f} (target <= 1)")
    print(f"peak RSS {peak_rss_mb():.0f} MB")

    if args.memory:
        print(f"\nmemory: one Evaluator, {args.memory_n:,} sequential evaluations of the generated cases")
        checkpoints = {10_000, 100_000, args.memory_n}
        base = current_rss_mb()
        print(f"  RSS before: {base:.1f} MB")
        first = None
        for i in range(1, args.memory_n + 1):
            ev.evaluate(cases[i % args.n])
            if i in checkpoints:
                now = current_rss_mb()
                first = now if first is None else first
                print(f"  after {i:>9,}: RSS {now:.1f} MB (growth since 10k: {now - first:+.1f} MB)")


if __name__ == "__main__":
    main()
