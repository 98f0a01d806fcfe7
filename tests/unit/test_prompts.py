"""Prompt builders: pure functions that name their task and carry their structured inputs."""
import pytest

import config
import prompts
from prompts import (
    AGENT_TASKS,
    Prompt,
    agent_prompt,
    answer_prompt,
    core_agent_prompt,
    core_compress_prompt,
    entry_agent_prompt,
    judge_longmemeval_prompt,
    judge_paper_prompt,
    qa_generation_prompt,
    qa_type_mix,
    render_entry,
)

SESSION = "user: Alex: I adopted a beagle named Pepper yesterday.\nassistant: Congratulations!"
TIME = "1:56 pm on 8 May, 2023"


def _user(p: Prompt) -> str:
    return p.messages[1]["content"]


def _system(p: Prompt) -> str:
    return p.messages[0]["content"]


def _all_builders():
    return [
        ("agent.core", core_agent_prompt("Alex is a teacher.", SESSION)),
        ("agent.episodic", entry_agent_prompt("episodic", ["e1"], SESSION, TIME)),
        ("agent.semantic", entry_agent_prompt("semantic", ["s1"], SESSION, TIME)),
        ("agent.procedural", entry_agent_prompt("procedural", [], SESSION, TIME)),
        ("core.compress", core_compress_prompt("a long core block", 3000)),
        ("answer", answer_prompt("Who is Pepper?", "core", [("semantic", "Alex - Dog: Pepper")], "2023-05-08")),
        ("judge.paper", judge_paper_prompt("q", "gold", "ans")),
        ("judge.longmemeval", judge_longmemeval_prompt("q", "gold", "ans", "temporal-reasoning", False, reply="json")),
        ("qa.generate", qa_generation_prompt("core", [("episodic", "e")], SESSION, TIME)),
    ]


@pytest.mark.parametrize("task,prompt", _all_builders(), ids=[t for t, _ in _all_builders()])
def test_builder_returns_task_and_system_user_messages(task, prompt):
    assert isinstance(prompt, Prompt)
    assert prompt.task == task
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in prompt.messages)
    assert all(m["content"] == m["content"].strip() for m in prompt.messages)
    assert isinstance(prompt.inputs, dict) and prompt.inputs


def test_builders_are_pure():
    a = entry_agent_prompt("semantic", ["s1", "s2"], SESSION, None)
    b = entry_agent_prompt("semantic", ["s1", "s2"], SESSION, None)
    assert a == b


def test_entry_prompt_inputs_do_not_alias_caller_list():
    existing = ["s1"]
    p = entry_agent_prompt("semantic", existing, SESSION, None)
    existing.append("s2")
    assert p.inputs["existing"] == ["s1"]


@pytest.mark.parametrize("agent", ["core", "episodic", "semantic", "procedural"])
def test_agent_prompt_dispatches_to_agent_task(agent):
    p = agent_prompt(agent, core="c", existing=["x"], session_text=SESSION, session_time=TIME)
    assert p.task == AGENT_TASKS[agent]
    assert SESSION in _user(p)


# ----------------------------------------------------------------------------- core agent


def test_core_prompt_inputs_carry_values():
    core = "x" * 2500
    p = core_agent_prompt(core, SESSION)
    assert p.inputs == {"core": core, "session_text": SESSION, "usage_pct": 50.0}


def test_core_prompt_shows_usage_percent():
    p = core_agent_prompt("x" * 4600, SESSION)
    assert "92.0% full" in _user(p)
    assert f"4600 of {config.CORE_MEMORY_CHAR_LIMIT} characters" in _user(p)
    assert p.inputs["usage_pct"] == 92.0


def test_core_prompt_uses_given_char_limit():
    p = core_agent_prompt("x" * 50, SESSION, char_limit=200)
    assert "25.0% full" in _user(p) and p.inputs["usage_pct"] == 25.0


@pytest.mark.parametrize("core", ["", "   \n"])
def test_core_prompt_shows_empty_block(core):
    p = core_agent_prompt(core, SESSION)
    assert "Current core memory" in _user(p)
    assert _user(p).split("full):\n", 1)[1].startswith("(empty)")


def test_core_prompt_shows_block_text():
    p = core_agent_prompt("Alex is a teacher.", SESSION)
    assert "Alex is a teacher." in _user(p) and "(empty)" not in _user(p)


def test_core_prompt_explains_operations():
    sys_text = _system(core_agent_prompt("", SESSION))
    for op in ("APPEND", "REPLACE", "REWRITE"):
        assert op in sys_text
    assert "90%" in sys_text


# ----------------------------------------------------------------------------- entry agents


def test_episodic_prompt_includes_session_time():
    p = entry_agent_prompt("episodic", [], SESSION, TIME)
    assert f"Session time: {TIME}" in _user(p)
    assert p.inputs["session_time"] == TIME


