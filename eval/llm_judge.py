"""LLM-as-judge: the paper's generous CORRECT/WRONG protocol and LongMemEval's per-type protocol.

Every verdict carries the protocol, reply form and judge model that produced it, so reported numbers can say which
judge and prompt they come from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import prompts
from llm_client import LLMCallError, LLMClient, extract_json, strip_reasoning

JUDGE_PROTOCOLS = {
    "paper": "MemBuilder paper protocol: generous CORRECT/WRONG judge with a JSON label reply "
             "(prompts.judge_paper_prompt); the paper's judge is gpt-4.1",
    "longmemeval": "LongMemEval's own judge (the rules of its authors' evaluate_qa.py, our wording): per question "
                   "type, all intermediate steps to the answer count, a subset of the required information does not, "
                   "off-by-one day/week/month counts tolerated for temporal reasoning, the updated answer counts for "
                   "knowledge updates, a rubric for preferences, 'information incomplete' counts as abstaining for "
                   "_abs; one user message answered yes/no as that judge does (prompts.judge_longmemeval_prompt); "
                   "LongMemEval's official figures used gpt-4o-2024-08-06 as the judge",
    "longmemeval-json": "LongMemEval's per-type rules as in 'longmemeval', asked with a system message and answered "
                        "as a JSON label {\"label\": \"CORRECT\"|\"WRONG\"} (prompts.judge_longmemeval_prompt, "
                        "reply='json')",
}
# The reply form each protocol asks for.
REPLY_FORMS = {"paper": "json", "longmemeval": "yes_no", "longmemeval-json": "json"}
LABELS = ("CORRECT", "WRONG")
# A yes/no reply may add a short reason ("Yes. It names the shelter."); anything longer is not a yes/no reply.
_MAX_YES_NO_REPLY = 300
_YES_NO_HEAD = re.compile(r"(?:answer\s*:\s*)?(yes|no)(?=$|[\s.,;:!)\-])", re.IGNORECASE)
_WRAPPING = " \t\r\n*_`\"'"


@dataclass
class Verdict:
    label: str | None
    protocol: str
    model: str
    raw: str | None = None
    error: str | None = None
    reply_form: str | None = None


def parse_label(text: str) -> str:
    """The label of a judge reply; ValueError when it has none (the client then retries)."""
    try:
        obj = extract_json(text)
        label = obj.get("label") if isinstance(obj, dict) else None
    except ValueError:
        label = None
    if label is None:  # a bare word is an acceptable reply from a weaker judge
        words = (text or "").strip().strip(".").upper().split()
        label = words[0] if len(words) == 1 else None
    if not isinstance(label, str) or label.strip().upper() not in LABELS:
        raise ValueError(f"judge reply has no CORRECT/WRONG label: {(text or '')[:80]!r}")
    return label.strip().upper()


def parse_yes_no(text: str) -> str:
    """CORRECT for a yes reply, WRONG for a no; ValueError for anything that is not plainly one of them.

    Stricter than LongMemEval's own check ('yes' anywhere in the reply): the reply must start with yes or no and must
    not contain the other word, so "The response does not say yes" or "Yes and no" is retried, not read as yes.
    A JSON label reply is accepted as well.
    """
    reply = strip_reasoning(text or "").strip(_WRAPPING)
    if reply.startswith("{"):
        return parse_label(reply)
    m = _YES_NO_HEAD.match(reply)
    if m is None or len(reply) > _MAX_YES_NO_REPLY:
        raise ValueError(f"judge reply is not a plain yes or no: {(text or '')[:80]!r}")
    word = m.group(1).lower()
    other = "no" if word == "yes" else "yes"
    if re.search(rf"\b{other}\b", reply[m.end():], re.IGNORECASE):
        raise ValueError(f"judge reply says both yes and no: {(text or '')[:80]!r}")
    return "CORRECT" if word == "yes" else "WRONG"


def judge_prompt(protocol: str, *, question: str, gold: str, answer: str, question_type: str = "",
                 abstention: bool = False, also_correct: str | None = None) -> prompts.Prompt:
    if protocol == "paper":
        return prompts.judge_paper_prompt(question, gold, answer, also_correct, abstention)
    if protocol in ("longmemeval", "longmemeval-json"):
        return prompts.judge_longmemeval_prompt(question, gold, answer, question_type, abstention,
                                                reply=REPLY_FORMS[protocol])
    raise ValueError(f"unknown judge protocol {protocol!r} (choose {', '.join(JUDGE_PROTOCOLS)})")


async def judge_answer(client: LLMClient, protocol: str, *, question: str, gold: str, answer: str,
                       question_type: str = "", abstention: bool = False,
                       also_correct: str | None = None) -> Verdict:
    """One verdict; a judge that still fails after retries gives label None and the reason.

    also_correct: a second accepted answer, used by the paper protocol (LoCoMo's category-5 items that carry the
    dataset's own answer "No", see README); LongMemEval's protocols have no such case and ignore it.
    """
    prompt = judge_prompt(protocol, question=question, gold=gold, answer=answer, question_type=question_type,
                          abstention=abstention, also_correct=also_correct)
    form = REPLY_FORMS[protocol]
    parse = parse_yes_no if form == "yes_no" else parse_label
    try:
        # LongMemEval's judge answers in plain words, so JSON mode would forbid the very reply it asks for.
        label, res = await client.chat_json(prompt, parse, json_mode=form == "json")
    except LLMCallError as exc:
        return Verdict(None, protocol, client.model, raw=exc.last_output, error=exc.reason, reply_form=form)
    return Verdict(label, protocol, res.model, raw=res.text, reply_form=form)
