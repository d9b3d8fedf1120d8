"""Tests for natsrpc.retry: what is retried, backoff, the token bucket, and one deadline over all attempts.

Pure logic: a fake clock and a fake sleep that moves it, so nothing waits and no server is needed.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

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
    ServiceError,
    Unavailable,
    remote_error,
)
from natsrpc.retry import MAX_ATTEMPTS, NO_RETRIES, RetryPolicy, TokenBucket, run_with_retries, should_retry

OK = "ok"

# A policy whose pauses are exactly their bounds: 0.1, 0.2, 0.4, 0.8 s.
FIXED = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=False)


class FakeTime:
    """A clock and a sleep that moves it, recording every pause."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        """Returns the fake time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Moves the fake time by ``seconds`` instead of waiting."""
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """An attempt function that plays its outcomes in order, each taking ``duration`` of fake time.

    No attempt takes longer than the time it was given; a CallTimeout outcome with a ``duration``
    below that stands for an attempt with its own, shorter timeout.
    """

    def __init__(self, time: FakeTime, outcomes: list[BaseException | str], duration: float = 0.0) -> None:
        self.time = time
        self.outcomes = list(outcomes)
        self.duration = duration
        self.given: list[float] = []  # the remaining time each attempt received

    @property
    def attempts(self) -> int:
        """How many attempts were made."""
        return len(self.given)

    async def __call__(self, remaining: float) -> str:
        assert remaining > 0, "an attempt started with no time left"
        self.given.append(remaining)
        outcome = self.outcomes.pop(0)
        self.time.now += min(self.duration, remaining)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


async def run(
    outcomes: list[BaseException | str],
    *,
    policy: RetryPolicy = FIXED,
    bucket: TokenBucket | None = None,
    idempotent: bool = False,
    budget: float = 10.0,
    duration: float = 0.0,
    time: FakeTime | None = None,
) -> tuple[Script, FakeTime, str | BaseException]:
    """Runs a scripted call with retries and ``budget`` seconds until its deadline.

    Returns:
        The script, the fake time, and the call's result or the error it raised.
    """
    time = time or FakeTime()
    script = Script(time, outcomes, duration)
    result: str | BaseException
    try:
        result = await run_with_retries(
            script,
            policy=policy,
            bucket=bucket,
            idempotent=idempotent,
            deadline=time.now + budget,
            clock=time.clock,
            sleep=time.sleep,
        )
    except Exception as exc:
        result = exc
    return script, time, result


class TestShouldRetry:
    """Which failures may be retried, and when only for idempotent methods."""

    @pytest.mark.parametrize(
        ("exc", "plain", "idempotent"),
        [
            (NoResponders("n"), True, True),
            (Overloaded("busy"), True, True),
            (Unavailable("draining"), True, True),
            (remote_error(429, "busy"), True, True),
            (remote_error(503, "draining"), True, True),
            (CallTimeout("t"), False, True),
            (ConnectionLost("c"), False, True),
            (BadRequest("b"), False, False),
            (NotFound("n"), False, False),
            (ServiceError(409, "conflict"), False, False),
            (InternalError("boom"), False, False),
            (DeadlineExceeded("late"), False, False),
            (CircuitOpen("open"), False, False),
            (ClientClosed("closed"), False, False),
            (PayloadTooLarge("big"), False, False),
            (PermissionDenied("denied"), False, False),
            (ValueError("v"), False, False),
        ],
        ids=[
            "no-responders",
            "429-overloaded",
            "503-unavailable",
            "429-from-wire",
            "503-from-wire",
            "timeout",
            "connection-lost",
            "400-bad-request",
            "404-not-found",
            "409-conflict",
            "500-internal",
            "504-deadline",
            "circuit-open",
            "client-closed",
            "payload-too-large",
            "permission-denied",
            "foreign-exception",
        ],
    )
    def test_table(self, exc: BaseException, plain: bool, idempotent: bool) -> None:
        """The decision for a non-idempotent and for an idempotent method."""
        assert should_retry(exc, idempotent=False) is plain
        assert should_retry(exc, idempotent=True) is idempotent


class TestRetryPolicy:
    """RetryPolicy validates its limits and computes capped, jittered exponential pauses."""

    def test_defaults(self) -> None:
        """The defaults: 3 attempts, 50 ms growing 2x up to 1 s, jittered."""
        policy = RetryPolicy()
        assert (policy.max_attempts, policy.initial_backoff, policy.max_backoff, policy.multiplier) == (
            3,
            0.05,
            1.0,
            2.0,
        )
        assert policy.jitter
        assert NO_RETRIES.max_attempts == 1

    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            ({"max_attempts": 0}, "max_attempts"),
            ({"max_attempts": MAX_ATTEMPTS + 1}, "max_attempts"),
            ({"max_attempts": 10}, "max_attempts"),
            ({"initial_backoff": -0.1}, "initial_backoff"),
            ({"initial_backoff": 2.0, "max_backoff": 1.0}, "max_backoff"),
            ({"multiplier": 0.5}, "multiplier"),
        ],
        ids=["zero-attempts", "six-attempts", "ten-attempts", "negative-backoff", "cap-below-start", "shrinking"],
    )
    def test_rejects_bad_values(self, overrides: dict[str, Any], field: str) -> None:
        """An out-of-range value raises ConfigurationError naming the field."""
        with pytest.raises(ConfigurationError, match=field):
            RetryPolicy(**overrides)

    @pytest.mark.parametrize("attempts", [1, MAX_ATTEMPTS], ids=["one", "max"])
    def test_accepts_limits(self, attempts: int) -> None:
        """One attempt and the maximum are both allowed."""
        assert RetryPolicy(max_attempts=attempts).max_attempts == attempts

    @pytest.mark.parametrize(
        ("policy", "expected"),
        [
            (RetryPolicy(initial_backoff=0.05, max_backoff=1.0, jitter=False), [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]),
            (RetryPolicy(initial_backoff=0.05, max_backoff=0.3, jitter=False), [0.05, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3]),
            (RetryPolicy(initial_backoff=0.1, multiplier=3.0, jitter=False), [0.1, 0.3, 0.9, 1.0, 1.0, 1.0, 1.0]),
            (RetryPolicy(initial_backoff=0.2, multiplier=1.0, jitter=False), [0.2] * 7),
        ],
        ids=["doubling-capped-at-1s", "capped-early", "tripling", "constant"],
    )
    def test_backoff_grows_and_is_capped(self, policy: RetryPolicy, expected: list[float]) -> None:
        """Without jitter, the pause before retry n is min(initial * multiplier**(n-1), max)."""
        assert [policy.backoff(n) for n in range(1, 8)] == pytest.approx(expected)

    def test_full_jitter_draws_below_the_bound(self) -> None:
        """With jitter, the pause is drawn from uniform(0, bound)."""
        draws: list[tuple[float, float]] = []

        def highest(low: float, high: float) -> float:
            draws.append((low, high))
            return high

        policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.3, random=highest)
        assert [policy.backoff(n) for n in range(1, 6)] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
        assert [low for low, _ in draws] == [0.0] * 5
        assert [high for _, high in draws] == pytest.approx([0.05, 0.1, 0.2, 0.3, 0.3])
        assert RetryPolicy(random=lambda low, high: low).backoff(3) == 0.0

    def test_jitter_stays_within_bounds(self) -> None:
        """Many seeded random pauses all fall within [0, bound] and spread over it."""
        policy = RetryPolicy(initial_backoff=0.05, max_backoff=0.3, random=random.Random(7).uniform)
        for n in range(1, 6):
            pauses = [policy.backoff(n) for _ in range(500)]
            bound = policy.backoff_bound(n)
            assert all(0.0 <= p <= bound for p in pauses)
            assert min(pauses) < bound * 0.1
            assert max(pauses) > bound * 0.9


class TestTokenBucket:
    """The token bucket stops retries when failures pile up and refills with successes."""

    def test_starts_full(self) -> None:
        """A new bucket is full and allows retries."""
        bucket = TokenBucket()
        assert bucket.tokens == 10
        assert bucket.allows_retry

    @pytest.mark.parametrize(
        ("failures", "allows"),
        [(0, True), (4, True), (5, False), (10, False), (50, False)],
        ids=["none", "four", "half", "all", "more-than-all"],
    )
    def test_failures_drain(self, failures: int, allows: bool) -> None:
        """Each failure takes one token; retries stop once half the tokens are gone."""
        bucket = TokenBucket(max_tokens=10, token_ratio=0.1)
        for _ in range(failures):
            bucket.record_failure()
        assert bucket.tokens == max(0, 10 - failures)
        assert bucket.allows_retry is allows

    @pytest.mark.parametrize(
        ("successes", "allows"), [(0, False), (10, False), (11, True)], ids=["none", "to-half", "past-half"]
    )
    def test_successes_refill(self, successes: int, allows: bool) -> None:
        """Each success adds token_ratio; retries resume above half the tokens."""
        bucket = TokenBucket(max_tokens=10, token_ratio=0.5)
        for _ in range(10):
            bucket.record_failure()
        for _ in range(successes):
            bucket.record_success()
        assert bucket.tokens == successes * 0.5
        assert bucket.allows_retry is allows

    def test_never_overfills(self) -> None:
        """Successes never raise the level above max_tokens."""
        bucket = TokenBucket(max_tokens=4, token_ratio=1.0)
        for _ in range(10):
            bucket.record_success()
        assert bucket.tokens == 4

    @pytest.mark.parametrize(
        "kwargs", [{"max_tokens": 0}, {"token_ratio": 0}, {"token_ratio": -1}], ids=["no-tokens", "no-ratio", "neg"]
    )
    def test_rejects_bad_values(self, kwargs: dict[str, float]) -> None:
        """Non-positive sizes raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            TokenBucket(**kwargs)


