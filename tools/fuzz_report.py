"""Run the fuzz targets of tests/test_fuzz.py with many examples and report what was tried.

    python tools/fuzz_report.py [--max-examples 5000] [--only SUBSTRING] [--seed N]

Each Hypothesis test in tests/test_fuzz.py is called directly (not through pytest) with its settings
replaced by ``max_examples=--max-examples`` (also for the targets that pin a smaller count with
``@settings``), no deadline, every health check off and no example database (nothing is written to
.hypothesis/). The ``evaluator`` fixture is an ``cds.Evaluator("back-hip-pain")`` (durable-rules with
the cross-check), as in tests/conftest.py. A target "crashed" when it raised anything: a failed
assertion (an undocumented exception, a FactsError without a path, ...) or any other exception.

Prints, per target, the inputs tried (the module's ``TRIED`` counter: one line per kind of input, since
some targets feed two kinds) and the time, then the number of targets that crashed (0 expected).
Exit status 1 if any crashed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=5000)
    ap.add_argument("--only", help="run the targets whose name contains this")
    ap.add_argument("--seed", type=int, help="a fixed Hypothesis seed (default: random, printed on failure)")
    args = ap.parse_args()

    from hypothesis import HealthCheck, seed, settings

    settings.register_profile("fuzz-report", max_examples=args.max_examples, deadline=None, database=None,
                              suppress_health_check=list(HealthCheck))
    os.environ["HYPOTHESIS_PROFILE"] = "fuzz-report"
    settings.load_profile("fuzz-report")

    import cds
    from tests import test_fuzz as fuzz

    evaluator = cds.Evaluator("back-hip-pain")
    targets = [(name, fn) for name, fn in vars(fuzz).items() if name.startswith("test_") and callable(fn)]
    if args.only:
        targets = [(n, f) for n, f in targets if args.only in n]
    crashed: list[str] = []
    total = 0
    t_all = time.perf_counter()
    print(f"{len(targets)} targets, max_examples={args.max_examples}", flush=True)
    for name, fn in targets:
        is_property = hasattr(fn, "hypothesis")
        if is_property:
            # replace the target's own settings (some pin max_examples=60/200/300) with ours
            fn._hypothesis_internal_use_settings = settings(  # noqa: SLF001 - how Hypothesis stores them
                fn._hypothesis_internal_use_settings, max_examples=args.max_examples, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
            if args.seed is not None:
                fn = seed(args.seed)(fn)
        params = inspect.signature(fn).parameters
        kwargs = {"evaluator": evaluator} if "evaluator" in params else {}
        before = dict(fuzz.TRIED)
        t = time.perf_counter()
        try:
            fn(**kwargs)
            status = "ok"
        except BaseException as exc:  # noqa: BLE001 - a crash of any kind is what we report
            if isinstance(exc, KeyboardInterrupt):
                raise
            status = f"CRASHED: {type(exc).__name__}"
            crashed.append(name)
            traceback.print_exc(limit=8)
        seconds = time.perf_counter() - t
        tried = {k: v - before.get(k, 0) for k, v in fuzz.TRIED.items() if v - before.get(k, 0)}
        total += sum(tried.values()) if tried else (0 if is_property else 1)
        detail = ", ".join(f"{k}: {v:,}" for k, v in tried.items()) or ("1 fixed input set" if not is_property else "0")
        print(f"{name:<58} {status:<8} {seconds:7.1f} s  inputs tried: {detail}", flush=True)
    print(f"\ntotal inputs tried: {total:,} in {time.perf_counter() - t_all:.0f} s; targets crashed: {len(crashed)}"
          f"{' (' + ', '.join(crashed) + ')' if crashed else ''}")
    print("by kind of input:")
    for k, v in sorted(fuzz.TRIED.items()):
        print(f"  {k:<42} {v:>8,}")
    print("RESULT:", "ok (0 crashed)" if not crashed else f"FAILED ({len(crashed)} crashed)")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
