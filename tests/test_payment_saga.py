"""The payment service's saga: a payment the ledger refuses for good is refunded,
exactly once, whatever crashes on the way."""

from __future__ import annotations

from typing import Any

import pytest

import perdure
from conftest import Backend
from perdure import testing
from perdure._demo.payments import (
    LedgerRefusedError,
    MemoryLedger,
    MemoryProvider,
    PaymentRequest,
    SQLiteLedger,
    SQLiteProvider,
    build_payment_workflow,
)
from perdure.storage import EntryKind

CARD = "4242424242424242"


async def test_a_refused_payment_is_refunded_and_fails(backend: Backend, tmp_path: Any) -> None:
    provider = SQLiteProvider(str(tmp_path / "provider.db"))
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"), refuse=frozenset({"p-bad"}))
    process_payment = build_payment_workflow(provider, ledger)
    try:
        async with backend.runtime([process_payment]) as rt:
            ok = await rt.client.run(process_payment, PaymentRequest("p-ok", "c", 500, CARD))
            assert ok.status == "captured"
            handle = await rt.client.start(process_payment, PaymentRequest("p-bad", "c", 700, CARD))
            with pytest.raises(perdure.InvocationFailedError) as info:
                await handle.result()
            assert isinstance(info.value.cause, LedgerRefusedError)
            steps = [e.name for e in await rt.client.journal(handle.id) if e.kind is EntryKind.STEP]
            assert steps == ["validate", "charge", "record", "compensate refund"]
            attempts = await rt.store.read_attempts(handle.id)
            assert len(attempts) == 2  # recorded failures before the third, final one
        assert provider.charges_per_payment() == {"p-ok": 1, "p-bad": 1}
        refunds = provider.refunds_per_transaction()
        assert list(refunds.values()) == [1]
        assert next(iter(refunds)).startswith("tx_p-bad_")
        assert set(ledger.rows()) == {"p-ok"}
    finally:
        provider.close()
        ledger.close()


async def test_the_refund_happens_once_at_every_crash_point() -> None:
    provider = MemoryProvider()
    ledger = MemoryLedger(refuse=frozenset({"p-bad"}))
    process_payment = build_payment_workflow(provider, ledger)

    def reset() -> None:
        provider.calls.clear()
        provider.charges.clear()
        provider.refunds.clear()

    def effects() -> Any:
        return (
            sorted(c.transaction_id for c in provider.charges.values()),
            sorted(provider.refunds.values()),
        )

    report = await testing.crash_at_every_point(
        process_payment,
        PaymentRequest("p-bad", "c", 700, CARD),
        effects=effects,
        reset=reset,
    )
    report.check()
    assert report.effects == (["tx_p-bad"], ["tx_p-bad"])
    assert report.result[:3] == ("error", "InvocationFailedError", "LedgerRefusedError")
