"""Chat requests sent by worker processes (`--client-processes N`, http_workers) behave as in-process ones: the same
results, every failure classified the same way, deadlines cancel, a dead worker is replaced, nothing is left behind."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from starlette.responses import HTMLResponse, JSONResponse

import http_workers
from llm_client import LLMCallError, LLMClient, LLMFatalError
from prompts import Prompt
from scripts.scripted_server import ScriptedServer
from tests.integration.runner_helpers import demo_args, jsonl, run


def _prompt(task: str = "answer", text: str = "Question: where did I go?") -> Prompt:
    return Prompt(task, [{"role": "system", "content": "sys"}, {"role": "user", "content": text}], {})


def _client(srv: ScriptedServer, processes: int, **kw) -> LLMClient:
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_base_s", 0.001)
    return LLMClient(provider="openai", base_url=srv.base_url, api_key="x", model="m", client_processes=processes,
                     **kw)


async def _outcome(client: LLMClient, prompt: Prompt, *, validate=None):
    try:
        if validate is None:
            res = await client.chat(prompt, json_mode=False)
            return ("ok", res.text, res.finish_reason)
        value, _ = await client.chat_json(prompt, validate)
        return ("ok", value)
    except LLMCallError as exc:
        return (type(exc).__name__, exc.kind, exc.attempts, exc.reason)


def _both(srv_factory, calls) -> tuple[list, list]:
    """The outcomes of `calls(client)` with the requests sent in process and from two worker processes, each against
    a fresh server from `srv_factory()`, with the server's request log (task, status) of each."""
    out = []
    for processes in (1, 2):
        with srv_factory() as srv:
            async def main():
                client = _client(srv, processes)
                try:
                    return await calls(client)
                finally:
                    await client.aclose()

            res = json.loads(json.dumps(asyncio.run(main())).replace(f"127.0.0.1:{srv.port}", "SERVER"))
            out.append((res, [(r.task, r.status) for r in srv.log]))
    return out[0], out[1]


def test_replies_and_usage_are_the_same_from_worker_processes():
    async def calls(client):
        texts = await asyncio.gather(*(client.chat(_prompt(text=f"Question: q{i}"), json_mode=False)
                                       for i in range(40)))
        usage = client.usage.snapshot()["answer"]
        usage.pop("latency_s")  # the first requests wait for the workers to start
        return [t.text for t in texts], usage

    (a, log_a), (b, log_b) = _both(lambda: ScriptedServer(latency_s=0.01), calls)
    assert a == b and log_a == log_b
    assert a[1]["requests"] == 40 and a[1]["prompt_tokens"] > 0


@pytest.mark.parametrize("name, make", [
    ("401 is fatal", lambda: ScriptedServer(fail_tasks={"answer": 401})),
    ("404 is fatal", lambda: ScriptedServer(fail_tasks={"answer": 404})),
    ("500 is retried, then given up", lambda: ScriptedServer(fail_tasks={"answer": 500})),
    ("429 is retried", lambda: ScriptedServer(fail_429=1.0)),
    ("400 is rejected at once", lambda: ScriptedServer(fail_tasks={"answer": 400})),
    ("an HTML 200 is a malformed reply", lambda: ScriptedServer(
        raw_reply=lambda task, body: HTMLResponse("<html>gateway</html>"))),
    ("no choices is a malformed reply", lambda: ScriptedServer(
        raw_reply=lambda task, body: JSONResponse({"id": "x", "choices": []}))),
    ("llama.cpp's 500 validation error is not retried", lambda: ScriptedServer(
        raw_reply=lambda task, body: JSONResponse({"error": {"code": 500, "message": "validation error: bad"}}, 500))),
    ("a context overflow names the prompt", lambda: ScriptedServer(
        raw_reply=lambda task, body: JSONResponse(
            {"error": {"message": "the request exceeds the available context size"}}, 400))),
])
def test_failures_are_classified_as_in_process(name, make):
    async def calls(client):
        return [await _outcome(client, _prompt()) for _ in range(2)]

    (a, log_a), (b, log_b) = _both(make, calls)
    assert a == b, name
    assert log_a == log_b, name
    assert a[0][0] != "ok", name


def test_a_server_without_json_mode_is_detected_from_workers():
    async def calls(client):
        value = await _outcome(client, _prompt("judge.paper", "Question: q\nGold answer: a"),
                               validate=lambda t: json.loads(t)["label"])
        return value, client._json_mode_supported

    (a, log_a), (b, log_b) = _both(lambda: ScriptedServer(reject_response_format=True), calls)
    assert a == b and log_a == log_b
    assert a[1] is False and a[0][0] == "ok"


