"""Synthetic session QA: the prompt, validation of model output, the offline template handler."""
from __future__ import annotations

import asyncio
import json

import pytest

import prompts
import offline_backend
import qa_generator as qg
from llm_client import LLMCallError, LLMClient


def _item(q="What is my dog's name?", a="Pepper", t="single-session", s="current_session"):
    return {"question": q, "answer": a, "type": t, "source": s}


def test_type_mix_for_five_questions_matches_the_paper():
    mix = prompts.qa_type_mix(5)
    assert mix == {"single-session": (2, 3), "multi-session": (1, 2), "temporal-reasoning": (1, 1)}
    for n in range(3, 12):
        m = prompts.qa_type_mix(n)
        assert sum(lo for lo, _ in m.values()) <= n <= sum(hi for _, hi in m.values())


def test_prompt_names_its_task_and_carries_memory_and_session():
    p = prompts.qa_generation_prompt("Name: Dana", [("episodic", "2023-05-02: adopted Pepper")],
                                     "user: I moved to Portland.", "2023/05/14 (Sun) 10:05", 5)
    assert p.task == prompts.TASK_QA_GENERATE == "qa.generate"
    assert [m["role"] for m in p.messages] == ["system", "user"]
    user = p.messages[1]["content"]
    assert "Name: Dana" in user and "[EPISODIC] 2023-05-02: adopted Pepper" in user
    assert "2023/05/14 (Sun) 10:05" in user and "I moved to Portland." in user
    assert "exactly 5 questions" in " ".join(p.messages[0]["content"].split())
    assert p.inputs["n_questions"] == 5 and p.inputs["entries"] == [["episodic", "2023-05-02: adopted Pepper"]]
    empty = prompts.qa_generation_prompt("", [], "user: hi", None, 5)
    assert "no earlier memory" in empty.messages[1]["content"] and "(empty)" in empty.messages[1]["content"]


def test_parse_keeps_only_complete_items_and_normalises_labels():
    raw = json.dumps({"questions": [
        _item(),
        _item(q="When did I adopt Pepper?", a="2023-04-29", t="temporal_reasoning", s="current"),
        _item(q="", a="x"),
        _item(q="Where do I work?", a=""),
        _item(q="Which city?", t="opinion"),
        _item(q="Which hotel?", s="elsewhere"),
        {"question": "How many nights did Maya stay?", "answer": 2, "type": "Multi-Session", "source": "cross-session"},
        _item(),  # duplicate
        "not an object",
    ]})
    parsed = qg.parse_qa(raw, 5)
    assert [p.question for p in parsed.pairs] == ["What is my dog's name?", "When did I adopt Pepper?",
                                                   "How many nights did Maya stay?"]
    assert parsed.pairs[1].type == "temporal-reasoning" and parsed.pairs[1].source == "current_session"
    assert parsed.pairs[2].answer == "2" and parsed.pairs[2].source == "cross_session"
    reasons = " ".join(parsed.rejected)
    for why in ("no question", "no answer", "unknown type", "unknown source", "duplicate", "not an object"):
        assert why in reasons


def test_parse_truncates_to_n_and_accepts_fenced_output():
    items = [_item(q=f"What is fact {i} about me?") for i in range(7)]
    raw = "```json\n" + json.dumps({"questions": items}) + "\n```"
    parsed = qg.parse_qa(raw, 5)
    assert len(parsed.pairs) == 5 and sum("beyond" in r for r in parsed.rejected) == 2


def test_validate_raises_when_short_and_on_garbage():
    with pytest.raises(qg.QAValidationError, match="2 complete question"):
        qg.validate_qa(json.dumps({"questions": [_item(), _item(q="Where do I live?")]}), 5)
    with pytest.raises(qg.QAValidationError):
        qg.validate_qa("no json here", 5)
    with pytest.raises(qg.QAValidationError, match="questions"):
        qg.validate_qa('{"items": []}', 5)
    assert len(qg.validate_qa(json.dumps({"questions": [_item()]}), 5, min_complete=1)) == 1


def test_mix_warnings_report_departures():
    pairs = [qg.QAPair(f"q{i}", "a", "single-session", "current_session") for i in range(5)]
    warns = qg.mix_warnings(pairs, 5)
    assert any("multi-session" in w for w in warns) and any("temporal" in w for w in warns)
    assert not any("multi-session" in w for w in qg.mix_warnings(pairs, 5, has_history=False))


SESSION = ("user: I adopted a beagle named Pepper from the Oregon Humane Society last Saturday.\n"
           "assistant: Congratulations on adopting Pepper!\n"
           "user: I work as a nurse at Providence Hospital and I am switching to day shifts next month.\n"
           "user: My sister Maya is visiting in June and she is allergic to dogs.")


def test_offline_handler_writes_the_mix_deterministically():
    inputs = prompts.qa_generation_prompt("", [("semantic", "User - Work: nurse at Providence Hospital | Details: x")],
                                          SESSION, "2023/05/14 (Sun) 10:05", 5).inputs
    out = offline_backend.offline_qa(inputs)
    assert out == offline_backend.offline_qa(inputs)
    pairs = qg.validate_qa(out, 5)
    types = [p.type for p in pairs]
    assert types.count("temporal-reasoning") == 1 and types.count("multi-session") == 1 and len(pairs) == 5
    assert any(p.answer == "2023-05-14" for p in pairs)
    assert all(p.source == ("cross_session" if p.type == "multi-session" else "current_session") for p in pairs)
    no_history = qg.validate_qa(offline_backend.offline_qa(prompts.qa_generation_prompt("", [], SESSION, None, 5).inputs), 5)
    assert "multi-session" not in {p.type for p in no_history}


def test_generate_session_qa_offline_and_salvage():
    client = LLMClient(provider="offline", embedding_provider="offline")
    res = asyncio.run(qg.generate_session_qa(client, core="", entries=[], session_text=SESSION,
                                             session_time="2023/05/14 (Sun) 10:05", n=5))
    assert res.ok and len(res.pairs) == 5 and res.error is None and res.model == client.model

    class Stub:
        model = "stub"

        def __init__(self, last):
            self.last = last

        async def chat_json(self, prompt, validate):
            raise LLMCallError("invalid output after 3 attempts", attempts=3, last_output=self.last)

    partial = json.dumps({"questions": [_item(), _item(q="Where do I work?", a="Providence Hospital")]})
    res = asyncio.run(qg.generate_session_qa(Stub(partial), core="", entries=[], session_text=SESSION,
                                             session_time=None, n=5))
    assert len(res.pairs) == 2 and res.error is None and "kept 2 of 5" in res.warnings[0]
    res = asyncio.run(qg.generate_session_qa(Stub("garbage"), core="", entries=[], session_text=SESSION,
                                             session_time=None, n=5))
    assert not res.ok and "invalid output" in res.error
