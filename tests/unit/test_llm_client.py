"""LLM client: JSON extraction, judge labels, the response cache, retries and accounting over a loopback server."""
import asyncio
import json
import random
import socket

import numpy as np
import pytest

import config
from eval.llm_judge import parse_label
from llm_client import TASK_HEADER, ClientSettings, LLMCallError, LLMClient, ResponseCache, extract_json
from memory_system import parse_actions
from prompts import Prompt
from scripts.scripted_server import ScriptedServer

ENV_VARS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_EMBEDDINGS_BASE_URL", "OPENAI_EMBEDDINGS_API_KEY",
            "MEMBUILDER_CACHE_DIR", "VLLM_BASE_URL", "VLLM_API_KEY")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _prompt(task="agent.semantic", text="hello"):
    return Prompt(task, [{"role": "system", "content": "sys"}, {"role": "user", "content": text}], {"text": text})


def _client(srv, **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_base_s", 0.001)
    return LLMClient(provider="openai", base_url=srv.base_url, api_key="x", model="m", **kw)


def _run(client, fn):
    async def main():
        try:
            return await fn()
        finally:
            await client.aclose()

    return asyncio.run(main())


def _seed_where(pred):
    """A server seed whose fault draws follow `pred(draws)` (the server draws once per request for faults)."""
    for seed in range(1000):
        rng = random.Random(seed)
        if pred([rng.random() for _ in range(4)]):
            return seed
    raise AssertionError("no seed found")


# ----------------------------------------------------------------------------- extract_json


def test_extract_json_plain():
    assert extract_json('{"a": 1}') == {"a": 1}


def test_extract_json_strips_think_block():
    assert extract_json('<think>maybe {"a": 0}?</think>{"a": 1}') == {"a": 1}


def test_extract_json_strips_multiple_and_uppercase_think_blocks():
    assert extract_json('<THINK>{"x": 1}</THINK> text <think>{"y": 2}</think>\n{"z": 3}') == {"z": 3}


def test_extract_json_think_without_opening_tag():
    # The chat template put "<think>" into the prompt, so the reply starts inside the reasoning.
    assert extract_json('I might answer {"a": 0} but\n</think>\n\n{"a": 1}') == {"a": 1}


def test_extract_json_code_fence():
    assert extract_json('Here:\n```json\n{"a": [1, 2]}\n```\nbye') == {"a": [1, 2]}


def test_extract_json_bare_code_fence():
    assert extract_json('```\n{"a": 2}\n```') == {"a": 2}


def test_extract_json_fence_preferred_over_prose_braces():
    assert extract_json('Use the form {like this}.\n```json\n{"a": 3}\n```') == {"a": 3}


def test_extract_json_nested_braces_in_strings():
    text = '{"memory": "set {x} to \\"}\\" and {y}", "n": {"m": [1, {"k": "}"}]}}'
    assert extract_json(text) == {"memory": 'set {x} to "}" and {y}', "n": {"m": [1, {"k": "}"}]}}


def test_extract_json_trailing_prose():
    assert extract_json('{"label": "CORRECT"}\nI hope this helps! {not json}') == {"label": "CORRECT"}


def test_extract_json_leading_prose_with_stray_brace():
    assert extract_json('Sure { here it is: {"a": 1}') == {"a": 1}


def test_extract_json_takes_first_object():
    assert extract_json('{"a": 1} {"b": 2}') == {"a": 1}


@pytest.mark.parametrize("text,expected", [
    ('{"a": 1, "b": [1, 2,],}', {"a": 1, "b": [1, 2]}),
    ("{'a': 'single quotes'}", {"a": "single quotes"}),
    ('{"a": True, "b": None}', {"a": True, "b": None}),
    ('{"a": "unescaped\nnewline"}', {"a": "unescaped\nnewline"}),
])
def test_extract_json_repairs_light_damage(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", "[1, 2, 3]", '{"unterminated": "obj', "}{",
                                  '<think>{"a": 1}</think>', "{{{ ::: }}}"])
def test_extract_json_hopeless_text_raises(text):
    with pytest.raises(ValueError):
        extract_json(text)


def test_extract_json_empty_object_is_valid():
    assert extract_json("{}  ") == {}


