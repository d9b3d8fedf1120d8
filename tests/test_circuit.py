"""Tests for natsrpc.circuit: outcome classification, opening, half-open probes, registry input, callbacks.

Pure logic: a fake clock moves time, nothing sleeps and no server is needed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from natsrpc.circuit import CircuitBreaker, CircuitConfig, Circuits, State, counts_as_failure
from natsrpc.errors import (
    BadRequest,
    CallTimeout,
    CircuitOpen,
    ClientClosed,
    ConfigurationError,
    ConnectionLost,
    DeadlineExceeded,
    InternalError,
    NoResponders,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    ReplyTooLarge,
    ServiceError,
    Unavailable,
    remote_error,
)


class FakeClock:
    """A monotonic clock that only moves when the test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Moves the clock forward by ``seconds``."""
        self.now += seconds


# One letter per call outcome, so a table row reads as a call history.
OUTCOMES: dict[str, BaseException | None] = {
    "S": None,  # success
    "F": CallTimeout("no reply"),  # failure
    "N": NoResponders("nobody"),  # failure
    "X": InternalError("boom"),  # failure (500)
    "B": BadRequest("bad argument"),  # business error: the service answered
    "P": PayloadTooLarge("too big"),  # local error: says nothing about the service
}

# Opening on the failure rate only, or on consecutive failures only.
RATE_ONLY = {"consecutive_failures": 1000}
CONSECUTIVE_ONLY = {"min_calls": 1000}


class Breaker:
    """A breaker named ``kv`` on a fake clock that keeps every state change it reports."""

    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.changes: list[tuple[State, State]] = []
        self.cb = CircuitBreaker(
            "kv", CircuitConfig(**config), clock=self.clock, on_state_change=lambda a, b: self.changes.append((a, b))
        )

    def feed(self, history: str) -> None:
        """Makes one allowed call per letter of ``history`` (spaces ignored), as the client would."""
        for letter in history.replace(" ", ""):
            self.cb.allow()
            self.cb.record(OUTCOMES[letter])

    def open(self) -> None:
        """Opens the circuit with consecutive failures."""
        self.feed("F" * self.cb.config.consecutive_failures)
        assert self.cb.state is State.OPEN

    def half_open(self) -> None:
        """Opens the circuit and waits until it turns half-open."""
        self.open()
        self.clock.advance(self.cb.config.open_wait)
        assert self.cb.state is State.HALF_OPEN


class TestCountsAsFailure:
    """Which outcomes count against a service's health."""

    @pytest.mark.parametrize(
        ("exc", "expected"),
        [
            (None, False),
            (CallTimeout("t"), True),
            (NoResponders("n"), True),
            (ConnectionLost("c"), False),
            (InternalError("i"), True),
            (Unavailable("draining"), True),
            (DeadlineExceeded("late"), True),
            (ServiceError(500, "db down"), True),
            (ServiceError(502, "upstream"), True),
            (remote_error(503, "draining"), True),
            (BadRequest("b"), False),
            (NotFound("n"), False),
            (ReplyTooLarge("r"), False),
            (ServiceError(409, "conflict"), False),
            (Overloaded("busy"), False),
            (PayloadTooLarge("p"), False),
            (ClientClosed("c"), False),
            (CircuitOpen("o"), False),
            (PermissionDenied("d"), False),
            (ValueError("v"), False),
            (asyncio.CancelledError(), False),
        ],
        ids=[
            "success",
            "timeout",
            "no-responders",
            "connection-lost",
            "500-internal",
            "503-unavailable",
            "504-deadline",
            "500-service-error",
            "502-service-error",
            "503-from-wire",
            "400-bad-request",
            "404-not-found",
            "413-reply-too-large",
            "409-conflict",
            "429-overloaded",
            "payload-too-large",
            "client-closed",
            "circuit-open",
            "permission-denied",
            "foreign-exception",
            "cancelled",
        ],
    )
    def test_classification(self, exc: BaseException | None, expected: bool) -> None:
        """Timeouts, no-responders, lost connections and 5xx count; answers and local errors do not."""
        assert counts_as_failure(exc) is expected


