"""Each judge protocol, rule by rule: a scripted judge on 127.0.0.1 replies, the real client asks, and the verdict is
the label the rule calls for.

The scripted judge follows a rule only when the prompt it receives states that rule: asked without it, it replies
the opposite. So a case passes only when the protocol sends the rule for that question type and reads the reply in
the protocol's own form (LongMemEval: one user message answered yes/no; the paper and longmemeval-json: a JSON label).
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest

from eval.llm_judge import JUDGE_PROTOCOLS, REPLY_FORMS, judge_answer, parse_label, parse_yes_no
from llm_client import LLMClient
from scripts.scripted_server import ScriptedServer

JUDGE_MODEL = "scripted-judge"


@dataclass(frozen=True)
class Case:
    name: str
    protocol: str
    question_type: str
    abstention: bool
    question: str
    gold: str
    answer: str
    rule: str  # a phrase of the rule the judge must be given for this case
    reply: str  # what the scripted judge says when it is given the rule
    expected: str | None  # the verdict's label (None: the reply is not a verdict and the question stays unjudged)
    also_correct: str | None = None


YES, NO = "yes", "no"
C, W = '{"label": "CORRECT"}', '{"label": "WRONG"}'

# One row per rule of LongMemEval's own judge (its authors' evaluate_qa.py), in its yes/no form.
LME_CASES = [
    Case("steps-reach-answer", "longmemeval", "multi-session", False,
         "How many hours did I hike in total on my two May trips?", "8 hours",
         "The first hike took 3 hours and the second 5, so 3 + 5.", "every intermediate step", YES, "CORRECT"),
    Case("subset-is-wrong", "longmemeval", "single-session-user", False,
         "Which two cities did I visit in May?", "Lisbon and Porto", "Lisbon", "only part of the information", NO,
         "WRONG"),
    Case("assistant-answer", "longmemeval", "single-session-assistant", False,
         "Which stretch did you recommend for my back?", "the cat-cow stretch", "You suggested cat-cow.",
         "contains the gold answer", YES, "CORRECT"),
    Case("temporal-off-by-one", "longmemeval", "temporal-reasoning", False,
         "How many days passed between my two dentist visits?", "18 days", "19 days", "off-by-one", "Yes.",
         "CORRECT"),
    Case("temporal-steps", "longmemeval", "temporal-reasoning", False,
         "How many weeks after starting the course did I pass the exam?", "6 weeks",
         "You started on 1 March and passed on 12 April: six weeks later.", "every intermediate step", YES,
         "CORRECT"),
    Case("temporal-subset-is-wrong", "longmemeval", "temporal-reasoning", False,
         "Which did I do first, the marathon or the triathlon, and how many months apart?",
         "the marathon, 3 months before the triathlon", "The marathon came first.",
         "only part of the information", "No.", "WRONG"),
    Case("update-with-history", "longmemeval", "knowledge-update", False,
         "Where do I live now?", "Denver", "You lived in Boston, but you moved to Denver last month.",
         "even if it also mentions earlier information", YES, "CORRECT"),
    Case("update-outdated-only", "longmemeval", "knowledge-update", False,
         "How many bikes do I own now?", "3", "You own 2 bikes.", "only an outdated", NO, "WRONG"),
    Case("preference-rubric", "longmemeval", "single-session-preference", False,
         "Any ideas for a weekend coffee drink?", "The user would prefer drinks they can make with their new "
         "espresso machine, ideally with oat milk", "Since you got an espresso machine, try a cortado.",
         "need not cover every point of the rubric", YES, "CORRECT"),
    Case("abstain-incomplete", "longmemeval", "multi-session", True,
         "What is my landlord's name?", "The user talked about their apartment but never named the landlord.",
         "You told me about your apartment, but not your landlord's name.",
         "related information was given but not what was asked", YES, "CORRECT"),
    Case("abstain-says-incomplete", "longmemeval", "temporal-reasoning", True,
         "How many days before my trip did I buy the tent?", "The user never mentioned buying a tent.",
         "The information is incomplete: there is a trip but no tent purchase.", "says the information is incomplete",
         YES, "CORRECT"),
    Case("abstain-answers-anyway", "longmemeval", "single-session-user", True,
         "What breed is my neighbour's dog?", "The user never mentioned a neighbour's dog.", "A beagle.",
         "answers as if it knew", NO, "WRONG"),
    # the reply must be a plain yes or no
    Case("reply-bold-yes", "longmemeval", "multi-session", False, "What colour is my car?", "red", "Red.",
         "contains the gold answer", "**Yes**", "CORRECT"),
    Case("reply-answer-prefix", "longmemeval", "multi-session", False, "What colour is my bike?", "blue",
         "Green.", "contains the gold answer", "Answer: no", "WRONG"),
    Case("reply-json-label", "longmemeval", "multi-session", False, "What colour is my boat?", "white", "White.",
         "contains the gold answer", C, "CORRECT"),
    Case("reply-rambling", "longmemeval", "multi-session", False, "What colour is my door?", "green", "Green.",
         "contains the gold answer", "The response names the colour, so I would say yes.", None),
    Case("reply-both", "longmemeval", "multi-session", False, "What colour is my fence?", "white", "White-ish.",
         "contains the gold answer", "Yes and no: it is close.", None),
    Case("reply-yesterday", "longmemeval", "multi-session", False, "What colour is my gate?", "black", "Black.",
         "contains the gold answer", "Yesterday it was black.", None),
]

# The same rules asked for a JSON label.
LME_JSON_CASES = [
    Case(c.name + "-json", "longmemeval-json", c.question_type, c.abstention, c.question + " (json)", c.gold,
         c.answer, c.rule, C if c.expected == "CORRECT" else W, c.expected)
    for c in LME_CASES if c.expected is not None and c.reply in (YES, NO, "Yes.", "No.")
] + [
    Case("json-bare-word", "longmemeval-json", "multi-session", False, "What is my cat called? (json)", "Tom",
         "Tom.", "contains the gold answer", "CORRECT", "CORRECT"),
    Case("json-yes-is-not-a-label", "longmemeval-json", "multi-session", False, "What is my dog called? (json)",
         "Rex", "Rex.", "contains the gold answer", "yes", None),
]

# The paper's generous CORRECT/WRONG judge.
PAPER_CASES = [
    Case("same-fact-other-words", "paper", "single-hop", False, "What pet did Alex adopt?", "a beagle named Pepper",
         "Pepper, his beagle", "even if it is longer, worded differently", C, "CORRECT"),
    Case("date-any-format", "paper", "temporal", False, "When did Alex adopt Pepper?", "7 May 2023", "2023-05-07",
         "Dates in any format that denote the same date are CORRECT", C, "CORRECT"),
    Case("unanswerable-gold-abstains", "paper", "adversarial", False, "What is Alex's sister's job?",
         "Not answerable", "That was never mentioned.", "any reply expressing that the information is not available",
         C, "CORRECT"),
    Case("unanswerable-gold-specific", "paper", "adversarial", False, "What is Alex's brother's job?",
         "Not answerable", "He is a pilot.", "a specific answer is WRONG", W, "WRONG"),
    Case("specific-gold-abstains", "paper", "single-hop", False, "Where does Alex live?", "Rome", "Not answerable",
         "a reply saying it is not answerable or unknown is WRONG", W, "WRONG"),
    Case("wrong-person", "paper", "single-hop", False, "What did Melanie paint?", "a sunset",
         "Caroline painted a sunset.", "The right fact attributed to the wrong person is WRONG", W, "WRONG"),
    Case("dataset-no-answer", "paper", "adversarial", False, "Did Caroline make the black and white bowl?",
         "Not answerable", "No, Melanie made it in her class.", "Also correct: No", C, "CORRECT", also_correct="No"),
    Case("abstention-gold-explains", "paper", "multi-session", True, "Where did I buy my tent?",
         "The user never mentioned buying a tent.", "I have no record of a tent.",
         "Gold answer: Not answerable (The user never mentioned buying a tent.)", C, "CORRECT"),
    Case("fenced-label", "paper", "single-hop", False, "What is Alex's job?", "teacher", "He teaches maths.",
         "worded differently", '```json\n{"label": "CORRECT"}\n```', "CORRECT"),
    Case("label-rambling", "paper", "single-hop", False, "What is Alex's car?", "a Fiat", "A Fiat.",
         "worded differently", "It could be CORRECT or WRONG.", None),
]

ALL_CASES = LME_CASES + LME_JSON_CASES + PAPER_CASES
BY_QUESTION = {c.question: c for c in ALL_CASES}
assert len(BY_QUESTION) == len(ALL_CASES)


def _opposite(reply: str) -> str:
    """The other verdict in the same form; a reply that is no verdict stays as it is."""
    for parse, flipped in ((parse_yes_no, {"CORRECT": NO, "WRONG": YES}), (parse_label, {"CORRECT": W, "WRONG": C})):
        try:
            return flipped[parse(reply)]
        except ValueError:
            continue
    return reply


def _rule_following_judge(task: str, body: dict) -> str:
    text = "\n".join(m.get("content", "") for m in body.get("messages", []))
    question = next(ln[len("Question: "):] for ln in text.splitlines() if ln.startswith("Question: "))
    case = BY_QUESTION[question]
    return case.reply if case.rule in " ".join(text.split()) else _opposite(case.reply)


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(_rule_following_judge) as srv:
        yield srv


def _judge(server, case: Case, max_retries: int = 1):
    client = LLMClient(provider="openai", base_url=server.base_url, api_key="x", model=JUDGE_MODEL,
                       max_retries=max_retries, backoff_base_s=0.001)

    async def go():
        try:
            return await judge_answer(client, case.protocol, question=case.question, gold=case.gold,
                                      answer=case.answer, question_type=case.question_type,
                                      abstention=case.abstention, also_correct=case.also_correct)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _sent(server, case: Case) -> list[dict]:
    return [r.body for r in server.requests(task_prefix="judge")
            if any(f"Question: {case.question}\n" in m["content"] for m in r.body["messages"])]


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_protocol_rule_gives_expected_label(server, case):
    v = _judge(server, case)
    assert v.label == case.expected, (v.raw, v.error)
    assert v.protocol == case.protocol and v.reply_form == REPLY_FORMS[case.protocol]
    assert v.model == JUDGE_MODEL  # the judge model the server reports, recorded in every verdict
    bodies = _sent(server, case)
    if case.expected is None:
        assert v.error and "invalid output after 2 attempt" in v.error
        assert len(bodies) == 2  # retried once, then recorded as not judged (never counted as an answer)
    else:
        assert v.error is None and len(bodies) == 1
    body = bodies[0]
    if case.protocol == "longmemeval":
        # LongMemEval's own form: one user message, plain-text reply (no JSON mode)
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert "response_format" not in body
        assert body["messages"][0]["content"].endswith("Reply with one word: yes or no.")
    else:
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert body["response_format"] == {"type": "json_object"}


def test_a_judge_not_told_the_rule_would_judge_otherwise(server):
    # the scripted judge's premise, checked once: without the off-by-one rule it says no
    case = next(c for c in LME_CASES if c.name == "temporal-off-by-one")
    wrong_type = Case(**{**case.__dict__, "name": "x", "question_type": "multi-session"})
    assert _judge(server, wrong_type).label == "WRONG"


@pytest.mark.parametrize("reply,label", [
    ("yes", "CORRECT"), ("no", "WRONG"), ("Yes.", "CORRECT"), ("NO", "WRONG"), ("  no.  ", "WRONG"),
    ("**No**", "WRONG"), ("'yes'", "CORRECT"), ("Answer: yes", "CORRECT"),
    ("Yes. The response names the shelter.", "CORRECT"), ("No - it gives the old address.", "WRONG"),
    ("<think>the gold says 18, the response 19</think>yes", "CORRECT"),
    ('{"label": "WRONG"}', "WRONG"),
    ("", None), ("maybe", None), ("Yesterday", None), ("nope", None), ("The answer is yes", None),
    ("Yes and no", None), ("No, but yes in part", None), ("I would say yes", None),
    ("yes " + "because " * 60, None),  # longer than a yes/no reply with a short reason
    ('{"label": "MAYBE"}', None),
])
def test_parse_yes_no_is_strict(reply, label):
    if label is None:
        with pytest.raises(ValueError):
            parse_yes_no(reply)
    else:
        assert parse_yes_no(reply) == label


@pytest.mark.parametrize("reply,label", [
    ('{"label": "CORRECT"}', "CORRECT"), ('{"label": "wrong"}', "WRONG"), ("CORRECT", "CORRECT"), ("Wrong.", "WRONG"),
    ("yes", None), ("CORRECT or WRONG", None), ('{"verdict": "CORRECT"}', None),
])
def test_parse_label(reply, label):
    if label is None:
        with pytest.raises(ValueError):
            parse_label(reply)
    else:
        assert parse_label(reply) == label


def test_longmemeval_protocol_description_names_official_judge_model():
    assert "gpt-4o-2024-08-06" in JUDGE_PROTOCOLS["longmemeval"]
    assert "yes/no" in JUDGE_PROTOCOLS["longmemeval"]
    assert set(JUDGE_PROTOCOLS) == set(REPLY_FORMS) == {"paper", "longmemeval", "longmemeval-json"}


@pytest.mark.parametrize("protocol", sorted(JUDGE_PROTOCOLS))
def test_offline_judge_answers_every_protocol_in_its_form(protocol):
    client = LLMClient(provider="offline")

    async def go(answer, abstention):
        return await judge_answer(client, protocol, question="Where do I live?", gold="Denver", answer=answer,
                                  question_type="knowledge-update", abstention=abstention)

    right = asyncio.run(go("You moved to Denver.", False))
    wrong = asyncio.run(go("Boston", False))
    abstained = asyncio.run(go("I don't know", True))
    assert (right.label, wrong.label, abstained.label) == ("CORRECT", "WRONG", "CORRECT")
    assert right.model == client.model and right.protocol == protocol
    raw_is_json = right.raw.startswith("{")
    assert raw_is_json == (REPLY_FORMS[protocol] == "json")
    if not raw_is_json:
        assert right.raw == "yes" and wrong.raw == "no"
    else:
        assert json.loads(right.raw) == {"label": "CORRECT"}


def test_conv26_no_items_are_graded_by_the_datasets_own_answer(shared_data):
    """The two conv-26 category-5 items that carry `answer: "No"`: abstaining and "No" are correct, "Yes" is not;
    LoCoMo's own script rule (beside ours in summary.json) only accepts its two phrases."""
    from eval import metrics
    from eval.datasets import load_dataset

    (sample,) = load_dataset("locomo", dataset_path=shared_data / "locomo" / "locomo10_dev.json",
                             sample_ids=["conv-26"])
    items = [q for q in sample.questions if q.extra.get("original_answer")]
    assert sorted(q.text for q in items) == ["Did Caroline make the black and white bowl in the photo?",
                                             "Is Oscar Melanie's pet?"]
    client = LLMClient(provider="offline")
    for q in items:
        assert (q.category, q.answer, q.extra["original_answer"]) == (5, "Not answerable", "No")

        async def label(answer):
            v = await judge_answer(client, "paper", question=q.text, gold=q.answer, answer=answer,
                                   question_type=q.type, also_correct=q.extra["original_answer"])
            return v.label

        for answer, expected in (("No, that was Melanie's.", "CORRECT"), ("Not answerable", "CORRECT"),
                                 ("Yes", "WRONG")):
            assert asyncio.run(label(answer)) == expected
        assert metrics.locomo_f1("No, that was Melanie's.", q.answer, q.category, q.extra["original_answer"]) == 1.0
        assert metrics.locomo_script_f1("No, that was Melanie's.", q.answer, q.category) == 0.0
