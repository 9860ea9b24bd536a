"""A small Stripe-compatible HTTP server for the test suite.

``FakeStripe`` runs a real HTTP server (stdlib ``ThreadingHTTPServer``) on ``127.0.0.1`` in a background
thread and answers the handful of Stripe v1 endpoints the billing orchestrator uses, with Stripe's
request encoding, error bodies, status codes and idempotency semantics.

Pointing stripe-python 16 at it (the production code does the same with the real base URL)::

    client = stripe.StripeClient(
        "sk_test_123",
        base_addresses={"api": fake.url},   # every /v1 call goes to the fake
        max_network_retries=0,              # no hidden retries: each call is exactly one HTTP request
    )
    client.v1.billing.meter_events.create({...}, {"idempotency_key": "..."})

Notes on stripe-python 16.1.0 that matter here:

* ``base_addresses={"api": ...}`` is the only knob needed: the v1 meter-event, meter, subscription,
  product and customer services all use the ``"api"`` base address. (``"meter_events"`` is only used by
  the v2 high-throughput stream, which the fake does not implement.)
* ``StripeClient(max_network_retries=None)`` (the default) means *zero* retries in 16.1.0 -- the global
  ``stripe.max_network_retries = 2`` only applies to the legacy global-config API. Pass
  ``max_network_retries=0`` explicitly anyway so a library upgrade cannot silently add retries. When
  retries are enabled, stripe-python retries connection errors, 409 and >=500 (honouring
  ``Stripe-Should-Retry``), reusing the same ``Idempotency-Key``.
* stripe-python adds a random ``Idempotency-Key`` to *every* POST unless one is given in
  ``options={"idempotency_key": ...}``, so two separate ``create`` calls never share a key by accident.
* The default sync HTTP client is ``requests`` with an 80 s timeout; pass
  ``http_client=stripe.RequestsClient(timeout=...)`` for a shorter one.

Exceptions stripe-python raises for the fake's answers: 400/404 -> ``stripe.InvalidRequestError``
(``IdempotencyError`` when ``type == "idempotency_error"``), 401 -> ``stripe.AuthenticationError``,
429 -> ``stripe.RateLimitError``, 409 and 5xx -> ``stripe.APIError``, dropped connection or timeout ->
``stripe.APIConnectionError``.

Strict where this project depends on Stripe's behaviour:

* **Idempotency**: the first result for an ``Idempotency-Key`` is stored and replayed for every retry
  with that key, errors included (a 500 from :meth:`fail_next` too: the endpoint "started executing").
  Not stored, as at Stripe: authentication failures (401/403), rate limiting (429), parameter validation
  failures and a 409 for a key in use. Stored results expire after ``idempotency_ttl`` seconds (24 h, as
  Stripe) of the fake's clock, which :meth:`advance` moves.
* **Key in use**: a second request with a key whose first request is still executing gets Stripe's 409
  ``idempotency_key_in_use`` (use :meth:`slow_next` and :meth:`wait_in_flight` to force it).
* **Identifiers**: a meter event identifier is deduplicated for ``identifier_ttl`` seconds (Stripe: "at
  least 24 hours"); after that the same identifier is counted again, as Stripe may.
* **Keys**: a key other than the accepted one gets 401 (:meth:`set_api_key` rotates it); a key named in
  :meth:`forbid_key` gets 403 (a restricted key without the permission).
* **Meters**: :meth:`deactivate_meter` / :meth:`remove_meter` make Stripe refuse events for that name.
* **Summaries lag** when asked to (:meth:`set_summary_lag`): an event is in the meter event summaries only
  that many seconds (fake clock) after it was received.
* **Webhooks** can be signed with several ``v1`` signatures (:func:`sign_payload` with a list of secrets,
  as during a secret rotation), and :meth:`meter_error_notification` builds Stripe's thin (v2) meter error
  event notifications, whose full event is served at ``GET /v2/core/events/{id}``.

Still kinder than Stripe: meter events are aggregated synchronously unless a lag is set (Stripe's summaries
always lag by minutes); Stripe also reports some meter event errors only asynchronously (the fake refuses
them synchronously and the tests send the error notification themselves); one lock serialises the
handlers (only the key-in-use window is concurrent); no rate limiting unless injected; only the parameters
listed per endpoint are modelled, anything else is rejected with ``parameter_unknown`` so a test cannot
pass while the fake silently ignores a parameter.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

DEFAULT_METERS: tuple[str, ...] = (
    "agent_tasks",
    "skill_blocks",
    "fast_skill_search",
    "agentic_skill_search",
    "storage_gb_hour",
)

# Stripe's documented window for meter event timestamps.
METER_EVENT_MAX_AGE_SECONDS = 35 * 24 * 3600
METER_EVENT_MAX_FUTURE_SECONDS = 5 * 60
IDENTIFIER_MAX_LENGTH = 100

_CANCELED_STATUSES = frozenset({"canceled", "incomplete_expired"})


def sign_payload(payload: bytes | str, secret: str | Sequence[str], timestamp: int | None = None) -> str:
    """Return a ``Stripe-Signature`` header value for ``payload``, computed exactly as Stripe does.

    The signature is ``HMAC-SHA256(secret, f"{t}.{payload}")`` in hex, sent as ``t=<t>,v1=<hex>``.
    Several secrets give several ``v1`` signatures in one header, as Stripe sends while an endpoint's
    secret is being rolled. ``timestamp`` defaults to now; pass an old one to test the tolerance check.
    """
    t = int(time.time()) if timestamp is None else int(timestamp)
    body = payload.encode("utf-8") if isinstance(payload, str) else payload
    secrets_ = [secret] if isinstance(secret, str) else list(secret)
    macs = [
        hmac.new(s.encode("utf-8"), f"{t}.".encode() + body, hashlib.sha256).hexdigest() for s in secrets_
    ]
    return ",".join([f"t={t}", *(f"v1={mac}" for mac in macs)])


def decode_form(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Decode Stripe's bracket notation (``a[b][0][c]=v``) into nested dicts and lists.

    Dicts whose keys are all decimal indexes become lists, as stripe-python encodes lists that way.
    """
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        head, _, rest = raw_key.partition("[")
        parts = [head] + (re.findall(r"([^\[\]]*)\]", "[" + rest) if rest else [])
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":  # "a[]=x" appends; give it the next free index
                part = str(len(node))
            if last:
                node[part] = value
            else:
                nxt = node.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    node[part] = nxt
                node = nxt
    return _listify(root)


