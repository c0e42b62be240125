"""Batch evaluation of case files: ``cds batch`` and the :func:`run` / :func:`evaluate_many` API.

Inputs
    Folders (every ``*.json``, ``*.ndjson`` and ``*.jsonl`` below them, recursively, in sorted path
    order), ``*.json`` files (one
    case each) and ``*.ndjson`` / ``*.jsonl`` files (one case per line), in the order given. Blank lines
    are not cases and yield no record, but every physical line is counted, so ``source.line`` is the
    line an editor shows. A case whose ``resourceType`` is ``"Bundle"`` is a FHIR R4 Bundle and goes
    through ``cds.fhir.facts_from_bundle`` (with ``--reference-date``) when that module is installed.

Output
    NDJSON, exactly one record per input case, each one line of key-sorted JSON::

        {"case_id": ..., "kind": "result", "recommendation": {...}, "source": {"file": ..., "line": N}}
        {"case_id": ..., "error": {"message", "problems": [{"path", "message"}], "type"}, "kind": "error",
         "source": {...}}

    ``source.file`` is the path as given on the command line (joined with the path inside a folder);
    ``source.line`` is null for a ``*.json`` file. An unreadable line, a case that breaks the facts
    contract, an engine failure, even a worker process that dies: each becomes an error record,
    never a crash or a silent skip. Error records carry no case data beyond the case id (FactsError
    problems name paths, JSON errors give line and column only, unexpected exceptions only their type).
    Records are in input order (``--order case-id`` sorts the finished file by case id, then source).
    A summary (counts by care step, urgency, status, red flag, weak flag, error type) is written
    beside the results as ``RESULTS.summary.json``; ``cds batch summarize RESULTS`` rebuilds it.

Crash safety
    Only the main process writes the results, whole lines at a time, and fsyncs every few seconds.
    A kill at any moment leaves a file whose complete lines are all valid records (the last line may
    be cut short). ``--resume`` truncates such a partial line, skips the (file, line) keys already
    done and appends the rest: no duplicates, no gaps. Give it the same INPUT arguments.

Parallelism
    Local worker processes (fork on Linux) each compile the ruleset once and evaluate chunks of
    cases read straight from the input files; the main process puts their output back in input
    order. A worker that hits an engine error finishes its chunk and is replaced (the engine's C
    state is not trusted after an error); a worker that dies has its chunk retried case by case,
    and a case that kills a worker twice gets a ``WorkerCrash`` error record. With ``--dask``
    (extra ``cds[dask]``) each partition is evaluated on a Dask worker (which compiles the ruleset
    once, and again after an engine error), written to ``RESULTS.parts/part-NNNNN.ndjson`` and
    appended to the results by the client in input order; only counts travel back. Inputs, output
    and the rulesets folder must be on a filesystem the workers see at the same paths.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from cds.errors import CdsError, EngineError, FactsError, RulesetError
from cds.facts import MAX_CASE_ID


def _optional_orjson_loads() -> Callable[[bytes], Any]:
    # results files are re-read on --resume and by summarize; orjson (not a dependency) parses them faster
    try:
        import orjson
    except ImportError:  # pragma: no cover
        return json.loads
    return orjson.loads  # type: ignore[no-any-return]


_loads_fast: Callable[[bytes], Any] = _optional_orjson_loads()

NDJSON_SUFFIXES = (".ndjson", ".jsonl")
CHUNK_SIZE = 64  # cases per task sent to a local worker: about 40 ms of work, so workers rarely idle
PARTITION_SIZE = 10_000  # cases per Dask partition (one part file each)
FSYNC_SECONDS = 2.0
TASKS_PER_WORKER = 2  # tasks queued per local worker (task messages are small, so sends never block)
PROGRESS_LINE_SECONDS = 5.0
ORDERS = ("input", "case-id")
_WITHHELD = "details withheld (they may contain case data)"


class BatchError(CdsError, ValueError):
    """A batch cannot start or continue: a bad input or option, or an output that is not safe to extend."""


# --------------------------------------------------------------------------------------------- records

def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _source(file: str | None, line: int | None) -> str:
    return '{"file":' + _dumps(file) + ',"line":' + _dumps(line) + "}"


def _result_line(file: str | None, line: int | None, case_id: str, recommendation_json: str) -> str:
    # Keys in sorted order, as json.dumps(sort_keys=True) would give, without re-encoding the
    # recommendation (already key-sorted and byte-stable).
    return ('{"case_id":' + _dumps(case_id) + ',"kind":"result","recommendation":' + recommendation_json
            + ',"source":' + _source(file, line) + "}")


def _error_line(file: str | None, line: int | None, case_id: str | None, error_type: str, message: str,
                problems: Iterable[tuple[str, str]] = ()) -> str:
    record: dict[str, Any] = {
        "kind": "error", "source": {"file": file, "line": line},
        "error": {"type": error_type, "message": message,
                  "problems": [{"path": p, "message": m} for p, m in problems]},
    }
    if case_id is not None:
        record["case_id"] = case_id
    return _dumps(record)


def _encode(line: str) -> bytes:
    try:
        return line.encode("utf-8") + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (from a JSON \ud800 escape or a file name): escape it
        return json.dumps(json.loads(line), sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"


class _BadInput(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def _load_case(raw: bytes, whole_file: bool) -> Any:
    """Parse one case's bytes; errors say where (line/column), never what."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadInput("UnicodeDecodeError", f"not UTF-8 text (byte {exc.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}" if whole_file else f"column {exc.colno}"
        raise _BadInput("JSONDecodeError", f"not valid JSON ({where}: {exc.msg})") from None
    except RecursionError:
        raise _BadInput("JSONDecodeError", "not valid JSON (nested too deeply)") from None


def _readable_case_id(case: Any) -> str | None:
    cid = case.get("case_id") if isinstance(case, dict) else getattr(case, "case_id", None)
    return cid if isinstance(cid, str) and 0 < len(cid) <= MAX_CASE_ID else None


# An item is one case: (path to read, name shown in records, line or None for a whole file, start, end).
Item = tuple[str, str, "int | None", int, int]


