"""The ASGI application (Starlette): discovery, the services, feedback, and the about page.

Routes
------
``GET  /cds-services``                    discovery (JWT required)
``POST /cds-services/{id}``               a hook call -> ``{"cards": [...]}`` (JWT required)
``POST /cds-services/{id}/feedback``      card feedback -> SQLite (JWT required)
``GET  /cds-services/about``              what the cards' ``source.url`` points to: the ruleset and its
                                          sources. Public documentation, no patient data, no JWT.

Status codes: 200; 400 bad request body; 401 authentication failed (JSON ``{"error", "error_description"}``
and ``WWW-Authenticate: Bearer``); 404 unknown service; 412 the patient data is neither prefetched nor
obtainable from ``fhirServer``; 413 body too large; 500 evaluation failed. Error bodies never carry
patient data; logs carry the route, status, timing, service id, hookInstance and client ``iss`` only.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import json
import logging
import re
import time
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

import cds
from cds.errors import CdsError
from cds.fhir.mapping import facts_from_resources, load_code_table
from cds.hooks.auth import Authenticator, AuthError, JwksStore
from cds.hooks.cards import (
    CardContext,
    empty_paths,
    imaging_applies,
    imaging_card,
    lumbar_imaging_orders,
    prune_empty,
    recommendation_cards,
)
from cds.hooks.feedback import FeedbackError, FeedbackStore, parse_feedback
from cds.hooks.fhirclient import FetchError, FhirFetcher
from cds.hooks.services import (
    PREFETCH_TEMPLATES,
    SERVICES,
    PrefetchProblem,
    fill,
    resources_from_prefetch,
    unsatisfied_keys,
)
from cds.hooks.settings import Settings

log = logging.getLogger("cds.hooks")
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LOGGABLE = re.compile(r"[^A-Za-z0-9/_.:\-]")


def _safe(text: Any, limit: int = 120) -> str:
    """A value made safe for a log line: no control characters or spaces (no log injection), bounded."""
    return _LOGGABLE.sub("?", str(text))[:limit]

INSECURE_BANNER = """
############################################################################
#  cds CDS Hooks service running WITHOUT AUTHENTICATION (--insecure-dev-no-auth)
#  Any caller can request decision support and post feedback.
#  For local development only. Never expose this process to a network.
############################################################################"""


class ApiError(Exception):
    def __init__(self, status: int, error: str, description: str, headers: dict[str, str] | None = None):
        super().__init__(description)
        self.status, self.error, self.description, self.headers = status, error, description, headers or {}


def _error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status, headers=headers)


class _State:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.evaluator = cds.Evaluator(settings.ruleset, settings.ruleset_version, engine=settings.engine,
                                       cross_check=settings.cross_check)
        self.auth = Authenticator(settings, JwksStore(settings))
        self.fetcher = FhirFetcher(settings)
        self.feedback = FeedbackStore(settings.feedback_db)
        load_code_table()  # read the FHIR code table now, not during the first hook call
        rs = self.evaluator.ruleset
        self.ruleset = rs
        self.source_label = f"cds back and hip pain triage ({rs.id} {rs.version})"


def _base_url(request: Request, settings: Settings) -> str:
    if settings.base_url:
        return settings.base_url.rstrip("/")
    return f"{request.url.scheme}://{request.url.netloc}{request.scope.get('root_path', '')}".rstrip("/")


def _called_url(request: Request, settings: Settings) -> str:
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return _base_url(request, settings) + path