class TestConfig:
    """CircuitConfig validates its thresholds."""

    @pytest.mark.parametrize(
        "overrides",
        [
            {"window": 0},
            {"window_buckets": 0},
            {"failure_rate": 0},
            {"failure_rate": 1.5},
            {"min_calls": 0},
            {"consecutive_failures": 0},
            {"open_wait": -1},
            {"half_open_probes": 0},
            {"probes_to_close": 0},
            {"half_open_probes": 2, "probes_to_close": 3},
        ],
        ids=[
            "empty-window",
            "no-buckets",
            "zero-rate",
            "rate-above-one",
            "zero-min-calls",
            "zero-consecutive",
            "negative-wait",
            "no-probes",
            "zero-probes-to-close",
            "more-to-close-than-probes",
        ],
    )
    def test_rejects_bad_values(self, overrides: dict[str, Any]) -> None:
        """An out-of-range threshold raises ConfigurationError naming the field."""
        field = next(iter(overrides)) if len(overrides) == 1 else "probes_to_close"
        with pytest.raises(ConfigurationError, match=field):
            CircuitConfig(**overrides)

    def test_successes_to_close(self) -> None:
        """All probes must succeed unless probes_to_close says fewer."""
        assert CircuitConfig(half_open_probes=4).successes_to_close == 4
        assert CircuitConfig(half_open_probes=4, probes_to_close=2).successes_to_close == 2


class TestFailureRate:
    """The circuit opens when the failure rate over the window reaches the threshold with enough calls."""

    @pytest.mark.parametrize(
        ("config", "history", "expected"),
        [
            (RATE_ONLY, "FFFFF FFFF", State.CLOSED),
            (RATE_ONLY, "FFFFF FFFFF", State.OPEN),
            (RATE_ONLY, "SFSFS FSFSF", State.OPEN),
            (RATE_ONLY, "SFSFS FSFSS", State.CLOSED),
            (RATE_ONLY, "SSSSS SSSSS SSSSS SSSSS FFFFF FFFFF", State.CLOSED),
            (RATE_ONLY, "NXNXN SSSSS", State.OPEN),
            (RATE_ONLY, "BBBBB BBBBB BBBBB", State.CLOSED),
            (RATE_ONLY, "BBBBB BBBBB B FFFFF FFFFF", State.CLOSED),
            (RATE_ONLY, "PPPPP PPPPP PPPPP", State.CLOSED),
            (RATE_ONLY, "PPPPP PPPPP SSSSS FFFFF", State.OPEN),
            ({**RATE_ONLY, "min_calls": 4}, "SFSF", State.OPEN),
            ({**RATE_ONLY, "min_calls": 4}, "FFFS", State.OPEN),
            ({**RATE_ONLY, "failure_rate": 1.0}, "FFFFF FFFFS", State.CLOSED),
            ({**RATE_ONLY, "failure_rate": 1.0}, "FFFFF FFFFF", State.OPEN),
            ({**RATE_ONLY, "failure_rate": 0.3}, "FSSFS SFSSS", State.OPEN),
        ],
        ids=[
            "under-min-calls-never-opens",
            "all-failed-at-min-calls",
            "half-failed-reaches-50pct",
            "40pct-stays-closed",
            "33pct-of-many-stays-closed",
            "5xx-and-no-responders-count",
            "business-errors-never-open",
            "business-errors-are-successes",
            "local-errors-do-not-count",
            "local-errors-do-not-dilute",
            "min-calls-configurable",
            "a-success-reaching-min-calls-opens",
            "rate-1.0-needs-every-call-failed",
            "rate-1.0-opens-when-all-fail",
            "rate-0.3-exact",
        ],
    )
    def test_history(self, config: dict[str, Any], history: str, expected: State) -> None:
        """A call history within one window leaves the circuit in the expected state."""
        b = Breaker(**config)
        b.feed(history)
        assert b.cb.state is expected

    def test_reason_names_the_rate(self) -> None:
        """An open circuit says how many calls failed over which window."""
        b = Breaker(**RATE_ONLY)
        b.feed("SFSFS FSFSF")
        assert b.cb.reason == "5 of 10 calls failed in the last 10 s"
        with pytest.raises(CircuitOpen, match=r"^circuit for kv is open: 5 of 10 calls failed in the last 10 s"):
            b.cb.allow()

    @pytest.mark.parametrize(
        ("gap", "expected"),
        [(0.0, State.OPEN), (5.0, State.OPEN), (9.5, State.OPEN), (10.0, State.CLOSED), (60.0, State.CLOSED)],
        ids=["no-gap", "half-window", "just-inside", "one-window-later", "long-after"],
    )
    def test_window_slides(self, gap: float, expected: State) -> None:
        """Failures older than the window drop out of the rate."""
        b = Breaker(**RATE_ONLY)  # 10 s window in 1 s buckets, min_calls 10, 50%
        b.feed("FSFSF SFSF")  # 5 of 9: below min_calls
        b.clock.advance(gap)
        b.feed("F")  # 6 of 10 if the old calls still count, else 1 of 1
        assert b.cb.state is expected

    def test_window_slides_gradually(self) -> None:
        """Calls leave the window bucket by bucket, oldest first."""
        b = Breaker(**RATE_ONLY)
        b.feed("FFFF")  # t=0: 4 failures
        b.clock.advance(6)
        b.feed("SSSSS")  # t=6: 4 of 9
        b.clock.advance(4)  # t=10: the t=0 bucket drops out
        b.feed("F")  # 1 of 6 (below min_calls), not 5 of 10
        assert b.cb.state is State.CLOSED
        b.feed("FFFF")  # 5 of 10
        assert b.cb.state is State.OPEN


