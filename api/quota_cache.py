"""The set of flagged projects, held in memory by every API process and trusted only while provably fresh.

The quota check runs before every write of the product, so it is answered from memory. Memory must
not become a cache that can lag unboundedly, so the set follows PostgreSQL and says how fresh it is:

* Start: ``LISTEN quota_flags``, then read every flagged project. A change committed after the LISTEN
  arrives as a notification; one committed before it is in the read.
* Changes: triggers on ``quota_flags`` (sql/0016) notify, in the writer's transaction, the projects a
  statement added or removed flags for. A notified project is *dirty*: its checks are answered by a
  database read (api/quota.py) until the cache has read that project again.
* Freshness: every ``ping_every`` seconds the listener notifies the channel itself (``ping:token:n``)
  and remembers when it sent that ping. PostgreSQL delivers notifications in commit order, so when the
  ping comes back, every change committed before it was sent has been received (and its projects are
  dirty or read again). The cache answers only while its newest returned ping was sent less than
  ``QUOTA_CACHE_MAX_AGE_SECONDS`` ago; otherwise (a stalled event loop, a lost connection, PostgreSQL down) every check
  falls back to a read, and a reconnect starts over.

So an answer from memory reflects every flag committed at least ``QUOTA_CACHE_MAX_AGE_SECONDS`` before it. An operator's
block waits that long after its commit before it is acknowledged (billing/orchestration/temporal.py),
so "acknowledged means enforced" holds with the cache; in practice a change is enforced as soon as its
notification arrives, a few milliseconds after the commit (bench.quota measures it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

import psycopg

from billing.core.config import QUOTA_CACHE_MAX_AGE_SECONDS
from billing.db.sql import query

log = logging.getLogger(__name__)

PING_EVERY_SECONDS = 0.1
RECONNECT_SECONDS = 1.0
# How the listener shows in pg_stat_activity.
APPLICATION_NAME = "billing-api-quota-flags"


class QuotaFlagCache:
    """Flagged projects in memory, following ``quota_flags`` over one LISTEN connection of its own."""

    def __init__(
        self,
        conninfo: str,
        *,
        ping_every: float = PING_EVERY_SECONDS,
    ) -> None:
        # No max_age parameter: operator_update waits QUOTA_CACHE_MAX_AGE_SECONDS, so a cache trusting
        # older memory would break "acknowledged means enforced".
        self._conninfo = conninfo
        self._ping_every = ping_every
        self._token = uuid.uuid4().hex
        self._flagged: set[str] = set()
        self._dirty: set[str] = set()
        self._pings_sent: dict[int, float] = {}
        self._next_ping = 0
        # The send time (monotonic) of the newest ping that came back; -inf: nothing is trusted.
        self._fresh_as_of = -math.inf
        self._failing = False

    def answer(self, project_id: str) -> bool | None:
        """Whether the project is flagged, or None when memory cannot tell (read the database instead)."""
        if not self.fresh or project_id in self._dirty:
            return None
        return project_id in self._flagged

    @property
    def fresh(self) -> bool:
        """Whether answers come from memory right now."""
        return time.monotonic() - self._fresh_as_of <= QUOTA_CACHE_MAX_AGE_SECONDS

    async def run(self) -> None:
        """Follow ``quota_flags`` until cancelled, reconnecting after any failure (reads meanwhile)."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                self._distrust()
                raise
            except Exception as exc:
                self._distrust()
                if not self._failing:
                    log.warning(
                        "quota flag cache lost PostgreSQL (%s); quota checks read the database until it"
                        " reconnects",
                        str(exc).strip() or type(exc).__name__,
                    )
                self._failing = True
            await asyncio.sleep(RECONNECT_SECONDS)

    def _distrust(self) -> None:
        self._fresh_as_of = -math.inf
        self._pings_sent.clear()

    async def _follow(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=10, application_name=APPLICATION_NAME
        ) as conn:
            await conn.execute(query("quota_flags_listen"))
            rows = await (await conn.execute(query("all_flagged_projects"))).fetchall()
            # The read covers everything committed before it, marks of an earlier connection included;
            # what committed after the LISTEN waits in the connection's backlog and is marked below.
            self._flagged = {row[0] for row in rows}
            self._dirty.clear()
            while True:
                async for note in conn.notifies(timeout=self._ping_every):
                    self._receive(note.payload)
                if self._dirty:
                    await self._read_again(conn)
                if self._failing and self.fresh:
                    self._failing = False
                    log.info("quota flag cache follows PostgreSQL again; quota checks answered from memory")
                ping = self._next_ping
                self._next_ping += 1
                self._pings_sent[ping] = time.monotonic()
                await conn.execute(query("quota_flags_ping"), {"payload": f"ping:{self._token}:{ping}"})

    def _receive(self, payload: str) -> None:
        if payload.startswith("ping:"):
            _, token, number = payload.split(":", 2)
            if token == self._token:
                sent = self._pings_sent.pop(int(number), None)
                if sent is not None and sent > self._fresh_as_of:
                    self._fresh_as_of = sent
        elif payload == "*":
            # A TRUNCATE removed every flag: every project memory holds as flagged is read again.
            self._dirty |= self._flagged
        else:
            self._dirty.update(payload.split(","))

    async def _read_again(self, conn: psycopg.AsyncConnection) -> None:
        # No notification is handled during this read (they wait in the backlog), so the dirty set is
        # the same before and after it; the read began after each of their notifications arrived.
        projects = list(self._dirty)
        cursor = await conn.execute(query("projects_flagged"), {"project_ids": projects})
        flagged = {row[0] for row in await cursor.fetchall()}
        self._flagged.difference_update(projects)
        self._flagged |= flagged
        self._dirty.clear()
