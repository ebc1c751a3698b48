"""Finding a backend by name or URL.

``open_queue("local", maxsize=16)``, ``open_queue("redis", url=..., name=...)`` or
``open_queue(url="redis://host/0")``.  Built-in backends are imported lazily, so
the local backend never imports redis-py; third parties register a
:class:`~pcq.backends.base.Queue` subclass under the ``pcq.backends``
entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import urlsplit

from pcq.backends.base import Counters, Failure, Lease, Outcome, Queue
from pcq.errors import ConfigError

__all__ = ["Counters", "Failure", "Lease", "Outcome", "Queue", "backend_for", "open_queue"]

_BUILTIN = {
    "local": "pcq.backends.local:LocalQueue",
    "redis": "pcq.backends.redis:RedisQueue",
}
_SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis", "local": "local",
            "redis+sentinel": "redis", "rediss+sentinel": "redis"}


def _known() -> dict[str, str]:
    names = dict(_BUILTIN)
    for ep in entry_points(group="pcq.backends"):
        names.setdefault(ep.name, ep.value)
    return names


def backend_for(backend: str | None, url: str | None) -> str:
    """The backend name: ``backend`` if given, else the URL's scheme, else local."""
    if backend:
        return backend
    if not url:
        return "local"
    scheme = urlsplit(url).scheme
    if not scheme:
        raise ConfigError(f"cannot tell the backend from URL {url!r}: it has no scheme")
    return _SCHEMES.get(scheme, scheme)


def load_backend(name: str) -> type[Queue]:
    # A built-in name wins over any entry point, so it needs no scan of the
    # installed distributions' entry points (~10 ms with a hundred of them).
    target = _BUILTIN.get(name)
    if target is None:
        known = _known()
        target = known.get(name)
    if target is None:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown backend {name!r} (known: {', '.join(sorted(known))}){hint}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"backend {name!r} cannot be imported ({exc}); is its package installed?"
        ) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Queue)):
        raise ConfigError(f"backend {name!r} ({target}) is not a pcq Queue class")
    return cls


def open_queue(
    backend: str | None = None,
    *,
    url: str | None = None,
    name: str = "default",
    maxsize: int = 0,
    **options: Any,
) -> Queue:
    """Open the queue ``name`` on a backend chosen by name or by the URL's scheme."""
    if maxsize < 0:
        raise ConfigError(f"maxsize must be 0 (unbounded) or more, not {maxsize}")
    chosen = backend_for(backend, url)
    cls = load_backend(chosen)
    if url is not None:
        options["url"] = url
    return cls(name, maxsize=maxsize, **options)
