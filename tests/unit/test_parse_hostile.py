"""Hostile agent outputs, as a policy early in RL training emits them: parsing raises ActionFormatError and nothing
else, takes time linear in the output's length, and caps output size, nesting and operations (issue 8 item 1 and 2,
issue 13 item 5)."""
from __future__ import annotations

import json
import time

import pytest

import llm_client
from llm_client import MAX_JSON_DEPTH, MAX_REPLY_CHARS, _first_balanced_object, extract_json, strip_reasoning
from memory_system import AGENTS, MAX_OPERATIONS, ActionFormatError, parse_actions


def deep_dict(depth: int) -> dict:
    d: dict = {"x": 1}
    for _ in range(depth):
        d = {"a": d}
    return d


HOSTILE_TEXT = {
    "nested 1500": '{"a":' * 1500 + "1" + "}" * 1500,
    "nested arrays": '{"operations": ' + "[" * 5000 + "]" * 5000 + "}",
    "48k open braces": "{" * 48000,
    "unbalanced quotes": '{"' * 30000,
    "think tags": "<think>" * 9000 + "{",
    "fences": "```" * 20000,
    "junk object": "{" + "a," * 32000 + "}",
    "over the cap": json.dumps({"operations": [{"action": "ADD", "memory": "x" * 100}] * 700}),
}


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("name", sorted(HOSTILE_TEXT))
def test_hostile_text_is_a_format_error_in_bounded_time(agent, name):
    t0 = time.perf_counter()
    with pytest.raises(ActionFormatError):
        parse_actions(agent, HOSTILE_TEXT[name])
    assert time.perf_counter() - t0 < 2.0  # the quadratic scan took 17 s for 24,000 braces


@pytest.mark.parametrize("raw", [deep_dict(10_000), [deep_dict(50)], 12, 1.5, True, b"{}", None, ["{}"],
                                 {"operations": deep_dict(3000)}, {"operation": deep_dict(3000)},
                                 {"operations": [deep_dict(3000)]}, {"operations": [{"action": ["ADD"]}]},
                                 {"operations": [{"action": "ADD", "memory": {"deep": deep_dict(3000)}}]},
                                 {"operations": [{"action": "MERGE", "old_memories": [deep_dict(10)],
                                                  "new_memory": "m"}]},
                                 {"operation": "APPEND", "content": 12}, {1: "x"}, {None: "x"}])
@pytest.mark.parametrize("agent", AGENTS)
def test_wrong_types_and_deep_objects_are_format_errors(agent, raw):
    with pytest.raises(ActionFormatError):
        parse_actions(agent, raw)


@pytest.mark.parametrize("agent", [["core"], {"a": 1}, None, 3, "archivist"])
def test_a_wrong_agent_is_a_format_error(agent):
    with pytest.raises(ActionFormatError):
        parse_actions(agent, "{}")  # type: ignore[arg-type]


def test_recursion_error_anywhere_becomes_a_format_error(monkeypatch):
    import memory_system

    def boom(text):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(memory_system, "extract_json", boom)
    with pytest.raises(ActionFormatError, match="RecursionError"):
        parse_actions("core", '{"operation": "APPEND", "content": "x"}')


def test_unknown_top_level_keys_are_rejected():
    with pytest.raises(ActionFormatError, match="unknown top-level key"):
        parse_actions("episodic", {"operations": [], "action": "ADD", "memory": "..."})
    with pytest.raises(ActionFormatError, match="unknown top-level key"):
        parse_actions("semantic", '{"operations": [], "thoughts": "none"}')
    with pytest.raises(ActionFormatError, match="unknown top-level key"):
        parse_actions("core", {"operation": "APPEND", "content": "x", "reasoning": "y"})
    # The fields a core operation names are its own, whichever operation it is.
    assert parse_actions("core", {"operation": "APPEND", "content": "x"})[0].content == "x"
    assert parse_actions("episodic", {"operations": []}) == []


def test_operation_cap():
    ok = {"operations": [{"action": "ADD", "memory": f"m{i}"} for i in range(MAX_OPERATIONS)]}
    assert len(parse_actions("episodic", ok)) == MAX_OPERATIONS
    over = {"operations": ok["operations"] + [{"action": "ADD", "memory": "one more"}]}
    with pytest.raises(ActionFormatError, match="cap"):
        parse_actions("episodic", over)
    # 10,000 operations in one output stalled the server 13 s: refused at once.
    t0 = time.perf_counter()
    with pytest.raises(ActionFormatError):
        parse_actions("semantic", {"operations": [{"action": "ADD", "memory": "x"}] * 10_000})
    assert time.perf_counter() - t0 < 0.5


def test_size_cap_for_text_and_for_parsed_objects():
    text = json.dumps({"operation": "APPEND", "content": "x" * (MAX_REPLY_CHARS - 100)})
    assert len(parse_actions("core", text)[0].content) == MAX_REPLY_CHARS - 100
    with pytest.raises(ActionFormatError, match="cap"):
        parse_actions("core", text + " " * 200)
    with pytest.raises(ActionFormatError, match="cap"):
        parse_actions("core", {"operation": "APPEND", "content": "x" * (MAX_REPLY_CHARS + 1)})
    with pytest.raises(ActionFormatError, match="cap"):
        parse_actions("episodic", {"operations": [{"action": "ADD", "memory": "y" * 1000}] * 100})


def test_the_cap_is_well_above_the_response_limit():
    assert MAX_REPLY_CHARS >= 2 * 6000 * 4  # the paper's 6,000-token response limit, about 4 characters a token
    assert MAX_JSON_DEPTH >= 8


def test_extraction_is_linear():
    """Doubling a worst-case input about doubles the time (the old scan quadrupled it)."""
    def cost(n: int) -> float:
        text = "{" * n
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            assert _first_balanced_object(text) is None
            best = min(best, time.perf_counter() - t0)
        return best

    small, large = cost(16_000), cost(64_000)
    assert large < 8 * small + 0.01  # quadratic would be 16x


def test_extract_json_contract_kept():
    assert extract_json('noise {"a": {"b": [1, {"c": 2}]}} more') == {"a": {"b": [1, {"c": 2}]}}
    assert extract_json('<think>{"x": 1}</think>```json\n{"y": 2}\n```') == {"y": 2}
    assert strip_reasoning("a <think> b </THINK> c") == "a  c"
    assert strip_reasoning("lost opening </think> kept") == "kept"
    depth_ok = '{"a":' * (MAX_JSON_DEPTH - 1) + "1" + "}" * (MAX_JSON_DEPTH - 1)
    assert isinstance(extract_json(depth_ok), dict)
    with pytest.raises(ValueError, match="nested"):
        extract_json('{"a":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError, match="cap"):
        extract_json("{}" + " " * MAX_REPLY_CHARS)
    assert llm_client.fenced_block("no fence") is None


def test_sft_converter_refuses_an_unknown_top_level_key():
    from scripts.convert_trajectories_to_sft import Skip, expert_json_text

    with pytest.raises(Skip):
        expert_json_text("episodic", '{"operations": [], "action": "ADD", "memory": "..."}')
    text, how = expert_json_text("episodic", 'Sure:\n```json\n{"operations": []}\n```')
    assert (json.loads(text), how) == ({"operations": []}, "unwrapped")
