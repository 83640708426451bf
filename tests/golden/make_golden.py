"""Write tests/golden/*.json: the journals the current code records.

Run only when the journal format changes on purpose (and then add a
migration, or keep reading the old format): the golden files pin what old
journals look like, so that new code is tested against them.

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import perdure
from perdure._demo.payments import (
    MemoryLedger,
    MemoryProvider,
    PaymentRequest,
    build_payment_workflow,
)
from perdure.storage import MemoryStore
from perdure.testing import FakeClock

HERE = Path(__file__).parent
DECLINED = PaymentRequest("p-golden-2", "cust-2", 500, "12")  # card too short: TerminalError


async def record(request: PaymentRequest, name: str) -> None:
    store = MemoryStore()
    wf = build_payment_workflow(MemoryProvider(), MemoryLedger())
    async with perdure.Runtime(store, workflows=[wf], clock=FakeClock()) as rt:
        handle = await rt.client.start(wf, request, invocation_id=f"golden-{name}")
        try:
            await handle.result()
        except perdure.InvocationFailedError:
            pass
        await store.open()  # Runtime.stop closes it; read what it kept
        journal = await store.read_journal(handle.id)
    rows = [
        {
            "index": e.index,
            "kind": e.kind.value,
            "name": e.name,
            "ok": e.ok,
            "payload_b64": base64.b64encode(e.payload).decode(),
            "payload_text": e.payload.decode(errors="replace")[:200],
            "type_tag": e.type_tag,
            "attempts": e.attempts,
            "created_at": e.created_at,
        }
        for e in journal
    ]
    (HERE / f"payment_{name}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(record(PaymentRequest("p-golden-1", "cust-1", 1999, "4242424242424242"), "ok"))
    asyncio.run(record(DECLINED, "declined"))
