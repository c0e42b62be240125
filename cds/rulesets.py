"""Rulesets: find, load (safe YAML), validate, verify against the lock, compile, select.

Rulesets live at ``<root>/<id>/<version>.yaml`` beside a lock file ``<root>/lock.json`` that holds
the sha256 of every released version. A released version never changes: loading one whose bytes
do not match its locked hash raises :class:`RulesetError` naming the file. Each version is compiled
once per registry and cached; any number of versions of any number of rulesets live side by side.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml

from cds import conditions as C
from cds._resources import data_root, load_schema
from cds.errors import Problem, RulesetError
from cds.facts import catalogue
from cds.scores import DERIVED, PARAMETERS

MAX_RULESET_BYTES = 2_000_000
LOCK_FILE = "lock.json"
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?$")


def semver_key(version: str) -> tuple[Any, ...]:
    m = _SEMVER.match(version)
    if not m:
        return (-1, -1, -1, 0, version)
    major, minor, patch, pre = m.groups()
    return (int(major), int(minor), int(patch), 0 if pre else 1, pre or "")


class _NoAliasLoader(yaml.SafeLoader):
    """Safe loading, and no anchors or aliases: they add nothing a ruleset needs and allow bombs."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in rulesets", event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: bytes, path: str) -> Any:
    if len(text) > MAX_RULESET_BYTES:
        raise RulesetError(f"file is larger than {MAX_RULESET_BYTES} bytes", path=path)
    try:
        return yaml.load(text.decode("utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise RulesetError(f"not UTF-8 ({exc.reason})", path=path) from None
    except yaml.YAMLError as exc:
        raise RulesetError(f"not valid YAML: {exc}", path=path) from None


def load_document(raw: bytes, path: str, ruleset_id: str, version: str) -> dict[str, Any]:
    """The YAML document of ``<id>/<version>.yaml``: a mapping whose id and version match the file name."""
    data = load_yaml(raw, path)
    if not isinstance(data, dict):
        raise RulesetError("expected a YAML mapping at the top level", path=path)
    if data.get("id") != ruleset_id or data.get("version") != version:
        raise RulesetError(f"id/version inside the file must be {ruleset_id!r} and {version!r} (quoted)", path=path)
    return data


@functools.cache
def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema("ruleset.schema.json"))


def _json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


@attrs.frozen
class Rule:
    id: str
    title: str
    when: C.Node
    effect: Mapping[str, Any]
    sources: tuple[str, ...]
    facts: tuple[str, ...]
    predicate: C.Predicate = attrs.field(eq=False, repr=False)
    evidence: str | None = None
    note: str | None = None
    message: str = ""                                # the effect's words, for the recommendation
    citations: tuple[tuple[str, str], ...] = ()      # (source key, full citation)


@attrs.define(eq=False)
class CompiledRuleset:
    """A validated, compiled ruleset version. Immutable by convention; built by :func:`compile_ruleset`."""

    id: str
    version: str
    status: str
    effective_from: dt.date
    effective_to: dt.date | None
    title: str
    sha256: str
    path: str
    data: Mapping[str, Any]
    sources: Mapping[str, Mapping[str, Any]]
    parameters: Mapping[str, float]
    red_flags: Mapping[str, Mapping[str, Any]]
    rules: tuple[Rule, ...]
    rules_by_id: Mapping[str, Rule]
    released: bool = False
    _network: Any = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    def network(self) -> Any:
        """The durable_rules network for this version, compiled on first use (once per process)."""
        with self._lock:
            if self._network is None:
                from cds.engine import Network

                self._network = Network.compile(self.key, [(r.id, r.when) for r in self.rules])
            return self._network

    def active_on(self, day: dt.date) -> bool:
        return self.status != "draft" and self.effective_from <= day and (
            self.effective_to is None or day < self.effective_to)


def fact_kinds() -> dict[str, Mapping[str, Any]]:
    cat = catalogue()
    kinds: dict[str, Mapping[str, Any]] = {}
    kinds.update(cat.context)
    kinds.update(cat.findings)
    kinds.update(DERIVED)
    return kinds


def compile_ruleset(data: Any, *, sha256: str, path: str) -> CompiledRuleset:
    """Validate a loaded ruleset document and compile every rule; RulesetError lists all problems."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        problems = []
        for e in errors[:50]:
            best = e
            if e.context:  # oneOf: report the branch that got furthest into the document
                best = max(e.context, key=lambda x: (len(x.absolute_path), x.validator != "additionalProperties"))
            problems.append(Problem(_json_path(best.absolute_path), best.message[:300]))
        raise RulesetError("does not follow schemas/ruleset.schema.json", path=path, problems=problems)
    sources = data["sources"]
    params = {k: v["value"] for k, v in data["parameters"].items()}
    lists = {k: tuple(v) for k, v in data.get("lists", {}).items()}
    ctx = C.ParseContext(kinds=fact_kinds(), parameters=params, lists=lists, conditions=data.get("conditions", {}))
    problems = ctx.problems

    def cite(keys: Any, where: str) -> None:
        for i, k in enumerate(keys):
            if k not in sources:
                problems.append(Problem(f"{where}[{i}]", f"source key {k!r} is not in sources"))

    for name, p in data["parameters"].items():
        cite(p["sources"], f"$.parameters.{name}.sources")
    for name, flag in data.get("red_flags", {}).items():
        cite(flag["sources"], f"$.red_flags.{name}.sources")
    for name in PARAMETERS:
        if name not in params:
            problems.append(Problem("$.parameters", f"missing parameter {name!r} (used by the derived facts)"))
    kinds = ctx.kinds
    rules = []
    seen: set[str] = set()
    for i, raw in enumerate(data["rules"]):
        where = f"$.rules[{i}]"
        if raw["id"] in seen:
            problems.append(Problem(f"{where}.id", f"duplicate rule id {raw['id']!r}"))
        seen.add(raw["id"])
        node = C.parse(raw["when"], ctx, f"{where}.when")
        cite(raw["sources"], f"{where}.sources")
        eff = raw["effect"]
        if eff["type"] == "red-flag" and eff["flag"] not in data.get("red_flags", {}):
            problems.append(Problem(f"{where}.effect.flag", f"unknown red flag {eff['flag']!r}"))
        for field in ("request", "require"):
            for j, item in enumerate(eff.get(field, ())):
                if item not in kinds:
                    problems.append(Problem(f"{where}.effect.{field}[{j}]", f"unknown fact id {item!r}"))
        if eff["type"] == "red-flag" and eff["trigger"] == "suspect" and not eff.get("request"):
            problems.append(Problem(f"{where}.effect.request", "a suspect trigger must list the items to request"))
        rules.append(Rule(id=raw["id"], title=raw["title"], when=node, effect=eff, sources=tuple(raw["sources"]),
                          facts=C.facts_of(node), predicate=C.compile_predicate(node),
                          evidence=raw.get("evidence"), note=raw.get("note"),
                          message=eff.get("message") or eff.get("reason") or eff.get("text") or raw["title"],
                          citations=tuple((k, sources[k]["citation"]) for k in raw["sources"] if k in sources)))
    if problems:
        raise RulesetError("cannot be compiled", path=path, problems=problems)
    return CompiledRuleset(
        id=data["id"], version=data["version"], status=data["status"],
        effective_from=dt.date.fromisoformat(data["effective_from"]),
        effective_to=dt.date.fromisoformat(data["effective_to"]) if data.get("effective_to") else None,
        title=data["title"], sha256=sha256, path=path, data=data, sources=sources, parameters=params,
        red_flags=data.get("red_flags", {}), rules=tuple(rules), rules_by_id={r.id: r for r in rules})


@attrs.frozen
class RulesetInfo:
    id: str
    version: str
    path: Path


class Registry:
    """The rulesets under one root folder; compiles each version once and caches it (thread-safe)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else data_root("rulesets")
        self._cache: dict[tuple[str, str], CompiledRuleset] = {}
        self._lock = threading.RLock()

    # -- discovery
    def files(self, ruleset_id: str | None = None) -> list[RulesetInfo]:
        out = []
        dirs = [self.root / ruleset_id] if ruleset_id else sorted(p for p in self.root.iterdir() if p.is_dir())
        for d in dirs:
            if not d.is_dir():
                continue
            for f in d.glob("*.yaml"):
                out.append(RulesetInfo(d.name, f.stem, f))
        return sorted(out, key=lambda i: (i.id, semver_key(i.version)))

    def lock(self) -> dict[str, str]:
        path = self.root / LOCK_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RulesetError(f"unreadable lock file ({exc.__class__.__name__})", path=str(path)) from None
        return dict(data.get("released", {}))

    # -- loading
    def load(self, ruleset_id: str, version: str) -> CompiledRuleset:
        key = (ruleset_id, version)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            path = self.root / ruleset_id / f"{version}.yaml"
            if not re.fullmatch(r"[a-z][a-z0-9-]*", ruleset_id) or not _SEMVER.match(version) or not path.is_file():
                known = ", ".join(f"{i.id}@{i.version}" for i in self.files()) or "none"
                raise RulesetError(f"no ruleset {ruleset_id}@{version} (known: {known})")
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            locked = self.lock().get(f"{ruleset_id}@{version}")
            if locked is not None and locked != digest:
                raise RulesetError(f"content does not match the sha256 locked at release ({locked[:12]}...); a "
                                   "released version never changes: put the change in a new version", path=str(path))
            data = load_document(raw, str(path), ruleset_id, version)
            # An unreleased non-draft version loads (authors iterate on it before release), but its
            # provenance says so and `cds rulesets lint` reports it as an error; the shipped-ruleset
            # tests require every non-draft version to be in the lock.
            compiled = compile_ruleset(data, sha256=digest, path=str(path))
            compiled.released = locked is not None
            self._cache[key] = compiled
            return compiled

    def select(self, ruleset_id: str, version: str | None = None, as_of: dt.date | None = None) -> CompiledRuleset:
        """A pinned version; else the version active on ``as_of``; else the newest active version."""
        if version is not None:
            return self.load(ruleset_id, version)
        infos = self.files(ruleset_id)
        if not infos:
            raise RulesetError(f"no ruleset named {ruleset_id!r}")
        candidates = [self.load(i.id, i.version) for i in reversed(infos)]
        if as_of is not None:
            for rs in candidates:
                if rs.active_on(as_of):
                    return rs
            raise RulesetError(f"no version of {ruleset_id} was in effect on {as_of.isoformat()}")
        for rs in candidates:
            if rs.status == "active":
                return rs
        raise RulesetError(f"{ruleset_id} has no active version; drafts need an explicit version")


@functools.cache
def default_registry() -> Registry:
    return Registry()


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"back-hip-pain@1.0.0"`` -> ("back-hip-pain", "1.0.0"); a bare id -> (id, None)."""
    rid, _, version = ref.partition("@")
    return rid, (version or None)


def load_ruleset(ruleset_id: str = "back-hip-pain", version: str | None = None, *,
                 as_of: dt.date | None = None, registry: Registry | None = None) -> CompiledRuleset:
    return (registry or default_registry()).select(ruleset_id, version, as_of)
