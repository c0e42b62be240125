"""FHIR R4 -> cds case facts.

Reads a patient's FHIR R4 resources (a Bundle, or the resources of one patient from a bulk
NDJSON export) and writes a case file that follows ``schemas/patient-facts.schema.json``.
Only the standard library, PyYAML and attrs are used. The code table is ``codes.yaml`` in this
package; every group in it says where its code meanings come from.

Rules this module keeps (see also ``codes.yaml`` ``settings`` and ``fact_policies``):

* A fact is set only from positive evidence in the record. A code that is not there leaves the
  fact unknown (unset); it never becomes ``"absent"``. ``"absent"`` comes only from an explicit
  negative: a "never smoker" answer, a measured BMI below 30 (obesity), an earlier resolved
  episode of back pain (first_episode_back_pain).
* Conditions count when ``clinicalStatus`` is active/recurrence/relapse. Facts whose definition
  is "current or past" (``fact_policies.any_status``, e.g. history_of_cancer) also count
  inactive/remission/resolved Conditions and Conditions without a clinicalStatus. A
  ``verificationStatus`` of refuted or entered-in-error always removes the Condition.
* The reference date is "now": resources dated after it are ignored, measurements older than
  ``settings.observation_max_age_days`` are not used, "recent" means within
  ``settings.recent_weeks``.
* Bad data is reported as a :class:`MappingIssue` and never stops the mapping. The only
  exception raised is :class:`ValueError` for input that is not a FHIR Bundle dict (or, for
  :func:`facts_from_resources`, not an iterable of resources) and for a reference date that is
  not a date.
* A treatment record needs an outcome (schema). FHIR ``Procedure.outcome`` is read (SNOMED CT
  385669000 Successful -> improved, 385670004 Partially successful -> partial, 385671000
  Unsuccessful -> no-improvement, or a vocabulary outcome word in ``outcome.text``). Without an
  outcome the treatment is NOT added - the outcome is never guessed - and an info issue says so.

STarT Back conventions
----------------------
*QuestionnaireResponse*: recognised when ``questionnaire`` contains ``start-back``,
``startback``, ``start_back`` or ``sbst`` (case-insensitive), or when at least five item
linkIds are STarT item ids. Item linkIds (case-insensitive, items may be nested in groups):
``q1`` ... ``q9``, the bare numbers ``1`` ... ``9``, or the cds field names
(``q1_leg_pain`` ... ``q9_bothersomeness``). Items 1-8 answer with ``valueBoolean`` (true =
agree), ``valueInteger`` 1/0, or ``valueCoding``/``valueString`` ``agree``/``disagree``/``yes``/``no``
(LOINC LA33-6 Yes / LA32-8 No, SNOMED CT 373066001 Yes / 373067005 No). Item 9 answers with
``valueCoding`` code or display, or ``valueString``, one of not-at-all / slightly / moderately /
very-much / extremely (spaces, case and underscores are normalised), or ``valueInteger`` 0-4 in
that order. Status must be completed or amended; the newest response within
``settings.start_back_max_age_days`` of the reference date is used.

*Observation* (when no usable QuestionnaireResponse exists): ``Observation.code`` with system
``https://cds.invalid/fhir/CodeSystem/start-back`` and code ``q1`` ... ``q9`` (or the cds field
name); the value uses the same value[x] forms as above. The newest Observation per item wins.

Case id
-------
``case_id`` is the only case data cds logs, so the default is not the FHIR patient id but
``fhir-`` + the first 12 hex digits of its SHA-256.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from importlib import resources as _resources
from typing import Any

import attrs
import yaml

from cds.errors import FactsError, Problem

__all__ = [
    "FhirMapping",
    "MappingIssue",
    "explain",
    "facts_from_bundle",
    "facts_from_resources",
    "iter_patients_ndjson",
    "load_code_table",
]

SEVERITIES = ("error", "warning", "info")


@attrs.frozen
class MappingIssue:
    """Something wrong or notable in the source data. Never fatal.

    ``resource`` is ``"Type/id"`` (empty for case-level issues); ``severity`` is ``error``
    (the data contradicts itself or cannot be used), ``warning`` (a datum was dropped or may be
    wrong) or ``info`` (a note for the clinician or integrator).
    """

    resource: str
    severity: str = attrs.field(validator=attrs.validators.in_(SEVERITIES))
    message: str


@attrs.frozen
class FhirMapping:
    """Result of a mapping: a schema-valid case dict, its provenance and the issues found."""

    case: dict
    provenance: dict  # fact path ("findings.history_of_cancer") -> ["Condition/abc", ...]
    issues: list  # list[MappingIssue]

    def issues_of(self, severity: str) -> list[MappingIssue]:
        return [i for i in self.issues if i.severity == severity]


# ----------------------------------------------------------------------------- code table

_ACTIVE = {"active", "recurrence", "relapse"}
_IGNORED_VERIFICATION = {"refuted", "entered-in-error"}
_HIERARCHICAL = {"icd10", "atc"}



_TOKEN = re.compile(r"[A-Za-z0-9._:/|+-]{1,40}")


def _shown(value: Any) -> str:
    """A value quoted in an issue only when it is a short code-like token (a status, unit, code);
    free text, which may be patient data, is never repeated."""
    if isinstance(value, str) and _TOKEN.fullmatch(value) and not re.fullmatch(r"[0-9]{4}-.*", value):
        return repr(value)
    return "(value not shown)"

def _norm_code(system_key: str, code: str) -> str:
    code = str(code).strip()
    if system_key in _HIERARCHICAL:
        return code.replace(".", "").replace(" ", "").upper()
    return code


@attrs.define
class _Entry:
    section: str
    index: int
    system: str
    data: dict

    @property
    def key(self) -> tuple[str, int]:
        return (self.section, self.index)

    def display(self, code: str) -> str | None:
        codes = self.data.get("codes")
        if isinstance(codes, dict):
            return codes.get(code)
        disp = self.data.get("ips_displays") or {}
        return disp.get(code)


class CodeTable:
    """codes.yaml, indexed for lookups."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.settings: dict = doc.get("settings", {})
        self.any_status: set[str] = set(doc.get("fact_policies", {}).get("any_status", []))
        self.drug_classes: dict = doc.get("drug_classes", {})
        self.start_back: dict = doc.get("start_back", {})
        self.procedure_outcomes: dict = doc.get("procedure_outcomes", {})
        self._system_of: dict[str, str] = {}
        for key, uris in doc.get("systems", {}).items():
            for uri in uris:
                self._system_of[uri.rstrip("/").lower()] = key
        self._exact: dict[str, dict[tuple[str, str], list[_Entry]]] = {}
        self._prefix: dict[str, dict[str, list[tuple[str, _Entry]]]] = {}
        for section in ("conditions", "procedures", "medications", "observations"):
            exact: dict[tuple[str, str], list[_Entry]] = defaultdict(list)
            prefix: dict[str, list[tuple[str, _Entry]]] = defaultdict(list)
            for i, data in enumerate(doc.get(section, [])):
                entry = _Entry(section, i, data["system"], data)
                for code in data.get("codes") or []:
                    exact[(data["system"], _norm_code(data["system"], code))].append(entry)
                for p in data.get("prefixes") or []:
                    prefix[data["system"]].append((_norm_code(data["system"], p), entry))
            self._exact[section] = dict(exact)
            self._prefix[section] = dict(prefix)

    def system_key(self, uri: str | None) -> str | None:
        if not uri:
            return None
        return self._system_of.get(str(uri).rstrip("/").lower())

    def lookup(self, section: str, system_key: str, code: str) -> list[_Entry]:
        norm = _norm_code(system_key, code)
        found = list(self._exact[section].get((system_key, norm), []))
        for p, entry in self._prefix[section].get(system_key, []):
            if norm.startswith(p) and entry not in found:
                found.append(entry)
        return found

    def counts(self) -> dict[str, int]:
        """Number of codes + prefixes per target (fact, region, drug class, note...)."""
        out: dict[str, int] = defaultdict(int)
        for section in ("conditions", "procedures", "medications", "observations"):
            for data in self.doc.get(section, []):
                n = len(data.get("codes") or []) + len(data.get("prefixes") or [])
                targets = []
                if data.get("note_only"):
                    targets.append("(note only)")
                else:
                    if data.get("fact"):
                        targets.append(data["fact"])
                    targets.extend((data.get("facts") or {}).keys())
                    if data.get("region"):
                        targets.append(f"context.region={data['region']}")
                    if data.get("drug_class"):
                        cls = self.drug_classes.get(data["drug_class"], {})
                        targets.append(cls.get("fact") or f"(note: {data['drug_class']})")
                    if data.get("treatment"):
                        targets.append(f"treatments:{data['treatment']['step']}")
                for t in targets:
                    out[t] += n
        return dict(sorted(out.items()))