def test_extract_json_non_text_raises():
    with pytest.raises(ValueError):
        extract_json(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- parse_label


@pytest.mark.parametrize("text,label", [
    ('{"label": "CORRECT"}', "CORRECT"),
    ('{"label": "WRONG"}', "WRONG"),
    ('{"label": "correct"}', "CORRECT"),
    ('{"label": " Wrong "}', "WRONG"),
    ('<think>gold says Rome</think>{"label": "WRONG"}', "WRONG"),
    ('```json\n{"label": "CORRECT", "reason": "same city"}\n```', "CORRECT"),
    ("CORRECT", "CORRECT"),
    ("wrong.", "WRONG"),
    ("  Correct  ", "CORRECT"),
])
def test_parse_label_accepts(text, label):
    assert parse_label(text) == label


@pytest.mark.parametrize("text", ['{"label": "MAYBE"}', '{"verdict": "CORRECT"}', "The answer is correct",
                                  "", '{"label": 1}', "CORRECT WRONG"])
def test_parse_label_rejects(text):
    with pytest.raises(ValueError, match="label"):
        parse_label(text)


# ----------------------------------------------------------------------------- ResponseCache


def test_response_cache_put_get(tmp_path):
    cache = ResponseCache(tmp_path)
    key = ResponseCache.key({"b": 1, "a": [1, 2]})
    assert cache.get(key) is None
    cache.put(key, {"text": "héllo", "model": "m"})
    assert cache.get(key) == {"text": "héllo", "model": "m"}
    assert ResponseCache(tmp_path).get(key) == {"text": "héllo", "model": "m"}  # persisted on disk


def test_response_cache_key_ignores_dict_order_but_not_values():
    assert ResponseCache.key({"a": 1, "b": 2}) == ResponseCache.key({"b": 2, "a": 1})
    assert ResponseCache.key({"a": 1}) != ResponseCache.key({"a": 2})


def test_response_cache_corrupt_file_is_a_miss(tmp_path):
    cache = ResponseCache(tmp_path)
    key = ResponseCache.key({"x": 1})
    cache.put(key, [1, 2])
    path = tmp_path / key[:2] / f"{key}.json"
    path.write_text("{broken", encoding="utf-8")
    assert cache.get(key) is None


def test_second_identical_chat_is_served_from_cache(tmp_path):
    with ScriptedServer() as srv:
        client = _client(srv, cache_dir=str(tmp_path))

        async def go():
            first = await client.chat(_prompt("agent.core", "session text"))
            second = await client.chat(_prompt("agent.core", "session text"))
            return first, second

        first, second = _run(client, go)
        assert len(srv.requests(endpoint="chat")) == 1
    assert first.cached is False and second.cached is True
    assert second.text == first.text and json.loads(second.text)["operation"] == "APPEND"
    usage = client.usage.snapshot()["agent.core"]
    assert usage["calls"] == 2 and usage["cached"] == 1


def test_cache_survives_a_new_client(tmp_path):
    with ScriptedServer() as srv:
        c1 = _client(srv, cache_dir=str(tmp_path))
        text = _run(c1, lambda: c1.chat(_prompt())).text
        c2 = _client(srv, cache_dir=str(tmp_path))
        res = _run(c2, lambda: c2.chat(_prompt()))
        assert len(srv.requests(endpoint="chat")) == 1
    assert res.cached and res.text == text


def test_cache_misses_on_different_prompt_or_temperature(tmp_path):
    with ScriptedServer() as srv:
        client = _client(srv, cache_dir=str(tmp_path))

        async def go():
            await client.chat(_prompt(text="one"))
            await client.chat(_prompt(text="two"))
            await client.chat(_prompt(text="one"), temperature=0.5)
            await client.chat(_prompt(text="one"), json_mode=False)

        _run(client, go)
        assert len(srv.requests(endpoint="chat")) == 4


def test_chat_json_caches_only_validated_output(tmp_path):
    replies = iter(["not json", '{"operations": [{"action": "ADD", "memory": "m"}]}'])
    with ScriptedServer(lambda task, body: next(replies)) as srv:
        client = _client(srv, cache_dir=str(tmp_path))
        validate = lambda t: parse_actions("semantic", t)  # noqa: E731
        acts, res = _run(client, lambda: client.chat_json(_prompt(), validate))
        assert acts[0].memory == "m"
        cached = [p for p in tmp_path.rglob("*.json")]
        assert len(cached) == 1
        assert json.loads(cached[0].read_text())["text"] == res.text


def test_no_cache_without_cache_dir():
    with ScriptedServer() as srv:
        client = _client(srv)
        assert client.cache is None

        async def go():
            await client.chat(_prompt())
            await client.chat(_prompt())

        _run(client, go)
        assert len(srv.requests(endpoint="chat")) == 2


# ----------------------------------------------------------------------------- retries


def test_server_errors_retried_then_llm_call_error():
    with ScriptedServer(fail_500=1.0) as srv:
        client = _client(srv, max_retries=2, backoff_base_s=0.001)
        with pytest.raises(LLMCallError) as ei:
            _run(client, lambda: client.chat(_prompt("answer")))
        reqs = srv.requests(endpoint="chat")
    assert len(reqs) == 3 and all(r.status == 500 for r in reqs)
    assert ei.value.attempts == 3 and ei.value.task == "answer"
    assert "HTTP 500" in ei.value.reason and "3 attempt(s)" in ei.value.reason and srv.base_url in ei.value.reason
    assert client.usage.snapshot()["answer"]["retries"] == 2


def test_chat_json_counts_failure_after_transport_errors():
    with ScriptedServer(fail_500=1.0) as srv:
        client = _client(srv, max_retries=2, backoff_base_s=0.001)
        with pytest.raises(LLMCallError) as ei:
            _run(client, lambda: client.chat_json(_prompt("agent.core")))
        assert len(srv.requests(endpoint="chat")) == 3
    assert ei.value.attempts == 3
    snap = client.usage.snapshot()["agent.core"]
    assert snap["failures"] == 1 and snap["retries"] == 2 and snap["calls"] == 1 and snap["requests"] == 3


def test_rate_limit_429_is_retried():
    seed = _seed_where(lambda d: d[0] < 0.5 <= d[1])  # first request 429, second passes
    with ScriptedServer(fail_429=0.5, seed=seed) as srv:
        client = _client(srv, max_retries=2, backoff_base_s=0.001)
        res = _run(client, lambda: client.chat(_prompt("judge.paper")))
        statuses = [r.status for r in srv.requests(endpoint="chat")]
    assert statuses == [429, 200]
    assert res.attempts == 2 and json.loads(res.text)["label"] in ("CORRECT", "WRONG")
    assert client.usage.snapshot()["judge.paper"]["retries"] == 1


def test_rate_limit_429_gives_up_after_max_retries():
    with ScriptedServer(fail_429=1.0) as srv:
        client = _client(srv, max_retries=1, backoff_base_s=0.001)
        with pytest.raises(LLMCallError, match="HTTP 429"):
            _run(client, lambda: client.chat(_prompt()))
        assert [r.status for r in srv.requests(endpoint="chat")] == [429, 429]


def test_non_retryable_error_is_not_retried():
    with ScriptedServer() as srv:
        client = LLMClient(provider="openai", base_url=srv.base_url + "/missing", api_key="x", model="m",
                           max_retries=3, backoff_base_s=0.001)
        with pytest.raises(LLMCallError) as ei:
            _run(client, lambda: client.chat(_prompt()))
    assert ei.value.attempts == 1
    assert client.usage.snapshot().get("agent.semantic", {}).get("retries", 0) == 0


def test_connection_error_is_retried():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = LLMClient(provider="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key="x", model="m",
                       max_retries=1, backoff_base_s=0.001)
    with pytest.raises(LLMCallError) as ei:
        _run(client, lambda: client.chat(_prompt()))
    # httpx reports a refused connection as APIConnectionError; the SDK's aiohttp backend as APITimeoutError.
    assert ei.value.attempts == 2 and ("cannot reach" in ei.value.reason or "request timeout" in ei.value.reason)
    assert client.usage.snapshot()["agent.semantic"]["retries"] == 1


def test_malformed_agent_json_is_retried_by_chat_json_then_accepted():
    replies = iter(['{"operations": [{"action": "ADD", "memory": "half <<truncated',
                    '{"operations": [{"action": "ADD", "memory": "Alex - Dog: Pepper"}]}'])
    with ScriptedServer(lambda task, body: next(replies)) as srv:
        client = _client(srv, max_retries=2)
        acts, res = _run(client, lambda: client.chat_json(_prompt("agent.semantic"),
                                                         lambda t: parse_actions("semantic", t)))
        reqs = srv.requests(endpoint="chat")
    assert [a.memory for a in acts] == ["Alex - Dog: Pepper"]
    assert len(reqs) == 2 and res.attempts == 2
    assert reqs[0].body["temperature"] == 0.0 and reqs[1].body["temperature"] > 0.0  # a small bump on retry
    snap = client.usage.snapshot()["agent.semantic"]
    assert snap["calls"] == 1 and snap["requests"] == 2 and snap["retries"] == 1 and snap["failures"] == 0


def test_schema_violation_is_retried_like_malformed_json():
    replies = iter(['{"operations": [{"action": "MERGE", "old_memories": ["a"], "new_memory": "b"}]}',
                    '{"operations": []}'])
    with ScriptedServer(lambda task, body: next(replies)) as srv:
        client = _client(srv)
        acts, _ = _run(client, lambda: client.chat_json(_prompt("agent.procedural"),
                                                       lambda t: parse_actions("procedural", t)))
        assert acts == [] and len(srv.requests(endpoint="chat")) == 2


def test_server_injected_malformed_reply_is_retried():
    # Each agent request draws once for faults and once for malformation: malform the first reply only.
    seed = _seed_where(lambda d: d[1] < 0.5 <= d[3])
    with ScriptedServer(malformed=0.5, seed=seed) as srv:
        client = _client(srv)
        acts, _ = _run(client, lambda: client.chat_json(_prompt("agent.episodic"),
                                                       lambda t: parse_actions("episodic", t)))
        faults = [r.fault for r in srv.requests(endpoint="chat")]
    assert faults == ["malformed", None]
    assert len(acts) == 1 and acts[0].op == "ADD"


def test_chat_json_gives_up_with_last_output():
    with ScriptedServer(lambda task, body: "I refuse to answer in JSON") as srv:
        client = _client(srv, max_retries=2)
        with pytest.raises(LLMCallError) as ei:
            _run(client, lambda: client.chat_json(_prompt("agent.core"), lambda t: parse_actions("core", t)))
        assert len(srv.requests(endpoint="chat")) == 3
    err = ei.value
    assert err.last_output == "I refuse to answer in JSON" and err.attempts == 3
    assert "invalid output" in err.reason
    snap = client.usage.snapshot()["agent.core"]
    assert snap["failures"] == 1 and snap["retries"] == 2 and snap["calls"] == 1 and snap["requests"] == 3


# ----------------------------------------------------------------------------- transport details


def test_task_header_reaches_server():
    with ScriptedServer() as srv:
        client = _client(srv)

        async def go():
            await client.chat(_prompt("agent.episodic"))
            await client.chat(_prompt("judge.longmemeval"))
            await client.embed(["some text"], task="embed.query")

        _run(client, go)
        assert [r.task for r in srv.requests(endpoint="chat")] == ["agent.episodic", "judge.longmemeval"]
        assert [r.task for r in srv.requests(endpoint="embeddings")] == ["embed.query"]
    assert TASK_HEADER == "X-MemBuilder-Task"


def test_json_mode_sent_when_asked():
    with ScriptedServer() as srv:
        client = _client(srv)

        async def go():
            await client.chat(_prompt(), json_mode=True)
            await client.chat(_prompt("answer"), json_mode=False)

        _run(client, go)
        bodies = [r.body for r in srv.requests(endpoint="chat")]
    assert bodies[0]["response_format"] == {"type": "json_object"}
    assert "response_format" not in bodies[1]
    assert bodies[0]["model"] == "m" and bodies[0]["messages"] == _prompt().messages


@pytest.mark.parametrize("max_retries", [0, 2])
def test_json_mode_rejection_falls_back_without_response_format(max_retries):
    with ScriptedServer(reject_response_format=True) as srv:
        client = _client(srv, max_retries=max_retries)

        async def go():
            a = await client.chat(_prompt("agent.core"))
            b = await client.chat(_prompt("agent.core", "again"))
            return a, b

        a, b = _run(client, go)
        reqs = srv.requests(endpoint="chat")
    assert [r.status for r in reqs] == [400, 200, 200]
    assert "response_format" in reqs[0].body
    assert all("response_format" not in r.body for r in reqs[1:])  # remembered for later calls
    assert json.loads(a.text)["operation"] == "APPEND" and json.loads(b.text)["operation"] == "APPEND"
    assert client.usage.snapshot()["agent.core"]["retries"] == 0


def test_json_mode_can_be_disabled_in_settings():
    with ScriptedServer(reject_response_format=True) as srv:
        client = _client(srv, json_mode=False)
        _run(client, lambda: client.chat(_prompt()))
        assert [r.status for r in srv.requests(endpoint="chat")] == [200]


def test_usage_snapshot_counts_per_task():
    def responder(task, body):
        if task == "judge.paper":
            return "no label here"
        if task == "agent.core":
            responder.core_calls += 1
            return "oops" if responder.core_calls == 1 else '{"operation": "APPEND", "content": "x"}'
        return "an answer"
    responder.core_calls = 0

    with ScriptedServer(responder) as srv:
        client = _client(srv, max_retries=1)

        async def go():
            await client.chat(_prompt("answer"), json_mode=False)
            await client.chat(_prompt("answer", "other"), json_mode=False)
            await client.chat_json(_prompt("agent.core"), lambda t: parse_actions("core", t))
            with pytest.raises(LLMCallError):
                await client.chat_json(_prompt("judge.paper"), parse_label)

        _run(client, go)
    snap = client.usage.snapshot()
    assert list(snap) == sorted(snap)
    assert (snap["answer"]["calls"], snap["answer"]["retries"], snap["answer"]["failures"]) == (2, 0, 0)
    assert (snap["agent.core"]["calls"], snap["agent.core"]["requests"], snap["agent.core"]["retries"],
            snap["agent.core"]["failures"]) == (1, 2, 1, 0)
    assert (snap["judge.paper"]["calls"], snap["judge.paper"]["requests"], snap["judge.paper"]["retries"],
            snap["judge.paper"]["failures"]) == (1, 2, 1, 1)
    assert snap["answer"]["prompt_tokens"] > 0 and snap["answer"]["completion_tokens"] > 0
    assert snap["answer"]["latency_s"] >= 0


def test_remote_embeddings_are_normalised_and_batched_in_order():
    with ScriptedServer(embed_dim=32) as srv:
        client = _client(srv)
        vecs = _run(client, lambda: client.embed(["alpha beta", "gamma", "alpha beta"]))
        assert len(srv.requests(endpoint="embeddings")) == 1
    assert vecs.shape == (3, 32) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])


