"""Patient facts: the case-file contract (schemas/patient-facts.schema.json) as typed values.

A case is one JSON object: ``case_id``, ``context``, ``findings``, ``treatments``, ``start_back``,
``odi``. Findings are tri-state; a finding that is missing is **unknown**, never absent
(clinical.md §0: an unasked red-flag question is unknown). Unknown keys are errors, because a
misspelt red flag must not vanish silently.

Validation runs on every case, so it is a hand-written structural check driven by the schema's
own catalogue (fast), not a general JSON Schema validator; a test keeps the two in agreement on
generated valid and broken cases. Error messages name the JSON path and what was expected and
never echo the offending value (it may be patient data).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Union

import attrs

from cds._resources import load_schema
from cds.errors import FactsError, Problem

UNKNOWN = "unknown"
TRI_STATES = ("present", "absent", "unknown")
CENSOR_OPS = ("gt", "ge", "lt", "le")
MAX_CASE_ID = 200
MAX_TREATMENTS = 200
#: Every number in a case lies within +-1e9: far beyond any clinical value in the vocabulary, and
#: exactly representable on every path (the rules engine compares through IEEE doubles).
MAX_MAGNITUDE = 1e9


@attrs.frozen
class Censored:
    """A censored number: the value is known only to be ``op`` ``bound`` (e.g. ``gt 30``)."""

    op: str
    bound: float

    def to_json(self) -> dict[str, float]:
        return {self.op: self.bound}


Number = Union[float, int, Censored]
Value = Union[str, float, int, Censored]


@attrs.frozen
class Treatment:
    step: str
    outcome: str
    weeks: float | str = UNKNOWN
    modalities: tuple[str, ...] = ()
    sessions: int | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "outcome": self.outcome, "weeks": self.weeks}
        if self.modalities:
            out["modalities"] = list(self.modalities)
        if self.sessions is not None:
            out["sessions"] = self.sessions
        if self.note is not None:
            out["note"] = self.note
        return out


@attrs.frozen
class Catalogue:
    """The fact ids and their kinds, read once from the facts schema."""

    context: Mapping[str, Mapping[str, Any]]
    findings: Mapping[str, Mapping[str, Any]]
    reasons: tuple[str, ...]
    steps: tuple[str, ...]
    outcomes: tuple[str, ...]
    modalities: tuple[str, ...]
    start_back: Mapping[str, tuple[Any, ...]]  # item -> allowed answers (None = unanswered)
    odi: tuple[str, ...]
    finding_groups: Mapping[str, tuple[str, ...]]

    def kind(self, fact_id: str) -> Mapping[str, Any] | None:
        return self.context.get(fact_id) or self.findings.get(fact_id)


def _kind(prop: Mapping[str, Any]) -> dict[str, Any]:
    kind = prop["x-cds-kind"]
    out: dict[str, Any] = {"kind": kind}
    if kind in ("enum", "tri_state"):
        out["values"] = tuple(prop["enum"])
    return out


@functools.cache
def catalogue() -> Catalogue:
    schema = load_schema("patient-facts.schema.json")
    props = schema["properties"]
    tdefs = schema["$defs"]["treatment"]["properties"]
    sb = props["start_back"]["oneOf"][1]["properties"]
    odi = props["odi"]["oneOf"][1]["properties"]
    return Catalogue(
        context={k: _kind(v) for k, v in props["context"]["properties"].items()},
        findings={k: _kind(v) for k, v in props["findings"]["properties"].items()},
        reasons=tuple(props["unknown_reasons"]["additionalProperties"]["enum"]),
        steps=tuple(tdefs["step"]["enum"]),
        outcomes=tuple(tdefs["outcome"]["enum"]),
        modalities=tuple(tdefs["modalities"]["items"]["enum"]),
        start_back={k: (tuple(v["enum"]) if "enum" in v else (True, False, None)) for k, v in sb.items()},
        odi=tuple(odi),
        finding_groups={k: tuple(v) for k, v in schema["x-cds-finding-groups"].items()},
    )


_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def _path(parent: str, key: str) -> str:
    # A key that looks like a concept id is shown (a misspelt id must be findable); anything else
    # might be patient data typed into the wrong place, so it is not repeated.
    return f"{parent}.{key}" if _IDENTIFIER.fullmatch(key) else f"{parent}[<a key that is not an identifier>]"


def _is_text(value: Any, max_len: int, min_len: int = 0) -> bool:
    """A string that is valid Unicode (no unpaired surrogates, which JSON escapes can carry) of a sane length."""
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE)


def _parse_value(spec: Mapping[str, Any], value: Any, parent: str, key: str, problems: list[Problem]) -> Value | None:
    kind = spec["kind"]
    if kind != "number":
        if value.__class__ is str and value in spec["values"]:
            return value
    elif (value.__class__ is int or value.__class__ is float) and -MAX_MAGNITUDE <= value <= MAX_MAGNITUDE:
        return value  # the common case, checked first (NaN fails the comparison)
    path = _path(parent, key)  # built only when something is wrong
    if kind != "number":
        allowed = "/".join(spec["values"])
        problems.append(Problem(path, f"expected one of {allowed}, got {_type_name(value)} that is not one of them"
                                if isinstance(value, str) else f"expected one of {allowed}, got {_type_name(value)}"))
        return None
    # number
    if _is_number(value):
        return value
    if value == UNKNOWN:
        return UNKNOWN
    if isinstance(value, dict) and len(value) == 1:
        ((op, bound),) = value.items()
        if op in CENSOR_OPS and _is_number(bound):
            return Censored(op, bound)
    problems.append(Problem(path, "expected a number between -1e9 and 1e9, a censored number such as {\"gt\": 30}, "
                                  "or \"unknown\", "
                                  f"got {_type_name(value)}"))
    return None


@attrs.frozen
class PatientFacts:
    """One validated case. Build it with :meth:`from_dict`; every field is read-only."""

    case_id: str
    context: Mapping[str, Value]
    findings: Mapping[str, Value]
    treatments: tuple[Treatment, ...] = ()
    start_back: Mapping[str, Any] | None = None
    odi: Mapping[str, Any] | None = None
    unknown_reasons: Mapping[str, str] = attrs.field(factory=dict)

    def get(self, fact_id: str) -> Value:
        """The value of a context or finding id; ``"unknown"`` when it was not recorded."""
        if fact_id in self.findings:
            return self.findings[fact_id]
        return self.context.get(fact_id, UNKNOWN)

    @property
    def region(self) -> str:
        return str(self.context["region"])

    @classmethod
    def from_dict(cls, data: Any) -> PatientFacts:
        """Validate and structure a case dict; raise FactsError listing every problem."""
        problems: list[Problem] = []
        case_id = None
        if not isinstance(data, dict):
            raise FactsError([Problem("$", f"expected a JSON object (one case), got {_type_name(data)}")])
        cat = catalogue()
        raw_id = data.get("case_id")
        if _is_text(raw_id, MAX_CASE_ID, 1):
            case_id = raw_id
        elif "case_id" not in data:
            problems.append(Problem("$.case_id", "required: a non-empty string identifying the case"))
        else:
            problems.append(Problem("$.case_id", f"expected a string of 1 to {MAX_CASE_ID} characters of valid "
                                                 f"Unicode, got {_type_name(raw_id)}"))
        for key in data:
            if key not in ("case_id", "context", "findings", "treatments", "start_back", "odi", "unknown_reasons"):
                problems.append(Problem(_path("$", str(key)), "unknown key; expected case_id, context, findings, "
                                                              "treatments, start_back, odi or unknown_reasons"))
        context: dict[str, Value] = {}
        raw_ctx = data.get("context")
        if not isinstance(raw_ctx, dict):
            problems.append(Problem("$.context", "required: an object with at least region (back, hip or both)"
                                    if raw_ctx is None else f"expected an object, got {_type_name(raw_ctx)}"))
        else:
            for key, value in raw_ctx.items():
                spec = cat.context.get(key)
                if spec is None:
                    problems.append(Problem(_path("$.context", str(key)),
                                            "unknown context id; expected one of " + ", ".join(cat.context)))
                    continue
                parsed = _parse_value(spec, value, "$.context", key, problems)
                if parsed is not None and parsed != UNKNOWN:
                    context[key] = parsed
            if "region" not in raw_ctx:
                problems.append(Problem("$.context.region", "required: back, hip or both (it decides which red "
                                                            "flags and screens apply)"))
        findings: dict[str, Value] = {}
        raw_f = data.get("findings", {})
        if not isinstance(raw_f, dict):
            problems.append(Problem("$.findings", f"expected an object, got {_type_name(raw_f)}"))
        else:
            for key, value in raw_f.items():
                spec = cat.findings.get(key)
                if spec is None:
                    problems.append(Problem(_path("$.findings", str(key)),
                                            "unknown finding id (see schemas/patient-facts.schema.json)"))
                    continue
                parsed = _parse_value(spec, value, "$.findings", key, problems)
                if parsed is not None and parsed != UNKNOWN:
                    findings[key] = parsed
        reasons: dict[str, str] = {}
        raw_r = data.get("unknown_reasons", {})
        if not isinstance(raw_r, dict):
            problems.append(Problem("$.unknown_reasons", f"expected an object, got {_type_name(raw_r)}"))
        else:
            for key, value in raw_r.items():
                path = _path("$.unknown_reasons", str(key))
                if key not in cat.findings:
                    problems.append(Problem(path, "unknown finding id"))
                elif value not in cat.reasons:
                    problems.append(Problem(path, "expected one of " + "/".join(cat.reasons)))
                else:
                    reasons[key] = value
        treatments = _parse_treatments(data.get("treatments", []), cat, problems)
        start_back = _parse_answers(data.get("start_back"), "$.start_back", cat.start_back, problems)
        odi = _parse_answers(data.get("odi"), "$.odi", {k: (0, 1, 2, 3, 4, 5, None) for k in cat.odi}, problems)
        if problems:
            raise FactsError(problems, case_id=case_id)
        assert case_id is not None
        return cls(case_id=case_id, context=context, findings=findings, treatments=treatments,
                   start_back=start_back, odi=odi, unknown_reasons=reasons)

    def to_dict(self) -> dict[str, Any]:
        """The canonical case dict (unknown values dropped, numbers and censored bounds as JSON)."""

        out: dict[str, Any] = {
            "case_id": self.case_id,
            "context": {k: (v.to_json() if v.__class__ is Censored else v) for k, v in self.context.items()},
            "findings": {k: (v.to_json() if v.__class__ is Censored else v) for k, v in self.findings.items()},
            "treatments": [t.to_json() for t in self.treatments],
        }
        if self.start_back is not None:
            out["start_back"] = dict(self.start_back)
        if self.odi is not None:
            out["odi"] = dict(self.odi)
        if self.unknown_reasons:
            out["unknown_reasons"] = dict(self.unknown_reasons)
        return out

    def canonical_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()


def _parse_treatments(raw: Any, cat: Catalogue, problems: list[Problem]) -> tuple[Treatment, ...]:
    if not isinstance(raw, list):
        problems.append(Problem("$.treatments", f"expected an array of treatment records, got {_type_name(raw)}"))
        return ()
    if len(raw) > MAX_TREATMENTS:
        problems.append(Problem("$.treatments", f"expected at most {MAX_TREATMENTS} records"))
        return ()
    out = []
    for i, rec in enumerate(raw):
        path = f"$.treatments[{i}]"
        if not isinstance(rec, dict):
            problems.append(Problem(path, f"expected an object {{step, outcome, weeks, modalities}}, got {_type_name(rec)}"))
            continue
        n = len(problems)
        for key in rec:
            if key not in ("step", "outcome", "weeks", "modalities", "sessions", "note"):
                problems.append(Problem(_path(path, str(key)), "unknown key; expected step, outcome, weeks, "
                                                               "modalities, sessions or note"))
        step, outcome = rec.get("step"), rec.get("outcome")
        if step not in cat.steps:
            problems.append(Problem(f"{path}.step", "required: one of " + "/".join(cat.steps)))
        if outcome not in cat.outcomes:
            problems.append(Problem(f"{path}.outcome", "required: one of " + "/".join(cat.outcomes)))
        weeks = rec.get("weeks", UNKNOWN)
        if not (weeks == UNKNOWN or (_is_number(weeks) and weeks >= 0)):
            problems.append(Problem(f"{path}.weeks", f"expected a number from 0 to 1e9 or \"unknown\", "
                                                     f"got {_type_name(weeks)}"))
        mods = rec.get("modalities", [])
        if not isinstance(mods, list):
            problems.append(Problem(f"{path}.modalities", f"expected an array of modality ids, got {_type_name(mods)}"))
            mods = []
        for j, m in enumerate(mods):
            if m not in cat.modalities:
                problems.append(Problem(f"{path}.modalities[{j}]", "unknown modality id (see the vocabulary's "
                                                                     "treatments.modalities)"))
        sessions = rec.get("sessions")
        if sessions is not None and not (isinstance(sessions, int) and not isinstance(sessions, bool)
                                         and 0 <= sessions <= MAX_MAGNITUDE):
            problems.append(Problem(f"{path}.sessions", f"expected an integer >= 0, got {_type_name(sessions)}"))
        note = rec.get("note")
        if note is not None and not _is_text(note, 2000):
            problems.append(Problem(f"{path}.note", "expected a string of at most 2000 characters of valid Unicode"))
        if len(problems) == n:
            out.append(Treatment(step=str(step), outcome=str(outcome), weeks=weeks, modalities=tuple(mods),
                                 sessions=sessions, note=note))
    return tuple(out)


def _parse_answers(raw: Any, path: str, allowed: Mapping[str, tuple[Any, ...]],
                   problems: list[Problem]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(Problem(path, f"expected an object or null, got {_type_name(raw)}"))
        return None
    out = {}
    for key, value in raw.items():
        p = _path(path, str(key))
        if key not in allowed:
            problems.append(Problem(p, "unknown item; expected one of " + ", ".join(allowed)))
        elif not any(value is a or (type(value) is type(a) and value == a) for a in allowed[key]):
            shown = "/".join("null" if a is None else json.dumps(a) for a in allowed[key])
            problems.append(Problem(p, f"expected one of {shown}, got {_type_name(value)}"))
        else:
            out[key] = value
    return out
