"""FHIR R4 -> cds case facts adapter.

Pure Python (standard library, PyYAML, attrs). Map a patient's FHIR R4 resources to a case file
that follows ``schemas/patient-facts.schema.json``::

    import datetime, json
    from cds.fhir import facts_from_bundle, explain

    bundle = json.load(open("patient-bundle.json"))
    m = facts_from_bundle(bundle, reference_date=datetime.date(2024, 5, 1))
    m.case          # the case dict (valid against the schema)
    m.provenance    # "findings.history_of_cancer" -> ["Condition/abc"]
    m.issues        # bad data found on the way (never fatal)
    print(explain(m))

The code table is ``codes.yaml`` in this package; see ``cds/fhir/mapping.py`` for the rules
(absent codes stay unknown, clinicalStatus handling, the STarT Back conventions).
"""

from cds.fhir.mapping import (
    FhirMapping,
    MappingIssue,
    explain,
    facts_from_bundle,
    facts_from_resources,
    iter_patients_ndjson,
    load_code_table,
)

__all__ = [
    "FhirMapping",
    "MappingIssue",
    "explain",
    "facts_from_bundle",
    "facts_from_resources",
    "iter_patients_ndjson",
    "load_code_table",
]
