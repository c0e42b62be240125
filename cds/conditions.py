"""Condition trees: parsing from ruleset data, three-valued evaluation, and wording.

A rule's ``when`` is a tree of plain data (see docs/ruleset-format.md). :func:`parse` checks it
against the fact catalogue and the ruleset's parameters, lists and named conditions, and returns
a small immutable AST in which every reference is resolved (parameters become numbers, lists
become their items, ``ref`` becomes the named tree). The AST is what both evaluators consume:
the reference evaluator here (:func:`compile_predicate`, plain Python closures) and the
durable_rules network in :mod:`cds.engine`.

Semantics are Kleene's three-valued logic: True, False, or None for unknown. A rule fires only
when its condition is True, so an unknown finding can never act as a negative one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, Union

import attrs

from cds.errors import Problem

UNKNOWN = "unknown"
Tri = Union[bool, None]
Values = Mapping[str, Any]

CMP_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
    "eq": operator.eq, "ne": operator.ne,
}
COUNT_OPS = ("gt", "ge", "eq", "le", "lt")
OP_WORDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "eq": "=", "ne": "≠"}


@attrs.frozen
class Is:
    """Tri-state test: ``state`` is present, absent, unknown or known."""

    fact: str
    state: str


@attrs.frozen
class Cmp:
    fact: str
    op: str
    value: float


@attrs.frozen
class In:
    fact: str
    values: tuple[str, ...]


@attrs.frozen
class Count:
    items: tuple[Node, ...]
    op: str
    n: int


@attrs.frozen
class And:
    items: tuple[Node, ...]


@attrs.frozen
class Or:
    items: tuple[Node, ...]


@attrs.frozen
class Not:
    item: Node


Node = Union[Is, Cmp, In, Count, And, Or, Not]


# --------------------------------------------------------------------------------------- parsing
@attrs.define
class ParseContext:
    """What a condition may refer to. ``kinds`` maps fact id -> {"kind": ..., "values": ...}."""

    kinds: Mapping[str, Mapping[str, Any]]
    parameters: Mapping[str, float]
    lists: Mapping[str, tuple[str, ...]]
    conditions: Mapping[str, Any]
    problems: list[Problem] = attrs.field(factory=list)
    facts_used: set[str] = attrs.field(factory=set)
    params_used: set[str] = attrs.field(factory=set)
    lists_used: set[str] = attrs.field(factory=set)
    refs_used: set[str] = attrs.field(factory=set)
    _ref_stack: list[str] = attrs.field(factory=list)

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))


_FORMS = ("fact", "any_present", "count_present", "count", "all", "any", "not", "ref")


def parse(raw: Any, ctx: ParseContext, path: str) -> Node:
    """Parse one condition; problems go to ``ctx.problems`` (a placeholder node is returned)."""
    placeholder = And(())
    if not isinstance(raw, dict):
        ctx.error(path, "expected a condition object")
        return placeholder
    forms = [k for k in _FORMS if k in raw]
    if len(forms) != 1:
        ctx.error(path, "expected exactly one of " + ", ".join(_FORMS))
        return placeholder
    form = forms[0]
    if form in ("all", "any"):
        raw_items = raw[form]
        _only(raw, (form,), ctx, path)
        if not isinstance(raw_items, list) or not raw_items:
            ctx.error(f"{path}.{form}", "expected a non-empty list of conditions")
            return placeholder
        nodes = tuple(parse(c, ctx, f"{path}.{form}[{i}]") for i, c in enumerate(raw_items))
        return And(nodes) if form == "all" else Or(nodes)
    if form == "not":
        _only(raw, ("not",), ctx, path)
        return Not(parse(raw["not"], ctx, f"{path}.not"))
    if form == "ref":
        _only(raw, ("ref",), ctx, path)
        name = raw["ref"]
        if name not in ctx.conditions:
            ctx.error(f"{path}.ref", f"unknown named condition {name!r}")
            return placeholder
        if name in ctx._ref_stack:
            ctx.error(f"{path}.ref", f"named condition {name!r} refers to itself")
            return placeholder
        ctx.refs_used.add(name)
        ctx._ref_stack.append(name)
        try:
            return parse(ctx.conditions[name], ctx, f"conditions.{name}")
        finally:
            ctx._ref_stack.pop()
    if form == "any_present":
        _only(raw, ("any_present",), ctx, path)
        ids = _fact_list(raw["any_present"], ctx, f"{path}.any_present")
        return Or(tuple(Is(f, "present") for f in ids))
    if form in ("count_present", "count"):
        ops = [k for k in COUNT_OPS if k in raw]
        _only(raw, (form, *COUNT_OPS), ctx, path)
        if len(ops) != 1:
            ctx.error(path, "expected exactly one of " + ", ".join(COUNT_OPS))
            return placeholder
        n = _number(raw[ops[0]], ctx, f"{path}.{ops[0]}")
        if form == "count_present":
            items: tuple[Node, ...] = tuple(Is(f, "present") for f in
                                            _fact_list(raw["count_present"], ctx, f"{path}.count_present"))
        else:
            conds = raw["count"]
            if not isinstance(conds, list) or not conds:
                ctx.error(f"{path}.count", "expected a non-empty list of conditions")
                return placeholder
            items = tuple(parse(c, ctx, f"{path}.count[{i}]") for i, c in enumerate(conds))
        if n is None or n != int(n) or n < 0:
            ctx.error(f"{path}.{ops[0]}", "expected a whole number >= 0")
            return placeholder
        return Count(items, ops[0], int(n))
    # form == "fact"
    fact = raw["fact"]
    spec = ctx.kinds.get(fact) if isinstance(fact, str) else None
    if spec is None:
        ctx.error(f"{path}.fact", f"unknown fact id {fact!r}")
        return placeholder
    ctx.facts_used.add(fact)
    kind = spec["kind"]
    tests = [k for k in ("is", "in", *CMP_OPS) if k in raw]
    _only(raw, ("fact", "is", "in", *CMP_OPS), ctx, path)
    if len(tests) != 1:
        ctx.error(path, "expected exactly one test: is, in, gt, ge, lt, le, eq or ne")
        return placeholder
    test = tests[0]
    if test == "is":
        state = raw["is"]
        if state in ("unknown", "known"):
            return Is(fact, state)
        if kind != "tri_state" or state not in ("present", "absent"):
            ctx.error(f"{path}.is", f"{fact} is {kind}: 'is' takes present/absent/unknown/known"
                      if kind == "tri_state" else f"{fact} is {kind}: 'is' takes only unknown/known here")
            return placeholder
        return Is(fact, state)
    if test == "in":
        values = raw["in"]
        allowed = spec.get("values", ())
        if kind != "enum":
            ctx.error(f"{path}.in", f"{fact} is {kind}: 'in' needs an enum fact")
            return placeholder
        if not isinstance(values, list) or not values or any(v not in allowed for v in values):
            ctx.error(f"{path}.in", f"expected a non-empty list from {'/'.join(allowed)}")
            return placeholder
        return In(fact, tuple(values))
    if kind != "number":
        ctx.error(f"{path}.{test}", f"{fact} is {kind}: comparisons need a number fact")
        return placeholder
    value = _number(raw[test], ctx, f"{path}.{test}")
    if value is None:
        return placeholder
    return Cmp(fact, test, value)


def _only(raw: Mapping[str, Any], allowed: tuple[str, ...], ctx: ParseContext, path: str) -> None:
    for key in raw:
        if key not in allowed:
            ctx.error(f"{path}.{key}", "unexpected key in this condition")


def _number(raw: Any, ctx: ParseContext, path: str) -> float | None:
    if isinstance(raw, dict) and set(raw) == {"param"}:
        name = raw["param"]
        if name not in ctx.parameters:
            ctx.error(f"{path}.param", f"unknown parameter {name!r}")
            return None
        ctx.params_used.add(name)
        return ctx.parameters[name]
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return raw
    ctx.error(path, "expected a number or {param: NAME}")
    return None


def _fact_list(raw: Any, ctx: ParseContext, path: str) -> tuple[str, ...]:
    if isinstance(raw, dict) and set(raw) == {"list"}:
        name = raw["list"]
        if name not in ctx.lists:
            ctx.error(f"{path}.list", f"unknown list {name!r}")
            return ()
        ctx.lists_used.add(name)
        ids, where = ctx.lists[name], f"lists.{name}"
    elif isinstance(raw, list) and raw:
        ids, where = tuple(raw), path
    else:
        ctx.error(path, "expected a non-empty list of fact ids or {list: NAME}")
        return ()
    for i, f in enumerate(ids):
        spec = ctx.kinds.get(f) if isinstance(f, str) else None
        if spec is None:
            ctx.error(f"{where}[{i}]", f"unknown fact id {f!r}")
        elif spec["kind"] != "tri_state":
            ctx.error(f"{where}[{i}]", f"{f} is {spec['kind']}: present-tests need tri-state facts")
        else:
            ctx.facts_used.add(f)
    return tuple(ids)


# ------------------------------------------------------------------------ reference evaluator
Predicate = Callable[[Values], Tri]


def _interval(value: Any) -> tuple[float, bool, float, bool]:
    """(low, low_inclusive, high, high_inclusive) for a number or a censored number."""
    if isinstance(value, (int, float)):
        return value, True, value, True
    op, b = value.op, value.bound
    inf = float("inf")
    return {"gt": (b, False, inf, False), "ge": (b, True, inf, False),
            "lt": (-inf, False, b, False), "le": (-inf, False, b, True)}[op]


def compare(value: Any, op: str, n: float) -> Tri:
    """Three-valued comparison of a (possibly censored) number with ``n``."""
    if value == UNKNOWN or value is None:
        return None
    if isinstance(value, (int, float)):
        return CMP_OPS[op](value, n)
    lo, lo_in, hi, hi_in = _interval(value)
    # does every / any value in the interval satisfy the comparison?
    above_all = lo > n or (lo == n and not lo_in)      # every value > n
    at_least_all = lo >= n                               # every value >= n
    below_all = hi < n or (hi == n and not hi_in)       # every value < n
    at_most_all = hi <= n                                # every value <= n
    contains_n = not above_all and not below_all
    table = {
        "gt": (above_all, at_most_all), "ge": (at_least_all, below_all),
        "lt": (below_all, at_least_all), "le": (at_most_all, above_all),
        "eq": (False, not contains_n), "ne": (not contains_n, False),
    }
    true, false = table[op]
    return True if true else (False if false else None)


def _count_holds(op: str, n: int, lo: int, hi: int) -> Tri:
    hold = [CMP_OPS[op](k, n) for k in (lo, hi)]
    if op in ("eq",):
        if lo == hi:
            return lo == n
        return None if lo <= n <= hi else False
    # the other operators are monotone in k, so the two ends decide
    if all(hold):
        return True
    if not any(hold):
        return False
    return None


def compile_predicate(node: Node) -> Predicate:
    """Compile an AST into a closure over a flat ``{fact_id: value}`` mapping."""
    if isinstance(node, Is):
        fact, state = node.fact, node.state
        if state == "unknown":
            return lambda v: v.get(fact, UNKNOWN) == UNKNOWN
        if state == "known":
            return lambda v: v.get(fact, UNKNOWN) != UNKNOWN
        other = "absent" if state == "present" else "present"

        def is_state(v: Values) -> Tri:
            x = v.get(fact, UNKNOWN)
            return True if x == state else (False if x == other else None)
        return is_state
    if isinstance(node, Cmp):
        fact, op, n = node.fact, node.op, node.value
        return lambda v: compare(v.get(fact, UNKNOWN), op, n)
    if isinstance(node, In):
        fact, values = node.fact, frozenset(node.values)
        unknown_listed = UNKNOWN in values

        def is_in(v: Values) -> Tri:
            x = v.get(fact, UNKNOWN)
            if x == UNKNOWN:
                return True if unknown_listed else None
            return x in values
        return is_in
    if isinstance(node, Not):
        inner = compile_predicate(node.item)

        def negate(v: Values) -> Tri:
            r = inner(v)
            return None if r is None else not r
        return negate
    if isinstance(node, And):
        parts = tuple(compile_predicate(c) for c in node.items)

        def conj(v: Values) -> Tri:
            result: Tri = True
            for p in parts:
                r = p(v)
                if r is False:
                    return False
                if r is None:
                    result = None
            return result
        return conj
    if isinstance(node, Or):
        parts = tuple(compile_predicate(c) for c in node.items)

        def disj(v: Values) -> Tri:
            result: Tri = False
            for p in parts:
                r = p(v)
                if r is True:
                    return True
                if r is None:
                    result = None
            return result
        return disj
    if isinstance(node, Count):
        parts = tuple(compile_predicate(c) for c in node.items)
        op, n = node.op, node.n

        def count(v: Values) -> Tri:
            t = u = 0
            for p in parts:
                r = p(v)
                if r is True:
                    t += 1
                elif r is None:
                    u += 1
            return _count_holds(op, n, t, t + u)
        return count
    raise TypeError(f"not a condition node: {node!r}")


def facts_of(node: Node) -> tuple[str, ...]:
    """Every fact id a condition reads, in first-use order."""
    seen: dict[str, None] = {}

    def walk(n: Node) -> None:
        if isinstance(n, (Is, Cmp, In)):
            seen.setdefault(n.fact, None)
        elif isinstance(n, Not):
            walk(n.item)
        else:
            for c in n.items:
                walk(c)
    walk(node)
    return tuple(seen)


# ---------------------------------------------------------------------------------- wording
def describe(node: Node, depth: int = 0) -> str:
    """The condition in words, for clinical reviewers."""
    if isinstance(node, Is):
        return {"present": f"{node.fact} is present", "absent": f"{node.fact} is absent",
                "unknown": f"{node.fact} is not recorded", "known": f"{node.fact} is recorded"}[node.state]
    if isinstance(node, Cmp):
        return f"{node.fact} {OP_WORDS[node.op]} {node.value:g}"
    if isinstance(node, In):
        return f"{node.fact} is {' or '.join(node.values)}"
    if isinstance(node, Not):
        return f"NOT ({describe(node.item, depth + 1)})"
    if isinstance(node, Count):
        inner = "; ".join(describe(c, depth + 1) for c in node.items)
        if all(isinstance(c, Is) and c.state == "present" for c in node.items):
            inner = ", ".join(c.fact for c in node.items)  # type: ignore[union-attr]
            return f"{OP_WORDS[node.op]} {node.n} present of: {inner}"
        return f"{OP_WORDS[node.op]} {node.n} true of: [{inner}]"
    if isinstance(node, Or) and node.items and all(isinstance(c, Is) and c.state == "present" for c in node.items):
        return "any present of: " + ", ".join(c.fact for c in node.items)  # type: ignore[union-attr]
    joiner = " AND " if isinstance(node, And) else " OR "
    if not node.items:
        return "always"
    parts = [describe(c, depth + 1) for c in node.items]
    text = joiner.join(f"({p})" if (" AND " in p or " OR " in p) else p for p in parts)
    return text
