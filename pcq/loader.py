"""Resolving ``module:function`` and ``path/file.py:function`` specs."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from pcq.errors import ImportSpecError


def load_callable(spec: str, what: str = "function") -> Callable[..., Any]:
    """The callable named by ``spec``; ImportSpecError (one clear line) otherwise."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ImportSpecError(
            f"{what} {spec!r} must look like 'module:function' or 'path/file.py:function'"
        )
    if target.endswith(".py") or os.sep in target:
        module = _load_file(target, spec, what)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: the current dir is importable
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ImportSpecError(f"{what} {spec!r}: no module named {exc.name!r}") from exc
        except Exception as exc:
            raise ImportSpecError(
                f"{what} {spec!r}: importing {target!r} raised {type(exc).__name__}: {exc}"
            ) from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportSpecError(
                f"{what} {spec!r}: {target!r} has no attribute {attr!r}"
            ) from None
    if isinstance(obj, type):
        # Calling a class builds an object instead of doing the work: the job would
        # "succeed" with nothing done, so refuse it here, in one line.
        raise ImportSpecError(
            f"{what} {spec!r}: {attr!r} is a class, not a function "
            "(pass a function, or a method of an instance)"
        )
    if not callable(obj):
        raise ImportSpecError(f"{what} {spec!r}: {attr!r} is {_a(type(obj).__name__)}, "
                              "not a function")
    return obj  # type: ignore[no-any-return]


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a str"."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _load_file(path: str, spec: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise ImportSpecError(f"{what} {spec!r}: no such file {path!r}")
    name = "pcq_user_" + os.path.splitext(os.path.basename(path))[0]
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == os.path.abspath(path):
        # One file, one module: a --setup and a HANDLER from the same file share
        # its globals (the client setup opens is the one the handler uses).
        return loaded
    module_spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    if module_spec is None or module_spec.loader is None:
        raise ImportSpecError(f"{what} {spec!r}: cannot load {path!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    # Registered so that pickling (spawn start method) and child processes find it.
    sys.modules[name] = module
    directory = os.path.dirname(os.path.abspath(path))
    if directory not in sys.path:
        sys.path.insert(0, directory)  # the file's siblings import as they would from it
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ImportSpecError(
            f"{what} {spec!r}: running {path!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    return module
