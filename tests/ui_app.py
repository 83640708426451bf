"""A small app for the web UI's tests: workflows that complete, retry and
fail, and a durable shopping-cart actor whose state grows, changes and
shrinks. Served with ``perdure serve --app ui_app:DEFINITIONS``."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import perdure

QUICK_RETRY = perdure.RetryPolicy(max_attempts=3, initial_interval=timedelta(milliseconds=1))


def reserve(item: str) -> str:
    return f"r-{item}"


def flaky_bank(order: str) -> str:
    # The first attempt of every charge fails; the retry goes through.
    if perdure.current_step().attempt == 1:
        raise ConnectionError(f"bank unreachable while charging {order}")
    return f"tx-{order}"


def broken_ledger(order: str) -> None:
    raise RuntimeError(f"ledger rejected {order}")


@perdure.workflow(name="ship_order")
async def ship_order(ctx: perdure.Context, order: str) -> dict[str, str]:
    reservation = await ctx.run("reserve", reserve, order)
    tx = await ctx.run("charge", flaky_bank, order, retry=QUICK_RETRY)
    return {"order": order, "reservation": reservation, "transaction": tx}


@perdure.workflow(name="book_ledger")
async def book_ledger(ctx: perdure.Context, order: str) -> None:
    await ctx.run("reserve", reserve, order)
    await ctx.run("ledger", broken_ledger, order, retry=QUICK_RETRY)


@dataclasses.dataclass
class CartState:
    items: dict[str, int] = dataclasses.field(default_factory=dict)
    total_cents: int = 0
    note: str = ""


class Cart(perdure.Actor[CartState]):
    """A shopping cart: add, remove and annotate."""

    durability = perdure.DurabilityFacet(checkpoint_every=4)

    async def add(self, ctx: perdure.Context, item: str, quantity: int, cents: int) -> int:
        self.state.items[item] = self.state.items.get(item, 0) + quantity
        self.state.total_cents += quantity * cents
        return self.state.total_cents

    async def remove(self, ctx: perdure.Context, item: str, cents: int) -> int:
        quantity = self.state.items.pop(item)
        self.state.total_cents -= quantity * cents
        return self.state.total_cents

    async def annotate(self, ctx: perdure.Context, note: str) -> str:
        self.state.note = note
        return note


DEFINITIONS: list[Any] = [ship_order, book_ledger, Cart]

# Ten messages to cart "alice": what each does to the state is checked in the test.
CART_MESSAGES: list[tuple[Any, tuple[Any, ...]]] = [
    (Cart.add, ("apple", 3, 50)),
    (Cart.add, ("pear", 1, 80)),
    (Cart.annotate, ("gift <b>wrap</b> & ribbon",)),
    (Cart.add, ("apple", 2, 50)),
    (Cart.add, ("plum", 6, 20)),
    (Cart.remove, ("pear", 80)),
    (Cart.add, ("fig", 1, 120)),
    (Cart.annotate, ("leave at door",)),
    (Cart.remove, ("plum", 20)),
    (Cart.add, ("kiwi", 4, 30)),
]


async def populate(rt: perdure.Runtime) -> dict[str, str]:
    """The invocations the UI tests look at; returns their ids by name."""
    ids: dict[str, str] = {}
    for order in ("o-1", "o-2"):
        handle = await rt.client.start(ship_order, order, idempotency_key=order)
        await handle.result()
        ids[f"ship {order}"] = handle.id
    handle = await rt.client.start(book_ledger, "o-3")
    try:
        await handle.result()
    except perdure.InvocationFailedError:
        pass
    ids["ledger o-3"] = handle.id
    cart = rt.client.actor(Cart, "alice")
    for handler, args in CART_MESSAGES:
        await cart.ask(handler, *args)
    await rt.client.actor(Cart, "bob").ask(Cart.add, "melon", 1, 300)
    return ids
