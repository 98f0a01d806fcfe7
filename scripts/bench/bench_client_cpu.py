"""CPU our own process spends per LLM request at high concurrency, by HTTP transport.

The scripted OpenAI-compatible server runs in a process of its own; this process sends N chat requests through
`LLMClient.chat` (the real `openai` SDK) with C in flight and measures its own CPU time (user + system) per request.
"httpx" is the SDK's default transport (what the client used before it detected openai 3.x's vendored aiohttp
transport), "aiohttp" the transport the client now selects. Each transport is measured in a fresh child process.

    python -m scripts.bench.bench_client_cpu [--requests 2000] [--concurrency 128]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


async def _send(url: str, n: int, c: int) -> dict:
    from llm_client import LLMClient, http_backend
    from prompts import Prompt

    client = LLMClient(provider="openai", base_url=url, api_key="bench", max_in_flight=c, max_retries=0)
    sem = asyncio.Semaphore(c)
    prompt = Prompt("answer", [{"role": "user", "content": "Question: what did I say?"}], {})

    async def one() -> None:
        async with sem:
            await client.chat(prompt, json_mode=False)

    await asyncio.gather(*(one() for _ in range(min(c, n))))  # warm up connections and the SDK
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    await client.aclose()
    return {"backend": http_backend(), "cpu_ms_per_request": 1000 * cpu / n, "requests_per_s": n / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_client_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_send(args.child, args.requests, args.concurrency))))
        return 0
    from scripts.bench.bench_runner import start_scripted_server

    server, url = start_scripted_server(args.latency)
    results = {}
    try:
        for backend in ("httpx", "aiohttp"):
            env = {**os.environ, "PYTHONPATH": str(ROOT), "MEMBUILDER_HTTP_BACKEND": backend}
            out = subprocess.run([sys.executable, "-m", "scripts.bench.bench_client_cpu", "--child", url,
                                  "--requests", str(args.requests), "--concurrency", str(args.concurrency)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=10)
    for name, r in results.items():
        print(f"{name:8s} ({r['backend']}): {r['cpu_ms_per_request']:.2f} ms CPU per request, "
              f"{r['requests_per_s']:.0f} requests/s at concurrency {args.concurrency}")
    h, a = results["httpx"]["cpu_ms_per_request"], results["aiohttp"]["cpu_ms_per_request"]
    print(f"aiohttp / httpx CPU per request: {a / h:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
