"""Generate schemas/patient-facts.schema.json from the clinical vocabulary.

The vocabulary (../shared/clinical/vocabulary.yaml) is the clinical team's source of truth for
concept ids; the schema is the contract integrators code against. Run this after the vocabulary
changes and commit the result:

    python tools/gen_facts_schema.py ../shared/clinical/vocabulary.yaml > schemas/patient-facts.schema.json

Each finding property carries an ``x-cds-kind`` annotation (tri_state, number, enum) that
``cds.facts`` reads to type the facts; JSON Schema validators ignore it.
"""

from __future__ import annotations

import json
import sys

import yaml

CENSORED = {
    "type": "object",
    "description": "A censored number: exactly one bound, e.g. {\"gt\": 30} for 'over 30'.",
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
    "properties": {op: {"$ref": "#/$defs/number"} for op in ("gt", "ge", "lt", "le")},
}
NUMBER = {"type": "number", "minimum": -1e9, "maximum": 1e9}


def number_schema(item: dict) -> dict:
    out = {
        "description": f"{item['definition']} Unit: {item.get('unit', '-')}. A number, a censored "
        "number ({gt|ge|lt|le: N}) or \"unknown\".",
        "x-cds-kind": "number",
        "oneOf": [{"$ref": "#/$defs/number"}, {"$ref": "#/$defs/censored"}, {"const": "unknown"}],
    }
    if "unit" in item:
        out["x-cds-unit"] = str(item["unit"])
    return out


def enum_schema(item: dict) -> dict:
    values = [v for v in item["values"] if v != "unknown"] + ["unknown"]
    return {
        "description": item["definition"].strip(),
        "x-cds-kind": "enum",
        "enum": values,
    }


def tri_state_schema(item: dict) -> dict:
    return {
        "description": item["definition"].strip(),
        "x-cds-kind": "tri_state",
        "enum": ["present", "absent", "unknown"],
    }


def prop(item: dict) -> dict:
    return {"number": number_schema, "enum": enum_schema, "tri_state": tri_state_schema}[item["type"]](item)


def main(path: str) -> None:
    voc = yaml.safe_load(open(path, encoding="utf-8"))
    context = {}
    for item in voc["context"]:
        p = prop(item)
        if item["id"] == "region":
            p["enum"] = ["back", "hip", "both"]  # required: decides which red flags apply
        context[item["id"]] = p
    findings = {}
    groups = {}
    for group, items in voc["findings"].items():
        for item in items:
            findings[item["id"]] = prop(item)
            findings[item["id"]]["x-cds-group"] = group
            groups.setdefault(group, []).append(item["id"])
    tx = voc["treatments"]
    modalities = [m["id"] for m in tx["modalities"]]
    sb_items = voc["instruments"]["start_back"]["items"]
    start_back = {}
    for it in sb_items:
        if it["answer"] == "boolean":
            start_back[it["id"]] = {"description": it["content"], "type": ["boolean", "null"]}
        else:
            start_back[it["id"]] = {"description": it["content"], "enum": list(it["options"]) + [None]}
    odi = {
        s["id"]: {"description": f"ODI section {s['number']}: 0 (least) to 5 (most disability); null = unanswered.",
                  "oneOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "null"}]}
        for s in voc["instruments"]["oswestry_disability_index"]["sections"]
    }
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cds.invalid/schemas/patient-facts.schema.json",
        "title": "cds patient facts (one case)",
        "description": "One case for cds: context, findings (tri-state; a missing finding is unknown, never absent), "
        "treatments already tried, STarT Back answers and ODI answers. Concept ids follow the clinical vocabulary "
        f"'{voc['meta']['name']}' version {voc['meta']['version']}. Unknown keys are errors.",
        "x-cds-vocabulary": {"name": voc["meta"]["name"], "version": voc["meta"]["version"]},
        "type": "object",
        "additionalProperties": False,
        "required": ["case_id", "context"],
        "properties": {
            "case_id": {"type": "string", "minLength": 1, "maxLength": 200,
                        "description": "Caller's identifier for the case. The only case data cds ever logs."},
            "context": {"type": "object", "additionalProperties": False, "required": ["region"],
                        "properties": context},
            "findings": {"type": "object", "additionalProperties": False, "properties": findings},
            "unknown_reasons": {
                "type": "object", "description": "Why a finding is unknown (documentation only).",
                "propertyNames": {"enum": sorted(findings)},
                "additionalProperties": {"enum": list(voc["unknown_reasons"])},
            },
            "treatments": {"type": "array", "items": {"$ref": "#/$defs/treatment"}},
            "start_back": {"oneOf": [{"type": "null"}, {"type": "object", "additionalProperties": False,
                                                        "properties": start_back}]},
            "odi": {"oneOf": [{"type": "null"}, {"type": "object", "additionalProperties": False,
                                                 "properties": odi}]},
        },
        "$defs": {
            "number": NUMBER,
            "censored": CENSORED,
            "treatment": {
                "type": "object", "additionalProperties": False, "required": ["step", "outcome"],
                "properties": {
                    "step": {"enum": tx["record_fields"]["step"]["values"]},
                    "modalities": {"type": "array", "items": {"enum": modalities}},
                    "weeks": {"oneOf": [{"type": "number", "minimum": 0, "maximum": 1e9}, {"const": "unknown"}]},
                    "sessions": {"type": "integer", "minimum": 0, "maximum": 1e9},
                    "outcome": {"enum": tx["record_fields"]["outcome"]["values"]},
                    "note": {"type": "string", "maxLength": 2000},
                },
            },
        },
        "x-cds-finding-groups": groups,
    }
    json.dump(schema, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/clinical/vocabulary.yaml")
