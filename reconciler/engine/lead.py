"""Whether this replica may act: the lead, the lease and the term, as the daemon sees them.

:class:`~reconciler.store.leader.Leadership` elects a leader among replicas
sharing a store and calls back when the lead is won, lost, in doubt
(*lapsed*) or renewed. :class:`Lead` turns those calls into what the
daemon's workers and readers wait on:

- ``leading``: this replica leads (always, without leadership);
- the *go* event: leading on a lease that holds, and nothing else holds the
  daemon (a pause, a store refusing writes), or stopping, so that held
  workers see the stop. Workers and readers wait for it right before acting;
- the *term*: an event set when this replica's term as leader ends, a lease
  lapses or the daemon stops, which withdraws the calls still waiting for a
  QPS slot. A new term (elected, or the lease renewed) is a new event, handed
  to the reconciler through ``new_term``.

:meth:`Lead.may_send` is the last check, made right before each request is
written (the reconciler's and the client's gate), so a replica frozen
mid-rollout sends nothing when it wakes. What a new or lost term means for
the daemon's own work (re-reading the store, planning everything) stays in
the daemon.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reconciler.store.leader import Leadership


class Lead:
    def __init__(
        self,
        leadership: Leadership | None,
        *,
        stopping: Callable[[], bool],
        held: Callable[[], bool],
        new_term: Callable[[asyncio.Event], None],
        log: Any,
    ) -> None:
        """``stopping``: the daemon is shutting down; ``held``: something other than
        the lead holds every call (a pause, a store refusing writes); ``new_term``:
        hand a new term's event to the reconciler."""
        self.leadership = leadership
        self._stopping = stopping
        self._held = held
        self._new_term = new_term
        self.log = log
        self._leading = asyncio.Event()
        self._go = asyncio.Event()
        if leadership is None:
            self._leading.set()
            self._go.set()
        # Whether the lease holds (a leader whose lease lapsed holds its calls
        # until a keepalive renews it).
        self._lease_ok = True
        self._term = asyncio.Event()

    @property
    def leading(self) -> bool:
        """Whether this replica leads (always, without leadership)."""
        return self._leading.is_set()

    async def wait(self) -> None:
        """Until a call or read may go (or the daemon stops)."""
        await self._go.wait()

    def sync(self) -> None:
        """Open or close the way for workers and readers after any input changed."""
        leading = self._leading.is_set() and self._lease_ok
        if self._stopping() or (leading and not self._held()):
            self._go.set()
        else:
            self._go.clear()

    def may_send(self) -> bool:
        """Whether the lead allows a request now: leading on a lease that holds. A lease
        found in doubt lapses (the leadership calls :meth:`lapsed`)."""
        return self.leadership is None or (
            self._leading.is_set() and self._lease_ok and self.leadership.may_send()
        )

    def end_term(self) -> None:
        """Withdraw the calls waiting for a slot (stopping; without leadership: stop itself)."""
        self._term.set()

    def elected(self) -> None:
        """This replica leads now: a new term, on a lease that holds."""
        self._begin_term()
        self._lease_ok = True
        self._leading.set()
        self.sync()

    def lost(self, why: str) -> bool:
        """Stop calling at once; ``False`` if this replica did not lead."""
        if not self._leading.is_set() or self.leadership is None:
            return False
        self._leading.clear()
        self.sync()
        self._term.set()
        if self.leadership.leading:  # the fence noticed first: the keepalive will follow
            self.log.error("leader.fenced", why=why)
        return True

    def lapsed(self, why: str) -> None:
        """The lease is in doubt (a pause, a late keepalive), the lead not lost: hold the
        workers and reads, withdraw calls waiting for a slot, until it is renewed."""
        if not self._leading.is_set() or not self._lease_ok:
            return
        self._lease_ok = False
        self.sync()
        self._term.set()

    def renewed(self) -> None:
        """A keepalive sent after the lapse succeeded: the same term goes on."""
        if not self._leading.is_set() or self._lease_ok:
            return
        if not self._stopping():  # draining: calls waiting for a slot stay withdrawn
            self._begin_term()
        self._lease_ok = True
        self.sync()

    def _begin_term(self) -> None:
        self._term = asyncio.Event()
        self._new_term(self._term)
