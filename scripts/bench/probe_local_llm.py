"""Probe the local llama.cpp server (scripts/local_llm.py) with the real `openai` client and print what it does.

Not a test: it measures and reports what a client must cope with. JSON mode on MemBuilder's agent prompts
(validity by `parse_actions`, finish reasons, rambling at a 512-token cap), throughput read from the server's own
timing lines, a prompt longer than the context (status, body, SDK exception), embedding shapes per server mode,
concurrency (one request at a time?) and what an abandoned request costs the next one. Figures on a shared
machine are noisy.

    python -m scripts.bench.probe_local_llm [--runs 3] [--out probe.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import prompts  # noqa: E402
from memory_system import ActionFormatError, parse_actions  # noqa: E402
from scripts.local_llm import DEFAULT_ALIAS, LocalLLMServer  # noqa: E402

SESSION = "user: I adopted a cat named Miso yesterday.\nassistant: Congrats!"
SESSION_TIME: str | None = "2023-05-08"
_PERF = re.compile(r"^llama_perf_context_print:\s+(prompt eval|eval) time =\s+([\d.]+) ms /\s+(\d+) (?:tokens|runs)",
                   re.MULTILINE)


def perf_totals(log_text: str) -> dict:
    out = {"prompt eval": [0.0, 0], "eval": [0.0, 0]}
    for kind, ms, n in _PERF.findall(log_text):
        out[kind][0] += float(ms)
        out[kind][1] += int(n)
    return {k: {"ms": round(v[0], 1), "tokens": v[1], "tokens_per_s": round(v[1] / (v[0] / 1000), 1) if v[0] else None}
            for k, v in out.items()}


def locomo_session(path: str, conv: str, index: int) -> tuple[str, str | None]:
    """A real session's text as the builder renders it (`--locomo`), instead of the one-line default."""
    from eval.datasets import load_dataset
    from memory_system import render_session

    sample = load_dataset("locomo", dataset_path=path, sample_ids=[conv])[0]
    session = sample.sessions[index]
    return render_session(session.messages), session.time


def agent_probe(client: openai.OpenAI, runs: int, max_tokens: int) -> list[dict]:
    rows = []
    for agent in ("core", "episodic", "semantic", "procedural"):
        p = prompts.agent_prompt(agent, core="", existing=[], session_text=SESSION, session_time=SESSION_TIME)
        for json_mode in (True, False):
            for i in range(runs):
                temperature = 0.0 if i == 0 else min(0.2 * i, 0.7)  # the client's retry schedule
                kwargs = {"response_format": {"type": "json_object"}} if json_mode else {}
                t0 = time.perf_counter()
                r = client.chat.completions.create(model=DEFAULT_ALIAS, messages=p.messages, max_tokens=max_tokens,
                                                   temperature=temperature, **kwargs)
                wall = time.perf_counter() - t0
                text = r.choices[0].message.content or ""
                try:
                    json.loads(text)
                    json_ok = True
                except ValueError:
                    json_ok = False
                try:
                    parse_actions(agent, text)
                    valid, why = True, ""
                except ActionFormatError as exc:
                    valid, why = False, str(exc)
                rows.append({"agent": agent, "json_mode": json_mode, "temperature": temperature,
                             "finish_reason": r.choices[0].finish_reason, "prompt_tokens": r.usage.prompt_tokens,
                             "completion_tokens": r.usage.completion_tokens, "wall_s": round(wall, 2),
                             "json_loads": json_ok, "parse_actions": valid, "reason": why[:200], "text": text[:400]})
                print(f"  {agent:10s} json_mode={json_mode!s:5s} T={temperature:.1f} {rows[-1]['finish_reason']:6s} "
                      f"{r.usage.completion_tokens:4d} tok {wall:6.1f}s json={json_ok} valid={valid} {why[:80]}",
                      flush=True)
    return rows


