"""The durable_rules Rete network: condition trees compiled once, one case evaluated at a time.

This is the only module that touches durable_rules. It drives the C core (``durable_rules_engine``)
directly, never the ``durable.lang`` globals or an ``engine.Host`` (their timer threads race with
``assert_fact`` and crash; see ``durable-rules-notes.md``). What it returns is the set of rules whose
condition is TRUE under Kleene's three-valued logic, exactly what :func:`cds.conditions.compile_predicate`
says; the evaluator runs both and refuses to answer when they differ.

How a condition becomes Rete
----------------------------
Three-valued truth is compiled into two two-valued formulas per node, T(node) ("certainly true") and
F(node) ("certainly false"): T(Not c) = F(c), T(And) = all T, F(And) = any F, T(Or) = any T,
F(Or) = all F; a rule fires when T(condition) holds. Leaves become tests on the fields of one fact
per case, whose encoding is chosen so that every test is a single comparison of one typed field:

* a tri-state or enum fact ``f`` is the string field ``s<i>`` holding a token: ``u`` for unknown or
  missing, ``v0``, ``v1``... for each literal the conditions mention, ``x`` for any other string.
  Tokens are generated ASCII, so nothing from a case (escapes, Unicode, ``"6"`` vs ``6`` coercion)
  ever reaches the engine's string handling, and ``s<i>`` is present in every fact (no ``$nex``).
* a number fact is up to five integer fields, present only when the value is known:
  ``v`` (the exact value; plain numbers only), ``a``/``b`` (lower bound, for ``>``/``≥`` tests) and
  ``c``/``d`` (upper bound, for ``<``/``≤``). A censored number ``gt 30`` has a = 30⁺ (the next double),
  b = 30 and no upper fields, so T(x > 30) = a > 30, T(x ≥ 30) = b ≥ 30 and F(x ≤ 29) = a > 29, with
  every comparison on a missing field false, as the engine does. Numbers are sent as order-preserving
  64-bit integer keys of the IEEE-754 double (adjacent doubles are adjacent keys): the engine parses
  JSON decimals with ``atof`` (locale-dependent) and rejects ``1e+20`` (no fraction) with error 204,
  while integers are parsed with ``atoll`` exactly. Integers above 2**53 and magnitudes above 1e300
  are refused (FactsError / RulesetError): they cannot be compared exactly through a double.
* ``Count`` nodes: "at least k of the items are T" (or F) is expanded into an OR over k-subsets when
  there are few subsets (``count_expansion_limit``, 16 by default); otherwise the encoder adds a
  helper integer field, the number of the items whose T (or F) formula holds, computed by evaluating
  those *compiled formulas* (the same field tests the engine runs, on the same encoded values) in
  Python. That is the one place where Python pre-aggregates; it never uses :mod:`cds.conditions`'
  evaluator, so the cross-check stays independent. Helpers are keyed by their formulas, so counts
  over the same criteria list share one.

Limits of the C core, decided at compile time
---------------------------------------------
* The alpha network is walked with a fixed stack of 64 nodes (error 303, after which the heap cannot
  be trusted). :class:`Network` mirrors the alpha tree the engine builds (shared prefixes, ``$or``
  forward nodes) and bounds the stack height for any one fact: per node, the most children that can
  match together (the fields of one number fact are evaluated jointly over every encoding it can
  take, one string field at its best value, groups summed as if independent) minus one, plus the
  worst child, along the worst path. On the shapes measured the bound is exact (64 matching siblings
  pass, 65 fail; 9 + 55 nested pass, 9 + 56 fail). A rule whose T formula does not fit one engine
  rule is split into pieces whose OR it is (halving a wide OR, or distributing an AND over one of
  its OR children); pieces are packed first-fit into as many durable rulesets as needed, each at or
  under ``max_width`` (48 by default). A rule that cannot be brought under it (or would need more
  than 256 pieces) is refused with a RulesetError naming it.
* At most 15 ``$and``/``$or`` nodes per engine rule (error 113 at 16): larger pieces are split the
  same way.
* At most 240 fields per fact (error 302 at 252). Each durable ruleset is sent only the facts its
  rules read (on the shipped ruleset that cut the C core's time by ~40%), and packing keeps that
  under the limit.
* Alpha fan-out tables (hash children, ``$nex`` list, beta list) are kept well under their sizes.

Running
-------
One long-lived session (``sid`` ``w``) per durable ruleset; each case is one fact with fixed id ``c``,
asserted as a *fact* (events fire one rule only), every pending action is drained (rule names are
read from the first bytes of each action message, never decoded; ``cap`` makes the engine return one
action per engine rule however many OR paths matched), then the fact is retracted. ``delete_state``
is never called (it crashes on sessions where nothing fired). "Nothing fired" is return code 1.

Failure policy: any durable_rules error (or an interruption between two engine calls) marks the
Network broken; that call and every later one raise :class:`EngineError`. The C heap may be corrupt
after an engine error, so the process should be recycled (a new worker compiles a fresh Network).
Error messages carry durable_rules' error code, never patient data.

Threads: each Network guards its sessions with a lock; concurrent callers get identical results
(serialised: the C core never releases the GIL, so threads give no speed-up; use processes).
Processes: fork after compile works, each child owning a copy of the C state; live Networks' locks are
taken around ``os.fork`` so a child never inherits a case half-asserted by another thread. Do not use
a Network in a child forked *while* it was broken. Networks are never freed (durable_rules has no safe
unregister): compile each ruleset version once per process.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import operator
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import durable_rules_engine as _dre

from cds.conditions import And, Cmp, Count, In, Is, Node, Not, Or
from cds.errors import EngineError, FactsError, Problem, RulesetError
from cds.facts import Censored

__all__ = ["Network", "durable_rules_version", "ENGINE_STACK_LIMIT", "DEFAULT_MAX_WIDTH"]

UNKNOWN = "unknown"

ENGINE_STACK_LIMIT = 64          # events.c MAX_STACK_SIZE: simultaneously pending alpha nodes
DEFAULT_MAX_WIDTH = 48           # our budget per durable ruleset, well under the limit
MAX_COMPOUND_PER_RULE = 15       # rete.h MAX_SEQUENCE_EXPRESSIONS 32, two entries per $and/$or
MAX_FIELDS_PER_FACT = 240        # state.h MAX_OBJECT_PROPERTIES 255 (error 302 at 252), incl. id/sid/k
MAX_HASH_CHILDREN = 400          # rules.h NEXT_BUCKET_LENGTH 512 (linear probing)
MAX_NEX_CHILDREN = 100           # rules.h NEXT_LIST_LENGTH 128 ($or forward nodes hang here)
MAX_BETAS_PER_ALPHA = 200        # rules.h BETA_LIST_LENGTH 256
MAX_ENGINE_RULES_PER_PART = 1000  # rete.c MAX_ACTIONS 4096
MAX_PIECES_PER_RULE = 256
DEFAULT_COUNT_EXPANSION = 16     # expand "k of m" into at most this many k-subsets
ACTION_CAP = 1000                # results delivered per action (one action per engine rule)

_FACT_ID = "c"
_SESSION = "w"
_CONST_FIELD = "k"
_MAX_EXACT_INT = 2 ** 53
_MAX_ABS = 1e300
_SIGN_MASK = 0x7FFF_FFFF_FFFF_FFFF
_pack_d = struct.Struct("<d").pack
_unpack_q = struct.Struct("<q").unpack

_CMP = {"eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt,
        "le": operator.le}
_ENGINE_OP = {"ne": "$neq", "gt": "$gt", "ge": "$gte", "lt": "$lt", "le": "$lte"}


def durable_rules_version() -> str:
    """The installed durable-rules distribution version (``unknown`` if it has no metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("durable-rules")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def number_key(x: float) -> int:
    """Order-preserving 64-bit integer key of a finite double (``-0.0`` and ``0.0`` share key 0)."""
    k = _unpack_q(_pack_d(x))[0]
    return -(k & _SIGN_MASK) if k < 0 else k


def _fnv1a32(name: str) -> int:
    """durable_rules' property identity (state.c fnv1Hash32): properties are compared by this hash only."""
    h = 2166136261
    for byte in name.encode():
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return h


# ------------------------------------------------------------------------------------------ IR
# A two-valued formula over fields: ("atom", op, field, value) | ("all", items) | ("any", items) |
# TRUE | FALSE. ``field`` is an abstract key (named at the end); ``value`` is a token (str) or an int.
TRUE: tuple[Any, ...] = ("true",)
FALSE: tuple[Any, ...] = ("false",)


def _atom(op: str, field: tuple[Any, ...], value: str | int) -> tuple[Any, ...]:
    return ("atom", op, field, value)


def _all(items: Iterable[tuple[Any, ...]]) -> tuple[Any, ...]:
    out: dict[tuple[Any, ...], None] = {}
    for it in items:
        if it is FALSE or it == FALSE:
            return FALSE
        if it == TRUE:
            continue
        for sub in (it[1] if it[0] == "all" else (it,)):
            out.setdefault(sub, None)
    if not out:
        return TRUE
    return next(iter(out)) if len(out) == 1 else ("all", tuple(out))


def _any(items: Iterable[tuple[Any, ...]]) -> tuple[Any, ...]:
    out: dict[tuple[Any, ...], None] = {}
    for it in items:
        if it == TRUE:
            return TRUE
        if it == FALSE:
            continue
        for sub in (it[1] if it[0] == "any" else (it,)):
            out.setdefault(sub, None)
    if not out:
        return FALSE
    return next(iter(out)) if len(out) == 1 else ("any", tuple(out))


def _compounds(f: tuple[Any, ...]) -> int:
    if f[0] in ("all", "any"):
        return 1 + sum(_compounds(c) for c in f[1])
    return 0


def _fields(f: tuple[Any, ...], into: set[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    if f[0] == "atom":
        into.add(f[2])
    elif f[0] in ("all", "any"):
        for c in f[1]:
            _fields(c, into)
    return into


def _test(op: str, x: Any, n: Any) -> bool:
    return bool(_CMP[op](x, n))


# ------------------------------------------------------------------------- alpha-tree mirror
class _Alpha:
    """A node of the engine's alpha tree (rete.c createAlpha/findAlpha/linkAlpha, mirrored)."""

    __slots__ = ("children", "nexts", "betas")

    def __init__(self) -> None:
        self.children: dict[tuple[Any, ...], _Alpha] = {}
        self.nexts: list[_Alpha] = []     # $or forward nodes (OP_NEX on "$forward": always pushed)
        self.betas = 0


def _build(f: tuple[Any, ...], parent: _Alpha, undo: list[Any]) -> _Alpha:
    tag = f[0]
    if tag == "atom":
        key = (f[2], f[1], f[3])  # findAlpha: same property, operator and value -> same node
        node = parent.children.get(key)
        if node is None:
            node = parent.children[key] = _Alpha()
            undo.append(("child", parent, key))
        return node
    if tag == "all":
        cur = parent
        for c in f[1]:
            cur = _build(c, cur, undo)
        return cur
    if tag == "any":
        fwd = _Alpha()
        for c in f[1]:
            end = _build(c, parent, undo)
            end.nexts.append(fwd)
            undo.append(("next", end))
        return fwd
    raise AssertionError(f"constant formula reached the alpha builder: {tag}")


def _add_piece(root: _Alpha, piece: tuple[Any, ...]) -> list[Any]:
    undo: list[Any] = []
    end = _build(piece, root, undo)
    end.betas += 1
    undo.append(("beta", end))
    return undo


def _undo(undo: list[Any]) -> None:
    for entry in reversed(undo):
        if entry[0] == "child":
            del entry[1].children[entry[2]]
        elif entry[0] == "next":
            entry[1].nexts.pop()
        else:
            entry[1].betas -= 1


def _candidates(values: list[Any]) -> list[Any]:
    """Values of one field at which the number of satisfied tests can peak."""
    if all(isinstance(v, str) for v in values):
        return [*set(values), _OTHER]
    out: set[int] = set()
    for v in values:
        out.update((v - 1, v, v + 1))  # integer keys: adjacent doubles are adjacent integers
    return [*out, -(2 ** 62), 2 ** 62]


_OTHER = object()  # a string value equal to none of the tested ones


def _number_candidates(keys: Iterable[int]) -> list[dict[str, Any]]:
    """Every distinct way the encoder can fill one number fact's fields, around the tested keys."""
    out: list[dict[str, Any]] = [{"s": "u"}]
    points: set[int] = {-(2 ** 62), 2 ** 62}
    for k in keys:
        points.update((k - 1, k, k + 1))
    for k in points:
        out += [{"s": "n", "v": k, "a": k, "b": k, "c": k, "d": k},
                {"s": "n", "a": k + 1, "b": k}, {"s": "n", "a": k, "b": k},
                {"s": "n", "c": k - 1, "d": k}, {"s": "n", "c": k, "d": k}]
    return out


def _simultaneous(children: Mapping[tuple[Any, ...], _Alpha]) -> int:
    """The most children one fact can match together.

    Tests on the fields of one number fact (v, a, b, c, d and its state s) are evaluated jointly over
    every encoding the fact can take; any other field on its own at its best value; groups are summed
    (assumed independent, which can only overestimate).
    """
    groups: dict[Any, list[tuple[tuple[Any, ...], str, Any]]] = {}
    for field, op, value in children:
        group = ("fact", field[1]) if field[0] in ("s", *_NUM_SLOTS) and len(field) == 2 \
            and isinstance(field[1], str) else field
        groups.setdefault(group, []).append((field, op, value))
    total = 0
    for tests in groups.values():
        if any(f[0] in _NUM_SLOTS for f, _, _ in tests):
            best = 0
            for env in _number_candidates(v for f, _, v in tests if f[0] in _NUM_SLOTS):
                hits = 0
                for f, op, v in tests:
                    x = env.get(f[0])
                    if x is not None and _test(op, x, v):
                        hits += 1
                best = max(best, hits)
        else:
            best = max(sum(1 for _, op, v in tests if (op == "ne" if cand is _OTHER else _test(op, cand, v)))
                       for cand in _candidates([v for _, _, v in tests]))
        total += best
    return total


def _width(root: _Alpha) -> float:
    """Worst-case height of handleAlpha's stack for one fact (must stay <= 64); inf if a table overflows."""
    memo: dict[int, float] = {}

    def w(node: _Alpha) -> float:
        got = memo.get(id(node))
        if got is not None:
            return got
        if (len(node.children) > MAX_HASH_CHILDREN or len(node.nexts) > MAX_NEX_CHILDREN
                or node.betas > MAX_BETAS_PER_ALPHA):
            memo[id(node)] = math.inf
            return math.inf
        kids = [*node.children.values(), *node.nexts]
        pushed = _simultaneous(node.children) + len(node.nexts) if kids else 0
        result = 1.0 if pushed == 0 else max(1.0, pushed - 1 + max(w(k) for k in kids))
        memo[id(node)] = result
        return result

    return w(root)


# --------------------------------------------------------------------------------- compiling
class _FactSpec:
    __slots__ = ("fact", "kind", "literals")

    def __init__(self, fact: str) -> None:
        self.fact = fact
        self.kind = "any"                 # "str" (Is present/absent, In), "num" (Cmp), "any" (Is (un)known)
        self.literals: dict[str, str] = {UNKNOWN: "u"}


class _Helper:
    """A helper field: how many of ``items`` (the T or the F formulas of a Count's items) hold.

    Keyed by the formulas, so Count nodes over the same items (common in criteria sets) share one.
    """

    __slots__ = ("key", "items")

    def __init__(self, key: tuple[str, int], items: tuple[tuple[Any, ...], ...]) -> None:
        self.key, self.items = key, items


class _Translator:
    """AST -> (T, F) formulas for one rule. Helpers are collected locally and merged on success."""

    def __init__(self, facts: dict[str, _FactSpec], expansion_limit: int, rule_id: str,
                 registry: dict[tuple[Any, ...], int]) -> None:
        self.facts = facts
        self.registry = registry  # helper item formulas -> helper number, shared by all rules
        self.limit = expansion_limit
        self.rule_id = rule_id
        self.helpers: dict[tuple[Any, ...], _Helper] = {}
        # keyed by id(): attrs nodes hash recursively (quadratic on deep trees); all nodes outlive compile
        self.memo: dict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = {}

    def fail(self, message: str) -> RulesetError:
        return RulesetError(f"rule {self.rule_id!r}: {message}")

    def spec(self, fact: Any, kind: str) -> _FactSpec:
        if not isinstance(fact, str) or not fact:
            raise self.fail("a condition names no fact id")
        s = self.facts.get(fact)
        if s is None:
            s = self.facts[fact] = _FactSpec(fact)
        if kind != "any":
            if s.kind == "any":
                s.kind = kind
            elif s.kind != kind:
                raise self.fail(f"fact {fact!r} is compared both as a number and as a state/enum")
        return s

    def token(self, s: _FactSpec, literal: Any) -> str:
        if not isinstance(literal, str):
            raise self.fail(f"fact {s.fact!r}: state/enum literals must be strings")
        tok = s.literals.get(literal)
        if tok is None:
            tok = s.literals[literal] = f"v{len(s.literals) - 1}"
        return tok

    def number(self, n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, float)):
            raise self.fail("comparison value is not a number")
        if isinstance(n, int) and abs(n) > _MAX_EXACT_INT:
            raise self.fail("comparison value is an integer beyond 2**53 (not exact as a double)")
        if not math.isfinite(n) or abs(n) > _MAX_ABS:
            raise self.fail("comparison value is not a finite number of magnitude <= 1e300")
        return number_key(float(n))

    def tf(self, node: Node) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        got = self.memo.get(id(node))
        if got is None:
            got = self.memo[id(node)] = self._tf(node)
        return got

    def _tf(self, node: Node) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        if isinstance(node, Is):
            if node.state in ("unknown", "known"):
                s = self.spec(node.fact, "any")
                is_unknown = _atom("eq", ("s", s.fact), "u")
                is_known = _atom("ne", ("s", s.fact), "u")
                return (is_unknown, is_known) if node.state == "unknown" else (is_known, is_unknown)
            if node.state not in ("present", "absent"):
                raise self.fail(f"fact {node.fact!r}: 'is' takes present, absent, unknown or known")
            s = self.spec(node.fact, "str")
            other = "absent" if node.state == "present" else "present"
            return (_atom("eq", ("s", s.fact), self.token(s, node.state)),
                    _atom("eq", ("s", s.fact), self.token(s, other)))
        if isinstance(node, In):
            s = self.spec(node.fact, "str")
            if isinstance(node.values, (str, bytes)) or not isinstance(node.values, Iterable):
                raise self.fail(f"fact {node.fact!r}: 'in' needs a list of values")
            toks = [self.token(s, v) for v in node.values]
            field = ("s", s.fact)
            true = _any(_atom("eq", field, t) for t in toks)
            false = _all([_atom("ne", field, "u"), *(_atom("ne", field, t) for t in toks)])
            return true, false
        if isinstance(node, Cmp):
            s = self.spec(node.fact, "num")
            n = self.number(node.value)
            f = s.fact

            def t(field: str, op: str) -> tuple[Any, ...]:
                return _atom(op, (field, f), n)

            op = node.op
            if op == "gt":
                return t("a", "gt"), t("d", "le")
            if op == "ge":
                return t("b", "ge"), t("c", "lt")
            if op == "lt":
                return t("c", "lt"), t("b", "ge")
            if op == "le":
                return t("d", "le"), t("a", "gt")
            if op == "eq":
                return t("v", "eq"), _any([t("a", "gt"), t("c", "lt")])
            if op == "ne":
                return _any([t("a", "gt"), t("c", "lt")]), t("v", "eq")
            raise self.fail(f"unknown comparison {op!r}")
        if isinstance(node, Not):
            true, false = self.tf(node.item)
            return false, true
        if isinstance(node, And):
            pairs = [self.tf(c) for c in node.items]
            return _all(p[0] for p in pairs), _any(p[1] for p in pairs)
        if isinstance(node, Or):
            pairs = [self.tf(c) for c in node.items]
            return _any(p[0] for p in pairs), _all(p[1] for p in pairs)
        if isinstance(node, Count):
            return self._count(node)
        raise self.fail(f"not a condition node: {type(node).__name__}")

    def _count(self, node: Count) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        op, n = node.op, node.n
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise self.fail("count needs a whole number >= 0")
        pairs = [self.tf(c) for c in node.items]
        m = len(pairs)

        def at_least(which: str, k: int) -> tuple[Any, ...]:
            if k <= 0:
                return TRUE
            if k > m:
                return FALSE
            xs = tuple(p[0] if which == "t" else p[1] for p in pairs)
            if math.comb(m, k) <= self.limit:
                return _any(_all(sub) for sub in itertools.combinations(xs, k))
            key = ("h", self.registry.setdefault(xs, len(self.registry)))
            if key not in self.helpers:
                self.helpers[key] = _Helper(key, xs)
            return _atom("ge", key, k)

        if op == "gt":
            return at_least("t", n + 1), at_least("f", m - n)
        if op == "ge":
            return at_least("t", n), at_least("f", m - n + 1)
        if op == "lt":
            return at_least("f", m - n + 1), at_least("t", n)
        if op == "le":
            return at_least("f", m - n), at_least("t", n + 1)
        if op == "eq":
            return (_all([at_least("t", n), at_least("f", m - n)]),
                    _any([at_least("t", n + 1), at_least("f", m - n + 1)]))
        raise self.fail(f"unknown count comparison {op!r}")


def _split(f: tuple[Any, ...], fits: Callable[[tuple[Any, ...]], bool], limit: int) -> list[tuple[Any, ...]]:
    """Pieces whose OR is ``f``, each small enough for one engine rule (``fits``)."""
    out: list[tuple[Any, ...]] = []
    work = [f]
    while work:
        g = work.pop()
        if g == FALSE:
            continue
        if g == TRUE:
            g = _atom("eq", (_CONST_FIELD,), _CONST_FIELD)
        if fits(g):
            out.append(g)
        elif g[0] == "any":
            items = g[1]
            half = len(items) // 2
            work.append(_any(items[half:]))
            work.append(_any(items[:half]))
        elif g[0] == "all":
            ors = [c for c in g[1] if c[0] == "any"]
            if not ors:
                return []  # an AND of single tests that does not fit: cannot be split further
            pick = max(ors, key=lambda c: (_compounds(c), len(c[1])))
            rest = [c for c in g[1] if c is not pick]
            work.extend(reversed([_all([*rest, branch]) for branch in pick[1]]))
        else:
            return []
        if len(out) + len(work) > limit:
            return []
    return out


class _Part:
    """One durable ruleset: its alpha-tree mirror while compiling, its handle afterwards."""

    def __init__(self) -> None:
        self.root = _Alpha()
        self.pieces: list[tuple[str, tuple[Any, ...]]] = []   # (engine rule name, formula)
        self.fields: set[tuple[Any, ...]] = set()
        self.width = 0.0
        self.handle = 0
        self.slots: tuple[int, ...] = ()   # which encoder fragments this durable ruleset is sent


# ----------------------------------------------------------------------------------- encoding
def _number_fields(x: Any) -> tuple[int | None, int | None, int | None, int | None, int | None] | None:
    """(v, a, b, c, d) keys for a plain or censored number; None for unknown; ValueError if invalid."""
    if isinstance(x, Censored):
        op, bound = x.op, x.bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise ValueError
        if isinstance(bound, int) and abs(bound) > _MAX_EXACT_INT:
            raise ValueError
        if not math.isfinite(bound) or abs(bound) > _MAX_ABS:
            raise ValueError
        k = number_key(float(bound))
        if op == "gt":
            return None, k + 1, k, None, None
        if op == "ge":
            return None, k, k, None, None
        if op == "lt":
            return None, None, None, k - 1, k
        if op == "le":
            return None, None, None, k, k
        raise ValueError
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        if x == UNKNOWN:
            return None
        raise ValueError
    if isinstance(x, int):
        if abs(x) > _MAX_EXACT_INT:
            raise ValueError
    elif not math.isfinite(x) or abs(x) > _MAX_ABS:
        raise ValueError
    k = number_key(float(x))
    return k, k, k, k, k


_NUM_SLOTS = ("v", "a", "b", "c", "d")
_STR_EXPECTED = "a state or enum string (or \"unknown\")"
_NUM_EXPECTED = "a finite number (|x| <= 1e300, integers within 2**53), a censored number or \"unknown\""


class _Table(dict):  # type: ignore[type-arg]
    """literal -> encoded; any other string -> ``other``; anything else -> FactsError."""

    __slots__ = ("fact", "other")

    def __init__(self, fact: str, items: Mapping[str, str], other: str) -> None:
        super().__init__(items)
        self.fact, self.other = fact, other

    def __missing__(self, x: Any) -> str:
        if isinstance(x, str):
            return self.other
        raise _bad_value(self.fact, _STR_EXPECTED)


def _encode_number(fact: str, x: Any, slots: tuple[tuple[int, str | None, bool], ...],
                   state: tuple[str | None, bool] | None) -> tuple[str, tuple[tuple[tuple[Any, ...], Any], ...]]:
    """(JSON fragment, Python env items) for one number fact's value."""
    try:
        keys = _number_fields(x)
    except ValueError:
        raise _bad_value(fact, _NUM_EXPECTED) from None
    parts: list[str] = []
    env: list[tuple[tuple[Any, ...], Any]] = []
    if keys is not None:
        for i, nm, to_env in slots:
            k = keys[i]
            if k is not None:
                if nm:
                    parts.append(f'"{nm}":{k}')
                if to_env:
                    env.append(((_NUM_SLOTS[i], fact), k))
    if state is not None:
        nm, to_env = state
        token = "u" if keys is None else "n"
        if nm:
            parts.append(f'"{nm}":"{token}"')
        if to_env:
            env.append((("s", fact), token))
    return ",".join(parts), tuple(env)


def _predicate(f: tuple[Any, ...]) -> Callable[[Mapping[tuple[Any, ...], Any]], bool]:
    """A formula as a closure over the helper env, with the engine's semantics (missing field: false)."""
    tag = f[0]
    if tag == "atom":
        _, op, field, value = f
        if op == "eq":
            return lambda env: env.get(field) == value
        test = _CMP[op]
        return lambda env: (x := env.get(field)) is not None and test(x, value)
    if tag in ("all", "any"):
        parts = tuple(_predicate(c) for c in f[1])
        if tag == "all":
            return lambda env: all(p(env) for p in parts)
        return lambda env: any(p(env) for p in parts)
    const = tag == "true"
    return lambda env: const


def _count_true(items: Sequence[tuple[Any, ...]]) -> Callable[[Mapping[tuple[Any, ...], Any]], int]:
    if all(it[0] == "atom" and it[1] == "eq" for it in items):  # the usual count_present shape
        pairs = tuple((it[2], it[3]) for it in items)
        return lambda env: sum([env.get(f) == v for f, v in pairs])
    preds = tuple(_predicate(it) for it in items)
    return lambda env: sum([p(env) for p in preds])



# fork safety: every live Network's lock is taken around os.fork (see the module docstring)
_LIVE: weakref.WeakSet[Network] = weakref.WeakSet()


def _before_fork() -> None:
    for net in list(_LIVE):
        net._lock.acquire()


def _after_fork() -> None:
    for net in list(_LIVE):
        if net._lock.locked():
            net._lock.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


class Network:
    """A ruleset compiled into one or more durable_rules rulesets. Build it with :meth:`compile`."""

    name: str
    rule_ids: tuple[str, ...]

    def __init__(self) -> None:  # use Network.compile
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._parts: list[_Part] = []
        self._rule_of_action: dict[str, str] = {}
        self.never_true: tuple[str, ...] = ()
        self.definitions: tuple[str, ...] = ()
        self.name = ""
        self.rule_ids = ()
        self._retract = f'{{"id":"{_FACT_ID}","sid":"{_SESSION}"}}'

    # ------------------------------------------------------------------------------ compile
    @classmethod
    def compile(cls, name: str, rules: Sequence[tuple[str, Node]], *, max_width: int = DEFAULT_MAX_WIDTH,
                count_expansion_limit: int = DEFAULT_COUNT_EXPANSION) -> Network:
        """Compile ``(rule_id, condition)`` pairs once; RulesetError names a rule the engine cannot hold.

        ``max_width`` bounds the simultaneously pending alpha nodes of each durable ruleset (the engine
        fails at 65); ``count_expansion_limit`` is the most k-subsets a Count threshold is expanded into
        before a helper field is used instead.
        """
        if not isinstance(name, str) or not name:
            raise RulesetError("a network needs a non-empty name")
        if not 1 <= max_width <= ENGINE_STACK_LIMIT:
            raise RulesetError(f"max_width must be between 1 and {ENGINE_STACK_LIMIT}")
        if ctypes.sizeof(ctypes.c_long) < 8:  # pragma: no cover - rete.c stores rule integers in a C long
            raise EngineError("cds.engine needs a 64-bit C long (durable_rules stores rule integers in one)")
        rules = list(rules)
        ids: set[str] = set()
        for entry in rules:
            rid = entry[0]
            if not isinstance(rid, str) or not rid:
                raise RulesetError(f"{name}: every rule needs a non-empty string id")
            if rid in ids:
                raise RulesetError(f"{name}: rule id {rid!r} appears twice")
            ids.add(rid)

        # 1. T(condition) per rule, split into pieces that each fit one engine rule
        facts: dict[str, _FactSpec] = {}
        helpers: dict[tuple[Any, ...], _Helper] = {}
        registry: dict[tuple[Any, ...], int] = {}
        pieces: list[tuple[str, tuple[Any, ...]]] = []   # (rule id, formula)
        never_true: list[str] = []
        for rid, node in rules:
            rule_pieces: list[tuple[Any, ...]] = []
            true = FALSE
            tr = None
            for limit in dict.fromkeys((count_expansion_limit, 0)):  # then helpers for every Count
                tr = _Translator(facts, limit, rid, registry)
                true, _ = tr.tf(node)
                if true == FALSE:
                    break
                rule_pieces = _split(true, lambda g: _piece_fits(g, max_width), MAX_PIECES_PER_RULE)
                if rule_pieces:
                    break
            if true == FALSE:  # e.g. "at least 4 of 3 items": never TRUE for the reference either
                never_true.append(rid)
                continue
            if not rule_pieces:
                raise RulesetError(f"rule {rid!r} cannot be compiled for durable_rules: even split into "
                                   f"{MAX_PIECES_PER_RULE} engine rules, a piece would need more than {max_width} "
                                   f"simultaneously matching conditions (the engine fails above "
                                   f"{ENGINE_STACK_LIMIT}) or more than {MAX_COMPOUND_PER_RULE} all/any nodes")
            assert tr is not None
            for key, h in tr.helpers.items():
                helpers.setdefault(key, h)
            pieces.extend((rid, p) for p in rule_pieces)

        # 2. fields: those the engine reads, and those only helper counts read (kept in Python)
        engine_fields: set[tuple[Any, ...]] = set()
        for _, p in pieces:
            _fields(p, engine_fields)
        needed = [k for k in helpers if k in engine_fields]
        env_fields: set[tuple[Any, ...]] = set()
        queue = list(needed)
        while queue:
            for item in helpers[queue.pop()].items:
                for f in _fields(item, set()):
                    if f not in env_fields:
                        env_fields.add(f)
                        if f in helpers and f not in needed:
                            needed.append(f)
                            queue.append(f)
        net_helpers = [h for k, h in helpers.items() if k in set(needed)]  # registration order: inner first
        names = _field_names(engine_fields, facts, helpers)

        # 3. pack pieces first-fit into durable rulesets under the width, field and rule budgets. Each
        #    durable ruleset is sent only the facts it reads (all encoded fields of each such fact).
        fact_fields: dict[str, set[tuple[Any, ...]]] = {}
        for f in engine_fields:
            if len(f) == 2 and isinstance(f[1], str):
                fact_fields.setdefault(f[1], set()).add(f)

        def sent(fields: set[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
            out: set[tuple[Any, ...]] = set()
            for f in fields:
                out |= fact_fields.get(f[1], {f}) if len(f) == 2 and isinstance(f[1], str) else {f}
            return out

        parts: list[_Part] = []
        net = cls()
        for rid, p in pieces:
            pf = sent(_fields(p, set()))
            if len(pf) + 3 > MAX_FIELDS_PER_FACT:
                raise RulesetError(f"rule {rid!r} reads more than {MAX_FIELDS_PER_FACT - 3} engine fields")
            target = None
            for part in parts:
                if len(part.pieces) >= MAX_ENGINE_RULES_PER_PART or len(part.fields | pf) + 3 > MAX_FIELDS_PER_FACT:
                    continue
                undo = _add_piece(part.root, p)
                width = _width(part.root)
                if width <= max_width:
                    part.width = width
                    target = part
                    break
                _undo(undo)
            if target is None:
                target = _Part()
                _add_piece(target.root, p)
                target.width = _width(target.root)
                parts.append(target)
            action = f"r{len(net._rule_of_action)}"
            target.pieces.append((action, p))
            target.fields |= pf
            net._rule_of_action[action] = rid
        for part in parts:
            part.root = _Alpha()  # the mirror is only needed while packing

        net.name = name
        net.rule_ids = tuple(rid for rid, _ in rules)
        net.never_true = tuple(never_true)
        net._parts = parts
        net._setup_encoder(facts, names, engine_fields, env_fields, net_helpers)
        net.definitions = tuple(_ruleset_json(part, names) for part in parts)
        for i, (part, text) in enumerate(zip(parts, net.definitions, strict=True)):
            label = name if len(parts) == 1 else f"{name}#{i + 1}of{len(parts)}"
            try:
                part.handle = _dre.create_ruleset(label, text)
            except Exception as exc:  # the C core refused a definition we believed valid
                net._broken = "durable_rules refused a ruleset definition"
                raise EngineError(f"{name}: durable_rules could not create ruleset part {i + 1} "
                                  f"({_engine_code(exc)}); recycle the process") from exc
        _LIVE.add(net)
        return net

    def __reduce__(self) -> Any:
        raise TypeError("a cds.engine.Network holds C engine state and cannot be pickled: compile it in each "
                        "process (or fork after compiling)")

    # ----------------------------------------------------------------------------- describe
    @property
    def widths(self) -> tuple[int, ...]:
        """Worst-case simultaneously pending alpha nodes per durable ruleset (each <= max_width < 64)."""
        return tuple(int(p.width) for p in self._parts)

    @property
    def engine_rule_count(self) -> int:
        return sum(len(p.pieces) for p in self._parts)

    @property
    def helper_fields(self) -> int:
        """Count thresholds evaluated into helper fields by the encoder (the one Python pre-aggregation)."""
        return len(self._helper_specs)

    @property
    def broken(self) -> bool:
        return self._broken is not None

    def __repr__(self) -> str:
        return (f"<Network {self.name!r}: {len(self.rule_ids)} rules, {self.engine_rule_count} engine rules in "
                f"{len(self._parts)} durable ruleset(s), widths {list(self.widths)}"
                f"{', BROKEN' if self._broken else ''}>")

    # ------------------------------------------------------------------------------- encode
    def _setup_encoder(self, facts: Mapping[str, _FactSpec], names: Mapping[tuple[Any, ...], str],
                       engine_fields: set[tuple[Any, ...]], env_fields: set[tuple[Any, ...]],
                       helpers: Sequence[_Helper]) -> None:
        """Precompute the case JSON fragments, one slot per fact (and per helper field) in a fixed order.

        Slots: the string facts, then the number facts, the "(un)known"-only facts and the helper
        fields. Each durable ruleset is sent the slots that hold a field it reads.
        """
        str_facts: list[Any] = []
        str_env: list[Any] = []
        num_facts: list[Any] = []
        any_facts: list[Any] = []
        slot_fields: list[set[tuple[Any, ...]]] = []
        for fact, s in facts.items():
            key = ("s", fact)
            if s.kind == "str" and key in engine_fields:  # literal -> '"s3":"v1"'; other strings -> '"s3":"x"'
                sname = names[key]
                str_facts.append((fact, _Table(fact, {lit: f'"{sname}":"{tok}"' for lit, tok in s.literals.items()},
                                               f'"{sname}":"x"')))
                slot_fields.append({key})
        for fact, s in facts.items():
            key = ("s", fact)
            if s.kind == "str" and key in env_fields:
                str_env.append((fact, key, _Table(fact, dict(s.literals), "x")))
            if s.kind == "num":
                keys = [(slot, fact) for slot in ("s", *_NUM_SLOTS)]
                if not any(k in engine_fields or k in env_fields for k in keys):
                    continue
                slots = tuple((i, names.get((slot, fact)), (slot, fact) in env_fields)
                              for i, slot in enumerate(_NUM_SLOTS)
                              if (slot, fact) in engine_fields or (slot, fact) in env_fields)
                state = (names.get(key), key in env_fields) if key in engine_fields or key in env_fields else None
                num_facts.append((fact, {}, slots, state))
                slot_fields.append({k for k in keys if k in engine_fields})
        for fact, s in facts.items():
            key = ("s", fact)
            if s.kind == "any" and (key in engine_fields or key in env_fields):
                aname = names.get(key)
                any_facts.append((fact, key, f'"{aname}":"u"' if aname else "", f'"{aname}":"n"' if aname else "",
                                  key in env_fields))
                slot_fields.append({key} & engine_fields)
        self._helper_specs = tuple((h.key, _count_true(h.items), names.get(h.key)) for h in helpers)
        slot_fields += [{h.key} for h in helpers if h.key in names]
        self._str_facts = tuple(str_facts)
        self._str_env = tuple(str_env)
        self._num_facts = tuple(num_facts)
        self._any_facts = tuple(any_facts)
        for part in self._parts:
            part.slots = tuple(i for i, fs in enumerate(slot_fields) if fs & part.fields)
        self._all_slots = len(self._parts) == 1 and len(self._parts[0].slots) == len(slot_fields)
        self._head = f'{{"id":"{_FACT_ID}","sid":"{_SESSION}","{_CONST_FIELD}":"{_CONST_FIELD}"'

    def _encode(self, values: Mapping[str, Any]) -> list[str]:
        """One JSON fact per durable ruleset. Raises FactsError (naming the fact id) on a bad value."""
        get = values.get
        try:
            frags = [table[get(fact, UNKNOWN)] for fact, table in self._str_facts]
        except TypeError:  # an unhashable value: find it
            for fact, _table in self._str_facts:
                x = get(fact, UNKNOWN)
                if not isinstance(x, str):
                    raise _bad_value(fact, _STR_EXPECTED) from None
            raise
        add = frags.append
        env: dict[tuple[Any, ...], Any] | None = {} if self._helper_specs else None
        for fact, cache, slots, state in self._num_facts:
            x = get(fact, UNKNOWN)
            try:
                hit = cache.get(x) if x.__class__ is not bool else None
            except TypeError:
                hit = None
            if hit is None:
                hit = _encode_number(fact, x, slots, state)
                if len(cache) < 4096:
                    cache[x] = hit
            add(hit[0])
            if env is not None:
                env.update(hit[1])
        for fact, key, unknown, known, to_env in self._any_facts:
            x = get(fact, UNKNOWN)
            is_unknown = isinstance(x, str) and x == UNKNOWN
            add(unknown if is_unknown else known)
            if to_env and env is not None:
                env[key] = "u" if is_unknown else "n"
        if env is not None:
            for fact, key, table in self._str_env:
                env[key] = table[get(fact, UNKNOWN)]
            for key, count, nm in self._helper_specs:  # inner Count nodes come first
                total = count(env)
                env[key] = total
                if nm:
                    add(f'"{nm}":{total}')
        head = self._head
        if self._all_slots:
            body = [f for f in frags if f]
            return [head + ("," + ",".join(body) if body else "") + "}"]
        out = []
        for part in self._parts:
            body = [f for f in map(frags.__getitem__, part.slots) if f]
            out.append(head + ("," + ",".join(body) if body else "") + "}")
        return out

    # -------------------------------------------------------------------------------- fired
    def fired(self, values: Mapping[str, Any]) -> frozenset[str]:
        """The ids of the rules whose condition is TRUE for ``values`` (flat ``{fact_id: value}``)."""
        if self._broken:
            raise self._broken_error()
        payloads = self._encode(values)
        names: set[str] = set()
        with self._lock:
            if self._broken:
                raise self._broken_error()
            for part, payload in zip(self._parts, payloads, strict=True):
                self._run(part.handle, payload, names)
        rule_of = self._rule_of_action
        try:
            return frozenset([rule_of[n] for n in names])
        except KeyError:
            self._broken = "an action named no rule of this network"
            raise self._broken_error() from None

    def _broken_error(self) -> EngineError:
        return EngineError(f"{self.name}: this durable_rules network is unusable after an engine failure "
                           f"({self._broken}); recycle the process")

    def _run(self, handle: int, payload: str, names: set[str]) -> None:
        """Assert one case into one session, drain its actions, retract it. Caller holds the lock."""
        stage = "assert"
        done = False
        try:
            code, state = _dre.assert_fact(handle, payload)
            if code == 0:
                stage = "start action"
                started = _dre.start_action_for_state(handle, state)
                message = started[1] if started is not None else None
                stage = "complete action"
                while message is not None:
                    names.add(message[2:message.index('"', 2)])  # '{"r12":...': the rest is never decoded
                    message = _dre.complete_and_start_action(handle, state)
            elif code != 1:  # 1: nothing fired; 2 "observed": the last case was not retracted; 3: deferred
                raise _UnexpectedResult(code)
            stage = "retract"
            code, _ = _dre.retract_fact(handle, self._retract)
            if code != 0:
                raise _UnexpectedResult(code)
            done = True
        except Exception as exc:
            self._broken = f"{stage}: {_engine_code(exc)}"
            raise EngineError(f"{self.name}: durable_rules failed during {stage} ({_engine_code(exc)}); "
                              "this network is now unusable, recycle the process") from exc
        finally:
            if not done and self._broken is None:  # interrupted between two engine calls
                self._broken = f"interrupted during {stage}"


class _UnexpectedResult(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"unexpected result code {code}")
        self.code = code


def _engine_code(exc: BaseException) -> str:
    text = str(exc)
    if "error code:" in text:
        return "error code " + text.rsplit("error code:", 1)[1].strip()[:12]
    if isinstance(exc, _UnexpectedResult):
        return f"result code {exc.code}"
    return type(exc).__name__


def _bad_value(fact: str, expected: str) -> FactsError:
    return FactsError([Problem(f"$.{fact}", f"expected {expected} for the rules engine")])


def _piece_fits(g: tuple[Any, ...], max_width: int) -> bool:
    if _compounds(g) > MAX_COMPOUND_PER_RULE:
        return False
    if len(_fields(g, set())) + 3 > MAX_FIELDS_PER_FACT:
        return False
    root = _Alpha()
    _add_piece(root, g)
    return _width(root) <= max_width


def _field_names(fields: Iterable[tuple[Any, ...]], facts: Mapping[str, _FactSpec],
                 helpers: Mapping[tuple[Any, ...], _Helper]) -> dict[tuple[Any, ...], str]:
    """Short generated names (s3, a3, t0...), distinct under the engine's 32-bit property hash."""
    fact_index = {f: i for i, f in enumerate(facts)}
    helper_index = {k: j for j, k in enumerate(helpers)}

    def base(key: tuple[Any, ...]) -> tuple[tuple[int, int, str], str]:
        if key[0] == _CONST_FIELD:
            return (0, 0, ""), _CONST_FIELD
        if key in helper_index:
            return (2, helper_index[key], key[0]), f"{key[0]}{helper_index[key]}"
        return (1, fact_index[key[1]], key[0]), f"{key[0]}{fact_index[key[1]]}"

    taken = {_fnv1a32(n) for n in ("id", "sid", "$s", "$forward", "$m", "m")}
    names: dict[tuple[Any, ...], str] = {}
    for key in sorted(fields, key=lambda k: base(k)[0]):
        stem = base(key)[1]
        nm, n = stem, 0
        while _fnv1a32(nm) in taken:
            n += 1
            nm = f"{stem}_{n}"
        taken.add(_fnv1a32(nm))
        names[key] = nm
    return names


def _value_json(v: Any) -> str:
    return f'"{v}"' if isinstance(v, str) else str(int(v))


def _expr_json(f: tuple[Any, ...], names: Mapping[tuple[Any, ...], str]) -> str:
    tag = f[0]
    if tag == "atom":
        _, op, field, value = f
        if op == "eq":
            return f'{{"{names[field]}":{_value_json(value)}}}'
        return f'{{"{_ENGINE_OP[op]}":{{"{names[field]}":{_value_json(value)}}}}}'
    joiner = "$and" if tag == "all" else "$or"
    return f'{{"{joiner}":[' + ",".join(_expr_json(c, names) for c in f[1]) + "]}"


def _ruleset_json(part: _Part, names: Mapping[tuple[Any, ...], str]) -> str:
    rules = [f'"{rname}":{{"all":[{{"m":{_expr_json(p, names)}}}],"cap":{ACTION_CAP}}}'
             for rname, p in part.pieces]
    return "{" + ",".join(rules) + "}"
