#!/usr/bin/env python3
"""Figures for `[cluster]` (issue 14): nothing is asserted.

    target/harness/venv/bin/python scripts/bench_cluster.py [--seconds 5] [--concurrency 8] [--debug]

Starts Redis, brokers and HAProxy (examples/cluster/haproxy.cfg, addresses replaced) the way
tests/e2e/test_cluster.py does, with the `ledger` example over stdio as the upstream (`get_account`, small and
deterministic; no `[auth]`, so what is measured is the cluster's cost), and measures with a Python load generator
(one Streamable HTTP session per worker, plain JSON answers on the direct lane):

  1. calls/s through HAProxy to one instance vs three instances, all with `[cluster]`, at --concurrency in flight;
  2. per-call latency (p50/p99) at 1 in flight on one instance directly, with `[cluster]` and without: the
     difference is what the Redis lookups add per call; and the Redis commands per call (INFO stats).

The load generator is Python and shares the machine with everything it measures: on a 2-core machine three
instances cannot be faster than one (they compete for the same cores as HAProxy, Redis and the generator), so the
first figure shows the cost of spreading, not the capacity of three machines. Uses target/release binaries
(`cargo build --release --bin mcp-broker --example ledger`), or target/debug with --debug.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import httpx2  # noqa: E402

import clusterlib as C  # noqa: E402
import helpers as H  # noqa: E402

ACCEPT = "application/json, text/event-stream"


def config(port: int, public_url: str, ledger: Path, redis_url: str | None, name: str) -> str:
    text = f"""[broker]
listen = "127.0.0.1:{port}"
public_url = "{public_url}"
watch_config = false
"""
    if redis_url:
        text += f"""
[cluster]
redis_url = "{redis_url}"
instance_id = "{name}"
secret_key = "${{MCP_BROKER_CLUSTER_KEY}}"
"""
    text += f"""
[audit]
arguments = "none"

