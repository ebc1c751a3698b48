"""The hooks a supervisor calls on a queue (:mod:`pcq.supervisor`), and those
``pcq status`` reads (:class:`StatusHooks`), grouped apart from what producers
and consumers call.  :class:`~pcq.backends.base.Queue`
inherits them; a backend overrides those its server needs.

A supervisor calls these, never a consumer, in this order:

* :meth:`~SupervisorHooks.run_to_serve` once at start: the run all its
  consumers serve.
* :meth:`~SupervisorHooks.keep_alive` every ``keep_alive_every`` seconds (when
  set): its live consumers are not dead, whatever their heartbeats say.
* A consumer died by itself: :meth:`~SupervisorHooks.evict` -- its tasks go back
  now, a death counted against each (poison detection).
* A task ran past its timeout + ``KILL_GRACE``: ``killing(pid, task_id)``,
  SIGKILL, ``fail_running(pid, task_id, failure)`` -- that task counts a failed
  attempt -- then ``release(pid)``: its other tasks go back, no death counted.
* A consumer outlived the stop grace: ``killing(pid, "")``, SIGKILL, ``release(pid)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from pcq.backends.records import Failure
from pcq.envelope import Envelope


class SupervisorHooks(ABC):
    """What a supervisor asks of a queue (see the module docstring)."""

    backend: ClassVar[str]

    @abstractmethod
    def reap(self) -> int:
        """Return the in-flight tasks of dead consumers to ready; how many."""

    def evict(self, pid: int) -> int:
        """A supervisor saw its consumer process ``pid`` die: return that
        consumer's in-flight tasks to ready now, not at the next reap.  Counts a
        death against each of them (see *Poison tasks* in :mod:`pcq.backends.base`)."""
        return self.reap()

    def release(self, pid: int) -> int:
        """Like :meth:`evict`, for a consumer the supervisor killed for a known
        reason (a task past its timeout, see :meth:`fail_running`): its other
        tasks go back to ready with no death counted against them."""
        return self.evict(pid)

    def killing(self, pid: int, task_id: str) -> None:  # noqa: B027 - optional hook: no-op by default
        """The supervisor is about to kill consumer ``pid`` because task ``task_id``
        ran past its timeout (then it calls :meth:`fail_running` and
        :meth:`release`), or ("") because it outlived its stop grace (then
        :meth:`release`).  A backend whose leases end with the process's
        connection sets them aside here, so the kill counts no death."""

    def fail_running(self, pid: int, task_id: str, failure: Callable[[Envelope], Failure]) -> bool:
        """The consumer process ``pid`` was killed because task ``task_id`` ran past
        its timeout: acknowledge that task, in flight for the dead process, with
        ``failure(envelope)`` (retried or dead-lettered).  False if it was not
        found in flight (already acknowledged or reaped)."""
        return False

    #: How often a supervisor calls :meth:`keep_alive` (None: never needed).
    keep_alive_every: float | None = None

    def keep_alive(self, pids: Sequence[int]) -> None:
        """A supervisor vouches for its live consumer processes ``pids`` on this
        host: they are not dead, however long a handler holds their GIL.  Called
        only when :attr:`keep_alive_every` is set: such a backend implements it."""
        raise NotImplementedError(f"the {self.backend} backend sets keep_alive_every "
                                  "but has no keep_alive")

    def run_to_serve(self) -> int | None:
        """The number of the run a consumer attaching now would serve (the next
        one on an idle queue); None if this backend does not number its runs.  A
        supervisor reads it once and hands it to every consumer it starts (as
        ``join_run(run=...)``), so that all of them serve the same run."""
        return None


class StatusHooks:
    """What ``pcq status`` and a job's loop ask of a queue beyond its counters;
    a backend without a server keeps these defaults."""

    def set_feeds(self, to: str) -> None:  # optional hook: no-op by default
        """Record that a stage puts its outputs from this queue on queue ``to``
        (``pcq status`` follows it).  Backends without a server need not."""

    def feeds(self) -> str | None:
        """The queue this queue's stage feeds, as recorded by :meth:`set_feeds`."""
        return None

    def registrations(self) -> list[dict[str, Any]]:
        """Live consumers and producers: dicts with role, host, pid, heartbeat
        (a Unix time).  Backends without a registry return []."""
        return []

    def exists(self) -> bool:
        """Whether this queue was ever used (a server keeps something of it).
        Backends without a server say True: their queue is whatever is open."""
        return True

    def check_backend(self) -> bool:
        """One quick look at the backend's server, for a supervisor's loop: False
        while it is away (within its reconnect budget); raises
        :class:`~pcq.errors.BackendLost` once it is gone for good or lost the
        queue's data.  A backend without a server is always there."""
        return True