def throughput_probe(client: openai.OpenAI, base_url: str, repeats: int = 3) -> dict:
    """Prompt processing and generation rates from wall times, plain and JSON mode alternated (the server's own
    timing lines undercount prompt evaluation)."""
    filler = " ".join(f"fact {i}: the user mentioned item {i * 7 % 101}." for i in range(150))
    rows: dict = {"prompt": [], "plain": [], "json": []}
    for r in range(repeats):
        # A fresh first line defeats llama-cpp-python's prefix reuse, so the whole prompt is evaluated.
        msg = [{"role": "user", "content": f"run {time.time_ns()} {r}\n{filler}\nSummarise the facts."}]
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=DEFAULT_ALIAS, messages=msg, max_tokens=1)
        rows["prompt"].append((resp.usage.prompt_tokens, time.perf_counter() - t0))
        for kind in ("plain", "json"):
            extra = {"response_format": {"type": "json_object"}} if kind == "json" else {}
            t0 = time.perf_counter()  # same prompt again: only the generated tokens cost time now
            resp = client.chat.completions.create(model=DEFAULT_ALIAS, messages=msg, max_tokens=128,
                                                  temperature=0.0, **extra)
            rows[kind].append((resp.usage.completion_tokens, time.perf_counter() - t0))
    rate = lambda xs: round(sum(n for n, _ in xs) / sum(t for _, t in xs), 1)  # noqa: E731
    return {"prompt_tokens_per_s": rate(rows["prompt"]), "plain_gen_tokens_per_s": rate(rows["plain"]),
            "json_mode_gen_tokens_per_s": rate(rows["json"]),
            "raw": {k: [(n, round(t, 2)) for n, t in v] for k, v in rows.items()}}


def _str_field() -> dict:
    return {"type": "string", "minLength": 1}


def action_schema(agent: str) -> dict:
    """A JSON schema of one agent's allowed output, as llama-cpp-python's `response_format.schema` takes it."""
    if agent == "core":
        return {"oneOf": [
            {"type": "object", "properties": {"operation": {"enum": ["APPEND", "REWRITE"]}, "content": _str_field()},
             "required": ["operation", "content"], "additionalProperties": False},
            {"type": "object", "properties": {"operation": {"const": "REPLACE"}, "old_text": _str_field(),
                                              "new_text": {"type": "string"}},
             "required": ["operation", "old_text", "new_text"], "additionalProperties": False}]}
    items = {"ADD": {"memory": _str_field()}, "UPDATE": {"old_memory": _str_field(), "new_memory": _str_field()},
             "MERGE": {"old_memories": {"type": "array", "items": _str_field(), "minItems": 1},
                       "new_memory": _str_field()},
             "SKIP": {"reason": {"type": "string"}}}
    allowed = {"episodic": ("ADD", "UPDATE", "MERGE"), "semantic": ("ADD", "UPDATE", "SKIP"),
               "procedural": ("ADD", "UPDATE")}[agent]
    variants = [{"type": "object", "properties": {"action": {"const": a}, **items[a]},
                 "required": ["action", *(k for k in items[a] if a != "SKIP")], "additionalProperties": False}
                for a in allowed]
    return {"type": "object", "properties": {"operations": {"type": "array", "items": {"oneOf": variants}}},
            "required": ["operations"], "additionalProperties": False}


