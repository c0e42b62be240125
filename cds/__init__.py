"""cds: clinician decision support for low back pain and hip pain.

Evaluate structured patient facts against a versioned, cited ruleset and get a care-pathway
step (self-care, physical therapy, medical treatment, surgical referral as the last resort) or,
for a red flag, an escalation with its urgency and referral target::

    import cds
    rec = cds.evaluate({"case_id": "c1", "context": {"region": "back", "age_years": 42},
                        "findings": {"saddle_anesthesia": "present"}})
    rec.urgency, rec.red_flags[0].id   # (Urgency.EMERGENCY, 'cauda_equina_syndrome')
"""

__version__ = "0.1.0"

from cds.errors import CdsError, EngineError, FactsError, Problem, RulesetError  # noqa: E402
from cds.evaluator import Evaluator, evaluate  # noqa: E402
from cds.facts import PatientFacts  # noqa: E402
from cds.pathway import CareStep, Status, Urgency  # noqa: E402
from cds.recommendation import Recommendation  # noqa: E402
from cds.rulesets import load_ruleset  # noqa: E402

__all__ = [
    "CareStep", "CdsError", "EngineError", "Evaluator", "FactsError", "PatientFacts", "Problem",
    "Recommendation", "RulesetError", "Status", "Urgency", "evaluate", "load_ruleset", "__version__",
]