@attrs.frozen
class _Task:
    items: tuple[Item, ...]
    nbytes: int  # input bytes this task accounts for (progress), blank and already-done lines included
    skipped: int = 0  # of which already done (--resume): excluded from the rate

    def singles(self) -> list[_Task]:
        """One task per case; the first carries the byte counts."""
        return [_Task((item,), self.nbytes, self.skipped) if i == 0 else _Task((item,), 0)
                for i, item in enumerate(self.items)]


class _ItemReader:
    """Reads cases from input files; keeps the current NDJSON file open across a task's items."""

    def __init__(self) -> None:
        self._path: str | None = None
        self._fh: IO[bytes] | None = None

    def read(self, item: Item) -> bytes:
        path, _name, line, start, end = item
        if line is None:
            with open(path, "rb") as fh:
                return fh.read()
        if path != self._path or self._fh is None:
            self.close()
            self._fh = open(path, "rb", buffering=0)  # kept open across a task's items
            self._path = path
        self._fh.seek(start)
        return self._fh.read(end - start)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._path = None, None


@attrs.frozen
class _Config:
    """What every worker needs to build the same evaluator (picklable, hashable)."""

    ruleset: str
    version: str | None
    engine: str
    cross_check: bool
    rulesets_dir: str | None = None
    reference_date: dt.date | None = None

    def evaluator(self) -> Any:
        from cds.evaluator import Evaluator
        from cds.rulesets import Registry

        # A registry of its own: a rebuilt evaluator (after an engine error) must not reuse a cached,
        # possibly broken, network.
        try:
            return Evaluator(self.ruleset, self.version, engine=self.engine, cross_check=self.cross_check,
                             registry=Registry(self.rulesets_dir))
        except ImportError as exc:
            raise EngineError(f"the {self.engine} engine cannot be loaded ({exc}); "
                              "use --engine reference until it is installed") from None


class _CaseRunner:
    """One process's evaluator: turns a case (bytes or object) into one NDJSON record line."""

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.evaluator = config.evaluator()
        self.broken = False  # set after an engine error: this process's engine is no longer trusted

    def record(self, raw: Any, file: str | None, line: int | None, summary: Summary) -> str:
        case_id = None
        try:
            case = _load_case(raw, line is None) if isinstance(raw, bytes) else raw
            case_id = _readable_case_id(case)
            if isinstance(case, dict) and case.get("resourceType") == "Bundle":
                case = self._facts_from_bundle(case)
                case_id = _readable_case_id(case)
            rec = self.evaluator.evaluate(case)
            text = _result_line(file, line, rec.case_id, rec.to_json())
        except _BadInput as bad:
            summary.add_error(bad.error_type)
            return _error_line(file, line, case_id, bad.error_type, bad.message)
        except FactsError as exc:
            summary.add_error("FactsError")
            problems = [(p.path, p.message) for p in exc.problems]
            return _error_line(file, line, exc.case_id or case_id, "FactsError",
                               f"{len(problems)} problem(s) in the case facts", problems)
        except CdsError as exc:  # EngineError, RulesetError: their messages hold ids only
            self.broken = self.broken or isinstance(exc, EngineError)
            name = type(exc).__name__
            summary.add_error(name)
            return _error_line(file, line, case_id, name, str(exc),
                               [(p.path, p.message) for p in getattr(exc, "problems", ())])
        except Exception as exc:  # noqa: BLE001 - one bad case must not end the batch
            self.broken = True
            name = type(exc).__name__
            summary.add_error(name)
            return _error_line(file, line, case_id, name, f"unexpected error while evaluating the case; {_WITHHELD}")
        summary.add_recommendation(rec)
        return text

    def _facts_from_bundle(self, bundle: dict[str, Any]) -> dict[str, Any]:
        try:
            from cds.fhir import facts_from_bundle
        except ImportError:
            raise _BadInput("FhirError", "a FHIR Bundle needs cds.fhir, which this installation lacks") from None
        if self.config.reference_date is None:  # ages and durations must not depend on the day of the run
            raise _BadInput("FhirError", "a FHIR Bundle needs --reference-date (the date it is read as of)")
        try:
            return facts_from_bundle(bundle, reference_date=self.config.reference_date).case
        except ValueError:
            raise _BadInput("FhirError", f"the FHIR Bundle could not be read; {_WITHHELD}") from None

    def lines(self, items: Iterable[Item], summary: Summary) -> Iterator[bytes]:
        reader = _ItemReader()
        try:
            for item in items:
                _path, name, line, _start, _end = item
                try:
                    raw = reader.read(item)
                except OSError as exc:
                    summary.add_error("OSError")
                    yield _encode(_error_line(name, line, None, "OSError",
                                              f"cannot read the input ({exc.strerror or type(exc).__name__})"))
                    continue
                yield _encode(self.record(raw, name, line, summary))
        finally:
            reader.close()


def _crash_line(item: Item, exitcode: int | None, summary: Summary) -> bytes:
    """The error record for a case that killed a worker process twice."""
    _path, name, line, _start, _end = item
    case_id = None
    reader = _ItemReader()
    try:
        case_id = _readable_case_id(_load_case(reader.read(item), line is None))
    except (OSError, _BadInput):
        pass
    finally:
        reader.close()
    how = "" if exitcode is None else f" (signal {-exitcode})" if exitcode < 0 else f" (exit code {exitcode})"
    summary.add_error("WorkerCrash")
    return _encode(_error_line(name, line, case_id, "WorkerCrash",
                               f"the worker process died{how} while evaluating this case, twice; no result"))


def evaluate_many(cases: Iterable[Any], ruleset: str = "back-hip-pain", version: str | None = None,
                  engine: str = "durable-rules", *, cross_check: bool = True, rulesets_dir: str | None = None,
                  reference_date: dt.date | None = None) -> Iterator[dict[str, Any]]:
    """Evaluate cases in this process; yield one result or error record per case, as in the NDJSON.

    A case is a dict, or JSON text (str or bytes). ``source`` is ``{"file": null, "line": N}``, N
    counting cases from 1. Bad cases give error records; nothing is raised for them.
    """
    runner = _CaseRunner(_Config(ruleset, version, engine, cross_check, rulesets_dir, reference_date))
    scratch = Summary()
    for n, case in enumerate(cases, 1):
        raw = case.encode("utf-8", "surrogatepass") if isinstance(case, str) else case
        yield json.loads(runner.record(raw, None, n, scratch))


