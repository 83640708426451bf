"""Journals written by earlier code must replay under the current code.

``tests/golden/*.json`` hold journals as Perdure recorded them (see
``make_golden.py``). Each test loads one without its output entry, as if
the process had died just before finishing, and checks that the current
code replays every step from it (running none), finishes with the recorded
outcome, and records that outcome with the same bytes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

import perdure
from perdure._demo.payments import PaymentResult, build_payment_workflow
from perdure._serde import input_hash
from perdure.storage import (
    EntryKind,
    InvocationRecord,
    JournalEntry,
    Status,
    Store,
    Write,
    open_store,
)
from perdure.testing import FakeClock

GOLDEN = Path(__file__).parent / "golden"


class Untouchable:
    """A provider and ledger that fail the test if replay calls them."""

    def charge(self, *args: Any) -> Any:
        raise AssertionError("replay called the provider")

    def record(self, *args: Any) -> None:
        raise AssertionError("replay called the ledger")


def load(name: str) -> list[JournalEntry]:
    rows = json.loads((GOLDEN / name).read_text())
    return [
        JournalEntry(
            invocation_id="golden",
            index=r["index"],
            kind=EntryKind(r["kind"]),
            name=r["name"],
            ok=r["ok"],
            payload=base64.b64decode(r["payload_b64"]),
            type_tag=r["type_tag"],
            attempts=r["attempts"],
            created_at=r["created_at"],
        )
        for r in rows
    ]


async def replay(store: Store, entries: list[JournalEntry]) -> perdure.Runtime:
    """Record ``entries`` but the output, and return a runtime to resume them."""
    await store.open()
    first, *steps, _output = entries
    rec = InvocationRecord(
        id="golden",
        target=first.name,
        input_hash=input_hash(first.payload),
        idempotency_key=None,
        status=Status.RUNNING,
        created_at=first.created_at,
        updated_at=first.created_at,
    )
    await store.create_invocation(rec, first)
    await store.commit(Write(entries=tuple(steps)))
    await store.close()
    fake = Untouchable()
    wf = build_payment_workflow(fake, fake)
    return perdure.Runtime(store, workflows=[wf], clock=FakeClock())


async def output_of(store: Store) -> JournalEntry:
    await store.open()
    try:
        journal = await store.read_journal("golden")
    finally:
        await store.close()
    assert journal[-1].kind is EntryKind.OUTPUT
    return journal[-1]


async def test_completed_payment_replays_to_the_same_bytes(store_url: str) -> None:
    entries = load("payment_ok.json")
    store = open_store(store_url)
    rt = await replay(store, entries)
    async with rt:
        result = await (await rt.client.get("golden")).result()
        assert rt.stats.steps_executed == 0
        assert rt.stats.steps_replayed == 3
    assert result == PaymentResult("p-golden-1", "tx_p-golden-1", "captured")
    output = await output_of(store)
    assert output.ok
    assert output.payload == entries[-1].payload
    assert output.type_tag == entries[-1].type_tag


async def test_declined_payment_replays_its_recorded_error(store_url: str) -> None:
    entries = load("payment_declined.json")
    store = open_store(store_url)
    rt = await replay(store, entries)
    async with rt:
        with pytest.raises(perdure.InvocationFailedError) as info:
            await (await rt.client.get("golden")).result()
        assert rt.stats.steps_executed == 0
    cause = info.value.__cause__
    assert type(cause) is perdure.TerminalError
    assert str(cause) == "payment p-golden-2: card number is malformed"
    recorded = msgspec.json.decode(entries[-1].payload)
    again = msgspec.json.decode((await output_of(store)).payload)
    assert (again["type"], again["message"], again["args"]) == (
        recorded["type"],
        recorded["message"],
        recorded["args"],
    )
