"""Throughput and memory of ``cds batch`` on synthetic cases.

    python benchmarks/batch.py                       # 200,000 cases, every path
    python benchmarks/batch.py --n 1000000 --paths local-2
    python benchmarks/batch.py --engine reference --dir /big/disk

Generates N valid synthetic cases into one NDJSON file, then runs each path in a fresh process and
reports cases/s, peak RSS and the ratio to the I/O ceiling:

  io-ceiling  read + parse + write an equally large record per case, one process, no evaluation
  local-1     cds batch, 1 local worker process
  local-2     cds batch, 2 local worker processes
  dask-2      cds batch --dask local (LocalCluster, 2 worker processes)

Peak RSS: "main" is the process that runs the batch (it reads, orders and writes); "worker" the
largest worker process (getrusage of reaped children); "total" the largest sum over the whole
process tree, sampled every 0.2 s (needs psutil, which the dask extra brings).
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Plausible ranges for the numeric findings (uniform; a real population is skewed, the engine does not care).
NUMBER_RANGES = {
    "temperature_c": (35.5, 40.5, 1), "systolic_bp_mmhg": (85, 200, 0), "diastolic_bp_mmhg": (45, 120, 0),
    "heart_rate_bpm": (45, 140, 0), "bmi_kg_m2": (16, 50, 1), "weight_loss_kg": (0, 15, 1),
    "morning_stiffness_minutes": (0, 180, 0), "back_pain_severity_nrs": (0, 10, 0),
    "leg_pain_severity_nrs": (0, 10, 0), "walking_tolerance_m": (10, 5000, 0), "off_work_weeks": (0, 52, 0),
    "esr_mm_h": (1, 120, 0), "crp_mg_l": (0.5, 200, 1), "wbc_10e9_l": (3, 20, 1),
}
TRI = ("absent", "present", "unknown")
TRI_WEIGHTS = (0.8, 0.07, 0.13)
REASONS = ("not-asked", "not-examined", "not-measured", "not-recorded", "not-tested", "declined")


def _number(rng: random.Random, lo: float, hi: float, digits: int) -> float | int:
    x = rng.uniform(lo, hi)
    return round(x) if digits == 0 else round(x, digits)


def generate_cases(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """N valid, varied cases: ages 10-95, every region, random subsets of findings (present, absent,
    unknown), occasional measurements, treatments, STarT Back and ODI answers. Case ids are not in
    input order (so sorting by case id means something)."""
    from cds.facts import catalogue

    cat = catalogue()
    tri = [k for k, v in cat.findings.items() if v["kind"] == "tri_state"]
    enums = {k: v["values"] for k, v in cat.findings.items() if v["kind"] == "enum"}
    rng = random.Random(seed)  # noqa: S311 - synthetic test data
    for i in range(n):
        age: Any = rng.randint(10, 95)
        roll = rng.random()
        if roll < 0.02:
            age = "unknown"
        elif roll < 0.03:
            age = {"ge": 90}
        context: dict[str, Any] = {"region": rng.choices(("back", "hip", "both"), (0.6, 0.3, 0.1))[0],
                                   "age_years": age}
        if rng.random() < 0.9:
            context["sex"] = rng.choices(("female", "male", "other", "unknown"), (0.5, 0.46, 0.01, 0.03))[0]
        if rng.random() < 0.9:
            context["pain_duration_weeks"] = round(rng.expovariate(1 / 10), 1)
        if rng.random() < 0.5:
            context["onset"] = rng.choice(("sudden", "gradual", "unknown"))
        if rng.random() < 0.5:
            context["leg_symptom_laterality"] = rng.choice(cat.context["leg_symptom_laterality"]["values"])
        findings: dict[str, Any] = {}
        for fact in rng.sample(tri, rng.randint(0, 45)):
            findings[fact] = rng.choices(TRI, TRI_WEIGHTS)[0]
        for fact, (lo, hi, digits) in NUMBER_RANGES.items():
            if rng.random() < 0.08:
                findings[fact] = _number(rng, lo, hi, digits)
        for fact, values in enums.items():
            if rng.random() < 0.08:
                findings[fact] = rng.choice(values)
        case: dict[str, Any] = {"case_id": f"syn-{rng.getrandbits(32):08x}-{i}", "context": context,
                                "findings": findings}
        unknown = [k for k, v in findings.items() if v == "unknown"]
        if unknown and rng.random() < 0.3:
            case["unknown_reasons"] = {k: rng.choice(REASONS) for k in rng.sample(unknown, min(3, len(unknown)))}
        if rng.random() < 0.35:
            steps = cat.steps[: rng.randint(1, 3)]
            case["treatments"] = [{"step": s, "weeks": rng.choice((1, 2, 4, 6, 8, 12, 26, "unknown")),
                                   "outcome": rng.choice(cat.outcomes)} for s in steps]
        if rng.random() < 0.2:
            case["start_back"] = {q: rng.choice(answers) for q, answers in cat.start_back.items()}
        if rng.random() < 0.1:
            case["odi"] = {q: rng.choice((0, 1, 2, 3, 4, 5, None)) for q in cat.odi}
        yield case


def write_cases(path: Path, n: int, seed: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for case in generate_cases(n, seed):
            fh.write(json.dumps(case, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------------------- one path, in a child

class _TreeSampler(threading.Thread):
    """Largest total RSS of this process and its descendants (psutil), sampled every 0.2 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self.stop.wait(0.2):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)


