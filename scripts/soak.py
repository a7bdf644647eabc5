"""Soak mcp-broker with faults (driver behind scripts/soak.sh; run with the harness venv's python).

Starts, on loopback only: a JWKS server with a fresh RSA key, and `mcp-broker serve` with [auth] trusting it, in
front of N `ledger` examples over stdio. Two callers (alice, bob: two processes) keep several sessions each and call
`ledgerK__get_account` at a paced total rate, while this process
  * SIGKILLs a random ledger child every ~`--kill-every` seconds (the broker restarts it),
  * rewrites the config every `--reload-every` seconds (every second rewrite also changes one server's `timeout`,
    so the broker restarts that server too), and
  * opens and closes sessions (each worker re-opens its session every few hundred calls, and a churn task opens,
    lists and deletes one every second per caller).
It samples the broker's RSS and open fds from /proc. At the end it reports calls made, calls failed (by message,
and whether each is explained: a call to a server that was killed or restarted while the call was in flight, or
that was still coming back), RSS and fds at start (after warm-up) and end, and the calls/s sustained. Exit status:
0 ok, 1 growth beyond the bounds or an unexplained failure (or the broker died, or children leaked).
"""

from __future__ import annotations

import argparse
import bisect
import asyncio
import collections
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import helpers as H  # noqa: E402
import httpx2  # noqa: E402

PROTO = "2025-11-25"
ACCOUNTS = ["ACC-1001", "ACC-1002", "ACC-1003", "ACC-1004", "ACC-1005", "ACC-1006"]
# Errors a call may get when its server was killed or restarted under it (or is still coming back).
UPSTREAM_GONE = re.compile(r"unavailable|restart|closed|connection|transport|disconnect|not running|starting|"
                           r"cancel|broken pipe|eof|exited|gone", re.I)


def norm(msg: str) -> str:
    """An error message with numbers and quoted bits folded, for counting by message."""
    msg = re.sub(r"ledger\d+", "ledgerN", msg)
    msg = re.sub(r"\d+", "N", msg)
    return msg[:200]


# --------------------------------------------------------------------------- load (one process per caller)


class Pacer:
    """Evenly spaced slots at `rate` per second, shared by the tasks of one process."""

    def __init__(self, rate: float):
        self.gap = 1.0 / rate
        self.next = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(self.next, now - 0.5)  # never bank more than half a second of backlog
        self.next = slot + self.gap
        if slot > now:
            await asyncio.sleep(slot - now)


