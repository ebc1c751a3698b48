"""The ``pcq`` command's options: the ``Annotated`` types several commands
share, and the parsers of per-stage values (``--workers 8,4,1``).

Apart from cli.py so that a command function reads as what it does; every
option's name, metavar, help text and bounds are defined once, here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from pcq import __version__, logs
from pcq.cli_help import click_context

# Options shared by several commands.  Every value shows a metavar that says
# what to type (N, SECONDS, URL), never a Python type (see cli_help).
Backend = Annotated[str | None, typer.Option(
    metavar="local|redis", help="Default: from the URL's scheme, else local.")]
SharedBackend = Annotated[str | None, typer.Option(
    "--backend", metavar="redis",
    help="A backend with a server (a local queue lives only inside `pcq run`); "
         "default: from the URL's scheme.")]
Url = Annotated[str | None, typer.Option(
    envvar="PCQ_URL", metavar="URL",
    help="Queue server, e.g. redis://host:6379/0 (env PCQ_URL).")]
Name = Annotated[str, typer.Option("--queue", envvar="PCQ_QUEUE", metavar="NAME",
                                   help="Queue name (env PCQ_QUEUE).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Workers = Annotated[int, typer.Option(min=1, metavar="N", help="Consumer processes.")]
Retries = Annotated[int, typer.Option(min=0, metavar="N",
                                      help="Retries of a failing task before it is dead.")]
Timeout = Annotated[float | None, typer.Option(
    min=0.001, metavar="SECONDS", help="Seconds a task may run; longer counts as a failed "
                                       "attempt.")]
Concurrency = Annotated[int, typer.Option(
    min=1, metavar="N", help="Tasks each consumer process runs at once: threads, or asyncio "
                             "tasks for an async def handler. For handlers that wait "
                             "(network, disk).")]
Maxsize = Annotated[int, typer.Option(min=0, metavar="N",
                                      help="Tasks waiting at most (0: unbounded).")]
MaxDeliveries = Annotated[int, typer.Option(
    min=0, metavar="N", help="Dead-letter a task once this many consumers died while "
                             "handling it (0: never).")]
Setup = Annotated[str | None, typer.Option(
    "--setup", metavar="MODULE:FUNCTION",
    help="module:function or path/file.py:function run once in each consumer "
         "process before its first task (open clients there); if it raises, "
         "the job stops with exit code 2.")]
HeartbeatTtl = Annotated[float | None, typer.Option(
    min=0.1, envvar="PCQ_HEARTBEAT_TTL", metavar="SECONDS",
    help="Redis: seconds without a heartbeat after which a consumer counts as dead "
         "and its tasks go back (default 5; env PCQ_HEARTBEAT_TTL).")]
ReconnectTimeout = Annotated[float | None, typer.Option(
    min=0.1, envvar="PCQ_RECONNECT_TIMEOUT", metavar="SECONDS",
    help="Redis: seconds to keep reconnecting after the link is lost before giving up "
         "with exit code 3 (default 60; env PCQ_RECONNECT_TIMEOUT).")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bar.")]


def link_options(heartbeat_ttl: float | None,
                 reconnect_timeout: float | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if heartbeat_ttl is not None:
        options["heartbeat_ttl"] = heartbeat_ttl
    if reconnect_timeout is not None:
        options["retry_for"] = reconnect_timeout
    return options


def parse_values(text: str, kind: type[Any], least: float) -> list[Any]:
    """``8,4,1`` -> [8, 4, 1]; ``none`` stands for no limit (``--timeout``)."""
    try:
        values = [None if kind is float and v.strip().lower() == "none" else kind(v)
                  for v in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give a number, or one per stage separated "
                                 "by commas") from None
    if any(v is not None and v < least for v in values):
        raise typer.BadParameter(f"{text!r}: every value must be at least {least:g}")
    return values


def checked(kind: type[Any], least: float) -> Callable[[str | None], str | None]:
    """A Typer callback that checks a per-stage option while the line is parsed
    (a usage error, exit 2, with the usage line)."""
    def check(text: str | None) -> str | None:
        if text is not None:
            parse_values(text, kind, least)
        return text
    return check


def stage_values(text: str, stages: int, option: str, kind: type[Any]) -> list[Any]:
    """``--workers 8,4,1``: one value per stage, or one for all of them."""
    values = parse_values(text, kind, float("-inf"))
    if len(values) not in (1, stages):
        # A usage error (exit 2 with the usage line), as when the value is parsed.
        stages_are = "1 stage" if stages == 1 else f"{stages} stages"
        raise typer.BadParameter(
            f"{text!r}: {len(values)} values for {stages_are}: give one value, or one "
            "per stage", ctx=click_context(), param_hint=f"'{option}'")
    return values * stages if len(values) == 1 else values


# `pcq run`'s options that take one value per stage (``8,4,1``), checked while
# the line is parsed (see checked()).
StageWorkers = Annotated[str, typer.Option(
    callback=checked(int, 1), metavar="N[,N...]",
    help="Consumer processes: one number, or one per stage (8,4,1).")]
Producers = Annotated[int, typer.Option(min=1, metavar="N",
                                        help="Producer processes; each runs PRODUCER once.")]
StageMaxsize = Annotated[str, typer.Option(
    callback=checked(int, 0), metavar="N[,N...]",
    help="Tasks waiting at most (0: unbounded); one number or one per stage.")]
StageRetries = Annotated[str, typer.Option(
    callback=checked(int, 0), metavar="N[,N...]",
    help="Retries of a failing task before it is dead; one number or one per stage.")]
StageTimeout = Annotated[str | None, typer.Option(
    callback=checked(float, 0.001), metavar="SECONDS[,...]",
    help="Seconds a task may run; longer counts as a failed attempt.  One number "
         "or one per stage (none: no limit).")]
StageConcurrency = Annotated[str, typer.Option(
    callback=checked(int, 1), metavar="N[,N...]",
    help="Tasks each consumer process runs at once: threads, or asyncio tasks for an "
         "async def handler. For handlers that wait (network, disk). One number or one "
         "per stage (1,50,1).")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Redis: finish the tasks an interrupted run left on the queue, "
                     "without running PRODUCER again.")]
DashboardAt = Annotated[str | None, typer.Option(
    "--dashboard", metavar="[HOST:]PORT",
    help="Serve a live page of this job's queues, and /metrics, while it runs "
         "(host default 127.0.0.1).")]


def _set_log_level(value: str | None) -> None:
    if value is not None:
        if value.lower() not in logs.LEVELS:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(logs.LEVELS)}")
        logs.configure(value)


def _show_version(value: bool) -> None:
    if value:
        print(f"pcq {__version__}")
        raise typer.Exit(0)


def global_options(
    log_level: Annotated[str | None, typer.Option(
        "--log-level", envvar="PCQ_LOG_LEVEL", is_eager=True, callback=_set_log_level,
        metavar="LEVEL",
        help=f"One of {', '.join(logs.LEVELS)} (default {logs.DEFAULT_LEVEL}; "
             "env PCQ_LOG_LEVEL).",
    )] = None,
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_show_version, help="Show pcq's version and exit.",
    )] = False,
) -> None:
    """Where Typer builds the two options every command shares (see
    cli.command(), which adds them to every command)."""
