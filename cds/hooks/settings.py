"""Configuration of the CDS Hooks service: a TOML or JSON file, or keyword arguments.

Standard library only. Every limit has a safe default; the only thing a deployment must give is
who it trusts (``issuers``) - or, for local development only, ``insecure_dev_no_auth = true``.

Example (TOML)::

    base_url = "https://cds.example.org"        # public URL of this service; JWT aud = base_url + path
    engine = "durable-rules"
    feedback_db = "/var/lib/cds/feedback.sqlite"

    [[issuers]]
    iss = "https://ehr.example.org"
    jwks_file = "ehr-jwks.json"                  # JWK Set agreed out of band (relative to this file)
    jku = ["https://ehr.example.org/.well-known/jwks.json"]   # allow-listed JWK Set URLs
    sub = ["cds-client-42"]                      # optional allow-list of the JWT sub claim
    fhir_servers = ["https://ehr.example.org/fhir"]           # optional allow-list of fhirServer bases
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

#: Asymmetric JWS algorithms that may be enabled. ``none`` and every HMAC (HS*) algorithm are refused
#: by the CDS Hooks specification and can never be configured.
ALLOWED_ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
DEFAULT_ALGORITHMS = ("ES384", "RS384")
PREFETCH_KEYS = ("patient", "conditions", "observations", "medications", "procedures", "questionnaireResponses")
ENGINES = ("durable-rules", "reference")


class SettingsError(ValueError):
    """The configuration is invalid; the message says which key and why."""


def _tuple_of_str(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SettingsError(f"{key} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _url(value: str, key: str, *, allow_http: bool) -> str:
    if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", value):
        raise SettingsError(f"{key}: {value!r} is not an absolute http(s) URL without query or fragment")
    if value.startswith("http://") and not allow_http:
        raise SettingsError(f"{key}: {value!r} is not https (set allow_insecure_http = true for local testing only)")
    return value


@dataclasses.dataclass(frozen=True)
class IssuerConfig:
    """One trusted CDS client (EHR): its ``iss`` and where its public keys are."""

    iss: str
    jwks_file: str | None = None
    jku: tuple[str, ...] = ()
    sub: tuple[str, ...] = ()
    fhir_servers: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: str | None, allow_http: bool,
                     where: str) -> IssuerConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        iss = data.get("iss")
        if not isinstance(iss, str) or not iss.strip():
            raise SettingsError(f"{where}.iss must be a non-empty string")
        jwks_file = data.get("jwks_file")
        if jwks_file is not None:
            if not isinstance(jwks_file, str) or not jwks_file.strip():
                raise SettingsError(f"{where}.jwks_file must be a path")
            if base_dir and not os.path.isabs(jwks_file):
                jwks_file = os.path.join(base_dir, jwks_file)
        jku = tuple(_url(u, f"{where}.jku", allow_http=allow_http)
                    for u in _tuple_of_str(data.get("jku"), f"{where}.jku"))
        servers = tuple(_url(u, f"{where}.fhir_servers", allow_http=allow_http).rstrip("/")
                        for u in _tuple_of_str(data.get("fhir_servers"), f"{where}.fhir_servers"))
        if not jwks_file and not jku:
            raise SettingsError(f"{where}: give jwks_file and/or jku (where the issuer's public keys are)")
        return cls(iss=iss.strip(), jwks_file=jwks_file, jku=jku, sub=_tuple_of_str(data.get("sub"), f"{where}.sub"),
                   fhir_servers=servers)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Service configuration. All sizes are bytes, all durations seconds."""

    #: Public base URL of this service (scheme, host, port and any path prefix before /cds-services).
    #: The JWT ``aud`` must equal base_url + the path called. None: taken from the request (Host header).
    base_url: str | None = None
    issuers: tuple[IssuerConfig, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: int = 30
    max_token_lifetime_seconds: int = 3600
    max_token_bytes: int = 8192
    max_body_bytes: int = 5 * 1024 * 1024
    jti_cache_size: int = 100_000
    jwks_cache_seconds: int = 300
    jwks_max_bytes: int = 65536
    #: Development only: no Authorization header needed. Logged loudly at start-up.
    insecure_dev_no_auth: bool = False
    #: Allow http:// (not https) fhirServer and jku URLs: loopback testing only.
    allow_insecure_http: bool = False
    ruleset: str = "back-hip-pain"
    ruleset_version: str | None = None
    engine: str = "durable-rules"
    cross_check: bool = True
    feedback_db: str = "cds-hooks-feedback.sqlite"
    fhir_timeout_seconds: float = 5.0
    fhir_max_pages: int = 20
    fhir_max_resources: int = 20_000
    fhir_max_response_bytes: int = 32 * 1024 * 1024
    #: The prefetch keys that must be satisfied (by prefetch or by the FHIR server) before evaluating.
    required_prefetch: tuple[str, ...] = PREFETCH_KEYS
    #: "Today" for the FHIR mapping; None = the current UTC date at each request (tests pin it).
    reference_date: dt.date | None = None
    #: card.source.url; None = <base>/cds-services/about (served by this app, no patient data).
    source_url: str | None = None
    #: Browser-based CDS clients (e.g. the CDS Hooks sandbox): allowed CORS origins. Empty = no CORS.
    cors_origins: tuple[str, ...] = ()
    max_feedback_items: int = 100

    def __post_init__(self) -> None:
        if self.base_url is not None:
            _url(self.base_url, "base_url", allow_http=True)
        bad = [a for a in self.algorithms if a not in ALLOWED_ALGORITHMS]
        if bad or not self.algorithms:
            raise SettingsError(f"algorithms: {', '.join(bad) or '(none)'} not allowed; choose from "
                                f"{', '.join(sorted(ALLOWED_ALGORITHMS))} (none and HMAC are refused by CDS Hooks)")
        if self.engine not in ENGINES:
            raise SettingsError(f"engine must be one of {', '.join(ENGINES)}")
        for name in ("leeway_seconds", "max_token_lifetime_seconds", "max_token_bytes", "max_body_bytes",
                     "jti_cache_size", "jwks_cache_seconds", "jwks_max_bytes", "fhir_max_pages", "fhir_max_resources",
                     "fhir_max_response_bytes", "max_feedback_items"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "leeway_seconds" else 1):
                raise SettingsError(f"{name} must be a positive integer")
        if self.leeway_seconds > 300:
            raise SettingsError("leeway_seconds must be at most 300")
        if not isinstance(self.fhir_timeout_seconds, (int, float)) or not 0 < self.fhir_timeout_seconds <= 120:
            raise SettingsError("fhir_timeout_seconds must be a number in (0, 120]")
        unknown = [k for k in self.required_prefetch if k not in PREFETCH_KEYS]
        if unknown:
            raise SettingsError(f"required_prefetch: unknown key(s) {', '.join(unknown)}; known: "
                                f"{', '.join(PREFETCH_KEYS)}")
        if "patient" not in self.required_prefetch or "conditions" not in self.required_prefetch:
            raise SettingsError("required_prefetch must include patient and conditions")
        seen = set()
        for issuer in self.issuers:
            if issuer.iss in seen:
                raise SettingsError(f"issuer {issuer.iss!r} is configured twice")
            seen.add(issuer.iss)
        if not self.issuers and not self.insecure_dev_no_auth:
            raise SettingsError("no trusted issuers: configure [[issuers]] (iss + jwks_file/jku), or run with "
                                "--insecure-dev-no-auth for local development only")

    def issuer(self, iss: str) -> IssuerConfig | None:
        for i in self.issuers:
            if i.iss == iss:
                return i
        return None

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base_dir: str | None = None, **overrides: Any) -> Settings:
        data = {**dict(data), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        allow_http = bool(data.get("allow_insecure_http", False))
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "issuers":
                if isinstance(value, Mapping):  # {"https://iss": {...}} form
                    value = [{"iss": k, **v} for k, v in value.items()]
                if not isinstance(value, Sequence) or isinstance(value, str):
                    raise SettingsError("issuers must be a list of tables/objects")
                kwargs[key] = tuple(v if isinstance(v, IssuerConfig) else IssuerConfig.from_mapping(
                    v, base_dir=base_dir, allow_http=allow_http, where=f"issuers[{i}]") for i, v in enumerate(value))
            elif key in ("algorithms", "required_prefetch", "cors_origins"):
                kwargs[key] = _tuple_of_str(value, key)
            elif key == "reference_date" and isinstance(value, str):
                try:
                    kwargs[key] = dt.date.fromisoformat(value)
                except ValueError:
                    raise SettingsError("reference_date must be YYYY-MM-DD") from None
            elif key == "feedback_db" and isinstance(value, str) and base_dir and value != ":memory:" \
                    and not os.path.isabs(value):
                kwargs[key] = os.path.join(base_dir, value)
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SettingsError(str(exc)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> Settings:
        path = os.fspath(path)
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise SettingsError(f"cannot read {path!r}: {exc.strerror}") from None
        try:
            if path.endswith(".toml"):
                import tomllib

                data = tomllib.loads(raw.decode("utf-8"))
            else:
                data = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {exc}") from None
        if not isinstance(data, Mapping):
            raise SettingsError(f"{path}: the top level must be a table/object")
        return cls.from_mapping(data, base_dir=os.path.dirname(os.path.abspath(path)), **overrides)
