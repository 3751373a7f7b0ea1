"""Load test of ``arcfab serve``: concurrent clients stepping and forking over HTTP.

Starts the real server (``python -m arcfab_gym.service serve``) in a subprocess on a free
loopback port, then runs ``--clients`` asyncio clients (httpx) for ``--duration`` seconds
or ``--max-requests`` requests, whichever comes first. Each client plays episodes in its
own session (and so its own tree): checkpointed steps with random actions, a fork from
the current node every ``--fork-every`` steps (stepped twice, then closed), a rewind now
and then, and a new session every ``--episode-steps`` steps. Prints requests/s, latency
percentiles per request kind, errors and the server's store bytes; exits non-zero if
any request failed.

    python benchmarks/service_load.py [--backend pusht-sim] [--clients 8] [--duration 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@dataclass
class Tally:
    """Latencies (s) per request kind, failures, and when to stop."""

    deadline: float
    max_requests: int
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    sent: int = 0

    def more(self) -> bool:
        return time.perf_counter() < self.deadline and self.sent < self.max_requests


async def call(client: httpx.AsyncClient, tally: Tally, kind: str, method: str, url: str,
               **kwargs) -> dict | None:  # fmt: skip
    """One timed request; a non-2xx answer or a transport error is counted as an error."""
    tally.sent += 1
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, **kwargs)
    except httpx.HTTPError as exc:
        tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
        return None
    tally.latencies[kind].append(time.perf_counter() - t0)
    if r.status_code != 200:
        tally.errors.append(f"{kind}: HTTP {r.status_code}: {r.text[:200]}")
        return None
    return r.json()


async def run_client(k: int, base: str, args: argparse.Namespace, tally: Tally) -> None:
    rng = random.Random(k)
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
        while tally.more():
            body = {"backend": args.backend, "seed": rng.randrange(2**31)}
            info = await call(client, tally, "create", "POST", "/api/sessions", json=body)
            if info is None:
                return
            sid = info["session_id"]
            for n in range(1, args.episode_steps + 1):
                if not tally.more():
                    break
                action = [rng.uniform(-1, 1), rng.uniform(-1, 1)]
                info = await call(client, tally, "step", "POST", f"/api/sessions/{sid}/step",
                                  json={"action": action})  # fmt: skip
                if info is None:
                    break
                if n % args.fork_every == 0:
                    child = await call(client, tally, "fork", "POST", f"/api/sessions/{sid}/fork",
                                       json={"checkpoint_id": info["node_id"]})  # fmt: skip
                    if child is not None:
                        csid = child["session_id"]
                        for _ in range(2):
                            await call(client, tally, "step", "POST",
                                       f"/api/sessions/{csid}/step",
                                       json={"action": [rng.uniform(-1, 1), 0.0]})  # fmt: skip
                        await call(client, tally, "close", "DELETE", f"/api/sessions/{csid}")
                if n % args.rewind_every == 0:
                    await call(client, tally, "rewind", "POST", f"/api/sessions/{sid}/rewind",
                               json={"n_steps": 2})  # fmt: skip
            await call(client, tally, "close", "DELETE", f"/api/sessions/{sid}")


async def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited early with code {proc.returncode}")
            try:
                if (await client.get("/api/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server did not answer /api/health within {timeout} s")


async def sample_store_bytes(base: str, tally: Tally, peak: list[int]) -> None:
    """Record the largest ``store_bytes`` of ``/api/status`` while the load runs."""
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
        while tally.more():
            try:
                status = (await client.get("/api/status")).json()
                peak[0] = max(peak[0], status["store_bytes"])
                peak[1] += 1
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> int:
    port = args.port or free_port()
    base = f"http://{LOOPBACK}:{port}"
    cmd = [sys.executable, "-m", "arcfab_gym.service", "serve", "--host", LOOPBACK,
           "--port", str(port), "--max-sessions", str(2 * args.clients + 2),
           "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "ARCFAB_TOKEN": ""}  # an open server on loopback for the run
    proc = subprocess.Popen(cmd, env=env)
    try:
        await wait_healthy(base, proc)
        tally = Tally(time.perf_counter() + args.duration, args.max_requests)
        t0 = time.perf_counter()
        sampler = asyncio.create_task(sample_store_bytes(base, tally, peak := [0, 0]))
        await asyncio.gather(*(run_client(k, base, args, tally) for k in range(args.clients)))
        elapsed = time.perf_counter() - t0
        sampler.cancel()
        async with httpx.AsyncClient(base_url=base, timeout=10.0) as client:
            status = (await client.get("/api/status")).json()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    every = [x for xs in tally.latencies.values() for x in xs]
    print(f"backend {args.backend}, {args.clients} clients, {elapsed:.1f} s, "
          f"{len(every)} responses: {len(every) / elapsed:.1f} requests/s")  # fmt: skip
    print(f"{'kind':8s} {'count':>7s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for kind, xs in sorted(tally.latencies.items()):
        print(f"{kind:8s} {len(xs):7d} {1e3 * percentile(xs, 0.5):8.2f} "
              f"{1e3 * percentile(xs, 0.99):8.2f}")  # fmt: skip
    if every:
        print(f"{'all':8s} {len(every):7d} {1e3 * percentile(every, 0.5):8.2f} "
              f"{1e3 * percentile(every, 0.99):8.2f}")  # fmt: skip
    print(f"errors: {len(tally.errors)}")
    for e in tally.errors[:10]:
        print(f"  {e}")
    print(f"server store bytes: peak {peak[0]} (sampled each second, {peak[1]} samples), "
          f"after the run {status['store_bytes']} with {status['sessions']} sessions open")
    return 1 if tally.errors or not every else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="pusht-sim")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=20_000)
    ap.add_argument("--episode-steps", type=int, default=150)
    ap.add_argument("--fork-every", type=int, default=10)
    ap.add_argument("--rewind-every", type=int, default=25)
    ap.add_argument("--port", type=int, default=0, help="loopback port (0: a free one)")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
