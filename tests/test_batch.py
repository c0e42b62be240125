"""`cds batch`: one record per input case, in order, summarised, and safe to kill and resume."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import attrs
import jsonschema
import pytest

import cds
from cds import batch
from cds._resources import load_schema
from cds.cli import main
from tests.conftest import ENGINE

ROOT = Path(__file__).resolve().parent.parent
REC = jsonschema.Draft202012Validator(load_schema("recommendation.schema.json"))
FORK = sys.platform.startswith("linux")  # the crash tests patch the parent and rely on fork


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_batch", ROOT / "benchmarks" / "batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_cases = _load_bench().generate_cases


def write_ndjson(path: Path, n: int, seed: int = 0) -> list[dict]:
    cases = list(generate_cases(n, seed))
    path.write_text("".join(json.dumps(c) + "\n" for c in cases), encoding="utf-8")
    return cases


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def key(record: dict) -> tuple:
    return record["source"]["file"], record["source"]["line"]


def sort_key(line: str) -> tuple:
    r = json.loads(line)
    return r.get("case_id") or "", r["source"]["file"] or "", r["source"]["line"] or 0


def canonical(line: str) -> str:
    return json.dumps(json.loads(line), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def run(inputs, out, **kw):
    kw.setdefault("engine", ENGINE)
    kw.setdefault("workers", 2)
    return batch.run(inputs, out, **kw)


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """A folder of case files and an NDJSON file, with every kind of bad input among good cases."""
    good = list(generate_cases(6, seed=7))
    folder = tmp_path / "cases"
    (folder / "b" / "deeper").mkdir(parents=True)
    (folder / "a").mkdir()
    (folder / "b" / "deeper" / "z.json").write_text(json.dumps(good[0]))
    (folder / "b" / "c.json").write_text(json.dumps(good[1], indent=2))
    (folder / "a" / "y.json").write_text("{\n  \"case_id\": \"broken\",\n  oops\n}")
    (folder / "a" / "list.json").write_text("[1, 2]")
    (folder / "notes.txt").write_text("not a case")
    ndjson = tmp_path / "more.ndjson"
    bad_case = {"case_id": "bad-1", "context": {"region": "knee", "age_years": "SECRET-VALUE"}}
    lines = [json.dumps(good[2]), "", json.dumps(bad_case), "   ", '{"case_id": "x", SECRET-VALUE',
             "[1, 2, 3]", json.dumps(good[3])]
    ndjson.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n" + json.dumps(good[4]).encode())
    return folder, ndjson, good


def test_every_input_case_gets_exactly_one_record(mixed, tmp_path):
    folder, ndjson, good = mixed
    out = tmp_path / "results.ndjson"
    summary = run([folder, ndjson], out)
    text = out.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    f, n = str(folder), str(ndjson)
    # Folders: *.json only, recursive, sorted by path; NDJSON: blank lines are not cases but are counted.
    assert [key(r) for r in records] == [
        (f"{f}/a/list.json", None), (f"{f}/a/y.json", None), (f"{f}/b/c.json", None),
        (f"{f}/b/deeper/z.json", None),
        (n, 1), (n, 3), (n, 5), (n, 6), (n, 7), (n, 8), (n, 9)]
    kinds = {key(r): (r["kind"], r.get("error", {}).get("type")) for r in records}
    assert kinds[(f"{f}/a/list.json", None)] == ("error", "FactsError")
    assert kinds[(f"{f}/a/y.json", None)] == ("error", "JSONDecodeError")
    assert kinds[(n, 3)] == ("error", "FactsError")
    assert kinds[(n, 5)] == ("error", "JSONDecodeError")
    assert kinds[(n, 6)] == ("error", "FactsError")  # a JSON array is not a case
    assert kinds[(n, 8)] == ("error", "UnicodeDecodeError")
    assert [kinds[k][0] for k in [(f"{f}/b/c.json", None), (f"{f}/b/deeper/z.json", None), (n, 1), (n, 7), (n, 9)]] \
        == ["result"] * 5
    assert summary.records == 11 and summary.results == 5 and summary.errors == 6

    by_key = {key(r): r for r in records}
    # JSON errors say where only; facts errors name paths; neither repeats what the case said.
    assert by_key[(f"{f}/a/y.json", None)]["error"]["message"].startswith("not valid JSON (line 3, column 3")
    assert by_key[(n, 5)]["error"]["message"].startswith("not valid JSON (column ")
    assert "SECRET" not in "".join(json.dumps(r["error"]) for r in records if r["kind"] == "error")
    facts_error = by_key[(n, 3)]
    assert facts_error["case_id"] == "bad-1"
    assert {p["path"] for p in facts_error["error"]["problems"]} >= {"$.context.region", "$.context.age_years"}
    assert "case_id" not in by_key[(n, 5)]

    # Results are exactly what the evaluator says, and every line is canonical key-sorted JSON.
    ev = cds.Evaluator(engine=ENGINE)
    assert by_key[(n, 1)]["recommendation"] == ev.evaluate(good[2]).to_dict()
    assert by_key[(n, 9)]["case_id"] == good[4]["case_id"]
    for line in text.splitlines():
        assert line == canonical(line)
    for r in records:
        if r["kind"] == "result":
            REC.validate(r["recommendation"])


def test_summary_counts_the_records_and_summarize_rebuilds_it(mixed, tmp_path, capsys):
    folder, ndjson, _ = mixed
    out = tmp_path / "results.ndjson"
    summary = run([folder, ndjson, *sorted((ROOT / "examples").glob("*.json"))], out)
    records = read_records(out)
    results = [r["recommendation"] for r in records if r["kind"] == "result"]
    d = summary.to_dict()
    assert d["care_step"] == dict(Counter(r["care_step"] for r in results))
    assert d["urgency"] == dict(Counter(r["urgency"] for r in results))
    assert d["status"] == dict(Counter(r["status"] for r in results))
    assert d["red_flags"] == dict(Counter(f["id"] for r in results for f in r["red_flags"]))
    assert d["weak_flags"] == dict(Counter(w["id"] for r in results for w in r["weak_flags"]))
    assert d["error_types"] == dict(Counter(r["error"]["type"] for r in records if r["kind"] == "error"))
    assert d["cases_with_red_flags"] == sum(bool(r["red_flags"]) for r in results) > 0
    assert d["records"] == len(records) and d["results"] == len(results)

    written = batch.summary_path(out)
    assert written == tmp_path / "results.summary.json"
    assert json.loads(written.read_text()) == d
    assert batch.Summary.from_dict(json.loads(written.read_text())) == summary
    assert batch.summarize(out) == summary
    before = written.read_bytes()
    written.unlink()
    assert main(["batch", "summarize", str(out)]) == 0
    assert written.read_bytes() == before
    err = capsys.readouterr().err
    assert "care step" in err and "red flags" in err and "FactsError" in err


def test_html_report_is_self_contained(mixed, tmp_path):
    folder, ndjson, good = mixed
    report = tmp_path / "report.html"
    summary = run([folder, ndjson], tmp_path / "r.ndjson", html_report=report)
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 4
    assert "<script" not in page and "<link" not in page and "<img" not in page
    for attr in ("src=", "href=", "url(", "http"):
        assert attr not in page
    assert f">{summary.records:,}<" in page
    assert not any(c["case_id"] in page for c in good)  # aggregates only
    report.unlink()
    assert main(["batch", "summarize", str(tmp_path / "r.ndjson"), "--html", str(report), "--quiet"]) == 0
    assert report.read_text(encoding="utf-8") == page


def test_output_order_input_or_case_id(tmp_path):
    src = tmp_path / "in.ndjson"
    cases = write_ndjson(src, 300)
    first = tmp_path / "input.ndjson"
    run([src], first, chunk_size=7)
    lines = first.read_text().splitlines()
    assert [json.loads(x)["case_id"] for x in lines] == [c["case_id"] for c in cases]
    assert [c["case_id"] for c in cases] != sorted(c["case_id"] for c in cases)
    by_id = tmp_path / "by-id.ndjson"
    run([src], by_id, order="case-id", chunk_size=7)
    assert by_id.read_text().splitlines() == sorted(lines, key=sort_key)


def test_worker_counts_give_the_same_bytes(tmp_path):
    src = tmp_path / "in.ndjson"
    write_ndjson(src, 200, seed=3)
    outs = []
    for workers in (0, 1, 3):
        out = tmp_path / f"w{workers}.ndjson"
        run([src], out, workers=workers, chunk_size=9)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_evaluate_many_yields_the_ndjson_records(tmp_path):
    cases = list(generate_cases(5, seed=11))
    inputs = [cases[0], json.dumps(cases[1]), b"{not json", [1], cases[2]]
    got = list(batch.evaluate_many(inputs, engine=ENGINE))
    assert [r["source"] for r in got] == [{"file": None, "line": i} for i in range(1, 6)]
    assert [r["kind"] for r in got] == ["result", "result", "error", "error", "result"]
    assert got[2]["error"]["type"] == "JSONDecodeError" and got[3]["error"]["type"] == "FactsError"
    src = tmp_path / "in.ndjson"
    src.write_text(json.dumps(cases[0]) + "\n")
    run([src], tmp_path / "o.ndjson", workers=0)
    (from_file,) = read_records(tmp_path / "o.ndjson")
    assert from_file["recommendation"] == got[0]["recommendation"]


def test_existing_results_are_not_overwritten_by_accident(tmp_path, capsys):
    src = tmp_path / "in.ndjson"
    write_ndjson(src, 3)
    out = tmp_path / "o.ndjson"
    run([src], out, workers=0)
    with pytest.raises(batch.BatchError, match="--resume"):
        run([src], out, workers=0)
    assert main(["batch", str(src), "--out", str(out), "--engine", ENGINE, "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["batch", str(src), "--out", str(out), "--engine", ENGINE, "--quiet", "--overwrite"]) == 0
    assert len(read_records(out)) == 3


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert main(["batch", str(tmp_path / "missing.ndjson"), "--out", str(tmp_path / "o.ndjson")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "x.csv").write_text("a,b\n")
    assert main(["batch", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o.ndjson")]) == 2
    assert main(["batch", str(tmp_path / "x.csv")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["batch", "summarize"]) == 2


def test_resume_after_a_partial_write(tmp_path):
    src = tmp_path / "in.ndjson"
    write_ndjson(src, 250, seed=5)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "bad.json").write_text("{")
    inputs = [src, tmp_path / "extra"]
    full = tmp_path / "full.ndjson"
    expected = run(inputs, full, chunk_size=10)
    data = full.read_bytes()

    out = tmp_path / "out.ndjson"
    for cut in (len(data) * 2 // 5, data.index(b"\n", len(data) // 2) + 1):  # mid-line, then on a line end
        out.write_bytes(data[:cut])
        summary = run(inputs, out, resume=True, chunk_size=10)
        assert out.read_bytes() == data  # same records, same order, nothing twice
        assert summary == expected
        assert batch.summary_path(out).read_text() == batch.summary_path(full).read_text()
    summary = run(inputs, out, resume=True)  # a finished file: nothing to do
    assert out.read_bytes() == data and summary == expected


def test_resume_refuses_a_damaged_or_foreign_file(tmp_path):
    src = tmp_path / "in.ndjson"
    write_ndjson(src, 20)
    out = tmp_path / "out.ndjson"
    run([src], out, workers=0)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + b"garbage\n" + b"".join(lines[6:]))
    with pytest.raises(batch.BatchError, match="line 6 is not a cds batch record"):
        run([src], out, resume=True, workers=0)
    out.write_bytes(b"".join(lines[:5] + lines[4:5]))
    with pytest.raises(batch.BatchError, match="more than once"):
        run([src], out, resume=True, workers=0)


def test_kill_then_resume_gives_one_record_per_case(tmp_path):
    src = tmp_path / "in.ndjson"
    n = 3000
    write_ndjson(src, n, seed=9)
    out = tmp_path / "out.ndjson"
    cmd = [sys.executable, "-m", "cds", "batch", str(src), "--out", str(out), "--engine", ENGINE,
           "--workers", "2", "--chunk-size", "16", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path)  # noqa: S603 - our own interpreter
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 100:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the batch finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = out.read_bytes()
    complete = partial[: partial.rfind(b"\n") + 1]
    assert 100 <= complete.count(b"\n") < n
    for line in complete.splitlines():
        json.loads(line)

    done = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True,  # noqa: S603
                          timeout=120)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert len(records) == n
    assert sorted(r["source"]["line"] for r in records) == list(range(1, n + 1))
    assert all(r["kind"] == "result" for r in records)
    assert out.read_bytes().startswith(complete)


@pytest.mark.skipif(not FORK, reason="patches the parent process and relies on fork")
def test_a_case_that_kills_its_worker_gets_an_error_record(tmp_path, monkeypatch):
    src = tmp_path / "in.ndjson"
    cases = write_ndjson(src, 60)
    victim = cases[25]["case_id"]
    real = batch._CaseRunner.record

    def record(self, raw, file, line, summary):
        if victim.encode() in raw:
            os._exit(3)
        return real(self, raw, file, line, summary)

    monkeypatch.setattr(batch._CaseRunner, "record", record)
    summary = run([src], tmp_path / "o.ndjson", chunk_size=8)
    records = read_records(tmp_path / "o.ndjson")
    assert [r["source"]["line"] for r in records] == list(range(1, 61))
    crashed = records[25]
    assert crashed["kind"] == "error" and crashed["case_id"] == victim
    assert crashed["error"]["type"] == "WorkerCrash" and "exit code 3" in crashed["error"]["message"]
    assert summary.error_types == Counter({"WorkerCrash": 1}) and summary.results == 59


@pytest.mark.skipif(not FORK, reason="patches the parent process and relies on fork")
def test_an_engine_error_is_recorded_and_the_worker_replaced(tmp_path, monkeypatch):
    src = tmp_path / "in.ndjson"
    cases = write_ndjson(src, 40)
    bad = {cases[3]["case_id"], cases[30]["case_id"]}
    real = cds.Evaluator.evaluate

    def evaluate(self, case):
        if case["case_id"] in bad:
            raise cds.EngineError(f"case {case['case_id']!r}: simulated disagreement")
        return attrs.evolve(real(self, case), care_step_detail=str(os.getpid()))  # which worker answered

    monkeypatch.setattr(cds.Evaluator, "evaluate", evaluate)
    run([src], tmp_path / "o.ndjson", workers=1, chunk_size=4)
    records = read_records(tmp_path / "o.ndjson")
    assert len(records) == 40
    errors = [r for r in records if r["kind"] == "error"]
    assert {r["case_id"] for r in errors} == bad and {r["error"]["type"] for r in errors} == {"EngineError"}
    pids = {r["recommendation"]["care_step_detail"] for r in records if r["kind"] == "result"}
    assert len(pids) == 3  # one worker until each engine error, then a fresh one


def test_fhir_bundles_need_a_reference_date(tmp_path):
    pytest.importorskip("cds.fhir")
    bundle = next((ROOT / "tests" / "fixtures" / "fhir" / "synthea-r4-bundles").glob("*.json"))
    without = run([bundle], tmp_path / "a.ndjson", workers=0)
    (record,) = read_records(tmp_path / "a.ndjson")
    assert without.error_types == Counter({"FhirError": 1}) and "--reference-date" in record["error"]["message"]
    import datetime as dt

    run([bundle], tmp_path / "b.ndjson", workers=0, reference_date=dt.date(2024, 5, 1))
    (record,) = read_records(tmp_path / "b.ndjson")
    assert record["kind"] == "result", record.get("error")


def test_dask_results_equal_the_local_results(tmp_path):
    pytest.importorskip("distributed")
    src = tmp_path / "in.ndjson"
    write_ndjson(src, 500, seed=2)
    with open(src, "a") as fh:
        fh.write("\n{bad json\n[]\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, case in enumerate(generate_cases(5, seed=4)):
        (folder / f"{i}.json").write_text(json.dumps(case))
    local = tmp_path / "local.ndjson"
    expected = run([src, folder], local)
    out = tmp_path / "dask.ndjson"
    summary = run([src, folder], out, dask="local", workers=2, partition_size=64)
    a, b = local.read_text().splitlines(), out.read_text().splitlines()
    assert sorted(b, key=sort_key) == sorted(a, key=sort_key)
    assert b == a  # parts are appended in input order, so even the order matches
    assert summary == expected and summary.errors == 2
    assert not (tmp_path / "dask.parts").exists()


@pytest.mark.slow
def test_large_batch_with_resume(tmp_path):
    src = tmp_path / "in.ndjson"
    n = 50_000
    write_ndjson(src, n, seed=13)
    out = tmp_path / "out.ndjson"
    run([src], out)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 3 + 17])
    summary = run([src], out, resume=True)
    assert out.read_bytes() == data and summary.records == n


def test_progress_bar_lines_or_silence(tmp_path, monkeypatch, capsys):
    import io

    src = tmp_path / "in.ndjson"
    write_ndjson(src, 40)
    bar = io.StringIO()
    run([src], tmp_path / "a.ndjson", workers=0, chunk_size=10, progress="bar", stream=bar)
    assert "\r[" in bar.getvalue() and "100.0%" in bar.getvalue() and "ETA" in bar.getvalue()
    monkeypatch.setattr(batch, "PROGRESS_LINE_SECONDS", 0)
    lines = io.StringIO()
    run([src], tmp_path / "b.ndjson", workers=0, chunk_size=10, progress="lines", stream=lines)
    assert "\r" not in lines.getvalue() and "cds batch: 40 cases, 100.0% of the input" in lines.getvalue()
    assert main(["batch", str(src), "--out", str(tmp_path / "c.ndjson"), "--engine", ENGINE, "--workers", "0",
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_a_folder_contributes_its_ndjson_files_too(tmp_path):
    """Nothing is silently skipped: NDJSON files inside a folder are read like top-level ones."""
    import json as _json

    from cds.batch import run

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    one = {"case_id": "j1", "context": {"region": "back"}}
    (folder / "a.json").write_text(_json.dumps(one))
    (folder / "sub" / "b.ndjson").write_text("\n".join(_json.dumps(dict(one, case_id=f"n{i}")) for i in range(3)))
    (folder / "c.jsonl").write_text(_json.dumps(dict(one, case_id="l1")) + "\n")
    (folder / "notes.txt").write_text("not a case file")
    out = tmp_path / "results.ndjson"
    run([folder], out, workers=0, engine="reference")
    ids = sorted(_json.loads(line)["case_id"] for line in out.read_text().splitlines())
    assert ids == ["j1", "l1", "n0", "n1", "n2"]
