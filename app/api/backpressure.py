"""Admission control: the waiting room in front of the engine is bounded, and a full one says 429 at once.

The API, not the engine, decides: the engine only learns of a request when it reads its inbox (up to
a step later), so a burst would pass any check made against its stats. Here every admitted request
is either *started* (its first output arrived: it holds seats in the running batch) or not yet; of
the not-yet-started ones, those that fit in the free seats (``max_num_seqs`` minus the started
sequences, first come first served) are about to run, and the rest are *waiting*. A new request
that would have to wait is admitted only while fewer than ``max_queued_requests`` wait and their
prompt tokens stay within ``max_queued_tokens`` (a lone request larger than that budget still gets
in when nobody waits, or it could never run). KV-cache pressure can make the engine queue more than
this estimate; the bound still holds per seat.

Request states, one owner (the event loop): admitted -> started -> released, or admitted -> released.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from app.api.errors import QueueFull, ServiceUnavailable

SHUTTING_DOWN = "The server is shutting down and takes no new requests; retry on another replica."


@dataclass(eq=False)
class Ticket:
    """One admitted HTTP request: its engine request ids, seats (sum of n) and prompt tokens."""

    request_ids: tuple[str, ...]
    seats: int
    tokens: int
    admitted_at: float
    _owner: Admission | None = field(default=None, repr=False)
    started: bool = False

    def start(self) -> None:
        """The first output arrived: the request runs now (idempotent)."""
        if not self.started and self._owner is not None:
            self.started = True
            self._owner._on_start(self)

    def release(self, now: float) -> None:
        """The request is over, however it ended (idempotent)."""
        if self._owner is not None:
            self._owner._on_release(self, now)
            self._owner = None


class Admission:
    def __init__(self, *, max_num_seqs: int, max_queued_requests: int, max_queued_tokens: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self.draining = False
        self._order = itertools.count()
        self._unstarted: dict[Ticket, int] = {}  # insertion order = arrival order
        self._started: set[Ticket] = set()
        self._busy_seats = 0
        self._service_time = 2.0  # EWMA of seconds a request holds its seats: Retry-After's basis

    # ---- queries (also for /metrics and the drain) ---------------------------------------------

    @property
    def in_flight(self) -> list[Ticket]:
        return [*self._unstarted, *self._started]

    def waiting(self) -> tuple[int, int]:
        """(requests, prompt tokens) that cannot start yet by the seat estimate."""
        free = self.max_num_seqs - self._busy_seats
        requests = tokens = 0
        for t in self._unstarted:
            if t.seats <= free:
                free -= t.seats
            else:
                free = 0  # FCFS: nothing behind a request that waits runs before it
                requests += 1
                tokens += t.tokens
        return requests, tokens

    # ---- transitions ---------------------------------------------------------------------------

    def admit(self, request_ids: tuple[str, ...], seats: int, tokens: int, now: float) -> Ticket:
        """A Ticket, or QueueFull (429 + Retry-After) / ServiceUnavailable (503 while draining)."""
        if self.draining:
            raise ServiceUnavailable(SHUTTING_DOWN, retry_after=1)
        # a request wider than the batch runs in parts; it never needs more than every seat
        ticket = Ticket(request_ids, min(seats, self.max_num_seqs), tokens, now, self)
        self._unstarted[ticket] = next(self._order)
        if self._would_wait(ticket):
            waiting, queued_tokens = self.waiting()
            too_many = waiting > self.max_queued_requests
            too_big = queued_tokens > self.max_queued_tokens and waiting > 1
            if too_many or too_big:
                del self._unstarted[ticket]
                ticket._owner = None
                what = "requests" if too_many else "prompt tokens"
                raise QueueFull(
                    f"The server is busy: too many queued {what}. Retry later.",
                    retry_after=self.retry_after(waiting),
                )
        return ticket

    def retry_after(self, waiting: int) -> float:
        """Seconds until about this many waiting requests have found a seat."""
        return min(60.0, max(1.0, self._service_time * waiting / self.max_num_seqs))

    def _would_wait(self, ticket: Ticket) -> bool:
        free = self.max_num_seqs - self._busy_seats
        for t in self._unstarted:
            if t is ticket:
                return t.seats > free
            free = free - t.seats if t.seats <= free else 0
        return False

    def _on_start(self, ticket: Ticket) -> None:
        if self._unstarted.pop(ticket, None) is not None:
            self._started.add(ticket)
            self._busy_seats += ticket.seats

    def _on_release(self, ticket: Ticket, now: float) -> None:
        self._unstarted.pop(ticket, None)
        if ticket in self._started:
            self._started.discard(ticket)
            self._busy_seats -= ticket.seats
            held = max(0.0, now - ticket.admitted_at)
            self._service_time = 0.8 * self._service_time + 0.2 * held
