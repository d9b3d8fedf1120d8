"""Throughput of kv.get with 1, 2 and 4 service instances and 1-4 client processes, on this machine.

Usage:  python bench/scaling.py [--instances 1 2 4] [--processes 1 2 4] [--duration 3]

Starts a nats-server, then for each instance count runs that many ``python -m natsrpc.run
services.kv`` processes and drives ``python -m natsrpc bench kv.get`` (closed loop, concurrency 100
per client process) with each client-process count, printing a Markdown table of calls/s and p99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import natsrpc

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(url: str, instances: int) -> None:
    """Polls $SRV.PING.kv until ``instances`` instances answer (bounded)."""
    import asyncio

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            replies = await natsrpc.registry.survey(nc, "PING", "kv", 0.3)
        finally:
            await nc.close()
        return len(replies)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if asyncio.run(count()) >= instances:
            return
    raise SystemExit(f"{instances} kv instances did not come up")


def bench(url: str, processes: int, duration: float) -> dict[str, object]:
    """Runs the bench tool and returns its JSON result."""
    out = subprocess.run(
        [sys.executable, "-m", "natsrpc", "--url", url, "bench", "kv.get", '{"key":"a"}', "-c", str(100 * processes),
         "-d", str(duration), "--warmup", "1", "--processes", str(processes), "--json", "-q"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    """Measures and prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    env = {**os.environ, "NATSRPC_LOG_LEVEL": "warning"}
    print(
        f"kv.get, closed loop, concurrency 100 per client process, {args.duration} s per cell, {os.cpu_count()} cores\n"
    )
    print("| kv instances | client processes | calls/s | p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|")
    with natsrpc.NatsServer() as server:
        for instances in args.instances:
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "natsrpc.run", "services.kv", "--url", server.url],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for _ in range(instances)
            ]
            try:
                wait_ready(server.url, instances)
                for processes in args.processes:
                    r = bench(server.url, processes, args.duration)
                    lat = r["latency_ms"]
                    assert isinstance(lat, dict)
                    print(f"| {instances} | {processes} | {r['rps']:,.0f} | {lat['p50']} | {lat['p99']} |", flush=True)
            finally:
                for p in procs:
                    p.send_signal(signal.SIGTERM)
                for p in procs:
                    p.wait(30)


if __name__ == "__main__":
    main()