class TestConsecutiveFailures:
    """The circuit opens after N failures in a row, whatever the rate."""

    @pytest.mark.parametrize(
        ("history", "expected"),
        [
            ("FFFFF", State.OPEN),
            ("FNXFN", State.OPEN),
            ("FFFF", State.CLOSED),
            ("FFFFS FFFF", State.CLOSED),
            ("FFFFB FFFF", State.CLOSED),
            ("FFFFP F", State.OPEN),
            ("SSSSS SSSSS SSSSS SSSSS FFFFF", State.OPEN),
        ],
        ids=[
            "five-in-a-row",
            "mixed-failure-kinds",
            "four-in-a-row",
            "success-resets",
            "business-error-resets",
            "local-error-does-not-reset",
            "opens-despite-low-rate",
        ],
    )
    def test_history(self, history: str, expected: State) -> None:
        """A call history leaves the circuit in the expected state."""
        b = Breaker(**CONSECUTIVE_ONLY)
        b.feed(history)
        assert b.cb.state is expected

    def test_failures_of_calls_issued_before_a_success_do_not_count(self) -> None:
        """Timeouts of calls issued before a newer call succeeded (a dead replica's) do not open the circuit."""
        b = Breaker(**CONSECUTIVE_ONLY)
        lost = [b.cb.allow() for _ in range(10)]  # held by a replica that dies
        newer = b.cb.allow()  # answered by another replica
        b.cb.record(None, newer)
        for ticket in lost:
            b.cb.record(CallTimeout("no reply"), ticket)
        assert b.cb.state is State.CLOSED
        b.feed("FFFFF")  # failures of calls issued after the success still count
        assert b.cb.state is State.OPEN

    def test_open_fails_fast_with_reason(self) -> None:
        """An open circuit refuses calls with CircuitOpen naming the service, state, cause and wait."""
        b = Breaker()
        b.open()
        b.clock.advance(1.0)
        with pytest.raises(CircuitOpen) as info:
            b.cb.allow()
        assert str(info.value) == "circuit for kv is open: 5 calls in a row failed (half-open in 4.0 s)"


class TestOpenWait:
    """An open circuit turns half-open once open_wait has passed, read lazily from the clock."""

    @pytest.mark.parametrize(
        ("waited", "expected"),
        [(0.0, State.OPEN), (4.99, State.OPEN), (5.0, State.HALF_OPEN), (500.0, State.HALF_OPEN)],
        ids=["at-once", "just-before", "at-wait", "long-after"],
    )
    def test_wait(self, waited: float, expected: State) -> None:
        """The state read after ``waited`` seconds."""
        b = Breaker(open_wait=5.0)
        b.open()
        b.clock.advance(waited)
        assert b.cb.state is expected

    def test_outcomes_while_open_are_ignored(self) -> None:
        """Late outcomes of calls that started before the circuit opened change nothing."""
        b = Breaker()
        b.open()
        b.cb.record(None)
        b.cb.record(CallTimeout("late"))
        b.clock.advance(b.cb.config.open_wait)
        assert b.cb.state is State.HALF_OPEN
        b.cb.allow()  # a full set of probe slots is available

    def test_probe_now_skips_the_wait(self) -> None:
        """probe_now (called by the client on reconnect) half-opens an open circuit at once, not a closed one."""
        b = Breaker(open_wait=5.0)
        b.cb.probe_now()
        assert b.cb.state is State.CLOSED
        b.open()
        b.cb.probe_now()
        assert b.cb.state is State.HALF_OPEN


