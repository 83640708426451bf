"""Time-ordered identifiers (UUIDv7, RFC 9562).

Journal rows are keyed by invocation id; ids that grow with time keep
inserts at the end of the B-tree, which batched inserts need to be fast
(random uuid4 keys cost 2-3x here).
"""

from __future__ import annotations

import os
import random
import threading
import time


class _UUID7:
    def __init__(self) -> None:
        # Seeded from the OS once (and again in a forked child): ids need to
        # be unique, not secret, and a syscall per id costs more than the rest.
        self._random = random.Random(os.urandom(16))
        os.register_at_fork(after_in_child=lambda: self._random.seed(os.urandom(16)))
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0

    def __call__(self) -> str:
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                self._counter += 1
                if self._counter > 0xFFF:  # counter exhausted: borrow the next ms
                    self._last_ms += 1
                    self._counter = 0
                ms = self._last_ms
            else:
                self._last_ms = ms
                self._counter = self._random.getrandbits(10)
            counter = self._counter
            rand = self._random.getrandbits(62)
        value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


new_id = _UUID7()
"""Return a new UUIDv7 string; later calls in a process sort after earlier ones."""