def test_episodic_prompt_with_unknown_time():
    p = entry_agent_prompt("episodic", [], SESSION, None)
    assert "Session time: unknown" in _user(p)
    assert p.inputs["session_time"] is None


@pytest.mark.parametrize("agent", ["semantic", "procedural"])
def test_other_entry_prompts_omit_session_time(agent):
    p = entry_agent_prompt(agent, [], SESSION, TIME)
    assert TIME not in _user(p) and "Session time" not in _user(p)
    assert "session_time" not in p.inputs


def test_core_prompt_omits_session_time():
    p = agent_prompt("core", core="", existing=[], session_text=SESSION, session_time=TIME)
    assert TIME not in _user(p) and "Session time" not in _user(p)


@pytest.mark.parametrize("agent", ["episodic", "semantic", "procedural"])
def test_entry_prompt_numbers_existing_memories(agent):
    p = entry_agent_prompt(agent, ["first memory", "second memory"], SESSION, TIME)
    assert "1. first memory\n2. second memory" in _user(p)
    assert p.inputs["existing"] == ["first memory", "second memory"]
    assert p.inputs["session_text"] == SESSION
    assert f"Existing {agent} memories" in _user(p)


def test_entry_prompt_without_existing_says_none():
    p = entry_agent_prompt("semantic", [], SESSION, None)
    assert "(none yet)" in _user(p)


@pytest.mark.parametrize("agent,allowed,forbidden", [
    ("episodic", ("ADD", "UPDATE", "MERGE"), ('"SKIP"',)),
    ("semantic", ("ADD", "UPDATE", "SKIP"), ('"MERGE"',)),
    ("procedural", ("ADD", "UPDATE"), ('"MERGE"', '"SKIP"')),
])
def test_entry_prompt_offers_only_allowed_actions(agent, allowed, forbidden):
    sys_text = _system(entry_agent_prompt(agent, [], SESSION, None))
    for op in allowed:
        assert f'"action": "{op}"' in sys_text
    for op in forbidden:
        assert f'"action": {op}' not in sys_text


def test_entry_prompt_rejects_unknown_agent():
    with pytest.raises(KeyError):
        entry_agent_prompt("working", [], SESSION, None)


# ----------------------------------------------------------------------------- compress, answer, judge, QA


def test_core_compress_prompt_carries_target():
    p = core_compress_prompt("block", 1234)
    assert p.inputs == {"core": "block", "target_chars": 1234}
    assert "1234" in _system(p) and "block" in _user(p)


def test_answer_prompt_numbers_entries_with_type_tags_and_date():
    entries = [("episodic", "2023-05-08: Alex adopted Pepper"), ("semantic", "Alex - Dog: beagle"),
               ("procedural", "Walk | Steps: 1. leash")]
    p = answer_prompt("When did I adopt Pepper?", "Alex is a teacher.", entries, "2023-06-01")
    u = _user(p)
    assert "1. [EPISODIC] 2023-05-08: Alex adopted Pepper" in u
    assert "2. [SEMANTIC] Alex - Dog: beagle" in u
    assert "3. [PROCEDURAL] Walk | Steps: 1. leash" in u
    assert "Current date: 2023-06-01" in u
    assert "Question: When did I adopt Pepper?" in u
    assert "Alex is a teacher." in u
    assert p.inputs == {"question": "When did I adopt Pepper?", "core": "Alex is a teacher.",
                        "entries": [list(e) for e in entries], "current_time": "2023-06-01"}


def test_answer_prompt_without_memories_or_date():
    p = answer_prompt("q?", "", [], None)
    u = _user(p)
    assert "(no memories retrieved)" in u and "Current date: unknown" in u and "Core memory:\n(empty)" in u


def test_answer_prompt_states_not_answerable_rule():
    assert "Not answerable" in _system(answer_prompt("q", "", [], None))


def test_render_entry_tags():
    assert render_entry("episodic", "x") == "[EPISODIC] x"
    assert render_entry("semantic", "x") == "[SEMANTIC] x"
    assert render_entry("procedural", "x") == "[PROCEDURAL] x"
    assert render_entry("other", "x") == "[OTHER] x"


def test_judge_paper_prompt_inputs_and_text():
    p = judge_paper_prompt("Where?", "Rome", "in Rome")
    assert p.inputs == {"question": "Where?", "gold": "Rome", "answer": "in Rome"}
    assert "Gold answer: Rome" in _user(p) and "in Rome" in _user(p)
    assert '{"label": "CORRECT"}' in _system(p)


def test_judge_paper_prompt_also_correct_only_when_given():
    p = judge_paper_prompt("Is Oscar Melanie's pet?", "Not answerable", "No, he is Caroline's", also_correct="No")
    assert p.inputs["also_correct"] == "No"
    assert "Gold answer: Not answerable\nAlso correct: No" in _user(p)
    assert p.messages[0] == judge_paper_prompt("q", "g", "a").messages[0]  # the system prompt is unchanged
    assert "Also correct" not in _user(judge_paper_prompt("q", "g", "a"))