# ---------------------------------------------------------------------------------------------- summary

_RESULT_FIELDS = ("care_step", "urgency", "status", "red_flags", "weak_flags", "rulesets")


@attrs.define
class Summary:
    """Counts over a results file: records, results, errors; care steps, urgencies, statuses, red and
    weak flags (a case may count under several), error types, ruleset versions."""

    records: int = 0
    results: int = 0
    errors: int = 0
    cases_with_red_flags: int = 0
    cases_with_weak_flags: int = 0
    care_step: Counter[str] = attrs.field(factory=Counter)
    urgency: Counter[str] = attrs.field(factory=Counter)
    status: Counter[str] = attrs.field(factory=Counter)
    red_flags: Counter[str] = attrs.field(factory=Counter)
    weak_flags: Counter[str] = attrs.field(factory=Counter)
    error_types: Counter[str] = attrs.field(factory=Counter)
    rulesets: Counter[str] = attrs.field(factory=Counter)

    def _add_result(self, care_step: str, urgency: str, status: str, red: Sequence[str], weak: Sequence[str],
                    ruleset: str) -> None:
        self.records += 1
        self.results += 1
        self.care_step[care_step] += 1
        self.urgency[urgency] += 1
        self.status[status] += 1
        self.red_flags.update(red)
        self.weak_flags.update(weak)
        self.cases_with_red_flags += bool(red)
        self.cases_with_weak_flags += bool(weak)
        self.rulesets[ruleset] += 1

    def add_recommendation(self, rec: Any) -> None:
        p = rec.provenance
        self._add_result(rec.care_step.value, rec.urgency.value, rec.status.value, [f.id for f in rec.red_flags],
                         [w.id for w in rec.weak_flags], f"{p['ruleset_id']}@{p['ruleset_version']}")

    def add_error(self, error_type: str) -> None:
        self.records += 1
        self.errors += 1
        self.error_types[error_type] += 1

    def add_record(self, record: Mapping[str, Any]) -> None:
        """Count one parsed NDJSON record (what :meth:`add_recommendation`/:meth:`add_error` counted)."""
        if record.get("kind") == "result":
            r = record["recommendation"]
            p = r["provenance"]
            self._add_result(r["care_step"], r["urgency"], r["status"], [f["id"] for f in r["red_flags"]],
                             [w["id"] for w in r["weak_flags"]], f"{p['ruleset_id']}@{p['ruleset_version']}")
        else:
            self.add_error(record["error"]["type"])

    def merge(self, other: Summary) -> None:
        for name in ("records", "results", "errors", "cases_with_red_flags", "cases_with_weak_flags"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in _RESULT_FIELDS + ("error_types",):
            getattr(self, name).update(getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        return {name: dict(sorted(v.items())) if isinstance(v, Counter) else v
                for name, v in attrs.asdict(self, recurse=False).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        return cls(**{k: Counter(v) if isinstance(v, dict) else v for k, v in data.items()})  # type: ignore[arg-type]

    def to_json(self) -> str:
        """Key-sorted, no clocks: a rebuilt summary of the same file has the same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"

    def sections(self) -> list[tuple[str, list[tuple[str, int]], int]]:
        """(title, [(label, count)], denominator) per distribution, in display order."""
        from cds.pathway import CareStep, Status, Urgency

        def ordered(counts: Counter[str], enum: Any) -> list[tuple[str, int]]:
            known = [m.value for m in enum]
            return [(k, counts[k]) for k in known if counts[k]] + sorted(
                ((k, n) for k, n in counts.items() if k not in known), key=lambda kv: (-kv[1], kv[0]))

        def by_count(counts: Counter[str]) -> list[tuple[str, int]]:
            return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

        return [
            ("care step", ordered(self.care_step, CareStep), self.results),
            ("urgency", ordered(self.urgency, Urgency), self.results),
            ("status", ordered(self.status, Status), self.results),
            (f"red flags ({self.cases_with_red_flags:,} cases with any)", by_count(self.red_flags), self.results),
            (f"weak flags ({self.cases_with_weak_flags:,} cases with any)", by_count(self.weak_flags), self.results),
            ("errors by type", by_count(self.error_types), self.records),
            ("ruleset", by_count(self.rulesets), self.results),
        ]

    def table(self) -> str:
        out = [f"{self.records:,} records: {self.results:,} results, {self.errors:,} errors"]
        for title, rows, total in self.sections():
            if not rows:
                continue
            out.append(f"{title:<52} {'count':>9} {'%':>6}")
            out += [f"  {label:<50} {n:>9,} {100 * n / max(total, 1):>6.1f}" for label, n in rows]
        return "\n".join(out)


def summary_path(out: str | os.PathLike[str]) -> Path:
    """``results.ndjson`` -> ``results.summary.json`` (beside the results)."""
    return _sibling(out, ".summary.json")


def _sibling(out: str | os.PathLike[str], suffix: str) -> Path:
    p = Path(out)
    stem = p.name[: -len(p.suffix)] if p.suffix.lower() in NDJSON_SUFFIXES else p.name
    return p.with_name(stem + suffix)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _scan_results(path: str | os.PathLike[str], on_record: Callable[[dict[str, Any]], None]) -> tuple[int, int]:
    """Feed every complete line of a results file to ``on_record``.

    Returns (bytes in complete lines, bytes in a trailing partial line). A complete line that is not
    a JSON record means the file was not written by cds batch (or was damaged): BatchError.
    """
    good = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.endswith(b"\n"):
                return good, len(raw)
            try:
                record = _loads_fast(raw)
                if not isinstance(record, dict) or record.get("kind") not in ("result", "error"):
                    raise ValueError
            except (ValueError, TypeError):
                raise BatchError(f"{path}: line {n} is not a cds batch record; not touching this file") from None
            on_record(record)
            good += len(raw)
    return good, 0


def summarize(results: str | os.PathLike[str]) -> Summary:
    """Rebuild the summary of a results file (a trailing partial line is ignored)."""
    summary = Summary()
    _scan_results(results, summary.add_record)
    return summary


# ------------------------------------------------------------------------------------------ HTML report

_PALETTE = {"care step": "#2b6cb0", "urgency": "#c05621", "status": "#2f855a", "red flags": "#c53030",
            "weak flags": "#b7791f", "errors by type": "#6b46c1", "ruleset": "#4a5568"}


def _svg_bars(rows: list[tuple[str, int]], total: int, color: str) -> str:
    label_w, bar_w, row_h, num_w = 300, 360, 24, 130
    width, height = label_w + bar_w + num_w, row_h * len(rows) + 8
    top = max(n for _, n in rows)
    parts = [f'<svg width="{width}" height="{height}" role="img" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">']
    for i, (label, n) in enumerate(rows):
        y = 4 + i * row_h
        w = max(1, round(bar_w * n / top))
        esc = html.escape(label)
        parts.append(f'<text x="{label_w - 8}" y="{y + 16}" text-anchor="end">{esc}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w}" height="{row_h - 6}" fill="{color}">'
                     f'<title>{esc}: {n:,}</title></rect>'
                     f'<text x="{label_w + w + 6}" y="{y + 16}">{n:,} ({100 * n / max(total, 1):.1f}%)</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(summary: Summary, title: str = "cds batch report") -> str:
    """A self-contained report: inline CSS and SVG, no scripts, no links, aggregate counts only."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>",
            '<table class="totals"><tr><th>records</th><th>results</th><th>errors</th>'
            "<th>cases with red flags</th><th>cases with weak flags</th></tr>"
            f"<tr><td>{summary.records:,}</td><td>{summary.results:,}</td><td>{summary.errors:,}</td>"
            f"<td>{summary.cases_with_red_flags:,}</td><td>{summary.cases_with_weak_flags:,}</td></tr></table>"]
    for heading, rows, total in summary.sections():
        body.append(f"<h2>{esc(heading)}</h2>")
        color = next((c for k, c in _PALETTE.items() if heading.startswith(k)), "#4a5568")
        body.append(_svg_bars(rows, total, color) if rows else '<p class="none">none</p>')
    style = ("body{font-family:sans-serif;margin:2em;color:#1a202c}h2{font-size:1.05em;margin-top:1.6em}"
             "table.totals{border-collapse:collapse}table.totals td,table.totals th{border:1px solid #cbd5e0;"
             "padding:.3em .8em;text-align:right}p.none{color:#718096}")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ inputs

@attrs.frozen
class _InputFile:
    path: str  # absolute: what workers open
    name: str  # what records show
    ndjson: bool
    size: int


def _expand_inputs(inputs: Sequence[str | os.PathLike[str]], exclude: Callable[[str], bool]) -> list[_InputFile]:
    files: list[_InputFile] = []
    seen: set[str] = set()

    def add(name: str, ndjson: bool) -> None:
        path = os.path.abspath(name)
        if path in seen:
            raise BatchError(f"{name}: given more than once")
        seen.add(path)
        if ndjson:  # its cases cannot even be counted if it cannot be read (a *.json gets an error record)
            try:
                open(path, "rb").close()
            except OSError as exc:
                raise BatchError(f"{name}: cannot be read ({exc.strerror})") from None
        files.append(_InputFile(path, name, ndjson, os.path.getsize(path)))

    def unreadable_folder(exc: OSError) -> None:
        raise BatchError(f"{exc.filename}: cannot be listed ({exc.strerror}); its cases would be missed")

    for given in inputs:
        top = os.path.normpath(os.fspath(given))
        if os.path.isdir(top):
            found = []
            for root, dirs, names in os.walk(top, onerror=unreadable_folder):
                dirs.sort()
                # every case file in the folder: a folder holding NDJSON must not lose its cases silently
                found += [os.path.join(root, n) for n in names if n.lower().endswith((".json", *NDJSON_SUFFIXES))
                          and not exclude(os.path.abspath(os.path.join(root, n)))]
            for name in sorted(found, key=lambda s: Path(s).parts):
                add(name, Path(name).suffix.lower() in NDJSON_SUFFIXES)
        elif os.path.isfile(top):
            suffix = Path(top).suffix.lower()
            if suffix not in NDJSON_SUFFIXES + (".json",):
                raise BatchError(f"{given}: expected a folder, a .json file or an .ndjson/.jsonl file")
            if exclude(os.path.abspath(top)):
                raise BatchError(f"{given}: is this batch's own output")
            add(top, suffix != ".json")
        else:
            raise BatchError(f"{given}: no such file or folder")
    return files


def _ndjson_lines(path: str) -> Iterator[tuple[int, int, int, bool]]:
    """(line number, start, end, non-blank) for every line, without holding a line in memory."""
    with open(path, "rb") as fh:
        base = start = line_no = 0
        nonblank = False
        while block := fh.read(1 << 20):
            pos = 0
            while True:
                nl = block.find(b"\n", pos)
                stop = len(block) if nl < 0 else nl
                if not nonblank and pos < stop and block[pos:stop].strip():
                    nonblank = True
                if nl < 0:
                    break
                line_no += 1
                yield line_no, start, base + nl, nonblank
                start, nonblank, pos = base + nl + 1, False, nl + 1
            base += len(block)
        if start < base:
            yield line_no + 1, start, base, nonblank


def _plan(files: Sequence[_InputFile], done: Mapping[str, set[int | None]], chunk_size: int,
          matched: list[int]) -> Iterator[_Task]:
    """Tasks of up to ``chunk_size`` cases not yet done, in input order. ``matched[0]`` counts done keys met."""
    items: list[Item] = []
    nbytes = skipped = 0
    for f in files:
        skip = done.get(f.name, ())
        if not f.ndjson:
            nbytes += f.size
            if None in skip:
                matched[0] += 1
                skipped += f.size
            else:
                items.append((f.path, f.name, None, 0, f.size))
            if len(items) >= chunk_size:
                yield _Task(tuple(items), nbytes, skipped)
                items, nbytes, skipped = [], 0, 0
            continue
        last = 0
        for line, start, end, nonblank in _ndjson_lines(f.path):
            if not nonblank:
                continue
            if line in skip:
                matched[0] += 1
                skipped += end - start + 1
                continue
            items.append((f.path, f.name, line, start, end))
            if len(items) >= chunk_size:
                yield _Task(tuple(items), nbytes + end - last, skipped)
                items, nbytes, skipped, last = [], 0, 0, end
        nbytes += f.size - last
    if items:
        yield _Task(tuple(items), nbytes, skipped)


# ------------------------------------------------------------------------------------------------ output

class _Output:
    """The results file: appended by this process only, whole lines per write, fsynced every few seconds."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            pass
        except BlockingIOError:
            os.close(self.fd)
            raise BatchError(f"{self.path}: another cds batch is writing this file") from None
        self._synced = time.monotonic()

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        if time.monotonic() - self._synced > FSYNC_SECONDS:
            self.sync()

    def append_file(self, path: str) -> None:
        with open(path, "rb") as fh:
            while lines := fh.readlines(1 << 20):  # line-aligned blocks
                self.write(b"".join(lines))

    def sync(self) -> None:
        os.fsync(self.fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1


def _sort_by_case_id(path: str) -> None:
    """Rewrite a finished results file sorted by (case id, source file, source line); atomic."""
    index: list[tuple[str, str, int, int, int]] = []
    names: dict[str, str] = {}
    decoder = json.JSONDecoder()
    with open(path, "rb") as fh:
        offset = 0
        for raw in fh:
            text = raw.decode("utf-8")
            # Records are key-sorted, so "case_id" comes first and "source" last.
            case_id = decoder.raw_decode(text, 11)[0] if text.startswith('{"case_id":') else ""
            source = json.loads(text[text.rindex(',"source":') + 10:].rstrip()[:-1])
            file = source["file"] or ""
            index.append((case_id, names.setdefault(file, file), source["line"] or 0, offset, len(raw)))
            offset += len(raw)
    index.sort()
    tmp = path + ".sorting"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(path, "rb") as src, open(fd, "wb", buffering=1 << 20, closefd=False) as dst:
            for *_key, offset, length in index:
                src.seek(offset)
                dst.write(src.read(length))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- progress

class _Progress:
    """A bar with rate and ETA on a terminal, a line every few seconds otherwise, nothing when off."""

    def __init__(self, mode: str, total_bytes: int, stream: IO[str]) -> None:
        self.mode, self.total, self.stream = mode, max(total_bytes, 1), stream
        self.cases = self.nbytes = self.skipped = 0
        self.started = self._last = time.monotonic()

    def advance(self, task: _Task) -> None:
        self.cases += len(task.items)
        self.nbytes += task.nbytes
        self.skipped += task.skipped
        self.tick()

    def _eta(self) -> tuple[float, str]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.cases / elapsed
        new = self.nbytes - self.skipped
        if new <= 0:
            return rate, "?"
        left = (self.total - self.nbytes) * elapsed / new
        return rate, _hms(max(left, 0))

    def tick(self, force: bool = False) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        every = 0.2 if self.mode == "bar" else PROGRESS_LINE_SECONDS
        if not force and now - self._last < every:
            return
        self._last = now
        frac = min(self.nbytes / self.total, 1.0)
        rate, eta = self._eta()
        if self.mode == "bar":
            filled = int(30 * frac)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * frac:5.1f}%  {self.cases:,} cases  "
                              f"{rate:,.0f}/s  ETA {eta}   ")
        else:
            self.stream.write(f"cds batch: {self.cases:,} cases, {100 * frac:.1f}% of the input, "
                              f"{rate:,.0f} cases/s, ETA {eta}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.mode == "bar":
            self.nbytes = self.total
            self.tick(force=True)
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------- ordered commits

@attrs.define
class _Split:
    parts: list[Any]
    remaining: int


class _Ledger:
    """Numbers units of work and commits their output strictly in input order.

    A unit whose worker died is split into one unit per case (ids ``(n, i)``); the unit commits
    when all its pieces are in.
    """

    def __init__(self, commit: Callable[[Any], None]) -> None:
        self._commit = commit
        self._next = 0
        self._count = 0
        self._ready: dict[int, Any] = {}
        self._splits: dict[int, _Split] = {}

    def new(self) -> int:
        self._count += 1
        return self._count - 1

    def split(self, uid: int, pieces: int) -> list[tuple[int, int]]:
        self._splits[uid] = _Split([None] * pieces, pieces)
        return [(uid, i) for i in range(pieces)]

    @property
    def waiting(self) -> int:
        return len(self._ready)

    def finish(self, uid: int | tuple[int, int], payload: Any) -> None:
        if isinstance(uid, tuple):
            top, i = uid
            split = self._splits[top]
            split.parts[i] = payload
            split.remaining -= 1
            if split.remaining:
                return
            del self._splits[top]
            self._ready[top] = split.parts
        else:
            self._ready[uid] = [payload]
        while self._next in self._ready:
            for part in self._ready.pop(self._next):
                self._commit(part)
            self._next += 1


# ------------------------------------------------------------------------------------ local workers

def _exit_with_parent() -> None:
    """Linux: have the kernel kill this worker when the main process dies (SIGKILL included)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the pipe and ppid checks remain
        pass


def _worker_main(conn: Any, config: _Config, parent_pid: int, close_fds: Sequence[int]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops workers
    if sys.platform.startswith("linux"):
        _exit_with_parent()
    # Inherited by fork: the results file (its lock must die with the main process) and the main
    # process's ends of every worker's pipe (while any copy is open, a dead main process goes
    # unnoticed and a send to it blocks for ever).
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if os.getppid() != parent_pid:
        return
    try:
        runner = _CaseRunner(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the main process, which stops the run
        message = str(exc) if isinstance(exc, CdsError) else _WITHHELD
        conn.send(("init-failed", type(exc).__name__, message))
        return
    conn.send(("ready",))
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent_pid:  # the main process is gone (killed): stop
                return
            continue
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        uid, task = message
        summary = Summary()
        blob = b"".join(runner.lines(task.items, summary))
        try:
            conn.send(("done", uid, blob, summary, runner.broken))
        except OSError:  # the main process is gone
            return
        if runner.broken:  # an engine error: let the main process start a fresh worker
            return


@attrs.define(eq=False)  # identity: workers are looked up in the pool's list
class _Worker:
    process: Any
    conn: Any
    inflight: deque[tuple[Any, _Task, int]] = attrs.field(factory=deque)
    ready: bool = False
    retiring: bool = False


def _init_failure(kind: str, message: str) -> CdsError:
    return (RulesetError if kind == "RulesetError" else EngineError)(
        f"a worker could not build the evaluator ({kind}): {message}")


class _LocalPool:
    def __init__(self, n: int, config: _Config, close_fds: Sequence[int]) -> None:
        fork = sys.platform.startswith("linux")
        self.ctx: Any = multiprocessing.get_context("fork" if fork else "spawn")
        self.config = config
        self.fork = fork
        self.close_fds = list(close_fds)
        self.workers: list[_Worker] = []
        for _ in range(n):
            self.workers.append(self._start())
        self.failed_starts = 0

    def _start(self) -> _Worker:
        parent, child = self.ctx.Pipe()
        # Under spawn the child inherits nothing, and these numbers would mean other files there.
        inherited = self.close_fds + [parent.fileno()] + [w.conn.fileno() for w in self.workers] if self.fork else []
        proc = self.ctx.Process(target=_worker_main, args=(child, self.config, os.getpid(), inherited),
                                daemon=True, name="cds-batch-worker")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def replace(self, worker: _Worker) -> None:
        worker.process.join(timeout=5)
        worker.conn.close()
        self.failed_starts = 0 if worker.ready else self.failed_starts + 1
        if self.failed_starts >= 3:
            raise EngineError(f"worker processes keep dying while starting (exit code {worker.process.exitcode})")
        i = self.workers.index(worker)
        del self.workers[i]
        self.workers.insert(i, self._start())

    def close(self) -> None:
        for w in self.workers:
            try:
                if w.process.is_alive():
                    w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.terminate()
                w.process.join()
            w.conn.close()


def _run_local(tasks: Iterator[_Task], workers: int, config: _Config, output: _Output, summary: Summary,
               progress: _Progress) -> None:
    from multiprocessing.connection import wait

    ledger = _Ledger(output.write)
    queue: deque[tuple[Any, _Task, int]] = deque()  # retries, before new tasks
    exhausted = False
    pool = _LocalPool(workers, config, [output.fd])
    limit = 4 * workers + 4  # finished-but-waiting plus in-flight: bounds memory when one task is slow
    try:
        while True:
            for w in pool.workers:
                while not w.retiring and len(w.inflight) < TASKS_PER_WORKER:
                    if not queue:
                        if exhausted or ledger.waiting + sum(len(x.inflight) for x in pool.workers) >= limit:
                            break
                        task = next(tasks, None)
                        if task is None:
                            exhausted = True
                            break
                        queue.append((ledger.new(), task, 0))
                    uid, task, attempt = queue.popleft()
                    w.inflight.append((uid, task, attempt))
                    try:
                        w.conn.send((uid, task))
                    except OSError:  # it died: its sentinel fires and _recover retries what it held
                        break
            if exhausted and not queue and not any(w.inflight for w in pool.workers):
                return
            conns = {w.conn: w for w in pool.workers}
            sentinels = {w.process.sentinel: w for w in pool.workers}
            for ready in wait(list(conns) + list(sentinels), timeout=0.5):
                w = conns.get(ready) or sentinels[ready]
                if w not in pool.workers:
                    continue
                _drain(w, ledger, summary, progress)
                if not w.process.is_alive():
                    _drain(w, ledger, summary, progress)
                    _recover(w, pool, ledger, queue, summary, progress)
            progress.tick()
    finally:
        pool.close()


def _drain(w: _Worker, ledger: _Ledger, summary: Summary, progress: _Progress) -> None:
    try:
        while w.conn.poll():
            message = w.conn.recv()
            if message[0] == "ready":
                w.ready = True
            elif message[0] == "init-failed":
                raise _init_failure(message[1], message[2])
            else:
                _, uid, blob, part_summary, broken = message
                done_uid, task, _attempt = w.inflight.popleft()
                assert done_uid == uid
                ledger.finish(uid, blob)
                summary.merge(part_summary)
                progress.advance(task)
                w.retiring = w.retiring or broken
    except (EOFError, OSError):
        pass


def _recover(w: _Worker, pool: _LocalPool, ledger: _Ledger, queue: deque[tuple[Any, _Task, int]],
             summary: Summary, progress: _Progress) -> None:
    """A worker ended: retry what it held (case by case for the task it was running), then replace it."""
    if w.retiring:  # it stopped on purpose after an engine error; what it still held never started
        queue.extendleft(reversed(w.inflight))
        w.inflight.clear()
    if w.inflight:
        uid, task, attempt = w.inflight.popleft()  # the one it was running: workers take tasks in order
        retry = _after_crash(uid, task, attempt, w.process.exitcode, ledger, summary, progress) + list(w.inflight)
        queue.extendleft(reversed(retry))
        w.inflight.clear()
    pool.replace(w)


def _after_crash(uid: Any, task: _Task, attempt: int, exitcode: int | None, ledger: _Ledger, summary: Summary,
                 progress: _Progress) -> list[tuple[Any, _Task, int]]:
    """The unit a dying worker was running: retry it case by case; a case that kills twice gets a record."""
    if len(task.items) > 1:
        return list(zip(ledger.split(uid, len(task.items)), task.singles(), [1] * len(task.items), strict=True))
    if not attempt:
        return [(uid, task, 1)]
    ledger.finish(uid, _crash_line(task.items[0], exitcode, summary))
    progress.advance(task)
    return []


def _run_inline(tasks: Iterator[_Task], config: _Config, output: _Output, summary: Summary,
                progress: _Progress) -> None:
    runner = _CaseRunner(config)
    for task in tasks:
        output.write(b"".join(runner.lines(task.items, summary)))
        progress.advance(task)
        if runner.broken:
            runner = _CaseRunner(config)


# --------------------------------------------------------------------------------------------------- Dask

# Dask worker processes keep one evaluator per configuration, so each compiles the ruleset once; the
# lock serialises evaluation in a worker that runs several threads (the engine is not thread-safe).
_DASK_RUNNERS: dict[_Config, _CaseRunner] = {}
_DASK_LOCK = threading.Lock()


def _dask_partition(items: tuple[Item, ...], config: _Config, part: str) -> Summary:
    """Evaluate one partition on a Dask worker into its part file; return only the counts."""
    with _DASK_LOCK:
        runner = _DASK_RUNNERS.get(config)
        if runner is None:
            runner = _DASK_RUNNERS[config] = _CaseRunner(config)
        summary = Summary()
        tmp = part + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb", buffering=1 << 20) as fh:
            for line in runner.lines(items, summary):
                fh.write(line)
        os.replace(tmp, part)
        if runner.broken:  # do not reuse an engine after an engine error
            del _DASK_RUNNERS[config]
        return summary


def _partitions(tasks: Iterator[_Task], size: int) -> Iterator[_Task]:
    items: list[Item] = []
    nbytes = skipped = 0
    for task in tasks:
        items += task.items
        nbytes += task.nbytes
        skipped += task.skipped
        if len(items) >= size:
            yield _Task(tuple(items), nbytes, skipped)
            items, nbytes, skipped = [], 0, 0
    if items:
        yield _Task(tuple(items), nbytes, skipped)


def _run_dask(address: str, n_workers: int, tasks: Iterator[_Task], partition_size: int, config: _Config,
              output: _Output, summary: Summary, progress: _Progress, parts_dir: Path) -> None:
    try:
        from distributed import Client, KilledWorker, LocalCluster, as_completed
    except ImportError:
        raise BatchError("--dask needs the dask extra: pip install 'cds[dask]'") from None
    import logging

    shutil.rmtree(parts_dir, ignore_errors=True)  # parts of an earlier, interrupted run are redone
    parts_dir.mkdir(mode=0o700)

    def commit(part: Any) -> None:
        if isinstance(part, bytes):
            output.write(part)
        else:
            output.append_file(part)
            os.unlink(part)

    def part_name(uid: int | tuple[int, int]) -> str:
        name = f"part-{uid:05d}" if isinstance(uid, int) else f"part-{uid[0]:05d}-{uid[1]:05d}"
        return str(parts_dir / f"{name}.ndjson")

    ledger = _Ledger(commit)
    cluster = None
    if address == "local":
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
    try:
        with Client(cluster if cluster is not None else address) as client:
            limit = 2 * max(len(client.scheduler_info().get("workers", {})), 1) + 2
            pending: dict[Any, tuple[Any, _Task, int]] = {}
            retry: deque[tuple[Any, _Task, int]] = deque()
            source = _partitions(tasks, partition_size)
            completed = as_completed()

            def top_up() -> None:
                while len(pending) < limit:
                    if retry:
                        uid, task, attempt = retry.popleft()
                    else:
                        fresh = next(source, None)
                        if fresh is None:
                            return
                        uid, task, attempt = ledger.new(), fresh, 0
                    fut = client.submit(_dask_partition, task.items, config, part_name(uid), pure=False)
                    pending[fut] = (uid, task, attempt)
                    completed.add(fut)

            top_up()
            for fut in completed:
                uid, task, attempt = pending.pop(fut)
                try:
                    part_summary = fut.result()
                except KilledWorker:  # a case killed the worker (after Dask's own retries)
                    retry.extend(_after_crash(uid, task, attempt, None, ledger, summary, progress))
                    top_up()
                    continue
                except CdsError:  # the worker could not build the evaluator
                    raise
                except Exception as exc:  # e.g. the parts folder is not shared with the workers
                    raise CdsError(f"a Dask partition failed: {type(exc).__name__}: {exc}") from None
                ledger.finish(uid, part_name(uid))
                summary.merge(part_summary)
                progress.advance(task)
                top_up()
    finally:
        if cluster is not None:
            cluster.close()
    shutil.rmtree(parts_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- run

def _read_existing(out: Path, resume: bool, overwrite: bool
                   ) -> tuple[dict[str, set[int | None]], Summary, int | None, int]:
    """What an existing results file holds: (done keys, its summary, length to cut it to, partial line bytes)."""
    done: dict[str, set[int | None]] = {}
    summary = Summary()
    if out.stat().st_size == 0:  # new (just created) or empty
        return done, summary, None, 0
    if overwrite:
        return done, summary, 0, 0
    if not resume:
        raise BatchError(f"{out} already exists: pass --resume to finish it, or --overwrite to start again")
    duplicates = 0

    def note(record: dict[str, Any]) -> None:
        nonlocal duplicates
        src = record["source"]
        lines = done.setdefault(src["file"], set())
        duplicates += src["line"] in lines
        lines.add(src["line"])
        summary.add_record(record)

    good, partial = _scan_results(out, note)
    if duplicates:
        raise BatchError(f"{out}: {duplicates} source(s) appear more than once; not extending this file")
    return done, summary, good if partial else None, partial


def run(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *, workers: int | None = None,
        resume: bool = False, overwrite: bool = False, order: str = "input", ruleset: str = "back-hip-pain",
        version: str | None = None, engine: str = "durable-rules", cross_check: bool = True,
        rulesets_dir: str | os.PathLike[str] | None = None, reference_date: dt.date | None = None,
        html_report: str | os.PathLike[str] | None = None, dask: str | None = None,
        progress: str = "off", chunk_size: int = CHUNK_SIZE, partition_size: int = PARTITION_SIZE,
        stream: IO[str] | None = None) -> Summary:
    """Evaluate every case in ``inputs`` into the NDJSON file ``out``; return the summary of ``out``.

    ``workers``: local worker processes (default: the CPU count; 0 = in this process). ``dask``:
    ``"local"`` (a LocalCluster of ``workers or 2`` processes) or a scheduler address. ``progress``:
    ``"auto"`` (a bar on a terminal, else a line every 5 s), ``"bar"``, ``"lines"`` or ``"off"``.
    The summary also lands in ``summary_path(out)``; ``html_report`` writes the HTML report.
    """
    from cds.rulesets import Registry, load_ruleset

    if order not in ORDERS:
        raise BatchError(f"order must be one of {', '.join(ORDERS)}")
    if chunk_size < 1 or partition_size < 1:
        raise BatchError("chunk and partition sizes must be at least 1")
    stream = stream or sys.stderr
    out = Path(out)
    parts_dir = _sibling(out, ".parts")
    own = {os.path.abspath(p) for p in (out, summary_path(out), html_report) if p is not None}

    def exclude(path: str) -> bool:
        return path in own or path.startswith(os.path.abspath(parts_dir) + os.sep)

    files = _expand_inputs(inputs, exclude)
    # Resolve the version once, here: every worker (and a later --resume) uses exactly this one.
    rulesets_dir = os.path.abspath(rulesets_dir) if rulesets_dir is not None else None
    compiled = load_ruleset(ruleset, version, registry=Registry(rulesets_dir) if rulesets_dir else None)
    config = _Config(compiled.id, compiled.version, engine, cross_check, rulesets_dir, reference_date)

    def say(text: str) -> None:
        if progress != "off":  # --quiet is silent
            print(f"cds batch: {out}: {text}", file=stream)

    output = _Output(out)  # locked before it is read: two runs never extend the same file
    try:
        done, summary, truncate_at, partial = _read_existing(out, resume, overwrite)
        other = set(summary.rulesets) - {compiled.key}
        if other:
            raise BatchError(f"{out} holds results from {', '.join(sorted(other))}; this run would use "
                             f"{compiled.key}: finish it with that version (--ruleset) or write a new file")
        if truncate_at is not None:
            output.truncate(truncate_at)
        if partial:
            say(f"dropped a partial last line ({partial:,} bytes); redoing that case")
        if progress == "auto":
            progress = "bar" if stream.isatty() else "lines"
        meter = _Progress(progress, sum(f.size for f in files), stream)
        matched = [0]
        tasks = _plan(files, done, chunk_size, matched)
        if dask:
            _run_dask(dask, workers or 2, tasks, partition_size, config, output, summary, meter, parts_dir)
        elif workers == 0:
            _run_inline(tasks, config, output, summary, meter)
        else:
            _run_local(tasks, workers or os.cpu_count() or 1, config, output, summary, meter)
        meter.finish()
    finally:
        output.close()
    unmatched = sum(len(v) for v in done.values()) - matched[0]
    if unmatched:
        say(f"kept {unmatched:,} earlier record(s) from inputs not given this time")
    if order == "case-id":
        _sort_by_case_id(str(out))
    _write_atomic(summary_path(out), summary.to_json())
    if html_report is not None:
        _write_atomic(Path(html_report), render_html(summary, f"cds batch report: {out.name}"))
    return summary


# ----------------------------------------------------------------------------------------------- CLI

def _positive_or_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "batch", help="evaluate many cases into NDJSON results with a summary",
        description="Evaluate every case in the inputs: one NDJSON record per case (a result or an error), "
                    "in input order, plus RESULTS.summary.json. Safe to kill: --resume finishes the job.",
        epilog="Blank NDJSON lines are not cases (line numbers still count them). Exit status: 0 every record "
               "is a result; 2 some records are errors, or bad usage; 1 the run failed. "
               "cds batch summarize RESULTS [--html REPORT.html] rebuilds the summary of a results file.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folders (recursive: every *.json, *.ndjson and *.jsonl in them), or such files")
    p.add_argument("-o", "--out", metavar="RESULTS.ndjson", help="the results file (required)")
    p.add_argument("--ruleset", default="back-hip-pain", metavar="ID[@VERSION]",
                   help="ruleset id, optionally pinned to a version (default: newest active back-hip-pain)")
    p.add_argument("--rulesets-dir", metavar="DIR", help="a rulesets folder other than the installed one")
    p.add_argument("--engine", choices=("durable-rules", "reference"), default="durable-rules")
    p.add_argument("--no-cross-check", action="store_true",
                   help="do not run the reference evaluator beside the engine")
    p.add_argument("--workers", type=_positive_or_zero, metavar="N",
                   help="local worker processes (default: the CPU count; 0 = no subprocess); "
                        "with --dask local, the cluster's workers (default 2)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run into the same RESULTS")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RESULTS file")
    p.add_argument("--order", choices=ORDERS, default="input",
                   help="input (default: the order of the inputs, folders sorted by path) or case-id "
                        "(sorted by case id, then source, when the run is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    p.add_argument("--html", metavar="REPORT.html", help="also write a self-contained HTML report")
    p.add_argument("--dask", metavar="local|tcp://HOST:PORT",
                   help="run on Dask: a local cluster or a scheduler (needs the cds[dask] extra)")
    p.add_argument("--reference-date", type=dt.date.fromisoformat, metavar="YYYY-MM-DD",
                   help="the date FHIR Bundle inputs are read as of (ages, durations)")
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, metavar="N", help=argparse.SUPPRESS)
    p.add_argument("--partition-size", type=int, default=PARTITION_SIZE, metavar="N",
                   help=f"cases per Dask partition (default {PARTITION_SIZE:,})")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit status: 0 every record is a result; 2 some records are errors, or bad usage; 1 the run failed."""
    from cds.rulesets import parse_ref

    try:
        if args.inputs[0] == "summarize":
            return _cmd_summarize(args)
        if not args.out:
            raise BatchError("--out RESULTS.ndjson is required")
        if args.resume and args.overwrite:
            raise BatchError("--resume and --overwrite exclude each other")
        rid, version = parse_ref(args.ruleset)
        summary = run(args.inputs, args.out, workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                      order=args.order, ruleset=rid, version=version, engine=args.engine,
                      cross_check=not args.no_cross_check, rulesets_dir=args.rulesets_dir,
                      reference_date=args.reference_date, html_report=args.html, dask=args.dask,
                      progress="off" if args.quiet else "auto", chunk_size=args.chunk_size,
                      partition_size=args.partition_size)
    except BatchError as exc:
        print(f"cds batch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncds batch: interrupted; finish with the same command plus --resume", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"cds batch: {args.out}\n{summary.table()}", file=sys.stderr)
    return 2 if summary.errors else 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    extra = [name for name in ("out", "resume", "overwrite", "dask", "workers", "reference_date")
             if getattr(args, name) not in (None, False)]
    if len(args.inputs) != 2 or extra:
        raise BatchError("usage: cds batch summarize RESULTS [--html REPORT.html] [--quiet]")
    results = args.inputs[1]
    if not os.path.isfile(results):
        raise BatchError(f"{results}: no such file")
    summary = summarize(results)
    _write_atomic(summary_path(results), summary.to_json())
    if args.html:
        _write_atomic(Path(args.html), render_html(summary, f"cds batch report: {Path(results).name}"))
    if not args.quiet:
        print(f"cds batch: {results}\n{summary.table()}", file=sys.stderr)
    return 0
