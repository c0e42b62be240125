"""Recommendation -> CDS Hooks 2.0 cards. Pure functions, no web framework.

Cards (patient-view / encounter-start), in this order:

* one card per red flag: indicator critical (emergency) / warning (urgent) / info (routine, e.g.
  possible axial spondyloarthritis); a suggestion per referral target (the recommended one first)
  whose action creates a draft referral ServiceRequest with the FHIR priority from the CDS Hooks
  ConceptMap (critical -> stat, warning -> urgent, info -> routine);
* a data-required card (warning) listing the facts to ask or examine, when the recommendation's
  status is data-required;
* without a red flag, a care-step card (info): the step, its content, advice, cautions and weak
  flags; a routine referral suggestion when the step names a referral target.

order-select: one warning card when lumbar spine imaging (codes in ``lumbar_imaging_codes.yaml``) is
ordered for low back pain without a red flag, with a suggestion to remove the order.

Every card has ``uuid`` (UUIDv5 of service, hookInstance and card key: deterministic), ``summary``
(< 140 characters), ``indicator``, ``source`` {label, url, topic}, Markdown ``detail`` with the
reasons and citations, and ``overrideReasons``. :func:`empty_paths` finds any null or empty value;
responses are checked with it before they are sent.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import attrs
import yaml

from cds.fhir.guidance import (
    RED_FLAG_SYSTEM,
    REFERRAL_TARGET_SYSTEM,
    _uuid5,
    care_step_display,
    citations_for,
    fact_label,
    indicator_for,
    priority_for_indicator,
    target_display,
)

SUMMARY_MAX = 139  # the spec: "<140 characters"
CDS_FHIR_BASE = "https://cds.invalid/fhir"
TOPIC_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/cds-hooks-topic"
OVERRIDE_SYSTEM = f"{CDS_FHIR_BASE}/CodeSystem/override-reason"
SNOMED = "http://snomed.info/sct"

TOPICS = {
    "red-flag": "Red flag: escalation",
    "data-required": "More information needed",
    "care-step": "Care pathway step",
    "imaging": "Imaging appropriateness",
}

OVERRIDE_REASONS = {
    "red-flag": [
        ("already-referred", "Already referred or under specialist care for this"),
        ("assessed-not-present", "Assessed now: the red flag is not present"),
        ("recorded-in-error", "The finding was recorded in error"),
        ("patient-declined", "Patient declined after discussion"),
    ],
    "data-required": [
        ("asked-not-recorded", "Already asked or examined; will record"),
        ("cannot-assess-now", "Cannot be assessed at this contact"),
        ("not-relevant", "Not relevant to this presentation"),
    ],
    "care-step": [
        ("different-plan", "Different plan agreed with the patient"),
        ("already-in-progress", "This step is already in progress"),
        ("patient-declined", "Patient declined after discussion"),
    ],
    "imaging": [
        ("red-flag-on-assessment", "Red flag found on assessment (not yet recorded)"),
        ("persistent-surgery-candidate", "Persistent symptoms; candidate for surgery or intervention"),
        ("specialist-request", "Requested by a specialist"),
        ("recorded-in-error", "Diagnosis of low back pain recorded in error"),
    ],
}


@attrs.frozen
class CardContext:
    """What a card needs besides the recommendation."""

    service_id: str
    hook_instance: str
    patient_id: str
    source_label: str
    source_url: str
    encounter_id: str | None = None
    region: str | None = None
    issues: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- helpers

def summary_text(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1].rstrip() + "…"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md(text: str) -> str:
    """Plain text made safe for Markdown (no accidental emphasis, links or HTML)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or \
        (isinstance(value, (list, dict, Mapping)) and not value)


