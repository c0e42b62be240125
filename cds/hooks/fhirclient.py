"""Fetch the prefetch data from the CDS client's FHIR server when it was not prefetched.

Used only when the request carries ``fhirServer`` and ``fhirAuthorization`` (CDS Hooks "FHIR
resource access"). Bounded: a timeout per request, at most ``fhir_max_pages`` pages per query
(``next`` links are followed only on the same server), ``fhir_max_resources`` resources in all and
``fhir_max_response_bytes`` per response; no redirects; the bearer token is sent only to the
fhirServer it came with and is never logged. Any failure raises :class:`FetchError`, which the
service turns into HTTP 412 (it never evaluates partial data).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from cds.hooks.settings import Settings

log = logging.getLogger("cds.hooks")


class FetchError(Exception):
    """The FHIR server could not provide the data (message has no patient data)."""


def _same_server(url: str, base: str) -> bool:
    u, b = urlsplit(url), urlsplit(base)
    return (u.scheme, u.netloc) == (b.scheme, b.netloc) and u.path.startswith(b.path.rstrip("/") + "/")


class FhirFetcher:
    def __init__(self, settings: Settings, client_factory: Callable[[], httpx.AsyncClient] | None = None):
        self.settings = settings
        self._client_factory = client_factory or (lambda: httpx.AsyncClient(
            timeout=httpx.Timeout(settings.fhir_timeout_seconds), follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=8)))

    async def fetch(self, base: str, token: str, queries: Mapping[str, str]) -> dict[str, Any]:
        """{key: resource or searchset Bundle (pages merged) or None} for relative FHIR queries."""
        base = base.rstrip("/")
        budget = [self.settings.fhir_max_resources]
        async with self._client_factory() as client:
            results = await asyncio.gather(*(self._one(client, base, token, q, budget) for q in queries.values()),
                                           return_exceptions=True)
        out: dict[str, Any] = {}
        for key, res in zip(queries, results, strict=True):
            if isinstance(res, FetchError):
                raise res
            if isinstance(res, BaseException):
                log.warning("FHIR fetch for prefetch key %s failed: %s", key, type(res).__name__)
                raise FetchError(f"the FHIR server request for {key!r} failed ({type(res).__name__})")
            out[key] = res
        return out

    async def _get(self, client: httpx.AsyncClient, url: str, token: str) -> Any:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        try:
            async with client.stream("GET", url, headers=headers) as resp:
                if resp.status_code == 404:
                    return None
                if resp.status_code != 200:
                    raise FetchError(f"the FHIR server answered HTTP {resp.status_code}")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.settings.fhir_max_response_bytes:
                    raise FetchError("a FHIR server response is larger than fhir_max_response_bytes")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > self.settings.fhir_max_response_bytes:
                        raise FetchError("a FHIR server response is larger than fhir_max_response_bytes")
        except httpx.TimeoutException:
            raise FetchError("the FHIR server did not answer in time") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"the FHIR server could not be reached ({type(exc).__name__})") from None
        try:
            return json.loads(bytes(body))
        except ValueError:
            raise FetchError("the FHIR server answered with something that is not JSON") from None

    async def _one(self, client: httpx.AsyncClient, base: str, token: str, query: str, budget: list[int]) -> Any:
        data = await self._get(client, f"{base}/{query.lstrip('/')}", token)
        if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
            if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
                raise FetchError("the FHIR server answered with an OperationOutcome")
            return data
        entries = list(data.get("entry") or [])
        pages = 1
        nxt = _next_link(data)
        while nxt:
            if pages >= self.settings.fhir_max_pages:
                raise FetchError("more pages than fhir_max_pages; not evaluating partial data")
            if not _same_server(nxt, base):
                raise FetchError("a next link points outside the fhirServer; not followed")
            page = await self._get(client, nxt, token)
            if not isinstance(page, dict) or page.get("resourceType") != "Bundle":
                raise FetchError("a next page is not a Bundle")
            entries.extend(page.get("entry") or [])
            pages += 1
            if len(entries) > budget[0]:
                break
            nxt = _next_link(page)
        budget[0] -= len(entries)
        if budget[0] < 0:
            raise FetchError("more resources than fhir_max_resources; not evaluating partial data")
        return {"resourceType": "Bundle", "type": "searchset", "entry": entries}


def _next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, Mapping) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None