async def _authenticate(request: Request, state: _State) -> dict[str, Any]:
    if state.settings.insecure_dev_no_auth:
        return {}
    try:
        return await state.auth.authenticate(request.headers.get("authorization"),
                                             _called_url(request, state.settings))
    except AuthError as exc:
        log.warning("authentication failed: %s (%s %s)", exc.reason, request.method, _safe(request.url.path))
        raise ApiError(401, "invalid_token", exc.description,
                       {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'}) \
            from None


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", f"the request body is larger than {limit} bytes")
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_request", "the request body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "invalid_request", "the request body is nested too deeply") from None


def _check_response(payload: dict[str, Any]) -> dict[str, Any]:
    bad = empty_paths(payload.get("cards")) if payload.get("cards") else []
    if bad:
        log.error("response had null or empty values at %s; pruned", ", ".join(bad[:5]))
        payload = {"cards": prune_empty(payload["cards"])}
    return payload


# ----------------------------------------------------------------------------- handlers

def _guarded(handler: Any) -> Any:
    """Unexpected exceptions become a 500 with a fixed message; only the exception type is logged
    (an exception message or traceback could carry patient data)."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except (ApiError, HTTPException):
            raise
        except Exception as exc:  # noqa: BLE001
            log.error("internal error on %s %s: %s", request.method, _safe(request.url.path), type(exc).__name__)
            raise ApiError(500, "internal_error", "internal error; no recommendation") from None

    return wrapper


async def discovery(request: Request) -> Response:
    state: _State = request.app.state.cds
    await _authenticate(request, state)
    return JSONResponse({"services": [s.discovery() for s in SERVICES.values()]})


async def about(request: Request) -> Response:
    state: _State = request.app.state.cds
    rs = state.ruleset
    items = []
    for key, src in sorted(rs.sources.items()):
        cite = html.escape(" ".join(str(src.get("citation", "")).split()))
        url = src.get("url")
        link = f' <a href="{html.escape(url)}">{html.escape(url)}</a>' if isinstance(url, str) and \
            url.startswith("https://") else ""
        items.append(f"<li><b>{html.escape(key)}</b>: {cite}{link}</li>")
    services = "".join(f"<li><code>{html.escape(s.id)}</code> ({html.escape(s.hook)}): "
                       f"{html.escape(s.description)}</li>" for s in SERVICES.values())
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(state.source_label)}</title>"
            f"</head><body><h1>{html.escape(rs.title)}</h1>"
            f"<p>Ruleset <code>{html.escape(rs.id)}</code> version <code>{html.escape(rs.version)}</code>, "
            f"sha256 <code>{html.escape(rs.sha256)}</code>; cds {html.escape(cds.__version__)}.</p>"
            f"<p>Decision support for clinicians: it does not replace clinical judgement. Red flags escalate; "
            f"surgery is the last resort.</p><h2>Services</h2><ul>{services}</ul>"
            f"<h2>Sources</h2><ul>{''.join(items)}</ul></body></html>")
    return HTMLResponse(page)


async def call_service(request: Request) -> Response:
    state: _State = request.app.state.cds
    s = state.settings
    claims = await _authenticate(request, state)
    service = SERVICES.get(request.path_params["service_id"])
    if service is None:
        raise ApiError(404, "not_found", "no CDS service with this id")
    body = await _read_json(request, s.max_body_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the request body must be a JSON object")
    hook_instance = body.get("hookInstance")
    if body.get("hook") != service.hook:
        raise ApiError(400, "invalid_request", f"this service answers the {service.hook} hook")
    if not isinstance(hook_instance, str) or not hook_instance.strip() or len(hook_instance) > 200:
        raise ApiError(400, "invalid_request", "hookInstance must be a string")
    context = body.get("context")
    if not isinstance(context, dict):
        raise ApiError(400, "invalid_request", "context must be an object")
    patient_id = context.get("patientId")
    if not isinstance(patient_id, str) or not _FHIR_ID.match(patient_id):
        raise ApiError(400, "invalid_request", "context.patientId must be a FHIR id")
    encounter_id = context.get("encounterId")
    if not isinstance(encounter_id, str) or not _FHIR_ID.match(encounter_id):
        encounter_id = None
    started = time.monotonic()
    log_id = _safe(hook_instance, 64)
    log.info("hook %s service=%s hookInstance=%s iss=%s", service.hook, service.id, log_id,
             _safe(claims.get("iss", "-")))

    orders: list[tuple[str, str]] = []
    if service.kind == "imaging":
        orders = lumbar_imaging_orders(context.get("draftOrders"), context.get("selections"))
        if not orders:
            return JSONResponse({"cards": []})  # nothing applies: no lumbar spine imaging selected

    prefetch = await _patient_data(body, patient_id, state, claims)
    try:
        resources = resources_from_prefetch(prefetch, patient_id)
    except PrefetchProblem as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None

    reference_date = s.reference_date or dt.datetime.now(dt.UTC).date()

    def evaluate() -> tuple[Any, Any]:
        mapping = facts_from_resources(resources, reference_date=reference_date)
        if not mapping.provenance.get("context.region"):
            return mapping, None  # nothing applies: no active back or hip problem in the record
        return mapping, state.evaluator.evaluate(mapping.case)

    try:
        mapping, rec = await anyio.to_thread.run_sync(evaluate)
    except RecursionError:
        raise ApiError(400, "invalid_request", "a FHIR resource is nested too deeply") from None
    except CdsError as exc:
        log.error("evaluation failed for hookInstance=%s: %s", log_id, type(exc).__name__)
        raise ApiError(500, "evaluation_failed", "cds could not evaluate this patient; no recommendation") from None
    if rec is None:
        log.info("no card: no back or hip problem (hookInstance=%s)", log_id)
        return JSONResponse({"cards": []})
    region = mapping.case.get("context", {}).get("region")
    ctx = CardContext(
        service_id=service.id, hook_instance=hook_instance, patient_id=patient_id, encounter_id=encounter_id,
        source_label=state.source_label, source_url=s.source_url or f"{_base_url(request, s)}/cds-services/about",
        region=region,
        issues=tuple(i.message for i in mapping.issues if i.severity in ("error", "warning")
                     and "region set to 'both'" not in i.message
                     and "another patient" not in i.message))  # never show another patient's id
    if service.kind == "imaging":
        cards = [imaging_card(rec, ctx, orders)] if imaging_applies(rec, region) else []
    else:
        cards = recommendation_cards(rec, ctx)
    payload = _check_response({"cards": cards})
    log.info("hookInstance=%s: %d card(s) in %.0f ms", log_id, len(payload["cards"]),
             (time.monotonic() - started) * 1000)
    return JSONResponse(payload)


async def _patient_data(body: dict[str, Any], patient_id: str, state: _State, claims: dict[str, Any]) -> dict[str, Any]:
    s = state.settings
    prefetch = body.get("prefetch")
    if prefetch is None:
        prefetch = {}
    if not isinstance(prefetch, dict):
        raise ApiError(400, "invalid_request", "prefetch must be an object")
    missing = unsatisfied_keys(prefetch, s.required_prefetch)
    if not missing:
        return prefetch
    server, auth = body.get("fhirServer"), body.get("fhirAuthorization")
    if auth is not None and not server:
        raise ApiError(400, "invalid_request", "fhirAuthorization was given without fhirServer")
    token = auth.get("access_token") if isinstance(auth, dict) else None
    if not isinstance(server, str) or not isinstance(auth, dict) or not isinstance(token, str) or not token:
        raise ApiError(412, "precondition_failed",
                       f"prefetch {', '.join(missing)} missing and no fhirServer with fhirAuthorization to fetch it")
    token_type = auth.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise ApiError(412, "precondition_failed", "fhirAuthorization.token_type must be Bearer")
    server = server.rstrip("/")
    if not (server.startswith("https://") or (s.allow_insecure_http and server.startswith("http://"))):
        raise ApiError(412, "precondition_failed", "fhirServer must be an https URL")
    issuer = s.issuer(claims.get("iss", "")) if claims else None
    if issuer is not None and issuer.fhir_servers and server not in issuer.fhir_servers:
        raise ApiError(412, "precondition_failed", "fhirServer is not allow-listed for this client")
    try:
        fetched = await state.fetcher.fetch(server, token, {k: fill(PREFETCH_TEMPLATES[k], patient_id)
                                                            for k in missing})
    except FetchError as exc:
        log.warning("FHIR server fetch failed: %s", exc)
        raise ApiError(412, "precondition_failed", f"patient data could not be fetched: {exc}") from None
    return {**prefetch, **fetched}


async def feedback(request: Request) -> Response:
    state: _State = request.app.state.cds
    claims = await _authenticate(request, state)
    service_id = request.path_params["service_id"]
    if service_id not in SERVICES:
        raise ApiError(404, "not_found", "no CDS service with this id")
    body = await _read_json(request, min(state.settings.max_body_bytes, 1024 * 1024))
    try:
        rows = parse_feedback(body, max_items=state.settings.max_feedback_items)
    except FeedbackError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None
    tenant = claims.get("tenant") if isinstance(claims.get("tenant"), str) else None
    n = await anyio.to_thread.run_sync(lambda: state.feedback.add(service_id, rows, client_iss=claims.get("iss"),
                                                                  tenant=tenant))
    log.info("feedback service=%s entries=%d iss=%s", service_id, n, _safe(claims.get("iss", "-")))
    return JSONResponse({"stored": n})


# ----------------------------------------------------------------------------- app

async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error(exc.status, exc.error, exc.description, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    names = {404: "not_found", 405: "method_not_allowed"}
    return _error(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail),
                  dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s: %s", request.method, _safe(request.url.path), type(exc).__name__)
    return _error(500, "internal_error", "internal error")


class _AccessLog:
    """Minimal access log: method, path, status, duration. No headers, no bodies, no query strings."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = [0]

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            log.info("%s %s -> %d (%.0f ms)", _safe(scope.get("method")), _safe(scope.get("path")), status[0],
                     (time.monotonic() - started) * 1000)


def create_app(settings: Settings) -> Starlette:
    """The ASGI app for ``settings`` (compiles the ruleset and opens the feedback database now)."""
    state = _State(settings)
    middleware = [Middleware(_AccessLog)]
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    routes = [
        Route("/cds-services", _guarded(discovery), methods=["GET"]),
        Route("/cds-services/about", _guarded(about), methods=["GET"]),
        Route("/cds-services/{service_id}", _guarded(call_service), methods=["POST"]),
        Route("/cds-services/{service_id}/feedback", _guarded(feedback), methods=["POST"]),
    ]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        log.info("cds CDS Hooks service ready: ruleset %s %s, engine %s, %d trusted issuer(s)",
                 state.ruleset.id, state.ruleset.version, settings.engine, len(settings.issuers))
        yield

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.cds = state
    if settings.insecure_dev_no_auth:
        log.warning(INSECURE_BANNER)
    return app