def _io_ceiling(src: Path, out: Path, template: str) -> int:
    """Read, parse, and write a record as large as a real one per case: what the disk and JSON allow."""
    n = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf: list[bytes] = []
    with open(src, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            case = json.loads(raw)
            buf.append(('{"case_id":' + json.dumps(case["case_id"]) + ',"kind":"result","recommendation":' + template
                        + ',"source":{"file":' + json.dumps(str(src)) + f',"line":{line_no}}}}}\n').encode())
            n += 1
            if len(buf) >= 64:
                os.write(fd, b"".join(buf))
                buf = []
    os.write(fd, b"".join(buf))
    os.fsync(fd)
    os.close(fd)
    return n


def _child(args: argparse.Namespace) -> None:
    import cds
    from cds import batch

    sampler = _TreeSampler()
    sampler.start()
    src, out = Path(args.input), Path(args.out)
    started = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime  # imports
    if args.child == "io-ceiling":
        first = json.loads(src.open("rb").readline())
        template = cds.Evaluator(engine="reference").evaluate(first).to_json()
        started = time.perf_counter()
        n = _io_ceiling(src, out, template)
    else:
        kw: dict[str, Any] = {"workers": 1} if args.child == "local-1" else {"workers": 2}
        if args.child == "dask-2":
            kw["dask"] = "local"
        s = batch.run([src], out, overwrite=True, engine=args.engine, cross_check=not args.no_cross_check, **kw)
        n = s.records
        assert s.errors == 0, s.error_types
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "cases": n, "seconds": seconds, "out_bytes": out.stat().st_size,
        "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime - cpu_before,
        "main_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "worker_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "total_rss": sampler.peak,
    }))


# ----------------------------------------------------------------------------------------- driver

PATHS = ("io-ceiling", "local-1", "local-2", "dask-2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000, help="cases (default 200,000)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--engine", choices=("durable-rules", "reference"), default="durable-rules")
    ap.add_argument("--no-cross-check", action="store_true")
    ap.add_argument("--dir", help="working folder (default: a temporary one; results need ~18 kB per case)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        ap.error(f"unknown path(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        src = Path(tmp) / "cases.ndjson"
        t = time.perf_counter()
        write_cases(src, args.n, args.seed)
        print(f"generated {args.n:,} cases ({src.stat().st_size / 1e6:,.0f} MB) in {time.perf_counter() - t:.1f} s; "
              f"engine {args.engine}{'' if args.no_cross_check else ' + reference cross-check'}; "
              f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}", flush=True)
        rows = {}
        for path in paths:
            out = Path(tmp) / f"{path}.ndjson"
            cmd = [sys.executable, __file__, "--child", path, "--input", str(src), "--out", str(out),
                   "--engine", args.engine] + (["--no-cross-check"] if args.no_cross_check else [])
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)  # noqa: S603 - our own script
            rows[path] = json.loads(done.stdout.strip().splitlines()[-1])
            r = rows[path]
            print(f"  {path:<11} {r['cases'] / r['seconds']:>9,.0f} cases/s  {r['seconds']:>8.1f} s", flush=True)
            out.unlink(missing_ok=True)
            for extra in (Path(tmp) / f"{path}.summary.json",):
                extra.unlink(missing_ok=True)
    ceiling = rows.get("io-ceiling")
    print(f"\n{'path':<11} {'cases/s':>9} {'vs ceiling':>10} {'seconds':>8} {'CPU ms/case':>11} {'out MB':>8} "
          f"{'main RSS':>9} {'worker RSS':>10} {'total RSS':>9}")
    for path, r in rows.items():
        rate = r["cases"] / r["seconds"]
        ratio = f"{rate / (ceiling['cases'] / ceiling['seconds']):.3f}" if ceiling else "-"
        cpu = f"{1000 * r['cpu_seconds'] / r['cases']:.3f}" if "cpu_seconds" in r else "-"
        print(f"{path:<11} {rate:>9,.0f} {ratio:>10} {r['seconds']:>8.1f} {cpu:>11} {r['out_bytes'] / 1e6:>8,.0f} "
              f"{r['main_rss'] / 2**20:>7.0f}MB {r['worker_rss'] / 2**20:>8.0f}MB {r['total_rss'] / 2**20:>7.0f}MB")
    print("\nCPU ms/case: user+system time of the whole process tree per case (less sensitive to other load "
          "on the machine than cases/s).")


if __name__ == "__main__":
    main()