def test_embeddings_cached(tmp_path):
    with ScriptedServer() as srv:
        client = _client(srv, cache_dir=str(tmp_path))

        async def go():
            a = await client.embed(["one", "two"])
            b = await client.embed(["two", "three"])
            return a, b

        a, b = _run(client, go)
        assert len(srv.requests(endpoint="embeddings")) == 2
    assert np.allclose(a[1], b[0], atol=1e-6)


def test_embed_empty_list():
    client = LLMClient(provider="offline")
    assert asyncio.run(client.embed([])).shape[0] == 0


# ----------------------------------------------------------------------------- ClientSettings


def test_resolved_vllm_defaults():
    s = ClientSettings(provider="vllm", model="qwen").resolved()
    assert s.base_url == "http://localhost:8000/v1" == config.DEFAULT_VLLM_BASE_URL
    assert s.api_key == "EMPTY"
    assert s.model == "qwen"
    assert s.embedding_provider == "openai" and s.embedding_base_url is None  # vLLM serves no embeddings


def test_resolved_vllm_from_environment(monkeypatch):
    monkeypatch.setenv("VLLM_BASE_URL", "http://gpu:9000/v1")
    monkeypatch.setenv("VLLM_API_KEY", "k")
    monkeypatch.setenv("OPENAI_EMBEDDINGS_BASE_URL", "http://embed/v1")
    s = ClientSettings(provider="vllm").resolved()
    assert (s.base_url, s.api_key, s.embedding_base_url) == ("http://gpu:9000/v1", "k", "http://embed/v1")


