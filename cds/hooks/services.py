"""The CDS services cds offers, their prefetch templates, and how a hook request becomes resources.

Services (discovery at ``GET /cds-services``):

=================================  ===============  =============================================
id                                 hook             what
=================================  ===============  =============================================
``back-hip-pain-patient-view``     patient-view     red flags, data to collect, care step
``back-hip-pain-encounter-start``  encounter-start  the same at the start of an encounter
``lumbar-imaging-order-select``    order-select     warns on lumbar spine imaging for low back
                                                    pain without red flags (ACR/ACP)
=================================  ===============  =============================================

Prefetch: each service asks for ``patient`` (``Patient/{{context.patientId}}``) and searches for
Condition, Observation, MedicationRequest, Procedure and QuestionnaireResponse by patient. A key the
client sent as ``null`` means "no data" (spec); a key it left out, or sent as an OperationOutcome, is
unsatisfied: it is fetched from ``fhirServer`` with ``fhirAuthorization`` when both are given,
otherwise the service answers HTTP 412 (for the keys in ``required_prefetch``, all by default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

PATIENT_TOKEN = "{{context.patientId}}"  # noqa: S105 - a CDS Hooks prefetch token, not a secret

PREFETCH_TEMPLATES: dict[str, str] = {
    "patient": f"Patient/{PATIENT_TOKEN}",
    "conditions": f"Condition?patient={PATIENT_TOKEN}",
    "observations": f"Observation?patient={PATIENT_TOKEN}",
    "medications": f"MedicationRequest?patient={PATIENT_TOKEN}",
    "procedures": f"Procedure?patient={PATIENT_TOKEN}",
    "questionnaireResponses": f"QuestionnaireResponse?patient={PATIENT_TOKEN}",
}


@attrs.frozen
class Service:
    id: str
    hook: str
    title: str
    description: str
    kind: str  # "recommendation" or "imaging"
    usage: str

    def discovery(self) -> dict[str, Any]:
        return {"hook": self.hook, "title": self.title, "description": self.description, "id": self.id,
                "prefetch": dict(PREFETCH_TEMPLATES), "usageRequirements": self.usage}


_USAGE = ("Needs the patient's problems (Condition), observations, medication requests, procedures and "
          "questionnaire responses, by prefetch or through fhirServer + fhirAuthorization. Returns no card when "
          "the record has no active back or hip problem.")

SERVICES: dict[str, Service] = {s.id: s for s in (
    Service("back-hip-pain-patient-view", "patient-view", "Back and hip pain triage",
            "Red flags needing escalation (with urgency and referral target), the red-flag questions still to "
            "ask, and the care-pathway step (self-care, physical therapy, medical treatment, surgical referral "
            "as the last resort) for low back pain and hip pain, with cited guideline sources.",
            "recommendation", _USAGE),
    Service("back-hip-pain-encounter-start", "encounter-start", "Back and hip pain triage at encounter start",
            "The back and hip pain triage (red flags, questions to ask, care step) when an encounter starts.",
            "recommendation", _USAGE),
    Service("lumbar-imaging-order-select", "order-select", "Lumbar spine imaging appropriateness",
            "Warns when lumbar spine X-ray, CT or MRI is selected for low back pain without red flags "
            "(ACP 2011 / ACR Appropriateness Criteria: imaging not indicated), with a suggestion to remove "
            "the order and override reasons.",
            "imaging",
            "Reads context.draftOrders (ServiceRequest codes: LOINC, SNOMED CT or CPT lumbar spine imaging) and "
            "the same patient data as the triage service. Returns no card when no lumbar imaging is selected."),
)}


class PrefetchProblem(Exception):
    """The request's prefetch data is unusable (HTTP 412 unless it can be fetched)."""


MISSING = object()


def fill(template: str, patient_id: str) -> str:
    return template.replace(PATIENT_TOKEN, patient_id)


def unsatisfied_keys(prefetch: Mapping[str, Any], required: tuple[str, ...]) -> list[str]:
    """The required keys that are absent or hold an OperationOutcome (``null`` is "no data", satisfied)."""
    out = []
    for key in required:
        value = prefetch.get(key, MISSING)
        if value is MISSING:
            out.append(key)
        elif isinstance(value, Mapping) and value.get("resourceType") == "OperationOutcome":
            out.append(key)
    return out


def resources_from_prefetch(prefetch: Mapping[str, Any], patient_id: str) -> list[dict[str, Any]]:
    """The patient's resources: the Patient and every resource of the searchset Bundles.

    OperationOutcome entries (search mode ``outcome``) are skipped; duplicates (same type and id) are
    kept once. A Patient whose id is not the context's patientId is a client error (PrefetchProblem).
    """
    resources: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def add(res: Any) -> None:
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            return
        if res["resourceType"] == "OperationOutcome":
            return
        key = (res["resourceType"], str(res.get("id")))
        if res.get("id") is not None:
            if key in seen:
                return
            seen.add(key)
        resources.append(res)

    for key in PREFETCH_TEMPLATES:
        value = prefetch.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise PrefetchProblem(f"prefetch {key!r} is not a FHIR resource")
        if value.get("resourceType") == "Bundle":
            for entry in value.get("entry") or []:
                if not isinstance(entry, Mapping):
                    continue
                if isinstance(entry.get("search"), Mapping) and entry["search"].get("mode") == "outcome":
                    continue
                add(entry.get("resource"))
        elif key == "patient":
            if value.get("resourceType") != "Patient":
                raise PrefetchProblem("prefetch 'patient' is not a Patient resource")
            if value.get("id") is not None and str(value.get("id")) != patient_id:
                raise PrefetchProblem("prefetch 'patient' is not the patient of context.patientId")
            add(dict(value))
        else:
            raise PrefetchProblem(f"prefetch {key!r} is not a searchset Bundle")
    return resources