class Worker:
    def __init__(self, caller: str, url: str, token: str, servers: int, t0: float):
        self.caller, self.url, self.servers, self.t0 = caller, url, servers, t0
        self.auth = {"Authorization": f"Bearer {token}"}
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.events: list[tuple[float, float, str, str]] = []  # (start, end, server, message) of each failure
        self.sessions_opened = 0
        self.sessions_closed = 0
        self.churn_failures: collections.Counter[str] = collections.Counter()
        self.lat: list[float] = []
        self.ok_at: dict[str, set[int]] = collections.defaultdict(set)  # server -> seconds with a successful call

    def headers(self, sid: str | None) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": H.MCP_ACCEPT, "MCP-Protocol-Version": PROTO, **self.auth}
        if sid:
            h["Mcp-Session-Id"] = sid
        return h

    async def open(self, c: httpx2.AsyncClient) -> str:
        r = await c.post(self.url, headers=self.headers(None), json=H.init_body(1, f"soak-{self.caller}"))
        if r.status_code != 200:
            raise RuntimeError(f"initialize: HTTP {r.status_code} {r.text[:200]}")
        sid = r.headers["mcp-session-id"]
        n = await c.post(self.url, headers=self.headers(sid), json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        if n.status_code not in (200, 202):
            raise RuntimeError(f"initialized: HTTP {n.status_code}")
        self.sessions_opened += 1
        return sid

    async def close(self, c: httpx2.AsyncClient, sid: str) -> None:
        r = await c.delete(self.url, headers=self.headers(sid))
        if r.status_code in (200, 202, 204):
            self.sessions_closed += 1

    async def call(self, c: httpx2.AsyncClient, sid: str, rid: int) -> None:
        k = random.randint(1, self.servers)
        server = f"ledger{k}"
        body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
                "params": {"name": f"{server}__get_account", "arguments": {"account_id": random.choice(ACCOUNTS)}}}
        t0 = time.time()
        try:
            r = await c.post(self.url, headers=self.headers(sid), json=body)
            if r.status_code != 200:
                msg = f"HTTP {r.status_code} {r.text[:120]}"
            else:
                m = H.final_response(r, rid)
                if "error" in m:
                    msg = m["error"].get("message", "")
                elif m["result"].get("isError"):
                    msg = "tool error: " + " ".join(x.get("text", "") for x in m["result"].get("content", []))
                else:
                    msg = ""
        except Exception as e:  # noqa: BLE001 - every failure is counted by its message
            msg = f"client: {type(e).__name__}: {e}"
        t1 = time.time()
        self.lat.append(t1 - t0)
        if msg:
            self.errors[norm(msg)] += 1
            if len(self.events) < 50_000:
                self.events.append((t0, t1, server, msg[:300]))
        else:
            self.ok += 1
            self.ok_at[server].add(int(t1))

    async def session_loop(self, c: httpx2.AsyncClient, pacer: Pacer, stop: float) -> None:
        rid = 10
        sid = None
        left = 0
        while time.time() < stop:
            if sid is None or left <= 0:
                if sid:
                    try:
                        await self.close(c, sid)
                    except Exception as e:  # noqa: BLE001
                        self.churn_failures[norm(f"close: {type(e).__name__}: {e}")] += 1
                try:
                    sid = await self.open(c)
                except Exception as e:  # noqa: BLE001
                    self.churn_failures[norm(f"open: {type(e).__name__}: {e}")] += 1
                    sid = None
                    await asyncio.sleep(0.2)
                    continue
                left = random.randint(200, 800)
            await pacer.wait()
            rid += 1
            left -= 1
            await self.call(c, sid, rid)
        if sid:
            try:
                await self.close(c, sid)
            except Exception:  # noqa: BLE001
                pass

    async def churn_loop(self, c: httpx2.AsyncClient, stop: float) -> None:
        """Open a session, list tools, close it; once a second."""
        while time.time() < stop:
            try:
                sid = await self.open(c)
                r = await c.post(self.url, headers=self.headers(sid), json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
                m = H.final_response(r, 2)
                if "error" in m:
                    self.churn_failures[norm("tools/list: " + m["error"].get("message", ""))] += 1
                await self.close(c, sid)
            except Exception as e:  # noqa: BLE001
                self.churn_failures[norm(f"churn: {type(e).__name__}: {e}")] += 1
            await asyncio.sleep(1.0)

    async def run(self, rate: float, sessions: int, stop: float) -> None:
        limits = httpx2.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4)
        async with httpx2.AsyncClient(timeout=30, limits=limits) as c:
            pacer = Pacer(rate)
            tasks = [asyncio.create_task(self.session_loop(c, pacer, stop)) for _ in range(sessions)]
            tasks.append(asyncio.create_task(self.churn_loop(c, stop)))
            await asyncio.gather(*tasks)