def test_resolved_offline_uses_offline_embeddings():
    s = ClientSettings(provider="offline", model="anything").resolved()
    assert s.model == config.OFFLINE_MODEL_NAME
    assert s.embedding_provider == "offline"
    assert s.embedding_model == config.OFFLINE_EMBEDDING_MODEL


def test_resolved_openai_defaults(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    s = ClientSettings(provider="openai").resolved()
    assert s.api_key == "sk-test" and s.base_url is None
    assert s.embedding_provider == "openai" and s.embedding_model == config.EMBEDDING_MODEL
    assert s.embedding_api_key == "sk-test"
    s = ClientSettings(provider="openai", base_url="http://x/v1").resolved()
    assert s.embedding_base_url == "http://x/v1"


def test_resolved_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMBUILDER_CACHE_DIR", str(tmp_path))
    assert ClientSettings(provider="offline").resolved().cache_dir == str(tmp_path)


def test_resolved_does_not_mutate_original():
    original = ClientSettings(provider="vllm")
    original.resolved()
    assert original.base_url is None and original.api_key is None


def test_unknown_provider_raises():
    with pytest.raises(ValueError, match="unknown provider"):
        ClientSettings(provider="anthropic").resolved()
    with pytest.raises(ValueError):
        LLMClient(provider="nope")


def test_client_overrides_apply():
    client = LLMClient(provider="vllm", model="qwen", max_retries=7)
    assert (client.provider, client.model, client.settings.max_retries) == ("vllm", "qwen", 7)
    assert not client.is_offline and LLMClient(provider="offline").is_offline