def schema_probe(client: openai.OpenAI, base_url: str, runs: int, max_tokens: int) -> dict:
    """JSON mode with a per-agent schema (a grammar on the server) against MemBuilder's agent prompts."""
    rows = []
    for agent in ("core", "episodic", "semantic", "procedural"):
        p = prompts.agent_prompt(agent, core="", existing=[], session_text=SESSION, session_time=SESSION_TIME)
        for i in range(runs):
            temperature = 0.0 if i == 0 else min(0.2 * i, 0.7)
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model=DEFAULT_ALIAS, messages=p.messages, max_tokens=max_tokens, temperature=temperature,
                response_format={"type": "json_object", "schema": action_schema(agent)})
            text = r.choices[0].message.content or ""
            try:
                parse_actions(agent, text)
                valid, why = True, ""
            except ActionFormatError as exc:
                valid, why = False, str(exc)
            rows.append({"agent": agent, "temperature": temperature, "finish_reason": r.choices[0].finish_reason,
                         "completion_tokens": r.usage.completion_tokens, "wall_s": round(time.perf_counter() - t0, 2),
                         "parse_actions": valid, "reason": why[:200], "text": text[:300]})
            print(f"  schema {agent:10s} T={temperature:.1f} {rows[-1]['finish_reason']:6s} "
                  f"{r.usage.completion_tokens:4d} tok valid={valid} {why[:80]} {text[:100]!r}", flush=True)
    ep = prompts.agent_prompt("episodic", core="", existing=[], session_text=SESSION, session_time="2023-05-08")
    openai_style = raw_post(base_url, "/chat/completions", {
        "model": DEFAULT_ALIAS, "messages": ep.messages, "max_tokens": 32,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": action_schema("episodic")}}})
    return {"rows": rows, "openai_json_schema_type": openai_style}


def _rates(client: openai.OpenAI, reps: int) -> dict:
    """Prompt tokens/s on a fresh ~2,000-token prompt and generated tokens/s on an agent prompt (plain mode)."""
    filler = " ".join(f"fact {i}: the user mentioned item {i * 7 % 101}." for i in range(150))
    ep = prompts.agent_prompt("episodic", core="", existing=[], session_text=SESSION, session_time="2023-05-08")
    pp, gen = [], []
    for r in range(reps):
        msg = [{"role": "user", "content": f"run {time.time_ns()} {r}\n{filler}"}]
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=DEFAULT_ALIAS, messages=msg, max_tokens=1)
        pp.append((resp.usage.prompt_tokens, time.perf_counter() - t0))
        client.chat.completions.create(model=DEFAULT_ALIAS, messages=ep.messages, max_tokens=1)  # cache the prompt
        t0 = time.perf_counter()
        resp = client.chat.completions.create(model=DEFAULT_ALIAS, messages=ep.messages, max_tokens=128,
                                              temperature=0.9, seed=r)
        gen.append((resp.usage.completion_tokens, time.perf_counter() - t0))
    return {"prompt_tokens_per_s": round(sum(n for n, _ in pp) / sum(t for _, t in pp), 1),
            "gen_tokens_per_s": round(sum(n for n, _ in gen) / sum(t for _, t in gen), 1),
            "raw_prompt": [(n, round(t, 2)) for n, t in pp], "raw_gen": [(n, round(t, 2)) for n, t in gen]}


def threads_probe(logdir: Path, reps: int = 2) -> dict:
    """1 vs 2 threads, and embedding mode on vs off, on the same requests (A B C A order to expose drift)."""
    out = {}
    for name, kw in (("threads2_embedding", {"threads": 2}), ("threads1_embedding", {"threads": 1}),
                     ("threads2_chat_only", {"threads": 2, "embedding": False}),
                     ("threads2_embedding_again", {"threads": 2})):
        with LocalLLMServer(n_ctx=4096, log_path=logdir / f"probe_server_{name}.log", **kw) as srv:
            c = openai.OpenAI(base_url=srv.base_url, api_key="EMPTY", max_retries=0, timeout=600)
            out[name] = _rates(c, reps)
            c.close()
        print(f"  {name}: {out[name]}", flush=True)
    with LocalLLMServer(n_ctx=512, embedding=False, log_path=logdir / "probe_server_ctx512.log") as srv:
        ep = prompts.agent_prompt("episodic", core="", existing=[], session_text=SESSION, session_time="2023-05-08")
        out["n_ctx_512_prompt_plus_max_tokens_over"] = raw_post(
            srv.base_url, "/chat/completions", {"model": DEFAULT_ALIAS, "messages": ep.messages, "max_tokens": 512})
        out["n_ctx_512_no_max_tokens"] = raw_post(
            srv.base_url, "/chat/completions", {"model": DEFAULT_ALIAS, "messages": ep.messages})
    print("  n_ctx 512:", out["n_ctx_512_prompt_plus_max_tokens_over"], out["n_ctx_512_no_max_tokens"], flush=True)
    return out


def sdk_error(fn) -> dict:
    try:
        fn()
        return {"raised": None}
    except openai.APIError as exc:
        return {"raised": type(exc).__name__, "status_code": getattr(exc, "status_code", None), "message": str(exc),
                "body": getattr(exc, "body", None)}


def raw_post(base_url: str, path: str, body: dict, timeout: float = 600) -> dict:
    """Status and body; a successful body is summarised (finish reason, usage, vector shapes), an error kept whole."""
    t0 = time.perf_counter()
    r = httpx.post(base_url + path, json=body, timeout=timeout, trust_env=False)
    out: dict = {"status": r.status_code, "wall_s": round(time.perf_counter() - t0, 2)}
    if r.status_code != 200:
        out["body"] = r.text[:2000]
        return out
    data = r.json()
    out["usage"] = data.get("usage")
    if "choices" in data:
        out["finish_reason"] = data["choices"][0].get("finish_reason")
        out["content_head"] = (data["choices"][0]["message"].get("content") or "")[:160]
    else:
        out["shapes"] = [_shape(d["embedding"]) for d in data["data"]]
    return out


def _shape(vec) -> list[int]:
    return [len(vec), len(vec[0])] if vec and isinstance(vec[0], list) else [len(vec)]


def long_prompt_probe(client: openai.OpenAI, base_url: str, n_ctx: int) -> dict:
    n_tok = len(httpx.post(base_url.removesuffix("/v1") + "/extras/tokenize", trust_env=False, timeout=60,
                           json={"input": "memory " * 10}).json()["tokens"])
    words = int(n_ctx * 1.2 * 10 / max(n_tok, 1))
    over = [{"role": "user", "content": "memory " * words}]
    near = [{"role": "user", "content": "memory " * int((n_ctx - 200) * 10 / max(n_tok, 1))}]
    out = {"tokens_per_10_words": n_tok,
           "over_raw": raw_post(base_url, "/chat/completions", {"model": DEFAULT_ALIAS, "messages": over, "max_tokens": 16}),
           "over_sdk": sdk_error(lambda: client.chat.completions.create(model=DEFAULT_ALIAS, messages=over, max_tokens=16))}
    t0 = time.perf_counter()
    out["fits_but_prompt_plus_max_tokens_over_raw"] = raw_post(
        base_url, "/chat/completions", {"model": DEFAULT_ALIAS, "messages": near, "max_tokens": 512})
    out["fits_but_prompt_plus_max_tokens_over_s"] = round(time.perf_counter() - t0, 1)
    return out


def embedding_probe(base_url: str) -> dict:
    texts = ["I adopted a cat named Miso.", "The meeting moved to Friday.", "ok"]
    res = raw_post(base_url, "/embeddings", {"model": DEFAULT_ALIAS, "input": texts})
    out: dict = {"status": res["status"]}
    if res["status"] == 200:
        r = httpx.post(base_url + "/embeddings", json={"model": DEFAULT_ALIAS, "input": texts}, trust_env=False,
                       timeout=120).json()
        data = r["data"]
        first = data[0]["embedding"]
        out["n_items"] = len(data)
        out["item_keys"] = sorted(data[0])
        out["nested"] = bool(first) and isinstance(first[0], list)
        out["shape_per_item"] = [_shape(d["embedding"]) for d in data]
        if not out["nested"]:
            out["norms"] = [round(sum(x * x for x in d["embedding"]) ** 0.5, 4) for d in data]
        out["usage"] = r.get("usage")
        out["top_keys"] = sorted(r)
        out["empty_string"] = raw_post(base_url, "/embeddings", {"model": DEFAULT_ALIAS, "input": [""]})
        out["one_space"] = raw_post(base_url, "/embeddings", {"model": DEFAULT_ALIAS, "input": [" "]})
        out["single_string_input"] = raw_post(base_url, "/embeddings", {"model": DEFAULT_ALIAS, "input": "just one"})
        long_text = "the user likes tea. " * 400
        out["long_input_2000_words"] = raw_post(base_url, "/embeddings", {"model": DEFAULT_ALIAS, "input": [long_text]})
    else:
        out["body"] = res["body"]
    return out


async def concurrency_probe(base_url: str, n: int = 4, max_tokens: int = 64) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)

    async def one(i: int) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        r = await client.chat.completions.create(model=DEFAULT_ALIAS, max_tokens=max_tokens, temperature=0.0,
                                                 messages=[{"role": "user", "content": f"Write a short poem about the number {i}."}])
        return t0, time.perf_counter(), r.usage.completion_tokens

    single = await one(99)
    t_start = time.perf_counter()
    res = await asyncio.gather(*(one(i) for i in range(n)))
    total = time.perf_counter() - t_start
    # Abandoned request: the client gives up after 2 s; how long does the next small request then wait?
    try:
        await client.with_options(timeout=2.0).chat.completions.create(
            model=DEFAULT_ALIAS, max_tokens=1500, temperature=0.0,
            messages=[{"role": "user", "content": "Write a very long story about a cat."}])
        abandoned = "finished within 2 s"
    except openai.APITimeoutError as exc:
        abandoned = f"{type(exc).__name__}: {exc}"
    t0 = time.perf_counter()
    nxt = await client.chat.completions.create(model=DEFAULT_ALIAS, max_tokens=8, temperature=0.0,
                                               messages=[{"role": "user", "content": "Say ok."}])
    after_abandon = time.perf_counter() - t0
    await client.close()
    return {"single_s": round(single[1] - single[0], 2), "single_tokens": single[2],
            "concurrent_latencies_s": [round(e - s, 2) for s, e, _ in res],
            "concurrent_tokens": [k for _, _, k in res], "concurrent_total_s": round(total, 2),
            "abandoned": abandoned, "next_request_after_abandon_s": round(after_abandon, 2),
            "next_request_tokens": nxt.usage.completion_tokens}


