"""cds.fhir.guidance: Recommendation -> FHIR R4 GuidanceResponse + RequestGroup.

Parsed with fhir.resources (R4B models, which are R4-compatible for these resources; skipped when
fhir.resources is missing) and checked against what the models do not check: code values, the
CDS Hooks clinical-reasoning profiles' required elements, FHIR invariants (rqg-1, dom-2, dom-3,
ele-1), the indicator -> priority ConceptMap and determinism.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import cds
from cds.fhir.guidance import (
    FACT_SYSTEM,
    INDICATOR_TO_PRIORITY,
    RED_FLAG_SYSTEM,
    indicator_for,
    to_guidance_response,
    to_request_group,
)

fhir_r4b = pytest.importorskip("fhir.resources.R4B")
from fhir.resources.R4B import get_fhir_model_class  # noqa: E402
from fhir.resources.R4B.guidanceresponse import GuidanceResponse  # noqa: E402
from fhir.resources.R4B.requestgroup import RequestGroup  # noqa: E402

HERE = Path(__file__).parent


def validate(cls: Any, data: dict[str, Any]) -> Any:
    """Parse with the model (pydantic 2: model_validate; fhir.resources 7.x on pydantic 1: parse_obj)."""
    return (cls.model_validate if hasattr(cls, "model_validate") else cls.parse_obj)(data)

PROFILES = HERE / "fixtures" / "cds-hooks" / "clinical-reasoning"
HOOK_INSTANCE = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
ENDPOINT = "https://cds.example.org/cds-services/back-hip-pain-patient-view"

SCREEN_ABSENT = ["new_urinary_retention", "new_bladder_disturbance", "new_urinary_incontinence",
                 "new_fecal_incontinence", "saddle_anesthesia", "leg_weakness", "history_of_cancer",
                 "unexplained_weight_loss", "fever", "iv_drug_use", "immunosuppression",
                 "long_term_systemic_corticosteroids", "major_trauma", "progressive_leg_weakness", "gait_disturbance",
                 "osteoporosis", "minor_trauma", "midline_spinal_tenderness", "constant_unremitting_pain",
                 "night_pain", "systemically_unwell", "thoracic_or_band_like_pain", "structural_spinal_deformity"]

CASES = {
    "red-flag": {"case_id": "rf", "context": {"region": "back", "age_years": 42},
                 "findings": {"saddle_anesthesia": "present"}},
    "data-required": {"case_id": "dr", "context": {"region": "back", "age_years": 42}},
    "self-care": {"case_id": "sc", "context": {"region": "back", "age_years": 35, "pain_duration_weeks": 2,
                                               "sex": "male", "onset": "gradual", "leg_symptom_laterality": "none"},
                  "findings": {k: "absent" for k in SCREEN_ABSENT}},
}


@pytest.fixture(scope="module")
def evaluator() -> cds.Evaluator:
    return cds.Evaluator("back-hip-pain", engine="reference")


def all_cases() -> list[tuple[str, dict[str, Any]]]:
    out = list(CASES.items())
    from tests.test_vignettes import VIGNETTES, case_of

    out += [(f"vignette-{v['id']}", case_of(v)) for v in VIGNETTES["vignettes"]]
    return out


# ----------------------------------------------------------------------------- independent checks

VALUE_SETS = {
    "GuidanceResponse.status": {"success", "data-requested", "data-required", "in-progress", "failure",
                                "entered-in-error"},
    "RequestGroup.status": {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"},
    "intent": {"proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order",
               "instance-order", "option"},
    "priority": {"routine", "urgent", "asap", "stat"},
    "groupingBehavior": {"visual-group", "logical-group", "sentence-group"},
    "selectionBehavior": {"any", "all", "all-or-none", "exactly-one", "at-most-one", "one-or-more"},
    "requiredBehavior": {"must", "could", "must-unless-documented"},
    "precheckBehavior": {"yes", "no"},
    "Task.status": {"draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress",
                    "on-hold", "failed", "completed", "entered-in-error"},
    "Task.intent": {"unknown", "proposal", "plan", "order", "original-order", "reflex-order", "filler-order",
                    "instance-order", "option"},
    "relatedArtifact.type": {"documentation", "justification", "citation", "predecessor", "successor",
                             "derived-from", "depends-on", "composed-of"},
}


def empties(value: Any, path: str = "$") -> list[str]:
    """ele-1 / JSON rules: no null, empty string, empty array or empty object anywhere."""
    if value is None or value == "" or value == [] or value == {}:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in empties(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in empties(v, f"{path}[{i}]")]
    return []


def references(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return own + [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


def walk_actions(actions: list[dict[str, Any]], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for a in actions:
        out.append((depth, a))
        out.extend(walk_actions(a.get("action", []), depth + 1))
    return out


def check_request_group(rg: dict[str, Any], contained: dict[str, dict[str, Any]]) -> None:
    assert rg["status"] in VALUE_SETS["RequestGroup.status"] and rg["intent"] in VALUE_SETS["intent"]
    assert rg["priority"] in VALUE_SETS["priority"]
    # cdshooksrequestgroup profile: identifier 1..1, instantiatesUri 1..1
    assert len(rg["identifier"]) == 1 and len(rg["instantiatesUri"]) == 1
    assert rg["instantiatesUri"][0].startswith("urn:cds:ruleset:back-hip-pain@")
    for _, a in walk_actions(rg["action"]):
        # rqg-1: must have resource or action but not both
        assert ("resource" in a) != ("action" in a), a.get("title")
        assert a.get("title") or a.get("description")
        for key in ("priority", "groupingBehavior", "selectionBehavior", "requiredBehavior", "precheckBehavior"):
            if key in a:
                assert a[key] in VALUE_SETS[key], (key, a[key])
        for doc in a.get("documentation", []):
            assert doc["type"] in VALUE_SETS["relatedArtifact.type"] and doc["citation"]
        if "resource" in a:
            ref = a["resource"]["reference"]
            assert ref.startswith("#") and ref[1:] in contained
            res = contained[ref[1:]]
            assert res["resourceType"] in ("ServiceRequest", "Task", "CommunicationRequest")
            if res["resourceType"] == "Task":
                assert res["status"] in VALUE_SETS["Task.status"] and res["intent"] in VALUE_SETS["Task.intent"]
            if res["resourceType"] == "ServiceRequest":
                assert res["intent"] in VALUE_SETS["intent"] and res["priority"] in VALUE_SETS["priority"]
                assert res["subject"]
    top = max((a["priority"] for _, a in walk_actions(rg["action"])), key=["routine", "urgent", "asap", "stat"].index)
    assert rg["priority"] == top


def check_contained(resource: dict[str, Any]) -> dict[str, dict[str, Any]]:
    contained = {r["id"]: r for r in resource.get("contained", [])}
    assert len(contained) == len(resource.get("contained", []))
    for r in contained.values():
        assert "contained" not in r  # dom-2
        validate(get_fhir_model_class(r["resourceType"]), r)
    refs = {r[1:] for r in references(resource) if r.startswith("#")}
    assert refs <= set(contained), refs - set(contained)  # every local reference resolves
    assert set(contained) <= refs  # dom-3: every contained resource is referenced
    return contained


def check_guidance(gr: dict[str, Any], rec: Any) -> None:
    validate(GuidanceResponse, gr)
    assert empties(gr) == []
    assert gr["status"] in VALUE_SETS["GuidanceResponse.status"]
    assert gr["status"] == ("data-required" if rec.status.value == "data-required" else "success")
    assert gr["moduleUri"] == f"urn:cds:ruleset:{rec.provenance['ruleset_id']}@{rec.provenance['ruleset_version']}"
    contained = check_contained(gr)
    rg = contained[gr["result"]["reference"][1:]]
    assert rg["resourceType"] == "RequestGroup"
    validate(RequestGroup, rg)
    check_request_group(rg, contained)
    # data requirements name the missing facts
    names = [d["codeFilter"][0]["code"][0]["code"] for d in gr.get("dataRequirement", [])]
    assert names == [d.item for d in rec.data_required]
    for d in gr.get("dataRequirement", []):
        assert d["type"] == "Observation" and d["codeFilter"][0]["code"][0]["system"] == FACT_SYSTEM
        assert d["extension"][0]["valueString"]
    # reasonCode from the red flags
    assert [c["coding"][0]["code"] for c in gr.get("reasonCode", [])] == [f.id for f in rec.red_flags]
    assert all(c["coding"][0]["system"] == RED_FLAG_SYSTEM for c in gr.get("reasonCode", []))
    # notes carry every fired rule with its citations
    notes = "\n".join(n["text"] for n in gr["note"])
    for r in rec.reasons:
        assert r.rule_id in notes
        for _, citation in r.sources:
            assert " ".join(citation.split()) in notes
    # output parameters
    params = {p["name"]: p for p in contained[gr["outputParameters"]["reference"][1:]]["parameter"]}
    assert params["care_step"]["valueCode"] == rec.care_step.value
    assert params["urgency"]["valueCode"] == rec.urgency.value
    assert params["ruleset_sha256"]["valueString"] == rec.provenance["ruleset_sha256"]


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", sorted(CASES))
def test_named_cases_parse_and_validate(evaluator: cds.Evaluator, name: str) -> None:
    rec = evaluator.evaluate(CASES[name])
    gr = to_guidance_response(rec, subject="Patient/123", request_id=HOOK_INSTANCE, endpoint=ENDPOINT)
    check_guidance(gr, rec)
    rg = to_request_group(rec, subject="Patient/123")
    validate(RequestGroup, rg)
    assert empties(rg) == []
    check_request_group(rg, check_contained(rg))
    if name == "red-flag":
        assert rec.red_flags and gr["status"] == "success" and rg["priority"] == "stat"
        escalation = rg["action"][0]
        assert escalation["requiredBehavior"] == "must-unless-documented"
        assert escalation["priority"] == "stat" and escalation["selectionBehavior"] == "exactly-one"
        referral = {c["id"]: c for c in rg["contained"]}[escalation["action"][0]["resource"]["reference"][1:]]
        assert referral["resourceType"] == "ServiceRequest"
        assert referral["code"]["coding"][0]["code"] == rec.red_flags[0].referral_target
        assert referral["priority"] == "stat"
    elif name == "data-required":
        assert gr["status"] == "data-required" and len(gr["dataRequirement"]) == len(rec.data_required) > 0
        assert "saddle_anesthesia" in [d["codeFilter"][0]["code"][0]["code"] for d in gr["dataRequirement"]]
        data_action = next(a for a in rg["action"] if a["title"].startswith("More information"))
        assert data_action["priority"] == "urgent" and len(data_action["action"]) == len(rec.data_required)
    else:
        assert gr["status"] == "success" and "dataRequirement" not in gr and "reasonCode" not in gr
        assert rec.status.value == "complete" and not rec.red_flags and rec.care_step.value == "self-care"
        assert rg["priority"] == "routine"
        assert [a["title"] for a in rg["action"]][0].startswith("Care step: Self-care")


@pytest.mark.parametrize("name,case", all_cases(), ids=[n for n, _ in all_cases()])
def test_every_vignette_gives_valid_fhir(evaluator: cds.Evaluator, name: str, case: dict[str, Any]) -> None:
    rec = evaluator.evaluate(case)
    check_guidance(to_guidance_response(rec), rec)
    rg = to_request_group(rec)
    validate(RequestGroup, rg)
    check_request_group(rg, check_contained(rg))


def test_profiles_required_elements_are_present(evaluator: cds.Evaluator) -> None:
    """Every element the clinical-reasoning profiles make 1..1 is in our output."""
    rec = evaluator.evaluate(CASES["red-flag"])
    gr = to_guidance_response(rec, request_id=HOOK_INSTANCE, endpoint=ENDPOINT)
    rg = next(c for c in gr["contained"] if c["resourceType"] == "RequestGroup")
    for profile, resource in (("StructureDefinition-cdshooksguidanceresponse.json", gr),
                              ("StructureDefinition-cdshooksrequestgroup.json", rg)):
        sd = json.loads((PROFILES / profile).read_text(encoding="utf-8"))
        assert sd["url"] in resource["meta"]["profile"]
        for el in sd["differential"]["element"]:
            if el.get("min") == 1 and "." in el["path"]:
                field = el["path"].split(".", 1)[1]
                if field == "extension":
                    url = el["type"][0]["profile"][0]
                    assert [e for e in resource["extension"] if e["url"] == url]
                else:
                    assert field in resource, field
                    if el.get("max") == "1" and isinstance(resource[field], list):
                        assert len(resource[field]) == 1
    assert gr["requestIdentifier"] == {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{HOOK_INSTANCE}"}
    assert gr["extension"][0]["valueUri"] == ENDPOINT


def test_profile_is_claimed_only_when_its_required_elements_are_given(evaluator: cds.Evaluator) -> None:
    gr = to_guidance_response(evaluator.evaluate(CASES["self-care"]))
    assert "meta" not in gr and "requestIdentifier" not in gr and "extension" not in gr


def test_priorities_follow_the_cds_hooks_concept_map() -> None:
    ns = {"f": "http://hl7.org/fhir"}
    root = ET.parse(PROFILES / "conceptmap-cdshooks-indicator.xml").getroot()  # noqa: S314 - our own fixture
    mapping = {el.find("f:code", ns).get("value"): el.find("f:target/f:code", ns).get("value")
               for el in root.findall("f:group/f:element", ns)}
    assert mapping == INDICATOR_TO_PRIORITY
    assert [indicator_for(u) for u in ("emergency", "urgent", "routine")] == ["critical", "warning", "info"]
    assert indicator_for("routine", data_required=True) == "warning"


def test_output_is_deterministic_and_has_no_clock(evaluator: cds.Evaluator) -> None:
    for case in CASES.values():
        rec = evaluator.evaluate(copy.deepcopy(case))
        a = to_guidance_response(rec, subject="Patient/1", request_id="req-1")
        b = to_guidance_response(evaluator.evaluate(copy.deepcopy(case)), subject="Patient/1", request_id="req-1")
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        assert to_request_group(rec) == to_request_group(rec)
        text = json.dumps(a)
        assert "occurrenceDateTime" not in text and "authoredOn" not in text
        assert not re.search(r"20\d\d-\d\d-\d\dT", text)
        assert a["requestIdentifier"] == {"value": "req-1"}
        assert a["id"] != to_guidance_response(rec, subject="Patient/1", request_id="req-2")["id"]


def test_occurrence_is_written_when_passed(evaluator: cds.Evaluator) -> None:
    rec = evaluator.evaluate(CASES["red-flag"])
    when = dt.datetime(2026, 11, 26, 9, 30, tzinfo=dt.UTC)
    gr = to_guidance_response(rec, occurrence=when)
    check_guidance(gr, rec)
    assert gr["occurrenceDateTime"] == "2026-11-26T09:30:00+00:00"
    rg = next(c for c in gr["contained"] if c["resourceType"] == "RequestGroup")
    assert rg["authoredOn"] == gr["occurrenceDateTime"]
    assert to_request_group(rec, occurrence=dt.date(2026, 11, 26))["authoredOn"] == "2026-11-26"
    with pytest.raises(ValueError):
        to_guidance_response(rec, occurrence=dt.datetime(2026, 11, 26, 9, 30))  # naive
    with pytest.raises(ValueError):
        to_guidance_response(rec, subject="")


def test_standalone_request_group_has_its_resources_contained(evaluator: cds.Evaluator) -> None:
    rec = evaluator.evaluate(CASES["data-required"])
    rg = to_request_group(rec, subject={"reference": "Patient/9", "display": "Test patient"})
    kinds = {c["resourceType"] for c in rg["contained"]}
    assert {"Task", "CommunicationRequest"} <= kinds
    assert rg["subject"] == {"reference": "Patient/9", "display": "Test patient"}
    assert rg["id"].startswith("rg-") and rg["meta"]["profile"]