def worker_main(caller: str, url: str, token: str, servers: int, rate: float, sessions: int, stop: float,
                out_path: str) -> None:
    w = Worker(caller, url, token, servers, time.time())
    asyncio.run(w.run(rate, sessions, stop))
    lat = sorted(w.lat) or [0.0]
    Path(out_path).write_text(json.dumps({
        "caller": caller, "ok": w.ok, "errors": dict(w.errors), "events": w.events,
        "sessions_opened": w.sessions_opened, "sessions_closed": w.sessions_closed,
        "churn_failures": dict(w.churn_failures), "ok_at": {k: sorted(v) for k, v in w.ok_at.items()},
        "p50_ms": round(1000 * lat[len(lat) // 2], 1), "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 1),
    }))


# --------------------------------------------------------------------------- faults and measurements


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ledger_children(broker_pid: int) -> dict[int, str]:
    """pid -> server name (from the SOAK_SERVER variable each child's config gives it)."""
    out = {}
    for pid in H.descendants(broker_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"SOAK_SERVER="):
                out[pid] = kv.split(b"=", 1)[1].decode()
    return out


def config_text(servers: int, auth: dict, generation: int, slow: int | None) -> str:
    specs = {}
    for k in range(1, servers + 1):
        spec = H.example_stdio_spec(H.LEDGER_BIN, env={"SOAK_SERVER": f"ledger{k}"})
        spec["timeout"] = "31s" if slow == k else "30s"
        specs[f"ledger{k}"] = spec
    return (f"# soak generation {generation}\n"
            + H.render_config(specs, {"max_sessions_per_subject": 10000}, auth=auth, policies=[{"effect": "allow"}]))


def applied(f: tuple[float, str, str]) -> float:
    """When a fault took effect at the latest: a kill at once; a restart by reload when the broker next checks
    its config file (once a second), so calls up to a second after the rewrite may still succeed."""
    return f[0] + (1.5 if f[2] == "restart" else 0.0)


def classify(results: list[dict], faults: list[tuple[float, str, str]]):
    """Failures by message, explained (and why) or not; the outage after each fault, in seconds."""
    explained: collections.Counter[str] = collections.Counter()
    unexplained: collections.Counter[str] = collections.Counter()
    why: collections.Counter[str] = collections.Counter()
    ok_at: dict[str, list[int]] = collections.defaultdict(list)
    for r in results:
        for server, secs in r["ok_at"].items():
            ok_at[server].extend(secs)
    for v in ok_at.values():
        v.sort()

    def first_ok_after(server: str, t: float) -> float | None:
        """The start of the first whole second after t in which a call to server succeeded."""
        secs = ok_at.get(server, [])
        i = bisect.bisect_left(secs, t)
        return secs[i] if i < len(secs) else None

    def last_ok_before(server: str, t: float) -> float:
        """The start of the last whole second that ended before t in which a call to server succeeded."""
        secs = ok_at.get(server, [])
        i = bisect.bisect_right(secs, t - 1)
        return secs[i - 1] if i else float("-inf")

    for r in results:
        for (c0, c1, server, msg) in r["events"]:
            mine = [f for f in faults if f[1] == server]
            during = [f for f in mine if c0 - 0.05 <= applied(f) and f[0] <= c1 + 0.05]
            # Faults since the server last answered a call: it has not been seen back since.
            since = [f for f in mine if last_ok_before(server, c0) <= applied(f) and f[0] <= c0]
            gone = UPSTREAM_GONE.search(msg)
            # A server restarted by a reload is unlisted until it is back: its tools are briefly unknown.
            unlisted = "unknown tool" in msg and any(f[2] == "restart" for f in during + since)
            if during and (gone or unlisted):
                why[f"in flight on a {during[0][2]}ed server"] += 1
            elif since and (gone or unlisted):
                # Sent after a kill or restart and before any call to that server succeeded again.
                why[f"sent while a {since[-1][2]}ed server was down"] += 1
            else:
                unexplained[norm(msg)] += 1
                continue
            explained[norm(msg)] += 1
    # How long each fault kept its server from answering: to the first second with a successful call.
    outages = sorted(round(b - f[0], 1) for f in faults if (b := first_ok_after(f[1], f[0])) is not None)
    return explained, unexplained, why, outages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--rate", type=float, default=500, help="target calls/s, both callers together")
    ap.add_argument("--sessions", type=int, default=6, help="concurrent sessions per caller")
    ap.add_argument("--servers", type=int, default=4, help="ledger upstreams over stdio")
    ap.add_argument("--kill-every", type=float, default=10, help="mean seconds between killed children")
    ap.add_argument("--reload-every", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=20, help="seconds of load before the start figures")
    ap.add_argument("--rss-bound-mb", type=float, default=50)
    ap.add_argument("--fd-bound", type=int, default=50)
    ap.add_argument("--work-dir", type=Path, default=ROOT / "target" / "soak")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    a = ap.parse_args()

    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            print(f"soak: {b} is missing (cargo build --bin mcp-broker --examples)", file=sys.stderr)
            return 2
    a.work_dir.mkdir(parents=True, exist_ok=True)
    key, kid, issuer = H.rsa_private_key(), "soak-key", "https://soak-issuer.example"
    jwks = H.JwksServer([H.public_jwk(key, kid)])
    auth = {"issuer": issuer, "jwks_uri": jwks.url, "required_scopes": ["mcp:tools"]}
    broker = None
    procs: list[mp.Process] = []
    try:
        cfg = a.work_dir / "soak-broker.toml"
        cfg.write_text(config_text(a.servers, auth, 0, None))
        log = a.work_dir / "soak-broker.stderr.log"
        log.unlink(missing_ok=True)
        proc = H.Proc("soak-broker", [str(H.BROKER_BIN), "serve", "--config", str(cfg)], a.work_dir,
                      env={"RUST_LOG": "warn,rmcp=error,mcp_broker::app=info"})
        url = proc.wait_line(H.BROKER_LISTEN_RE, 30).group(1)
        broker = H.Broker(proc, url, cfg)
        bpid = proc.popen.pid
        now = int(time.time())
        tokens = {}
        for who in ("alice", "bob"):
            tokens[who] = H.mint_rs256(key, {"iss": issuer, "aud": url, "sub": who, "client_id": f"{who}-agent",
                                             "scope": "mcp:tools", "iat": now - 5, "exp": now + int(a.seconds) + 3600,
                                             "jti": uuid.uuid4().hex}, kid)
        H.wait_for_tools(url, [f"ledger{k}__get_account" for k in range(1, a.servers + 1)], timeout=60,
                         headers=H.bearer(tokens["alice"]))
        rss0, fd0 = rss_kb(bpid), fds(bpid)
        print(f"soak: broker pid {bpid} at {url}; {a.servers} ledger children; RSS {rss0 / 1024:.1f} MB, {fd0} fds "
              f"before load; {a.seconds:.0f} s at target {a.rate:.0f} calls/s", flush=True)

        t_start = time.time()
        stop = t_start + a.seconds
        ctx = mp.get_context("spawn")
        outs = []
        for who in ("alice", "bob"):
            out = a.work_dir / f"worker-{who}.json"
            out.unlink(missing_ok=True)
            outs.append(out)
            p = ctx.Process(target=worker_main, args=(who, url, tokens[who], a.servers, a.rate / 2, a.sessions, stop,
                                                      str(out)), daemon=True)
            p.start()
            procs.append(p)

        faults: list[tuple[float, str, str]] = []  # (time, server, what)
        samples = []
        generation = 0
        current_slow: int | None = None
        next_kill = time.time() + random.uniform(0.5, 1.5) * a.kill_every
        next_reload = time.time() + a.reload_every
        next_sample = time.time()
        warm_at = t_start + min(a.warmup, a.seconds / 4)
        warm: tuple[int, int] | None = None
        reload_failures = 0
        while time.time() < stop:
            t = time.time()
            if not proc.alive():
                print("soak: the broker died\n" + proc.stderr_tail(), file=sys.stderr)
                return 1
            if warm is None and t >= warm_at:
                warm = (rss_kb(bpid), fds(bpid))
            if t >= next_sample:
                samples.append((round(t - t_start), rss_kb(bpid), fds(bpid), len(ledger_children(bpid))))
                next_sample = t + 10
                print(f"soak: t={t - t_start:5.0f}s RSS {samples[-1][1] / 1024:6.1f} MB fds {samples[-1][2]:4d} "
                      f"children {samples[-1][3]} kills {sum(1 for f in faults if f[2] == 'kill')} "
                      f"reloads {generation}", flush=True)
            if t >= next_kill:
                kids = ledger_children(bpid)
                if kids:
                    pid, server = random.choice(list(kids.items()))
                    try:
                        os.kill(pid, signal.SIGKILL)
                        faults.append((time.time(), server, "kill"))
                    except ProcessLookupError:
                        pass
                next_kill = t + random.uniform(0.5, 1.5) * a.kill_every
            if t >= next_reload:
                generation += 1
                slow = random.randint(1, a.servers) if generation % 2 == 0 else None
                cfg.write_text(config_text(a.servers, auth, generation, slow))
                # A server whose table changed is restarted: the one that gets or loses the 31 s timeout.
                for k in {current_slow, slow} - {None} if current_slow != slow else set():
                    faults.append((time.time(), f"ledger{k}", "restart"))
                current_slow = slow
                next_reload = t + a.reload_every
            time.sleep(0.1)

        for p in procs:
            p.join(timeout=60)
        t_end = time.time()
        results = [json.loads(o.read_text()) for o in outs if o.exists()]
        if len(results) != 2:
            print("soak: a load worker did not report", file=sys.stderr)
            return 1
        alive = proc.alive()
        # Let the last killed child come back before counting children.
        try:
            H.poll_until(lambda: len(ledger_children(bpid)) == a.servers, 30, "every ledger child running")
        except TimeoutError:
            pass
        children_end = len(ledger_children(bpid))
        rss1, fd1 = rss_kb(bpid), fds(bpid)
        reloads_log = (a.work_dir / "soak-broker.stderr.log").read_text(errors="replace")
        reload_failures = reloads_log.count("configuration reload rejected")
        panics = reloads_log.count("panicked")

        ok = sum(r["ok"] for r in results)
        errors: collections.Counter[str] = collections.Counter()
        for r in results:
            errors.update(r["errors"])
        explained, unexplained, why, outages = classify(results, faults)
        in_flight = sum(v for k, v in why.items() if k.startswith("in flight"))
        calls = ok + sum(errors.values())
        dur = t_end - t_start
        warm = warm or (rss0, fd0)
        summary = {
            "binary": str(H.BROKER_BIN), "seconds": round(dur, 1), "target_rate": a.rate,
            "calls": calls, "ok": ok, "failed": calls - ok, "calls_per_s": round(calls / dur, 1),
            "failed_in_flight_on_a_faulted_server": in_flight,
            "failed_explained_by_message": dict(explained.most_common()),
            "failed_explained_by_cause": dict(why.most_common()),
            "outage_after_fault_s": {"median": outages[len(outages) // 2] if outages else None,
                                     "max": outages[-1] if outages else None,
                                     "over_10s": sum(1 for o in outages if o > 10)},
            "failed_unexplained_by_message": dict(unexplained.most_common()),
            "kills": sum(1 for f in faults if f[2] == "kill"), "restarts_by_reload": sum(1 for f in faults if f[2] == "restart"),
            "reloads": generation, "reloads_rejected": reload_failures, "panics_in_log": panics,
            "sessions_opened": sum(r["sessions_opened"] for r in results),
            "sessions_closed": sum(r["sessions_closed"] for r in results),
            "session_churn_failures": {k: v for r in results for k, v in r["churn_failures"].items()},
            "latency_ms": {r["caller"]: {"p50": r["p50_ms"], "p99": r["p99_ms"]} for r in results},
            "rss_mb": {"before_load": round(rss0 / 1024, 1), "start": round(warm[0] / 1024, 1), "end": round(rss1 / 1024, 1)},
            "fds": {"before_load": fd0, "start": warm[1], "end": fd1},
            "children_end": children_end, "broker_alive": alive,
            "bounds": {"rss_mb": a.rss_bound_mb, "fds": a.fd_bound},
            "samples": samples,
        }
        problems = []
        if not alive:
            problems.append("the broker died")
        if panics:
            problems.append(f"{panics} panics in the broker log")
        if (rss1 - warm[0]) / 1024 > a.rss_bound_mb:
            problems.append(f"RSS grew {(rss1 - warm[0]) / 1024:.1f} MB > {a.rss_bound_mb} MB")
        if fd1 - warm[1] > a.fd_bound:
            problems.append(f"fds grew {fd1 - warm[1]} > {a.fd_bound}")
        if unexplained:
            problems.append(f"{sum(unexplained.values())} unexplained failures")
        if summary["session_churn_failures"]:
            problems.append(f"session open/close failures: {summary['session_churn_failures']}")
        if children_end != a.servers:
            problems.append(f"{children_end} ledger children at the end, expected {a.servers}")
        if reload_failures:
            problems.append(f"{reload_failures} reloads rejected")
        summary["problems"] = problems
        (a.work_dir / "faults.json").write_text(json.dumps(faults))
        text = json.dumps(summary, indent=1)
        if a.json:
            a.json.write_text(text)
        (a.work_dir / "summary.json").write_text(text)
        print(text)
        print(f"soak: {calls} calls in {dur:.0f} s ({calls / dur:.0f}/s, target {a.rate:.0f}), {calls - ok} failed "
              f"({sum(explained.values())} explained, {sum(unexplained.values())} unexplained); "
              f"RSS {warm[0] / 1024:.1f} -> {rss1 / 1024:.1f} MB; fds {warm[1]} -> {fd1}; "
              f"{summary['kills']} kills, {generation} reloads: {'FAIL: ' + '; '.join(problems) if problems else 'ok'}",
              flush=True)
        return 1 if problems else 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if broker is not None:
            broker.stop()
        jwks.stop()


if __name__ == "__main__":
    sys.exit(main())
