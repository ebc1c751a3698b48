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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live

from pcq import dashboard, logs
from pcq.backends import backend_for
from pcq.cli_help import plain_help
from pcq.cli_options import (
    Backend,
    Concurrency,
    DashboardAt,
    HeartbeatTtl,
    Json,
    MaxDeliveries,
    Maxsize,
    Name,
    NoProgress,
    Producers,
    ReconnectTimeout,
    Resume,
    Retries,
    Setup,
    SharedBackend,
    StageConcurrency,
    StageMaxsize,
    StageRetries,
    StageTimeout,
    StageWorkers,
    Timeout,
    Url,
    Workers,
    global_options,
    link_options,
    stage_values,
)
from pcq.cli_queues import json_lines, leftovers_said, opened, purge_confirmed, shared_queue
from pcq.cli_report import err, report, usage_error
from pcq.cli_status import status_json as _status_json
from pcq.cli_status import status_tables as _status_tables
from pcq.consume_watch import ConsumeWatch
from pcq.envelope import short_repr
from pcq.errors import BackendLost, PcqError
from pcq.garbage import SKIPPED_READ, skipped_lines
from pcq.interrupted import left_open_note, nothing
from pcq.loader import load_callable
from pcq.pipeline import stage_queue
from pcq.progress import Display, line_buffered
from pcq.run import consume_job, produce_job, run
from pcq.settings import ExitCode, StageSettings

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



















# A Typer command: each parameter is one of its options.
@app.command("run")
def run_command(  # noqa: PLR0913
    producer: Annotated[str, typer.Argument(
        metavar="PRODUCER", help="module:function or path/file.py:function returning an "
                                 "iterable of tasks.")],
    handlers: Annotated[list[str], typer.Argument(
        metavar="HANDLER",
        help="module:function or path/file.py:function called with each task; several "
             "make a pipeline: what one returns or yields is a task of the next.")],
    workers: StageWorkers = "4",
    producers: Producers = 1,
    maxsize: StageMaxsize = "1000",
    backend: Backend = None,
    url: Url = None,
    queue: Name = "default",
    retries: StageRetries = "0",
    timeout: StageTimeout = None,
    concurrency: StageConcurrency = "1",
    as_json: Json = False,
    no_progress: NoProgress = False,
    heartbeat_ttl: HeartbeatTtl = None,
    reconnect_timeout: ReconnectTimeout = None,
    max_deliveries: MaxDeliveries = 3,
    setup: Setup = None,
    resume: Resume = False,
    dashboard_at: DashboardAt = None,
) -> None:
    """Run a whole job — producers, consumers (of every stage), close, summary — on
    this host (local by default)."""
    produce = load_callable(producer, "PRODUCER")
    handles = [load_callable(h, "HANDLER") for h in handlers]
    n = len(handles)
    setup_fn = None if setup is None else load_callable(setup, "SETUP")
    shared = backend_for(backend, url) != "local"
    # local consumers have no heartbeat and no server to reconnect to
    options = link_options(heartbeat_ttl, reconnect_timeout) if shared else {}
    names = [h.rsplit(":", 1)[-1] for h in handlers]
    if not leftovers_said(backend, url, queue, resume, shared):
        return
    produce = nothing if resume else produce
    stage_queues = [stage_queue(queue, k) for k in range(n)]
    with dashboard.for_job(dashboard_at, backend, url, stage_queues) as on_dashboard, \
            Display(not no_progress) as display:
        options.update(on_dashboard)  # local: the job's queues live on the dashboard's broker
        summary = run(produce, *handles, workers=stage_values(workers, n, "--workers", int),
                      producers=producers, maxsize=stage_values(maxsize, n, "--maxsize", int),
                      retries=stage_values(retries, n, "--retries", int),
                      timeout=stage_values(timeout or "none", n, "--timeout", float),
                      backend=backend, url=url, queue=queue, names=names,
                      on_progress=display.update,
                      concurrency=stage_values(concurrency, n, "--concurrency", int),
                      max_deliveries=max_deliveries, setup=setup_fn, **options)
    report(summary, as_json, "run")
    raise typer.Exit(summary.exit_code)


# A Typer command: each parameter is one of its options.
@app.command("produce")
def produce_command(  # noqa: PLR0913
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
    items = json_lines(sys.stdin) if producer == "-" else load_callable(producer, "PRODUCER")()
    q = shared_queue(backend, url, queue, maxsize, **link_options(heartbeat_ttl, reconnect_timeout))
    try:
        with Display(not no_progress) as display:
            summary = produce_job(q, items, close=not no_close, wait_done=not no_wait,
                                  on_progress=display.update)
        note = left_open_note(q, summary, queue)
    finally:
        q.dispose()
    report(summary, as_json, "produce", note)
    raise typer.Exit(summary.exit_code)


# A Typer command: each parameter is one of its options.
@app.command("consume")
def consume_command(  # noqa: PLR0913
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
    q = shared_queue(backend, url, queue, max_deliveries=max_deliveries,
                      **link_options(heartbeat_ttl, reconnect_timeout))
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
    report(summary, as_json, "consume", waited=watch.waited_s)
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
    with opened(backend, url, queue, reading=True) as q:
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
    with opened(backend, url, queue) as q:
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
    with opened(backend, url, queue) as q:
        if not yes and not purge_confirmed(q, queue):
            err.print(f"pcq: nothing purged from {queue!r}", highlight=False)
            raise typer.Exit(1)
        purged = q.purge()
    err.print(f"pcq: purged {purged} task(s) from {queue!r}", highlight=False)


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
    with opened(backend, url, queue, reading=True) as q:
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
    with opened(backend, url, queue) as q:
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
    with opened(backend, url, queue) as q:
        deleted = q.purge_dead()
    err.print(f"pcq: deleted {deleted} dead letter(s)", highlight=False)


def command() -> Any:
    """The ``pcq`` command: the Typer app, with ``--version`` on ``pcq`` itself and
    ``--log-level`` on every command, added here so that no command function
    has to take (and pass around) an option that only configures logging."""
    shared = typer.Typer()
    shared.command()(global_options)
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
            usage_error(exc)
        sys.exit(ExitCode.USAGE)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