@functools.lru_cache(maxsize=1)
def load_code_table() -> CodeTable:
    text = _resources.files("cds.fhir").joinpath("codes.yaml").read_text(encoding="utf-8")
    return CodeTable(yaml.safe_load(text))


# ----------------------------------------------------------------------------- dates

_DATE_RE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T.*)?$")
_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?$")


class _BadDate(Exception):
    pass


def _parse_date(value: Any) -> tuple[dt.date, str]:
    """FHIR date/dateTime/instant -> (date, precision). Raises _BadDate."""
    if not isinstance(value, str):
        raise _BadDate(repr(value))
    m = _DATE_RE.match(value.strip())
    if not m:
        raise _BadDate(value)
    year, month, day = m.group(1), m.group(2), m.group(3)
    try:
        if day:
            if "T" in value and not _DATETIME_RE.match(value.strip()):
                raise _BadDate(value)
            return dt.date(int(year), int(month), int(day)), "day"
        if month:
            return dt.date(int(year), int(month), 1), "month"
        return dt.date(int(year), 1, 1), "year"
    except ValueError as exc:
        raise _BadDate(value) from exc


def _sort_key(value: Any) -> str:
    """A string that sorts FHIR dateTimes well enough for 'newest first' tie-breaks."""
    return value if isinstance(value, str) else ""


def _years_between(start: dt.date, end: dt.date) -> int:
    years = end.year - start.year
    if (end.month, end.day) < (start.month, start.day):
        years -= 1
    return years


def _exact_years(start: dt.date, end: dt.date) -> float:
    return round((end - start).days / 365.25, 1)


def _weeks(start: dt.date, end: dt.date) -> float:
    return round((end - start).days / 7, 1)


# ----------------------------------------------------------------------------- helpers

def _rid(res: dict) -> str:
    return f"{res.get('resourceType', '?')}/{res.get('id', '?')}"


def _codings(cc: Any) -> list[dict]:
    if isinstance(cc, dict):
        cod = cc.get("coding")
        if isinstance(cod, list):
            return [c for c in cod if isinstance(c, dict)]
    return []


def _cc_text(cc: Any) -> str:
    if not isinstance(cc, dict):
        return ""
    if cc.get("text"):
        return str(cc["text"])
    for c in _codings(cc):
        if c.get("display"):
            return str(c["display"])
        if c.get("code"):
            return str(c["code"])
    return ""


def _status_code(value: Any) -> str | None:
    """clinicalStatus / verificationStatus: CodeableConcept (R4) or a plain code (STU3)."""
    if isinstance(value, str):
        return value.strip().lower()
    for c in _codings(value):
        if c.get("code"):
            return str(c["code"]).strip().lower()
    if isinstance(value, dict) and value.get("text"):
        return str(value["text"]).strip().lower()
    return None


def _ref_id(ref: Any) -> str | None:
    """'Patient/123', 'urn:uuid:123', 'https://x/fhir/Patient/123/_history/2' -> '123'."""
    if isinstance(ref, dict):
        ref = ref.get("reference")
    if not isinstance(ref, str) or not ref:
        return None
    ref = ref.split("/_history/")[0]
    if ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
        return ref.split(":")[-1]
    return ref.rstrip("/").split("/")[-1]


_PATIENT_REF_FIELDS = ("subject", "patient", "beneficiary")


def _patient_ref(res: dict) -> str | None:
    for f in _PATIENT_REF_FIELDS:
        v = res.get(f)
        if isinstance(v, dict) and isinstance(v.get("reference"), str):
            ref = v["reference"]
            if "Patient/" in ref or ref.startswith("urn:uuid:"):
                return _ref_id(ref)
    return None


def _fmt_value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {val}" for k, val in v.items())
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ----------------------------------------------------------------------------- public API

def _require_valid_unicode(data: Any) -> None:
    """JSON can carry unpaired surrogate escapes ("\\ud800"); no id, hash or output could hold them."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FactsError([Problem("$", "contains text that is not valid Unicode (an unpaired surrogate)")]) from None
    except (TypeError, ValueError, RecursionError):
        pass  # not JSON-shaped at all: the structural checks report it


def facts_from_bundle(bundle: dict, *, reference_date: dt.date, case_id: str | None = None) -> FhirMapping:
    """Map a FHIR R4 Bundle (parsed JSON) of one patient to a case file.

    Raises cds.FactsError (a ValueError) only when ``bundle`` is not a dict with resourceType "Bundle" or the
    reference date is not a date. Everything wrong inside the bundle becomes a MappingIssue.
    """
    if not isinstance(bundle, dict):
        raise FactsError([Problem("$", "expected a FHIR Bundle as a JSON object, "
                                       f"got {type(bundle).__name__}")])
    if bundle.get("resourceType") != "Bundle":
        raise FactsError([Problem("$.resourceType", "expected a FHIR resource with resourceType 'Bundle'")])
    _require_valid_unicode(bundle)
    pre_issues: list[MappingIssue] = []
    resources_: list[dict] = []
    full_urls: dict[str, dict] = {}
    entries = bundle.get("entry")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        pre_issues.append(MappingIssue("Bundle/" + str(bundle.get("id", "?")), "error",
                                       "Bundle.entry is not a list; no resources read"))
        entries = []
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            pre_issues.append(MappingIssue("Bundle/" + str(bundle.get("id", "?")), "warning",
                                           f"Bundle.entry[{i}] has no resource with a resourceType; skipped"))
            continue
        resources_.append(res)
        if isinstance(entry.get("fullUrl"), str):
            full_urls[entry["fullUrl"]] = res
    return _Mapper(resources_, reference_date, case_id, full_urls, pre_issues).run()


def facts_from_resources(resources: Iterable[dict], *, reference_date: dt.date,
                         case_id: str | None = None) -> FhirMapping:
    """Map the resources of one patient (e.g. a group from :func:`iter_patients_ndjson`)."""
    if isinstance(resources, (str, bytes)) or isinstance(resources, dict):
        hint = " (use facts_from_bundle for a Bundle)" if isinstance(resources, dict) and \
            resources.get("resourceType") == "Bundle" else ""
        raise FactsError([Problem("$", "expected an iterable of FHIR resource objects, "
                                       f"got {type(resources).__name__}{hint}")])
    try:
        items = list(resources)
    except TypeError as exc:
        raise FactsError([Problem("$", "expected an iterable of FHIR resource objects, "
                                       f"got {type(resources).__name__}")]) from exc
    _require_valid_unicode(items)
    pre_issues: list[MappingIssue] = []
    good: list[dict] = []
    for i, res in enumerate(items):
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            pre_issues.append(MappingIssue("", "warning",
                                           f"item {i} is not a FHIR resource (no resourceType); skipped"))
            continue
        good.append(res)
    return _Mapper(good, reference_date, case_id, {}, pre_issues).run()


def iter_patients_ndjson(paths: Any) -> Iterator[tuple[str, list[dict]]]:
    """Group bulk-export NDJSON files by patient.

    ``paths`` is a file, a directory (all ``*.ndjson`` files in it) or an iterable of those.
    Yields ``(patient_id, resources)`` in order of first appearance; a patient's resources are
    its Patient resource and every resource whose subject/patient/beneficiary references it.
    Lines that are not JSON objects with a resourceType (e.g. an export log) and resources
    without a patient reference are skipped; a line that is not JSON raises a warning.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            files.extend(sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".ndjson")))
        else:
            files.append(p)
    groups: dict[str, list[dict]] = {}
    for path in files:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    res = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{path}:{lineno}: not valid JSON; line skipped", stacklevel=2)
                    continue
                if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
                    continue
                pid: str | None
                if res["resourceType"] == "Patient" and res.get("id"):
                    pid = str(res["id"])
                else:
                    pid = _patient_ref(res)
                    if not pid:
                        continue
                groups.setdefault(pid, []).append(res)
    yield from groups.items()


