from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import cds

# 500 examples per property in CI (the floor); override with HYPOTHESIS_PROFILE=dev locally.
settings.register_profile("ci", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ENGINE = os.environ.get("CDS_TEST_ENGINE", "durable-rules")


@pytest.fixture(scope="session")
def evaluator() -> cds.Evaluator:
    """The shipped ruleset, engine and reference evaluator cross-checked on every case."""
    return cds.Evaluator("back-hip-pain", engine=ENGINE)


@pytest.fixture(scope="session")
def reference() -> cds.Evaluator:
    return cds.Evaluator("back-hip-pain", engine="reference")
