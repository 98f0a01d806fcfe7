"""Load and faults: 200 concurrent /build_and_qa requests while the LLM server answers 10% HTTP 500 and 10% 429.

Both servers run as real processes. Checks, and prints: every request gets its reward, or 503 `retryable: true` when
an LLM call still failed after the client's retries (never a question counted WRONG for it: a 200 holds no failed
question), the reward server never answers 500, and its memory stays bounded over several waves (resident set
sampled from /proc while the waves run, and the peak).

    python scripts/bench/load_reward_server.py [--requests 200] [--waves 2] [--fail-500 0.1] [--fail-429 0.1]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from scripts.bench.bench_reward_server import build_states  # noqa: E402
from scripts.bench.reward_harness import (policy_outputs, qa_pairs, reward_server_process,  # noqa: E402
                                          scripted_server_process)


def rss_mb(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class RssSampler:
    def __init__(self, pid: int, interval_s: float = 0.05):
        self.pid, self.interval_s = pid, interval_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (OSError, ValueError):
                return
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def wave(url: str, states: list[str], n: int, tag: str) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=None)) as h:
        async def one(i: int):
            body = {"session_group_id": f"{tag}/{i}", "state_path": states[i % len(states)],
                    "actions": policy_outputs(f"{tag}{i}"), "qa_pairs": qa_pairs(5)}
            try:
                return await h.post(url + "/build_and_qa", json=body)
            except httpx.HTTPError as exc:
                return exc

        return await asyncio.gather(*(one(i) for i in range(n)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.load_reward_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--waves", type=int, default=2)
    p.add_argument("--fail-500", type=float, default=0.1)
    p.add_argument("--fail-429", type=float, default=0.1)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--max-in-flight", type=int, default=32)
    p.add_argument("--states", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-retries", type=int, default=None,
                   help="the reward server's retries per LLM request (default its own, 5); 1 shows retryable 503s")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    ok = True
    with tempfile.TemporaryDirectory(prefix="load_reward_") as tmp:
        root = Path(tmp)
        states = asyncio.run(build_states(root, args.states))
        with scripted_server_process(latency=args.latency, fail_500=args.fail_500, fail_429=args.fail_429,
                                     seed=args.seed) as llm, \
                reward_server_process(root, llm.url, max_in_flight=args.max_in_flight,
                                      extra=["--state-cache-size", str(max(2, args.states // 2)),
                                             *(["--max-retries", str(args.max_retries)]
                                               if args.max_retries is not None else [])]) as rs:
            base_rss = rss_mb(rs.pid)
            print(f"reward server pid {rs.pid}: RSS {base_rss:.1f} MB before load; LLM faults "
                  f"{args.fail_500:.0%} HTTP 500 + {args.fail_429:.0%} HTTP 429")
            after = []
            for w in range(args.waves):
                t0 = time.perf_counter()
                with RssSampler(rs.pid) as sampler:
                    results = asyncio.run(wave(rs.url, states, args.requests, f"w{w}"))
                wall = time.perf_counter() - t0
                after.append(rss_mb(rs.pid))
                codes = Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__
                                for r in results)
                docs = [r.json() for r in results if isinstance(r, httpx.Response) and r.status_code == 200]
                retry = [r.json() for r in results if isinstance(r, httpx.Response) and r.status_code == 503]
                questions = [q for d in docs for q in d["qa_results"]]
                failed = [q for q in questions if q["failed"]]
                rewards = [d["task_reward"] for d in docs]
                print(f"wave {w + 1}: {args.requests} concurrent requests in {wall:.1f} s; HTTP status {dict(codes)}; "
                      f"{len(docs)} rewarded (mean task reward {sum(rewards) / max(len(rewards), 1):.3f}), "
                      f"{len(retry)} answered 503 retryable; failed questions inside a reward: {len(failed)}; "
                      f"RSS peak {sampler.peak:.1f} MB, after {after[-1]:.1f} MB")
                ok &= set(codes) <= {200, 503} and not failed and all(d.get("retryable") is True for d in retry)
            stats = httpx.get(rs.url + "/stats", timeout=30).json()
    usage = stats["engine"]["usage"]
    retries = sum(u["retries"] for part in usage.values() for u in part.values())
    failures = stats["engine"]["llm_failures"]["total"]
    print(f"LLM requests {stats['engine']['llm_requests']} (retried {retries}, given up {failures}: "
          f"{stats['engine']['llm_failures']}); "
          f"state cache {stats['engine']['state_cache']}")
    growth = after[-1] - after[0] if len(after) > 1 else 0.0
    print(f"reward server memory: peak RSS {stats['memory']['peak_rss_mb']} MB (kernel high-water mark); "
          f"growth from wave 1 to wave {len(after)}: {growth:+.1f} MB")
    ok &= stats["memory"]["peak_rss_mb"] < 2048 and growth < 64
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