# ----------------------------------------------------------------------------- the mapper

@attrs.define
class _Evidence:
    value: Any
    refs: list[str]
    priority: int = 0  # higher wins; used to let recorded facts beat derived ones


class _Mapper:
    def __init__(self, resources_: list[dict], reference_date: Any, case_id: str | None,
                 full_urls: dict[str, dict], pre_issues: list[MappingIssue]):
        if isinstance(reference_date, dt.datetime):
            reference_date = reference_date.date()
        if not isinstance(reference_date, dt.date):
            raise ValueError(f"reference_date must be a datetime.date, got {type(reference_date).__name__}")
        if case_id is not None and (not isinstance(case_id, str) or not case_id or len(case_id) > 200):
            raise ValueError("case_id must be a non-empty string of at most 200 characters")
        self.t = load_code_table()
        self.s = self.t.settings
        self.ref = reference_date
        self.case_id = case_id
        self.resources = resources_
        self.full_urls = full_urls
        self.by_type_id: dict[tuple[str, str], dict] = {}
        for r in resources_:
            if r.get("id") is not None:
                self.by_type_id[(r["resourceType"], str(r["id"]))] = r
        self.issues: list[MappingIssue] = list(pre_issues)
        self._issue_keys: set[tuple[str, str, str]] = {(i.resource, i.severity, i.message) for i in pre_issues}
        self.context: dict[str, _Evidence] = {}
        self.findings: dict[str, _Evidence] = {}
        self.birth: dt.date | None = None
        self.age: int | None = None
        self.patient_id: str | None = None
        self.future: dict[str, int] = defaultdict(int)
        self.region_refs: dict[str, list[str]] = {"back": [], "hip": []}
        self.pain_conditions: list[tuple[dt.date | None, str, dict, str, bool]] = []
        self.laterality: dict[str, list[str]] = defaultdict(list)
        self.treatments: list[dict] = []
        self.treatment_prov: list[list[str]] = []
        self.start_back: dict | None = None
        self.start_back_prov: dict[str, list[str]] = {}

    # -- issues / facts ------------------------------------------------------------------
    def issue(self, resource: str, severity: str, message: str) -> None:
        key = (resource, severity, message)
        if key not in self._issue_keys:
            self._issue_keys.add(key)
            self.issues.append(MappingIssue(resource, severity, message))

    def set_finding(self, fact: str, value: Any, ref: str | list[str], priority: int = 10) -> None:
        refs = [ref] if isinstance(ref, str) else list(ref)
        cur = self.findings.get(fact)
        if cur is None or priority > cur.priority:
            self.findings[fact] = _Evidence(value, refs, priority)
            return
        if priority < cur.priority:
            return
        if cur.value == value:
            for r in refs:
                if r not in cur.refs:
                    cur.refs.append(r)
            return
        # same priority, different value: present beats absent (positive evidence is kept)
        if {cur.value, value} == {"present", "absent"}:
            if value == "present":
                self.issue(refs[0], "warning", f"{fact}: record says present here but absent in "
                                               f"{', '.join(cur.refs)}; present kept")
                self.findings[fact] = _Evidence(value, refs, priority)
            else:
                self.issue(refs[0], "warning", f"{fact}: record says absent here but present in "
                                               f"{', '.join(cur.refs)}; present kept")
            return
        self.issue(refs[0], "warning", f"{fact}: conflicting values {_shown(cur.value)} and {_shown(value)}; "
                                       f"first kept")

    def date_of(self, res: dict, field: str, value: Any) -> tuple[dt.date, str] | None:
        try:
            d, precision = _parse_date(value)
        except _BadDate:
            self.issue(_rid(res), "warning", f"unparseable date in {field}; ignored")
            return None
        if precision != "day":
            self.issue(_rid(res), "info", f"{field} has {precision} precision; read as the first day of it")
        return d, precision

    def match(self, res: dict, cc: Any, section: str, field: str) -> list[tuple[_Entry, str, str]]:
        """Codings of cc -> [(entry, code, display)]. Reports codings without a system."""
        out: list[tuple[_Entry, str, str]] = []
        seen: set[tuple[str, int]] = set()
        for i, c in enumerate(_codings(cc)):
            code = c.get("code")
            if code is None or str(code).strip() == "":
                continue
            if not c.get("system"):
                self.issue(_rid(res), "warning",
                           f"{field}.coding[{i}] code {_shown(code)} has no system; not mapped")
                continue
            key = self.t.system_key(c.get("system"))
            if key is None:
                continue  # unknown code system: silently ignored
            for entry in self.t.lookup(section, key, str(code)):
                if entry.key not in seen:
                    seen.add(entry.key)
                    out.append((entry, str(code), c.get("display") or entry.display(str(code)) or str(code)))
        return out

    # -- run -------------------------------------------------------------------------------
    def run(self) -> FhirMapping:
        self.do_patient()
        handlers = {
            "Condition": self.do_condition,
            "Observation": self.do_observation,
            "Procedure": self.do_procedure,
            "MedicationRequest": self.do_medication,
            "MedicationStatement": self.do_medication,
            "QuestionnaireResponse": self.do_questionnaire_response,
        }
        self.obs_candidates: dict[str, list[tuple[dt.date, str, Any, str]]] = defaultdict(list)
        self.sb_obs: dict[str, list[tuple[dt.date, str, Any, str]]] = defaultdict(list)
        self.sb_qr: list[tuple[dt.date, str, dict]] = []
        self.proc_groups: dict[tuple, list[tuple[dt.date | None, str, str | None, str]]] = defaultdict(list)
        self.meds: list[dict] = []
        self.conditions_seen: list[tuple[dict, dt.date | None, dt.date | None, str | None]] = []
        for res in self.resources:
            if self.patient_id and not self._belongs(res):
                continue
            h = handlers.get(res["resourceType"])
            if h is not None:
                try:
                    h(res)
                except (AttributeError, TypeError, ValueError, KeyError, IndexError, RecursionError):
                    # A resource whose structure is not FHIR (a string where an object belongs, ...):
                    # report it and go on; one bad resource must not lose the patient's other data.
                    self.issue(_rid(res), "error", f"{res['resourceType']} does not have the FHIR R4 structure "
                                                   "this adapter reads; resource skipped")
        self.finish_observations()
        self.finish_medications()
        self.finish_procedures()
        self.finish_start_back()
        self.finish_context()
        if self.future:
            parts = ", ".join(f"{n} {t}" for t, n in sorted(self.future.items()))
            self.issue("", "info", f"resources dated after the reference date {self.ref.isoformat()} "
                                   f"were ignored: {parts}")
        return self.build()

    def _belongs(self, res: dict) -> bool:
        pid = None
        for f in _PATIENT_REF_FIELDS:
            v = res.get(f)
            if isinstance(v, dict) and isinstance(v.get("reference"), str):
                pid = _ref_id(v["reference"])
                break
        if pid is None or pid == self.patient_id or pid in self.patient_aliases:
            return True
        self.issue(_rid(res), "warning", f"refers to another patient ({pid}); skipped")
        return False

    # -- Patient ----------------------------------------------------------------------------
    def do_patient(self) -> None:
        patients = [r for r in self.resources if r["resourceType"] == "Patient"]
        self.patient_aliases: set[str] = set()
        if not patients:
            self.issue("", "warning", "no Patient resource: age_years and sex are unknown")
            return
        if len(patients) > 1:
            self.issue(_rid(patients[1]), "error",
                       f"{len(patients)} Patient resources; only {_rid(patients[0])} is mapped and resources "
                       f"of the others are skipped")
        p = patients[0]
        rid = _rid(p)
        self.patient_id = str(p.get("id")) if p.get("id") is not None else None
        for url, res in self.full_urls.items():
            if res is p:
                self.patient_aliases.add(_ref_id(url) or "")
        gender = p.get("gender")
        if gender in ("female", "male", "other", "unknown"):
            self.context["sex"] = _Evidence(gender, [rid])
        elif gender is not None:
            self.issue(rid, "warning", f"Patient.gender {_shown(gender)} is not a FHIR administrative gender; sex unknown")
        if p.get("birthDate") is not None:
            got = self.date_of(p, "Patient.birthDate", p["birthDate"])
            if got:
                birth = got[0]
                if birth > self.ref:
                    self.issue(rid, "error", f"birthDate {birth.isoformat()} is after the reference date "
                                             f"{self.ref.isoformat()}; age unknown")
                else:
                    self.birth = birth
                    self.age = _years_between(birth, self.ref)
                    if self.age > 125:
                        self.issue(rid, "warning", f"age {self.age} years is implausible; age_years not set")
                        self.age = None
                    else:
                        self.context["age_years"] = _Evidence(self.age, [rid])
        else:
            self.issue(rid, "warning", "Patient.birthDate missing: age_years unknown")
        deceased = p.get("deceasedDateTime") or p.get("deceasedBoolean")
        if deceased:
            self.issue(rid, "warning", f"patient is recorded as deceased ({deceased}); the case is still mapped")

    # -- Condition --------------------------------------------------------------------------
    def condition_dates(self, res: dict) -> tuple[dt.date | None, dt.date | None]:
        rid = _rid(res)
        onset = None
        if "onsetDateTime" in res:
            got = self.date_of(res, "Condition.onsetDateTime", res["onsetDateTime"])
            onset = got[0] if got else None
        elif isinstance(res.get("onsetPeriod"), dict) and res["onsetPeriod"].get("start"):
            got = self.date_of(res, "Condition.onsetPeriod.start", res["onsetPeriod"]["start"])
            onset = got[0] if got else None
        elif isinstance(res.get("onsetAge"), dict):
            age = res["onsetAge"]
            if self.birth and isinstance(age.get("value"), (int, float)) and age.get("code", age.get("unit", "a")) in (
                    "a", "yr", "year", "years"):
                onset = self.birth + dt.timedelta(days=int(age["value"] * 365.25))
            else:
                self.issue(rid, "info", "Condition.onsetAge without a birth date or not in years; ignored")
        elif "onsetString" in res:
            self.issue(rid, "info", "Condition.onsetString is free text; onset unknown")
        abatement = None
        if "abatementDateTime" in res:
            got = self.date_of(res, "Condition.abatementDateTime", res["abatementDateTime"])
            abatement = got[0] if got else None
        elif isinstance(res.get("abatementPeriod"), dict) and res["abatementPeriod"].get("end"):
            got = self.date_of(res, "Condition.abatementPeriod.end", res["abatementPeriod"]["end"])
            abatement = got[0] if got else None
        if onset is not None and self.birth is not None and onset < self.birth:
            self.issue(rid, "warning", f"onset {onset.isoformat()} is before the birth date {self.birth.isoformat()} "
                                       f"(bad data, e.g. a date shift); onset not used")
            onset = None
        if onset is not None and abatement is not None and abatement < onset:
            self.issue(rid, "warning", f"abatement {abatement.isoformat()} is before onset {onset.isoformat()}; "
                                       f"abatement not used")
            abatement = None
        return onset, abatement

    def do_condition(self, res: dict) -> None:
        rid = _rid(res)
        verification = _status_code(res.get("verificationStatus"))
        if verification in _IGNORED_VERIFICATION:
            if self.match(res, res.get("code"), "conditions", "Condition.code"):
                self.issue(rid, "info", f"verificationStatus {verification}: ignored")
            return
        code = res.get("code")
        if not _codings(code):
            if isinstance(code, dict) and code.get("text"):
                self.issue(rid, "info", "Condition has text only, no coding; not mapped")
            elif code is None:
                self.issue(rid, "warning", "Condition has no code; not mapped")
            return
        matches = self.match(res, code, "conditions", "Condition.code")
        if not matches:
            return
        clinical = _status_code(res.get("clinicalStatus"))
        onset, abatement = self.condition_dates(res)
        if onset is not None and onset > self.ref:
            self.future["Condition"] += 1
            return
        active = clinical in _ACTIVE
        if not active and clinical in ("inactive", "remission", "resolved") and abatement is not None \
                and abatement > self.ref:
            active = True  # abated only after the reference date: still active as of that date
        if clinical is None:
            pass
        elif clinical not in _ACTIVE | {"inactive", "remission", "resolved"}:
            self.issue(rid, "warning", f"clinicalStatus {_shown(clinical)} is not a FHIR condition-clinical code; "
                                       f"treated as not active")
        if abatement is not None and abatement <= self.ref and active:
            self.issue(rid, "warning", f"clinicalStatus {clinical} but abatement {abatement.isoformat()} is "
                                       f"recorded; treated as active")
        self.conditions_seen.append((res, onset, abatement, clinical))
        recent_weeks = self.s.get("recent_weeks", 12)
        current_days = self.s.get("current_symptom_days", 14)
        for entry, code_, display in matches:
            d = entry.data
            if d.get("note_only"):
                if active or clinical is None:
                    self.issue(rid, "info", f"{display}: {d['note_only']}")
                continue
            facts: dict[str, str] = dict(d.get("facts") or {})
            if d.get("fact"):
                facts[d["fact"]] = d.get("value", "present")
            when = d.get("when", "status")
            for fact, value in facts.items():
                if when == "status":
                    ok = active or (fact in self.t.any_status and clinical in (None, "inactive", "remission",
                                                                                "resolved"))
                    if not ok and clinical is None:
                        self.issue(rid, "warning", f"{display}: no clinicalStatus; not counted for {fact} "
                                                   f"(only active/recurrence/relapse count)")
                elif when == "recent":
                    last = abatement or onset
                    ok = active or (last is not None and (self.ref - last).days <= recent_weeks * 7)
                    if not ok and last is None and clinical is not None:
                        self.issue(rid, "info", f"{display}: no date; {fact} (recent) not set")
                elif when == "current":
                    ok = active and onset is not None and (self.ref - onset).days <= current_days
                    if active and onset is None:
                        self.issue(rid, "info", f"{display}: active but no onset date; {fact} not set")
                else:  # any
                    ok = True
                if ok:
                    self.set_finding(fact, value, rid)
            if d.get("region") and clinical is None:
                self.issue(rid, "warning", f"{display}: no clinicalStatus; not used for the region or the pain "
                                           f"episode (only active/recurrence/relapse count)")
            if d.get("region") and active:
                self.region_refs[d["region"]].append(rid)
                if d.get("pain"):
                    self.pain_conditions.append((onset, d["region"], res, display, True))
                lat = (d.get("laterality") or {})
                for prefix, side in lat.items():
                    if _norm_code("icd10", code_).startswith(_norm_code("icd10", prefix)):
                        self.laterality[side].append(rid)
            elif d.get("region") and d.get("pain") and d["region"] == "back":
                # inactive back pain: kept for first_episode_back_pain
                self.pain_conditions.append((onset, d["region"], res, display, False))

    # -- Observation ------------------------------------------------------------------------
    _OBS_OK = {"final", "amended", "corrected", "preliminary", None}

    def effective_date(self, res: dict, kind: str) -> tuple[dt.date, Any] | None:
        for field in ("effectiveDateTime", "effectiveInstant"):
            if field in res:
                got = self.date_of(res, f"{kind}.{field}", res[field])
                return (got[0], res[field]) if got else None
        per = res.get("effectivePeriod")
        if isinstance(per, dict) and (per.get("end") or per.get("start")):
            v = per.get("end") or per.get("start")
            got = self.date_of(res, f"{kind}.effectivePeriod", v)
            return (got[0], v) if got else None
        if "issued" in res:
            got = self.date_of(res, f"{kind}.issued", res["issued"])
            return (got[0], res["issued"]) if got else None
        return None

    def do_observation(self, res: dict) -> None:
        rid = _rid(res)
        status = res.get("status")
        if status not in self._OBS_OK:
            return
        # STarT Back item observations (cds convention)
        sb_system = self.t.start_back.get("observation_system")
        sb_items = [c for c in _codings(res.get("code")) if c.get("system") == sb_system]
        targets: list[tuple[_Entry, str, dict]] = []
        for entry, _code, display in self.match(res, res.get("code"), "observations", "Observation.code"):
            targets.append((entry, display, res))
        for i, comp in enumerate(res.get("component") or []):
            if isinstance(comp, dict):
                for entry, _code, display in self.match(res, comp.get("code"), "observations",
                                                       f"Observation.component[{i}].code"):
                    targets.append((entry, display, comp))
        if not targets and not sb_items:
            return
        when = self.effective_date(res, "Observation")
        if when is None:
            self.issue(rid, "warning", "Observation has no usable effective date; not used")
            return
        date, raw = when
        if date > self.ref:
            self.future["Observation"] += 1
            return
        if sb_items:
            item = self._sb_item(str(sb_items[0].get("code", "")))
            if item:
                self.sb_obs[item].append((date, raw, res, rid))
            else:
                self.issue(rid, "warning", f"STarT Back observation code {_shown(sb_items[0].get('code'))} is not q1..q9")
        for entry, display, holder in targets:
            d = entry.data
            fact = d["fact"]
            if holder.get("dataAbsentReason") is not None:
                continue
            value = self.obs_value(res, holder, d, display)
            if value is None:
                continue
            self.obs_candidates[fact].append((date, raw, value, rid))

    _UNITS: dict[str, dict[str | None, Any]] = {
        "temperature": {"cel": 1.0, "°c": 1.0, "degc": 1.0, "c": 1.0, "[degf]": "F", "°f": "F", "degf": "F", "f": "F"},
        "bmi": {"kg/m2": 1.0, "kg/m^2": 1.0, "kg/m²": 1.0, None: 1.0},
        "pressure": {"mm[hg]": 1.0, "mmhg": 1.0, "mm hg": 1.0, None: 1.0},
        "rate": {"/min": 1.0, "{beats}/min": 1.0, "beats/min": 1.0, "beats/minute": 1.0, "bpm": 1.0, "{beat}/min": 1.0,
                 None: 1.0},
        "esr": {"mm/h": 1.0, "mm/hr": 1.0, "mm/(1.h)": 1.0, None: 1.0},
        "crp": {"mg/l": 1.0, "mg/dl": 10.0, "ug/ml": 1.0, "µg/ml": 1.0},
        "wbc": {"10*3/ul": 1.0, "10^3/ul": 1.0, "k/ul": 1.0, "10*9/l": 1.0, "10^9/l": 1.0, "x10^9/l": 1.0,
                "10*3/mm3": 1.0, "/ul": 0.001, "/mm3": 0.001, "{cells}/ul": 0.001, "10.e3/ul": 1.0},
        "score_0_10": {"{score}": 1.0, "1": 1.0, "": 1.0, None: 1.0, "{#}": 1.0},
    }
    _RANGES = {"temperature": (25.0, 45.0), "bmi": (8.0, 150.0), "pressure": (20.0, 300.0), "rate": (1.0, 300.0),
               "esr": (0.0, 200.0), "crp": (0.0, 1000.0), "wbc": (0.0, 500.0), "score_0_10": (0.0, 10.0)}
    _COMPARATORS = {"<": "lt", "<=": "le", ">=": "ge", ">": "gt"}

    def obs_value(self, res: dict, holder: dict, d: dict, display: str) -> Any:
        rid = _rid(res)
        kind = d["kind"]
        fact = d["fact"]
        if kind == "coded":
            cc = holder.get("valueCodeableConcept")
            vm = d.get("value_map") or {}
            for c in _codings(cc):
                if self.t.system_key(c.get("system")) == vm.get("system"):
                    code = str(c.get("code"))
                    if code in (vm.get("present") or {}):
                        return "present"
                    if code in (vm.get("absent") or {}):
                        return "absent"
            return None
        q = holder.get("valueQuantity")
        if not isinstance(q, dict):
            if kind == "score_0_10" and isinstance(holder.get("valueInteger"), int):
                q = {"value": holder["valueInteger"]}
            else:
                if any(k.startswith("value") for k in holder):
                    self.issue(rid, "warning", f"{display}: value is not a Quantity; not used for {fact}")
                return None
        v = q.get("value")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            self.issue(rid, "warning", f"{display}: valueQuantity.value missing or not a number; not used")
            return None
        unit = q.get("code") if q.get("code") is not None else q.get("unit")
        ukey = str(unit).strip().lower() if unit is not None else None
        table = self._UNITS[kind]
        if ukey not in table:
            self.issue(rid, "warning", f"{display}: unit {_shown(unit)} not understood for {fact}; not used")
            return None
        factor = table[ukey]
        if factor == "F":
            val = (float(v) - 32.0) * 5.0 / 9.0
        else:
            val = float(v) * factor
        lo, hi = self._RANGES[kind]
        if not lo <= val <= hi:
            self.issue(rid, "warning", f"{display}: value {v} {unit or ''} is implausible for {fact}; not used")
            return None
        val = round(val, 2)
        if val == int(val) and kind in ("pressure", "rate", "score_0_10", "esr"):
            val = int(val)
        comp = q.get("comparator")
        if comp:
            key = self._COMPARATORS.get(comp)
            if key is None:
                self.issue(rid, "warning", f"{display}: comparator {_shown(comp)} not understood; not used")
                return None
            return {key: val}
        return val

    def finish_observations(self) -> None:
        max_age = self.s.get("observation_max_age_days", {})
        for fact, cands in self.obs_candidates.items():
            cands.sort(key=lambda c: (c[0], _sort_key(c[1])), reverse=True)
            date, raw, value, rid = cands[0]
            limit = max_age.get(fact)
            age_days = (self.ref - date).days
            if limit is not None and age_days > limit:
                self.issue(rid, "info", f"newest {fact} is from {date.isoformat()} ({age_days} days before the "
                                        f"reference date, limit {limit}); not used")
                continue
            if fact == "back_pain_severity_nrs":
                self.pending_pain = (value, rid)
                continue
            if fact == "smoking_history":
                self.set_finding(fact, value, rid)
                continue
            self.set_finding(fact, value, rid, priority=20)

    # -- medications ------------------------------------------------------------------------
    _NON_SYSTEMIC = re.compile(r"topical|cutaneous|ophthalm|\beye\b|\bear\b|otic|nasal|inhal|rectal|vaginal|"
                               r"transdermal|intra-?articular|cream|ointment|lotion|\bgel\b|drops|spray|"
                               r"inhaler|dermal|foam|shampoo|enema|suppositor", re.I)
    _NAME_HINTS = {
        "systemic corticosteroid": re.compile(r"predniso|methylpred|dexameth|hydrocort|betameth|cortisone|"
                                              r"deflazacort|triamcinolone", re.I),
        "immunosuppressant": re.compile(r"methotrex|azathiop|cyclospor|ciclospor|tacrolim|mycophenol|"
                                        r"adalimumab|etanercept|infliximab|rituximab|tofacitinib|leflunomide|"
                                        r"sirolimus|everolimus|cyclophosph", re.I),
        "anticoagulant": re.compile(r"warfarin|apixaban|rivaroxaban|dabigatran|edoxaban|enoxaparin|heparin|"
                                    r"dalteparin|fondaparinux", re.I),
    }

    def med_concept(self, res: dict) -> tuple[Any, dict | None]:
        """(CodeableConcept, Medication resource or None)."""
        if isinstance(res.get("medicationCodeableConcept"), dict):
            return res["medicationCodeableConcept"], None
        ref = res.get("medicationReference")
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            r = ref["reference"]
            med = None
            if r.startswith("#"):
                for c in res.get("contained") or []:
                    if isinstance(c, dict) and c.get("id") == r[1:]:
                        med = c
            else:
                med = self.full_urls.get(r) or self.by_type_id.get(("Medication", _ref_id(r) or ""))
            if med is None:
                self.issue(_rid(res), "warning", f"medicationReference {_shown(r)} cannot be resolved; not mapped")
                return None, None
            return med.get("code"), med
        return None, None

    def do_medication(self, res: dict) -> None:
        rid = _rid(res)
        kind = res["resourceType"]
        status = res.get("status")
        status = status.lower() if isinstance(status, str) else ""
        if status in ("entered-in-error", "cancelled", "draft", "not-taken") or res.get("doNotPerform") is True:
            return
        if res.get("intent") == "proposal":
            return
        cc, med = self.med_concept(res)
        if cc is None:
            return
        matches = self.match(res, cc, "medications", f"{kind}.medication")
        text = " ".join([_cc_text(cc)] + [str(c.get("display", "")) for c in _codings(cc)])
        routes = []
        for dose in res.get("dosageInstruction") or res.get("dosage") or []:
            if isinstance(dose, dict):
                routes.append(_cc_text(dose.get("route")))
        form_text = _cc_text(med.get("form")) if med else ""
        non_systemic = bool(self._NON_SYSTEMIC.search(" ".join(routes + [form_text, text])))
        # dates
        start = end = None
        start_raw = None
        if kind == "MedicationRequest":
            if res.get("authoredOn"):
                got = self.date_of(res, "MedicationRequest.authoredOn", res["authoredOn"])
                start = got[0] if got else None
                start_raw = res["authoredOn"]
            disp = res.get("dispenseRequest") or {}
            vp = disp.get("validityPeriod") if isinstance(disp, dict) else None
            if isinstance(vp, dict):
                if vp.get("start") and start is None:
                    got = self.date_of(res, "dispenseRequest.validityPeriod.start", vp["start"])
                    start = got[0] if got else None
                if vp.get("end"):
                    got = self.date_of(res, "dispenseRequest.validityPeriod.end", vp["end"])
                    end = got[0] if got else None
            esd = disp.get("expectedSupplyDuration") if isinstance(disp, dict) else None
            if end is None and start is not None and isinstance(esd, dict) and \
                    isinstance(esd.get("value"), (int, float)):
                mult = {"d": 1, "day": 1, "days": 1, "wk": 7, "week": 7, "weeks": 7, "mo": 30, "month": 30,
                        "months": 30, "a": 365, "year": 365}.get(str(esd.get("code") or esd.get("unit") or "").lower())
                if mult:
                    end = start + dt.timedelta(days=int(esd["value"] * mult))
        else:
            if res.get("effectiveDateTime"):
                got = self.date_of(res, "MedicationStatement.effectiveDateTime", res["effectiveDateTime"])
                start = got[0] if got else None
                start_raw = res["effectiveDateTime"]
            elif isinstance(res.get("effectivePeriod"), dict):
                per = res["effectivePeriod"]
                if per.get("start"):
                    got = self.date_of(res, "MedicationStatement.effectivePeriod.start", per["start"])
                    start = got[0] if got else None
                    start_raw = per["start"]
                if per.get("end"):
                    got = self.date_of(res, "MedicationStatement.effectivePeriod.end", per["end"])
                    end = got[0] if got else None
        if start is not None and start > self.ref:
            self.future[kind] += 1
            return
        active = status in ("active", "on-hold") and (end is None or end >= self.ref)
        if status in ("active", "on-hold") and end is not None and end < self.ref:
            self.issue(rid, "info", f"status {status} but the order ended {end.isoformat()}; treated as not current")
        continuous = any(c.get("code") == "continuous" for c in _codings(res.get("courseOfTherapyType")))
        classes: list[tuple[str, str]] = []
        for entry, _code, display in matches:
            cls = entry.data.get("drug_class")
            if cls == "systemic_corticosteroid" and non_systemic:
                continue
            if cls == "systemic_corticosteroid" and entry.data.get("route_checked") and not routes and not form_text:
                self.issue(rid, "warning", f"{display}: ingredient-level code without route or dose form; "
                                           f"assumed systemic")
            if cls and (cls, display) not in classes and cls not in [c for c, _ in classes]:
                classes.append((cls, display))
        if not classes:
            if not non_systemic:
                for label, pat in self._NAME_HINTS.items():
                    if pat.search(text):
                        self.issue(rid, "warning", f"a text that looks like a {label} by name but its code is "
                                                   f"not in codes.yaml; not mapped")
                        break
            return
        self.meds.append({"rid": rid, "classes": classes, "start": start, "end": end, "active": active,
                          "continuous": continuous, "status": status, "raw": start_raw})

    def finish_medications(self) -> None:
        long_weeks = self.s.get("long_term_steroid_weeks", 12)
        gap_weeks = self.s.get("steroid_chain_gap_weeks", 13)
        by_class: dict[str, list[dict]] = defaultdict(list)
        for m in self.meds:
            for cls, display in m["classes"]:
                by_class[cls].append({**m, "display": display})
        for cls, meds in by_class.items():
            info = self.t.drug_classes.get(cls, {})
            active = [m for m in meds if m["active"]]
            if cls == "systemic_corticosteroid":
                self.steroids(meds, active, info, long_weeks, gap_weeks)
                continue
            if not active:
                continue
            if info.get("fact"):
                for m in active:
                    self.set_finding(info["fact"], "present", m["rid"])
            elif info.get("note"):
                for m in active:
                    self.issue(m["rid"], "info", f"{info['note']}: {m['display']}")

    def steroids(self, meds: list[dict], active: list[dict], info: dict, long_weeks: int, gap_weeks: int) -> None:
        fact = info.get("fact", "long_term_systemic_corticosteroids")
        dated = sorted([m for m in meds if m["start"] is not None], key=lambda m: m["start"])
        if not active:
            # past use only: report prolonged past use, do not set the fact
            if dated:
                first, last = dated[0]["start"], max((m["end"] or m["start"]) for m in dated)
                if (last - first).days >= long_weeks * 7:
                    self.issue(dated[-1]["rid"], "info",
                               f"past systemic corticosteroid orders from {first.isoformat()} to {last.isoformat()}; "
                               f"none is current, so {fact} is not set")
            return
        for m in active:
            if m["continuous"]:
                self.set_finding(fact, "present", m["rid"])
        # chain: walk back from the newest active order while gaps are short
        chain_start = None
        chain_refs: list[str] = []
        current_end = self.ref
        for m in sorted(dated, key=lambda m: m["start"], reverse=True):
            m_end = self.ref if m["active"] else (m["end"] or m["start"])
            if chain_start is None:
                if not m["active"]:
                    continue
                chain_start = m["start"]
                chain_refs.append(m["rid"])
                current_end = m_end
                continue
            if (chain_start - m_end).days <= gap_weeks * 7:
                chain_start = min(chain_start, m["start"])
                chain_refs.append(m["rid"])
        if chain_start is None:
            self.issue(active[0]["rid"], "warning", f"current systemic corticosteroid without a start date; "
                                                    f"{fact} (long-term) not set")
            return
        span_weeks = (self.ref - chain_start).days / 7
        if span_weeks >= long_weeks:
            self.set_finding(fact, "present", chain_refs)
        elif fact not in self.findings:
            self.issue(chain_refs[0], "warning",
                       f"current systemic corticosteroid for {span_weeks:.1f} weeks (< {long_weeks}); long-term "
                       f"use not established, {fact} not set")
        del current_end

    # -- Procedure --------------------------------------------------------------------------
    _PROC_OK = {"completed", "in-progress", "stopped"}
    _HIP_SITE = re.compile(r"\bhip\b|coxa|acetabul|femoral head", re.I)
    _HIP_SITE_CODES = {"24136001", "29836001", "287579007", "287585005"}

    def do_procedure(self, res: dict) -> None:
        rid = _rid(res)
        status = res.get("status")
        if status not in self._PROC_OK:
            return
        matches = self.match(res, res.get("code"), "procedures", "Procedure.code")
        if not matches:
            return
        date = None
        raw = None
        if "performedDateTime" in res:
            got = self.date_of(res, "Procedure.performedDateTime", res["performedDateTime"])
            date, raw = (got[0], res["performedDateTime"]) if got else (None, None)
        elif isinstance(res.get("performedPeriod"), dict):
            per = res["performedPeriod"]
            v = per.get("start") or per.get("end")
            if v:
                got = self.date_of(res, "Procedure.performedPeriod", v)
                date, raw = (got[0], v) if got else (None, None)
        if date is not None and date > self.ref:
            self.future["Procedure"] += 1
            return
        if date is not None and self.birth is not None and date < self.birth:
            self.issue(rid, "warning", f"performed {date.isoformat()} is before the birth date; date not used")
            date = None
        recent_weeks = self.s.get("recent_weeks", 12)
        sites = res.get("bodySite") or []
        site_text = " ".join(_cc_text(s) for s in sites if isinstance(s, dict))
        site_codes = {str(c.get("code")) for s in sites for c in _codings(s)}
        outcome = self.procedure_outcome(res)
        for entry, _code, display in matches:
            d = entry.data
            if d.get("note_only"):
                self.issue(rid, "info", f"{display}: {d['note_only']}")
                continue
            if d.get("fact"):
                fact, when = d["fact"], d.get("when", "any")
                ok = True
                if d.get("body_site") == "hip":
                    ok = bool(self._HIP_SITE.search(site_text)) or bool(site_codes & self._HIP_SITE_CODES)
                    if not ok:
                        self.issue(rid, "info", f"{display}: body site {'recorded' if site_text else 'not recorded'} is not the "
                                                f"hip; {fact} not set")
                if ok and when == "recent":
                    if date is None:
                        self.issue(rid, "info", f"{display}: no performed date; {fact} (recent) not set")
                        ok = False
                    else:
                        ok = (self.ref - date).days <= recent_weeks * 7
                if ok:
                    self.set_finding(fact, d.get("value", "present"), rid)
            if d.get("treatment"):
                t = d["treatment"]
                key = (t["step"], tuple(t.get("modalities") or ()))
                self.proc_groups[key].append((date, rid, outcome, display))

    def procedure_outcome(self, res: dict) -> str | None:
        po = self.t.procedure_outcomes
        oc = res.get("outcome")
        if not isinstance(oc, dict):
            return None
        for c in _codings(oc):
            if self.t.system_key(c.get("system")) == po.get("system") and str(c.get("code")) in po.get("map", {}):
                return po["map"][str(c.get("code"))]
        text = str(oc.get("text") or "").strip().lower().replace(" ", "-").replace("_", "-")
        if text in po.get("text_values", []):
            return text
        if oc:
            self.issue(_rid(res), "info", f"Procedure.outcome {_shown(_cc_text(oc))} not understood; outcome unknown")
        return None

    def finish_procedures(self) -> None:
        for (step, modalities), rows in self.proc_groups.items():
            with_outcome = [r for r in rows if r[2] is not None]
            label = f"{step}" + (f" ({', '.join(modalities)})" if modalities else "")
            if not with_outcome:
                self.issue(rows[-1][1], "info",
                           f"{len(rows)} Procedure(s) for {label} without Procedure.outcome; not added to "
                           f"treatments (the outcome is required and never guessed)")
                continue
            dates = sorted(r[0] for r in rows if r[0] is not None)
            with_outcome.sort(key=lambda r: (r[0] or dt.date.min))
            outcome = with_outcome[-1][2]
            rec: dict[str, Any] = {"step": step}
            if modalities:
                rec["modalities"] = list(modalities)
            if step == "physical-therapy":
                rec["weeks"] = _weeks(dates[0], dates[-1]) if dates else "unknown"
                rec["sessions"] = len(rows)
            else:
                rec["weeks"] = _weeks(dates[-1], self.ref) if dates else "unknown"
            rec["outcome"] = outcome
            names = sorted({r[3] for r in rows})
            rec["note"] = ("From FHIR Procedure: " + "; ".join(names))[:2000]
            self.treatments.append(rec)
            self.treatment_prov.append([r[1] for r in rows])

    # -- STarT Back -------------------------------------------------------------------------
    def _sb_item(self, link_id: str) -> str | None:
        lid = str(link_id).strip().lower()
        for name, aliases in self.t.start_back.get("items", {}).items():
            if lid == name or lid in [a.lower() for a in aliases]:
                return name
        return None

    def do_questionnaire_response(self, res: dict) -> None:
        rid = _rid(res)
        q = str(res.get("questionnaire") or "").lower()
        markers = self.t.start_back.get("questionnaire_url_markers", [])
        items = list(self._walk_items(res.get("item") or []))
        n_sb = sum(1 for it in items if self._sb_item(str(it.get("linkId", ""))))
        if not (any(m in q for m in markers) or n_sb >= 5):
            return
        status = res.get("status")
        if status not in ("completed", "amended"):
            self.issue(rid, "info", f"STarT Back QuestionnaireResponse with status {_shown(status)}; not used")
            return
        if not res.get("authored"):
            self.issue(rid, "warning", "STarT Back QuestionnaireResponse without an authored date; not used")
            return
        got = self.date_of(res, "QuestionnaireResponse.authored", res["authored"])
        if not got:
            return
        if got[0] > self.ref:
            self.future["QuestionnaireResponse"] += 1
            return
        self.sb_qr.append((got[0], str(res["authored"]), res))

    def _walk_items(self, items: Any) -> Iterator[dict]:
        if not isinstance(items, list):
            return
        for it in items:
            if not isinstance(it, dict):
                continue
            yield it
            yield from self._walk_items(it.get("item") or [])
            for ans in it.get("answer") or []:
                if isinstance(ans, dict):
                    yield from self._walk_items(ans.get("item") or [])

    def _norm_word(self, s: str) -> str:
        return re.sub(r"[\s_]+", "-", str(s).strip().lower())

    def sb_answer(self, item: str, holder: dict, rid: str) -> tuple[bool, Any]:
        """(ok, value) from an answer/Observation value[x]."""
        sb = self.t.start_back
        agree = {a.lower() for a in sb.get("agree", [])}
        disagree = {a.lower() for a in sb.get("disagree", [])}
        options = sb.get("q9_options", [])
        cands: list[Any] = []
        if "valueBoolean" in holder:
            cands.append(holder["valueBoolean"])
        if "valueInteger" in holder:
            cands.append(holder["valueInteger"])
        if "valueString" in holder:
            cands.append(holder["valueString"])
        if isinstance(holder.get("valueCoding"), dict):
            c = holder["valueCoding"]
            cands.extend([c.get("code"), c.get("display")])
        if isinstance(holder.get("valueCodeableConcept"), dict):
            for c in _codings(holder["valueCodeableConcept"]):
                cands.extend([c.get("code"), c.get("display")])
            cands.append(holder["valueCodeableConcept"].get("text"))
        for v in cands:
            if v is None:
                continue
            if item == "q9_bothersomeness":
                if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(options):
                    return True, options[v]
                if isinstance(v, str) and self._norm_word(v) in options:
                    return True, self._norm_word(v)
            else:
                if isinstance(v, bool):
                    return True, v
                if isinstance(v, int) and v in (0, 1):
                    return True, bool(v)
                if isinstance(v, str):
                    w = v.strip().lower()
                    if w in agree:
                        return True, True
                    if w in disagree:
                        return True, False
        if cands:
            self.issue(rid, "warning", f"STarT Back {item}: answer {_shown(cands[0])} not understood; left unanswered")
        return False, None

    def finish_start_back(self) -> None:
        max_days = self.s.get("start_back_max_age_days", 28)
        names = list(self.t.start_back.get("items", {}).keys())
        if self.sb_qr:
            self.sb_qr.sort(key=lambda r: (r[0], r[1]), reverse=True)
            date, _, res = self.sb_qr[0]
            rid = _rid(res)
            if (self.ref - date).days > max_days:
                self.issue(rid, "info", f"newest STarT Back response is from {date.isoformat()} (more than "
                                        f"{max_days} days before the reference date); not used")
            else:
                out: dict[str, Any] = {n: None for n in names}
                for it in self._walk_items(res.get("item") or []):
                    name = self._sb_item(str(it.get("linkId", "")))
                    if not name:
                        continue
                    answers = [a for a in it.get("answer") or [] if isinstance(a, dict)]
                    if not answers:
                        continue
                    ok, value = self.sb_answer(name, answers[0], rid)
                    if ok:
                        out[name] = value
                        self.start_back_prov[f"start_back.{name}"] = [rid]
                self.start_back = out
                return
        if self.sb_obs:
            out = {n: None for n in names}
            for name, rows in self.sb_obs.items():
                rows.sort(key=lambda r: (r[0], _sort_key(r[1])), reverse=True)
                date, _, res, rid = rows[0]
                if (self.ref - date).days > max_days:
                    self.issue(rid, "info", f"STarT Back {name} observation is older than {max_days} days; not used")
                    continue
                ok, value = self.sb_answer(name, res, rid)
                if ok:
                    out[name] = value
                    self.start_back_prov[f"start_back.{name}"] = [rid]
            if any(v is not None for v in out.values()):
                self.start_back = out

    # -- context ----------------------------------------------------------------------------
    def finish_context(self) -> None:
        back, hip = self.region_refs["back"], self.region_refs["hip"]
        if back and hip:
            self.context["region"] = _Evidence("both", back + hip)
        elif back:
            self.context["region"] = _Evidence("back", back)
        elif hip:
            self.context["region"] = _Evidence("hip", hip)
        else:
            self.context["region"] = _Evidence("both", [])
            self.issue("", "warning", "no active back or hip condition found; region set to 'both' so that every "
                                      "red flag is considered")
        region = self.context["region"].value
        # pain duration: most recent active back/hip pain Condition
        active_pain = [p for p in self.pain_conditions if p[4]]
        dated = [(p[0], p) for p in active_pain if p[0] is not None]
        if dated:
            onset, (_, _reg, res, _display, _) = max(dated, key=lambda d: d[0])
            self.context["pain_duration_weeks"] = _Evidence(_weeks(onset, self.ref), [_rid(res)])
            back_dated = [d for d in dated if d[1][1] == "back"]
            if back_dated and self.birth is not None:
                first_onset, first = min(back_dated, key=lambda d: d[0])
                self.context["back_pain_onset_age_years"] = _Evidence(_exact_years(self.birth, first_onset),
                                                                      [_rid(first[2]), _rid_patient(self)])
            if back_dated:
                current_onset, current = max(back_dated, key=lambda d: d[0])
                earlier = [p for p in self.pain_conditions if p[1] == "back" and p[0] is not None
                           and p[0] < current_onset and p[2] is not current[2]]
                if earlier:
                    self.set_finding("first_episode_back_pain", "absent",
                                     [_rid(current[2])] + [_rid(p[2]) for p in earlier], priority=5)
        elif active_pain:
            self.issue(_rid(active_pain[0][2]), "info", "active pain condition without a usable onset date; "
                                                        "pain_duration_weeks unknown")
        if len(self.laterality) == 1:
            side, refs = next(iter(self.laterality.items()))
            self.context["leg_symptom_laterality"] = _Evidence(side, refs)
        elif len(self.laterality) > 1:
            refs = [r for rs in self.laterality.values() for r in rs]
            self.context["leg_symptom_laterality"] = _Evidence("bilateral", refs)
        # pain severity (site not coded)
        pending = getattr(self, "pending_pain", None)
        if pending is not None:
            if region in self.s.get("pain_severity_regions", ["back", "both"]):
                self.set_finding("back_pain_severity_nrs", pending[0], pending[1], priority=20)
            else:
                self.issue(pending[1], "info", f"pain severity {pending[0]} recorded but the region is {region}; "
                                               f"back_pain_severity_nrs not set")
        # obesity from BMI (adults)
        bmi = self.findings.get("bmi_kg_m2")
        obesity = self.findings.get("obesity")
        if bmi is not None and obesity is not None and obesity.value == "present" and \
                isinstance(bmi.value, (int, float)) and bmi.value < self.s.get("obesity_bmi_at_or_above", 30):
            self.issue(bmi.refs[0], "info", f"latest BMI {bmi.value} is below the obesity cut-off but an obesity "
                                            f"condition is recorded ({', '.join(obesity.refs)}); obesity kept present")
        if bmi is not None and (obesity is None or obesity.value != "present"):
            cut = self.s.get("obesity_bmi_at_or_above", 30)
            adult = self.s.get("obesity_adult_age_at_or_above", 18)
            v = bmi.value
            verdict = None
            if isinstance(v, (int, float)):
                verdict = "present" if v >= cut else "absent"
            elif isinstance(v, dict):
                (k, n), = v.items()
                if k in ("ge", "gt") and n >= cut:
                    verdict = "present"
                elif k in ("lt",) and n <= cut or k == "le" and n < cut:
                    verdict = "absent"
            if verdict is not None:
                if self.age is None:
                    self.issue(bmi.refs[0], "info", "BMI recorded but age unknown; obesity not derived")
                elif self.age < adult:
                    self.issue(bmi.refs[0], "info", "child: obesity needs a BMI centile; not derived from BMI")
                else:
                    self.set_finding("obesity", verdict, bmi.refs, priority=5)

    # -- output -----------------------------------------------------------------------------
    def build(self) -> FhirMapping:
        case_id = self.case_id
        if case_id is None:
            if self.patient_id:
                case_id = "fhir-" + hashlib.sha256(self.patient_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
            else:
                case_id = "fhir-case"
        context: dict[str, Any] = {}
        provenance: dict[str, list[str]] = {}
        order = ["age_years", "sex", "region", "pain_duration_weeks", "onset", "leg_symptom_laterality",
                 "back_pain_onset_age_years"]
        for key in order:
            if key in self.context:
                ev = self.context[key]
                context[key] = ev.value
                provenance[f"context.{key}"] = _dedupe(ev.refs)
        case: dict[str, Any] = {"case_id": case_id, "context": context}
        findings = {k: self.findings[k].value for k in sorted(self.findings)}
        for k in sorted(self.findings):
            provenance[f"findings.{k}"] = _dedupe(self.findings[k].refs)
        case["findings"] = findings
        if self.treatments:
            case["treatments"] = self.treatments
            for i, refs in enumerate(self.treatment_prov):
                provenance[f"treatments[{i}]"] = _dedupe(refs)
        if self.start_back is not None:
            case["start_back"] = self.start_back
            provenance.update(self.start_back_prov)
        return FhirMapping(case=case, provenance=provenance, issues=list(self.issues))


def _rid_patient(m: _Mapper) -> str:
    return f"Patient/{m.patient_id}" if m.patient_id else "Patient/?"


def _dedupe(refs: list[str]) -> list[str]:
    out: list[str] = []
    for r in refs:
        if r and r not in out:
            out.append(r)
    return out


# ----------------------------------------------------------------------------- explain

def explain(mapping: FhirMapping) -> str:
    """A readable text table: each fact with its value and the resources it came from, then the
    treatments, STarT Back answers and the issues."""
    case = mapping.case
    rows: list[tuple[str, str, str]] = []
    for key, value in case.get("context", {}).items():
        path = f"context.{key}"
        rows.append((path, _fmt_value(value), ", ".join(mapping.provenance.get(path, [])) or "(default)"))
    for key, value in case.get("findings", {}).items():
        path = f"findings.{key}"
        rows.append((path, _fmt_value(value), ", ".join(mapping.provenance.get(path, []))))
    for i, t in enumerate(case.get("treatments", []) or []):
        path = f"treatments[{i}]"
        mods = "/".join(t.get("modalities", []))
        desc = " ".join(x for x in (t["step"], mods, f"{t.get('weeks')} wk -> {t['outcome']}") if x)
        rows.append((path, desc, ", ".join(mapping.provenance.get(path, []))))
    sb = case.get("start_back")
    if sb:
        for key, value in sb.items():
            path = f"start_back.{key}"
            rows.append((path, "unanswered" if value is None else _fmt_value(value),
                         ", ".join(mapping.provenance.get(path, []))))
    w1 = max([len("fact")] + [len(r[0]) for r in rows])
    w2 = min(40, max([len("value")] + [len(r[1]) for r in rows]))
    lines = [f"case {case.get('case_id')}", "",
             f"{'fact'.ljust(w1)}  {'value'.ljust(w2)}  <- resources",
             f"{'-' * w1}  {'-' * w2}  {'-' * 12}"]
    for path, value, refs in rows:
        lines.append(f"{path.ljust(w1)}  {value[:w2].ljust(w2)}  <- {refs}")
    lines.append("")
    issues = mapping.issues
    counts = {s: sum(1 for i in issues if i.severity == s) for s in SEVERITIES}
    lines.append(f"issues: {len(issues)} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    for sev in SEVERITIES:
        for i in issues:
            if i.severity == sev:
                lines.append(f"  [{sev}] {i.resource or '(case)'}: {i.message}")
    return "\n".join(lines) + "\n"
