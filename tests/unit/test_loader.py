"""Resolving PRODUCER / HANDLER specs: what loads, and one clear line for what does not."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcq.errors import ConfigError, ImportSpecError
from pcq.loader import load_callable


@pytest.fixture
def clean_imports() -> Iterator[None]:
    """Undo what loading user modules adds to sys.path and sys.modules."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def test_a_module_function() -> None:
    assert load_callable("json:dumps") is json.dumps


def test_a_dotted_attribute() -> None:
    assert load_callable("os:path.join") is os.path.join


def test_a_file_function_that_imports_its_sibling(tmp_path: Path, clean_imports: None) -> None:
    (tmp_path / "sibling_helper.py").write_text("FACTOR = 3\n")
    (tmp_path / "job.py").write_text(
        "import sibling_helper\n\ndef handle(x):\n    return x * sibling_helper.FACTOR\n"
    )

    handle = load_callable(f"{tmp_path / 'job.py'}:handle")

    assert handle(2) == 6


def test_a_module_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_imports: None
) -> None:
    (tmp_path / "cwd_app_for_pcq_test.py").write_text("def produce():\n    return [1, 2]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])

    produce = load_callable("cwd_app_for_pcq_test:produce")

    assert list(produce()) == [1, 2]


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("no_colon_here", "must look like 'module:function'"),
        (":handle", "must look like"),
        ("module:", "must look like"),
        ("pcq_no_such_module_xyz:handle", "no module named 'pcq_no_such_module_xyz'"),
        ("json:no_such_function", "'json' has no attribute 'no_such_function'"),
        ("json.decoder:JSONDecoder.nope", "has no attribute 'JSONDecoder.nope'"),
        ("sys:maxsize", "'maxsize' is an int, not a function"),
        ("os:sep", "'sep' is a str, not a function"),
        ("json:JSONDecoder", "'JSONDecoder' is a class, not a function"),
        ("missing/dir/job.py:handle", "no such file 'missing/dir/job.py'"),
    ],
)
def test_a_bad_spec_is_one_clear_line(spec: str, words: str) -> None:
    with pytest.raises(ImportSpecError) as info:
        load_callable(spec, "HANDLER")

    message = str(info.value)
    assert message.startswith(f"HANDLER {spec!r}")
    assert words in message
    assert "\n" not in message
    assert isinstance(info.value, ConfigError)


def test_a_module_that_raises_on_import(tmp_path: Path, clean_imports: None) -> None:
    (tmp_path / "pcq_broken_mod_xyz.py").write_text("raise RuntimeError('broken on import')\n")
    sys.path.insert(0, str(tmp_path))

    with pytest.raises(ImportSpecError, match="importing 'pcq_broken_mod_xyz' raised "
                       "RuntimeError: broken on import"):
        load_callable("pcq_broken_mod_xyz:handle")


def test_a_file_that_raises_is_not_left_half_loaded(tmp_path: Path, clean_imports: None) -> None:
    path = tmp_path / "broken_job.py"
    path.write_text("def handle(x):\n    pass\n\n1 / 0\n")

    with pytest.raises(ImportSpecError, match="raised ZeroDivisionError"):
        load_callable(f"{path}:handle")

    assert "pcq_user_broken_job" not in sys.modules


def test_a_module_missing_a_dependency_names_the_dependency(
    tmp_path: Path, clean_imports: None
) -> None:
    (tmp_path / "pcq_needs_dep_xyz.py").write_text("import pcq_absent_dependency_xyz\n")
    sys.path.insert(0, str(tmp_path))

    with pytest.raises(ImportSpecError, match="no module named 'pcq_absent_dependency_xyz'"):
        load_callable("pcq_needs_dep_xyz:handle")
