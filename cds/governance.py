"""Ruleset versions and governance: ``cds rulesets list | release | show | lint | diff``.

A ruleset version goes through three states: a **draft** may be edited freely; a **release**
records the sha256 of the file's bytes in ``<root>/lock.json`` (``{"released": {"id@version":
sha256}}``, key-sorted, two-space indented, newline at the end), after which the file never
changes (:class:`cds.rulesets.Registry` refuses a released file whose bytes differ); a later
version replaces it from its ``effective_from`` date, and the old version stays loadable for
audit. Release refuses a draft, a version already in the lock, and a file that does not compile
(it compiles the file itself, so it does not depend on what the registry accepts). A version that
is neither draft nor released still loads (``CompiledRuleset.released`` is False and provenance
says so) but ``lint`` reports it as an error and ``list`` flags it.

The review commands (``show``, ``lint``, ``diff``) also read versions that are not released yet
(that is when they are reviewed), but they still refuse a released file whose bytes no longer
match the lock. ``ID@VERSION`` may also be given as a path to a ``.yaml`` file.

Python API: :func:`release`, :func:`lint` (-> list of :class:`Finding`), :func:`diff_rulesets`,
:func:`impact`, :func:`render_markdown`, plus :func:`load_for_review` and :func:`read_cases`.

Lint
====

Every finding names a rule id (``-`` for the ruleset as a whole), a severity (``error`` or
``warning``), a check, what is wrong and why it matters. ``cds rulesets lint`` exits 1 when there
is an error and 0 with warnings only. Checks:

* ``load`` / ``schema`` / ``compile`` / ``source``: every problem the loader and the compiler
  report (unknown fact ids, parameters, lists or named conditions, unresolved source keys,
  duplicate rule ids, ...) becomes an error finding on the rule it belongs to.
* ``source`` (warning): a declared source that nothing cites.
* ``parameter``: a declared parameter that no rule, named condition in use or derived fact
  (:data:`cds.scores.PARAMETERS`) reads (warning); a comparison with a literal number instead of a
  parameter (warning: thresholds should carry a unit and a citation). ``list`` / ``condition``:
  a named list or condition nothing uses (warning).
* ``red-flag``: a category without urgency or referral target, a category that no rule raises
  (error: a safety net has gone), a red-flag effect whose ``care_step`` is below ``medical``
  (error: it contradicts the escalation floor).
* ``release`` (error): the version is not a draft but is not in ``lock.json`` (checked when
  the version is read from a ruleset folder or given as a compiled ruleset).
* ``metadata``: ``effective_to`` not after ``effective_from`` (error); retired without
  ``effective_to``, or released (not draft) with no clinical reviewer named (warning).
* ``unsatisfiable`` (error): a rule whose condition can never be true.
* ``conflict``, defined as follows (each needs a case in which the named rules fire together):

  - *surgical gate* (error): a ``surgical-referral`` care step that can fire while
    ``conservative_care_failed`` is not present (absent or unrecorded). The pathway holds such a
    proposal back at ``medical``, but the rule contradicts the last-resort principle.
  - *self-care under a red flag* (error): a rule proposing ``self-care`` whose condition implies
    that some red-flag rule fires (it can only ever fire together with a red flag, so it can never
    deliver its proposal), or a red-flag effect with ``care_step`` self-care / physical-therapy.
  - *care-step override* (warning): two care-step rules proposing different steps can both fire;
    the highest proposal wins and the lower one's message and content are not shown.
  - *hidden by rule order* (warning): two care-step rules proposing the same step with different
    referral targets can both fire; the recommendation carries the earlier rule's target only (the
    pathway merges the content of every rule proposing the winning step).

  A self-care proposal that can fire beside a red flag is not reported: the pathway supersedes
  proposals below the escalated step and leaves them out of the recommendation.

* ``shadowed`` (warning): a rule whose condition implies another rule's condition while both have
  the same decision (the same effect once wording is set aside: message, content, reason). Its
  decision is redundant; only its wording (and citation) differ.
* ``undecided`` (warning): the analysis ran out of budget and random sampling found no case.

How the analysis works. A question ("can A be true while B is not true?") is answered by a
search over value assignments to the facts the conditions read, evaluated with the same
three-valued predicates the evaluator uses. Tri-state facts range over present/absent, enums over
their values, numbers over one representative of every interval the thresholds in the question
cut the plausible range into (ages, durations and measurements are >= 0, 0-10 scales stay in
0-10), and a fact may also be left unrecorded where that can matter (``is: unknown`` tests, ``in``
lists naming unknown, the "not true" side of a question). Kleene logic is monotone, so a partial
assignment that already makes a requirement false (or a "not true" side true) is pruned: the
search is exhaustive over that abstraction and deterministic. Facts are treated as independent
except for the couplings the derived facts impose (``_COUPLINGS``: e.g. ``duration_category``
follows ``pain_duration_weeks``, ``conservative_care_failed`` needs both trials failed). So
"unsatisfiable" and "implies" are proven over that model; "can fire together" comes with a
generated example case in the finding. A question that exceeds the search budget falls back to
sampling random assignments with a fixed seed.

Diff and impact
===============

:func:`diff_rulesets` compares two compiled versions: rules, parameters, sources, red-flag
categories, lists, named conditions and metadata added / removed / changed (a rule whose text is
unchanged but whose compiled condition changed through a named condition, list or parameter is
reported as ``when (via named condition, list or parameter)``). :func:`impact` evaluates every case
under both versions with the reference evaluator (``engine="reference"``: the plain-Python
predicates, the same semantics as the durable_rules network and much faster to start) and counts
the cases whose care step, urgency, status or red flags changed, with a from -> to table per
dimension and up to five example case ids per transition. A case that cannot be read or is
invalid is counted as an error and listed; it is never dropped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from cds import conditions as C
from cds.errors import CdsError, FactsError, Problem, RulesetError
from cds.rulesets import (
    _SEMVER,
    LOCK_FILE,
    CompiledRuleset,
    Registry,
    compile_ruleset,
    fact_kinds,
    load_document,
    load_yaml,
)
from cds.scores import PARAMETERS

EXIT_FINDINGS = 1
EXIT_BAD_INPUT = 2
EFFECT_ORDER = ("red-flag", "weak-flag", "screen", "care-step", "caution", "advice")
EFFECT_HEADINGS = {
    "red-flag": "Red-flag rules (escalation)",
    "weak-flag": "Weak flags (recorded, never escalate)",
    "screen": "Screens (information required before a non-escalation step)",
    "care-step": "Care steps (the highest proposal wins)",
    "caution": "Cautions for the clinician",
    "advice": "Advice for the patient",
}
STEPS = ("self-care", "physical-therapy", "medical", "surgical-referral")
WORDING_FIELDS = ("message", "content", "reason")


# =========================================================================== loading and locks
def _root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    from cds._resources import data_root

    return data_root("rulesets")


def _split_ref(ref: str) -> tuple[str, str]:
    rid, _, version = ref.partition("@")
    if not version:
        raise RulesetError(f"expected ID@VERSION (for example back-hip-pain@1.0.0), got {ref!r}")
    return rid, version


def _ruleset_path(root: Path, rid: str, version: str) -> Path:
    path = root / rid / f"{version}.yaml"
    if not re.fullmatch(r"[a-z][a-z0-9-]*", rid) or not _SEMVER.match(version) or not path.is_file():
        known = ", ".join(f"{i.id}@{i.version}" for i in Registry(root).files()) if root.is_dir() else ""
        raise RulesetError(f"no ruleset {rid}@{version} under {root} (known: {known or 'none'})")
    return path


def read_lock(root: str | Path | None = None) -> dict[str, str]:
    """The released versions recorded in ``<root>/lock.json`` (``{}`` when there is no lock)."""
    return Registry(_root(root)).lock()


def _is_path_ref(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or os.sep in ref


def load_for_review(ref: str | Path | CompiledRuleset, root: str | Path | None = None) -> CompiledRuleset:
    """Compile ``ID@VERSION`` (or a path to a ruleset file) for review, released or not.

    Unlike :meth:`Registry.load` this accepts a version that is not released yet, but a released
    file whose bytes do not match the lock still raises :class:`RulesetError` naming the file.
    """
    if isinstance(ref, CompiledRuleset):
        return ref
    root_path = _root(root)
    if isinstance(ref, Path) or _is_path_ref(str(ref)):
        path = Path(ref)
        if not path.is_file():
            raise RulesetError("no such ruleset file", path=str(path))
        # a file at <root>/<id>/<version>.yaml is checked against <root>/lock.json
        locked = Registry(path.resolve().parent.parent).lock().get(f"{path.parent.name}@{path.stem}")
    else:
        rid, version = _split_ref(str(ref))
        path = _ruleset_path(root_path, rid, version)
        locked = Registry(root_path).lock().get(f"{rid}@{version}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if locked is not None and locked != digest:
        raise RulesetError(f"content does not match the sha256 locked at release ({locked[:12]}...); a released "
                           "version never changes: put the change in a new version", path=str(path))
    data = load_document(raw, str(path), path.parent.name, path.stem)
    compiled = compile_ruleset(data, sha256=digest, path=str(path))
    compiled.released = locked is not None
    return compiled


def _write_lock(root: Path, released: Mapping[str, str], extra: Mapping[str, Any]) -> None:
    doc = dict(extra)
    doc["released"] = dict(sorted(released.items()))
    text = json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".lock-", suffix=".json", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, root / LOCK_FILE)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def release(root: str | Path | None, ruleset_id: str, version: str) -> str:
    """Record the sha256 of ``<root>/<id>/<version>.yaml`` in the lock; return the hash.

    Refuses (RulesetError) a version already released, a draft, a file whose id/version do not
    match its name, effective dates in the wrong order, and a ruleset that does not compile.
    """
    root_path = _root(root)
    path = _ruleset_path(root_path, ruleset_id, version)
    key = f"{ruleset_id}@{version}"
    lock_path = root_path / LOCK_FILE
    extra: dict[str, Any] = {}
    if lock_path.exists():
        try:
            extra = json.loads(lock_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RulesetError(f"unreadable lock file ({exc.__class__.__name__})", path=str(lock_path)) from None
        if not isinstance(extra, dict) or not isinstance(extra.get("released", {}), dict):
            raise RulesetError('expected {"released": {"id@version": "sha256"}}', path=str(lock_path))
    released = dict(extra.pop("released", {}))
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if key in released:
        same = "" if released[key] == digest else " and the file no longer matches it"
        raise RulesetError(f"{key} is already released (sha256 {released[key][:12]}...){same}; a released version "
                           "never changes: put the change in a new version", path=str(path))
    data = load_document(raw, str(path), ruleset_id, version)
    if data.get("status") == "draft":
        raise RulesetError("refusing to release a draft: set status to active (or retired) once it is signed off",
                           path=str(path))
    try:
        compiled = compile_ruleset(data, sha256=digest, path=str(path))
    except RulesetError as exc:
        raise RulesetError(f"refusing to release: {exc}") from None
    if compiled.effective_to is not None and compiled.effective_to <= compiled.effective_from:
        raise RulesetError("refusing to release: effective_to must be after effective_from", path=str(path))
    released[key] = digest
    _write_lock(root_path, released, extra)
    return digest


def list_rulesets(root: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per ruleset file: metadata, short hash, rule count, lock state (or the problem)."""
    root_path = _root(root)
    if not root_path.is_dir():
        raise RulesetError("no such ruleset folder", path=str(root_path))
    registry = Registry(root_path)
    lock = registry.lock()
    rows = []
    for info in registry.files():
        raw = info.path.read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        locked = lock.get(f"{info.id}@{info.version}")
        row: dict[str, Any] = {"id": info.id, "version": info.version, "status": None, "effective_from": None,
                               "effective_to": None, "sha256": digest, "rules": None, "path": str(info.path),
                               "problem": None}
        try:
            data = load_yaml(raw, str(info.path))
            if isinstance(data, dict):
                row.update(status=data.get("status"), effective_from=data.get("effective_from"),
                           effective_to=data.get("effective_to"))
            compiled = compile_ruleset(data, sha256=digest, path=str(info.path))
            row["rules"] = len(compiled.rules)
        except RulesetError as exc:
            row["problem"] = str(exc).splitlines()[0]
        if locked is None:
            row["lock"] = "draft" if row["status"] == "draft" else "UNRELEASED"
        else:
            row["lock"] = "released" if locked == digest else "TAMPERED"
        if row["lock"] == "TAMPERED":
            row["problem"] = "content does not match the sha256 locked at release"
        elif row["lock"] == "UNRELEASED" and row["problem"] is None:
            row["problem"] = (f"status is {row['status']} but the version is not released: release it with `cds "
                              f"rulesets release {info.id} {info.version}` or mark it draft")
        rows.append(row)
    return rows