[servers.ledger]
transport = "stdio"
command = "{ledger}"
args = ["stdio"]
"""
    return text


class Fleet:
    def __init__(self, work: Path, broker_bin: Path, ledger: Path, n: int, cluster: bool, redis: C.Redis | None,
                 lb: bool):
        self.procs: list[H.Proc] = []
        self.ports = [H.free_port() for _ in range(n)]
        self.haproxy: C.HAProxy | None = None
        key = secrets.token_hex(32)
        work.mkdir(parents=True, exist_ok=True)
        if lb:  # the example has three server lines: with fewer instances the rest point at closed ports (DOWN)
            self.haproxy = C.HAProxy(work, self.ports + [H.free_port() for _ in range(3 - n)])
        public = self.haproxy.url if self.haproxy else f"http://127.0.0.1:{self.ports[0]}/mcp"
        for i, port in enumerate(self.ports, 1):
            d = work / f"b{i}"
            d.mkdir(parents=True, exist_ok=True)
            cfg = d / "servers.toml"
            cfg.write_text(config(port, public, ledger, redis.url if (cluster and redis) else None, f"b{i}"))
            p = H.Proc(f"b{i}", [str(broker_bin), "serve", "--config", str(cfg)], d,
                       env={"RUST_LOG": "warn", "MCP_BROKER_CLUSTER_KEY": key})
            p.wait_line(H.BROKER_LISTEN_RE, 30)
            self.procs.append(p)
        for port in self.ports:
            H.wait_for_tools(f"http://127.0.0.1:{port}/mcp", ["ledger__get_account"], timeout=30)
        if self.haproxy:
            want = {f"b{i}": "UP" for i in range(1, n + 1)}
            self.haproxy.wait_status(want, timeout=20)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        if self.haproxy:
            self.haproxy.stop()


async def session(client: httpx2.AsyncClient, url: str) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": ACCEPT}
    r = await client.post(url, headers=h, json=H.init_body(name="bench-cluster"))
    r.raise_for_status()
    h["Mcp-Session-Id"] = r.headers["mcp-session-id"]
    h["MCP-Protocol-Version"] = "2025-11-25"
    await client.post(url, headers=h, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return h


CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}}}


async def run(url: str, concurrency: int, seconds: float, warmup: float = 1.0) -> dict:
    latencies: list[float] = []
    errors = 0
    limits = httpx2.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx2.AsyncClient(timeout=30, limits=limits) as client:
        heads = [await session(client, url) for _ in range(concurrency)]
        start = time.monotonic()
        measure_from = start + warmup
        end = measure_from + seconds

        async def worker(h):
            nonlocal errors
            while True:
                t0 = time.monotonic()
                if t0 >= end:
                    return
                r = await client.post(url, headers=h, content=json.dumps(CALL))
                t1 = time.monotonic()
                ok = r.status_code == 200 and "ACC-1001" in r.text and '"isError":true' not in r.text
                if t0 >= measure_from:
                    if ok:
                        latencies.append(t1 - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker(h) for h in heads))
        for h in heads:
            await client.delete(url, headers=h)
    latencies.sort()
    return {"calls": len(latencies), "calls_per_s": len(latencies) / seconds, "errors": errors,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None}


def redis_commands(redis: C.Redis) -> int:
    for line in redis.cli("INFO", "stats").splitlines():
        if line.startswith("total_commands_processed:"):
            return int(line.split(":")[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--debug", action="store_true", help="use target/debug binaries")
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "bench" / "cluster.json")
    a = ap.parse_args()
    profile = "debug" if a.debug else "release"
    broker_bin = Path(os.environ.get("MCP_BROKER_BIN") or ROOT / "target" / profile / "mcp-broker")
    ledger = ROOT / "target" / profile / "examples" / "ledger"
    for b in (broker_bin, ledger):
        if not b.exists():
            sys.exit(f"{b} missing: cargo build {'--release ' if profile == 'release' else ''}--bin mcp-broker --example ledger")
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    redis = C.Redis(work)
    redis.start()
    results: dict = {"profile": profile, "cores": os.cpu_count(), "load_start": os.getloadavg()[0],
                     "seconds": a.seconds, "concurrency": a.concurrency}
    try:
        rows = []
        for n in (1, 3):
            f = Fleet(work / f"lb{n}", broker_bin, ledger, n, True, redis, lb=True)
            try:
                r = asyncio.run(run(f.haproxy.url, a.concurrency, a.seconds))
            finally:
                f.stop()
            rows.append((f"HAProxy -> {n} instance{'s' if n > 1 else ''} [cluster]", a.concurrency, r))
            results[f"haproxy_{n}"] = r
        for cluster in (False, True):
            f = Fleet(work / f"one-{cluster}", broker_bin, ledger, 1, cluster, redis, lb=False)
            try:
                before = redis_commands(redis)
                r = asyncio.run(run(f"http://127.0.0.1:{f.ports[0]}/mcp", 1, a.seconds))
                r["redis_commands_per_call"] = (redis_commands(redis) - before) / max(1, r["calls"])
            finally:
                f.stop()
            label = "1 instance direct " + ("[cluster]" if cluster else "(no [cluster])")
            rows.append((label, 1, r))
            results["direct_cluster" if cluster else "direct_plain"] = r
    finally:
        redis.stop()
    results["load_end"] = os.getloadavg()[0]
    print(f"\n{profile} build, {os.cpu_count()} cores, load {results['load_start']:.1f} -> {results['load_end']:.1f}, "
          f"{a.seconds:g} s per row, Python load generator")
    print(f"{'setup':<40} {'in flight':>9} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'redis cmd/call':>15}")
    for label, conc, r in rows:
        rc = r.get("redis_commands_per_call")
        print(f"{label:<40} {conc:>9} {r['calls_per_s']:>9.0f} {r['p50_ms'] or 0:>8.3f} {r['p99_ms'] or 0:>8.3f} "
              f"{r['errors']:>7} {'' if rc is None else f'{rc:.2f}':>15}")
    plain, clus = results["direct_plain"], results["direct_cluster"]
    if plain["p50_ms"] and clus["p50_ms"]:
        results["added_p50_ms"] = clus["p50_ms"] - plain["p50_ms"]
        print(f"added latency of [cluster] per call at 1 in flight: {results['added_p50_ms']:+.3f} ms (p50)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
