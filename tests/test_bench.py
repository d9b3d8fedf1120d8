"""Tests of ``python -m natsrpc bench``: its arguments, percentile maths, progress line and reports.

The runs are tiny and bench the example KV service hosted by the test's loop; the command runs in a
thread so the loop keeps serving. Their throughput and latencies are not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
from children import REPO, child_env

import natsrpc
from natsrpc import bench, cli
from natsrpc.bench import report
from natsrpc.bench.load import Plan
from natsrpc.bench.stats import Stats, percentiles
from natsrpc.errors import ConfigurationError
from natsrpc.testing import serve
from services.kv import KV

NOWHERE = "nats://127.0.0.1:1"  # bad-usage runs must stop before connecting

REPORT_KEYS = {
    "target", "mode", "concurrency", "rate", "processes", "loop", "duration_s", "calls", "ok", "errors",
    "late", "rps", "latency_ms", "timeline", "soak",
}  # fmt: skip
LATENCY_KEYS = {"p50", "p90", "p99", "p99_9", "max", "mean"}


def parse(*argv: str) -> argparse.Namespace:
    """Returns the parsed ``python -m natsrpc --url NOWHERE bench *argv``."""
    return cli.parser().parse_args(["--url", NOWHERE, "bench", *argv])


def plan(*argv: str) -> Plan:
    """Returns the plan of ``bench *argv``."""
    return bench.plan_from_args(parse(*argv))


async def run_bench(nats_url: str, *argv: str) -> int:
    """Runs ``bench *argv`` against ``nats_url`` in a thread (the test's loop keeps serving)."""
    args = cli.parser().parse_args(["--url", nats_url, "bench", *argv])
    return await asyncio.wait_for(asyncio.to_thread(bench.run, args), 30)


async def bench_json(nats_url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Runs ``bench *argv --json -q`` and returns the JSON object it printed."""
    assert await run_bench(nats_url, *argv, "--json", "-q") == 0
    lines = capsys.readouterr().out.splitlines()  # the client's debug logs may come first (unconfigured structlog)
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@pytest_asyncio.fixture
async def kv(client: natsrpc.Client) -> AsyncIterator[KV]:
    """The example KV service, hosted on the test's client, holding a="1"."""
    service = KV()
    service.data["a"] = "1"
    async with serve(client, service):
        yield service


class TestArguments:
    """Arguments become a plan; contradictions and bad values are bad usage (exit 2)."""

    def test_defaults_are_a_closed_loop_of_10_for_10_seconds(self) -> None:
        """Without --rate the run is a closed loop at concurrency 10, measured for 10 s after 1 s of warm-up."""
        p = plan("kv.get")
        assert (p.concurrency, p.rate, p.duration, p.count, p.warmup) == (10, None, 10.0, None, 1.0)
        assert (p.service, p.method, p.body, p.processes, p.soak) == ("kv", "get", b"", 1, False)

    def test_rate_makes_an_open_loop(self) -> None:
        """--rate sets an open loop with no concurrency."""
        p = plan("kv.get", "--rate", "200")
        assert (p.concurrency, p.rate, p.max_in_flight) == (None, 200.0, 10_000)

    def test_count_replaces_duration(self) -> None:
        """-n measures a count of calls instead of a duration."""
        p = plan("kv.get", "-n", "500")
        assert (p.count, p.duration) == (500, None)

    @pytest.mark.parametrize(
        "argv",
        [
            ["--rate", "10", "-c", "5"],
            ["-n", "10", "-d", "1"],
            ["--processes", "0"],
            ["-c", "0"],
            ["--rate", "0"],
            ["-d", "-1"],
            ["-n", "0"],
            ["--warmup", "-1"],
            ["--timeout", "0"],
            ["--max-in-flight", "0"],
            ["--rate", "inf"],
        ],
        ids=[
            "rate-and-concurrency",
            "count-and-duration",
            "no-processes",
            "no-concurrency",
            "zero-rate",
            "negative-duration",
            "zero-count",
            "negative-warmup",
            "zero-timeout",
            "zero-in-flight",
            "infinite-rate",
        ],
    )
    def test_rejected_by_the_parser(self, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
        """Contradicting or out-of-range options exit 2 with a usage message."""
        with pytest.raises(SystemExit) as exc:
            parse("kv.get", *argv)
        assert exc.value.code == 2
        assert "usage:" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["kv.get", '{"key": bad'], "not valid JSON"),
            (["kv"], "SERVICE.METHOD"),
            (["kv."], "SERVICE.METHOD"),
            (["k v.get"], "SERVICE.METHOD"),
            (["kv.get", "-c", "2", "--processes", "3"], "less than --processes"),
            (["kv.get", "-n", "2", "--processes", "3", "-c", "3"], "less than --processes"),
            (["kv.get", "--soak", "-d", "5"], "--soak"),
        ],
        ids=["bad-json", "no-method", "empty-method", "space", "concurrency-under-processes", "count-under", "soak-d"],
    )
    def test_bad_usage_exits_2_before_connecting(
        self, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Bad targets, bad JSON and impossible splits exit 2 and say why (nothing listens at the URL)."""
        assert bench.run(parse(*argv)) == 2
        assert message in capsys.readouterr().err

    def test_json_body_is_sent_as_is(self) -> None:
        """The JSON arguments are the body, byte for byte; --msgpack converts them once."""
        assert plan("kv.get", '{"key": "a"}').body == b'{"key": "a"}'
        p = plan("kv.get", '{"key": "a"}', "--msgpack")
        assert (p.msgpack, msgspec.msgpack.decode(p.body)) == (True, {"key": "a"})

    def test_soak_defaults_to_a_million_calls(self) -> None:
        """--soak measures 1,000,000 calls unless -n says otherwise."""
        assert plan("kv.get", "--soak").count == 1_000_000
        assert plan("kv.get", "--soak", "-n", "50").count == 50

    def test_missing_plot_dependency_is_bad_usage(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--plot without matplotlib exits 2 and names the extra to install."""
        monkeypatch.setattr(bench, "_importable", lambda module: module != "matplotlib")
        assert bench.run(parse("kv.get", "--plot", "x.png")) == 2
        assert "pip install 'natsrpc[plot]'" in capsys.readouterr().err

    def test_missing_uvloop_is_bad_usage_only_when_asked_for(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """--uvloop without uvloop is an error; by default the run falls back to asyncio."""
        monkeypatch.setattr(bench, "_importable", lambda module: module != "uvloop")
        with pytest.raises(ConfigurationError, match=r"natsrpc\[speed\]"):
            plan("kv.get", "--uvloop")
        assert plan("kv.get").uvloop is False

    def test_bench_is_a_cli_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`python -m natsrpc bench --help` documents the options and the JSON shape."""
        with pytest.raises(SystemExit) as exc:
            cli.main(["bench", "--help"])
        out = capsys.readouterr().out
        assert exc.value.code == 0
        for text in ("--concurrency", "--rate", "--processes", "--soak", '"latency_ms"', '"timeline"'):
            assert text in out


class TestSplit:
    """A multi-process run splits its load evenly over the processes."""

    def test_closed_loop_split(self) -> None:
        """Concurrency and count are split as evenly as integers allow, summing to the whole."""
        shares = Plan(("nats://x",), "kv", "get", concurrency=10, duration=None, count=101, processes=3).split()
        assert [s.concurrency for s in shares] == [4, 3, 3]
        assert [s.count for s in shares] == [34, 34, 33]
        assert {s.processes for s in shares} == {1}

    def test_open_loop_split_interleaves_the_schedules(self) -> None:
        """Each process gets an equal rate, its schedule shifted by one send interval of the whole run."""
        shares = Plan(("nats://x",), "kv", "get", concurrency=None, rate=100.0, processes=4).split()
        assert [s.rate for s in shares] == [25.0] * 4
        assert [s.phase for s in shares] == [0.0, 0.01, 0.02, 0.03]


PERCENTILE_CASES = [
    ([7.0], [0, 50, 99.9, 100], [7.0, 7.0, 7.0, 7.0]),
    ([1.0, 2.0], [0, 50, 51, 100], [1.0, 1.0, 2.0, 2.0]),
    ([1.0, 2.0, 3.0, 4.0], [25, 50, 75, 100], [1.0, 2.0, 3.0, 4.0]),
    ([float(i) for i in range(1, 11)], [10, 11, 90, 99, 100], [1.0, 2.0, 9.0, 10.0, 10.0]),
    ([float(i) for i in range(1, 101)], [50, 90, 99, 99.9], [50.0, 90.0, 99.0, 100.0]),
    ([float(i) for i in range(1, 1001)], [50, 90, 99, 99.9, 100], [500.0, 900.0, 990.0, 999.0, 1000.0]),
    ([1.0, 1.0, 1.0, 5.0], [50, 75, 76], [1.0, 1.0, 5.0]),
]


class TestPercentiles:
    """percentiles() is nearest-rank: the sample of rank ceil(p/100 * n)."""

    @pytest.mark.parametrize(
        ("samples", "ps", "expected"),
        PERCENTILE_CASES,
        ids=["one-sample", "two-samples", "four", "ten", "hundred", "thousand-p99.9", "ties"],
    )
    def test_nearest_rank(self, samples: list[float], ps: list[float], expected: list[float]) -> None:
        """Each percentile is a measured sample, p100 the maximum."""
        assert percentiles(samples, ps) == expected

    @pytest.mark.parametrize(
        ("samples", "ps", "message"),
        [([], [50], "no samples"), ([2.0, 1.0], [50], "sorted"), ([1.0], [100.1], "between"), ([1.0], [-1], "between")],
        ids=["empty", "unsorted", "over-100", "negative"],
    )
    def test_rejected(self, samples: list[float], ps: list[float], message: str) -> None:
        """No samples, unsorted samples and percentiles outside [0, 100] raise ValueError."""
        with pytest.raises(ValueError, match=message):
            percentiles(samples, ps)


class TestStats:
    """Stats of several processes merge into one set of figures."""

    def test_merge_adds_counts_and_lines_timelines_up(self) -> None:
        """Samples, counts and errors add up; a process that started a step later is shifted by a step."""
        a = Stats(wall_start=100.0, calls=3, failed=1, timeline=[[2, 0], [1, 1]], duration=0.8)
        a.samples.extend([0.1, 0.2])
        a.errors["NoResponders"] = 1
        b = Stats(wall_start=100.5, calls=1, timeline=[[1, 0]], duration=0.3)
        b.samples.append(0.3)
        merged = Stats.merge([a, b])
        assert (merged.calls, merged.failed, sorted(merged.samples)) == (4, 1, [0.1, 0.2, 0.3])
        assert (dict(merged.errors), merged.timeline, merged.duration) == ({"NoResponders": 1}, [[2, 0], [2, 1]], 0.8)


class TestProgress:
    """The progress line is rewritten in place on a terminal and printed line by line otherwise."""

    def test_plain_lines_when_not_a_terminal(self) -> None:
        """Off a terminal each update is a line; updates closer than 0.5 s are skipped unless final."""
        out = io.StringIO()
        progress = report.Progress(out, warmup=1.0)
        progress.update(0.5, 0, 0)
        progress.update(0.6, 10, 0)
        progress.update(1.0, 100, 2)
        progress.update(1.2, 150, 2, final=True)
        progress.close()
        lines = out.getvalue().splitlines()
        assert len(lines) == 3
        assert "(warm-up)" in lines[0]
        assert "calls        100" in lines[1]
        assert "errors 2" in lines[1]
        assert "rps       250" in lines[2]

    def test_rewritten_line_on_a_terminal(self) -> None:
        """On a terminal each update starts with a carriage return, and closing ends the line."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        out = Terminal()
        progress = report.Progress(out)
        progress.update(0.5, 10, 0)
        progress.update(1.0, 20, 0)
        progress.close()
        text = out.getvalue()
        assert text.count("\r") == 2
        assert text.endswith("\n")
        assert text.count("\n") == 1


class TestRun:
    """A tiny run against the KV service prints the documented report."""

    async def test_closed_loop_json_shape(self, nats_url: str, kv: KV, capsys: pytest.CaptureFixture[str]) -> None:
        """-n 200 -c 5 prints one JSON object with the documented keys: 200 calls, all ok."""
        out = await bench_json(nats_url, capsys, "kv.get", '{"key":"a"}', "-n", "200", "-c", "5", "--warmup", "0")
        assert set(out) == REPORT_KEYS
        assert (out["target"], out["mode"], out["concurrency"], out["rate"], out["processes"]) == (
            "kv.get", "closed", 5, None, 1,
        )  # fmt: skip
        assert (out["calls"], out["ok"], out["errors"], out["late"], out["soak"]) == (200, 200, {}, 0, None)
        assert out["loop"] in ("uvloop", "asyncio")
        assert isinstance(out["duration_s"], float)
        assert isinstance(out["rps"], float)
        assert set(out["latency_ms"]) == LATENCY_KEYS
        assert all(isinstance(v, float) for v in out["latency_ms"].values())
        lat = out["latency_ms"]
        assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
        assert all(set(e) == {"t", "calls", "errors"} for e in out["timeline"])
        assert sum(e["calls"] for e in out["timeline"]) == 200

    async def test_open_loop(self, nats_url: str, kv: KV, capsys: pytest.CaptureFixture[str]) -> None:
        """--rate 200 -d 0.5 runs an open loop; every finished call is ok or counted as an error."""
        out = await bench_json(nats_url, capsys, "kv.get", '["a"]', "--rate", "200", "-d", "0.5", "--warmup", "0")
        assert (out["mode"], out["rate"], out["concurrency"]) == ("open", 200.0, None)
        assert 80 <= out["calls"] <= 101  # on schedule: 200/s for 0.5 s, whatever the replies take
        assert out["ok"] == out["calls"]
        assert out["errors"] == {}
        assert 0 <= out["late"] <= out["calls"]

    async def test_errors_by_type(self, nats_url: str, kv: KV, capsys: pytest.CaptureFixture[str]) -> None:
        """A method nobody serves fails every call, counted by exception class; no latencies."""
        out = await bench_json(nats_url, capsys, "kv.nosuchmethod", "-n", "50", "--warmup", "0")
        assert set(out["errors"]) <= {"NoResponders", "CircuitOpen"}
        assert sum(out["errors"].values()) == out["calls"] == 50
        assert out["ok"] == 0
        assert set(out["latency_ms"].values()) == {None}

    async def test_text_report_and_progress(self, nats_url: str, kv: KV, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --json the report is text on stdout, the progress lines on stderr."""
        assert await run_bench(nats_url, "kv.get", '{"key":"a"}', "-n", "100", "--warmup", "0", "--msgpack") == 0
        out, err = capsys.readouterr()
        out = out[out.index("target   ") :]  # after the client's debug logs, if any
        assert out.startswith("target   kv.get  (closed loop, concurrency 10, 1 process,")
        assert "calls    100 in" in out
        assert "p99.9" in out
        assert "errors   none" in out
        assert "calls        100" in err

    async def test_soak_reports_memory_and_leftovers(
        self, nats_url: str, kv: KV, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--soak adds RSS at start, middle and end, and no pending call is left."""
        out = await bench_json(nats_url, capsys, "kv.get", '["a"]', "--soak", "-n", "300", "--warmup", "0")
        soak = out["soak"]
        assert set(soak) == {"rss_mb", "pending_calls_end", "tasks_start", "tasks_end"}
        assert set(soak["rss_mb"]) == {"start", "middle", "end"}
        rss = soak["rss_mb"]
        assert 10 < rss["start"] <= rss["middle"] + 1  # MB: a real reading
        assert rss["end"] - rss["start"] < 30  # flat
        assert soak["pending_calls_end"] == 0
        assert soak["tasks_start"] >= 1  # the client's own tasks (registry off: at least its flusher, reader)
        assert soak["tasks_end"] <= soak["tasks_start"]  # no task left behind by 300 calls (one per call would show)

    async def test_processes(self, nats_url: str, kv: KV, capsys: pytest.CaptureFixture[str]) -> None:
        """--processes 2 runs two client processes and reports their combined calls."""
        out = await bench_json(
            nats_url, capsys, "kv.get", '["a"]', "-n", "100", "-c", "4", "--processes", "2", "--warmup", "0"
        )
        assert (out["processes"], out["concurrency"], out["calls"], out["ok"]) == (2, 4, 100, 100)

    async def test_no_server_exits_1(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A URL where nothing listens exits 1 with ConnectionLost."""
        assert await run_bench(NOWHERE, "kv.get", "-n", "1") == 1
        assert "ConnectionLost" in capsys.readouterr().err

    async def test_plot_writes_a_png(
        self, nats_url: str, kv: KV, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--plot writes a PNG with the histogram and the throughput chart."""
        pytest.importorskip("matplotlib")
        path = tmp_path / "bench.png"
        code = await run_bench(nats_url, "kv.get", '["a"]', "-n", "200", "--warmup", "0", "-q", "--plot", str(path))
        assert code == 0
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


class TestBenchScripts:
    """``bench/hotpath.py`` and ``bench/compare.py`` still run against the current code (tiny runs)."""

    def run(self, *argv: str) -> str:
        done = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "ERROR" not in done.stderr, done.stderr[-2000:]
        return done.stdout

    def test_hotpath_prints_both_sides_for_both_contenders(self) -> None:
        out = self.run("bench/hotpath.py", "--rounds", "1", "--calls", "500", "--loop", "asyncio")
        rows = [line.split() for line in out.splitlines()]
        assert [(r[0], " ".join(r[1:3]) if r[1] == "raw" else r[1]) for r in rows] == [
            ("host", "natsrpc"), ("host", "raw nats-py"), ("client", "natsrpc"), ("client", "raw nats-py"),
        ]  # fmt: skip
        assert all(float(r[r.index("min") + 1]) > 0 for r in rows)

    def test_compare_prints_a_table_with_every_contender(self) -> None:
        out = self.run(
            "bench/compare.py", "--rounds", "1", "--duration", "0.2", "--concurrency", "1",
            "--encodings", "json", "--loops", "asyncio",
        )  # fmt: skip
        rows = [line for line in out.splitlines() if line.startswith("| json | 1 |")]
        assert [row.split("|")[3].strip() for row in rows] == ["natsrpc", "raw nats-py", "nats.micro"]
        assert rows[1].split("|")[5].strip() == "1.00"  # raw is the reference
        assert rows[1].split("|")[8].strip() == "1.00 (1.00-1.00)"  # in every round too
        assert "The machine's CPU during the run: user" in out

    @pytest.mark.slow  # 4 s: the default suite keeps under 3 minutes; .ci/run runs it with -m slow
    def test_hotpath_observed_with_each_piece_and_the_sdk_pair(self) -> None:
        """--observe runs with all pieces and with each alone; --span-only prints the SDK's pair."""
        for piece in ([], ["--piece", "nothing"], ["--piece", "metrics"], ["--piece", "tracing"]):
            out = self.run(
                "bench/hotpath.py", "--rounds", "1", "--calls", "300", "--loop", "asyncio", "--only", "natsrpc",
                "--observe", *piece,
            )  # fmt: skip
            assert [line.split()[0] for line in out.splitlines()] == ["host", "client"]
        out = self.run("bench/hotpath.py", "--span-only", "--calls", "200")
        assert out.startswith("the SDK's two spans of a sampled call, alone:")

    @pytest.mark.slow  # 4 s: the default suite keeps under 3 minutes; .ci/run runs it with -m slow
    def test_compare_observed_prints_the_cpu_table(self) -> None:
        out = self.run(
            "bench/compare.py", "--rounds", "1", "--duration", "0.2", "--concurrency", "5",
            "--encodings", "json", "--loops", "asyncio", "--observe",
        )  # fmt: skip
        rows = [line for line in out.splitlines() if line.startswith("| json | 5 |")]
        names = [row.split("|")[3].strip() for row in rows]
        assert names[:5] == ["natsrpc", "raw nats-py", "nats.micro", "natsrpc observed, no spans", "natsrpc observed"]
        assert len(rows) == 6  # and the CPU row: each natsrpc contender's sides, natsrpc's own, the SDK's share
        cpu = [float(cell) for cell in rows[5].split("|")[3:-1]]  # numbers, each of them
        assert len(cpu) == 12
        assert cpu[6] > 0  # the nats-server's CPU per call was read
        assert cpu[10] > 0  # cores busy
        assert "natsrpc's own" in out
