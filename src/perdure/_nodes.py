"""Several nodes on one store: partitions, leases with fencing epochs, failover.

The work is split into ``partitions``. A node runs the invocations (and the
actors) of the partitions whose lease it holds, and renews its leases every
``renew_every``; a lease not renewed for ``lease_ttl`` expires and another
node takes the partition over, bumping its epoch, and resumes its unfinished
invocations from their journals. Every journal write of a node carries the
epoch it holds, and the store refuses a write whose epoch is stale
(:class:`perdure.FencedError`), so a node that was paused or cut off past its
lease cannot write any more: it stops working on that partition.

Nodes balance the partitions among themselves: each aims at its share
(partitions / live nodes, rounded up), gives back leases over its share and
takes free or expired ones, so nodes that join or leave rebalance.

Any node accepts invocations. One for a partition this node does not hold is
recorded as due at once (a suspended row with ``wake_at`` = now), and the
owner's timer service picks it up; owners look for such rows every
``poll_every`` and at once when the store notifies them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import zlib
from datetime import timedelta
from typing import TYPE_CHECKING

from ._errors import ConfigurationError, PerdureError
from .storage._records import Fence

if TYPE_CHECKING:
    from ._runtime import Runtime

log = logging.getLogger("perdure.nodes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """How a runtime shares a store with other nodes.

    >>> Runtime("postgresql://db/perdure", workflows=[...], node=NodeConfig())

    ``lease_ttl`` is what failover waits for at most after a node dies;
    shorter fails over sooner but lets a pause (a long GC, a slow disk) cost a
    node its partitions. ``renew_every`` must be well under ``lease_ttl``.
    """

    partitions: int = 16
    lease_ttl: timedelta = timedelta(seconds=3)
    renew_every: timedelta = timedelta(seconds=1)
    poll_every: timedelta = timedelta(seconds=1)
    node_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.partitions, int) or not 1 <= self.partitions <= 4096:
            raise ConfigurationError(
                f"partitions must be an int in 1..4096, not {self.partitions!r}"
            )
        for name in ("lease_ttl", "renew_every", "poll_every"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value <= timedelta(0):
                raise ConfigurationError(f"{name} must be a positive timedelta, not {value!r}")
        if self.renew_every * 2 > self.lease_ttl:
            raise ConfigurationError(
                f"renew_every ({self.renew_every}) must be at most half of lease_ttl "
                f"({self.lease_ttl}), or a node loses its leases between two renewals"
            )


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


def partition_of(key: str, partitions: int) -> int:
    """The partition of an invocation id or an actor's ``type/key``: stable everywhere."""
    return zlib.crc32(key.encode()) % partitions if partitions > 1 else 0


class LeaseKeeper:
    """Holds, renews and balances this node's leases."""

    def __init__(self, rt: Runtime, config: NodeConfig) -> None:
        self._rt = rt
        self.config = config
        self.node_id = config.node_id or default_node_id()
        self.owned: dict[int, int] = {}  # partition -> epoch
        self._task: asyncio.Task[None] | None = None
        self._last_renewed = 0.0
        self._stopping = False

    @property
    def partitions(self) -> int:
        return self.config.partitions

    def fence(self, partition: int) -> Fence:
        epoch = self.owned.get(partition)
        if epoch is None:
            from ._errors import FencedError

            raise FencedError(partition, 0, None)
        return Fence(partition=partition, epoch=epoch)

    async def start(self) -> None:
        await self.renew()
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name=f"perdure:leases:{self.node_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True  # in case a driver swallows the cancellation
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def release(self) -> None:
        """Give every lease back, for a clean shutdown: others take over at once."""
        self.owned = {}
        try:
            await self._rt.store.release_leases(self.node_id)
        except PerdureError as exc:
            log.warning("node %s: could not release its leases: %s", self.node_id, exc)

    async def _loop(self) -> None:
        clock = self._rt.clock
        while not self._stopping:
            await clock.sleep(self.config.renew_every.total_seconds())
            if self._stopping:
                return
            try:
                await self.renew()
            except Exception:
                log.exception("node %s: renewing leases failed", self.node_id)

    async def renew(self) -> None:
        rt, config = self._rt, self.config
        now = rt.clock.now()
        ttl = config.lease_ttl.total_seconds()
        try:
            held = await rt.store.acquire_leases(
                self.node_id, partitions=config.partitions, ttl=ttl, now=now
            )
        except PerdureError as exc:
            log.error("node %s: cannot renew its leases: %s", self.node_id, exc)
            if self.owned and rt.clock.now() - self._last_renewed >= ttl:
                # Past the lease: another node may own these by now.
                lost = set(self.owned)
                self.owned = {}
                rt.drop_partitions(lost)
            return
        self._last_renewed = now
        lost = {p for p, e in self.owned.items() if held.get(p) != e}
        gained = {p for p, e in held.items() if self.owned.get(p) != e}
        self.owned = held
        if lost:
            log.warning("node %s: lost partitions %s", self.node_id, sorted(lost))
            rt.drop_partitions(lost)
        if gained:
            log.info("node %s: took partitions %s", self.node_id, sorted(gained))
            await rt.take_over(sorted(gained))

    def lost(self, partition: int) -> None:
        """A write was fenced: this node no longer holds ``partition``."""
        if self.owned.pop(partition, None) is not None:
            log.warning("node %s: fenced out of partition %d", self.node_id, partition)
            self._rt.drop_partitions({partition})
