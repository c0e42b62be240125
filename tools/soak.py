"""Engine limits: a long soak in one process, then concurrent use by threads and by forked workers.

    python tools/soak.py [--n 1000000] [--concurrency-n 20000] [--seed 7] [--skip-soak]

1. Soak: ``--n`` evaluations (default 1,000,000) in this process with ``cds.Evaluator()`` (the default
   engine, durable-rules, with the reference cross-check on) over cases from ``benchmarks/engine.py``'s
   ``generate`` (made 10,000 at a time from derived seeds, so memory holds one chunk of cases, never a
   million). Prints RSS (current and peak) after 10k, 100k and 1M evaluations and every error.
2. Threads: 4 threads sharing one Evaluator over ``--concurrency-n`` cases (default 20,000) must give
   byte-identical recommendations (``to_json()``) to a sequential run.
3. Fork: a ``multiprocessing`` pool in the *fork* context with 2 workers, the Evaluator (and its compiled
   durable-rules network) created in the parent before the fork, must give the same bytes too.

Figures are printed, never asserted in tests. Exit status 1 on any error or difference.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cds  # noqa: E402
from benchmarks.engine import generate  # noqa: E402

CHUNK = 10_000
CHECKPOINTS = (10_000, 100_000, 1_000_000)


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def chunks(n: int, seed: int):
    done, i = 0, 0
    while done < n:
        size = min(CHUNK, n - done)
        yield generate(size, seed * 100_003 + i)
        done += size
        i += 1


def soak(n: int, seed: int) -> dict[str, Any]:
    ev = cds.Evaluator()  # newest active back-hip-pain; durable-rules + reference cross-check
    assert ev.cross_check and ev.engine == "durable-rules"
    errors: Counter[str] = Counter()
    first_errors: list[str] = []
    outcomes: Counter[str] = Counter()
    rss: dict[int, dict[str, float]] = {}
    marks = sorted({m for m in CHECKPOINTS if m <= n} | {n})
    count = 0
    t0 = time.perf_counter()
    print(f"soak: {n:,} evaluations, RSS at start {rss_mb():.1f} MB", flush=True)
    for batch in chunks(n, seed):
        for case in batch:
            try:
                rec = ev.evaluate(case)
                outcomes[f"{rec.status.value}/{rec.urgency.value}"] += 1
            except Exception as exc:  # every error is counted, none stops the soak
                errors[type(exc).__name__] += 1
                if len(first_errors) < 5:
                    first_errors.append(f"{case['case_id']}: {type(exc).__name__}: {exc}")
            count += 1
            if count in marks:
                rss[count] = {"rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_mb(), 1),
                              "elapsed_s": round(time.perf_counter() - t0, 1)}
                print(f"  after {count:>9,}: RSS {rss[count]['rss_mb']:.1f} MB (peak {rss[count]['peak_rss_mb']:.1f}"
                      f" MB), {rss[count]['elapsed_s']:.0f} s, errors {sum(errors.values())}", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"soak: {count:,} evaluations in {elapsed:.0f} s ({count / elapsed:,.0f}/s), errors "
          f"{sum(errors.values())} {dict(errors)}", flush=True)
    for e in first_errors:
        print("  error:", e, flush=True)
    return {"evaluations": count, "seconds": round(elapsed, 1), "errors": sum(errors.values()),
            "error_types": dict(errors), "rss": rss, "outcomes": dict(outcomes.most_common())}


# --------------------------------------------------------------------------- concurrency
_SHARED: cds.Evaluator | None = None   # created before the fork; inherited by the workers


def _fork_worker(batch: list[dict[str, Any]]) -> list[str]:
    assert _SHARED is not None
    return [_SHARED.evaluate(c).to_json() for c in batch]


def concurrency(n: int, seed: int) -> dict[str, Any]:
    global _SHARED
    cases = generate(n, seed + 1)
    ev = cds.Evaluator()
    t = time.perf_counter()
    sequential = [ev.evaluate(c).to_json() for c in cases]
    seq_s = time.perf_counter() - t

    # 4 threads share the one Evaluator; each takes every 4th case, so neighbouring cases interleave
    out: list[str | None] = [None] * n
    thread_errors: list[str] = []
    start = threading.Barrier(4)

    def run(k: int) -> None:
        start.wait()
        for i in range(k, n, 4):
            try:
                out[i] = ev.evaluate(cases[i]).to_json()
            except Exception as exc:
                thread_errors.append(f"{cases[i]['case_id']}: {type(exc).__name__}: {exc}")
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))
    thr_s = time.perf_counter() - t
    thread_diff = sum(1 for a, b in zip(sequential, out, strict=True) if a != b)
    print(f"threads: 4 threads x 1 shared Evaluator over {n:,} cases in {thr_s:.1f} s (sequential {seq_s:.1f} s):"
          f" {thread_diff} differ from sequential, {len(thread_errors)} errors", flush=True)

    # fork: the parent compiles, the children inherit the network (cds.engine takes its locks around fork)
    _SHARED = ev
    batches = [cases[i:i + 500] for i in range(0, n, 500)]
    fork_errors: list[str] = []
    t = time.perf_counter()
    try:
        with mp.get_context("fork").Pool(2) as pool:
            forked = [s for batch in pool.map(_fork_worker, batches) for s in batch]
    except Exception as exc:
        fork_errors.append(f"{type(exc).__name__}: {exc}")
        forked = []
    fork_s = time.perf_counter() - t
    fork_diff = sum(1 for a, b in zip(sequential, forked, strict=False) if a != b) + abs(len(forked) - n)
    print(f"fork: 2 forked workers over {n:,} cases in {fork_s:.1f} s: {fork_diff} differ from sequential, "
          f"{len(fork_errors)} errors", flush=True)
    for e in (thread_errors + fork_errors)[:5]:
        print("  error:", e, flush=True)
    # the parent's evaluator still works after the fork
    parent_ok = ev.evaluate(cases[0]).to_json() == sequential[0]
    return {"cases": n, "sequential_s": round(seq_s, 1), "threads": {"threads": 4, "seconds": round(thr_s, 1),
            "differ": thread_diff, "errors": len(thread_errors)},
            "fork": {"workers": 2, "seconds": round(fork_s, 1), "differ": fork_diff, "errors": len(fork_errors)},
            "parent_after_fork_ok": parent_ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--concurrency-n", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--skip-soak", action="store_true")
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    print(f"cds {cds.__version__}, python {sys.version.split()[0]}, pid {os.getpid()}", flush=True)
    report: dict[str, Any] = {}
    ok = True
    try:
        if not args.skip_soak:
            report["soak"] = soak(args.n, args.seed)
            ok &= report["soak"]["errors"] == 0
        if not args.skip_concurrency:
            report["concurrency"] = c = concurrency(args.concurrency_n, args.seed)
            ok &= (c["threads"]["differ"] == c["threads"]["errors"] == c["fork"]["differ"] == c["fork"]["errors"] == 0
                   and c["parent_after_fork_ok"])
    except Exception:
        traceback.print_exc()
        ok = False
    report["ok"] = ok
    print(json.dumps(report, indent=1, sort_keys=True), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
    print("RESULT:", "ok" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
