"""The circuit breaker: per-service health judged from call outcomes and the registry (DESIGN.md §4).

A :class:`CircuitBreaker` decides whether a call may go out (:meth:`CircuitBreaker.allow`) and learns
from how it ended (:meth:`CircuitBreaker.record`) and from heartbeats (:meth:`CircuitBreaker.set_alive`,
:meth:`CircuitBreaker.on_heartbeat`). It does no I/O and reads time from an injectable clock.

The states::

    closed ──(failure rate over the window, or N failures in a row, or no live instances)──▶ open
    open ──(open_wait elapsed, or a fresh heartbeat)──▶ half_open
    half_open ──(the probe calls succeed)──▶ closed
    half_open ──(a probe call fails, or no live instances)──▶ open (the wait restarts)
"""

from __future__ import annotations

import enum
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from natsrpc.errors import CallTimeout, CircuitOpen, ConfigurationError, NoResponders, RemoteError

Clock = Callable[[], float]
"""A source of monotonic seconds, ``time.monotonic`` unless a test injects a fake."""

NO_LIVE_INSTANCES = "no live instances"


class State(enum.StrEnum):
    """The state of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def counts_as_failure(exc: BaseException | None) -> bool:
    """Returns whether a call's outcome says the service is unhealthy.

    ``None`` (the call returned) is a success. Failures are what a sick or missing service causes:
    :class:`~natsrpc.CallTimeout`, :class:`~natsrpc.NoResponders` and any
    :class:`~natsrpc.RemoteError` with a code >= 500 (500 handler crashed, 503 draining, 504
    deadline passed on the service's side, a handler's own 5xx).

    Not failures:

    * 4xx remote errors (400, 404, 409, ...): the service answered; the caller or the business
      logic is at fault, and a breaker that opened on them would punish everyone for one bad caller.
    * 429 :class:`~natsrpc.Overloaded`: the instance answered at once and sheds load by design.
      It is back-pressure, not ill health, and opening the circuit on it would turn a brief
      overload into a full outage; retries with backoff (``natsrpc.retry``) are the answer to 429.
    * Errors raised locally before or instead of a reply (``PayloadTooLarge``, ``ClientClosed``,
      ``CircuitOpen``, ``PermissionDenied``, cancellation, any non-natsrpc exception).
    * A :class:`~natsrpc.NoResponders` marked ``resubscribing`` (the service's instances are
      coming back from the same outage this client just had) or ``unseen`` (this client never saw
      the service: a misspelt or not-started service is not an outage of it).
    * :class:`~natsrpc.ConnectionLost`: this client's own link to NATS broke, which says nothing
      about the service. Counting it opened every circuit on a failover and refused calls for up
      to a heartbeat interval after the client had reconnected in milliseconds (test F1).

    A :class:`~natsrpc.DeadlineExceeded` raised locally (no time left before sending) carries code
    504 like the remote one and cannot be told apart by type: the client checks its deadline before
    :meth:`CircuitBreaker.allow`, so such calls never reach the breaker.

    Args:
        exc: the exception the call raised, or None if it returned.

    Returns:
        True when the outcome should count against the service's health.
    """
    if exc is None:
        return False
    if isinstance(exc, NoResponders):
        return not (exc.resubscribing or exc.unseen)
    if isinstance(exc, CallTimeout):
        return True
    return isinstance(exc, RemoteError) and exc.code >= 500


def _classify(exc: BaseException | None) -> bool | None:
    """Returns True for a failure, False for a success, None for an outcome that says nothing.

    Any remote reply that is not a failure (4xx, 429) is a success: the service answered.
    """
    if counts_as_failure(exc):
        return True
    if exc is None or isinstance(exc, RemoteError):
        return False
    return None


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    """Thresholds of a circuit breaker.

    Attributes:
        window: length in seconds of the sliding window the failure rate is measured over.
        window_buckets: the window is kept as this many time buckets (so it slides in steps of
            ``window / window_buckets`` seconds, with constant memory at any call rate).
        failure_rate: open when failed/calls in the window reaches this fraction (0 < rate <= 1)...
        min_calls: ...and the window holds at least this many calls.
        consecutive_failures: open after this many failures in a row, whatever the rate.
        open_wait: seconds the circuit stays open before it lets probes through (half-open).
        half_open_probes: how many probe calls half-open lets through.
        probes_to_close: how many of the probes must succeed to close; None means all of them.
            Any probe failure reopens the circuit.
    """

    window: float = 10.0
    window_buckets: int = 10
    failure_rate: float = 0.5
    min_calls: int = 10
    consecutive_failures: int = 5
    open_wait: float = 5.0
    half_open_probes: int = 3
    probes_to_close: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.window > 0:
            problems.append(f"window must be > 0 seconds, got {self.window!r}")
        if self.window_buckets < 1:
            problems.append(f"window_buckets must be >= 1, got {self.window_buckets!r}")
        if not 0 < self.failure_rate <= 1:
            problems.append(f"failure_rate must be in (0, 1], got {self.failure_rate!r}")
        if self.min_calls < 1:
            problems.append(f"min_calls must be >= 1, got {self.min_calls!r}")
        if self.consecutive_failures < 1:
            problems.append(f"consecutive_failures must be >= 1, got {self.consecutive_failures!r}")
        if not self.open_wait >= 0:
            problems.append(f"open_wait must be >= 0 seconds, got {self.open_wait!r}")
        if self.half_open_probes < 1:
            problems.append(f"half_open_probes must be >= 1, got {self.half_open_probes!r}")
        if self.probes_to_close is not None and not 1 <= self.probes_to_close <= self.half_open_probes:
            problems.append(f"probes_to_close must be in [1, half_open_probes], got {self.probes_to_close!r}")
        if problems:
            raise ConfigurationError("; ".join(problems))

    @property
    def successes_to_close(self) -> int:
        """The number of successful probes that closes a half-open circuit."""
        return self.half_open_probes if self.probes_to_close is None else self.probes_to_close


class _Window:
    """Call and failure counts over the last ``length`` seconds, kept in fixed time buckets."""

    def __init__(self, length: float, buckets: int) -> None:
        self._width = length / buckets
        self._buckets = buckets
        self._slots: deque[list[int]] = deque()  # [bucket index, calls, failures], oldest first
        self.calls = 0
        self.failures = 0

    def add(self, now: float, failed: bool) -> None:
        """Counts one call that ended at ``now``."""
        index = math.floor(now / self._width)
        slots = self._slots
        if slots and slots[0][0] <= index - self._buckets:
            self._slide(index)
        if not slots or slots[-1][0] < index:
            slots.append([index, 0, 0])
        slot = slots[-1]  # a clock that steps back lands in the newest bucket
        slot[1] += 1
        self.calls += 1
        if failed:
            slot[2] += 1
            self.failures += 1

    def _slide(self, index: int) -> None:
        """Drops the buckets that fell out of the window ending in bucket ``index``."""
        while self._slots and self._slots[0][0] <= index - self._buckets:
            _, calls, failures = self._slots.popleft()
            self.calls -= calls
            self.failures -= failures

    def clear(self) -> None:
        """Forgets every call."""
        self._slots.clear()
        self.calls = self.failures = 0


class CircuitBreaker:
    """The circuit breaker of one service (or one instance: the name is only a label).

    Use it from one event loop; it is not thread-safe. Call :meth:`allow` before sending and
    :meth:`record` exactly once after every allowed call, whatever its outcome.

    Outcomes are not tied to the state they started in: a call that began while closed and ends
    while half-open is taken as a probe if a probe is in flight, and ignored otherwise; outcomes that
    arrive while open are ignored.

    Args:
        name: the service name, used in messages.
        config: thresholds; the defaults of :class:`CircuitConfig` when None.
        clock: monotonic seconds; inject a fake in tests.
        on_state_change: called with ``(old, new)`` on every state change, synchronously.
    """

    def __init__(
        self,
        name: str,
        config: CircuitConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        on_state_change: Callable[[State, State], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config or CircuitConfig()
        self.on_state_change = on_state_change
        self._clock = clock
        self._state = State.CLOSED
        self._reason = ""
        self._opened_at = 0.0
        self._alive: bool | None = None  # None until the registry says anything
        self._consecutive = 0
        self._issued = 0  # tickets handed out by allow(), in issue order
        self._last_success = 0  # the ticket of the latest-issued call that succeeded
        self._window = _Window(self.config.window, self.config.window_buckets)
        self._probes_started = 0
        self._probes_in_flight = 0
        self._probe_successes = 0

    @property
    def state(self) -> State:
        """The current state; an open circuit whose wait has elapsed turns half-open on reading."""
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.config.open_wait:
            self._half_open()
        return self._state

    @property
    def reason(self) -> str:
        """Why the circuit last opened (``"5 calls in a row failed"``); empty while closed."""
        return self._reason

    def allow(self) -> int:
        """Lets a call go out, or refuses it; in half-open, takes one of the probe slots.

        Returns:
            The call's ticket (its place in issue order), to pass to :meth:`record`.

        Raises:
            CircuitOpen: the circuit is open, or half-open with every probe slot taken.
        """
        self._issued += 1
        if self._state is State.CLOSED:  # the hot path
            return self._issued
        state = self.state
        if state is State.CLOSED:
            return self._issued
        if state is State.OPEN:
            wait = max(0.0, self._opened_at + self.config.open_wait - self._clock())
            raise CircuitOpen(f"circuit for {self.name} is open: {self._reason} (half-open in {wait:.1f} s)")
        if self._probes_started >= self.config.half_open_probes:
            raise CircuitOpen(
                f"circuit for {self.name} is half_open: waiting for {self._probes_in_flight} probe calls"
                f" (after {self._reason})"
            )
        self._probes_started += 1
        self._probes_in_flight += 1
        return self._issued

    def record(self, exc: BaseException | None, ticket: int = 0) -> None:
        """Learns from the outcome of an allowed call.

        "Consecutive" failures are counted in issue order: a failure of a call issued before a call
        that has since succeeded does not count towards ``consecutive_failures`` (it still counts in
        the failure rate). When a replica dies, the calls it held time out together one timeout
        later, long after the other replicas answered newer calls; counted in the order they end,
        they opened the circuit of a healthy service (RELIABILITY F2/F3).

        Args:
            exc: the exception the call raised, or None if it returned (see :func:`counts_as_failure`).
            ticket: what :meth:`allow` returned for the call; 0 = unknown (counted as it ends).
        """
        if exc is None and self._state is State.CLOSED:  # the hot path: a success while closed
            window = self._window
            window.add(self._clock(), False)
            self._consecutive = 0
            if ticket > self._last_success:
                self._last_success = ticket
            if window.failures:  # a success can still bring the window to min_calls over the rate
                self._check_rate()
            return
        failed = _classify(exc)
        state = self.state
        if state is State.HALF_OPEN:
            self._record_probe(failed, exc)
        elif state is State.CLOSED and failed is not None:
            self._record_closed(failed, ticket)

    def _record_probe(self, failed: bool | None, exc: BaseException | None) -> None:
        if self._probes_in_flight == 0:
            return  # a call that started before the circuit opened, not a probe
        self._probes_in_flight -= 1
        if failed is None:
            self._probes_started -= 1  # the probe tested nothing: free its slot for another
        elif failed:
            self._open(f"probe call failed with {type(exc).__name__}")
        else:
            self._probe_successes += 1
            if self._probe_successes >= self.config.successes_to_close:
                self._close()

    def _record_closed(self, failed: bool, ticket: int) -> None:
        cfg = self.config
        window = self._window
        window.add(self._clock(), failed)
        if not failed:
            self._consecutive = 0
            self._last_success = max(self._last_success, ticket)
        elif not 0 < ticket < self._last_success:  # a newer call has succeeded since this one went out
            self._consecutive += 1
        if self._consecutive >= cfg.consecutive_failures:
            self._open(f"{self._consecutive} calls in a row failed")
        else:
            self._check_rate()

    def _check_rate(self) -> None:
        """Opens the circuit when the window holds enough calls and too many of them failed."""
        cfg = self.config
        window = self._window
        if window.calls >= cfg.min_calls and window.failures / window.calls >= cfg.failure_rate:
            self._open(f"{window.failures} of {window.calls} calls failed in the last {cfg.window:g} s")

    def set_alive(self, alive: bool) -> None:
        """Takes the registry's view: whether any instance of the service is alive.

        The registry calls it when the answer changes. ``False`` (the service had instances and all
        expired, went unhealthy or are draining) opens the circuit at once, so calls fail fast
        instead of waiting for a timeout. ``True`` after ``False`` means an instance came back: an
        open circuit turns half-open.

        While no instance is alive the open wait still runs out: the probes then meet a fast
        NoResponders, and the circuit recovers even if heartbeats cannot reach this client.

        Args:
            alive: whether at least one instance is alive.
        """
        was_alive, self._alive = self._alive, alive
        if not alive:
            if self.state is State.OPEN:
                self._reason = NO_LIVE_INSTANCES  # already failing fast: keep the running wait
            else:
                self._open(NO_LIVE_INSTANCES)
        elif was_alive is False:
            self.on_heartbeat()

    def on_heartbeat(self) -> None:
        """Takes a fresh heartbeat of a live instance: open turns half-open.

        The client calls it for every beat of a live instance while the circuit is open (DESIGN §4:
        "a fresh beat moves it to half-open"), so a service that still beats is probed about once
        per heartbeat interval, and one that was gone recovers on its first beat.
        """
        self._alive = True
        if self.state is State.OPEN:
            self._half_open()

    def probe_now(self) -> None:
        """Turns an open circuit half-open at once, so the next calls probe the service.

        The client calls it when its connection comes back: failures seen through a broken
        connection may have been the connection's, not the service's.
        """
        if self.state is State.OPEN:
            self._half_open()

    def _open(self, reason: str) -> None:
        self._reason = reason
        self._opened_at = self._clock()
        self._reset_counts()
        self._set(State.OPEN)

    def _half_open(self) -> None:
        self._reset_counts()
        self._set(State.HALF_OPEN)

    def _close(self) -> None:
        self._reason = ""
        self._reset_counts()
        self._set(State.CLOSED)

    def _reset_counts(self) -> None:
        self._window.clear()
        self._consecutive = 0
        self._probes_started = self._probes_in_flight = self._probe_successes = 0

    def _set(self, new: State) -> None:
        old, self._state = self._state, new
        if old is not new and self.on_state_change is not None:
            self.on_state_change(old, new)

    def __repr__(self) -> str:
        reason = f" ({self._reason})" if self._reason else ""
        return f"<CircuitBreaker {self.name} {self.state}{reason}>"


class Circuits:
    """The circuit breakers of a client, one per service, created on first use: ``circuits.get("kv")``.

    Args:
        config: thresholds shared by every breaker.
        clock: monotonic seconds; inject a fake in tests.
        on_state_change: called with ``(name, old, new)`` when any breaker changes state.
    """

    def __init__(
        self,
        config: CircuitConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        on_state_change: Callable[[str, State, State], None] | None = None,
        max_breakers: int = 4096,
    ) -> None:
        self.config = config or CircuitConfig()
        self.on_state_change = on_state_change
        self.max_breakers = max_breakers
        """The most breakers kept; past it a closed one is forgotten (a fresh closed one is the same)."""
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        """Returns the breaker of service ``name``, creating a closed one on first use."""
        breaker = self._breakers.get(name)
        if breaker is None:
            if len(self._breakers) >= self.max_breakers:
                self._forget_one()
            listener = None if self.on_state_change is None else functools.partial(self.on_state_change, name)
            breaker = CircuitBreaker(name, self.config, clock=self._clock, on_state_change=listener)
            self._breakers[name] = breaker
        return breaker

    __getitem__ = get

    def _forget_one(self) -> None:
        """Forgets the oldest closed breaker (one with no failures counted), else the oldest."""
        victim = next((n for n, b in self._breakers.items() if b.state is State.CLOSED), None)
        del self._breakers[victim if victim is not None else next(iter(self._breakers))]

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[str]:
        return iter(self._breakers)

    def __len__(self) -> int:
        return len(self._breakers)

    def states(self) -> dict[str, State]:
        """Returns the current state of every breaker, by service name."""
        return {name: breaker.state for name, breaker in self._breakers.items()}