class TestRunWithRetries:
    """run_with_retries retries what may be retried, within the attempts and the one deadline."""

    @pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
    async def test_no_responders_retried_then_succeeds(self, idempotent: bool) -> None:
        """Two no-responders, then an answer: three attempts, two backoff pauses."""
        script, time, result = await run([NoResponders("a"), NoResponders("b"), OK], idempotent=idempotent)
        assert result == OK
        assert script.attempts == 3
        assert time.sleeps == pytest.approx([0.1, 0.2])

    @pytest.mark.parametrize(
        ("outcomes", "idempotent", "attempts", "expected"),
        [
            ([CallTimeout("t"), OK], False, 1, CallTimeout),
            ([CallTimeout("t"), OK], True, 2, OK),
            ([ConnectionLost("c"), OK], False, 1, ConnectionLost),
            ([ConnectionLost("c"), OK], True, 2, OK),
            ([Overloaded("busy"), Overloaded("busy"), OK], False, 3, OK),
            ([Unavailable("draining"), OK], False, 2, OK),
            ([BadRequest("b"), OK], True, 1, BadRequest),
            ([InternalError("boom"), OK], True, 1, InternalError),
            ([CircuitOpen("open"), OK], True, 1, CircuitOpen),
            ([OK], False, 1, OK),
        ],
        ids=[
            "timeout-plain-not-retried",
            "timeout-idempotent-retried",
            "connection-lost-plain-not-retried",
            "connection-lost-idempotent-retried",
            "429-retried",
            "503-retried",
            "400-not-retried",
            "500-not-retried",
            "circuit-open-not-retried",
            "first-try",
        ],
    )
    async def test_outcomes(
        self, outcomes: list[BaseException | str], idempotent: bool, attempts: int, expected: str | type[Exception]
    ) -> None:
        """The attempts made and the final result for a scripted sequence of outcomes."""
        script, _, result = await run(outcomes, idempotent=idempotent, duration=0.01)
        assert script.attempts == attempts
        if isinstance(expected, str):
            assert result == expected
        else:
            assert isinstance(result, expected)

    @pytest.mark.parametrize("max_attempts", [1, 2, 3, 5], ids=["one", "two", "three", "five"])
    async def test_max_attempts_respected(self, max_attempts: int) -> None:
        """A service that never answers gets exactly max_attempts attempts; the last error is raised."""
        errors = [NoResponders(f"attempt {n}") for n in range(1, 6)]
        policy = RetryPolicy(max_attempts=max_attempts, jitter=False)
        script, time, result = await run(list(errors), policy=policy)
        assert script.attempts == max_attempts
        assert len(time.sleeps) == max_attempts - 1
        assert result is errors[max_attempts - 1]

    async def test_raises_the_last_error(self) -> None:
        """When retries run out, the error of the last attempt is raised, not the first."""
        last = Unavailable("draining")
        _, _, result = await run([NoResponders("n"), Overloaded("busy"), last], policy=RetryPolicy(jitter=False))
        assert result is last

    async def test_each_attempt_gets_the_time_left(self) -> None:
        """Every attempt receives the seconds between now and the one deadline."""
        script, _, _ = await run([NoResponders("a"), NoResponders("b"), OK], budget=2.0, duration=0.25)
        assert script.given == pytest.approx([2.0, 2.0 - 0.25 - 0.1, 2.0 - 0.5 - 0.3])

    async def test_pause_that_would_cross_the_deadline_is_not_taken(self) -> None:
        """When the next pause would end at or past the deadline, the last error is raised at once."""
        # t=0 attempt (0.3 s), pause 0.1, t=0.4 attempt (0.3 s), t=0.7 + pause 0.2 would pass 0.85.
        script, time, result = await run([NoResponders("a"), NoResponders("b"), OK], budget=0.85, duration=0.3)
        assert script.attempts == 2
        assert time.sleeps == pytest.approx([0.1])
        assert isinstance(result, NoResponders)

    async def test_timeout_using_all_time_is_final(self) -> None:
        """An idempotent call whose attempt timed out with the whole deadline is not tried again."""
        script, time, result = await run([CallTimeout("t"), OK], idempotent=True, budget=1.5, duration=60.0)
        assert script.attempts == 1
        assert isinstance(result, CallTimeout)
        assert time.now == pytest.approx(100.0 + 1.5)

    async def test_deadline_passed_before_first_attempt(self) -> None:
        """No attempt starts without time left: DeadlineExceeded, and the attempt is never called."""
        script, _, result = await run([OK], budget=0.0)
        assert script.attempts == 0
        assert isinstance(result, DeadlineExceeded)

    @pytest.mark.parametrize(
        ("budget", "duration", "seed"),
        [(0.5, 0.05, 1), (1.0, 0.2, 2), (0.3, 0.0, 3), (2.0, 0.45, 4), (0.15, 0.01, 5), (5.0, 1.3, 6)],
        ids=["short", "medium", "instant-attempts", "slow-attempts", "tiny", "long"],
    )
    async def test_total_time_never_exceeds_deadline(self, budget: float, duration: float, seed: int) -> None:
        """Whatever the attempt durations and jitter, the call ends by its deadline."""
        policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=1.0, random=random.Random(seed).uniform)
        time = FakeTime()
        deadline = time.now + budget
        outcomes: list[BaseException | str] = [NoResponders(str(n)) for n in range(5)]
        script, _, result = await run(outcomes, policy=policy, budget=budget, duration=duration, time=time)
        assert isinstance(result, NoResponders)
        assert time.now <= deadline
        assert all(given > 0 for given in script.given)

    async def test_cancellation_is_not_retried(self) -> None:
        """A cancelled attempt propagates at once and leaves the bucket alone."""
        bucket = TokenBucket()
        with pytest.raises(asyncio.CancelledError):
            await run([asyncio.CancelledError(), OK], bucket=bucket, idempotent=True)
        assert bucket.tokens == bucket.max_tokens


