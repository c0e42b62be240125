"""Malformed input: only the documented errors, with a path; never another exception, hang or crash.

Each test counts the inputs it tried in ``TRIED``; `tools/fuzz_report.py` runs them with many more
examples and prints the totals.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import cds
from cds.cli import parse_json
from cds.rulesets import compile_ruleset, load_yaml
from tests.strategies import CAT, cases

TRIED: Counter[str] = Counter()

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["present", "absent", "unknown", "back", "hip", "", "\u0000", "\ud800", "𝔘" * 3, "1e400",
                     "NaN", "-0", "id", "sid", "$and", "$nex"]),
    st.integers(5000, 20000).map(lambda n: "x" * n),
)
json_like = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(
        ["case_id", "context", "findings", "region", "treatments", "id", "sid", "$or", "start_back"])), kids,
        max_size=5)), max_leaves=30)


def check_case(evaluator: cds.Evaluator, data: Any, kind: str) -> None:
    TRIED[kind] += 1
    try:
        rec = evaluator.evaluate(data)
    except cds.FactsError as exc:
        assert exc.problems and all(p.path.startswith("$") for p in exc.problems)
        return
    json.loads(rec.to_json())


@given(data=json_like)
def test_arbitrary_json_values_as_a_case(evaluator, data):
    check_case(evaluator, data, "case: arbitrary JSON")


@given(case=cases(), junk=json_like, data=st.data())
def test_valid_cases_with_junk_at_random_places(evaluator, case, junk, data):
    broken = copy.deepcopy(case)
    section = data.draw(st.sampled_from(["context", "findings", "start_back", "treatments", "odi", "unknown_reasons",
                                         "case_id", "root"]))
    key = data.draw(st.one_of(st.sampled_from(sorted(CAT.findings)[:30] + sorted(CAT.context)), st.text(max_size=8)))
    if section == "root":
        broken[key] = junk
    elif section == "case_id":
        broken["case_id"] = junk
    elif section == "treatments":
        broken["treatments"] = [junk] if data.draw(st.booleans()) else junk
    elif isinstance(broken.get(section), dict):
        broken[section][key] = junk
    else:
        broken[section] = junk
    check_case(evaluator, broken, "case: valid with junk")


@given(case=cases(), value=st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                     st.integers(min_value=-(2**80), max_value=2**80)))
def test_extreme_numbers_everywhere(evaluator, case, value):
    numeric = [k for k, v in CAT.findings.items() if v["kind"] == "number"]
    broken = copy.deepcopy(case)
    for k in numeric:
        broken["findings"][k] = value
    broken["context"]["age_years"] = value
    check_case(evaluator, broken, "case: extreme numbers")
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)) or abs(value) > 1e9:
        with pytest.raises(cds.FactsError):
            evaluator.evaluate(broken)


@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n),
                     st.integers(1, 50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
                     st.just(b'{"case_id": "a", "case_id": "b", "context": {"region": "back"}}'),
                     st.just(b"\xff\xfe{}"), st.just(b'{"case_id": "x", "context": {"region": "back"}, "findings": '
                                                      b'{"fever": NaN}}')))
@settings(max_examples=200)
def test_raw_bytes_through_the_json_reader(evaluator, raw):
    TRIED["raw bytes"] += 1
    try:
        data = parse_json(raw)
    except cds.FactsError as exc:
        assert exc.problems[0].path == "$"
        return
    check_case(evaluator, data, "raw bytes -> case")


RULESET_DOC = yaml.safe_load(open(cds.load_ruleset("back-hip-pain", "1.0.0").path, encoding="utf-8"))


@given(data=json_like)
@settings(max_examples=200)
def test_arbitrary_documents_as_a_ruleset(data):
    TRIED["ruleset: arbitrary document"] += 1
    with pytest.raises(cds.RulesetError):
        compile_ruleset(data, sha256="0" * 64, path="fuzz.yaml")


@given(data=st.data())
@settings(max_examples=60)
def test_the_shipped_ruleset_with_one_value_broken(data):
    doc = copy.deepcopy(RULESET_DOC)
    rule = data.draw(st.sampled_from(doc["rules"]))
    field = data.draw(st.sampled_from(["when", "effect", "sources", "id", "title"]))
    rule[field] = data.draw(json_like)
    TRIED["ruleset: shipped with one value broken"] += 1
    try:
        compile_ruleset(doc, sha256="0" * 64, path="fuzz.yaml")
    except cds.RulesetError as exc:
        assert exc.path == "fuzz.yaml"


@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
@settings(max_examples=200)
def test_arbitrary_text_as_ruleset_yaml(text):
    TRIED["ruleset: arbitrary YAML text"] += 1
    try:
        doc = load_yaml(text.encode("utf-8", "surrogatepass"), "fuzz.yaml")
    except cds.RulesetError:
        return
    with pytest.raises(cds.RulesetError):
        compile_ruleset(doc, sha256="0" * 64, path="fuzz.yaml")


def test_yaml_alias_bomb_is_refused_quickly():
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(12))
    with pytest.raises(cds.RulesetError, match="aliases are not allowed"):
        load_yaml(bomb.encode(), "bomb.yaml")
    with pytest.raises(cds.RulesetError, match="larger than"):
        load_yaml(b"a: " + b"x" * 3_000_000, "big.yaml")
    with pytest.raises(cds.RulesetError, match="not valid YAML"):
        load_yaml(b"!!python/object/apply:os.system ['true']", "evil.yaml")


resources = st.fixed_dictionaries({"resourceType": st.sampled_from(
    ["Patient", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure",
     "QuestionnaireResponse", "Encounter", "Bogus"])}, optional={
    "id": scalars, "subject": json_like, "code": json_like, "clinicalStatus": json_like,
    "verificationStatus": json_like, "onsetDateTime": scalars, "effectiveDateTime": scalars, "birthDate": scalars,
    "gender": scalars, "valueQuantity": json_like, "item": json_like, "component": json_like,
    "medicationCodeableConcept": json_like, "status": scalars, "performedPeriod": json_like, "outcome": json_like})


@given(items=st.lists(resources, max_size=6), junk=json_like)
@settings(max_examples=300)
def test_fhir_adapter_reports_bad_data_and_never_crashes(evaluator, items, junk):
    from cds.fhir import facts_from_bundle

    TRIED["fhir: generated resources"] += 1
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in items] + [junk]}
    try:
        mapping = facts_from_bundle(bundle, reference_date=dt.date(2024, 1, 1))
    except cds.FactsError as exc:  # the one documented refusal of a whole Bundle's content
        assert "not valid Unicode" in str(exc)
        return
    evaluator.evaluate(mapping.case)  # whatever the resources held, the case they make is valid
    with pytest.raises(cds.FactsError):
        facts_from_bundle(junk if not isinstance(junk, dict) else {**junk, "resourceType": "Nope"},
                          reference_date=dt.date(2024, 1, 1))


@pytest.mark.parametrize("case", [
    {"case_id": "\ud800", "context": {"region": "back"}},
    {"case_id": "x", "context": {"region": "back"},
     "treatments": [{"step": "medical", "outcome": "worse", "note": "ok \udc80"}]},
])
def test_unpaired_surrogates_are_a_facts_error(evaluator, case):
    # JSON can carry "\\ud800"; such a string cannot be encoded, hashed or written as UTF-8.
    with pytest.raises(cds.FactsError, match="valid Unicode"):
        evaluator.evaluate(case)