def test_judge_paper_prompt_abstention_gold_is_an_explanation():
    p = judge_paper_prompt("Where did I buy my tent?", "The user never mentioned a tent.", "I don't know",
                           abstention=True)
    assert "Gold answer: Not answerable (The user never mentioned a tent.)" in _user(p)
    assert p.inputs["abstention"] is True and "abstention" not in judge_paper_prompt("q", "g", "a").inputs


def _lme(question_type, abstention=False, reply="yes_no", gold="g"):
    return judge_longmemeval_prompt("q", gold, "a", question_type, abstention, reply=reply)


def test_judge_longmemeval_default_form_is_one_user_message_answered_yes_or_no():
    p = _lme("multi-session")
    assert [m["role"] for m in p.messages] == ["user"]
    text = p.messages[0]["content"]
    assert text.endswith("Reply with one word: yes or no.")
    assert "Question: q\nGold answer: g\nResponse: a" in text
    assert p.inputs == {"question": "q", "gold": "g", "answer": "a", "question_type": "multi-session",
                        "abstention": False, "reply": "yes_no"}


def test_judge_longmemeval_json_form_keeps_system_message_and_label_reply():
    p = _lme("multi-session", reply="json")
    assert [m["role"] for m in p.messages] == ["system", "user"]
    assert '{"label": "CORRECT"}' in _system(p) and p.inputs["reply"] == "json"
    with pytest.raises(ValueError, match="reply form"):
        _lme("multi-session", reply="xml")


# question type, abstention -> a phrase of the rule the judge must be given (LongMemEval's evaluate_qa.py rules)
LME_RULE_CASES = [
    ("single-session-user", False, "every intermediate step"),
    ("single-session-user", False, "only part of the information"),
    ("single-session-assistant", False, "every intermediate step"),
    ("multi-session", False, "only part of the information"),
    ("temporal-reasoning", False, "every intermediate step"),
    ("temporal-reasoning", False, "only part of the information"),
    ("temporal-reasoning", False, "off-by-one error in a count of days, weeks or months"),
    ("knowledge-update", False, "even if it also mentions earlier information"),
    ("single-session-preference", False, "need not cover every point of the rubric"),
    ("multi-session", True, "says the information is incomplete"),
    ("temporal-reasoning", True, "related information was given but not what was asked"),
    ("knowledge-update", True, "is not an answer"),
]


@pytest.mark.parametrize("reply", ["yes_no", "json"])
@pytest.mark.parametrize("question_type,abstention,phrase", LME_RULE_CASES)
def test_judge_longmemeval_prompt_carries_the_rule_of_its_type(question_type, abstention, phrase, reply):
    p = _lme(question_type, abstention, reply)
    assert phrase in " ".join(m["content"] for m in p.messages)


def test_judge_longmemeval_rules_do_not_leak_across_types():
    assert "off-by-one" not in _lme("multi-session").messages[0]["content"]
    assert "rubric" not in _lme("knowledge-update").messages[0]["content"]
    assert "cannot be answered" not in _lme("temporal-reasoning").messages[0]["content"]
    # a type LongMemEval does not define gets its default rule
    assert prompts.longmemeval_rule("perltqa-fact", False) == prompts.longmemeval_rule("multi-session", False)


def test_judge_longmemeval_gold_is_named_for_what_it_is():
    assert "\nRubric: g\n" in _lme("single-session-preference").messages[0]["content"]
    abst = _lme("single-session-preference", True).messages[0]["content"]
    assert "\nExplanation (why it cannot be answered): g\n" in abst and "Rubric" not in abst
    assert "\nGold answer: g\n" in _lme("knowledge-update").messages[0]["content"]


def test_qa_generation_prompt_inputs():
    p = qa_generation_prompt("", [], SESSION, TIME, n_questions=5)
    assert p.inputs["n_questions"] == 5 and p.inputs["session_time"] == TIME
    assert p.inputs["type_mix"] == {"single-session": [2, 3], "multi-session": [1, 2], "temporal-reasoning": [1, 1]}
    assert f"Date: {TIME}" in _user(p) and "There is no earlier memory" in _user(p)


def test_qa_generation_prompt_renders_earlier_memory():
    p = qa_generation_prompt("Alex is a teacher.", [("semantic", "Alex - Dog: Pepper")], SESSION, TIME)
    assert "1. [SEMANTIC] Alex - Dog: Pepper" in _user(p) and "There is no earlier memory" not in _user(p)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_qa_type_mix_can_add_up_to_n(n):
    mix = qa_type_mix(n)
    assert sum(lo for lo, _ in mix.values()) <= n <= sum(hi for _, hi in mix.values())
    assert set(mix) == set(prompts.QA_TYPES)
