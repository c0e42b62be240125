"""Recommendations follow schemas/recommendation.schema.json and serialise to stable, key-sorted JSON."""

from __future__ import annotations

import json

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from cds._resources import load_schema
from tests.strategies import biased_findings, cases

REC = jsonschema.Draft202012Validator(load_schema("recommendation.schema.json"))


@settings(max_examples=300)
@given(case=st.one_of(cases(), cases(findings=biased_findings(0.3))))
def test_every_recommendation_validates_and_is_key_sorted(evaluator, case):
    rec = evaluator.evaluate(case)
    data = rec.to_dict()
    REC.validate(data)
    text = rec.to_json()
    assert json.loads(text) == json.loads(json.dumps(data))
    assert text == json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    for reason in data["reasons"]:
        assert reason["sources"], reason["rule_id"]  # every fired rule cites its basis
