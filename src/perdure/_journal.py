"""The replay state machine. Pure: no I/O, no clock, no asyncio.

An invocation's handler runs from the top every time it is (re)started. Each
durable operation asks :meth:`Replay.take` for the next journal index: if the
journal holds an entry there, its kind and name must match what the code asks
for, and the caller returns its recorded outcome without running anything;
otherwise execution is live and the caller records a new entry at that index.
"""

from __future__ import annotations

from collections.abc import Iterable

from ._errors import NonDeterminismError
from .storage._records import Attempt, EntryKind, JournalEntry


def describe(kind: EntryKind | str, name: str) -> str:
    return f"{kind} {name!r}"


class Replay:
    """Matches an invocation's durable operations against its journal."""

    __slots__ = ("_attempts", "_by_index", "_last_recorded", "_next", "invocation_id")

    def __init__(
        self,
        invocation_id: str,
        entries: Iterable[JournalEntry] = (),
        attempts: Iterable[Attempt] = (),
    ) -> None:
        self.invocation_id = invocation_id
        self._by_index = {e.index: e for e in entries}
        self._attempts: dict[int, int] = {}
        for a in attempts:
            self._attempts[a.index] = max(self._attempts.get(a.index, 0), a.attempt)
        self._last_recorded = max(self._by_index, default=-1)
        self._next = 1  # entry 0 is the input

    @property
    def replaying(self) -> bool:
        """True while recorded entries lie ahead of the cursor."""
        return self._next <= self._last_recorded

    def take(self, kind: EntryKind, name: str) -> tuple[int, JournalEntry | None, int]:
        """Claim the next index.

        Returns ``(index, recorded entry or None, failed attempts so far)``.
        Raises :class:`NonDeterminismError` if the recorded entry differs.
        """
        index = self._next
        self._next = index + 1
        entry = self._by_index.get(index)
        if entry is not None and entry.kind is EntryKind.CANCEL:
            return index, entry, 0  # a cancellation was delivered here: the caller raises it
        if entry is not None and (entry.kind != kind or entry.name != name):
            raise NonDeterminismError(
                self.invocation_id, index, describe(entry.kind, entry.name), describe(kind, name)
            )
        return index, entry, self._attempts.get(index, 0)

    def rewind(self, index: int) -> None:
        """Un-claim ``index`` (the last one taken), to take it again."""
        assert self._next == index + 1
        self._next = index

    @property
    def next_index(self) -> int:
        return self._next

    def peek(self) -> JournalEntry | None:
        """The recorded entry at the next index, if any, without claiming it."""
        return self._by_index.get(self._next)

    def finish(self) -> int:
        """Claim the index of the output entry, checking nothing was left unreplayed."""
        index = self._next
        ahead = [e for i, e in self._by_index.items() if i >= index and e.kind != EntryKind.OUTPUT]
        if ahead:
            first = min(ahead, key=lambda e: e.index)
            raise NonDeterminismError(
                self.invocation_id,
                first.index,
                describe(first.kind, first.name),
                "the workflow to return",
            )
        self._next = index + 1
        return index

    def record(self, entry: JournalEntry) -> None:
        """Remember an entry recorded live, so a re-take of its index matches."""
        self._by_index[entry.index] = entry
        if entry.index > self._last_recorded:
            self._last_recorded = entry.index
