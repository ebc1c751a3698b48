"""The ``pcq`` command: parse, delegate to the library, turn errors into exit codes.

Exit codes: 0 all done, 1 some tasks failed, 2 usage or configuration error
(a consumer's ``--setup`` that raised included), 3 the backend was lost mid-run
(unreachable past --reconnect-timeout, or it lost the queue's data), 128 +
signal when interrupted (130 for Ctrl-C, 143 for SIGTERM).

An error is one line on stderr, ``pcq: error: WHAT``; a usage error adds the
command's usage line and where to find help.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live

from pcq import __version__, dashboard, logs
from pcq.backends import backend_for, open_queue
from pcq.backends.base import Queue
from pcq.cli_help import click_context, plain_help
from pcq.cli_status import status_json as _status_json
from pcq.cli_status import status_tables as _status_tables
from pcq.consume_watch import ConsumeWatch
from pcq.envelope import short_repr
from pcq.errors import BackendLost, ConfigError, PcqError
from pcq.garbage import SKIPPED_READ, garbage_in, skipped_lines
from pcq.interrupted import left_open_note, nothing, resume_check
from pcq.loader import load_callable
from pcq.pipeline import stage_queue
from pcq.progress import Display, line_buffered
from pcq.run import consume_job, produce_job, run
from pcq.settings import ExitCode, StageSettings
from pcq.summary import Summary

app = typer.Typer(
    name="pcq",
    help="Producer -> many-consumer work queues, on one machine or across many.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
dead_app = typer.Typer(help="Dead letters: tasks that failed after their retries.",
                       no_args_is_help=True)
app.add_typer(dead_app, name="dead")
err = Console(stderr=True)

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


def _options(heartbeat_ttl: float | None, reconnect_timeout: float | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if heartbeat_ttl is not None:
        options["heartbeat_ttl"] = heartbeat_ttl
    if reconnect_timeout is not None:
        options["retry_for"] = reconnect_timeout
    return options


def _shared_queue(
    backend: str | None, url: str | None, name: str, maxsize: int = 0, **options: Any
) -> Queue:
    """A queue other processes can reach: local queues live only inside `pcq run`."""
    if backend_for(backend, url) == "local":
        raise ConfigError(
            "this command needs a shared queue: give --url redis://HOST:PORT/DB "
            "(or PCQ_URL); a local queue lives only inside `pcq run`"
        )
    return open_queue(backend, url=url, name=name, maxsize=maxsize, **options)


@contextmanager
def _opened(
    backend: str | None, url: str | None, name: str, *, reading: bool = False
) -> Iterator[Queue]:
    """A shared queue for one admin command, disposed of when it is done.
    ``reading``: the command only reads, and the queue must exist (reading never
    writes: a Redis queue opened to read creates no key)."""
    only_reads = reading and backend_for(backend, url) == "redis"
    q = _shared_queue(backend, url, name, **({"read_only": True} if only_reads else {}))
    try:
        if reading and not q.exists():  # a misspelled --queue would otherwise show zeros
            raise ConfigError(f"queue {name!r} does not exist on this server (nothing was "
                              "ever put in it, and no consumer or producer is attached)")
        yield q
    finally:
        q.dispose()


def _report(summary: Summary, as_json: bool, what: str, note: str = "",
            waited: float = 0.0) -> None:
    """The job's summary: one line on stderr (``note`` ends it), the failures
    below it; or one JSON object on stdout.  ``waited``: seconds of it with
    nothing to do (waiting for a producer), left out of the rate."""
    if summary.setup_error:
        err.print(f"pcq: error: {summary.setup_error}", highlight=False, soft_wrap=True,
                  markup=False)
    garbage = garbage_in(summary)
    if as_json:
        out = {**summary.as_dict(), "garbage": garbage, "waited_s": round(waited, 3)}
        print(json.dumps(out), flush=True)
        return
    err.print(_summary_line(summary, what, garbage, note, waited), highlight=False,
              soft_wrap=True, markup=False)
    for failure in summary.failures:
        err.print(f"  failed: {failure['item']}: {failure['error']}", highlight=False,
                  soft_wrap=True, markup=False)
    if summary.failures_more:
        err.print(f"  ... and {summary.failures_more} more failed", highlight=False)
    for stage in summary.stages:
        err.print(f"  stage {stage.name} ({stage.queue}, {stage.workers} worker(s)): "
                  f"{stage.produced} produced, {stage.done} done, {stage.failed} failed, "
                  f"{stage.retried} retried", highlight=False, soft_wrap=True)


def _summary_line(summary: Summary, what: str, garbage: int, note: str, waited: float) -> str:
    waited = min(waited, summary.elapsed_s)  # the watch starts a moment before the job
    working = summary.elapsed_s - waited
    rate = summary.done / working if working > 0 else 0.0
    parts = [f"{summary.produced} produced"] if summary.produced or what != "consume" else []
    parts += [f"{summary.done} done", f"{summary.failed} failed", f"{summary.retried} retried"]
    if garbage:  # said one by one as they were met; see `pcq dead list`
        parts.append(f"{garbage} not a task (dead-lettered)")
    line = f"pcq {what}: " + ", ".join(parts) + f" in {summary.elapsed_s:.2f} s ({rate:,.0f}/s"
    line += f"; {waited:.2f} s of it with nothing to do)" if waited >= 0.05 else ")"
    if summary.restarts:
        line += f"; {summary.restarts} consumer(s) restarted"
    if summary.producer_errors:
        line += f"; {summary.producer_errors} producer(s) failed"
    if summary.interrupted is not None:
        line += "; interrupted"
    return line + (f": {note}" if note else "")


def _values(text: str, kind: type[Any], least: float) -> list[Any]:
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


def _checked(kind: type[Any], least: float) -> Callable[[str | None], str | None]:
    """A Typer callback that checks a per-stage option while the line is parsed
    (a usage error, exit 2, with the usage line)."""
    def check(text: str | None) -> str | None:
        if text is not None:
            _values(text, kind, least)
        return text
    return check


def _per_stage(text: str, stages: int, option: str, kind: type[Any]) -> list[Any]:
    """``--workers 8,4,1``: one value per stage, or one for all of them."""
    values = _values(text, kind, float("-inf"))
    if len(values) not in (1, stages):
        # A usage error (exit 2 with the usage line), as when the value is parsed.
        stages_are = "1 stage" if stages == 1 else f"{stages} stages"
        raise typer.BadParameter(
            f"{text!r}: {len(values)} values for {stages_are}: give one value, or one "
            "per stage", ctx=click_context(), param_hint=f"'{option}'")
    return values * stages if len(values) == 1 else values


@app.command("run")
def run_command(
    producer: Annotated[str, typer.Argument(
        metavar="PRODUCER", help="module:function or path/file.py:function returning an "
                                 "iterable of tasks.")],
    handlers: Annotated[list[str], typer.Argument(
        metavar="HANDLER",
        help="module:function or path/file.py:function called with each task; several "
             "make a pipeline: what one returns or yields is a task of the next.")],
    workers: Annotated[str, typer.Option(callback=_checked(int, 1), metavar="N[,N...]",
                                         help="Consumer "
                                         "processes: one number, or one per stage (8,4,1).")
                       ] = "4",
    producers: Annotated[int, typer.Option(min=1, metavar="N",
                                           help="Producer processes; each runs "
                                           "PRODUCER once.")] = 1,
    maxsize: Annotated[str, typer.Option(callback=_checked(int, 0), metavar="N[,N...]",
                                         help="Tasks waiting "
                                         "at most (0: unbounded); one number or one per "
                                         "stage.")] = "1000",
    backend: Backend = None,
    url: Url = None,
    queue: Name = "default",
    retries: Annotated[str, typer.Option(callback=_checked(int, 0), metavar="N[,N...]",
                                         help="Retries of a "
                                         "failing task before it is dead; one number or one "
                                         "per stage.")] = "0",
    timeout: Annotated[str | None, typer.Option(
        callback=_checked(float, 0.001), metavar="SECONDS[,...]",
        help="Seconds a task may run; longer counts as a failed attempt.  One number "
             "or one per stage (none: no limit).")] = None,
    concurrency: Annotated[str, typer.Option(
        callback=_checked(int, 1), metavar="N[,N...]",
        help="Tasks each consumer process runs at once: threads, or asyncio tasks for an "
             "async def handler. For handlers that wait (network, disk). One number or one "
             "per stage (1,50,1).")] = "1",
    as_json: Json = False,
    no_progress: NoProgress = False,
    heartbeat_ttl: HeartbeatTtl = None,
    reconnect_timeout: ReconnectTimeout = None,
    max_deliveries: MaxDeliveries = 3,
    setup: Setup = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Redis: finish the tasks an interrupted run left on the queue, "
                         "without running PRODUCER again.")] = False,
    dashboard_at: Annotated[str | None, typer.Option(
        "--dashboard", metavar="[HOST:]PORT",
        help="Serve a live page of this job's queues, and /metrics, while it runs "
             "(host default 127.0.0.1).")] = None,
) -> None:
    """Run a whole job — producers, consumers (of every stage), close, summary — on
    this host (local by default)."""
    produce = load_callable(producer, "PRODUCER")
    handles = [load_callable(h, "HANDLER") for h in handlers]
    n = len(handles)
    setup_fn = None if setup is None else load_callable(setup, "SETUP")
    shared = backend_for(backend, url) != "local"
    # local consumers have no heartbeat and no server to reconnect to
    options = _options(heartbeat_ttl, reconnect_timeout) if shared else {}
    names = [h.rsplit(":", 1)[-1] for h in handlers]
    if not _leftovers_said(backend, url, queue, resume, shared):
        return
    produce = nothing if resume else produce
    stage_queues = [stage_queue(queue, k) for k in range(n)]
    with dashboard.for_job(dashboard_at, backend, url, stage_queues) as on_dashboard, \
            Display(not no_progress) as display:
        options.update(on_dashboard)  # local: the job's queues live on the dashboard's broker
        summary = run(produce, *handles, workers=_per_stage(workers, n, "--workers", int),
                      producers=producers, maxsize=_per_stage(maxsize, n, "--maxsize", int),
                      retries=_per_stage(retries, n, "--retries", int),
                      timeout=_per_stage(timeout or "none", n, "--timeout", float),
                      backend=backend, url=url, queue=queue, names=names,
                      on_progress=display.update,
                      concurrency=_per_stage(concurrency, n, "--concurrency", int),
                      max_deliveries=max_deliveries, setup=setup_fn, **options)
    _report(summary, as_json, "run")
    raise typer.Exit(summary.exit_code)


def _leftovers_said(backend: str | None, url: str | None, name: str, resume: bool,
                    shared: bool) -> bool:
    """Say what a run will do with an interrupted run's leftovers on a shared
    queue; False when there is nothing to do (``--resume`` of a finished queue)."""
    if not shared:
        return resume_check(None, name, resume)[1]
    with _opened(backend, url, name) as q:
        line, go = resume_check(q, name, resume)
    if line is not None:
        err.print(line, highlight=False, soft_wrap=True, markup=False)
    return go


def _json_lines(stream: Any) -> Iterator[Any]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"stdin line {number} is not JSON ({exc.msg}); the {number - 1} lines before "
                "it were put, the queue was left open"
            ) from None


@app.command("produce")
def produce_command(
    producer: Annotated[str, typer.Argument(
        metavar="PRODUCER", help="module:function, path/file.py:function, or - for one JSON "
                                 "value per line on stdin.")],
    backend: SharedBackend = None,
    url: Url = None,
    queue: Name = "default",
    maxsize: Maxsize = 0,
    no_close: Annotated[bool, typer.Option("--no-close", help="Leave the queue open for "
                                           "more producers.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once everything is "
                                          "put, without waiting for the consumers.")] = False,
    as_json: Json = False,
    no_progress: NoProgress = False,
    heartbeat_ttl: HeartbeatTtl = None,
    reconnect_timeout: ReconnectTimeout = None,
) -> None:
    """Put tasks on a shared queue, close it when the last producer is done, and
    wait until every task is acknowledged."""
    items = _json_lines(sys.stdin) if producer == "-" else load_callable(producer, "PRODUCER")()
    q = _shared_queue(backend, url, queue, maxsize, **_options(heartbeat_ttl, reconnect_timeout))
    try:
        with Display(not no_progress) as display:
            summary = produce_job(q, items, close=not no_close, wait_done=not no_wait,
                                  on_progress=display.update)
        note = left_open_note(q, summary, queue)
    finally:
        q.dispose()
    _report(summary, as_json, "produce", note)
    raise typer.Exit(summary.exit_code)


@app.command("consume")
def consume_command(
    handler: Annotated[str, typer.Argument(
        metavar="HANDLER", help="module:function or path/file.py:function called with "
                                "each task.")],
    workers: Workers = 4,
    backend: SharedBackend = None,
    url: Url = None,
    queue: Name = "default",
    retries: Retries = 0,
    timeout: Timeout = None,
    concurrency: Concurrency = 1,
    as_json: Json = False,
    heartbeat_ttl: HeartbeatTtl = None,
    reconnect_timeout: ReconnectTimeout = None,
    max_deliveries: MaxDeliveries = 3,
    burst: Annotated[bool, typer.Option("--burst", help="Exit as soon as there is nothing "
                                        "to take and no producer is attached, instead of "
                                        "waiting for the next producer.")] = False,
    setup: Setup = None,
    no_progress: NoProgress = False,
    to: Annotated[str | None, typer.Option(
        "--to", metavar="NAME",
        help="A stage: put what HANDLER returns (or yields) on this queue, same "
             "server; it closes when --queue is closed and fully acknowledged.")] = None,
) -> None:
    """Run consumer processes on this host until each takes its sentinel.  On an
    idle queue (its last run finished) they wait for the next producer."""
    handle = load_callable(handler, "HANDLER")
    setup_fn = None if setup is None else load_callable(setup, "SETUP")
    q = _shared_queue(backend, url, queue, max_deliveries=max_deliveries,
                      **_options(heartbeat_ttl, reconnect_timeout))
    target = q.sibling(to) if to is not None else None
    try:
        # In this process: fails fast if the server cannot be reached.
        if not burst and q.state() == "idle":
            err.print(f"pcq consume: queue {queue!r} is idle; waiting for a producer",
                      highlight=False, soft_wrap=True)
        settings = StageSettings(workers=workers, concurrency=concurrency, retries=retries,
                                 timeout=timeout, max_deliveries=max_deliveries, setup=setup_fn)
        with Display(not no_progress) as display, ConsumeWatch(
                q, display.update, display.enabled) as watch:
            summary = consume_job(q, handle, settings, burst=burst, to=target)
    finally:
        if target is not None:
            target.dispose()
        q.dispose()
    _report(summary, as_json, "consume", waited=watch.waited_s)
    raise typer.Exit(summary.exit_code)


@app.command("status")
def status_command(
    backend: SharedBackend = None,
    url: Url = None,
    queue: Name = "default",
    as_json: Json = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every second "
                                        "until Ctrl-C.")] = False,
) -> None:
    """Show a queue's counters, consumers and producers — and those of every queue
    its stages feed, for a pipeline."""
    with _opened(backend, url, queue, reading=True) as q:
        if not watch:
            if as_json:
                print(json.dumps(_status_json(q)))
            else:
                Console().print(_status_tables(q))
            return
        try:
            if as_json:  # one JSON object a line, every second
                while True:
                    print(json.dumps(_status_json(q)), flush=True)
                    time.sleep(1.0)
            with Live(_status_tables(q), console=Console(), auto_refresh=False) as live:
                while True:
                    time.sleep(1.0)
                    live.update(_status_tables(q), refresh=True)
        except KeyboardInterrupt:
            return


@app.command("close")
def close_command(backend: SharedBackend = None, url: Url = None, queue: Name = "default") -> None:
    """Close a queue by hand: one sentinel per live consumer, behind all tasks."""
    with _opened(backend, url, queue) as q:
        q.close()
    err.print(f"pcq: closed queue {queue!r}", highlight=False)


@app.command("purge")
def purge_command(
    backend: SharedBackend = None,
    url: Url = None,
    queue: Name = "default",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation "
                                      "when consumers are attached.")] = False,
) -> None:
    """Drop every waiting task and reset the queue's counters.  On a terminal, asks
    first when consumers are attached (their work in progress is dropped too)."""
    with _opened(backend, url, queue) as q:
        if not yes and not _purge_confirmed(q, queue):
            err.print(f"pcq: nothing purged from {queue!r}", highlight=False)
            raise typer.Exit(1)
        purged = q.purge()
    err.print(f"pcq: purged {purged} task(s) from {queue!r}", highlight=False)


def _purge_confirmed(q: Queue, name: str) -> bool:
    """Whether the person at the terminal confirms purging ``q`` while consumers
    are attached; True off a terminal (scripts) and when none is attached."""
    consumers = q.counters().consumers
    if not consumers or not sys.stdin.isatty():
        return True
    return typer.confirm(f"queue {name!r} has {consumers} consumer(s) attached; drop its "
                         "tasks, in flight included?", default=False, err=True)


@app.command("dashboard")
def dashboard_command(
    url: Url = None,
    host: Annotated[str, typer.Option(help="Address to serve on; anything but loopback "
                                      "shows the queues to whoever reaches it.")
                    ] = dashboard.DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")
                    ] = dashboard.DEFAULT_PORT,
    allow_actions: Annotated[bool, typer.Option(
        "--allow-actions", help="Let the page requeue dead letters and close queues, with "
                                "the token printed at start.")] = False,
    auth: Annotated[str | None, typer.Option(
        envvar="PCQ_DASHBOARD_AUTH", metavar="USER:PASS",
        help="Ask every visitor for this basic auth (env PCQ_DASHBOARD_AUTH).")] = None,
) -> None:
    """Serve a live web page of every queue and pipeline on a server, and /metrics
    for Prometheus, until Ctrl-C.  Read-only unless --allow-actions."""
    try:
        dashboard.serve(url, host, port, allow_actions=allow_actions, auth=auth)
    except KeyboardInterrupt:
        return


@dead_app.command("list")
def dead_list(
    backend: SharedBackend = None,
    url: Url = None,
    queue: Name = "default",
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="Show at most this many.")
                     ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line on "
                                          "stdout, one per dead letter.")] = False,
) -> None:
    """List dead letters, oldest first: one line each on stdout with the task, the
    attempts made and the last error (a message that was no pcq task: its bytes)."""
    with _opened(backend, url, queue, reading=True) as q:
        letters = q.dead_letters(limit)
    if not letters and not as_json:
        err.print(f"pcq: no dead letters in queue {queue!r}", highlight=False)
    for letter in letters:
        if as_json:
            print(json.dumps(letter, default=repr))
        elif "body" in letter:
            # Like the consumer's log line: content, attempts made, error.
            print(f"{letter.get('id')}: task {short_repr(letter['body'])}, "
                  f"{letter.get('attempts')} attempt(s): {letter.get('error')}")
        else:
            print(f"(undecodable message): {letter.get('error')}  raw={letter.get('raw')!r}")


@dead_app.command("requeue")
def dead_requeue(backend: SharedBackend = None, url: Url = None, queue: Name = "default") -> None:
    """Put every dead-lettered task back in the queue with its attempts reset."""
    with _opened(backend, url, queue) as q:
        requeued = q.requeue_dead()
        skipped, lines = skipped_lines(q.dead_letters(min(q.counters().dead, SKIPPED_READ)))
    err.print(f"pcq: requeued {requeued} dead task(s)", highlight=False)
    if skipped:  # what requeue_dead leaves: letters that hold no task
        err.print(f"pcq: left {skipped} dead letter(s) that hold no task (messages "
                  "that were never pcq tasks: nothing to requeue; `pcq dead purge` deletes "
                  "them):", highlight=False, soft_wrap=True, markup=False)
        for line in lines:
            err.print(line, highlight=False, soft_wrap=True, markup=False)


@dead_app.command("purge")
def dead_purge(backend: SharedBackend = None, url: Url = None, queue: Name = "default") -> None:
    """Delete every dead letter."""
    with _opened(backend, url, queue) as q:
        deleted = q.purge_dead()
    err.print(f"pcq: deleted {deleted} dead letter(s)", highlight=False)


def _set_log_level(value: str | None) -> None:
    if value is not None:
        if value.lower() not in logs.LEVELS:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(logs.LEVELS)}")
        logs.configure(value)


def _show_version(value: bool) -> None:
    if value:
        print(f"pcq {__version__}")
        raise typer.Exit(0)


def _log_level_option(
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
    """Where Typer builds the two options every command shares (see command())."""


def command() -> Any:
    """The ``pcq`` command: the Typer app, with ``--version`` on ``pcq`` itself and
    ``--log-level`` on every command, added here so that no command function
    has to take (and pass around) an option that only configures logging."""
    shared = typer.Typer()
    shared.command()(_log_level_option)
    params = {p.name: p for p in typer.main.get_command(shared).params}
    log_level, version = params["log_level"], params["version"]
    log_level.expose_value = version.expose_value = False
    cli = typer.main.get_command(app)
    cli.params.extend([version, log_level])
    plain_help(cli)

    def add(group: Any) -> None:
        for sub in getattr(group, "commands", {}).values():
            sub.params.append(log_level)
            add(sub)

    add(cli)
    return cli


#: Typer re-exports only some of click's exceptions; every usage error (unknown
#: option, bad value, missing argument) derives from BadParameter's base class.
UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _usage_error(exc: Any) -> None:
    """Two lines: ``pcq: error: WHAT`` and the command's usage, with where to find help."""
    err.print(f"pcq: error: {exc.format_message()}", highlight=False, soft_wrap=True,
              markup=False)
    if exc.ctx is not None:
        usage = " ".join(exc.ctx.get_usage().split())
        err.print(f"{usage}  (see {exc.ctx.command_path} -h)", highlight=False,
                  soft_wrap=True, markup=False)


def main(args: list[str] | None = None) -> None:
    """Entry point: a PcqError is one line on stderr and exit code 2 (3 for a
    backend lost mid-run), never a traceback."""
    line_buffered()  # forked consumers inherit it: their lines never interleave
    logs.configure()  # after: its handler writes to the line-buffered stderr
    try:
        code = command().main(args, prog_name="pcq", standalone_mode=False)
    except BackendLost as exc:
        err.print(f"pcq: error: {exc}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(ExitCode.BACKEND_LOST)
    except PcqError as exc:
        err.print(f"pcq: error: {exc}", highlight=False, soft_wrap=True, markup=False)
        sys.exit(ExitCode.USAGE)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `pcq`, `pcq dead`: the help
            print(exc.ctx.get_help(), file=sys.stderr)  # type: ignore[attr-defined]
        else:
            _usage_error(exc)
        sys.exit(ExitCode.USAGE)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