def test_a_deadline_cancels_the_request_in_the_worker():
    with ScriptedServer(latency_s=3.0) as srv:
        async def main():
            client = _client(srv, 2, max_retries=0, timeout_s=0.5, call_deadline_s=0.6)
            try:
                t0 = time.monotonic()
                out = await _outcome(client, _prompt())
                took = time.monotonic() - t0
                pool = client._loop_state()["pool"]
                await asyncio.sleep(0.2)
                pending = sum(len(w.pending) for w in pool._workers)
                return out, took, pending
            finally:
                await client.aclose()

        out, took, pending = asyncio.run(main())
    assert out[0] == "LLMCallError" and out[1] == "transport" and "timeout" in out[3]
    assert took < 2.0 and pending == 0


def test_a_worker_that_dies_mid_request_is_replaced_and_the_call_retried():
    with ScriptedServer(latency_s=1.0) as srv:
        async def main():
            client = _client(srv, 2, max_retries=2)
            try:
                await client.chat(_prompt(text="Question: warm"), json_mode=False)  # starts the pool
                pool = client._loop_state()["pool"]
                first = {w.proc.pid for w in pool._workers}
                call = asyncio.create_task(client.chat(_prompt(text="Question: q"), json_mode=False))
                await asyncio.sleep(0.3)
                busy = [w for w in pool._workers if w.pending]
                assert busy, "the request is in a worker"
                busy[0].proc.kill()
                res = await call
                now = {w.proc.pid for w in pool._workers if w.alive}
                return res.text, res.attempts, first, now, client.usage.snapshot()["answer"]
            finally:
                await client.aclose()

        text, attempts, first, now, usage = asyncio.run(main())
    assert text.startswith("scripted answer") and attempts == 2
    assert usage["retries"] == 1 and usage["failures"] == 0
    assert len(now) == 2 and now != first


def test_closing_the_last_client_ends_the_workers():
    with ScriptedServer() as srv:
        async def main():
            a, b = _client(srv, 2), _client(srv, 2)
            await asyncio.gather(a.chat(_prompt(), json_mode=False), b.chat(_prompt("judge.paper"), json_mode=False))
            pool = a._loop_state()["pool"]
            assert pool is b._loop_state()["pool"], "one pool per event loop"
            procs = [w.proc for w in pool._workers]
            await a.aclose()
            alive_after_first = [p.returncode is None for p in procs]
            await b.aclose()
            return alive_after_first, [p.returncode for p in procs]

        alive, codes = asyncio.run(main())
    assert all(alive) and codes == [0, 0]


def test_fatal_from_a_worker_stops_later_calls_at_once():
    with ScriptedServer(fail_tasks={"answer": 401}) as srv:
        async def main():
            client = _client(srv, 2)
            try:
                with pytest.raises(LLMFatalError):
                    await client.chat(_prompt(), json_mode=False)
                with pytest.raises(LLMFatalError):
                    await client.chat(_prompt(), json_mode=False)
            finally:
                await client.aclose()

        asyncio.run(main())
        assert len(srv.log) == 1


def test_worker_pool_refuses_zero_processes():
    with pytest.raises(ValueError):
        http_workers.WorkerPool(0)
    with pytest.raises(ValueError):
        LLMClient(provider="openai", base_url="http://127.0.0.1:1/v1", api_key="x", client_processes=0)


def test_the_runner_gives_the_same_run_with_worker_processes(tmp_path):
    """The demo built and answered with `--client-processes 2`: memory, answers and verdicts as in process."""
    runs = {}
    for processes in ("1", "2"):
        with ScriptedServer() as srv:
            tmp = tmp_path / processes
            assert run(*demo_args(srv, tmp, "--client-processes", processes)) == 0
            mem = {p.parent.name: json.loads(p.read_text()) for p in sorted((tmp / "db").glob("*/memory.json"))}
            for m in mem.values():
                m.get("meta", {}).pop("updated_at", None)
            answers = sorted((r["question_id"], r["answer"], r["retrieved_ids"]) for r in jsonl(tmp / "run" /
                                                                                                 "answers.jsonl"))
            verdicts = sorted((r["question_id"], r["label"]) for r in jsonl(tmp / "run" / "judgments.jsonl"))
            summary = json.loads((tmp / "run" / "summary.json").read_text())
            requests = {task: u["requests"] for stage in summary["usage"].values() for task, u in stage.items()}
            runs[processes] = (mem, answers, verdicts, requests,
                               sorted((r.task, r.status) for r in srv.log))
    a, b = runs["1"], runs["2"]
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3] and a[4] == b[4]
    assert {k: v["entries"] for k, v in a[0].items()} == {k: v["entries"] for k, v in b[0].items()}
