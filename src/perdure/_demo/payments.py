"""A payment service: validate -> charge -> record, as a saga.

The fake provider records every call and every charge by idempotency key,
in its own SQLite file, so that a test or the demo can count how often each
payment was really charged. The ledger is an idempotent upsert. If the
ledger refuses a payment for good, the charge is refunded (the saga's
compensation) and the payment fails.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import threading
import time
from typing import Any, Protocol

from .._actor import Actor, DurabilityFacet
from .._context import Context, current_step
from .._errors import TerminalError
from .._retry import RetryPolicy
from .._workflow import Workflow, workflow

# A ledger that keeps failing after this many attempts has refused for good.
RECORD_RETRY = RetryPolicy(max_attempts=3)


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentRequest:
    payment_id: str
    customer: str
    amount_cents: int
    card: str


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    transaction_id: str
    status: str
    amount_cents: int


@dataclasses.dataclass(frozen=True, slots=True)
class PaymentResult:
    payment_id: str
    transaction_id: str
    status: str


class Provider(Protocol):
    def charge(self, idempotency_key: str, payment_id: str, amount_cents: int) -> Charge: ...
    def refund(self, idempotency_key: str, transaction_id: str) -> None: ...


class Ledger(Protocol):
    def record(self, payment_id: str, charge: Charge) -> None: ...


def validate(request: PaymentRequest) -> bool:
    if request.amount_cents <= 0:
        raise TerminalError(f"payment {request.payment_id}: amount must be positive")
    if not (request.card.isdigit() and 12 <= len(request.card) <= 19):
        raise TerminalError(f"payment {request.payment_id}: card number is malformed")
    return True


@dataclasses.dataclass
class AccountState:
    """A customer's running totals, kept by the durable Account actor."""

    paid_cents: int = 0
    payments: int = 0
    last_transaction: str = ""


class Account(Actor[AccountState]):
    """One customer's account, updated by every payment of that customer."""

    durability = DurabilityFacet(checkpoint_every=10)

    async def add_payment(self, ctx: Context, amount_cents: int, transaction_id: str) -> int:
        self.state.paid_cents += amount_cents
        self.state.payments += 1
        self.state.last_transaction = transaction_id
        return self.state.paid_cents


def build_payment_workflow(
    provider: Provider, ledger: Ledger, *, accounts: bool = False
) -> Workflow[[PaymentRequest], PaymentResult]:
    """The payment workflow bound to a provider and a ledger.

    With ``accounts``, each payment also updates the customer's durable
    :class:`Account` actor (register ``Account`` with the runtime).
    """

    def charge(request: PaymentRequest) -> Charge:
        # The step key is the same on every retry and after every restart,
        # so the provider charges once even if this call is made again.
        return provider.charge(current_step().key, request.payment_id, request.amount_cents)

    def record(request: PaymentRequest, charge: Charge) -> None:
        ledger.record(request.payment_id, charge)

    def refund(charge: Charge) -> None:
        provider.refund(current_step().key, charge.transaction_id)

    @workflow(name="process_payment")
    async def process_payment(ctx: Context, request: PaymentRequest) -> PaymentResult:
        await ctx.run("validate", validate, request)
        async with ctx.saga() as saga:
            result = await ctx.run("charge", charge, request)
            # If recording fails for good, the customer gets the money back.
            saga.on_failure("refund", refund, result)
            await ctx.run("record", record, request, result, retry=RECORD_RETRY)
        if accounts:
            await ctx.actor(Account, request.customer).ask(
                Account.add_payment, request.amount_cents, result.transaction_id
            )
        return PaymentResult(request.payment_id, result.transaction_id, result.status)

    return process_payment


def service() -> list[Any]:
    """The payment service, for ``perdure serve --app perdure._demo.payments:service``.

    The payment workflow (each payment also credits its customer's durable
    :class:`Account`) and the Account actor. The fake provider and the
    ledger keep their SQLite files, ``provider.db`` and ``ledger.db``, in
    the directory ``PERDURE_DEMO_DIR`` names (default: the current one).
    """
    directory = os.environ.get("PERDURE_DEMO_DIR", ".")
    provider = SQLiteProvider(os.path.join(directory, "provider.db"))
    ledger = SQLiteLedger(os.path.join(directory, "ledger.db"))
    return [build_payment_workflow(provider, ledger, accounts=True), Account]


