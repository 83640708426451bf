"""Time-ordered identifiers (UUIDv7, RFC 9562).

Journal rows are keyed by invocation id; ids that grow with time keep
inserts at the end of the B-tree, which batched inserts need to be fast
(random uuid4 keys cost 2-3x here).
"""

from __future__ import annotations

import os
import threading
import time


class _UUID7:
    def __init__(self) -> None:
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
                self._counter = int.from_bytes(os.urandom(2)) & 0x3FF
            counter = self._counter
        rand = int.from_bytes(os.urandom(8)) & 0x3FFF_FFFF_FFFF_FFFF
        value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | rand
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


new_id = _UUID7()
"""Return a new UUIDv7 string; later calls in a process sort after earlier ones."""