def _listify(obj: Any) -> Any:
    if isinstance(obj, dict):
        converted = {k: _listify(v) for k, v in obj.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return obj


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _number(value: Decimal) -> int | float:
    # Keep integral sums as ints so JSON and assertions stay exact.
    return int(value) if value == value.to_integral_value() else float(value)


class StripeError(Exception):
    """An error answered with Stripe's JSON error body. Raised inside route handlers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        store: bool = True,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": {"type": type, "message": message}}
        if code is not None:
            self.body["error"]["code"] = code
        if param is not None:
            self.body["error"]["param"] = param
        self.headers = headers or {}
        # Stripe saves an idempotent result only once the endpoint started executing; parameter
        # validation failures are not saved, so a corrected retry with the same key may succeed.
        self.store = store


def _missing(param: str) -> StripeError:
    return StripeError(
        400, f"Missing required param: {param}.", code="parameter_missing", param=param, store=False
    )


def _unknown(param: str) -> StripeError:
    return StripeError(
        400,
        f"Received unknown parameter: {param} (FakeStripe does not model it)",
        code="parameter_unknown",
        param=param,
        store=False,
    )


def _no_such(kind: str, obj_id: str, *, status: int = 404, param: str = "id") -> StripeError:
    return StripeError(status, f"No such {kind}: '{obj_id}'", code="resource_missing", param=param)


def _key_in_use(key: str) -> StripeError:
    return StripeError(
        409,
        f"There is currently another in-progress request using this Stripe token (idempotency key {key}). "
        "Please try again later.",
        type="idempotency_error",
        code="idempotency_key_in_use",
        store=False,
    )


def _check_params(params: dict[str, Any], allowed: set[str]) -> None:
    for key in params:
        if key not in allowed:
            raise _unknown(key)


def _int_param(params: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        if required:
            raise _missing(name)
        return None
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise StripeError(400, f"Invalid integer: {raw}", param=name, store=False) from None


@dataclass
class RecordedRequest:
    """One HTTP request as the fake received it, and what it did with it."""

    method: str
    path: str
    query: dict[str, Any]
    params: dict[str, Any]
    headers: dict[str, str]  # lower-cased names
    idempotency_key: str | None
    status: int | None = None  # None while in flight or when the connection was dropped
    fault: str | None = None  # "fail", "slow", "drop" when an injected fault applied
    replayed: bool = False


@dataclass
class _Fault:
    kind: str
    remaining: int
    path_prefix: str | None
    status: int = 500
    seconds: float = 0.0
    retry_after: int | None = None
    skip: int = 0  # matching requests to let through untouched before the fault applies
    store: bool = False  # whether the answer is stored under the request's Idempotency-Key

    def matches(self, path: str) -> bool:
        return self.remaining > 0 and (self.path_prefix is None or path.startswith(self.path_prefix))


@dataclass
class _IdempotencyEntry:
    method: str
    path: str
    params: dict[str, Any]
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stored_at: float = 0.0


@dataclass
class _Response:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    store: bool = True


_Route = Callable[[re.Match[str], dict[str, Any]], _Response]


class FakeStripe:
    """In-memory Stripe v1 subset served over real HTTP; see the module docstring for usage."""

    def __init__(
        self,
        meters: Iterable[str] = DEFAULT_METERS,
        api_key: str | None = None,
        *,
        idempotency_ttl: float = 24 * 3600,
        identifier_ttl: float = 24 * 3600,
    ) -> None:
        """Configure the fake; ``meters`` are event names, ``api_key`` (if set) is the only key accepted.

        Without ``api_key`` any ``sk_...``/``rk_...`` bearer token is accepted. ``idempotency_ttl`` and
        ``identifier_ttl`` are how long (fake clock seconds) a key's result and an identifier are kept.
        """
        self.idempotency_ttl = idempotency_ttl
        self.identifier_ttl = identifier_ttl
        # The fake's clock is the wall clock plus this offset; advance() moves it.
        self._offset = 0.0
        self._summary_lag = 0.0
        self._forbidden: dict[str, str | None] = {}
        self._keys_in_use: set[tuple[str, str]] = set()
        self._v2_events: dict[str, dict[str, Any]] = {}
        # One lock guards all state: handlers run serially, which keeps the semantics (dedup,
        # idempotency) trivially atomic; throughput is irrelevant for tests.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._api_key = api_key
        self._meters: dict[str, dict[str, Any]] = {}
        self._customers: dict[str, dict[str, Any]] = {}
        self._products: dict[str, dict[str, Any]] = {}
        self._subscriptions: dict[str, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._identifiers: dict[str, float] = {}  # identifier -> when it was counted
        self._idempotency: dict[tuple[str, str], _IdempotencyEntry] = {}
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        # drop_after_commit_first_attempts: the path prefix it applies to, and the keys already dropped.
        self._drop_first_prefix: str | None = None
        self._drop_first_seen: set[str] = set()
        self._in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._routes: list[tuple[str, re.Pattern[str], _Route]] = [
            ("POST", re.compile(r"/v1/billing/meter_events"), self._create_meter_event),
            ("GET", re.compile(r"/v1/billing/meters"), self._list_meters),
            ("GET", re.compile(r"/v1/billing/meters/(?P<id>[^/]+)"), self._get_meter),
            (
                "GET",
                re.compile(r"/v1/billing/meters/(?P<id>[^/]+)/event_summaries"),
                self._event_summaries,
            ),
            ("GET", re.compile(r"/v1/subscriptions/(?P<id>[^/]+)"), self._get_subscription),
            ("POST", re.compile(r"/v1/subscriptions/(?P<id>[^/]+)"), self._update_subscription),
            ("GET", re.compile(r"/v1/products/(?P<id>[^/]+)"), self._get_product),
            ("GET", re.compile(r"/v1/customers/(?P<id>[^/]+)"), self._get_customer),
            ("GET", re.compile(r"/v1/prices/(?P<id>[^/]+)"), self._get_price),
            ("GET", re.compile(r"/v2/core/events/(?P<id>[^/]+)"), self._get_v2_event),
        ]
        self._prices: dict[str, dict[str, Any]] = {}
        for name in meters:
            self.add_meter(name)

    # Also reachable as ``fake.sign_payload(...)`` so tests need only the fixture.
    sign_payload = staticmethod(sign_payload)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL to use as stripe-python's ``api`` base address, e.g. ``http://127.0.0.1:PORT``."""
        if self._server is None:
            raise RuntimeError("FakeStripe is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeStripe:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread. Returns ``self``."""
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeStripe", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open (keep-alive) connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Idle keep-alive connections would otherwise keep handler threads blocked in readline.
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeStripe:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ seeding

    def add_meter(self, event_name: str) -> str:
        """Configure an active sum meter for ``event_name`` and return its id (``mtr_...``)."""
        with self._lock:
            if any(m["event_name"] == event_name for m in self._meters.values()):
                raise ValueError(f"a meter for event_name {event_name!r} already exists")
            now = int(self.now())
            meter_id = _new_id("mtr")
            self._meters[meter_id] = {
                "id": meter_id,
                "object": "billing.meter",
                "created": now,
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "default_aggregation": {"formula": "sum"},
                "display_name": event_name,
                "event_name": event_name,
                "event_time_window": None,
                "livemode": False,
                "status": "active",
                "status_transitions": {"deactivated_at": None},
                "updated": now,
                "value_settings": {"event_payload_key": "value"},
            }
            return meter_id

    def meter_id(self, event_name: str) -> str:
        """Return the id of the meter configured for ``event_name`` (KeyError if none)."""
        with self._lock:
            for meter in self._meters.values():
                if meter["event_name"] == event_name:
                    return str(meter["id"])
        raise KeyError(event_name)

    def add_customer(
        self,
        id: str | None = None,
        deleted: bool = False,
        email: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Seed a customer (optionally already deleted) and return its id."""
        cus_id = id or _new_id("cus")
        with self._lock:
            self._customers[cus_id] = {
                "id": cus_id,
                "object": "customer",
                "created": int(time.time()),
                "email": email,
                "livemode": False,
                "metadata": dict(metadata or {}),
                "_deleted": deleted,
            }
        return cus_id

    def delete_customer(self, id: str) -> None:
        """Mark a seeded customer as deleted, as ``DELETE /v1/customers/{id}`` would."""
        with self._lock:
            self._customers[id]["_deleted"] = True

    def add_product(
        self, name: str, metadata: dict[str, str] | None = None, id: str | None = None, active: bool = True
    ) -> str:
        """Seed a product and return its id."""
        prod_id = id or _new_id("prod")
        with self._lock:
            self._products[prod_id] = {
                "id": prod_id,
                "object": "product",
                "active": active,
                "created": int(time.time()),
                "livemode": False,
                "metadata": dict(metadata or {}),
                "name": name,
            }
        return prod_id

    def add_subscription(
        self,
        customer: str,
        status: str = "active",
        items: Iterable[dict[str, Any]] = (),
        metadata: dict[str, str] | None = None,
        current_period_start: int | None = None,
        current_period_end: int | None = None,
        cancel_at_period_end: bool = False,
        id: str | None = None,
    ) -> dict[str, Any]:
        """Seed a subscription and return (a copy of) the Stripe object.

        ``items`` are dicts with ``price`` (id) and ``product`` (id), optionally ``quantity``,
        ``unit_amount``, ``lookup_key``, ``interval`` and ``metadata``. Period bounds live on the items,
        as in the API version stripe-python 16 pins (subscription-level ``current_period_*`` are gone).
        """
        now = int(time.time())
        start = now if current_period_start is None else current_period_start
        end = start + 30 * 24 * 3600 if current_period_end is None else current_period_end
        sub_id = id or _new_id("sub")
        data = []
        for item in items:
            price = item.get("price") or _new_id("price")
            data.append(
                {
                    "id": item.get("id") or _new_id("si"),
                    "object": "subscription_item",
                    "created": now,
                    "current_period_start": start,
                    "current_period_end": end,
                    "metadata": dict(item.get("metadata") or {}),
                    "price": {
                        "id": price,
                        "object": "price",
                        "active": True,
                        "currency": "usd",
                        "livemode": False,
                        "lookup_key": item.get("lookup_key"),
                        "metadata": {},
                        "product": item.get("product"),
                        "recurring": {
                            "interval": item.get("interval", "month"),
                            "interval_count": 1,
                            "meter": item.get("meter"),
                            "usage_type": "metered" if item.get("meter") else "licensed",
                        },
                        "type": "recurring",
                        "unit_amount": item.get("unit_amount"),
                    },
                    "quantity": item.get("quantity", 1),
                    "subscription": sub_id,
                }
            )
        sub = {
            "id": sub_id,
            "object": "subscription",
            "billing_cycle_anchor": start,
            "cancel_at": end if cancel_at_period_end else None,
            "cancel_at_period_end": cancel_at_period_end,
            "canceled_at": now if status in _CANCELED_STATUSES or cancel_at_period_end else None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "created": now,
            "currency": "usd",
            "customer": customer,
            "ended_at": now if status in _CANCELED_STATUSES else None,
            "items": {
                "object": "list",
                "data": data,
                "has_more": False,
                "total_count": len(data),
                "url": f"/v1/subscription_items?subscription={sub_id}",
            },
            "livemode": False,
            "metadata": dict(metadata or {}),
            "start_date": start,
            "status": status,
        }
        with self._lock:
            self._subscriptions[sub_id] = sub
            return copy.deepcopy(sub)

    def get_subscription(self, id: str) -> dict[str, Any]:
        """Return a copy of the stored subscription object."""
        with self._lock:
            return copy.deepcopy(self._subscriptions[id])

    def set_subscription_status(self, id: str, status: str) -> None:
        """Change a subscription's status behind the API's back (e.g. to simulate a cancellation)."""
        with self._lock:
            sub = self._subscriptions[id]
            sub["status"] = status
            if status in _CANCELED_STATUSES:
                sub["canceled_at"] = sub["canceled_at"] or int(time.time())
                sub["ended_at"] = int(time.time())

    def add_price(
        self, id: str, product: str, *, metered: bool = False, meter: str | None = None
    ) -> dict[str, Any]:
        """Seed a recurring price (``GET /v1/prices/{id}``); ``meter`` implies ``usage_type=metered``."""
        price = {
            "id": id,
            "object": "price",
            "active": True,
            "currency": "usd",
            "livemode": False,
            "metadata": {},
            "product": product,
            "recurring": {
                "interval": "month",
                "interval_count": 1,
                "meter": meter,
                "usage_type": "metered" if (metered or meter) else "licensed",
            },
            "type": "recurring",
        }
        with self._lock:
            self._prices[id] = price
            return copy.deepcopy(price)

    # ------------------------------------------------------------------ clock, keys, meters

    def now(self) -> float:
        """The fake's clock: the wall clock plus whatever :meth:`advance` added."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the fake's clock forward: stored idempotent results and identifiers older than their
        ttl expire, and lagging summaries catch up. Timestamp checks use this clock too."""
        with self._lock:
            self._offset += seconds

    def set_summary_lag(self, seconds: float) -> None:
        """Meter event summaries include an event only ``seconds`` after it was received (0: at once)."""
        with self._lock:
            self._summary_lag = seconds

    def set_api_key(self, api_key: str | None) -> None:
        """Accept only ``api_key`` from now on (None: any ``sk_``/``rk_`` key): a rotated or revoked key
        then gets Stripe's 401."""
        with self._lock:
            self._api_key = api_key

    def forbid_key(self, api_key: str, path_prefix: str | None = None) -> None:
        """Answer 403 to ``api_key`` (on ``path_prefix`` only, if given): a restricted key lacking a
        permission. :meth:`allow_key` lifts it."""
        with self._lock:
            self._forbidden[api_key] = path_prefix

    def allow_key(self, api_key: str) -> None:
        """Lift :meth:`forbid_key`."""
        with self._lock:
            self._forbidden.pop(api_key, None)

    def deactivate_meter(self, event_name: str) -> None:
        """Deactivate the meter of ``event_name``: Stripe then refuses its events."""
        with self._lock:
            meter = self._meters[self.meter_id(event_name)]
            meter["status"] = "inactive"
            meter["status_transitions"]["deactivated_at"] = int(self.now())

    def reactivate_meter(self, event_name: str) -> None:
        """Reactivate a meter deactivated by :meth:`deactivate_meter`."""
        with self._lock:
            meter = self._meters[self.meter_id(event_name)]
            meter["status"] = "active"
            meter["status_transitions"]["deactivated_at"] = None

    def remove_meter(self, event_name: str) -> None:
        """Forget the meter of ``event_name`` (as if it was never created, or renamed)."""
        with self._lock:
            del self._meters[self.meter_id(event_name)]

    def meter_error_notification(
        self,
        event_name: str,
        *,
        code: str = "meter_event_customer_not_found",
        message: str = "No customer was found for the meter event.",
        identifiers: Sequence[str] = (),
        event_type: str = "v1.billing.meter.error_report_triggered",
    ) -> bytes:
        """A thin (v2) event notification of a meter error, as Stripe's event destinations deliver it.

        ``identifiers`` go in the sample errors (``request.identifier``). The full event is then served
        at ``GET /v2/core/events/{id}`` (``EventNotification.fetch_event``). For
        ``v1.billing.meter.no_meter_found`` there is no related meter.
        """
        with self._lock:
            evt_id = f"evt_{secrets.token_hex(12)}"
            created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(self.now()))
            notification: dict[str, Any] = {
                "id": evt_id,
                "object": "v2.core.event",
                "type": event_type,
                "created": created,
                "livemode": False,
            }
            if event_type != "v1.billing.meter.no_meter_found":
                meter_id = self.meter_id(event_name)
                notification["related_object"] = {
                    "id": meter_id,
                    "type": "billing.meter",
                    "url": f"/v1/billing/meters/{meter_id}",
                }
            samples = [{"error_message": message, "request": {"identifier": i}} for i in identifiers]
            self._v2_events[evt_id] = {
                **notification,
                "data": {
                    "developer_message_summary": f"{len(samples) or 1} meter events of {event_name} failed",
                    "reason": {
                        "error_count": len(samples) or 1,
                        "error_types": [
                            {"code": code, "error_count": len(samples) or 1, "sample_errors": samples}
                        ],
                    },
                    "validation_start": created,
                    "validation_end": created,
                },
            }
            return json.dumps(notification).encode()

    def wait_key_in_use(self, idempotency_key: str, timeout: float = 5.0) -> bool:
        """Block until a request with ``idempotency_key`` is executing (e.g. held by :meth:`slow_next`),
        so a second one is answered 409 deterministically."""
        with self._idle:
            return self._idle.wait_for(
                lambda: any(key == idempotency_key for _, key in self._keys_in_use), timeout=timeout
            )

    def wait_in_flight(self, n: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` requests are being processed (e.g. one held by :meth:`slow_next`)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight >= n, timeout=timeout)

    # ------------------------------------------------------------------ fault injection

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        path_prefix: str | None = None,
        retry_after: int | None = None,
        store: bool | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` without doing the work.

        As at Stripe, a 5xx is stored under the request's ``Idempotency-Key`` (the endpoint started
        executing) and replayed to every retry with that key until it expires; 429, 409 and other
        statuses are not stored (refused in front of the API). ``store`` overrides that. 429 carries
        Stripe's ``rate_limit`` body and, if given, ``Retry-After``; 409 is ``idempotency_key_in_use``.
        """
        keep = status >= 500 if store is None else store
        with self._lock:
            self._faults.append(
                _Fault("fail", n, path_prefix, status=status, retry_after=retry_after, store=keep)
            )

    def slow_next(self, n: int, seconds: float, path_prefix: str | None = None, skip: int = 0) -> None:
        """Delay the next ``n`` matching requests by ``seconds`` before processing them.

        The request is still processed after the delay even if the client gave up meanwhile, as a
        real server would; use :meth:`wait_idle` before asserting on its effects. ``skip`` lets that
        many matching requests through untouched first (e.g. to slow down the third call of a run).
        """
        with self._lock:
            self._faults.append(_Fault("slow", n, path_prefix, seconds=seconds, skip=skip))

    def drop_after_commit_next(self, n: int = 1, path_prefix: str | None = None) -> None:
        """Fully process (and idempotently store) the next ``n`` matching requests, then close the
        connection without sending any response, so the client sees a connection error."""
        with self._lock:
            self._faults.append(_Fault("drop", n, path_prefix))

    def drop_after_commit_first_attempts(self, path_prefix: str = "/v1/billing/meter_events") -> None:
        """From now on, the first request for every meter event ``identifier`` (or, for requests without
        one, every ``Idempotency-Key``) on ``path_prefix`` is processed (and idempotently stored) and
        then has its connection dropped unanswered; a retry gets the stored answer (same key) or the
        identifier's dedupe answer (new key). Models a network that loses every first answer.
        ``clear_faults`` turns it off."""
        with self._lock:
            self._drop_first_prefix = path_prefix

    def clear_faults(self) -> None:
        """Forget all pending injected faults."""
        with self._lock:
            self._faults.clear()
            self._drop_first_prefix = None

    # ------------------------------------------------------------------ introspection

    @property
    def meter_events(self) -> list[dict[str, Any]]:
        """Counted meter events (duplicates and rejected ones excluded), oldest first.

        Each has ``event_name``, ``meter``, ``customer``, ``value``, ``identifier``, ``timestamp``,
        ``payload``.
        """
        with self._lock:
            return [
                {k: v for k, v in {**e, "value": _number(e["value"])}.items() if k != "received"}
                for e in copy.deepcopy(self._events)
            ]

    def totals(self) -> dict[tuple[str, str], int | float]:
        """Sum of counted values per ``(customer, event_name)``."""
        sums: dict[tuple[str, str], Decimal] = {}
        with self._lock:
            for e in self._events:
                key = (e["customer"], e["event_name"])
                sums[key] = sums.get(key, Decimal(0)) + e["value"]
        return {k: _number(v) for k, v in sums.items()}

    def total(self, customer: str, event_name: str) -> int | float:
        """Sum of counted values for one customer and event name (0 if none)."""
        return self.totals().get((customer, event_name), 0)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in arrival order (including faulted and unauthenticated ones)."""
        with self._lock:
            return list(self._requests)

    @property
    def request_counts(self) -> Counter[str]:
        """Number of requests received per path (e.g. ``/v1/billing/meter_events``)."""
        with self._lock:
            return Counter(r.path for r in self._requests)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Block until no request is being processed; returns False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    # ------------------------------------------------------------------ request pipeline

    def _take_fault(self, kind: str, path: str) -> _Fault | None:
        for fault in self._faults:
            if fault.kind == kind and fault.matches(path):
                if fault.skip > 0:
                    fault.skip -= 1
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _handle(self, req: RecordedRequest) -> tuple[int, bytes, dict[str, str]] | None:
        """Process one request; returns (status, body, headers) or None to drop the connection.

        Order, as at Stripe: authentication (401/403, never stored), injected refusals in front of the
        API (429/409, never stored), the stored result of the key (replayed), key in use (409), then
        the endpoint, whose result (a stored injected 5xx included) is kept under the key.
        """
        with self._idle:
            self._requests.append(req)
            self._in_flight += 1
            self._idle.notify_all()
        scope: tuple[str, str] | None = None
        try:
            auth_error = self._authenticate(req)
            if auth_error is not None:
                return self._finish(req, auth_error.status, _dump(auth_error.body), {})
            idem_key = req.idempotency_key if req.method == "POST" else None
            with self._lock:
                slow = self._take_fault("slow", req.path)
                fail = self._take_fault("fail", req.path)
                drop = None if fail else self._take_fault("drop", req.path)
                if drop is None and fail is None and self._first_attempt_to_drop(req):
                    drop = _Fault("drop", 0, self._drop_first_prefix)
                if fail is not None and not fail.store:
                    req.fault = "fail"
                    resp = self._fault_response(fail)
                    return self._finish(req, resp.status, _dump(resp.body), resp.headers)
                if idem_key:
                    key_scope = (req.headers.get("authorization", ""), idem_key)
                    entry = self._live_entry(key_scope)
                    if entry is not None:
                        result = self._replay(req, entry, idem_key)
                        if drop is not None:
                            req.fault = "drop"
                            return None
                        return self._finish(req, *result)
                    if key_scope in self._keys_in_use:
                        err = _key_in_use(idem_key)
                        return self._finish(req, err.status, _dump(err.body), {})
                    scope = key_scope
                    self._keys_in_use.add(scope)
                    self._idle.notify_all()
            if slow is not None:
                req.fault = "slow"
                time.sleep(slow.seconds)
            with self._lock:
                if fail is not None:
                    req.fault = "fail"
                    resp = self._fault_response(fail)
                else:
                    resp = self._route(req)
                headers = {"Request-Id": f"req_{secrets.token_hex(7)}", **resp.headers}
                body = _dump(resp.body)
                if scope is not None and resp.store:
                    self._idempotency[scope] = _IdempotencyEntry(
                        req.method, req.path, req.params, resp.status, body, headers, self.now()
                    )
            if drop is not None:
                req.fault = "drop"
                return None
            return self._finish(req, resp.status, body, headers)
        finally:
            with self._idle:
                if scope is not None:
                    self._keys_in_use.discard(scope)
                self._in_flight -= 1
                self._idle.notify_all()

    def _live_entry(self, scope: tuple[str, str]) -> _IdempotencyEntry | None:
        entry = self._idempotency.get(scope)
        if entry is not None and self.now() - entry.stored_at >= self.idempotency_ttl:
            del self._idempotency[scope]  # expired: the key may be used afresh
            return None
        return entry

    def _first_attempt_to_drop(self, req: RecordedRequest) -> bool:
        prefix = self._drop_first_prefix
        identifier = req.params.get("identifier") if isinstance(req.params, dict) else None
        key = identifier if isinstance(identifier, str) else req.idempotency_key
        if prefix is None or key is None or not req.path.startswith(prefix) or key in self._drop_first_seen:
            return False
        self._drop_first_seen.add(key)
        return True

    @staticmethod
    def _finish(
        req: RecordedRequest, status: int, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        req.status = status
        return status, body, headers

    @staticmethod
    def _fault_response(fault: _Fault) -> _Response:
        if fault.status == 429:
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            err = StripeError(
                429,
                "Request rate limit exceeded. You can learn more about rate limits here "
                "https://stripe.com/docs/rate-limits.",
                code="rate_limit",
                headers=headers,
            )
        elif fault.status == 409:
            err = _key_in_use("(injected)")
        elif fault.status >= 500:
            err = StripeError(
                fault.status,
                "An unknown error occurred while processing your request.",
                type="api_error",
            )
        else:
            err = StripeError(fault.status, f"Injected failure (HTTP {fault.status}).")
        return _Response(err.status, err.body, err.headers, store=fault.store)

    def _authenticate(self, req: RecordedRequest) -> StripeError | None:
        auth = req.headers.get("authorization", "")
        key = ""
        if auth.startswith("Bearer "):
            key = auth[len("Bearer ") :].strip()
        elif auth.startswith("Basic "):  # curl -u sk_...: is accepted by Stripe too
            try:
                key = base64.b64decode(auth[len("Basic ") :]).decode().split(":", 1)[0]
            except (ValueError, UnicodeDecodeError):
                key = ""
        if not key:
            return StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization "
                "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY'). See "
                "https://stripe.com/docs/api#authentication for details, or we can help at "
                "https://support.stripe.com/.",
            )
        valid = key == self._api_key if self._api_key is not None else key.startswith(("sk_", "rk_"))
        if not valid:
            return StripeError(
                401, f"Invalid API Key provided: {key[:8]}****{key[-4:]}", code="api_key_invalid"
            )
        with self._lock:
            forbidden = key in self._forbidden
            prefix = self._forbidden.get(key)
        if forbidden and (prefix is None or req.path.startswith(prefix)):
            return StripeError(
                403,
                f"The provided key '{key[:8]}****{key[-4:]}' does not have the required permissions for "
                "this endpoint.",
                type="invalid_request_error",
                code="secret_key_required" if key.startswith("rk_") else None,
            )
        return None

    def _replay(
        self, req: RecordedRequest, entry: _IdempotencyEntry, key: str
    ) -> tuple[int, bytes, dict[str, str]]:
        if (entry.method, entry.path) != (req.method, req.path):
            err = StripeError(
                400,
                "Keys for idempotent requests can only be used for the same endpoint they were first used "
                f"for ('{entry.method} {entry.path}' vs '{req.method} {req.path}'). Try using a key other "
                f"than '{key}' if you meant to execute a different request.",
                type="idempotency_error",
            )
            return err.status, _dump(err.body), {}
        if entry.params != req.params:
            err = StripeError(
                400,
                "Keys for idempotent requests can only be used with the same parameters they were first "
                f"used with. Try using a key other than '{key}' if you meant to execute a different "
                "request.",
                type="idempotency_error",
            )
            return err.status, _dump(err.body), {}
        req.replayed = True
        return entry.status, entry.body, {**entry.headers, "Idempotent-Replayed": "true"}

    def _route(self, req: RecordedRequest) -> _Response:
        params = req.params if req.method == "POST" else req.query
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(req.path)
            if match and method == req.method:
                try:
                    return handler(match, params)
                except StripeError as err:
                    return _Response(err.status, err.body, err.headers, err.store)
        err = StripeError(
            404,
            f"Unrecognized request URL ({req.method}: {req.path}). Please see https://stripe.com/docs "
            "or we can help at https://support.stripe.com/.",
        )
        return _Response(err.status, err.body, store=False)

    # ------------------------------------------------------------------ endpoints

    def _live_customer(self, cus_id: str, param: str) -> dict[str, Any]:
        customer = self._customers.get(cus_id)
        if customer is None or customer["_deleted"]:
            raise _no_such("customer", cus_id, status=400, param=param)
        return customer

    def _create_meter_event(self, _m: re.Match[str], p: dict[str, Any]) -> _Response:
        _check_params(p, {"event_name", "payload", "identifier", "timestamp", "expand"})
        event_name = p.get("event_name")
        if not event_name:
            raise _missing("event_name")
        payload = p.get("payload")
        if not isinstance(payload, dict) or not payload:
            raise _missing("payload")
        identifier = p.get("identifier")
        if identifier is not None and len(identifier) > IDENTIFIER_MAX_LENGTH:
            raise StripeError(
                400,
                f"Invalid string: {identifier[:20]}...; must be at most {IDENTIFIER_MAX_LENGTH} characters",
                param="identifier",
                store=False,
            )
        now = int(self.now())
        timestamp = _int_param(p, "timestamp")
        if timestamp is None:
            timestamp = now

        meter = next((m for m in self._meters.values() if m["event_name"] == event_name), None)
        if meter is None or meter["status"] != "active":
            raise StripeError(
                400, f"No active meter was found for event_name '{event_name}'.", param="event_name"
            )
        cus_key = meter["customer_mapping"]["event_payload_key"]
        value_key = meter["value_settings"]["event_payload_key"]
        cus_id = payload.get(cus_key)
        if not cus_id:
            raise _missing(f"payload[{cus_key}]")
        raw_value = payload.get(value_key)
        if raw_value is None:
            raise _missing(f"payload[{value_key}]")
        try:
            value = Decimal(raw_value)
        except InvalidOperation:
            value = Decimal("NaN")
        if not value.is_finite():
            raise StripeError(
                400,
                f"The value for payload[{value_key}] must be a number, got '{raw_value}'.",
                param=f"payload[{value_key}]",
            )
        if timestamp < now - METER_EVENT_MAX_AGE_SECONDS:
            raise StripeError(
                400,
                "Timestamp must be within the past 35 calendar days.",
                code="timestamp_too_far_in_past",
                param="timestamp",
            )
        if timestamp > now + METER_EVENT_MAX_FUTURE_SECONDS:
            raise StripeError(
                400,
                "Timestamp must not be more than 5 minutes in the future.",
                code="timestamp_in_future",
                param="timestamp",
            )
        self._live_customer(cus_id, f"payload[{cus_key}]")
        if identifier is None:
            identifier = _new_id("mevt")
        elif self.now() - self._identifiers.get(identifier, float("-inf")) < self.identifier_ttl:
            # Matches what Stripe answers for a repeated identifier: a 400 that must not be retried.
            raise StripeError(
                400,
                f"An event already exists with identifier {identifier}.",
                code="resource_already_exists",
                param="identifier",
                headers={"Stripe-Should-Retry": "false"},
            )
        self._identifiers[identifier] = self.now()
        self._events.append(
            {
                "received": self.now(),
                "event_name": event_name,
                "meter": meter["id"],
                "customer": cus_id,
                "value": value,
                "identifier": identifier,
                "timestamp": timestamp,
                "payload": dict(payload),
            }
        )
        return _Response(
            200,
            {
                "object": "billing.meter_event",
                "created": now,
                "event_name": event_name,
                "identifier": identifier,
                "livemode": False,
                "payload": dict(payload),
                "timestamp": timestamp,
            },
        )

    def _list_meters(self, _m: re.Match[str], q: dict[str, Any]) -> _Response:
        _check_params(q, {"status", "limit", "starting_after", "ending_before", "expand"})
        meters = [m for m in self._meters.values() if q.get("status") in (None, m["status"])]
        return _Response(200, _list(copy.deepcopy(meters), "/v1/billing/meters"))

    def _get_meter(self, m: re.Match[str], _q: dict[str, Any]) -> _Response:
        meter = self._meters.get(m["id"])
        if meter is None:
            raise _no_such("billing.meter", m["id"])
        return _Response(200, copy.deepcopy(meter))

    def _event_summaries(self, m: re.Match[str], q: dict[str, Any]) -> _Response:
        _check_params(q, {"customer", "start_time", "end_time", "limit", "starting_after", "ending_before"})
        meter = self._meters.get(m["id"])
        if meter is None:
            raise _no_such("billing.meter", m["id"])
        customer = q.get("customer")
        if not customer:
            raise _missing("customer")
        start = _int_param(q, "start_time", required=True)
        end = _int_param(q, "end_time", required=True)
        assert start is not None and end is not None
        for name, ts in (("start_time", start), ("end_time", end)):
            if ts % 60:
                raise StripeError(400, f"{name} must be aligned with minute boundaries.", param=name)
        if end <= start:
            raise StripeError(400, "end_time must be after start_time.", param="end_time")
        if customer not in self._customers:
            raise _no_such("customer", customer, status=400, param="customer")
        total = sum(
            (
                e["value"]
                for e in self._events
                if e["meter"] == meter["id"]
                and e["customer"] == customer
                and start <= e["timestamp"] < end
                and e["received"] <= self.now() - self._summary_lag
            ),
            Decimal(0),
        )
        summary = {
            "id": _new_id("mtrusg"),
            "object": "billing.meter_event_summary",
            "aggregated_value": _number(total),
            "end_time": end,
            "livemode": False,
            "meter": meter["id"],
            "start_time": start,
        }
        return _Response(200, _list([summary], f"/v1/billing/meters/{meter['id']}/event_summaries"))

    def _get_subscription(self, m: re.Match[str], _q: dict[str, Any]) -> _Response:
        sub = self._subscriptions.get(m["id"])
        if sub is None:
            raise _no_such("subscription", m["id"])
        return _Response(200, copy.deepcopy(sub))

    def _update_subscription(self, m: re.Match[str], p: dict[str, Any]) -> _Response:
        _check_params(
            p, {"cancel_at_period_end", "metadata", "cancellation_details", "proration_behavior", "expand"}
        )
        sub = self._subscriptions.get(m["id"])
        if sub is None:
            raise _no_such("subscription", m["id"])
        if sub["status"] in _CANCELED_STATUSES and set(p) - {"metadata", "cancellation_details", "expand"}:
            raise StripeError(
                400, "A canceled subscription can only update its cancellation_details and metadata."
            )
        updated = copy.deepcopy(sub)
        if "metadata" in p:
            updated["metadata"] = _merge_metadata(updated["metadata"], p["metadata"])
        if "cancellation_details" in p:
            details = p["cancellation_details"]
            if not isinstance(details, dict):
                raise StripeError(400, "Invalid object", param="cancellation_details", store=False)
            for key in ("comment", "feedback"):
                if key in details:
                    updated["cancellation_details"][key] = details[key] or None
        if "cancel_at_period_end" in p:
            flag = p["cancel_at_period_end"]
            if flag not in ("true", "false"):
                raise StripeError(400, f"Invalid boolean: {flag}", param="cancel_at_period_end", store=False)
            if flag == "true":
                period_ends = [i["current_period_end"] for i in updated["items"]["data"]]
                updated["cancel_at_period_end"] = True
                updated["cancel_at"] = max(period_ends) if period_ends else None
                updated["canceled_at"] = int(time.time())
                updated["cancellation_details"]["reason"] = "cancellation_requested"
            else:
                updated["cancel_at_period_end"] = False
                updated["cancel_at"] = None
                updated["canceled_at"] = None
                updated["cancellation_details"]["reason"] = None
        # Commit only once every parameter validated, so a rejected update changes nothing.
        self._subscriptions[sub["id"]] = updated
        return _Response(200, copy.deepcopy(updated))

    def _get_product(self, m: re.Match[str], _q: dict[str, Any]) -> _Response:
        product = self._products.get(m["id"])
        if product is None:
            raise _no_such("product", m["id"])
        return _Response(200, copy.deepcopy(product))

    def _get_price(self, m: re.Match[str], _q: dict[str, Any]) -> _Response:
        price = self._prices.get(m["id"])
        if price is None:
            raise _no_such("price", m["id"])
        return _Response(200, copy.deepcopy(price))

    def _get_v2_event(self, m: re.Match[str], _q: dict[str, Any]) -> _Response:
        event = self._v2_events.get(m["id"])
        if event is None:
            raise _no_such("event", m["id"])
        return _Response(200, copy.deepcopy(event))

    def _get_customer(self, m: re.Match[str], _q: dict[str, Any]) -> _Response:
        customer = self._customers.get(m["id"])
        if customer is None:
            raise _no_such("customer", m["id"])
        if customer["_deleted"]:
            # Stripe keeps answering 200 for a deleted customer, with a stub object.
            return _Response(200, {"id": customer["id"], "object": "customer", "deleted": True})
        return _Response(200, {k: v for k, v in customer.items() if not k.startswith("_")})


def _merge_metadata(current: dict[str, str], update: Any) -> dict[str, str]:
    """Apply a metadata update like Stripe: keys merge, ``""`` unsets a key, ``metadata=""`` clears all."""
    if update == "":
        return {}
    if not isinstance(update, dict):
        raise StripeError(400, "Invalid object", param="metadata", store=False)
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _list(data: list[dict[str, Any]], url: str) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": False, "url": url}


def _dump(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must never block interpreter exit
    # socketserver's default backlog of 5 resets connections under a benchmark's bursts; Stripe doesn't.
    request_queue_size = 256
    allow_reuse_address = True
    fake: FakeStripe

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client hung up (e.g. timed out on a ``slow_next`` request)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Stripe; every answer carries Content-Length
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.fake._lock:
                self.server.fake._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging; tests inspect ``FakeStripe.requests`` instead."""

    def do_GET(self) -> None:
        """Serve a GET."""
        self._serve("GET")

    def do_POST(self) -> None:
        """Serve a POST."""
        self._serve("POST")

    def do_DELETE(self) -> None:
        """Serve a DELETE (no DELETE routes are modelled; answers Stripe's 404)."""
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urllib.parse.urlsplit(self.path)
        query = decode_form(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        params = decode_form(urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = RecordedRequest(
            method=method,
            path=url.path,
            query=query,
            params=params,
            headers=headers,
            idempotency_key=headers.get("idempotency-key"),
        )
        result = self.server.fake._handle(req)
        if result is None:
            # Drop: nothing is written; closing makes the client read EOF instead of a status line.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        status, body, extra = result
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if "Request-Id" not in extra:
            self.send_header("Request-Id", f"req_{secrets.token_hex(7)}")
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)
