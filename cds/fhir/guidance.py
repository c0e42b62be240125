"""cds Recommendation -> FHIR R4 GuidanceResponse + RequestGroup.

Stores what cds recommended in the form the HL7 "CDS Hooks clinical reasoning" profiles use for a
CDS Hooks response (``cdshooksguidanceresponse`` / ``cdshooksrequestgroup``)::

    from cds.fhir.guidance import to_guidance_response, to_request_group

    gr = to_guidance_response(rec, subject="Patient/123", request_id=hook_instance,
                              endpoint="https://cds.example.org/cds-services/cds-back-hip-pain")
    rg = to_request_group(rec)

Standard library only; the output is plain JSON-ready dicts. Output is deterministic: the same
recommendation (same facts, same ruleset version) and the same arguments give the same dict, with
no clock and no random ids (ids are SHA-256 / UUIDv5 of the inputs). ``occurrence`` is written only
when passed.

Encoding decisions
------------------
* **Module**: ``moduleUri`` (and ``RequestGroup.instantiatesUri``) is ``urn:cds:ruleset:<id>@<version>``,
  e.g. ``urn:cds:ruleset:back-hip-pain@1.0.0``; the ruleset SHA-256, engine and input hash are in
  the contained ``Parameters`` referenced by ``outputParameters``.
* **status**: ``data-required`` when the recommendation's status is data-required, else ``success``.
* **dataRequirement** (one per missing fact): ``type`` ``Observation`` (a symptom asked or a sign
  examined is recorded as an Observation), ``codeFilter[0]`` ``{path: "code", code: [Coding]}`` whose
  Coding names the fact id in the code system ``https://cds.invalid/fhir/CodeSystem/patient-fact``
  (the ids of schemas/patient-facts.schema.json), and an extension
  ``https://cds.invalid/fhir/StructureDefinition/data-requirement-reason`` (valueString) saying why.
  This is plain FHIR R4 (codeFilter.code is 0..* Coding); no custom element is needed.
* **reasonCode**: one CodeableConcept per red flag (code system ``.../CodeSystem/red-flag``).
* **note**: one Annotation per fired rule (title, message, the sources with their citations), then one
  per caution ("Do not ...").
* **RequestGroup** (contained, referenced by ``result``): ``intent`` proposal, ``priority`` the highest
  action priority. Actions, in order: one per red flag (requiredBehavior must-unless-documented,
  sub-actions: the referral target and its alternatives, selectionBehavior exactly-one), the
  data-required request (one sub-action per fact, each a contained ``Task``), the care step
  (its content and any routine referral) and the advice (``CommunicationRequest``). Every leaf action
  references a request resource and every group has sub-actions (FHIR invariant rqg-1).
* **priority**: the card indicator is mapped through the CDS Hooks ConceptMap
  ``indicator-to-request-priority`` (info -> routine, warning -> urgent, critical -> stat); the
  indicator is critical for an emergency, warning for urgent or data-required, info otherwise
  (:func:`indicator_for`). The same functions drive the CDS Hooks cards (``cds.hooks``).
* When the GuidanceResponse contains the RequestGroup, the RequestGroup's own contained resources
  are lifted into the GuidanceResponse (a contained resource may not contain resources), and the
  RequestGroup's ``#id`` references resolve there.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CARE_STEP_SYSTEM",
    "FACT_SYSTEM",
    "INDICATOR_TO_PRIORITY",
    "RED_FLAG_SYSTEM",
    "REFERRAL_TARGET_SYSTEM",
    "care_step_display",
    "citations_for",
    "fact_label",
    "indicator_for",
    "module_uri",
    "priority_for_indicator",
    "target_display",
    "to_guidance_response",
    "to_request_group",
]

CDS_FHIR_BASE = "https://cds.invalid/fhir"
RED_FLAG_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/red-flag"
FACT_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/patient-fact"
CARE_STEP_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/care-step"
REFERRAL_TARGET_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/referral-target"
DO_NOT_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/do-not"
RULE_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/rule"
EXT_DATA_REASON = f"{CDS_FHIR_BASE}/StructureDefinition/data-requirement-reason"
EXT_CDS_HOOKS_ENDPOINT = "http://hl7.org/fhir/StructureDefinition/cqf-cdsHooksEndpoint"
PROFILE_GUIDANCE_RESPONSE = ("http://hl7.org/fhir/uv/cds-hooks-clinical-reasoning/StructureDefinition/"
                             "cdshooksguidanceresponse")
PROFILE_REQUEST_GROUP = "http://hl7.org/fhir/uv/cds-hooks-clinical-reasoning/StructureDefinition/cdshooksrequestgroup"
ACTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/action-type"
SNOMED = "http://snomed.info/sct"
RFC3986 = "urn:ietf:rfc:3986"

#: CDS Hooks ConceptMap ``indicator-to-request-priority`` (HL7 cds-hooks-clinical-reasoning).
INDICATOR_TO_PRIORITY = {"info": "routine", "warning": "urgent", "critical": "stat"}
_PRIORITY_RANK = {"routine": 0, "urgent": 1, "asap": 2, "stat": 3}

#: Namespace of every UUIDv5 cds derives (guidance ids, card and suggestion uuids).
CDS_UUID_NAMESPACE = uuid.UUID("5b0e4a1c-3f0e-5a7e-9d2b-8c6f1e2a4b70")

_TARGETS = {
    "emergency-department": "Emergency department",
    "spinal-surgery": "Spinal surgery",
    "acute-oncology-mscc": "Acute oncology / MSCC coordinator",
    "suspected-cancer-pathway": "Suspected cancer pathway",
    "urgent-imaging": "Urgent imaging",
    "orthopedics": "Orthopaedics",
    "vascular-surgery": "Vascular surgery",
    "rheumatology": "Rheumatology",
    "metabolic-bone-service": "Metabolic bone service",
    "msk-interface-service": "MSK interface service",
    "pain-management-service": "Pain management service",
    "physiotherapy": "Physiotherapy",
}
_CARE_STEPS = {
    "self-care": "Self-care",
    "physical-therapy": "Physical therapy",
    "medical": "Medical treatment",
    "surgical-referral": "Surgical referral",
}


# ----------------------------------------------------------------------------- small helpers

def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _words(slug: str) -> str:
    text = re.sub(r"[_\-]+", " ", str(slug)).strip()
    return text[:1].upper() + text[1:] if text else str(slug)


def target_display(target: str) -> str:
    """Readable name of a referral-target slug (``urgent-imaging`` -> ``Urgent imaging``)."""
    return _TARGETS.get(target) or _words(target)


def care_step_display(step: Any) -> str:
    step = _value(step)
    return _CARE_STEPS.get(step) or _words(step)


_FACT_LABELS = {
    "iv_drug_use": "IV drug use",
    "hla_b27": "HLA-B27",
    "hiv_or_antiretroviral_therapy": "HIV or antiretroviral therapy",
    "sle_or_autoimmune_disease": "SLE or autoimmune disease",
    "copd": "COPD",
    "nsaid_not_tolerated": "NSAID not tolerated",
    "nsaid_response_within_48h": "NSAID response within 48 h",
    "temperature_c": "Temperature (°C)",
    "bmi_kg_m2": "BMI (kg/m²)",
    "esr_mm_h": "ESR (mm/h)",
    "crp_mg_l": "CRP (mg/L)",
    "wbc_10e9_l": "White cell count (10⁹/L)",
    "systolic_bp_mmhg": "Systolic blood pressure (mmHg)",
    "diastolic_bp_mmhg": "Diastolic blood pressure (mmHg)",
    "heart_rate_bpm": "Heart rate (/min)",
    "back_pain_severity_nrs": "Back pain severity (0-10)",
    "leg_pain_severity_nrs": "Leg pain severity (0-10)",
    "weight_loss_kg": "Weight loss (kg)",
    "morning_stiffness_minutes": "Morning stiffness (minutes)",
    "walking_tolerance_m": "Walking tolerance (m)",
    "off_work_weeks": "Weeks off work",
    "age_years": "Age (years)",
    "pain_duration_weeks": "Pain duration (weeks)",
}


def fact_label(item: str) -> str:
    """Readable name of a fact id: ``saddle_anesthesia`` -> Saddle anesthesia, ``iv_drug_use`` -> IV drug use."""
    name = item.split(".")[-1]
    return _FACT_LABELS.get(name) or _words(name)


def indicator_for(urgency: Any, *, data_required: bool = False) -> str:
    """CDS Hooks card indicator: critical for emergency, warning for urgent or data-required, else info."""
    u = _value(urgency)
    if u == "emergency":
        return "critical"
    if u == "urgent" or data_required:
        return "warning"
    return "info"


def priority_for_indicator(indicator: str) -> str:
    """FHIR request priority of a card indicator (the CDS Hooks ConceptMap)."""
    return INDICATOR_TO_PRIORITY[indicator]


def module_uri(rec: Any) -> str:
    """``urn:cds:ruleset:<id>@<version>`` of the ruleset that produced ``rec``."""
    prov = rec.provenance
    return f"urn:cds:ruleset:{prov.get('ruleset_id', 'unknown')}@{prov.get('ruleset_version', 'unknown')}"


def _digest(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def _uuid5(*parts: Any) -> str:
    return str(uuid.uuid5(CDS_UUID_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(str(text))
    except (ValueError, AttributeError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=32)
def _ruleset_sources(ruleset_id: str, version: str) -> Mapping[str, Mapping[str, Any]]:
    try:
        from cds.rulesets import load_ruleset

        return load_ruleset(ruleset_id, version).sources
    except Exception:  # noqa: BLE001 - citations then come from the reasons only
        return {}


def citations_for(rec: Any, keys: Any) -> list[tuple[str, str, str | None]]:
    """(key, citation, url or None) for source keys, from the ruleset (or the reasons as fallback)."""
    prov = rec.provenance
    table = _ruleset_sources(str(prov.get("ruleset_id")), str(prov.get("ruleset_version")))
    from_reasons = {k: c for r in rec.reasons for k, c in r.sources}
    out: list[tuple[str, str, str | None]] = []
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            continue
        seen.add(k)
        src = table.get(k) or {}
        citation = " ".join(str(src.get("citation") or from_reasons.get(k) or k).split())
        out.append((k, citation, src.get("url") or None))
    return out


def _reference(subject: Any) -> dict[str, Any] | None:
    if subject is None:
        return None
    if isinstance(subject, str):
        if not subject.strip():
            raise ValueError("subject must be a non-empty reference such as 'Patient/123'")
        return {"reference": subject.strip()}
    if isinstance(subject, Mapping) and (subject.get("reference") or subject.get("identifier")
                                         or subject.get("display")):
        return {k: v for k, v in subject.items() if v not in (None, "", [], {})}
    raise ValueError("subject must be a reference string ('Patient/123') or a FHIR Reference dict")


def _datetime(occurrence: Any) -> str | None:
    if occurrence is None:
        return None
    if isinstance(occurrence, dt.datetime):
        if occurrence.tzinfo is None:
            raise ValueError("occurrence must be timezone-aware (a FHIR dateTime with a time needs an offset)")
        return occurrence.isoformat()
    if isinstance(occurrence, dt.date):
        return occurrence.isoformat()
    if isinstance(occurrence, str) and re.match(
            r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2}))?)?)?$", occurrence):
        return occurrence
    raise ValueError("occurrence must be a datetime.datetime (with tzinfo), a datetime.date or a FHIR dateTime")


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _cc(system: str, code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"coding": [_coding(system, code, display)]}
    if text or display:
        out["text"] = text or display
    return out


def _documentation(rec: Any, keys: Any) -> list[dict[str, Any]]:
    docs = []
    for key, citation, url in citations_for(rec, keys):
        item: dict[str, Any] = {"type": "citation", "label": key, "citation": citation}
        if url:
            item["url"] = url
        docs.append(item)
    return docs


def _action_type(code: str) -> dict[str, Any]:
    return {"coding": [_coding(ACTION_TYPE_SYSTEM, code, code.capitalize())]}


def _drop_empty(value: Any) -> Any:
    """Remove None, empty strings, lists and dicts, recursively (FHIR: no empty elements)."""
    if isinstance(value, dict):
        out = {k: _drop_empty(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, "", [], {})}
    if isinstance(value, list):
        out_l = [_drop_empty(v) for v in value]
        return [v for v in out_l if v not in (None, "", [], {})]
    return value


# ----------------------------------------------------------------------------- the builder

class _Builder:
    """Builds the RequestGroup and the request resources its actions reference."""

    def __init__(self, rec: Any, subject: dict[str, Any] | None, authored: str | None):
        self.rec = rec
        self.subject = subject
        self.authored = authored
        self.contained: list[dict[str, Any]] = []
        self._counts: dict[str, int] = {}
        self.module = module_uri(rec)

    def _subject_or_display(self) -> dict[str, Any]:
        # ServiceRequest.subject and CommunicationRequest are about the patient; without a known
        # reference the case id (the only case datum cds ever writes out) names it.
        return self.subject or {"display": f"Patient of case {self.rec.case_id}"}

    def _add(self, prefix: str, resource: dict[str, Any]) -> dict[str, Any]:
        n = self._counts.get(prefix, 0) + 1
        self._counts[prefix] = n
        resource = {"resourceType": resource.pop("resourceType"), "id": f"{prefix}-{n}", **resource}
        self.contained.append(resource)
        return {"reference": f"#{resource['id']}"}

    def referral(self, target: str, priority: str, reason: dict[str, Any] | None, note: str | None) -> dict[str, Any]:
        sr: dict[str, Any] = {
            "resourceType": "ServiceRequest", "status": "draft", "intent": "proposal",
            "category": [_cc(SNOMED, "3457005", "Patient referral")],
            "priority": priority,
            "code": _cc(REFERRAL_TARGET_SYSTEM, target, target_display(target),
                        f"Referral to {target_display(target)}"),
            "subject": self._subject_or_display(),
            "authoredOn": self.authored,
            "performerType": {"text": target_display(target)},
            "reasonCode": [reason] if reason else None,
            "note": [{"text": note}] if note else None,
        }
        return self._add("referral", _drop_empty(sr))

    def task(self, item: str, reason: str, priority: str) -> dict[str, Any]:
        task = {
            "resourceType": "Task", "status": "requested", "intent": "proposal", "priority": priority,
            "code": _cc(FACT_SYSTEM, item, fact_label(item), f"Ask or examine: {fact_label(item)}"),
            "description": reason,
            "for": self.subject,
            "authoredOn": self.authored,
        }
        return self._add("task", _drop_empty(task))

    def communication(self, text: str, category: str) -> dict[str, Any]:
        cr = {
            "resourceType": "CommunicationRequest", "status": "draft",
            "category": [{"text": category}], "priority": "routine",
            "subject": self.subject,
            "payload": [{"contentString": text}],
            "authoredOn": self.authored,
        }
        return self._add("communication", _drop_empty(cr))

    # -- actions ------------------------------------------------------------------------------
    def red_flag_actions(self) -> list[dict[str, Any]]:
        actions = []
        for flag in self.rec.red_flags:
            indicator = indicator_for(flag.urgency)
            priority = priority_for_indicator(indicator)
            reason = _cc(RED_FLAG_SYSTEM, flag.id, flag.label)
            subs = []
            for i, target in enumerate((flag.referral_target, *flag.alternative_targets)):
                if not target:
                    continue
                subs.append({
                    "title": f"Refer to {target_display(target)}" + ("" if i == 0 else " (alternative)"),
                    "priority": priority,
                    "code": [_cc(REFERRAL_TARGET_SYSTEM, target, target_display(target))],
                    "type": _action_type("create"),
                    "resource": self.referral(target, priority, reason, flag.action if i == 0 else None),
                })
            findings = ", ".join(fact_label(f).lower() for f in flag.findings)
            actions.append({
                "title": f"Escalate ({flag.urgency.value}): {flag.label}",
                "description": flag.action,
                "textEquivalent": f"Triggered by: {findings}." if findings else None,
                "priority": priority,
                "code": [reason],
                "documentation": _documentation(self.rec, flag.sources),
                "groupingBehavior": "logical-group",
                "selectionBehavior": "exactly-one",
                "requiredBehavior": "must-unless-documented",
                "precheckBehavior": "yes",
                "action": subs,
            })
        return actions

    def data_action(self) -> dict[str, Any] | None:
        items = self.rec.data_required
        if not items:
            return None
        priority = priority_for_indicator(indicator_for(self.rec.urgency, data_required=True))
        subs = [{
            "title": f"Ask or examine: {fact_label(d.item)}",
            "description": d.reason,
            "priority": priority,
            "code": [_cc(FACT_SYSTEM, d.item, fact_label(d.item))],
            "type": _action_type("create"),
            "resource": self.task(d.item, d.reason, priority),
        } for d in items]
        rule_ids = sorted({d.rule_id for d in items})
        sources = [k for r in self.rec.reasons if r.rule_id in rule_ids for k, _ in r.sources]
        return {
            "title": f"More information needed: {len(items)} item(s) to ask or examine",
            "description": "The recommendation is provisional until these items are recorded; an unasked "
                           "question is unknown, never negative.",
            "priority": priority,
            "documentation": _documentation(self.rec, sources),
            "groupingBehavior": "logical-group",
            "selectionBehavior": "all",
            "requiredBehavior": "must",
            "action": subs,
        }

    def care_step_action(self) -> dict[str, Any]:
        rec = self.rec
        step = rec.care_step.value
        subs: list[dict[str, Any]] = []
        if not rec.red_flags and rec.referral_target:
            subs.append({
                "title": f"Refer to {target_display(rec.referral_target)}",
                "priority": "routine",
                "code": [_cc(REFERRAL_TARGET_SYSTEM, rec.referral_target, target_display(rec.referral_target))],
                "type": _action_type("create"),
                "resource": self.referral(rec.referral_target, "routine", None, rec.care_step_detail),
            })
        for sentence in rec.care_step_content:
            subs.append({"description": sentence, "priority": "routine",
                         "resource": self.communication(sentence, "care step")})
        if not subs:
            text = rec.care_step_detail or f"{care_step_display(step)}."
            subs.append({"description": text, "priority": "routine",
                         "resource": self.communication(text, "care step")})
        step_rules = [r for r in rec.reasons if r.effect == "care-step"]
        sources = [k for r in step_rules for k, _ in r.sources]
        title = f"Care step: {care_step_display(step)}"
        if rec.status.value == "data-required":
            title += " (provisional)"
        return {
            "title": title,
            "description": rec.care_step_detail,
            "priority": "routine",
            "code": [_cc(CARE_STEP_SYSTEM, step, care_step_display(step))],
            "documentation": _documentation(rec, sources),
            "groupingBehavior": "logical-group",
            "selectionBehavior": "all",
            "action": subs,
        }

    def advice_action(self) -> dict[str, Any] | None:
        if not self.rec.advice:
            return None
        subs = [{"description": a.text, "priority": "routine",
                 "code": [_cc(RULE_SYSTEM, a.rule_id)],
                 "resource": self.communication(a.text, "advice")} for a in self.rec.advice]
        sources = [k for a in self.rec.advice for k in a.sources]
        return {
            "title": "Advice for the patient",
            "priority": "routine",
            "documentation": _documentation(self.rec, sources),
            "groupingBehavior": "logical-group",
            "selectionBehavior": "any",
            "action": subs,
        }

    def request_group(self, rg_id: str) -> dict[str, Any]:
        rec = self.rec
        candidates = [*self.red_flag_actions(), self.data_action(), self.care_step_action(), self.advice_action()]
        actions = [a for a in candidates if a]
        priorities = [a["priority"] for a in actions if a.get("priority")] or ["routine"]
        top = max(priorities, key=lambda p: _PRIORITY_RANK[p])
        rg = {
            "resourceType": "RequestGroup",
            "id": rg_id,
            "meta": {"profile": [PROFILE_REQUEST_GROUP]},
            "identifier": [{"system": RFC3986, "value": "urn:uuid:" + _uuid5(
                "requestgroup", self.module, rec.case_id, rec.provenance.get("input_sha256", ""))}],
            "instantiatesUri": [self.module],
            "status": "active",
            "intent": "proposal",
            "priority": top,
            "subject": self.subject,
            "authoredOn": self.authored,
            "author": {"display": _author(rec)},
            "reasonCode": [_cc(RED_FLAG_SYSTEM, f.id, f.label) for f in rec.red_flags],
            "note": [{"text": _caution_text(c)} for c in rec.cautions],
            "action": actions,
        }
        return _drop_empty(rg)


def _author(rec: Any) -> str:
    prov = rec.provenance
    return (f"cds {prov.get('cds_version', '')} ruleset {prov.get('ruleset_id', '')}@"
            f"{prov.get('ruleset_version', '')}").replace("  ", " ").strip()


def _caution_text(c: Any) -> str:
    codes = ", ".join(c.do_not)
    message = " ".join(c.message.split())
    return f"Caution: {message}" + (f" (do-not codes: {codes}; rule {c.rule_id})" if codes else f" (rule {c.rule_id})")


def _reason_note(rec: Any, reason: Any) -> str:
    lines = [f"**{reason.title}** (rule `{reason.rule_id}`, {reason.effect}): {' '.join(reason.message.split())}"]
    cites = [f"{k}: {c}" for k, c, _ in citations_for(rec, [k for k, _ in reason.sources])]
    if cites:
        lines.append("Sources: " + "; ".join(cites))
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------- public API

def to_request_group(rec: Any, *, subject: Any = None, occurrence: Any = None) -> dict[str, Any]:
    """A FHIR R4 RequestGroup (profile cdshooksrequestgroup) carrying the recommendation.

    Its request resources (referral ServiceRequests, Tasks for the data to collect,
    CommunicationRequests for care-step content and advice) are contained and referenced from the
    actions as ``#id``.
    """
    builder = _Builder(rec, _reference(subject), _datetime(occurrence))
    rg_id = "rg-" + _digest("rg", module_uri(rec), rec.case_id, rec.provenance.get("input_sha256", ""))[:16]
    rg = builder.request_group(rg_id)
    if builder.contained:
        rg = {"resourceType": rg.pop("resourceType"), "id": rg.pop("id"), "meta": rg.pop("meta"),
              "contained": builder.contained, **rg}
    return rg


def to_guidance_response(rec: Any, *, subject: Any = None, request_id: str | None = None,
                         occurrence: Any = None, endpoint: str | None = None) -> dict[str, Any]:
    """A FHIR R4 GuidanceResponse for ``rec`` with the RequestGroup contained (``result``).

    ``subject``: 'Patient/123' or a Reference dict. ``request_id``: the CDS Hooks hookInstance (or any
    request id) -> ``requestIdentifier``. ``occurrence``: when the guidance was given (aware datetime,
    date or FHIR dateTime string); omitted when None, so the output has no clock. ``endpoint``: the CDS
    Hooks service URL -> the ``cqf-cdsHooksEndpoint`` extension. With ``request_id`` and ``endpoint``
    the resource claims the ``cdshooksguidanceresponse`` profile (both are required by it).
    """
    subj = _reference(subject)
    authored = _datetime(occurrence)
    if request_id is not None and (not isinstance(request_id, str) or not request_id.strip()):
        raise ValueError("request_id must be a non-empty string")
    if endpoint is not None and (not isinstance(endpoint, str) or not re.match(r"^\S+$", endpoint)):
        raise ValueError("endpoint must be a URL without spaces")
    module = module_uri(rec)
    prov = rec.provenance
    key = ("guidance", module, rec.case_id, prov.get("input_sha256", ""), request_id or "")
    builder = _Builder(rec, subj, authored)
    rg = builder.request_group("requestgroup")
    rg.pop("contained", None)
    outputs = _output_parameters(rec)
    contained = [rg, outputs, *builder.contained]

    data_requirements = [{
        "extension": [{"url": EXT_DATA_REASON, "valueString": d.reason}],
        "type": "Observation",
        "codeFilter": [{"path": "code", "code": [_coding(FACT_SYSTEM, d.item, fact_label(d.item))]}],
    } for d in rec.data_required]

    request_identifier = None
    if request_id:
        rid = request_id.strip()
        request_identifier = ({"system": RFC3986, "value": f"urn:uuid:{rid.lower()}"} if _is_uuid(rid)
                              else {"value": rid})
    gr = {
        "resourceType": "GuidanceResponse",
        "id": "gr-" + _digest(*key)[:16],
        "meta": {"profile": [PROFILE_GUIDANCE_RESPONSE]} if (request_id and endpoint) else None,
        "contained": contained,
        "extension": [{"url": EXT_CDS_HOOKS_ENDPOINT, "valueUri": endpoint}] if endpoint else None,
        "requestIdentifier": request_identifier,
        "identifier": [{"system": RFC3986, "value": "urn:uuid:" + _uuid5(*key)}],
        "moduleUri": module,
        "status": "data-required" if rec.status.value == "data-required" else "success",
        "subject": subj,
        "occurrenceDateTime": authored,
        "performer": {"display": _author(rec)},
        "reasonCode": [_cc(RED_FLAG_SYSTEM, f.id, f.label) for f in rec.red_flags],
        "note": [{"text": _reason_note(rec, r)} for r in rec.reasons]
                + [{"text": _caution_text(c)} for c in rec.cautions],
        "outputParameters": {"reference": f"#{outputs['id']}"},
        "result": {"reference": "#requestgroup"},
        "dataRequirement": data_requirements,
    }
    return _drop_empty(gr)


def _output_parameters(rec: Any) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "care_step", "valueCode": rec.care_step.value},
        {"name": "urgency", "valueCode": rec.urgency.value},
        {"name": "status", "valueCode": rec.status.value},
    ]
    if rec.referral_target:
        params.append({"name": "referral_target", "valueCode": rec.referral_target})
    params.extend({"name": "red_flag", "valueCode": f.id} for f in rec.red_flags)
    for key in ("ruleset_id", "ruleset_version", "ruleset_sha256", "ruleset_released", "engine", "cds_version",
                "durable_rules_version", "input_sha256"):
        v = rec.provenance.get(key)
        if isinstance(v, (dt.date, dt.datetime)):
            v = v.isoformat()
        if isinstance(v, str) and v.strip():
            params.append({"name": key, "valueString": v})
    return {"resourceType": "Parameters", "id": "outputs", "parameter": params}
