"""CPU our own processes spend per LLM request at high concurrency: before and after, measured in one run.

The scripted OpenAI-compatible server runs in a process of its own; each variant runs in a fresh child process that
sends N answer-sized chat requests with C in flight and measures the CPU (user + system) of itself and of any
worker processes it started, per request:

  before, httpx     the SDK's typed `chat.completions.create` on its default httpx transport (the client until
                    issue 7)
  before, aiohttp   the same call on the SDK's aiohttp transport (the client until issue 9)
  now               `LLMClient.chat` in process: the SDK's generic POST on aiohttp (no typed transform of the request,
                    no model built from the reply)
  now, N workers    `LLMClient.chat` with `client_processes=N`: the event loop's own CPU, and the workers' beside it

    python -m scripts.bench.bench_client_cpu [--requests 2000] [--concurrency 128] [--workers 2]
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# An answer prompt's shape: a system message and a user message with 20 retrieved entries.
MESSAGES = [{"role": "system", "content": "You answer questions from a user's long-term memory. " * 8},
            {"role": "user", "content": "Retrieved memories:\n" + "\n".join(
                f"{i + 1}. [EPISODIC] On 2024-03-{i + 1:02d} the user visited place {i} with a friend." for i in range(20))
             + "\n\nCurrent date: 2024-12-01\nQuestion: Where did I go in March?"}]


async def _send(url: str, variant: str, n: int, c: int, workers: int) -> dict:
    from http_workers import workers_cpu_s
    from llm_client import TASK_HEADER, LLMClient
    from prompts import Prompt

    sem = asyncio.Semaphore(c)
    client = sdk = None
    if variant.startswith("before"):
        import openai

        extra = {"http_client": openai.DefaultAioHttpClient()} if variant == "before-aiohttp" else {}
        sdk = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, **extra)

        async def request() -> None:
            resp = await sdk.chat.completions.create(model="m", messages=MESSAGES, temperature=0.0, max_tokens=256,
                                                     extra_headers={TASK_HEADER: "answer"})
            assert resp.choices[0].message.content
    else:
        client = LLMClient(provider="openai", base_url=url, api_key="bench", max_in_flight=c, max_retries=0,
                           client_processes=workers if variant == "workers" else 1)
        prompt = Prompt("answer", MESSAGES, {})

        async def request() -> None:
            res = await client.chat(prompt, json_mode=False)
            assert res.text

    async def one() -> None:
        async with sem:
            await request()

    await asyncio.gather(*(one() for _ in range(min(2 * c, n))))  # warm up connections, workers and the SDK
    gc.collect()
    cpu0, kids0, t0 = time.process_time(), workers_cpu_s(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    cpu, kids, wall = time.process_time() - cpu0, workers_cpu_s() - kids0, time.perf_counter() - t0
    if client is not None:
        await client.aclose()
    if sdk is not None:
        await sdk.close()
    return {"loop_ms": 1000 * cpu / n, "workers_ms": 1000 * kids / n, "requests_per_s": n / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.bench.bench_client_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="worker processes of the last variant")
    p.add_argument("--latency", type=float, default=0.02)
    p.add_argument("--child", nargs=2, metavar=("URL", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        url, variant = args.child
        print(json.dumps(asyncio.run(_send(url, variant, args.requests, args.concurrency, args.workers))))
        return 0
    from scripts.bench.bench_runner import start_scripted_server

    names = {"before-httpx": "before, httpx (SDK create)", "before-aiohttp": "before, aiohttp (SDK create)",
             "now": "now, in process (SDK post)", "workers": f"now, {args.workers} worker processes"}
    server, url = start_scripted_server(args.latency)
    results = {}
    try:
        for variant in names:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, "-m", "scripts.bench.bench_client_cpu", "--child", url, variant,
                                  "--requests", str(args.requests), "--concurrency", str(args.concurrency),
                                  "--workers", str(args.workers)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"{args.requests} answer-sized chat requests, {args.concurrency} in flight, scripted server at "
          f"{args.latency * 1000:.0f} ms; CPU per request of our processes (the server's own not counted)")
    for variant, r in results.items():
        extra = f" + {r['workers_ms']:.2f} ms in the workers" if variant == "workers" else ""
        print(f"  {names[variant]:34s}: {r['loop_ms']:.2f} ms on the event loop{extra}; "
              f"{r['requests_per_s']:.0f} requests/s")
    before, now = results["before-aiohttp"]["loop_ms"], results["now"]["loop_ms"]
    w = results["workers"]
    print(f"event-loop CPU per request: now / before (aiohttp) = {now / before:.2f}; with {args.workers} workers "
          f"{w['loop_ms'] / before:.2f} on the loop, {(w['loop_ms'] + w['workers_ms']) / before:.2f} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