def raw_chat_shape(base_url: str) -> dict:
    r = httpx.post(base_url + "/chat/completions", trust_env=False, timeout=120,
                   json={"model": "some-other-name", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
                         "response_format": {"type": "json_object"}})
    return {"status": r.status_code, "body": r.json()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="requests per agent prompt and mode (default 3)")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--out", default="probe_local_llm.json")
    ap.add_argument("--locomo", metavar="FILE", help="use a real LoCoMo session for the agent prompts (with --conv, --session)")
    ap.add_argument("--conv", default="conv-26")
    ap.add_argument("--session", type=int, default=0, help="session index (default 0, the first)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: throughput agents schema long embed concurrency threads modes")
    args = ap.parse_args(argv)
    report: dict = {}
    if args.locomo:
        global SESSION, SESSION_TIME
        SESSION, SESSION_TIME = locomo_session(args.locomo, args.conv, args.session)
        report["session"] = {"file": args.locomo, "conv": args.conv, "index": args.session, "chars": len(SESSION)}
    logdir = Path(args.out).resolve().parent
    log = logdir / "probe_server_main.log"
    with LocalLLMServer(n_ctx=args.n_ctx, log_path=log) as srv:
        report["command"] = " ".join(srv.command())
        client = openai.OpenAI(base_url=srv.base_url, api_key="EMPTY", max_retries=0, timeout=900)
        report["raw_chat"] = raw_chat_shape(srv.base_url)
        print("raw chat:", json.dumps(report["raw_chat"])[:600], flush=True)
        if "throughput" not in args.skip:
            report["throughput"] = throughput_probe(client, srv.base_url)
            print("throughput:", report["throughput"], flush=True)
        if "agents" not in args.skip:
            mark = len(log.read_text(errors="replace"))
            print("agent prompts:", flush=True)
            report["agents"] = agent_probe(client, args.runs, args.max_tokens)
            report["agents_perf"] = perf_totals(log.read_text(errors="replace")[mark:])
            print("  perf:", report["agents_perf"], flush=True)
        if "schema" not in args.skip:
            print("schema-constrained JSON mode:", flush=True)
            report["schema"] = schema_probe(client, srv.base_url, args.runs, args.max_tokens)
            print("  OpenAI-style json_schema:", report["schema"]["openai_json_schema_type"], flush=True)
        if "embed" not in args.skip:
            report["embed_mean"] = embedding_probe(srv.base_url)
            print("embeddings (mean pooling):", json.dumps(report["embed_mean"])[:800], flush=True)
        if "long" not in args.skip:
            report["long"] = long_prompt_probe(client, srv.base_url, args.n_ctx)
            print("long prompt:", json.dumps(report["long"], indent=1)[:3000], flush=True)
        if "concurrency" not in args.skip:
            report["concurrency"] = asyncio.run(concurrency_probe(srv.base_url))
            print("concurrency:", report["concurrency"], flush=True)
        client.close()
    if "threads" not in args.skip:
        print("threads and embedding mode:", flush=True)
        report["threads"] = threads_probe(logdir)
    if "modes" not in args.skip:
        for name, kw in (("chat_only", {"embedding": False}), ("embedding_pooling_none", {"pooling": "none"})):
            log = logdir / f"probe_server_{name}.log"
            try:
                with LocalLLMServer(n_ctx=2048, log_path=log, **kw) as srv:
                    entry = {"command": " ".join(srv.command()), "embeddings": embedding_probe(srv.base_url)}
                    c = openai.OpenAI(base_url=srv.base_url, api_key="EMPTY", max_retries=0, timeout=300)
                    entry["embeddings_sdk"] = sdk_error(lambda: c.embeddings.create(model=DEFAULT_ALIAS, input=["a", "b c d"]))
                    entry["chat"] = sdk_error(lambda: c.chat.completions.create(
                        model=DEFAULT_ALIAS, max_tokens=8, messages=[{"role": "user", "content": "Hi"}]))
                    entry["server_alive_after"] = srv.proc.poll() is None
                    c.close()
            except Exception as exc:  # noqa: BLE001 - a probe reports what happened
                entry = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            report[name] = entry
            print(f"{name}:", json.dumps(entry)[:1500], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