# ====================================================================================== wording
OP_TEXT = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "eq": "=", "ne": "≠"}
COUNT_TEXT = {"gt": "more than", "ge": "at least", "eq": "exactly", "le": "at most", "lt": "fewer than"}


def _md(text: Any) -> str:
    """One line of free text for Markdown (folded whitespace)."""
    return " ".join(str(text).split())


def _cell(text: Any) -> str:
    return _md(text).replace("|", "\\|")


def _num(x: float) -> str:
    return f"{x:g}"


def _resolve_ref(raw: Any, data: Mapping[str, Any]) -> tuple[Any, list[str]]:
    names = []
    while isinstance(raw, dict) and set(raw) == {"ref"} and raw["ref"] in data.get("conditions", {}):
        names.append(raw["ref"])
        raw = data["conditions"][raw["ref"]]
    return raw, names


def _word_tree(node: C.Node, raw: Any, data: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """(headline, children) for one condition node; ``raw`` is the ruleset text it came from."""
    raw, names = _resolve_ref(raw, data)
    head, children = _word_node(node, raw if isinstance(raw, dict) else None, data)
    if names:
        note = f" *(named condition {', '.join(f'`{n}`' for n in names)})*"
        head = f"{head[:-1]}{note}:" if head.endswith(":") else f"{head}{note}"
    return head, children


def _list_name(raw: Any, key: str) -> str | None:
    if isinstance(raw, dict) and isinstance(raw.get(key), dict):
        return raw[key].get("list")
    return None


def _word_node(node: C.Node, raw: dict[str, Any] | None, data: Mapping[str, Any]) -> tuple[str, list[Any]]:
    if isinstance(node, C.Is):
        return {"present": f"`{node.fact}` is present", "absent": f"`{node.fact}` is absent",
                "unknown": f"`{node.fact}` is not recorded", "known": f"`{node.fact}` is recorded"}[node.state], []
    if isinstance(node, C.Cmp):
        text = f"`{node.fact}` {OP_TEXT[node.op]} {_num(node.value)}"
        ref = raw.get(node.op) if raw else None
        if isinstance(ref, dict) and "param" in ref:
            unit = data.get("parameters", {}).get(ref["param"], {}).get("unit")
            text += f" (parameter `{ref['param']}`{', ' + _md(unit) if unit else ''})"
        return text, []
    if isinstance(node, C.In):
        values = ["not recorded" if v == C.UNKNOWN else v for v in node.values]
        return f"`{node.fact}` is {' or '.join(values)}", []
    if isinstance(node, C.Not):
        inner_raw = raw.get("not") if raw else None
        head, children = _word_tree(node.item, inner_raw, data)
        if not children:
            return f"not ({head})", []
        if isinstance(node.item, C.Or):
            return "none of these is true:", children
        return f"not: {head}", children
    if isinstance(node, C.Count):
        form = "count_present" if raw and "count_present" in raw else "count"
        op = COUNT_TEXT[node.op]
        if all(isinstance(c, C.Is) and c.state == "present" for c in node.items):
            lname = _list_name(raw, "count_present")
            named = f" (list `{lname}`)" if lname else ""
            items = ", ".join(f"`{c.fact}`" for c in node.items)  # type: ignore[union-attr]
            return f"{op} {node.n} of these {len(node.items)} present{named}: {items}", []
        raws = _raw_items(raw, form, len(node.items))
        verb = "is" if node.n == 1 and node.op in ("ge", "eq") else "are"
        children = [_word_tree(c, r, data) for c, r in zip(node.items, raws, strict=True)]
        return f"{op} {node.n} of these {verb} true:", children
    if isinstance(node, (C.And, C.Or)):
        if not node.items:
            return "always", []
        if isinstance(node, C.Or) and all(isinstance(c, C.Is) and c.state == "present" for c in node.items):
            lname = _list_name(raw, "any_present")
            named = f" (list `{lname}`)" if lname else ""
            if len(node.items) == 1 and not named:
                return f"`{node.items[0].fact}` is present", []  # type: ignore[union-attr]
            items = ", ".join(f"`{c.fact}`" for c in node.items)  # type: ignore[union-attr]
            return f"any of these is present{named}: {items}", []
        key = "all" if isinstance(node, C.And) else "any"
        raws = _raw_items(raw, key, len(node.items))
        head = "all of these are true:" if isinstance(node, C.And) else "any of these is true:"
        return head, [_word_tree(c, r, data) for c, r in zip(node.items, raws, strict=True)]
    raise TypeError(f"not a condition node: {node!r}")


def _raw_items(raw: dict[str, Any] | None, key: str, n: int) -> list[Any]:
    """The ruleset text of a node's children, when it lines up with the compiled node."""
    items = raw.get(key) if raw else None
    return list(items) if isinstance(items, list) and len(items) == n else [None] * n


def _bullets(tree: list[Any], depth: int = 0) -> list[str]:
    lines = []
    for head, children in tree:
        lines.append(f"{'  ' * depth}- {head}")
        lines.extend(_bullets(children, depth + 1))
    return lines


def describe_condition(node: C.Node, raw: Any = None, data: Mapping[str, Any] | None = None) -> list[str]:
    """A condition as Markdown lines for reviewers: a headline, then nested bullets.

    Works from the compiled AST (what is evaluated), annotated from the ruleset text with the
    names of named conditions, lists and parameters. Named lists and conditions are expanded.
    """
    head, children = _word_tree(node, raw, data or {})
    if not children:
        return [f"**When** {head}"]
    return [f"**When** {head}", "", *_bullets(children)]


def describe_effect(effect: Mapping[str, Any], compiled: CompiledRuleset) -> list[str]:
    """An effect in words: a list of Markdown paragraphs."""
    t = effect["type"]
    out: list[str] = []
    if t == "red-flag":
        cat = compiled.red_flags.get(effect["flag"], {})
        urgency = effect.get("urgency", cat.get("urgency"))
        target = effect.get("referral_target", cat.get("referral_target"))
        trig = ("confirm: escalates now" if effect["trigger"] == "confirm"
                else "suspect: the case stays data-required until the requested items are known")
        out.append(f"**Effect** raise red flag **{_md(cat.get('label', effect['flag']))}** (`{effect['flag']}`); "
                   f"trigger {trig}; urgency **{urgency}**; referral target `{target}`"
                   + (f"; care step at least {effect['care_step']}" if "care_step" in effect else "") + ".")
        if effect.get("request"):
            out.append("**Ask or examine now** " + ", ".join(f"`{i}`" for i in effect["request"]))
        if effect.get("message"):
            out.append(f"**Message** {_md(effect['message'])}")
    elif t == "weak-flag":
        out.append("**Effect** record a weak flag" + (f" for `{effect['pathology']}`" if effect.get("pathology")
                                                      else "") + " (shown, never escalates).")
        out.append(f"**Message** {_md(effect['message'])}")
    elif t == "screen":
        out.append("**Effect** these items must be known before a non-escalation step is complete: "
                   + ", ".join(f"`{i}`" for i in effect["require"]) + ".")
        out.append(f"**Reason** {_md(effect['reason'])}")
    elif t == "care-step":
        out.append(f"**Effect** propose care step **{effect['step']}**"
                   + (f", referral target `{effect['referral_target']}`" if effect.get("referral_target") else "")
                   + " (the highest proposal wins" + ("; held at medical unless `conservative_care_failed` is "
                                                      "present" if effect["step"] == "surgical-referral" else "")
                   + ").")
        out.append(f"**Message** {_md(effect['message'])}")
        if effect.get("content"):
            out.append("**Content**")
            out.append("\n".join(f"- {_md(c)}" for c in effect["content"]))
    elif t == "advice":
        out.append("**Effect** advice for the patient" + (f" (code `{effect['code']}`)" if effect.get("code") else "")
                   + f": “{_md(effect['text'])}”")
    elif t == "caution":
        out.append(f"**Effect** caution for the clinician: {_md(effect['message'])}")
        if effect.get("do_not"):
            out.append("**Do not** " + ", ".join(f"`{d}`" for d in effect["do_not"]))
    else:  # pragma: no cover - the schema allows no other type
        out.append(f"**Effect** {t}")
    return out


def _rule_params(compiled_or_data: Mapping[str, Any]) -> dict[str, set[str]]:
    """rule id -> parameters its condition reads (through named conditions too)."""
    data = compiled_or_data
    params = {k: v["value"] for k, v in data.get("parameters", {}).items()}
    lists = {k: tuple(v) for k, v in data.get("lists", {}).items()}
    out: dict[str, set[str]] = {}
    for raw in data.get("rules", ()):
        ctx = C.ParseContext(kinds=fact_kinds(), parameters=params, lists=lists, conditions=data.get("conditions", {}))
        C.parse(raw.get("when"), ctx, "$")
        out[raw.get("id")] = set(ctx.params_used)
    return out


def render_markdown(compiled: CompiledRuleset) -> str:
    """The ruleset as a Markdown document for clinical reviewers (deterministic)."""
    data = compiled.data
    raw_rules = {r["id"]: r for r in data["rules"]}
    lines: list[str] = []
    add = lines.append
    by_type: dict[str, list[Any]] = {t: [] for t in EFFECT_ORDER}
    for rule in compiled.rules:
        by_type.setdefault(rule.effect["type"], []).append(rule)

    add(f"# {_md(compiled.title)} — `{compiled.id}` {compiled.version}")
    add("")
    add(f"<!-- Generated by `cds rulesets show {compiled.key}`; do not edit by hand. -->")
    add("")
    add(_md(data.get("description", "")))
    add("")
    add("| | |")
    add("|---|---|")
    add(f"| Ruleset | `{compiled.id}` |")
    add(f"| Version | {compiled.version} |")
    add(f"| Status | {compiled.status} |")
    add(f"| Effective from | {compiled.effective_from.isoformat()} (inclusive) |")
    add(f"| Effective to | {compiled.effective_to.isoformat() + ' (exclusive)' if compiled.effective_to else 'open'} |")
    add(f"| File sha256 | `{compiled.sha256}` |")
    voc = data.get("vocabulary") or {}
    if voc:
        add(f"| Vocabulary | {_cell(voc.get('name', ''))} v{_cell(voc.get('version', ''))} |")
    add(f"| Authors | {_cell(', '.join(map(str, data.get('authors', []))) or 'none named')} |")
    reviewers = ", ".join(map(str, data.get("reviewers", []))) or "none yet (not signed off)"
    add(f"| Clinical reviewers | {_cell(reviewers)} |")
    counts = ", ".join(f"{len(by_type[t])} {t}" for t in EFFECT_ORDER if by_type.get(t))
    add(f"| Rules | {len(compiled.rules)} ({counts}) |")
    add("")
    add("How to read the conditions: a rule fires only when its condition is **true**. A finding that was not "
        "recorded is unknown, never absent, so an unasked question can never count as a negative answer. Named "
        "conditions and lists are written out in full; thresholds name the parameter they come from.")
    add("")
    add("## Contents")
    add("")
    add("- [Sources](#sources)")
    add("- [Parameters](#parameters)")
    if data.get("lists"):
        add("- [Named lists](#named-lists)")
    add("- [Red-flag categories](#red-flag-categories)")
    for t in EFFECT_ORDER:
        if by_type.get(t):
            heading = EFFECT_HEADINGS[t]
            add(f"- [{heading}](#{_anchor(heading)}) ({len(by_type[t])})")
    add("")

    # ---- sources
    cited: dict[str, int] = {k: 0 for k in compiled.sources}
    for rule in compiled.rules:
        for k in rule.sources:
            cited[k] = cited.get(k, 0) + 1
    add("## Sources")
    add("")
    for key in sorted(compiled.sources):
        src = compiled.sources[key]
        url = f" <{src['url']}>" if src.get("url") else ""
        ev = f" Evidence: {_md(src['evidence'])}." if src.get("evidence") else ""
        add(f"- **{key}** — {_md(src['citation'])}{url}{ev} *(cited by {cited.get(key, 0)} rule"
            f"{'' if cited.get(key, 0) == 1 else 's'})*")
    add("")

    # ---- parameters
    used_by: dict[str, list[str]] = {}
    for rid, params in _rule_params(data).items():
        for p in params:
            used_by.setdefault(p, []).append(rid)
    add("## Parameters")
    add("")
    add("| Parameter | Value | Unit | Sources | Note | Used by |")
    add("|---|---|---|---|---|---|")
    for name in sorted(data["parameters"]):
        p = data["parameters"][name]
        users = [f"`{r}`" for r in used_by.get(name, [])]
        if name in PARAMETERS:
            users.insert(0, "derived facts")
        add(f"| `{name}` | {_num(p['value'])} | {_cell(p.get('unit', ''))} | {', '.join(p['sources'])} | "
            f"{_cell(p.get('note', ''))} | {', '.join(users) or '**unused**'} |")
    add("")

    # ---- lists
    if data.get("lists"):
        add("## Named lists")
        add("")
        for name in sorted(data["lists"]):
            add(f"- `{name}`: {', '.join(f'`{i}`' for i in data['lists'][name])}")
        add("")

    # ---- red-flag categories
    raised: dict[str, list[str]] = {}
    for rule in by_type.get("red-flag", []):
        raised.setdefault(rule.effect["flag"], []).append(f"`{rule.id}` ({rule.effect['trigger']})")
    add("## Red-flag categories")
    add("")
    for fid, cat in compiled.red_flags.items():  # ruleset order
        add(f"### {_md(cat['label'])} (`{fid}`)")
        add("")
        add(f"- Urgency: **{cat['urgency']}**")
        add(f"- Referral target: `{cat['referral_target']}`")
        alts = cat.get("alternative_targets") or []
        add(f"- Alternative targets: {', '.join(f'`{a}`' for a in alts) or 'none'}")
        add(f"- Action: {_md(cat.get('action', '')) or 'none stated'}")
        add(f"- Sources: {', '.join(cat['sources'])}")
        if cat.get("note"):
            add(f"- Note: {_md(cat['note'])}")
        add(f"- Raised by: {', '.join(raised.get(fid, [])) or '**no rule**'}")
        add("")

    # ---- rules
    for t in EFFECT_ORDER:
        rules = by_type.get(t)
        if not rules:
            continue
        add(f"## {EFFECT_HEADINGS[t]}")
        add("")
        for rule in rules:
            add(f"### `{rule.id}` — {_md(rule.title)}")
            add("")
            lines.extend(describe_condition(rule.when, raw_rules[rule.id]["when"], data))
            add("")
            for para in describe_effect(rule.effect, compiled):
                add(para)
                add("")
            evidence = f" · **Evidence** {rule.evidence}" if rule.evidence else ""
            add(f"**Sources** {', '.join(rule.sources)}{evidence}")
            add("")
            if rule.note:
                add(f"**Note** {_md(rule.note)}")
                add("")
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def _anchor(heading: str) -> str:
    """GitHub-style heading anchor."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


# ========================================================================================= lint
@attrs.frozen
class Finding:
    rule: str
    severity: str  # error | warning
    check: str
    what: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "severity": self.severity, "check": self.check, "what": self.what, "why": self.why}


MISSING = object()  # in a value domain: leave the fact unrecorded
_UNDECIDED = object()
REQUIRED_FACTS = frozenset({"region"})  # always present in a valid case
DERIVED_BOUNDS = {"start_back_total": (0.0, 9.0), "start_back_psychosocial_subscore": (0.0, 5.0),
                  "odi_percent": (0.0, 100.0)}

#: Relations the derived facts (cds.scores.derive) guarantee between facts, as conditions that are
#: never false on a real case. The analysis prunes assignments that make one of them false.
_COUPLINGS: tuple[dict[str, Any], ...] = (
    *({"any": [{"not": {"fact": "duration_category", "in": [cat]}}, cond]} for cat, cond in (
        ("acute", {"fact": "pain_duration_weeks", "lt": {"param": "duration_acute_under_weeks"}}),
        ("chronic", {"fact": "pain_duration_weeks", "gt": {"param": "duration_chronic_over_weeks"}}),
        ("subacute", {"all": [{"fact": "pain_duration_weeks", "ge": {"param": "duration_acute_under_weeks"}},
                              {"fact": "pain_duration_weeks", "le": {"param": "duration_chronic_over_weeks"}}]}))),
    {"any": [{"not": {"fact": "pain_duration_weeks", "lt": {"param": "duration_acute_under_weeks"}}},
             {"fact": "duration_category", "in": ["acute"]}]},
    {"any": [{"not": {"fact": "pain_duration_weeks", "gt": {"param": "duration_chronic_over_weeks"}}},
             {"fact": "duration_category", "in": ["chronic"]}]},
    *({"any": [{"not": {"fact": "conservative_care_failed", "is": "present"}}, {"fact": f, "is": "present"}]}
      for f in ("physical_therapy_trial_failed", "medical_trial_failed")),
    *({"any": [{"not": {"fact": f, "is": "absent"}}, {"fact": "conservative_care_failed", "is": "absent"}]}
      for f in ("self_care_trial_failed", "physical_therapy_trial_failed", "medical_trial_failed",
                "nonsurgical_treatment_failed")),
    {"any": [{"not": {"fact": "conservative_care_failed", "is": "absent"}},
             {"fact": "nonsurgical_treatment_failed", "is": "absent"}]},
    {"any": [{"not": {"fact": "ng65_entry", "is": "present"}},
             {"fact": "pain_duration_weeks", "gt": {"param": "ng65_duration_weeks_over"}}]},
    {"any": [{"not": {"fact": "ng65_entry", "is": "present"}},
             {"not": {"fact": "back_pain_onset_age_years", "ge": {"param": "ng65_onset_age_under"}}}]},
    {"any": [{"not": {"fact": "ng65_onset_before_35", "is": "present"}},
             {"not": {"fact": "back_pain_onset_age_years", "ge": {"param": "ng65_early_onset_age_under"}}}]},
    {"any": [{"not": {"fact": "back_pain_onset_age_years", "lt": {"param": "ng65_early_onset_age_under"}}},
             {"fact": "ng65_onset_before_35", "is": "present"}]},
    {"any": [{"not": {"fact": "back_pain_onset_age_years", "ge": {"param": "ng65_early_onset_age_under"}}},
             {"fact": "ng65_onset_before_35", "is": "absent"}]},
    {"any": [{"not": {"fact": "hip_oa_clinical_diagnosis", "is": "present"}},
             {"fact": "age_years", "ge": {"param": "hip_oa_age_at_least"}}]},
    {"any": [{"not": {"fact": "hip_oa_clinical_diagnosis", "is": "present"}},
             {"fact": "morning_stiffness_minutes", "le": {"param": "hip_oa_morning_stiffness_max_minutes"}}]},
    {"any": [{"not": {"fact": "hip_oa_clinical_diagnosis", "is": "present"}},
             {"fact": "activity_related_joint_pain", "is": "present"}]},
    *({"any": [{"not": {"fact": f, "is": "present"}}, {"fact": "hip_oa_clinical_diagnosis", "is": "absent"}]}
      for f in ("major_trauma", "minor_trauma", "hot_swollen_tender_joint", "progressive_or_rapidly_worsening_pain")),
    {"any": [{"not": {"fact": "start_back_stratum", "in": ["low"]}}, {"fact": "start_back_total", "le": 3}]},
    {"any": [{"not": {"fact": "start_back_total", "le": 3}}, {"fact": "start_back_stratum", "in": ["low"]}]},
)


def _number_bounds() -> dict[str, tuple[float, float]]:
    from cds._resources import load_schema

    schema = load_schema("patient-facts.schema.json")
    out: dict[str, tuple[float, float]] = dict(DERIVED_BOUNDS)
    for section in ("context", "findings"):
        for fid, prop in schema["properties"][section]["properties"].items():
            if prop.get("x-cds-kind") == "number":
                out[fid] = (0.0, 10.0) if prop.get("x-cds-unit") == "0-10" else (0.0, math.inf)
    return out


def _walk(node: C.Node) -> Iterator[C.Node]:
    yield node
    if isinstance(node, C.Not):
        yield from _walk(node.item)
    elif isinstance(node, (C.And, C.Or, C.Count)):
        for c in node.items:
            yield from _walk(c)


def _nonmonotone(node: C.Node) -> set[str]:
    """Facts tested for being (un)recorded: leaving them unrecorded can make a test true."""
    return {n.fact for n in _walk(node) if (isinstance(n, C.Is) and n.state in ("unknown", "known"))
            or (isinstance(n, C.In) and C.UNKNOWN in n.values)}


class _Solver:
    """Searches value assignments for a case meeting requirements on conditions (see module doc).

    A requirement is (node, want) with want "true", "not-true" or "not-false".
    """

    def __init__(self, kinds: Mapping[str, Mapping[str, Any]], couplings: Sequence[C.Node], budget: int = 60_000,
                 samples: int = 3_000) -> None:
        self.kinds = kinds
        self.bounds = _number_bounds()
        self.couplings = [(c, frozenset(C.facts_of(c)), C.compile_predicate(c)) for c in couplings]
        self.budget = budget
        self.samples = samples
        self._pred_cache: dict[int, tuple[C.Node, C.Predicate]] = {}

    def _pred(self, node: C.Node) -> C.Predicate:
        hit = self._pred_cache.get(id(node))
        if hit is None or hit[0] is not node:
            hit = (node, C.compile_predicate(node))
            self._pred_cache[id(node)] = hit
        return hit[1]

    def _domain(self, fact: str, thresholds: set[float], missing: bool, missing_last: bool = False) -> list[Any]:
        spec = self.kinds[fact]
        kind = spec["kind"]
        if kind == "tri_state":
            values: list[Any] = ["present", "absent"]
        elif kind == "enum":
            values = [v for v in spec["values"] if v != C.UNKNOWN]
        else:
            lo, hi = self.bounds.get(fact, (0.0, math.inf))
            pts = sorted(thresholds)
            cand = set(pts)
            cand.update((a + b) / 2 for a, b in zip(pts, pts[1:], strict=False))
            if pts:
                cand.update((pts[0] - 1, pts[-1] + 1))
            cand.add(lo)
            if math.isfinite(hi):
                cand.add(hi)
            values = sorted(v for v in cand if lo <= v <= hi)
        if missing and fact not in REQUIRED_FACTS:
            return [*values, MISSING] if missing_last else [MISSING, *values]
        return values

    def solve(self, reqs: Sequence[tuple[C.Node, str]], key: str = "") -> Any:
        """A witness assignment (dict), None when there is none, or _UNDECIDED."""
        order: dict[str, None] = {}
        nonmono: set[str] = set()
        loose: set[str] = set()
        wanted: set[str] = set()
        thresholds: dict[str, set[float]] = {}
        for node, want in reqs:
            for f in C.facts_of(node):
                order.setdefault(f, None)
            nonmono |= _nonmonotone(node)
            if want != "true":
                loose.update(C.facts_of(node))
            else:
                wanted.update(C.facts_of(node))
        facts_all = frozenset(order)
        compiled = [(self._pred(n), w) for n, w in reqs]
        for node, cfacts, pred in self.couplings:
            if cfacts <= facts_all:
                compiled.append((pred, "not-false"))
                reqs = [*reqs, (node, "not-false")]
        for node, _ in reqs:
            for n in _walk(node):
                if isinstance(n, C.Cmp):
                    thresholds.setdefault(n.fact, set()).add(float(n.value))
        facts = [f for f in order if f in nonmono] + [f for f in order if f not in nonmono]
        n_nonmono = sum(1 for f in facts if f in nonmono)
        # values first for facts a "true" requirement reads (that is how it becomes true), "unrecorded"
        # first for the others (that is how a "not true" requirement stays not true)
        domains = [self._domain(f, thresholds.get(f, set()), f in nonmono or f in loose, f in wanted) for f in facts]
        values: dict[str, Any] = {}
        steps = [0]
        required = [f for f in facts if f in REQUIRED_FACTS]

        position = {f: i for i, f in enumerate(facts)}
        # a requirement whose facts are all fixed (assigned or left unrecorded) has its final value
        checks = [(pred, want, max((position[f] for f in facts_of_req), default=-1))
                  for (pred, want), facts_of_req in zip(compiled, (C.facts_of(n) for n, _ in reqs), strict=True)]

        def state(i: int, can_prune: bool) -> str:
            ok = True
            for pred, want, last in checks:
                r = pred(values)
                final = last < i
                if want == "true":
                    if r is not True:
                        ok = False
                        if final or (r is False and can_prune):
                            return "prune"
                elif want == "not-true":
                    if r is True:
                        if final or can_prune:
                            return "prune"
                        ok = False
                elif r is False:  # not-false
                    if final or can_prune:
                        return "prune"
                    ok = False
            return "ok" if ok else "open"

        def search(i: int) -> dict[str, Any] | None:
            steps[0] += 1
            if steps[0] > self.budget:
                raise _Budget
            s = state(i, i >= n_nonmono)
            if s == "ok" and all(f in values for f in required):
                return dict(values)
            if s == "prune" or i == len(facts):
                return None
            f = facts[i]
            for v in domains[i]:
                if v is MISSING:
                    values.pop(f, None)
                else:
                    values[f] = v
                found = search(i + 1)
                if found is not None:
                    return found
            values.pop(f, None)
            return None

        found: Any
        try:
            found = search(0)
        except _Budget:
            found = _UNDECIDED
        if isinstance(found, dict):
            return self._minimise(found, lambda: state(len(facts), False), values, required)
        if found is None:
            return None
        # fall back to sampling, deterministically
        rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))  # noqa: S311 - not crypto
        wide = [self._domain(f, thresholds.get(f, set()), True) for f in facts]
        for _ in range(self.samples):
            values.clear()
            for f, dom in zip(facts, wide, strict=True):
                v = rng.choice(dom)
                if v is not MISSING:
                    values[f] = v
            if state(len(facts), False) == "ok" and all(f in values for f in required):
                return self._minimise(dict(values), lambda: state(len(facts), False), values, required)
        return _UNDECIDED

    @staticmethod
    def _minimise(found: dict[str, Any], state: Any, values: dict[str, Any], required: Sequence[str]) -> dict[str, Any]:
        """Drop the facts a witness does not need (they become unrecorded), for a readable example."""
        values.clear()
        values.update(found)
        for f in reversed(list(found)):
            if f in required:
                continue
            v = values.pop(f)
            if state() != "ok":
                values[f] = v
        return {f: values[f] for f in found if f in values}


class _Budget(Exception):
    pass


def _witness_text(w: Mapping[str, Any], limit: int = 10) -> str:
    items = [f"{k}={_num(v) if isinstance(v, (int, float)) else v}" for k, v in w.items()]
    if not items:
        return "(nothing recorded but the required context)"
    more = f", ... (+{len(items) - limit})" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _rule_of_path(path: str, data: Any) -> str:
    m = re.match(r"^\$\.rules\[(\d+)\]", path)
    if m and isinstance(data, dict) and isinstance(data.get("rules"), list):
        i = int(m.group(1))
        rule = data["rules"][i] if i < len(data["rules"]) else None
        if isinstance(rule, dict) and isinstance(rule.get("id"), str):
            return rule["id"]
    return "-"


def _problem_findings(exc: RulesetError, data: Any) -> list[Finding]:
    schema = "does not follow" in str(exc).splitlines()[0]
    out = []
    for p in exc.problems:
        msg = p.message
        if "source key" in msg:
            check, why = "source", "every rule, parameter and red flag must cite sources that resolve to a citation"
        elif schema:
            check, why = "schema", "the ruleset does not follow schemas/ruleset.schema.json and cannot be loaded"
        else:
            check, why = "compile", "the ruleset cannot be compiled, so no version of it can be released or evaluated"
        out.append(Finding(_rule_of_path(p.path, data), "error", check, f"{p.path}: {msg}", why))
    if not exc.problems:
        out.append(Finding("-", "error", "load", str(exc), "the ruleset cannot be loaded"))
    return out


@attrs.define
class _Parsed:
    id: str
    index: int
    when: C.Node
    raw: Mapping[str, Any]
    effect: Mapping[str, Any]
    predicate: C.Predicate


class _Linter:
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.findings: list[Finding] = []
        self.kinds = fact_kinds()
        self.params = {k: v["value"] for k, v in data.get("parameters", {}).items()}
        self.lists = {k: tuple(v) for k, v in data.get("lists", {}).items()}
        self.conds = data.get("conditions", {})
        self.rules: list[_Parsed] = []
        self.params_used: set[str] = set()
        self.lists_used: set[str] = set()
        self.refs_used: set[str] = set()
        self.literals: list[tuple[str, str, float]] = []
        for i, raw in enumerate(data.get("rules", ())):
            ctx = self._ctx()
            node = C.parse(raw["when"], ctx, f"$.rules[{i}].when")
            self.params_used |= ctx.params_used
            self.lists_used |= ctx.lists_used
            self.refs_used |= ctx.refs_used
            if ctx.problems:
                continue  # reported by the compiler
            self.rules.append(_Parsed(raw["id"], i, node, raw, raw["effect"], C.compile_predicate(node)))
            self._literal_thresholds(raw["id"], raw["when"], set())
        couplings = []
        for raw in _COUPLINGS:
            ctx = self._ctx()
            node = C.parse(raw, ctx, "coupling")
            if not ctx.problems:
                couplings.append(node)
        self.solver = _Solver(self.kinds, couplings)
        self.order = {r.id: r.index for r in self.rules}

    def _ctx(self) -> C.ParseContext:
        return C.ParseContext(kinds=self.kinds, parameters=self.params, lists=self.lists, conditions=self.conds)

    def _literal_thresholds(self, rid: str, raw: Any, seen: set[str]) -> None:
        if not isinstance(raw, dict):
            return
        if "ref" in raw and isinstance(raw["ref"], str) and raw["ref"] not in seen and raw["ref"] in self.conds:
            self._literal_thresholds(rid, self.conds[raw["ref"]], seen | {raw["ref"]})
            return
        if "fact" in raw:
            for op in C.CMP_OPS:
                if op in raw and isinstance(raw[op], (int, float)) and not isinstance(raw[op], bool):
                    self.literals.append((rid, raw["fact"], raw[op]))
            return
        for key in ("all", "any", "count"):
            if isinstance(raw.get(key), list):
                for c in raw[key]:
                    self._literal_thresholds(rid, c, seen)
        if "not" in raw:
            self._literal_thresholds(rid, raw["not"], seen)

    def add(self, rule: str, severity: str, check: str, what: str, why: str) -> None:
        self.findings.append(Finding(rule, severity, check, what, why))

    def solve(self, reqs: Sequence[tuple[C.Node, str]], key: str) -> Any:
        return self.solver.solve(reqs, key)

    # ------------------------------------------------------------------ structure
    def check_metadata(self) -> None:
        d = self.data
        try:
            start = dt.date.fromisoformat(d["effective_from"])
            end = dt.date.fromisoformat(d["effective_to"]) if d.get("effective_to") else None
        except (KeyError, TypeError, ValueError):
            self.add("-", "error", "metadata", "effective_from / effective_to are not ISO dates",
                     "selection by date (as_of) cannot work")
            return
        if end is not None and end <= start:
            self.add("-", "error", "metadata", f"effective_to {end} is not after effective_from {start}",
                     "the version would never be in effect")
        if d.get("status") == "retired" and end is None:
            self.add("-", "warning", "metadata", "status is retired but effective_to is not set",
                     "as_of selection still treats the version as in effect from effective_from on")
        if d.get("status") != "draft" and not d.get("reviewers"):
            self.add("-", "warning", "metadata", f"status is {d.get('status')} but no clinical reviewer is named",
                     "a version used for patients should record who signed it off (reviewers)")

    def check_sources(self) -> None:
        cited: set[str] = set()
        for p in self.data.get("parameters", {}).values():
            cited.update(p.get("sources", ()))
        for f in self.data.get("red_flags", {}).values():
            cited.update(f.get("sources", ()))
        for r in self.data.get("rules", ()):
            cited.update(r.get("sources", ()))
        for key in sorted(set(self.data.get("sources", {})) - cited):
            self.add("-", "warning", "source", f"source {key} is declared but nothing cites it",
                     "an uncited source suggests a rule that was removed or a citation that was forgotten")

    def check_parameters(self) -> None:
        for name in sorted(self.params):
            if name not in self.params_used and name not in PARAMETERS:
                self.add("-", "warning", "parameter", f"parameter {name} is declared but no rule, named condition in "
                         "use or derived fact reads it",
                         "reviewers may believe that tuning it changes the recommendations; it does not")
        for rid, fact, value in self.literals:
            self.add(rid, "warning", "parameter", f"threshold {_num(value)} on {fact} is a literal number",
                     "thresholds belong in parameters, where they carry a unit and a citation and can be reviewed")
        for name in sorted(set(self.lists) - self.lists_used):
            self.add("-", "warning", "list", f"named list {name} is not used by any rule",
                     "dead content: edits to it have no effect")
        for name in sorted(set(self.conds) - self.refs_used):
            self.add("-", "warning", "condition", f"named condition {name} is not used by any rule",
                     "dead content: edits to it have no effect")

    def check_red_flags(self) -> None:
        raised: dict[str, list[str]] = {}
        for r in self.rules:
            if r.effect["type"] == "red-flag":
                raised.setdefault(r.effect["flag"], []).append(r.id)
                step = r.effect.get("care_step")
                if step in ("self-care", "physical-therapy"):
                    self.add(r.id, "error", "conflict", f"red flag {r.effect['flag']} sets care_step {step}",
                             "a red flag always puts the care step at medical or above; the pathway overrides it, "
                             "so the rule says something the recommendation will contradict")
        for fid in sorted(self.data.get("red_flags", {})):
            cat = self.data["red_flags"][fid]
            if not cat.get("urgency") or not cat.get("referral_target"):
                self.add("-", "error", "red-flag", f"red-flag category {fid} lacks an urgency or a referral target",
                         "an escalation must say how fast and to whom")
            if fid not in raised:
                self.add("-", "error", "red-flag", f"no rule raises red-flag category {fid}",
                         "a declared safety net that nothing triggers: a trigger rule was probably removed or "
                         "points at another category")

    # ------------------------------------------------------------------ analysis
    def check_satisfiable(self) -> set[str]:
        dead = set()
        for r in self.rules:
            res = self.solve([(r.when, "true")], f"sat:{r.id}")
            if res is None:
                dead.add(r.id)
                self.add(r.id, "error", "unsatisfiable", "the condition can never be true",
                         "the rule can never fire: its leaf tests contradict each other (on the same fact, an empty "
                         "numeric range, a count above the number of items, or a combination of these)")
            elif res is _UNDECIDED:
                self.add(r.id, "warning", "undecided", "the analysis could not decide whether the condition can be "
                         "true, and no generated case makes it true", "check by hand that the rule can fire")
        return dead

    def check_conflicts(self, dead: set[str]) -> None:
        live = [r for r in self.rules if r.id not in dead]
        care = [r for r in live if r.effect["type"] == "care-step"]
        flags = [r for r in live if r.effect["type"] == "red-flag"]
        ccf_present = C.Is("conservative_care_failed", "present")
        for r in care:
            if r.effect["step"] != "surgical-referral":
                continue
            if "conservative_care_failed" not in self.kinds:
                continue
            w = self.solve([(r.when, "true"), (ccf_present, "not-true")], f"gate:{r.id}")
            if isinstance(w, dict):
                self.add(r.id, "error", "conflict", "proposes surgical-referral but can fire while "
                         f"conservative_care_failed is not present, e.g. {_witness_text(w)}",
                         "surgery is the last resort: every surgical-referral rule must require documented failure "
                         "of physical therapy and medical treatment (the pathway holds it back at medical)")
        for r in care:
            if r.effect["step"] != "self-care" or not flags:
                continue
            reqs = [(r.when, "true")] + [(f.when, "not-true") for f in flags]
            w = self.solve(reqs, f"selfcare-implies:{r.id}")
            if w is None:
                self.add(r.id, "error", "conflict", "proposes self-care but can only fire when a red-flag rule fires",
                         "its condition implies a red flag, so it proposes self-care exactly when escalation is "
                         "needed; the proposal can never be delivered")
                continue
            together = []
            example = None
            for f in flags:
                w = self.solve([(r.when, "true"), (f.when, "true")], f"selfcare-with:{r.id}:{f.id}")
                if isinstance(w, dict):
                    together.append(f.id)
                    example = example or (f.id, w)
            # Firing beside a red flag is not reported: the pathway supersedes care-step proposals below
            # the escalated step and leaves them out of the recommendation's reasons.
            del together, example
        rank = {s: i for i, s in enumerate(STEPS)}
        over: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        hidden: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for i, a in enumerate(care):
            for b in care[i + 1:]:
                sa, sb = rank[a.effect["step"]], rank[b.effect["step"]]
                same = sa == sb
                if same and _wording(a.effect) == _wording(b.effect) and \
                        a.effect.get("referral_target") == b.effect.get("referral_target"):
                    continue
                w = self.solve([(a.when, "true"), (b.when, "true")], f"care:{a.id}:{b.id}")
                if not isinstance(w, dict):
                    continue
                if same:
                    # the pathway merges the content of every rule proposing the winning step; only a
                    # second, different referral target is lost (the first one is shown)
                    ta, tb = a.effect.get("referral_target"), b.effect.get("referral_target")
                    if ta and tb and ta != tb:
                        hidden.setdefault(b.id, []).append((a.id, w))
                else:
                    low, high = (a, b) if sa < sb else (b, a)
                    over.setdefault(low.id, []).append((high.id, w))
        for r in care:
            if r.id in over:
                highs = over[r.id]
                self.add(r.id, "warning", "conflict", f"proposes {r.effect['step']} but can fire together with higher "
                         f"proposals: {_names([f'{h} ({self._step(h)})' for h, _ in highs])}; "
                         f"e.g. with {highs[0][0]}: {_witness_text(highs[0][1])}",
                         "the highest proposal wins, so this rule's message and content are not shown in those cases "
                         "(intended for stepped care; check that it is intended here)")
            if r.id in hidden:
                earlier = hidden[r.id]
                tgt = r.effect.get("referral_target")
                self.add(r.id, "warning", "conflict", f"proposes {r.effect['step']} with referral target {tgt}, like "
                         f"the earlier rule(s) {_names([e for e, _ in earlier])} with another target, and can fire "
                         f"together with them, e.g. with {earlier[0][0]}: {_witness_text(earlier[0][1])}",
                         "the recommendation carries one referral target, the first rule's; reorder the rules or "
                         "make the conditions exclusive")

    def _step(self, rid: str) -> str:
        return next(r.effect["step"] for r in self.rules if r.id == rid)

    def check_shadowed(self, dead: set[str]) -> None:
        live = [r for r in self.rules if r.id not in dead]
        groups: dict[str, list[_Parsed]] = {}
        for r in live:
            groups.setdefault(_decision_key(r.effect), []).append(r)
        for members in groups.values():
            if len(members) < 2:
                continue
            for a in members:
                for b in members:
                    if a is b:
                        continue
                    if self.solve([(a.when, "true"), (b.when, "not-true")], f"implies:{a.id}:{b.id}") is not None:
                        continue
                    if self.solve([(b.when, "true"), (a.when, "not-true")], f"implies:{b.id}:{a.id}") is None \
                            and a.index < b.index:
                        continue  # equivalent conditions: report the later rule only
                    ident = dict(a.effect) == dict(b.effect)
                    same = "an identical effect" if ident else "the same decision"
                    self.add(a.id, "warning", "shadowed", f"whenever it fires, {b.id} fires too with {same}",
                             "the rule is redundant" + ("" if ident else "; only its wording differs")
                             + ": merge the wording into the other rule or remove one")
                    break

    def run(self) -> list[Finding]:
        self.check_metadata()
        self.check_sources()
        self.check_parameters()
        self.check_red_flags()
        dead = self.check_satisfiable()
        self.check_conflicts(dead)
        self.check_shadowed(dead)
        return self.findings


def _names(items: Sequence[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _wording(effect: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(json.dumps(effect.get(k), sort_keys=True) for k in WORDING_FIELDS)


def _decision_key(effect: Mapping[str, Any]) -> str:
    """Effects with the same key make the same decision. Red flags and screens are compared without
    their wording (message, reason); for the other types the wording is the effect."""
    if effect["type"] in ("red-flag", "screen"):
        return json.dumps({k: v for k, v in effect.items() if k not in WORDING_FIELDS}, sort_keys=True)
    return json.dumps(dict(effect), sort_keys=True)


def _sorted_findings(findings: Iterable[Finding], data: Any) -> list[Finding]:
    order: dict[str, int] = {}
    if isinstance(data, dict) and isinstance(data.get("rules"), list):
        for i, r in enumerate(data["rules"]):
            if isinstance(r, dict) and isinstance(r.get("id"), str):
                order.setdefault(r["id"], i)
    unique = list(dict.fromkeys(findings))
    return sorted(unique, key=lambda f: (f.severity != "error", -1 if f.rule == "-" else order.get(f.rule, 10**6),
                                         f.check, f.what))


def lint(ruleset_or_path: CompiledRuleset | str | Path | Mapping[str, Any], *,
         root: str | Path | None = None) -> list[Finding]:
    """Lint one ruleset version: a compiled ruleset, a path, ``ID@VERSION`` (under ``root``) or raw data."""
    data: Any
    if isinstance(ruleset_or_path, CompiledRuleset):
        data, label = ruleset_or_path.data, ruleset_or_path.path
        extra = [] if ruleset_or_path.released else _unreleased(data)
        return _sorted_findings(extra + _lint_data(data, label), data)
    elif isinstance(ruleset_or_path, Mapping):
        data, label = ruleset_or_path, "<data>"
    else:
        ref = str(ruleset_or_path)
        try:
            if isinstance(ruleset_or_path, Path) or _is_path_ref(ref):
                path = Path(ref)
                if not path.is_file():
                    raise RulesetError("no such ruleset file", path=ref)
            else:
                rid, version = _split_ref(ref)
                path = _ruleset_path(_root(root), rid, version)
            raw = path.read_bytes()
            label = str(path)
            data = load_yaml(raw, label)
            locked = Registry(path.parent.parent).lock().get(f"{path.parent.name}@{path.stem}")
        except RulesetError as exc:
            return [Finding("-", "error", "load", str(exc), "the ruleset cannot be read")]
        findings: list[Finding] = []
        if locked is not None and locked != hashlib.sha256(raw).hexdigest():
            findings.append(Finding("-", "error", "load",
                                    f"{path}: content does not match the sha256 locked at release",
                                    "a released version never changes; the registry refuses to load it"))
        if locked is None:
            findings.extend(_unreleased(data))
        return _sorted_findings(findings + _lint_data(data, label), data)
    return _sorted_findings(_lint_data(data, label), data)


def _unreleased(data: Any) -> list[Finding]:
    if not isinstance(data, dict) or data.get("status") in ("draft", None):
        return []
    return [Finding("-", "error", "release", f"status is {data.get('status')} but the version is not in lock.json",
                    "only drafts may be unreleased: an unreleased version can still change under the hash its "
                    "recommendations carry; release it (cds rulesets release ID VERSION) or mark it draft")]


def _lint_data(data: Any, label: str) -> list[Finding]:
    if not isinstance(data, dict):
        return [Finding("-", "error", "load", f"{label}: expected a YAML mapping at the top level",
                        "the ruleset cannot be loaded")]
    findings: list[Finding] = []
    try:
        compile_ruleset(data, sha256="", path=label)
    except RulesetError as exc:
        findings.extend(_problem_findings(exc, data))
        if "does not follow" in str(exc).splitlines()[0]:
            return findings  # the structure is not trustworthy enough to analyse
    return findings + _Linter(data).run()


# ================================================================================ diff / impact
def _changes(a: Mapping[str, Any], b: Mapping[str, Any], detail: bool = False) -> dict[str, Any]:
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    changed: dict[str, Any] = {}
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k]:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                fields = sorted(f for f in set(a[k]) | set(b[k]) if a[k].get(f) != b[k].get(f))
                changed[k] = ({f: {"from": a[k].get(f), "to": b[k].get(f)} for f in fields} if detail else fields)
            else:
                changed[k] = {"from": a[k], "to": b[k]}
    return {"added": added, "removed": removed, "changed": changed}


def diff_rulesets(a: CompiledRuleset, b: CompiledRuleset) -> dict[str, Any]:
    """What changed from version ``a`` to version ``b`` (rules, parameters, sources, red flags, ...)."""
    da, db = a.data, b.data
    meta_keys = ("status", "effective_from", "effective_to", "title", "description", "authors", "reviewers",
                 "vocabulary")
    meta = {k: {"from": da.get(k), "to": db.get(k)} for k in meta_keys if da.get(k) != db.get(k)}
    ra = {r["id"]: r for r in da["rules"]}
    rb = {r["id"]: r for r in db["rules"]}
    rules = _changes(ra, rb)
    for rid in sorted(set(ra) & set(rb)):
        if a.rules_by_id[rid].when != b.rules_by_id[rid].when and ra[rid].get("when") == rb[rid].get("when"):
            rules["changed"].setdefault(rid, []).append("when (via named condition, list or parameter)")
    order_a = [r for r in ra if r in rb]
    order_b = [r for r in rb if r in ra]
    return {
        "a": a.key, "b": b.key, "a_sha256": a.sha256, "b_sha256": b.sha256,
        "metadata": meta,
        "rules": {**rules, "reordered": order_a != order_b},
        "parameters": _changes(da.get("parameters", {}), db.get("parameters", {}), detail=True),
        "sources": _changes(da.get("sources", {}), db.get("sources", {})),
        "red_flags": _changes(da.get("red_flags", {}), db.get("red_flags", {})),
        "lists": _changes(da.get("lists", {}), db.get("lists", {})),
        "conditions": _changes(da.get("conditions", {}), db.get("conditions", {})),
    }


def read_cases(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(label, case) for each case in a folder of ``*.json`` files or an NDJSON file.

    A case that cannot be read comes back as (label, exception), never skipped. A ``.json`` file may
    hold one case or a JSON array of cases.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.json"))
        if not files:
            raise FactsError([Problem("$", f"no *.json case files in {p}")])
        for f in files:
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                yield f.name, FactsError([Problem("$", f"cannot read the case file ({exc.__class__.__name__})")])
                continue
            if isinstance(obj, list):
                for i, item in enumerate(obj):
                    yield f"{f.name}[{i}]", item
            else:
                yield f.name, obj
        return
    if not p.is_file():
        raise FactsError([Problem("$", f"no such case file or folder: {p}")])
    with open(p, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{p.name}:{n}", json.loads(line)
            except ValueError as exc:
                problem = Problem("$", f"line {n} is not valid JSON ({exc.__class__.__name__})")
                yield f"{p.name}:{n}", FactsError([problem])


DIMENSIONS = ("care_step", "urgency", "status", "red_flags")


def _outcome(rec: Any) -> dict[str, str]:
    return {"care_step": rec.care_step.value, "urgency": rec.urgency.value, "status": rec.status.value,
            "red_flags": ",".join(sorted(f.id for f in rec.red_flags)) or "none"}


def impact(a: CompiledRuleset, b: CompiledRuleset, cases: Iterable[Any] | str | Path) -> dict[str, Any]:
    """Evaluate every case under ``a`` and ``b`` and report what changed.

    ``cases`` is a path (see :func:`read_cases`) or an iterable of case dicts or (label, case)
    pairs. Uses the reference evaluator (``engine="reference"``) for both versions.
    """
    from cds.evaluator import Evaluator

    ev_a = Evaluator(a, engine="reference")
    ev_b = Evaluator(b, engine="reference")
    items: Iterable[Any] = read_cases(cases) if isinstance(cases, (str, Path)) else cases
    total = evaluated = 0
    errors: list[dict[str, str]] = []
    changed = {d: 0 for d in DIMENSIONS}
    changed_any = 0
    table: dict[str, dict[tuple[str, str], list[Any]]] = {d: {} for d in DIMENSIONS}
    for i, item in enumerate(items):
        total += 1
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            label, case = item
        else:
            case = item
            cid = case.get("case_id") if isinstance(case, dict) else None
            label = cid if isinstance(cid, str) and cid else f"#{i + 1}"
        if isinstance(case, BaseException):
            errors.append({"case": label, "error": str(case)})
            continue
        try:
            ra = ev_a.evaluate(case)
        except (CdsError, ValueError, TypeError) as exc:
            errors.append({"case": label, "error": f"{a.key}: {exc}"})
            continue
        try:
            rb = ev_b.evaluate(case)
        except (CdsError, ValueError, TypeError) as exc:
            errors.append({"case": label, "error": f"{b.key}: {exc}"})
            continue
        evaluated += 1
        case_id = ra.case_id
        oa, ob = _outcome(ra), _outcome(rb)
        moved = False
        for d in DIMENSIONS:
            cell = table[d].setdefault((oa[d], ob[d]), [0, []])
            cell[0] += 1
            if len(cell[1]) < 5:
                cell[1].append(case_id)
            if oa[d] != ob[d]:
                changed[d] += 1
                moved = True
        changed_any += moved
    transitions = {
        d: [{"from": f, "to": t, "count": c[0], "changed": f != t, "examples": c[1]}
            for (f, t), c in sorted(table[d].items(), key=lambda kv: (kv[0][0] == kv[0][1], -kv[1][0], kv[0]))]
        for d in DIMENSIONS}
    return {"a": a.key, "b": b.key, "engine": "reference", "cases": total, "evaluated": evaluated,
            "errors": len(errors), "error_cases": errors, "changed": {**changed, "any": changed_any},
            "transitions": transitions}


# ========================================================================================== CLI
def add_parser(sub: Any) -> None:
    p = sub.add_parser("rulesets", help="list, release, show, lint and diff ruleset versions",
                       description="Ruleset versions and governance.")
    rs = p.add_subparsers(dest="rulesets_command", required=True, metavar="COMMAND")

    def sp(name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
        q = rs.add_parser(name, help=helptext, description=helptext)
        q.add_argument("--root", metavar="DIR", help="the ruleset folder (default: the shipped rulesets/)")
        q.set_defaults(func=main, gov=func)
        return q

    q = sp("list", "list every ruleset version with its status, dates, hash and rule count", _cmd_list)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q = sp("release", "record a version's sha256 in lock.json; a released version never changes", _cmd_release)
    q.add_argument("id", metavar="ID")
    q.add_argument("version", metavar="VERSION")
    q = sp("show", "a Markdown document of one version for clinical reviewers", _cmd_show)
    q.add_argument("ref", metavar="ID@VERSION", help="ruleset version, or a path to a ruleset file")
    q.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    q = sp("lint", "check one version (or all) for errors and warnings; exit 1 on errors", _cmd_lint)
    q.add_argument("ref", metavar="ID@VERSION", nargs="?", help="ruleset version or file (default: every version)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q = sp("diff", "what changed between two versions; with --cases, what changes for the cases", _cmd_diff)
    q.add_argument("a", metavar="A@V1")
    q.add_argument("b", metavar="B@V2")
    q.add_argument("--cases", metavar="PATH", help="a folder of *.json case files or an NDJSON file")
    q.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run a ``cds rulesets`` subcommand (a parsed namespace, or argv after ``rulesets``)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="cds")
        add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["rulesets", *(args if args is not None else sys.argv[1:])])
    try:
        return int(args.gov(args) or 0)
    except (RulesetError, FactsError) as exc:
        print(f"cds rulesets {args.rulesets_command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _cmd_list(args: argparse.Namespace) -> int:
    rows = list_rulesets(args.root)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
    else:
        head = ("ID", "VERSION", "STATUS", "EFFECTIVE_FROM", "EFFECTIVE_TO", "SHA256", "RULES", "LOCK")
        table = [head] + [(r["id"], r["version"], str(r["status"] or "?"), str(r["effective_from"] or "?"),
                           str(r["effective_to"] or "-"), r["sha256"][:12],
                           "?" if r["rules"] is None else str(r["rules"]), r["lock"]) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if not rows:
            print("(no rulesets)")
    for r in rows:
        if r["problem"]:
            print(f"{r['id']}@{r['version']}: {r['problem']}", file=sys.stderr)
    return EXIT_FINDINGS if any(r["problem"] for r in rows) else 0


def _cmd_release(args: argparse.Namespace) -> int:
    digest = release(args.root, args.id, args.version)
    print(f"released {args.id}@{args.version} sha256 {digest} (recorded in {_root(args.root) / LOCK_FILE})")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    text = render_markdown(load_for_review(args.ref, args.root))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _cmd_lint(args: argparse.Namespace) -> int:
    if args.ref:
        targets = [args.ref]
    else:
        root = _root(args.root)
        targets = [f"{i.id}@{i.version}" for i in Registry(root).files()] if root.is_dir() else []
        if not targets:
            raise RulesetError(f"no rulesets under {root}")
    reports = []
    for t in targets:
        findings = lint(t, root=args.root)
        reports.append({"ruleset": t, "errors": sum(f.severity == "error" for f in findings),
                        "warnings": sum(f.severity == "warning" for f in findings),
                        "findings": [f.to_dict() for f in findings]})
    if args.json:
        print(json.dumps(reports if len(reports) > 1 or not args.ref else reports[0], indent=2, ensure_ascii=False))
    else:
        for rep in reports:
            print(f"{rep['ruleset']}: {rep['errors']} error(s), {rep['warnings']} warning(s)")
            for f in rep["findings"]:
                print(f"  {f['severity']:<7} {f['rule']}  [{f['check']}] {f['what']}")
                print(f"          why: {f['why']}")
    return EXIT_FINDINGS if any(r["errors"] for r in reports) else 0


def _cmd_diff(args: argparse.Namespace) -> int:
    a = load_for_review(args.a, args.root)
    b = load_for_review(args.b, args.root)
    report: dict[str, Any] = {"diff": diff_rulesets(a, b)}
    if args.cases:
        report["impact"] = impact(a, b, args.cases)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False, default=str))
        return 0
    d = report["diff"]
    print(f"{d['a']} ({d['a_sha256'][:12]}) -> {d['b']} ({d['b_sha256'][:12]})")
    for k, v in d["metadata"].items():
        print(f"  metadata {k}: {v['from']!r} -> {v['to']!r}")
    for section in ("rules", "parameters", "sources", "red_flags", "lists", "conditions"):
        s = d[section]
        print(f"{section}: {len(s['added'])} added, {len(s['removed'])} removed, {len(s['changed'])} changed"
              + ("; order changed" if s.get("reordered") else ""))
        for k in s["added"]:
            print(f"  + {k}")
        for k in s["removed"]:
            print(f"  - {k}")
        for k, fields in s["changed"].items():
            if isinstance(fields, dict) and section == "parameters":
                desc = "; ".join(f"{f}: {v['from']!r} -> {v['to']!r}" for f, v in fields.items())
            elif isinstance(fields, dict):
                desc = "value changed"
            else:
                desc = ", ".join(fields)
            print(f"  ~ {k}: {desc}")
    if "impact" in report:
        im = report["impact"]
        print(f"impact over {im['cases']} case(s) (engine: reference): {im['evaluated']} evaluated, "
              f"{im['errors']} error(s)")
        print("  changed: " + ", ".join(f"{k} {v}" for k, v in im["changed"].items()))
        for dim in DIMENSIONS:
            rows = [t for t in im["transitions"][dim] if t["changed"]]
            print(f"  {dim}: {len(rows)} transition(s)")
            for t in rows:
                print(f"    {t['from']} -> {t['to']}: {t['count']}  e.g. {', '.join(t['examples'])}")
        for e in im["error_cases"]:
            print(f"  error {e['case']}: {e['error'].splitlines()[0]}")
    return 0
