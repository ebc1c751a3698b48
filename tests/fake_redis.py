"""fakeredis for the fast unit tests, with the one command it gets wrong fixed."""

from __future__ import annotations

from typing import Any

import fakeredis


class FakeRedis(fakeredis.FakeRedis):
    """fakeredis 2.41 answers BLMOVE at once instead of blocking; BRPOPLPUSH is
    the same move (source right, destination left) and does block."""

    def blmove(self, first_list: Any, second_list: Any, timeout: Any, src: Any = "LEFT",
               dest: Any = "RIGHT") -> Any:  # fmt: skip
        assert (src, dest) == ("RIGHT", "LEFT")
        return self.brpoplpush(first_list, second_list, timeout)
