"""The quota check: answered from memory while memory is provably fresh, else from a shared read.

A well-formed check (``QuotaFastPath``) is answered from the process's flag cache (api/quota_cache.py)
when the cache holds every flag committed at least ``QUOTA_CACHE_MAX_AGE_SECONDS`` ago and the project
has no change in flight; in practice a commit is enforced within milliseconds, once its notification
arrives. Otherwise (the cache stale, reconnecting or not running, a project just changed, and the
framework's own route) the answer comes from a read of ``quota_flags`` that *began after the request
arrived*: a request joins the next read, never one already running (that one may have started before
the request, and so before a flag it should see was committed).

The reads are shared: at 32 concurrent checks one statement (one pool checkout, one round trip,
prepared after a few runs) answers all the checks that arrived in one turn of the event loop, instead
of one statement each.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from urllib.parse import parse_qsl

from opentelemetry import trace
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from api.quota_cache import QuotaFlagCache
from billing.db.sql import query
from billing.domain.ids import canonical_uuid
from billing.observability.telemetry import HTTP_LATENCY, HTTP_REQUESTS, QUOTA_CHECK_SOURCES, tracer_provider

# Writes the product's gateway asks about: they consume quota, so a flagged project is refused.
_QUOTA_WRITES = re.compile(r"^/api/v1/(session/[^/]+/messages|disk/[^/]+/artifact)/?$")


def quota_consuming(method: str, path: str) -> bool:
    """Whether the gateway's request (``method`` on ``path``) consumes quota, so a flag refuses it."""
    return method.upper() == "POST" and _QUOTA_WRITES.match(path) is not None


class FlagLookup:
    """Coalesces concurrent ``flagged(project_id)`` calls into few ``projects_flagged`` statements.

    The checks that arrive in one turn of the event loop share one read, started on the next turn;
    up to ``max_reads`` reads run at once (a check's wait is a database round trip, not CPU, so
    one read at a time would cap the rate at batch size over round-trip time).
    """

    def __init__(self, pool: AsyncConnectionPool, *, max_reads: int = 2) -> None:
        self._pool = pool
        self._max_reads = max_reads
        self._waiting: dict[str, list[asyncio.Future[bool]]] = {}
        self._reads: set[asyncio.Task[None]] = set()
        self._scheduled = False

    async def flagged(self, project_id: str) -> bool:
        """Whether any meter of the project is flagged, read after this call began."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(project_id, []).append(future)
        self._kick()
        return await future

    def _kick(self) -> None:
        # A read for the waiting checks on the next loop turn, if a read may start.
        if self._waiting and not self._scheduled and len(self._reads) < self._max_reads:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._waiting or len(self._reads) >= self._max_reads:
            return
        # Only checks already waiting join: every one of them arrived before this read begins.
        batch, self._waiting = self._waiting, {}
        task = asyncio.get_running_loop().create_task(self._answer(batch))
        self._reads.add(task)
        task.add_done_callback(self._read_done)

    def _read_done(self, task: asyncio.Task[None]) -> None:
        self._reads.discard(task)
        self._kick()

    async def _read(self, project_ids: list[str]) -> set[str]:
        """Those of ``project_ids`` that are flagged: one statement, one round trip."""
        async with self._pool.connection() as conn:
            # Autocommit for this one statement: otherwise it opens a transaction that handing the
            # connection back must commit, a second round trip. Switching it while the connection is
            # idle costs no round trip; it is switched back before the pool gets the connection.
            await conn.set_autocommit(True)
            try:
                rows = await (
                    await conn.execute(query("projects_flagged"), {"project_ids": project_ids})
                ).fetchall()
            finally:
                await conn.set_autocommit(False)
        return {row["project_id"] for row in rows}

    async def _answer(self, batch: dict[str, list[asyncio.Future[bool]]]) -> None:
        try:
            flagged = await self._read(list(batch))
        except Exception as exc:
            # Every check of this read gets the failure (the API answers it down the normal
            # stack); later checks get a fresh read.
            for futures in batch.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        except BaseException:
            for futures in batch.values():
                for future in futures:
                    future.cancel()
            raise
        for project_id, futures in batch.items():
            for future in futures:
                if not future.done():
                    future.set_result(project_id in flagged)


def flag_lookup(app: Starlette) -> FlagLookup:
    """The app's lookup, made on first use (inside the serving event loop)."""
    lookup: FlagLookup | None = getattr(app.state, "flag_lookup", None)
    if lookup is None:
        lookup = FlagLookup(app.state.pool)
        app.state.flag_lookup = lookup
    return lookup


