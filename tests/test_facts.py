"""The case-file contract: the fast validator agrees with the JSON Schema; errors name path and expectation."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import cds
from cds._resources import load_schema
from cds.facts import PatientFacts, catalogue
from tests.strategies import cases

SCHEMA = jsonschema.Draft202012Validator(load_schema("patient-facts.schema.json"))
VOCABULARY = "tests/fixtures/vocabulary.yaml"


def schema_ok(case: Any) -> bool:
    return SCHEMA.is_valid(case)


def fast_ok(case: Any) -> bool:
    try:
        PatientFacts.from_dict(case)
    except cds.FactsError:
        return False
    return True


@given(case=cases())
def test_generated_cases_are_valid_both_ways(case):
    assert schema_ok(case) and fast_ok(case)
    facts = PatientFacts.from_dict(case)
    assert PatientFacts.from_dict(facts.to_dict()) == facts  # round trip


junk = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                             st.integers(), max_size=2))


@given(case=cases(), data=st.data())
def test_fast_validator_agrees_with_the_schema_on_broken_cases(case, data):
    broken = copy.deepcopy(case)
    where = data.draw(st.sampled_from(["context", "findings", "top", "treatments", "start_back"]))
    key = data.draw(st.sampled_from(sorted(catalogue().findings)[:40] + ["region", "age_years", "not_a_key"]))
    if where == "top":
        broken[data.draw(st.sampled_from(["case_id", "context", "findings", "extra"]))] = data.draw(junk)
    elif where == "treatments":
        broken["treatments"] = [data.draw(st.dictionaries(st.sampled_from(["step", "outcome", "weeks", "x"]), junk))]
    elif where == "start_back":
        broken["start_back"] = {data.draw(st.sampled_from(list(catalogue().start_back) + ["q0"])): data.draw(junk)}
    else:
        broken.setdefault(where, {})[key] = data.draw(junk)
    try:
        json.dumps(broken, allow_nan=False)
    except ValueError:
        # NaN / infinity are not JSON: the schema library accepts them as numbers, cds refuses them.
        assert not fast_ok(broken)
        return
    assert schema_ok(broken) == fast_ok(broken), broken


def test_every_problem_is_listed_with_its_path_and_no_values():
    secret = "Jane Example 1970-01-01"
    bad = {"case_id": "c1", "context": {"age_years": "old", "region": "leg"},
           "findings": {"saddle_anesthesia": "yes", "saddle_anaesthesia": "present", "fever": secret},
           "treatments": [{"step": "surgery"}], "start_back": {"q9_bothersomeness": "a bit"}, "extra": 1}
    with pytest.raises(cds.FactsError) as info:
        PatientFacts.from_dict(bad)
    paths = [p.path for p in info.value.problems]
    assert paths == sorted([
        "$.context.age_years", "$.context.region", "$.findings.saddle_anesthesia", "$.findings.saddle_anaesthesia",
        "$.findings.fever", "$.treatments[0].outcome", "$.start_back.q9_bothersomeness", "$.extra"])
    text = str(info.value)
    assert "$.findings.saddle_anesthesia: expected one of present/absent/unknown" in text
    assert secret not in text and "a bit" not in text and "old" not in text.replace("cold", "")
    assert info.value.case_id == "c1"


def test_missing_finding_is_unknown_and_region_is_required():
    facts = PatientFacts.from_dict({"case_id": "c", "context": {"region": "hip"}})
    assert facts.get("saddle_anesthesia") == "unknown"
    with pytest.raises(cds.FactsError, match=r"\$\.context\.region: required"):
        PatientFacts.from_dict({"case_id": "c", "context": {}})
    with pytest.raises(cds.FactsError, match=r"\$: expected a JSON object"):
        PatientFacts.from_dict([1, 2])


def test_schema_covers_the_whole_vocabulary():
    voc = yaml.safe_load(open(VOCABULARY, encoding="utf-8"))
    cat = catalogue()
    finding_ids = {i["id"] for items in voc["findings"].values() for i in items}
    assert finding_ids == set(cat.findings)
    assert {c["id"] for c in voc["context"]} == set(cat.context)
    assert {i["id"] for i in voc["instruments"]["start_back"]["items"]} == set(cat.start_back)
    assert {m["id"] for m in voc["treatments"]["modalities"]} == set(cat.modalities)
    assert {s["id"] for s in voc["instruments"]["oswestry_disability_index"]["sections"]} == set(cat.odi)
    from cds.scores import DERIVED
    assert {d["id"] for d in voc["derived"]} <= set(DERIVED)
    for item in (i for items in voc["findings"].values() for i in items):
        assert cat.findings[item["id"]]["kind"] == item["type"]
        if item["type"] == "enum":
            assert set(cat.findings[item["id"]]["values"]) == set(item["values"]) | {"unknown"}


def test_canonical_hash_ignores_key_order():
    a = {"case_id": "c", "context": {"region": "back", "age_years": 40}, "findings": {"fever": "absent", "osteoporosis": "present"}}
    b = {"findings": {"osteoporosis": "present", "fever": "absent"}, "context": {"age_years": 40, "region": "back"}, "case_id": "c"}
    assert PatientFacts.from_dict(a).sha256() == PatientFacts.from_dict(b).sha256()
