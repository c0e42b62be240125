"""The condition compiler: one test per operator, including unknown, missing and censored values."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cds.conditions import (
    And,
    Cmp,
    Count,
    In,
    Is,
    Not,
    Or,
    ParseContext,
    compare,
    compile_predicate,
    describe,
    facts_of,
    parse,
)
from cds.facts import Censored

KINDS = {
    "a": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "b": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "c": {"kind": "tri_state", "values": ("present", "absent", "unknown")},
    "age": {"kind": "number"},
    "sex": {"kind": "enum", "values": ("female", "male", "other", "unknown")},
}


def ctx(**kw):
    return ParseContext(kinds=KINDS, parameters={"limit": 50}, lists={"abc": ("a", "b", "c")},
                        conditions={"female": {"fact": "sex", "in": ["female"]}, "loop": {"ref": "loop"}}, **kw)


def ev(raw, values):
    c = ctx()
    node = parse(raw, c, "$")
    assert not c.problems, c.problems
    return compile_predicate(node)(values)


@pytest.mark.parametrize("values,expected", [({"a": "present"}, True), ({"a": "absent"}, False), ({}, None),
                                             ({"a": "unknown"}, None)])
def test_is_present(values, expected):
    assert ev({"fact": "a", "is": "present"}, values) is expected


@pytest.mark.parametrize("values,expected", [({"a": "present"}, False), ({"a": "absent"}, True), ({}, None)])
def test_is_absent(values, expected):
    assert ev({"fact": "a", "is": "absent"}, values) is expected


def test_is_unknown_and_known():
    assert ev({"fact": "a", "is": "unknown"}, {}) is True
    assert ev({"fact": "a", "is": "unknown"}, {"a": "absent"}) is False
    assert ev({"fact": "age", "is": "known"}, {"age": 3}) is True
    assert ev({"fact": "age", "is": "known"}, {}) is False


@pytest.mark.parametrize("op,n,age,expected", [
    ("gt", 50, 51, True), ("gt", 50, 50, False), ("ge", 50, 50, True), ("ge", 50, 49.9, False),
    ("lt", 20, 19, True), ("lt", 20, 20, False), ("le", 20, 20, True), ("eq", 3, 3, True), ("ne", 3, 3, False),
    ("gt", 50, "unknown", None),
])
def test_comparisons(op, n, age, expected):
    values = {} if age == "unknown" else {"age": age}
    assert ev({"fact": "age", op: n}, values) is expected


def test_missing_number_is_never_a_negative():
    # Every comparison on a missing number is unknown, "ne" included: it can never fire a rule.
    for op in ("gt", "ge", "lt", "le", "eq", "ne"):
        assert ev({"fact": "age", op: 5}, {}) is None
        assert ev({"not": {"fact": "age", op: 5}}, {}) is None


@pytest.mark.parametrize("censored,op,n,expected", [
    (Censored("gt", 30), "gt", 30, True), (Censored("gt", 30), "gt", 31, None), (Censored("ge", 30), "gt", 30, None),
    (Censored("ge", 30), "ge", 30, True), (Censored("gt", 30), "le", 30, False), (Censored("lt", 30), "lt", 30, True),
    (Censored("le", 30), "lt", 30, None), (Censored("le", 30), "le", 30, True), (Censored("lt", 10), "ge", 10, False),
    (Censored("gt", 30), "eq", 20, False), (Censored("gt", 30), "eq", 40, None), (Censored("gt", 30), "ne", 20, True),
])
def test_censored_numbers(censored, op, n, expected):
    assert compare(censored, op, n) is expected


def test_param_reference():
    assert ev({"fact": "age", "gt": {"param": "limit"}}, {"age": 51}) is True
    assert ev({"fact": "age", "gt": {"param": "limit"}}, {"age": 50}) is False


def test_in():
    assert ev({"fact": "sex", "in": ["female"]}, {"sex": "female"}) is True
    assert ev({"fact": "sex", "in": ["female"]}, {"sex": "male"}) is False
    assert ev({"fact": "sex", "in": ["female"]}, {}) is None
    assert ev({"fact": "sex", "in": ["female", "unknown"]}, {}) is True


def test_any_present_and_lists():
    assert ev({"any_present": {"list": "abc"}}, {"b": "present"}) is True
    assert ev({"any_present": ["a", "b"]}, {"a": "absent", "b": "absent"}) is False
    assert ev({"any_present": ["a", "b"]}, {"a": "absent"}) is None


@pytest.mark.parametrize("values,op,n,expected", [
    ({"a": "present", "b": "present"}, "ge", 2, True),
    ({"a": "present"}, "ge", 2, None),                                    # b, c unknown could make 2
    ({"a": "present", "b": "absent", "c": "absent"}, "ge", 2, False),
    ({"a": "present", "b": "present", "c": "absent"}, "eq", 2, True),
    ({"a": "present", "b": "present"}, "eq", 2, None),                   # c could make 3
    ({"a": "present", "b": "present", "c": "present"}, "eq", 2, False),
    ({"a": "absent", "b": "absent"}, "le", 0, None),
    ({"a": "absent", "b": "absent", "c": "absent"}, "le", 0, True),
    ({"a": "present"}, "lt", 1, False),
])
def test_count_present(values, op, n, expected):
    assert ev({"count_present": ["a", "b", "c"], op: n}, values) is expected


def test_count_of_conditions():
    raw = {"count": [{"fact": "age", "gt": 50}, {"fact": "a", "is": "present"}], "ge": 2}
    assert ev(raw, {"age": 60, "a": "present"}) is True
    assert ev(raw, {"age": 60}) is None
    assert ev(raw, {"age": 40}) is False


def test_kleene_connectives():
    t, f, u = {"fact": "a", "is": "present"}, {"fact": "b", "is": "present"}, {"fact": "c", "is": "present"}
    v = {"a": "present", "b": "absent"}
    assert ev({"all": [t, u]}, v) is None
    assert ev({"all": [f, u]}, v) is False
    assert ev({"any": [t, u]}, v) is True
    assert ev({"any": [f, u]}, v) is None
    assert ev({"not": u}, v) is None
    assert ev({"not": f}, v) is True


def test_named_conditions_and_descriptions():
    c = ctx()
    node = parse({"all": [{"ref": "female"}, {"count_present": {"list": "abc"}, "ge": 2}]}, c, "$")
    assert not c.problems
    assert facts_of(node) == ("sex", "a", "b", "c")
    assert describe(node) == "sex is female AND ≥ 2 present of: a, b, c"


@pytest.mark.parametrize("raw,where", [
    ({"fact": "nope", "is": "present"}, "$.fact"),
    ({"fact": "a", "is": "yes"}, "$.is"),
    ({"fact": "age", "is": "present"}, "$.is"),
    ({"fact": "sex", "in": ["dog"]}, "$.in"),
    ({"fact": "a", "gt": 3}, "$.gt"),
    ({"fact": "age", "gt": {"param": "nope"}}, "$.gt.param"),
    ({"any_present": {"list": "nope"}}, "$.any_present.list"),
    ({"ref": "nope"}, "$.ref"),
    ({"ref": "loop"}, "conditions.loop.ref"),
    ({"all": []}, "$.all"),
    ({"count_present": ["a"], "ge": 1.5}, "$.ge"),
    ({"fact": "a", "is": "present", "gt": 2}, "$"),
    ({"eval": "__import__('os')"}, "$"),
])
def test_parse_errors_name_the_path(raw, where):
    c = ctx()
    parse(raw, c, "$")
    assert c.problems and c.problems[0].path == where, c.problems


tri = st.sampled_from(["present", "absent", "unknown"])


@given(a=tri, b=tri, c=tri)
def test_de_morgan_in_three_valued_logic(a, b, c):
    v = {k: x for k, x in (("a", a), ("b", b), ("c", c)) if x != "unknown"}
    nodes = [Is("a", "present"), Is("b", "present"), Is("c", "absent")]
    lhs = compile_predicate(Not(And(tuple(nodes))))(v)
    rhs = compile_predicate(Or(tuple(Not(n) for n in nodes)))(v)
    assert lhs is rhs
    assert compile_predicate(Count(tuple(nodes), "ge", 1))(v) is compile_predicate(Or(tuple(nodes)))(v)
    assert compile_predicate(Count(tuple(nodes), "ge", 3))(v) is compile_predicate(And(tuple(nodes)))(v)


def test_in_and_cmp_nodes_are_plain_values():
    assert In("sex", ("female",)) == In("sex", ("female",))
    assert Cmp("age", "gt", 50) != Cmp("age", "gt", 51)