_PREFIX = "/v1/projects/"
_SUFFIX = "/quota"
_ROUTE = "/v1/projects/{project_id}/quota"
_SPAN_NAME = f"GET {_ROUTE}"
_ANSWERS = {200: b'{"msg":"ok"}', 403: b'{"msg":"quota exceeded"}'}
_HEADERS = {
    status: [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for status, body in _ANSWERS.items()
}


async def _respond(send: Send, status: int) -> None:
    """The check's answer, from prepared bytes."""
    await send({"type": "http.response.start", "status": status, "headers": _HEADERS[status]})
    await send({"type": "http.response.body", "body": _ANSWERS[status]})


class QuotaFastPath:
    """ASGI middleware answering the gateway's well-formed quota checks without the framework.

    The check runs before every write of the product, so its cost is the framework's: routing every
    route twice (telemetry's template lookup, then the router), a Request, query-string and response
    objects. Here a well-formed check (``GET``, a canonical UUID, the right bearer token) is answered
    straight from the shared flag read with prepared bytes, keeping its telemetry: the same span name
    and attributes (``authenticated=true``) and the same Prometheus counts as TelemetryMiddleware.
    Anything else (wrong token, malformed id, a database error) goes down the normal stack unchanged,
    which answers it as before (401 with ``authenticated=false``, 400, 503...).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._token: bytes | None = None
        self._counted: dict[int, object] = {}
        self._latency = HTTP_LATENCY.labels("GET", _ROUTE)
        self._from_memory = QUOTA_CHECK_SOURCES.labels("memory")
        self._reads = QUOTA_CHECK_SOURCES.labels("read")
        # The process's provider and its SDK tracer, looked up once (a lookup per request costs more
        # than the span); exporters added to that provider later still see these spans.
        self._provider = tracer_provider()
        self._tracer = self._provider.get_tracer("billing")

    def _authorized(self, scope: Scope) -> bool:
        if self._token is None:
            self._token = b"Bearer " + scope["app"].state.api_token.encode()
        for name, value in scope["headers"]:
            if name == b"authorization":
                # Constant time, as require_bearer; scheme and spacing variants take the slow path.
                return hmac.compare_digest(value, self._token)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if not (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and path.startswith(_PREFIX)
            and path.endswith(_SUFFIX)
            and self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        raw_id = path[len(_PREFIX) : -len(_SUFFIX)]
        try:
            project_id = canonical_uuid(raw_id)
        except ValueError:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        started_ns = time.time_ns()
        params = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        status = 200
        if quota_consuming(params.get("method", "GET"), params.get("path", "")):
            cache: QuotaFlagCache | None = scope["app"].state.flag_cache
            flagged = cache.answer(project_id) if cache is not None else None
            try:
                if flagged is None:
                    flagged = await flag_lookup(scope["app"]).flagged(project_id)
                    self._reads.inc()
                else:
                    self._from_memory.inc()
            except Exception:
                # The normal stack reads again and answers the failure in the API's shape (and
                # records the request's one span).
                await self.app(scope, receive, send)
                return
            status = 403 if flagged else 200
        if getattr(self._provider, "has_processors", True):
            # The span is made once the answer is known (backdated to the request's start), in one
            # call with its attributes and without becoming the current span (nothing runs inside
            # it): the cheapest way the SDK records one. A failed read gets the framework's span
            # instead, so every request has exactly one. With no processor (no exporter) to receive
            # it, none is made: the SDK would build it anyway, at the cost of the rest of the check.
            span = self._tracer.start_span(
                _SPAN_NAME,
                kind=trace.SpanKind.SERVER,
                start_time=started_ns,
                attributes={
                    "http.request.method": "GET",
                    "http.route": _ROUTE,
                    "authenticated": True,
                    "http.response.status_code": status,
                },
            )
            try:
                await _respond(send, status)
            finally:
                span.end()
        else:
            await _respond(send, status)
        counter = self._counted.get(status)
        if counter is None:
            counter = self._counted[status] = HTTP_REQUESTS.labels("GET", _ROUTE, str(status))
        counter.inc()  # type: ignore[attr-defined]
        self._latency.observe(time.perf_counter() - started)