class _SQLiteFile:
    """A small SQLite file shared by the step threads of one process."""

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SQLiteProvider(_SQLiteFile):
    """A fake card provider that deduplicates charges by idempotency key."""

    def __init__(self, path: str) -> None:
        super().__init__(
            path,
            """
            CREATE TABLE IF NOT EXISTS calls (
                seq INTEGER PRIMARY KEY, idempotency_key TEXT NOT NULL,
                payment_id TEXT NOT NULL, at REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS charges (
                idempotency_key TEXT PRIMARY KEY, transaction_id TEXT NOT NULL,
                payment_id TEXT NOT NULL, amount_cents INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS refunds (
                idempotency_key TEXT PRIMARY KEY, transaction_id TEXT NOT NULL);
            """,
        )

    def refund(self, idempotency_key: str, transaction_id: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR IGNORE INTO refunds VALUES (?, ?)", (idempotency_key, transaction_id)
            )

    def refunds_per_transaction(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT transaction_id, count(*) FROM refunds GROUP BY transaction_id"
            ).fetchall()
        return dict(rows)

    def charge(self, idempotency_key: str, payment_id: str, amount_cents: int) -> Charge:
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            c.execute(
                "INSERT INTO calls (idempotency_key, payment_id, at) VALUES (?, ?, ?)",
                (idempotency_key, payment_id, time.time()),
            )
            c.execute(
                "INSERT OR IGNORE INTO charges VALUES (?, ?, ?, ?)",
                (
                    idempotency_key,
                    f"tx_{payment_id}_{idempotency_key[-12:]}",
                    payment_id,
                    amount_cents,
                ),
            )
            tx, amount = c.execute(
                "SELECT transaction_id, amount_cents FROM charges WHERE idempotency_key = ?",
                (idempotency_key,),
            ).fetchone()
            c.execute("COMMIT")
        return Charge(transaction_id=tx, status="captured", amount_cents=amount)

    def calls_per_key(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT idempotency_key, count(*) FROM calls GROUP BY idempotency_key"
            ).fetchall()
        return dict(rows)

    def charges_per_payment(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT payment_id, count(*) FROM charges GROUP BY payment_id"
            ).fetchall()
        return dict(rows)


class SQLiteLedger(_SQLiteFile):
    """The merchant's ledger: one row per transaction, written by upsert.

    ``refuse`` names payments it refuses for good (a closed merchant account,
    say), to show the saga refunding them.
    """

    def __init__(self, path: str, *, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        super().__init__(
            path,
            """
            CREATE TABLE IF NOT EXISTS ledger (
                transaction_id TEXT PRIMARY KEY, payment_id TEXT NOT NULL,
                amount_cents INTEGER NOT NULL, status TEXT NOT NULL, writes INTEGER NOT NULL);
            """,
        )

    def record(self, payment_id: str, charge: Charge) -> None:
        if payment_id in self.refuse:
            raise LedgerRefusedError(f"the ledger refuses payment {payment_id}")
        with self._lock:
            self._conn.execute(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, 1) ON CONFLICT (transaction_id) "
                "DO UPDATE SET status = excluded.status, writes = writes + 1",
                (charge.transaction_id, payment_id, charge.amount_cents, charge.status),
            )

    def rows(self) -> dict[str, tuple[str, int]]:
        """payment id -> (transaction id, amount)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT payment_id, transaction_id, amount_cents FROM ledger"
            ).fetchall()
        return {p: (t, a) for p, t, a in rows}


class MemoryProvider:
    """The provider in memory: for benchmarks that measure Perdure itself."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.charges: dict[str, Charge] = {}
        self.refunds: dict[str, str] = {}  # idempotency key -> transaction id

    def charge(self, idempotency_key: str, payment_id: str, amount_cents: int) -> Charge:
        self.calls[idempotency_key] = self.calls.get(idempotency_key, 0) + 1
        found = self.charges.get(idempotency_key)
        if found is None:
            found = Charge(f"tx_{payment_id}", "captured", amount_cents)
            self.charges[idempotency_key] = found
        return found

    def refund(self, idempotency_key: str, transaction_id: str) -> None:
        self.refunds.setdefault(idempotency_key, transaction_id)


class LedgerRefusedError(Exception):
    """The ledger will not record this payment, however often it is asked."""


class MemoryLedger:
    def __init__(self, *, refuse: frozenset[str] = frozenset()) -> None:
        self.rows: dict[str, Charge] = {}
        self.refuse = refuse

    def record(self, payment_id: str, charge: Charge) -> None:
        if payment_id in self.refuse:
            raise LedgerRefusedError(f"the ledger refuses payment {payment_id}")
        self.rows[charge.transaction_id] = charge