class TestHalfOpen:
    """Half-open lets a fixed number of probes through and closes or reopens on their outcomes."""

    @pytest.mark.parametrize("probes", [1, 3, 5], ids=["one", "three", "five"])
    def test_probe_quota(self, probes: int) -> None:
        """Exactly ``half_open_probes`` calls go through; the next one raises CircuitOpen."""
        b = Breaker(half_open_probes=probes)
        b.half_open()
        for _ in range(probes):
            b.cb.allow()
        with pytest.raises(CircuitOpen, match=rf"^circuit for kv is half_open: waiting for {probes} probe calls"):
            b.cb.allow()

    @pytest.mark.parametrize(
        ("probes", "to_close", "successes", "expected"),
        [
            (3, None, 2, State.HALF_OPEN),
            (3, None, 3, State.CLOSED),
            (3, 1, 1, State.CLOSED),
            (3, 2, 1, State.HALF_OPEN),
            (3, 2, 2, State.CLOSED),
        ],
        ids=["two-of-three", "all-three", "one-needed", "one-of-two-needed", "two-of-two-needed"],
    )
    def test_probe_successes_close(self, probes: int, to_close: int | None, successes: int, expected: State) -> None:
        """Enough successful probes close the circuit (all by default)."""
        b = Breaker(half_open_probes=probes, probes_to_close=to_close)
        b.half_open()
        b.feed("S" * successes)
        assert b.cb.state is expected

    @pytest.mark.parametrize(
        "probe_history", ["F", "SF", "SSF", "BN", "SX"], ids=["first", "second", "third", "after-4xx", "5xx"]
    )
    def test_probe_failure_reopens(self, probe_history: str) -> None:
        """Any failed probe reopens the circuit and restarts the wait."""
        b = Breaker(half_open_probes=3, open_wait=5.0)
        b.half_open()
        b.feed(probe_history)
        assert b.cb.state is State.OPEN
        assert b.cb.reason.startswith("probe call failed with ")
        b.clock.advance(4.5)
        assert b.cb.state is State.OPEN
        b.clock.advance(0.5)
        assert b.cb.state is State.HALF_OPEN

    def test_business_error_is_a_successful_probe(self) -> None:
        """A probe answered with a 4xx shows the service is up."""
        b = Breaker(half_open_probes=2)
        b.half_open()
        b.feed("BS")
        assert b.cb.state is State.CLOSED

    def test_local_error_frees_the_probe_slot(self) -> None:
        """A probe that failed locally tested nothing: its slot goes to another probe."""
        b = Breaker(half_open_probes=1)
        b.half_open()
        b.feed("P")
        assert b.cb.state is State.HALF_OPEN
        b.feed("S")
        assert b.cb.state is State.CLOSED

    def test_stray_outcome_is_not_a_probe(self) -> None:
        """An outcome with no probe in flight (a call from before the opening) is ignored."""
        b = Breaker(half_open_probes=1)
        b.half_open()
        b.cb.record(None)
        b.cb.record(CallTimeout("late"))
        assert b.cb.state is State.HALF_OPEN
        b.feed("S")
        assert b.cb.state is State.CLOSED

    def test_closing_forgets_old_failures(self) -> None:
        """A closed circuit starts from a clean window and streak."""
        b = Breaker()
        b.half_open()
        b.feed("SSS")
        b.feed("FFFF")
        assert b.cb.state is State.CLOSED
        assert b.cb.reason == ""


