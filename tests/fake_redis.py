"""fakeredis for the fast unit tests, with the one command it gets wrong fixed."""

from __future__ import annotations

import time
from typing import Any

import fakeredis


class FakeRedis(fakeredis.FakeRedis):
    """fakeredis 2.41 answers BLMOVE at once instead of blocking.  pcq's only
    BLMOVE is ``BLMOVE ready ready RIGHT RIGHT`` (wait until ready holds an
    element, move nothing): this waits for that, a few ms at a time."""

    def blmove(self, first_list: Any, second_list: Any, timeout: Any, src: Any = "LEFT",
               dest: Any = "RIGHT") -> Any:  # fmt: skip
        assert (first_list, src, dest) == (second_list, "RIGHT", "RIGHT")
        deadline = time.monotonic() + float(timeout)
        while True:
            last = self.lindex(first_list, -1)
            if last is not None or time.monotonic() >= deadline:
                return last
            time.sleep(0.002)
