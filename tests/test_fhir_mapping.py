"""cds.fhir: FHIR R4 -> case facts adapter."""

from __future__ import annotations

import copy
import datetime as dt
import json
import pathlib

import jsonschema
import pytest

from cds.fhir import (
    FhirMapping,
    MappingIssue,
    explain,
    facts_from_bundle,
    facts_from_resources,
    iter_patients_ndjson,
    load_code_table,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "fhir"
SHARED = ROOT.parent / "shared" / "data" / "fhir"
SCHEMA = json.loads((ROOT / "schemas" / "patient-facts.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
REF = dt.date(2024, 3, 1)
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"


def fixture_bundles() -> list[pathlib.Path]:
    return sorted((FIX / "synthea-r4-bundles").glob("*_*.json"))


def shared_bundles() -> list[pathlib.Path]:
    folder = SHARED / "synthea-r4-bundles"
    return sorted(folder.glob("*_*.json")) if folder.is_dir() else []


def all_bundles() -> list[pathlib.Path]:
    seen = {p.name: p for p in fixture_bundles()}
    for p in shared_bundles():
        seen.setdefault(p.name, p)
    return [seen[k] for k in sorted(seen)]


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def last_encounter(bundle: dict) -> dt.date:
    starts = [e["resource"]["period"]["start"][:10] for e in bundle["entry"]
              if e["resource"]["resourceType"] == "Encounter"]
    return dt.date.fromisoformat(max(starts))


def resource_ids(resources) -> set[str]:
    return {f"{r['resourceType']}/{r['id']}" for r in resources}


def assert_valid(case: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(case), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


# ----------------------------------------------------------------------------- small bundle builder

def patient(birth="1970-05-01", gender="female", pid="p1") -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth}


def condition(cid, code, system=SNOMED, clinical="active", verification="confirmed", onset="2023-12-01",
              display=None, **extra) -> dict:
    res = {"resourceType": "Condition", "id": cid,
           "code": {"coding": [{"system": system, "code": code, "display": display or code}]},
           "subject": {"reference": "Patient/p1"}}
    if clinical is not None:
        res["clinicalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                             "code": clinical}]}
    if verification is not None:
        res["verificationStatus"] = {"coding": [{"system":
                                                 "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                                                 "code": verification}]}
    if onset is not None:
        res["onsetDateTime"] = onset
    res.update(extra)
    return res


def bundle(*resources) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}


LBP = ("lbp", "279039007")


def lbp(**kw):
    return condition("lbp", "279039007", display="Low back pain", **kw)


# ----------------------------------------------------------------------------- real data

@pytest.mark.parametrize("path", all_bundles(), ids=lambda p: p.name.split("_")[0] + "_" + p.name.split("_")[1])
def test_every_synthea_bundle_maps_to_a_valid_case(path):
    b = load(path)
    for ref in (last_encounter(b), REF, dt.date(2000, 1, 1)):
        m = facts_from_bundle(b, reference_date=ref)
        assert isinstance(m, FhirMapping)
        assert_valid(m.case)
        assert all(isinstance(i, MappingIssue) for i in m.issues)
        ids = resource_ids(e["resource"] for e in b["entry"])
        for path_, refs in m.provenance.items():
            for r in refs:
                assert r in ids, (path_, r)
        # every set fact has provenance, and the region always does (even when defaulted)
        for k in m.case["findings"]:
            assert m.provenance[f"findings.{k}"], k
        assert "context.region" in m.provenance


def test_shared_bundles_present_or_skipped():
    if not shared_bundles():
        pytest.skip("shared/data/fhir not available; the fixtures copies are still tested")
    assert len(shared_bundles()) == 19


def test_hip_oa_onset_before_birth_is_reported():
    b = load(next(p for p in fixture_bundles() if p.name.startswith("Dorris_Kuhic")))
    m = facts_from_bundle(b, reference_date=last_encounter(b))
    bad = [i for i in m.issues if "before the birth date" in i.message]
    assert len(bad) == 1 and bad[0].severity == "warning"
    assert bad[0].resource.startswith("Condition/")
    # the diagnosis still counts; its bad onset is not used for any duration
    assert m.case["findings"]["established_hip_osteoarthritis"] == "present"
    assert m.case["context"]["region"] == "hip"
    assert "pain_duration_weeks" not in m.case["context"]
    assert m.provenance["findings.established_hip_osteoarthritis"] == [bad[0].resource]


def test_real_bundle_red_flag_context():
    asa = load(next(p for p in fixture_bundles() if p.name.startswith("Asa_Hermiston")))
    m = facts_from_bundle(asa, reference_date=last_encounter(asa))
    f = m.case["findings"]
    assert m.case["context"]["sex"] == "male"
    assert m.case["context"]["region"] == "hip"
    assert f["inflammatory_arthritis"] == "present"          # rheumatoid arthritis 69896004
    assert f["immunosuppression"] == "present"                # methotrexate order, active
    assert "long_term_systemic_corticosteroids" not in f      # topical hydrocortisone is not systemic
    lonnie = load(next(p for p in fixture_bundles() if p.name.startswith("Lonnie_Von")))
    m = facts_from_bundle(lonnie, reference_date=last_encounter(lonnie))
    assert m.case["findings"]["osteoporosis"] == "present"
    assert m.case["context"]["region"] == "both"
    assert any("region set to 'both'" in i.message for i in m.issues)


def test_resources_after_reference_date_are_ignored():
    asa = load(next(p for p in fixture_bundles() if p.name.startswith("Asa_Hermiston")))
    m = facts_from_bundle(asa, reference_date=dt.date(2010, 1, 1))
    assert "established_hip_osteoarthritis" not in m.case["findings"]   # diagnosed 2017
    assert any("after the reference date" in i.message for i in m.issues)


def test_bulk_ndjson_groups_the_two_chronic_lbp_patients():
    groups = dict(iter_patients_ndjson(FIX / "synthea-bulk-ndjson"))
    assert len(groups) == 2
    for resources in groups.values():
        assert sum(r["resourceType"] == "Patient" for r in resources) == 1
        ref = max(dt.date.fromisoformat(r["period"]["start"][:10]) for r in resources
                  if r["resourceType"] == "Encounter")
        m = facts_from_resources(resources, reference_date=ref)
        assert_valid(m.case)
        assert m.case["context"]["region"] == "back"
        assert m.case["context"]["pain_duration_weeks"] > 12
        assert m.case["context"]["back_pain_onset_age_years"] < m.case["context"]["age_years"]
        cond = m.provenance["context.region"]
        assert cond and all(r in resource_ids(resources) for r in cond)
        lbp_res = [r for r in resources if f"{r['resourceType']}/{r['id']}" == cond[0]][0]
        assert lbp_res["code"]["coding"][0]["code"] == "278860009"
    # file list and single path forms agree
    files = sorted((FIX / "synthea-bulk-ndjson").glob("*.ndjson"))
    assert [p for p, _ in iter_patients_ndjson(files)] == list(groups)


def test_bulk_inhaled_budesonide_is_inhaled_not_systemic():
    groups = dict(iter_patients_ndjson(FIX / "synthea-bulk-ndjson"))
    res = groups["fb7c882a-f897-e7c5-67e0-825e7fd55d15"]
    m = facts_from_resources(res, reference_date=dt.date(2022, 11, 6))
    assert m.case["findings"]["inhaled_corticosteroid_use"] == "present"
    assert "long_term_systemic_corticosteroids" not in m.case["findings"]


def test_physical_therapy_without_outcome_is_not_a_treatment():
    groups = dict(iter_patients_ndjson(FIX / "synthea-bulk-ndjson"))
    res = groups["ca15b832-01e4-41dd-6a52-97bd3e5510cb"]
    m = facts_from_resources(res, reference_date=dt.date(2023, 3, 22))
    assert "treatments" not in m.case
    assert any("without Procedure.outcome" in i.message for i in m.issues)


# ----------------------------------------------------------------------------- status rules

def test_refuted_and_entered_in_error_conditions_are_ignored():
    b = bundle(patient(), lbp(),
               condition("c1", "372064008", verification="refuted", display="Malignant neoplasm of female breast"),
               condition("c2", "44054006", verification="entered-in-error", display="Type 2 diabetes mellitus"),
               condition("c3", "38341003", verification="unconfirmed", display="Hypertensive disorder"))
    m = facts_from_bundle(b, reference_date=REF)
    f = m.case["findings"]
    assert "history_of_cancer" not in f and "diabetes" not in f
    assert f["hypertension"] == "present"
    assert {i.resource for i in m.issues if "verificationStatus" in i.message} == {"Condition/c1", "Condition/c2"}


def test_clinical_status_rules():
    b = bundle(patient(), lbp(),
               condition("c1", "44054006", clinical="resolved", display="Type 2 diabetes mellitus"),
               condition("c2", "363406005", clinical="remission", display="Malignant tumor of colon"),
               condition("c3", "38341003", clinical=None, display="Hypertensive disorder"),
               condition("c4", "C50.911", system=ICD10CM, clinical=None),
               condition("c5", "13645005", clinical="relapse", display="COPD"))
    m = facts_from_bundle(b, reference_date=REF)
    f = m.case["findings"]
    assert "diabetes" not in f                     # resolved: not counted
    assert "hypertension" not in f                 # no clinicalStatus: not counted ...
    assert any(i.resource == "Condition/c3" and "no clinicalStatus" in i.message for i in m.issues)
    assert f["history_of_cancer"] == "present"     # ... but past cancer counts
    assert m.provenance["findings.history_of_cancer"] == ["Condition/c2", "Condition/c4"]
    assert f["copd"] == "present"


def test_absent_codes_stay_unknown():
    m = facts_from_bundle(bundle(patient(), lbp()), reference_date=REF)
    assert m.case["findings"] == {}
    assert_valid(m.case)
    # nothing in codes.yaml turns a missing code into "absent"
    table = load_code_table()
    for section in ("conditions", "procedures"):
        for e in table.doc[section]:
            assert e.get("value", "present") in ("present", "absent")
    assert all("absent" not in (e.get("facts") or {}).values() for e in table.doc["conditions"])


def test_unknown_codes_are_ignored_silently():
    b = bundle(patient(), lbp(), condition("c1", "999999999", display="something unknown"),
               condition("c2", "X1", system="http://example.org/local"))
    m = facts_from_bundle(b, reference_date=REF)
    assert not [i for i in m.issues if i.resource in ("Condition/c1", "Condition/c2")]


# ----------------------------------------------------------------------------- region and duration

def test_region_duration_and_laterality():
    b = bundle(patient(birth="1980-03-01"),
               condition("old", "279039007", clinical="resolved", onset="2015-06-01", abatementDateTime="2015-08-01"),
               condition("now", "M54.42", system=ICD10CM, onset="2024-01-01", display="Lumbago with sciatica, left"),
               condition("hip", "49218002", onset="2023-12-01", display="Hip pain"))
    m = facts_from_bundle(b, reference_date=REF)
    c, f = m.case["context"], m.case["findings"]
    assert c["region"] == "both"
    assert c["pain_duration_weeks"] == round((REF - dt.date(2024, 1, 1)).days / 7, 1)
    assert m.provenance["context.pain_duration_weeks"] == ["Condition/now"]
    assert c["leg_symptom_laterality"] == "left"
    assert f["radicular_leg_pain"] == "present" and f["leg_pain"] == "present"
    assert f["first_episode_back_pain"] == "absent"
    assert c["back_pain_onset_age_years"] == round((dt.date(2024, 1, 1) - dt.date(1980, 3, 1)).days / 365.25, 1)
    assert_valid(m.case)


def test_no_region_defaults_to_both_with_issue():
    m = facts_from_bundle(bundle(patient()), reference_date=REF)
    assert m.case["context"]["region"] == "both"
    assert m.provenance["context.region"] == []
    assert any(i.severity == "warning" and "region" in i.message for i in m.issues)


def test_hip_osteoarthritis_sets_region_and_fact():
    b = bundle(patient(), condition("oa", "M16.11", system=ICD10CM, display="Unilateral primary OA, right hip"))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["context"]["region"] == "hip"
    assert m.case["findings"]["established_hip_osteoarthritis"] == "present"
    assert "pain_duration_weeks" not in m.case["context"]   # a diagnosis is not the pain episode


def test_age_and_sex():
    m = facts_from_bundle(bundle(patient(birth="1970-03-02", gender="other"), lbp()), reference_date=REF)
    assert m.case["context"]["age_years"] == 53
    assert m.case["context"]["sex"] == "other"
    assert m.provenance["context.age_years"] == ["Patient/p1"]


# ----------------------------------------------------------------------------- observations

def obs(oid, code, value=None, unit="Cel", ucum=None, when="2024-02-29T10:00:00Z", system=LOINC, **extra):
    res = {"resourceType": "Observation", "id": oid, "status": "final",
           "code": {"coding": [{"system": system, "code": code}]},
           "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when}
    if value is not None:
        res["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                                "code": ucum or unit}
    res.update(extra)
    return res


def test_temperature_to_temperature_c():
    b = bundle(patient(), lbp(),
               obs("t-old", "8310-5", 36.6, when="2024-02-28T08:00:00Z"),
               obs("t-new", "8310-5", 101.3, unit="[degF]", when="2024-02-29T08:00:00Z"))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["findings"]["temperature_c"] == pytest.approx(38.5)
    assert m.provenance["findings.temperature_c"] == ["Observation/t-new"]
    assert "fever" not in m.case["findings"]   # the engine derives fever from temperature_c
    assert_valid(m.case)


def test_old_or_odd_measurements_are_not_used():
    b = bundle(patient(), lbp(),
               obs("t-stale", "8331-1", 39.0, when="2024-01-01"),
               obs("hr", "8867-4", 700, unit="/min"),
               obs("crp", "1988-5", 12, unit="furlongs"))
    m = facts_from_bundle(b, reference_date=REF)
    f = m.case["findings"]
    assert "temperature_c" not in f and "heart_rate_bpm" not in f and "crp_mg_l" not in f
    msgs = {i.resource: i.message for i in m.issues}
    assert "not used" in msgs["Observation/t-stale"]
    assert "implausible" in msgs["Observation/hr"]
    assert "unit" in msgs["Observation/crp"]


def test_blood_pressure_panel_components_and_labs():
    panel = obs("bp", "85354-9", component=[
        {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
         "valueQuantity": {"value": 88, "unit": "mm[Hg]", "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
         "valueQuantity": {"value": 52, "unit": "mm[Hg]", "code": "mm[Hg]"}}])
    b = bundle(patient(), lbp(), panel,
               obs("hr", "8867-4", 118, unit="/min"),
               obs("esr", "4537-7", 64, unit="mm/h"),
               obs("crp", "1988-5", 3.2, unit="mg/dL"),
               obs("wbc", "6690-2", 14.1, unit="10*3/uL"),
               obs("bmi", "39156-5", 31.2, unit="kg/m2"),
               obs("pain", "72514-3", 8, unit="{score}"),
               obs("crp2", "30522-7", None, valueQuantity={"value": 300, "comparator": ">", "unit": "mg/L",
                                                          "code": "mg/L"}, when="2024-02-20"))
    m = facts_from_bundle(b, reference_date=REF)
    f = m.case["findings"]
    assert f["systolic_bp_mmhg"] == 88 and f["diastolic_bp_mmhg"] == 52
    assert m.provenance["findings.systolic_bp_mmhg"] == ["Observation/bp"]
    assert f["heart_rate_bpm"] == 118 and f["esr_mm_h"] == 64
    assert f["crp_mg_l"] == pytest.approx(32.0)
    assert f["wbc_10e9_l"] == pytest.approx(14.1)
    assert f["bmi_kg_m2"] == pytest.approx(31.2) and f["obesity"] == "present"
    assert f["back_pain_severity_nrs"] == 8
    assert_valid(m.case)


def test_censored_value_and_never_smoker():
    b = bundle(patient(), lbp(),
               obs("crp", "1988-5", None, valueQuantity={"value": 5, "comparator": "<", "unit": "mg/L",
                                                        "code": "mg/L"}),
               obs("smk", "72166-2", valueCodeableConcept={"coding": [{"system": SNOMED, "code": "266919005",
                                                                       "display": "Never smoker"}]}))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["findings"]["crp_mg_l"] == {"lt": 5}
    assert m.case["findings"]["smoking_history"] == "absent"   # an explicit negative, not a missing code
    assert_valid(m.case)


# ----------------------------------------------------------------------------- STarT Back

def start_qr(answers: dict, status="completed", authored="2024-02-27") -> dict:
    items = []
    for link, ans in answers.items():
        items.append({"linkId": link, "answer": [ans]})
    return {"resourceType": "QuestionnaireResponse", "id": "sb", "status": status, "authored": authored,
            "questionnaire": "https://example.org/Questionnaire/start-back-tool",
            "subject": {"reference": "Patient/p1"}, "item": [{"linkId": "grp", "item": items}]}


def test_start_back_questionnaire_response():
    answers = {"q1": {"valueBoolean": True}, "Q2": {"valueBoolean": False},
               "q3": {"valueCoding": {"system": LOINC, "code": "LA33-6", "display": "Yes"}},
               "q4": {"valueString": "disagree"}, "q5": {"valueInteger": 1}, "q6": {"valueBoolean": True},
               "q7_pain_terrible_never_better": {"valueBoolean": True}, "8": {"valueString": "agree"},
               "q9": {"valueCoding": {"code": "very-much", "display": "Very much"}}}
    m = facts_from_bundle(bundle(patient(), lbp(), start_qr(answers)), reference_date=REF)
    sb = m.case["start_back"]
    assert sb == {"q1_leg_pain": True, "q2_shoulder_neck_pain": False, "q3_walked_short_distances": True,
                  "q4_dressed_slowly": False, "q5_not_safe_to_be_active": True, "q6_worrying_thoughts": True,
                  "q7_pain_terrible_never_better": True, "q8_not_enjoyed_things": True,
                  "q9_bothersomeness": "very-much"}
    assert m.provenance["start_back.q9_bothersomeness"] == ["QuestionnaireResponse/sb"]
    assert_valid(m.case)


def test_start_back_partial_and_bad_answers():
    answers = {"q1": {"valueBoolean": True}, "q9": {"valueString": "Not at all"}, "q4": {"valueString": "perhaps"}}
    m = facts_from_bundle(bundle(patient(), lbp(), start_qr(answers)), reference_date=REF)
    sb = m.case["start_back"]
    assert sb["q1_leg_pain"] is True and sb["q9_bothersomeness"] == "not-at-all"
    assert sb["q4_dressed_slowly"] is None and sb["q2_shoulder_neck_pain"] is None
    assert any("q4_dressed_slowly" in i.message for i in m.issues)
    assert_valid(m.case)


def test_start_back_in_progress_or_old_is_not_used():
    m = facts_from_bundle(bundle(patient(), lbp(), start_qr({"q1": {"valueBoolean": True}}, status="in-progress")),
                          reference_date=REF)
    assert "start_back" not in m.case
    m = facts_from_bundle(bundle(patient(), lbp(), start_qr({"q1": {"valueBoolean": True}}, authored="2023-01-01")),
                          reference_date=REF)
    assert "start_back" not in m.case


def test_start_back_observation_convention():
    sb_sys = load_code_table().start_back["observation_system"]
    b = bundle(patient(), lbp(),
               obs("sb1", "q1", None, system=sb_sys, valueBoolean=True),
               obs("sb9", "q9", None, system=sb_sys, valueInteger=4))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["start_back"]["q1_leg_pain"] is True
    assert m.case["start_back"]["q9_bothersomeness"] == "extremely"
    assert m.provenance["start_back.q1_leg_pain"] == ["Observation/sb1"]
    assert_valid(m.case)


# ----------------------------------------------------------------------------- medications

def med(mid, code, display, status="active", authored="2023-06-01", system=RXNORM, **extra) -> dict:
    res = {"resourceType": "MedicationRequest", "id": mid, "status": status, "intent": "order",
           "medicationCodeableConcept": {"coding": [{"system": system, "code": code, "display": display}],
                                         "text": display},
           "subject": {"reference": "Patient/p1"}, "authoredOn": authored}
    res.update(extra)
    return res


def test_long_term_steroid_medication_request():
    b = bundle(patient(), lbp(), med("pred", "8640", "prednisone",
                                     dosageInstruction=[{"route": {"text": "oral"}}]))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["findings"]["long_term_systemic_corticosteroids"] == "present"
    assert m.provenance["findings.long_term_systemic_corticosteroids"] == ["MedicationRequest/pred"]


def test_steroid_chain_of_renewed_orders_and_short_course():
    # two stopped monthly orders then an active one: one course of > 12 weeks
    b = bundle(patient(), lbp(),
               med("p1", "8640", "prednisone", status="stopped", authored="2023-10-01",
                   dosageInstruction=[{"route": {"text": "oral"}}]),
               med("p2", "8640", "prednisone", status="stopped", authored="2023-11-15",
                   dosageInstruction=[{"route": {"text": "oral"}}]),
               med("p3", "8640", "prednisone", status="active", authored="2024-01-20",
                   dosageInstruction=[{"route": {"text": "oral"}}]))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["findings"]["long_term_systemic_corticosteroids"] == "present"
    assert set(m.provenance["findings.long_term_systemic_corticosteroids"]) == {
        "MedicationRequest/p1", "MedicationRequest/p2", "MedicationRequest/p3"}
    # a 2-week course: not long-term, warning, fact unknown
    b = bundle(patient(), lbp(), med("p", "8640", "prednisone", authored="2024-02-15",
                                     dosageInstruction=[{"route": {"text": "oral"}}]))
    m = facts_from_bundle(b, reference_date=REF)
    assert "long_term_systemic_corticosteroids" not in m.case["findings"]
    assert any("long-term use not established" in i.message for i in m.issues)


def test_topical_and_stopped_steroids_do_not_count():
    b = bundle(patient(), lbp(),
               med("cream", "5492", "hydrocortisone 1% topical cream"),
               med("old", "8640", "prednisone", status="stopped", authored="2020-01-01"))
    m = facts_from_bundle(b, reference_date=REF)
    assert "long_term_systemic_corticosteroids" not in m.case["findings"]


def test_immunosuppressant_and_anticoagulant_note():
    b = bundle(patient(), lbp(),
               med("mtx", "105586", "Methotrexate 10 MG Oral Tablet"),
               med("warf", "855332", "Warfarin Sodium 5 MG Oral Tablet"),
               med("atc", "L04AB04", "adalimumab", system="http://www.whocc.no/atc"))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["findings"]["immunosuppression"] == "present"
    assert set(m.provenance["findings.immunosuppression"]) == {"MedicationRequest/mtx", "MedicationRequest/atc"}
    note = [i for i in m.issues if i.resource == "MedicationRequest/warf"]
    assert note and note[0].severity == "info" and "anticoagulant" in note[0].message


def test_medication_statement_and_reference():
    medres = {"resourceType": "Medication", "id": "m1",
              "code": {"coding": [{"system": RXNORM, "code": "6851", "display": "methotrexate"}]}}
    ms = {"resourceType": "MedicationStatement", "id": "ms1", "status": "active",
          "medicationReference": {"reference": "Medication/m1"}, "subject": {"reference": "Patient/p1"},
          "effectivePeriod": {"start": "2023-01-01"}}
    m = facts_from_bundle(bundle(patient(), lbp(), medres, ms), reference_date=REF)
    assert m.case["findings"]["immunosuppression"] == "present"
    assert m.provenance["findings.immunosuppression"] == ["MedicationStatement/ms1"]


def test_unmapped_steroid_by_name_is_reported():
    m = facts_from_bundle(bundle(patient(), lbp(), med("x", "0000000", "prednisoLONE 5 MG Oral Tablet")),
                          reference_date=REF)
    assert "long_term_systemic_corticosteroids" not in m.case["findings"]
    assert any(i.resource == "MedicationRequest/x" and "by name" in i.message for i in m.issues)


# ----------------------------------------------------------------------------- procedures

def proc(pid, code, display, performed="2024-01-10", outcome=None, **extra) -> dict:
    res = {"resourceType": "Procedure", "id": pid, "status": "completed",
           "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
           "subject": {"reference": "Patient/p1"}, "performedDateTime": performed}
    if outcome:
        res["outcome"] = outcome
    res.update(extra)
    return res


def test_procedures_to_treatments_and_facts():
    unsuccessful = {"coding": [{"system": SNOMED, "code": "385671000", "display": "Unsuccessful"}]}
    b = bundle(patient(), lbp(),
               proc("pt1", "91251008", "Physical therapy procedure", performed="2023-11-01"),
               proc("pt2", "91251008", "Physical therapy procedure", performed="2023-12-13", outcome=unsuccessful),
               proc("thr", "52734007", "Total replacement of hip", performed="2015-05-05",
                    outcome={"text": "improved"}),
               proc("lam", "387731002", "Laminectomy", performed="2024-01-20"),
               proc("inj", "231274008", "Injection of steroid into joint", performed="2024-02-01",
                    bodySite=[{"text": "left hip joint"}]))
    m = facts_from_bundle(b, reference_date=REF)
    f = m.case["findings"]
    assert f["prosthetic_hip"] == "present"
    assert f["recent_spinal_procedure"] == "present"
    assert f["recent_joint_injection"] == "present"
    tr = {t["step"] + ":" + ",".join(t.get("modalities", [])): t for t in m.case["treatments"]}
    pt = tr["physical-therapy:"]
    assert pt["outcome"] == "no-improvement" and pt["sessions"] == 2 and pt["weeks"] == 6.0
    assert tr["surgery:hip_replacement"]["outcome"] == "improved"
    assert "surgery:spinal_decompression" not in tr                 # no outcome -> not added
    assert any("spinal_decompression" in i.message and "never guessed" in i.message for i in m.issues)
    i = [k for k, t in enumerate(m.case["treatments"]) if t["step"] == "physical-therapy"][0]
    assert m.provenance[f"treatments[{i}]"] == ["Procedure/pt1", "Procedure/pt2"]
    assert_valid(m.case)


def test_old_spinal_procedure_is_not_recent():
    b = bundle(patient(), lbp(), proc("fus", "55705006", "Spinal arthrodesis", performed="2019-01-01"))
    m = facts_from_bundle(b, reference_date=REF)
    assert "recent_spinal_procedure" not in m.case["findings"]


# ----------------------------------------------------------------------------- bad data

def test_missing_code_system_is_reported():
    c = lbp()
    del c["code"]["coding"][0]["system"]
    m = facts_from_bundle(bundle(patient(), c), reference_date=REF)
    assert m.case["context"]["region"] == "both"      # not mapped: the code has no system
    assert any(i.resource == "Condition/lbp" and "no system" in i.message and i.severity == "warning"
               for i in m.issues)


def test_unparseable_date_is_reported_not_fatal():
    b = bundle(patient(birth="05/01/1970"), lbp(onset="last tuesday"),
               obs("t", "8310-5", 38.9, when="2024-02-30T10:00:00Z"))
    m = facts_from_bundle(b, reference_date=REF)
    assert "age_years" not in m.case["context"]
    assert m.case["context"]["region"] == "back"                 # the condition still counts
    assert "pain_duration_weeks" not in m.case["context"]
    assert "temperature_c" not in m.case["findings"]
    bad = {i.resource for i in m.issues if "unparseable date" in i.message}
    assert bad == {"Patient/p1", "Condition/lbp", "Observation/t"}
    assert_valid(m.case)


def test_other_bad_data_never_raises():
    junk = bundle(patient(gender="robot"),
                  {"resourceType": "Condition", "id": "nocode", "subject": {"reference": "Patient/p1"}},
                  {"resourceType": "Condition", "id": "textonly", "code": {"text": "bad back"}},
                  condition("bad-status", "279039007", clinical="sort-of"),
                  condition("abate", "279039007", abatementDateTime="2000-01-01"),
                  {"resourceType": "Observation", "id": "o", "status": "final",
                   "code": {"coding": [{"system": LOINC, "code": "8310-5"}]}, "valueQuantity": {"value": "hot"},
                   "effectiveDateTime": "2024-02-29"},
                  {"resourceType": "MedicationRequest", "id": "mr", "status": "active",
                   "medicationReference": {"reference": "Medication/missing"}},
                  condition("other", "279039007", subject={"reference": "Patient/someone-else"}))
    junk["entry"].append({"fullUrl": "x"})
    junk["entry"].append("not a dict")
    m = facts_from_bundle(junk, reference_date=REF)
    assert_valid(m.case)
    text = explain(m)
    for rid in ("Condition/nocode", "Condition/textonly", "Condition/bad-status", "Observation/o",
                "MedicationRequest/mr", "Condition/other"):
        assert rid in text
    assert any("refers to another patient" in i.message for i in m.issues)


@pytest.mark.parametrize("bad", [None, [], "Bundle", {"resourceType": "Patient"}, {}])
def test_non_bundle_input_raises_value_error(bad):
    with pytest.raises(ValueError, match="Bundle"):
        facts_from_bundle(bad, reference_date=REF)


def test_facts_from_resources_input_checks():
    with pytest.raises(ValueError, match="facts_from_bundle"):
        facts_from_resources(bundle(patient()), reference_date=REF)
    with pytest.raises(ValueError):
        facts_from_resources(bundle(patient())["entry"][0]["resource"], reference_date=REF)
    with pytest.raises(ValueError, match="reference_date"):
        facts_from_bundle(bundle(patient()), reference_date="2024-01-01")
    m = facts_from_resources([patient(), "junk", lbp()], reference_date=dt.datetime(2024, 3, 1, 12, 0))
    assert m.case["context"]["region"] == "back"
    assert any("not a FHIR resource" in i.message for i in m.issues)


def test_case_id_is_pseudonymous_by_default():
    m = facts_from_bundle(bundle(patient(pid="secret-mrn-123"), lbp()), reference_date=REF)
    assert m.case["case_id"].startswith("fhir-") and "secret" not in m.case["case_id"]
    m = facts_from_bundle(bundle(patient(), lbp()), reference_date=REF, case_id="c-42")
    assert m.case["case_id"] == "c-42"


def test_mapping_does_not_mutate_input():
    b = bundle(patient(), lbp(), obs("t", "8310-5", 38.2))
    before = copy.deepcopy(b)
    facts_from_bundle(b, reference_date=REF)
    assert b == before


# ----------------------------------------------------------------------------- explain / code table

def test_explain_lists_facts_resources_and_issues():
    b = bundle(patient(), lbp(), obs("t", "8310-5", 38.2), condition("x", "372064008", verification="refuted"))
    m = facts_from_bundle(b, reference_date=REF)
    text = explain(m)
    assert "findings.temperature_c" in text and "Observation/t" in text
    assert "context.region" in text and "Condition/lbp" in text
    assert "issues:" in text and "[info] Condition/x" in text


def test_code_table_has_sources_and_known_facts():
    table = load_code_table()
    fact_ids = set(SCHEMA["properties"]["findings"]["properties"])
    for section in ("conditions", "procedures", "medications", "observations"):
        for e in table.doc[section]:
            assert e.get("source"), e
            assert e.get("codes") or e.get("prefixes"), e
            for fact in [e.get("fact")] + list((e.get("facts") or {}).keys()):
                if fact:
                    assert fact in fact_ids, fact
            if e.get("treatment"):
                step_enum = SCHEMA["$defs"]["treatment"]["properties"]["step"]["enum"]
                mod_enum = SCHEMA["$defs"]["treatment"]["properties"]["modalities"]["items"]["enum"]
                assert e["treatment"]["step"] in step_enum
                assert set(e["treatment"].get("modalities", [])) <= set(mod_enum)
    for cls in table.drug_classes.values():
        assert cls.get("fact") in fact_ids | {None}
    for fact in table.any_status:
        assert fact in fact_ids
    counts = table.counts()
    assert counts["history_of_cancer"] > 300 and counts["context.region=back"] > 5


def test_condition_abated_after_reference_date_counts_as_active_then():
    b = bundle(patient(), condition("dm", "44054006", clinical="resolved", onset="2020-01-01",
                                    abatementDateTime="2024-06-01", display="Type 2 diabetes mellitus"),
               condition("rc", "279039007", clinical="resolved", onset="2024-02-01", abatementDateTime="2024-02-20"))
    m = facts_from_bundle(b, reference_date=REF)
    assert m.case["findings"]["diabetes"] == "present"
    assert m.case["context"]["region"] == "both"          # the back pain had resolved by the reference date
    assert any(i.resource == "" and "region" in i.message for i in m.issues)


def test_region_condition_without_clinical_status_is_reported():
    m = facts_from_bundle(bundle(patient(), lbp(clinical=None)), reference_date=REF)
    assert m.case["context"]["region"] == "both"
    assert any(i.resource == "Condition/lbp" and "no clinicalStatus" in i.message for i in m.issues)