class TestRegistry:
    """The registry's view of live instances opens the circuit at once and fresh heartbeats revive it."""

    @pytest.mark.parametrize("setup", ["closed", "half_open"], ids=["from-closed", "from-half-open"])
    def test_no_live_instances_opens_at_once(self, setup: str) -> None:
        """set_alive(False) opens the circuit without any failed call or clock movement."""
        b = Breaker()
        if setup == "half_open":
            b.half_open()
        b.cb.set_alive(False)
        assert b.cb.state is State.OPEN
        with pytest.raises(CircuitOpen, match=r"^circuit for kv is open: no live instances"):
            b.cb.allow()

    def test_no_live_instances_keeps_a_running_wait(self) -> None:
        """An already open circuit takes the new reason but does not wait longer."""
        b = Breaker(open_wait=5.0)
        b.open()
        b.clock.advance(3.0)
        b.cb.set_alive(False)
        assert b.cb.reason == "no live instances"
        b.clock.advance(2.0)
        assert b.cb.state is State.HALF_OPEN

    def test_repeated_dead_reports_do_not_restart_the_wait(self) -> None:
        """set_alive(False) twice does not keep the circuit open longer."""
        b = Breaker(open_wait=5.0)
        b.cb.set_alive(False)
        b.clock.advance(4.0)
        b.cb.set_alive(False)
        b.clock.advance(1.0)
        assert b.cb.state is State.HALF_OPEN

    def test_heartbeat_half_opens_at_once(self) -> None:
        """A fresh heartbeat moves an open circuit to half-open before the wait ends."""
        b = Breaker()
        b.open()
        b.cb.on_heartbeat()
        assert b.cb.state is State.HALF_OPEN
        b.cb.allow()

    def test_instance_back_half_opens(self) -> None:
        """set_alive(True) after set_alive(False) moves the open circuit to half-open."""
        b = Breaker()
        b.cb.set_alive(False)
        b.cb.set_alive(True)
        assert b.cb.state is State.HALF_OPEN

    @pytest.mark.parametrize("before", [None, True], ids=["never-reported", "already-alive"])
    def test_alive_without_recovery_changes_nothing(self, before: bool | None) -> None:
        """set_alive(True) that is not a recovery leaves a circuit opened by failures open."""
        b = Breaker()
        if before is not None:
            b.cb.set_alive(before)
        b.open()
        b.cb.set_alive(True)
        assert b.cb.state is State.OPEN

    def test_heartbeat_leaves_closed_and_half_open_alone(self) -> None:
        """A heartbeat only affects an open circuit."""
        b = Breaker()
        b.cb.on_heartbeat()
        assert b.cb.state is State.CLOSED
        b.half_open()
        b.cb.allow()
        b.cb.on_heartbeat()
        assert b.cb.state is State.HALF_OPEN
        b.cb.record(None)  # the probe taken before the heartbeat still counts

    def test_dead_service_recovers_through_probes(self) -> None:
        """Without heartbeats the open wait still runs out and probes can close the circuit."""
        b = Breaker(half_open_probes=1)
        b.cb.set_alive(False)
        b.clock.advance(b.cb.config.open_wait)
        b.feed("S")
        assert b.cb.state is State.CLOSED


class TestStateChange:
    """on_state_change reports every transition once, with the old and new state."""

    def test_full_cycle(self) -> None:
        """Closed → open → half-open → open → half-open → closed, each reported once."""
        b = Breaker(half_open_probes=1)
        b.open()
        b.clock.advance(b.cb.config.open_wait)
        b.feed("F")
        b.cb.on_heartbeat()
        b.feed("S")
        assert b.changes == [
            (State.CLOSED, State.OPEN),
            (State.OPEN, State.HALF_OPEN),
            (State.HALF_OPEN, State.OPEN),
            (State.OPEN, State.HALF_OPEN),
            (State.HALF_OPEN, State.CLOSED),
        ]

    def test_no_report_without_change(self) -> None:
        """Repeated inputs that keep the state produce no reports."""
        b = Breaker()
        b.cb.set_alive(False)
        b.cb.set_alive(False)
        b.cb.on_heartbeat()
        b.cb.on_heartbeat()
        b.feed("S")
        assert b.changes == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]

    def test_state_values(self) -> None:
        """States are strings, so they log and serialise as themselves."""
        assert [s.value for s in State] == ["closed", "open", "half_open"]
        assert f"{State.HALF_OPEN}" == "half_open"


class TestCircuits:
    """Circuits holds one breaker per service, created on first use."""

    def test_get_creates_once(self) -> None:
        """get() and indexing return the same breaker per name, new ones closed."""
        circuits = Circuits()
        kv = circuits.get("kv")
        assert circuits["kv"] is kv
        assert circuits.get("vdb") is not kv
        assert kv.name == "kv"
        assert kv.state is State.CLOSED
        assert "kv" in circuits
        assert "memory" not in circuits
        assert sorted(circuits) == ["kv", "vdb"]
        assert len(circuits) == 2

    def test_shared_config_clock_and_callback(self) -> None:
        """Every breaker uses the map's config and clock and reports changes with its name."""
        clock = FakeClock()
        changes: list[tuple[str, State, State]] = []
        circuits = Circuits(
            CircuitConfig(consecutive_failures=2, open_wait=1.0),
            clock=clock,
            on_state_change=lambda name, old, new: changes.append((name, old, new)),
        )
        vdb = circuits.get("vdb")
        vdb.record(NoResponders("x"))
        vdb.record(NoResponders("x"))
        assert circuits.states() == {"vdb": State.OPEN}
        circuits.get("kv").set_alive(False)
        clock.advance(1.0)
        assert circuits.states() == {"vdb": State.HALF_OPEN, "kv": State.HALF_OPEN}
        assert changes == [
            ("vdb", State.CLOSED, State.OPEN),
            ("kv", State.CLOSED, State.OPEN),
            ("vdb", State.OPEN, State.HALF_OPEN),
            ("kv", State.OPEN, State.HALF_OPEN),
        ]