def empty_paths(value: Any, path: str = "$") -> list[str]:
    """Paths of every null, blank string, empty list or empty object (recursively)."""
    if _is_empty(value):
        return [path]
    out: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.extend(empty_paths(v, f"{path}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(empty_paths(v, f"{path}[{i}]"))
    return out


def prune_empty(value: Any) -> Any:
    """Drop every null or empty value (recursively; a container emptied by pruning goes too)."""
    if isinstance(value, Mapping):
        pruned = {k: prune_empty(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if not _is_empty(v)}
    if isinstance(value, list):
        return [v for v in (prune_empty(v) for v in value) if not _is_empty(v)]
    return value


def _overrides(kind: str) -> list[dict[str, str]]:
    return [{"code": code, "system": OVERRIDE_SYSTEM, "display": display} for code, display in OVERRIDE_REASONS[kind]]


def _source(ctx: CardContext, topic: str) -> dict[str, Any]:
    return {"label": ctx.source_label, "url": ctx.source_url,
            "topic": {"system": TOPIC_SYSTEM, "code": topic, "display": TOPICS[topic]}}


def _card_uuid(ctx: CardContext, *key: str) -> str:
    return _uuid5("card", ctx.service_id, ctx.hook_instance, *key)


def _sources_md(rec: Any, keys: Iterable[str]) -> tuple[str, list[dict[str, str]]]:
    lines: list[str] = []
    links: list[dict[str, str]] = []
    for key, citation, url in citations_for(rec, list(keys)):
        lines.append(f"- **{md(key)}**: {md(citation)}")
        if url and re.match(r"^https://\S+$", url) and len(links) < 5:
            links.append({"label": summary_text(f"{key} (guideline)"), "url": url, "type": "absolute"})
    return "\n".join(lines), links


def _reasons_md(reasons: Iterable[Any]) -> str:
    return "\n".join(f"- **{md(r.title)}**: {md(r.message)}" for r in reasons)


def _footer(rec: Any) -> str:
    p = rec.provenance
    sha = str(p.get("ruleset_sha256", ""))[:12]
    parts = [f"cds {p.get('cds_version', '?')}", f"ruleset {p.get('ruleset_id', '?')} {p.get('ruleset_version', '?')}"
             + (f" (sha256 {sha}…)" if sha else ""), f"engine {p.get('engine', '?')}"]
    return "_" + md(" · ".join(parts)) + "_"


def _issues_md(ctx: CardContext) -> str | None:
    if not ctx.issues:
        return None
    shown = "\n".join(f"- {md(i)}" for i in ctx.issues[:5])
    more = f"\n- … and {len(ctx.issues) - 5} more" if len(ctx.issues) > 5 else ""
    return f"**Data quality** (found while reading the record; these data were not used):\n{shown}{more}"


def _join(*blocks: str | None) -> str:
    return "\n\n".join(b for b in blocks if b)


def referral_resource(ctx: CardContext, target: str, priority: str, reason: dict[str, Any] | None,
                      note: str | None) -> dict[str, Any]:
    """A draft referral ServiceRequest (FHIR R4) for a suggestion's create action."""
    sr: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "proposal",
        "category": [{"coding": [{"system": SNOMED, "code": "3457005", "display": "Patient referral"}]}],
        "priority": priority,
        "code": {"coding": [{"system": REFERRAL_TARGET_SYSTEM, "code": target, "display": target_display(target)}],
                 "text": f"Referral to {target_display(target)}"},
        "subject": {"reference": f"Patient/{ctx.patient_id}"},
        "performerType": {"text": target_display(target)},
    }
    if ctx.encounter_id:
        sr["encounter"] = {"reference": f"Encounter/{ctx.encounter_id}"}
    if reason:
        sr["reasonCode"] = [reason]
    if note:
        sr["note"] = [{"text": note}]
    return sr


# ----------------------------------------------------------------------------- cards

def red_flag_card(rec: Any, flag: Any, ctx: CardContext) -> dict[str, Any]:
    indicator = indicator_for(flag.urgency)
    priority = priority_for_indicator(indicator)
    urgency = flag.urgency.value
    target = flag.referral_target
    summary = summary_text(f"{flag.label}: {urgency} referral to {target_display(target)}")
    reasons = [r for r in rec.reasons if r.rule_id in flag.triggers]
    source_keys = [*flag.sources, *(k for r in reasons for k, _ in r.sources)]
    sources, links = _sources_md(rec, source_keys)
    findings = ", ".join(fact_label(f).lower() for f in flag.findings)
    alternatives = ", ".join(target_display(t) for t in flag.alternative_targets)
    detail = _join(
        f"**{md(urgency.capitalize())}: {md(flag.label)}**",
        f"**Action:** {md(flag.action)}",
        f"**Refer to:** {md(target_display(target))}"
        + (f" (alternatives: {md(alternatives)})" if alternatives else ""),
        f"**Findings:** {md(findings)}" if findings else None,
        "**Why**\n" + _reasons_md(reasons) if reasons else None,
        "**Sources**\n" + sources if sources else None,
        _issues_md(ctx),
        _footer(rec),
    )
    reason_cc = {"coding": [{"system": RED_FLAG_SYSTEM, "code": flag.id, "display": flag.label}], "text": flag.label}
    suggestions = []
    for i, t in enumerate((target, *flag.alternative_targets)):
        label = f"Refer to {target_display(t)} ({priority})" + ("" if i == 0 else " - alternative")
        suggestions.append({
            "label": summary_text(label),
            "uuid": _uuid5("suggestion", ctx.service_id, ctx.hook_instance, flag.id, t),
            "isRecommended": i == 0,
            "actions": [{
                "type": "create",
                "description": summary_text(f"Create {'an' if priority[0] in 'aeiou' else 'a'} {priority} referral "
                                            f"to {target_display(t)}: {flag.label}"),
                "resource": referral_resource(ctx, t, priority, reason_cc, flag.action if i == 0 else None),
            }],
        })
    card = {
        "uuid": _card_uuid(ctx, "red-flag", flag.id),
        "summary": summary,
        "indicator": indicator,
        "detail": detail,
        "source": _source(ctx, "red-flag"),
        "suggestions": suggestions,
        "selectionBehavior": "at-most-one",
        "overrideReasons": _overrides("red-flag"),
    }
    if links:
        card["links"] = links
    return card


def data_required_card(rec: Any, ctx: CardContext) -> dict[str, Any]:
    items = rec.data_required
    groups: dict[str, list[str]] = {}
    for d in items:
        groups.setdefault(d.reason, []).append(d.item)
    blocks = []
    for reason, facts in groups.items():
        blocks.append(f"{md(reason)}\n" + "\n".join(f"- {md(fact_label(f))} (`{f}`)" for f in facts))
    rule_ids = {d.rule_id for d in items}
    reasons = [r for r in rec.reasons if r.rule_id in rule_ids]
    sources, _ = _sources_md(rec, [k for r in reasons for k, _ in r.sources])
    pending = [f.label for f in rec.red_flags if any(t in rule_ids for t in f.triggers)]
    if pending:
        summary = summary_text(f"Ask or examine {len(items)} item(s) now to confirm or rule out: {pending[0]}")
    else:
        summary = summary_text(f"Red-flag screen incomplete: ask or examine {len(items)} item(s) before deciding")
    detail = _join(
        "**More information is needed.** The recommendation is provisional until these are recorded; "
        "an unasked question is unknown, never negative.",
        *blocks,
        "**Sources**\n" + sources if sources else None,
        _footer(rec),
    )
    return {
        "uuid": _card_uuid(ctx, "data-required"),
        "summary": summary,
        "indicator": "warning",
        "detail": detail,
        "source": _source(ctx, "data-required"),
        "overrideReasons": _overrides("data-required"),
    }


def care_step_card(rec: Any, ctx: CardContext) -> dict[str, Any]:
    step = care_step_display(rec.care_step)
    region = {"back": "Low back pain", "hip": "Hip pain", "both": "Back and hip pain"}.get(ctx.region or "",
                                                                                          "Back or hip pain")
    provisional = rec.status.value == "data-required"
    summary = summary_text(f"{region}: {step.lower()} is the recommended step"
                           + (" (provisional)" if provisional else ""))
    step_reasons = [r for r in rec.reasons if r.effect == "care-step"]
    keys = [k for r in step_reasons for k, _ in r.sources]
    keys += [k for a in rec.advice for k in a.sources] + [k for c in rec.cautions for k in c.sources]
    keys += [k for w in rec.weak_flags for k in w.sources]
    sources, links = _sources_md(rec, keys)
    content = "\n".join(f"- {md(s)}" for s in rec.care_step_content)
    advice = "\n".join(f"- {md(a.text)}" for a in rec.advice)
    cautions = "\n".join(f"- {md(c.message)}" for c in rec.cautions)
    weak = "\n".join(f"- {md(w.message)}" for w in rec.weak_flags)
    detail = _join(
        f"**{md(step)}**" + (" (provisional: see the card asking for more information)" if provisional else ""),
        md(rec.care_step_detail) if rec.care_step_detail else None,
        content or None,
        "**Watch for** (weak flags, no escalation on their own)\n" + weak if weak else None,
        "**Do not**\n" + cautions if cautions else None,
        "**Advice for the patient**\n" + advice if advice else None,
        "**Why**\n" + _reasons_md(step_reasons) if step_reasons else None,
        "**Sources**\n" + sources if sources else None,
        _issues_md(ctx),
        _footer(rec),
    )
    card: dict[str, Any] = {
        "uuid": _card_uuid(ctx, "care-step", rec.care_step.value),
        "summary": summary,
        "indicator": "info",
        "detail": detail,
        "source": _source(ctx, "care-step"),
        "overrideReasons": _overrides("care-step"),
    }
    if rec.referral_target and not rec.red_flags:
        t = rec.referral_target
        card["suggestions"] = [{
            "label": summary_text(f"Refer to {target_display(t)} (routine)"),
            "uuid": _uuid5("suggestion", ctx.service_id, ctx.hook_instance, "care-step", t),
            "isRecommended": True,
            "actions": [{"type": "create", "description": summary_text(f"Create a routine referral to "
                                                                       f"{target_display(t)}"),
                         "resource": referral_resource(ctx, t, "routine", None, rec.care_step_detail)}],
        }]
        card["selectionBehavior"] = "at-most-one"
    if links:
        card["links"] = links
    return card


def recommendation_cards(rec: Any, ctx: CardContext) -> list[dict[str, Any]]:
    cards = [red_flag_card(rec, f, ctx) for f in rec.red_flags]
    if rec.status.value == "data-required" and rec.data_required:
        cards.append(data_required_card(rec, ctx))
    if not rec.red_flags:
        cards.append(care_step_card(rec, ctx))
    return [prune_empty(c) for c in cards]


# ----------------------------------------------------------------------------- order-select

@functools.lru_cache(maxsize=1)
def lumbar_imaging_codes() -> dict[tuple[str, str], str]:
    text = resources.files("cds.hooks").joinpath("lumbar_imaging_codes.yaml").read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    out: dict[tuple[str, str], str] = {}
    for key, codes in doc["codes"].items():
        system = doc["systems"][key]
        for code, display in codes.items():
            out[(system, str(code))] = display
    return out


def lumbar_imaging_orders(draft_orders: Any, selections: Any = None) -> list[tuple[str, str]]:
    """[(ServiceRequest id, display)] of the lumbar imaging orders among the draft orders.

    When ``selections`` (order-select's "Type/id" list) is given, only selected orders count.
    """
    if not isinstance(draft_orders, Mapping) or draft_orders.get("resourceType") != "Bundle":
        return []
    selected = {s for s in selections if isinstance(s, str)} if isinstance(selections, list) else None
    table = lumbar_imaging_codes()
    found = []
    for entry in draft_orders.get("entry") or []:
        res = entry.get("resource") if isinstance(entry, Mapping) else None
        if not isinstance(res, Mapping) or res.get("resourceType") != "ServiceRequest":
            continue
        rid = str(res.get("id") or "")
        if selected is not None and f"ServiceRequest/{rid}" not in selected:
            continue
        code = res.get("code")
        codings = code.get("coding") if isinstance(code, Mapping) else None
        for c in codings if isinstance(codings, list) else []:
            if not isinstance(c, Mapping):
                continue
            key = (str(c.get("system", "")).rstrip("/"), str(c.get("code", "")).strip())
            if key in table:
                found.append((rid, c.get("display") or table[key]))
                break
    return found


def imaging_card(rec: Any, ctx: CardContext, orders: list[tuple[str, str]]) -> dict[str, Any]:
    imaging_cautions = [c for c in rec.cautions if "imaging" in c.do_not]
    caution = next((c for c in imaging_cautions if "mri" in c.do_not), imaging_cautions[0])  # the back one first
    names = ", ".join(sorted({d for _, d in orders}))
    summary = summary_text("Lumbar spine imaging is not indicated for low back pain without red flags")
    keys = [*caution.sources, "ACP-2011", "ACR-LBP-2021"]
    sources, links = _sources_md(rec, keys)
    screen = None
    if rec.data_required:
        missing = ", ".join(fact_label(d.item).lower() for d in rec.data_required)
        screen = (f"**No red flag is recorded, but the red-flag screen is incomplete.** Ask or examine: "
                  f"{md(missing)}. Imaging is indicated when a red flag is found.")
    detail = _join(
        f"**Ordered:** {md(names)}",
        md(caution.message),
        "Imaging of non-specific low back pain without red flags does not improve outcomes and exposes the "
        "patient to radiation (X-ray, CT) and to incidental findings (ACP 2011; ACR Appropriateness Criteria "
        "Low Back Pain, variant 1).",
        screen,
        "**Sources**\n" + sources if sources else None,
        _footer(rec),
    )
    actions = [{"type": "delete", "description": summary_text(f"Remove the draft order {name}"),
                "resourceId": f"ServiceRequest/{rid}"} for rid, name in orders if rid]
    card: dict[str, Any] = {
        "uuid": _card_uuid(ctx, "imaging", *sorted(r for r, _ in orders)),
        "summary": summary,
        "indicator": "warning",
        "detail": detail,
        "source": _source(ctx, "imaging"),
        "overrideReasons": _overrides("imaging"),
    }
    if actions:
        card["suggestions"] = [{
            "label": "Remove the lumbar spine imaging order",
            "uuid": _uuid5("suggestion", ctx.service_id, ctx.hook_instance, "imaging", *sorted(r for r, _ in orders)),
            "isRecommended": True,
            "actions": actions,
        }]
        card["selectionBehavior"] = "at-most-one"
    if links:
        card["links"] = links
    return prune_empty(card)


def imaging_applies(rec: Any, region: str | None) -> bool:
    """True when the imaging warning applies: back region, no red flag, the no-imaging caution fired."""
    return region in ("back", "both") and not rec.red_flags and any("imaging" in c.do_not for c in rec.cautions)
