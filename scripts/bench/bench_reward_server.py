"""Benchmark: 64 concurrent /build_and_qa requests (5 QAs each) against a scripted LLM server at 100 ms a request.

Both servers run as real processes (the scripted server: `python -m scripts.scripted_server --latency 0.1`; the
reward server: uvicorn). The wall time of the burst is compared with the best any scheduler could do:

    ideal = max(critical path of one request, all LLM requests x latency / in-flight bound)

where the critical path is one embedding round trip (new entries and questions in one batch), then one answer,
then one judgment (3 x latency), and the LLM requests are counted by the reward server itself (`/stats`).
Prints the ratio measured / ideal (target <= 1.5). For contrast, the paper's release answers a request's questions
one after another: its critical path alone is 1 + 5 x 3 round trips.

    python scripts/bench/bench_reward_server.py [--requests 64] [--latency 0.1] [--max-in-flight 32]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from llm_client import LLMClient  # noqa: E402
from scripts.bench.reward_harness import (build_expert_state, policy_outputs, qa_pairs,  # noqa: E402
                                          reward_server_process, scripted_server_process)
from scripts.scripted_server import ScriptedServer  # noqa: E402


async def build_states(root: Path, n_states: int) -> list[str]:
    with ScriptedServer() as srv:  # same hashed embeddings as the benchmark's scripted server process
        client = LLMClient(provider="openai", base_url=srv.base_url, api_key="x", embedding_base_url=srv.base_url,
                           embedding_api_key="x")
        paths = []
        for i in range(n_states):
            paths.append(str(await build_expert_state(root / f"state_{i}", client, n_sessions=6 + i)))
        await client.aclose()
    return paths


async def burst(url: str, bodies: list[dict]) -> tuple[float, list[httpx.Response]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as h:
        t0 = time.perf_counter()
        responses = await asyncio.gather(*(h.post(url + "/build_and_qa", json=b) for b in bodies))
        return time.perf_counter() - t0, responses


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def llm_requests(url: str) -> int:
    return httpx.get(url + "/stats", timeout=30).json()["engine"]["llm_requests"]


def slot_seconds(url: str) -> tuple[float, int]:
    """(slot-seconds the in-flight bound has been held, the most slots ever held at once)."""
    slots = httpx.get(url + "/stats", timeout=30).json()["engine"]["llm_slots"]
    return slots["busy_slot_s"], slots["peak"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_reward_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--qas", type=int, default=5)
    p.add_argument("--latency", type=float, default=0.1, help="seconds per scripted LLM request")
    p.add_argument("--max-in-flight", type=int, default=32, help="the reward server's bound on LLM requests")
    p.add_argument("--states", type=int, default=4, help="distinct pre-session states the requests spread over")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_reward_") as tmp:
        root = Path(tmp)
        states = asyncio.run(build_states(root, args.states))
        with scripted_server_process(latency=args.latency) as llm, \
                reward_server_process(root, llm.url, max_in_flight=args.max_in_flight) as rs:
            def body(i: int) -> dict:
                return {"session_group_id": f"bench/{i}", "state_path": states[i % len(states)],
                        "actions": policy_outputs(f"b{i}"), "qa_pairs": qa_pairs(args.qas)}

            # Warm-up: load every state once, so the burst measures serving, not loading.
            asyncio.run(burst(rs.url, [body(i) for i in range(len(states))]))
            n0 = llm_requests(rs.url)
            single, _ = asyncio.run(burst(rs.url, [body(10_000)]))
            n1 = llm_requests(rs.url)
            busy0, _ = slot_seconds(rs.url)
            cpu0 = (cpu_seconds(rs.pid), cpu_seconds(llm.pid))
            load = os.getloadavg()[0]
            wall, responses = asyncio.run(burst(rs.url, [body(i) for i in range(args.requests)]))
            cpu1 = (cpu_seconds(rs.pid), cpu_seconds(llm.pid))
            n_llm = llm_requests(rs.url) - n1
            busy1, peak_slots = slot_seconds(rs.url)
            peak = httpx.get(rs.url + "/stats").json()["memory"]["peak_rss_mb"]

    bad = [r.status_code for r in responses if r.status_code != 200]
    critical = 3 * args.latency
    throughput = n_llm * args.latency / args.max_in_flight
    ideal = max(critical, throughput)
    ratio = wall / ideal
    release_critical = (1 + args.qas * 3) * args.latency
    print(f"requests: {args.requests} concurrent x {args.qas} QAs; LLM latency {args.latency * 1000:.0f} ms; "
          f"in-flight bound {args.max_in_flight}")
    print(f"LLM requests in the burst: {n_llm} ({n_llm / args.requests:.1f} per request; one request alone: {n1 - n0})")
    print(f"one request alone: {single:.3f} s (critical path {critical:.3f} s)")
    print(f"burst wall time: {wall:.3f} s; ideal max({critical:.3f}, {n_llm} x {args.latency} / {args.max_in_flight} "
          f"= {throughput:.3f}) = {ideal:.3f} s")
    print(f"ratio measured / ideal: {ratio:.3f} (target <= 1.5)  [{'PASS' if ratio <= 1.5 and not bad else 'FAIL'}]")
    print(f"for contrast, questions one after another (the release): critical path {release_critical:.1f} s a request")
    print(f"reward server peak RSS: {peak} MB; non-200 responses: {len(bad)}")
    rs_cpu, llm_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    held = busy1 - busy0
    print(f"in-flight bound: utilisation {held / (args.max_in_flight * wall):.1%} over the burst (peak "
          f"{peak_slots} of {args.max_in_flight}); mean LLM round trip while holding a slot {held / n_llm * 1000:.0f} "
          f"ms against {args.latency * 1000:.0f} ms nominal (the excess is queueing inside the two server processes "
          f"on this machine)")
    print(f"CPU during the burst: reward server {rs_cpu:.2f} s ({rs_cpu / max(n_llm, 1) * 1000:.1f} ms per LLM "
          f"request; one event loop cannot finish sooner), scripted server {llm_cpu:.2f} s; {os.cpu_count()} CPUs, "
          f"load average {load:.1f} when the burst started")
    return 0 if ratio <= 1.5 and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