class TestRunWithBucket:
    """run_with_retries feeds the shared token bucket and obeys it."""

    async def test_bucket_stops_retries_when_failures_pile_up(self) -> None:
        """With 4 tokens, the first failing call retries once, the next ones not at all."""
        bucket = TokenBucket(max_tokens=4, token_ratio=0.5)
        attempts = []
        for _ in range(3):
            script, _, result = await run([NoResponders(str(n)) for n in range(5)], bucket=bucket)
            assert isinstance(result, NoResponders)
            attempts.append(script.attempts)
        assert attempts == [2, 1, 1]
        assert bucket.tokens == 0

    async def test_successes_refill_and_retries_resume(self) -> None:
        """After enough successful calls, a failing call is retried again."""
        bucket = TokenBucket(max_tokens=4, token_ratio=0.5)
        for _ in range(4):
            bucket.record_failure()
        script, _, result = await run([NoResponders("n"), OK], bucket=bucket)
        assert (script.attempts, result.__class__) == (1, NoResponders)  # empty bucket: no retry
        for _ in range(7):
            _, _, result = await run([OK], bucket=bucket)
            assert result == OK
        assert bucket.tokens == 3.5
        script, _, result = await run([NoResponders("n"), OK], bucket=bucket)  # 2.5 left after the failure
        assert (script.attempts, result) == (2, OK)
        assert bucket.tokens == 3.0

    @pytest.mark.parametrize(
        ("outcomes", "idempotent", "tokens"),
        [
            ([NoResponders("n"), OK], False, 9.1),
            ([CallTimeout("t")], False, 9.0),
            ([BadRequest("b")], False, 10.0),
            ([ServiceError(409, "conflict")], True, 10.0),
            ([OK], False, 10.0),
        ],
        ids=["retried-failure", "timeout-not-retried-still-counts", "400-no-token", "409-no-token", "success-full"],
    )
    async def test_what_the_bucket_counts(
        self, outcomes: list[BaseException | str], idempotent: bool, tokens: float
    ) -> None:
        """Transient failures take a token even when not retried; answers and successes do not."""
        bucket = TokenBucket(max_tokens=10, token_ratio=0.1)
        await run(outcomes, bucket=bucket, idempotent=idempotent)
        assert bucket.tokens == pytest.approx(tokens)
