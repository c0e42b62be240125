"""No patient data in logs or error messages beyond a case id (clinical safety rule 6).

Cases carry sentinel strings wherever a string can go (free-text notes, wrong-typed values, keys,
FHIR names and narrative); everything runs with DEBUG logging; no sentinel may appear in any log
record, error message, error record or CLI output stream meant for errors.
"""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest

import cds
from cds.cli import main
from tests.conftest import ENGINE

SENTINEL = "ZZSENTINEL Jane Q Patient 1961-02-03 NHS 943 476 5919"
TOKEN = "ZZSENTINEL"


@pytest.fixture(autouse=True)
def debug_logging(caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("cds", "cds.hooks", "cds.batch", "uvicorn", "httpx", ""):
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield caplog
    assert TOKEN not in caplog.text, "a sentinel reached the logs"


def valid_case() -> dict:
    return {"case_id": "sentinel-case", "context": {"region": "back", "age_years": 60},
            "findings": {"saddle_anesthesia": "present"},
            "treatments": [{"step": "self-care", "weeks": 4, "outcome": "worse", "note": SENTINEL}]}


BROKEN = [
    {"case_id": "b1", "context": {"region": SENTINEL}},
    {"case_id": "b2", "context": {"region": "back", "age_years": SENTINEL}},
    {"case_id": "b3", "context": {"region": "back"}, "findings": {"fever": SENTINEL}},
    {"case_id": "b4", "context": {"region": "back"}, "findings": {SENTINEL: "present"}},
    {"case_id": "b5", "context": {"region": "back"}, SENTINEL: 1},
    {"case_id": "b6", "context": {"region": "back"}, "treatments": [{"step": SENTINEL, "outcome": "worse"}]},
    {"case_id": "b7", "context": {"region": "back"}, "start_back": {"q9_bothersomeness": SENTINEL}},
    {"case_id": "b8", "context": {"region": "back"}, "treatments": [{"step": "medical", "outcome": "worse",
                                                                      "note": SENTINEL * 100}]},
    {"case_id": 123, "context": {"region": "back", "sex": SENTINEL}},
]


def test_evaluate_keeps_free_text_out_of_the_result_and_logs():
    rec = cds.evaluate(valid_case(), engine=ENGINE)
    assert TOKEN not in rec.to_json()
    assert rec.red_flags[0].id == "cauda_equina_syndrome"


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: str(c.get("case_id")))
def test_error_messages_never_repeat_values(case):
    with pytest.raises(cds.FactsError) as info:
        cds.evaluate(case, engine=ENGINE)
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value.problems)


def test_cli_error_output(tmp_path, capsys):
    for i, case in enumerate(BROKEN):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps(case))
        assert main(["evaluate", "--engine", ENGINE, str(path)]) == 2
    (tmp_path / "bad.json").write_text('{"case_id": "x", "context": ' + json.dumps(SENTINEL) + ", oops")
    assert main(["evaluate", str(tmp_path / "bad.json")]) == 2
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err


def test_batch_error_records(tmp_path):
    from cds.batch import evaluate_many

    records = list(evaluate_many([valid_case(), *BROKEN], engine=ENGINE))
    assert len(records) == len(BROKEN) + 1
    assert TOKEN not in json.dumps(records)
    nd = tmp_path / "cases.ndjson"
    nd.write_text("\n".join([json.dumps(valid_case()), *map(json.dumps, BROKEN), SENTINEL, "{" + SENTINEL]) + "\n")
    out = tmp_path / "results.ndjson"
    assert main(["batch", str(nd), "--out", str(out), "--workers", "1", "--quiet", "--engine", ENGINE]) == 2  # error records present
    text = out.read_text()
    assert len(text.splitlines()) == len(BROKEN) + 3 and TOKEN not in text
    summary = out.with_name(out.name.replace(".ndjson", ".summary.json"))
    if summary.exists():
        assert TOKEN not in summary.read_text()


def fhir_bundle() -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1961-02-03",
                      "name": [{"text": SENTINEL, "family": SENTINEL}], "address": [{"text": SENTINEL}],
                      "text": {"status": "generated", "div": f"<div>{SENTINEL}</div>"}}},
        {"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
                      "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                     "code": "active"}]},
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "279039007"}], "text": SENTINEL},
                      "note": [{"text": SENTINEL}], "onsetDateTime": SENTINEL}},
        {"resource": {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"},
                      "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
                      "valueQuantity": {"value": SENTINEL, "unit": SENTINEL}, "effectiveDateTime": "2024-01-01"}},
    ]}


def test_fhir_mapping_explain_and_issues():
    from cds.fhir import explain, facts_from_bundle

    m = facts_from_bundle(fhir_bundle(), reference_date=dt.date(2024, 1, 2))
    assert TOKEN not in json.dumps(m.case)
    assert TOKEN not in explain(m)
    assert all(TOKEN not in i.message for i in m.issues)
    rec = cds.evaluate(m.case, engine=ENGINE)
    assert TOKEN not in rec.to_json()


def test_cds_hooks_service(tmp_path):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from cds.hooks.app import create_app
    from cds.hooks.settings import Settings

    bundle = fhir_bundle()
    patient = bundle["entry"][0]["resource"]
    conditions = {"resourceType": "Bundle", "type": "searchset", "entry": [bundle["entry"][1]]}
    observations = {"resourceType": "Bundle", "type": "searchset", "entry": [bundle["entry"][2]]}
    body = {"hook": "patient-view", "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/x", "patientId": "p1"},
            "prefetch": {"patient": patient, "conditions": conditions, "observations": observations,
                         "medications": None, "procedures": None, "questionnaireResponses": None}}
    settings = Settings(insecure_dev_no_auth=True, engine=ENGINE, feedback_db=str(tmp_path / "f.sqlite3"))
    with TestClient(create_app(settings)) as client:
        r = client.post("/cds-services/back-hip-pain-patient-view", json=body)
        assert r.status_code == 200 and TOKEN not in r.text
        r = client.post("/cds-services/back-hip-pain-patient-view", content=b"{" + SENTINEL.encode())
        assert r.status_code in (400, 422) and TOKEN not in r.text
        r = client.post("/cds-services/back-hip-pain-patient-view/feedback",
                        json={"feedback": [{"card": SENTINEL, "outcome": "accepted",
                                            "outcomeTimestamp": "2024-01-01T00:00:00Z"}]})
        assert TOKEN not in r.text
