"""LLM-as-judge: the paper's generous CORRECT/WRONG protocol and LongMemEval's per-type protocol.

Every verdict carries the protocol and judge model that produced it, so reported numbers can say which judge
and prompt they come from.
"""
from __future__ import annotations

from dataclasses import dataclass

import prompts
from llm_client import LLMCallError, LLMClient, extract_json

JUDGE_PROTOCOLS = {
    "paper": "MemBuilder paper protocol: generous CORRECT/WRONG judge (prompts.judge_paper_prompt)",
    "longmemeval": "LongMemEval per-type protocol: off-by-one tolerated for temporal reasoning, updated answer for "
                   "knowledge updates, rubric for preferences, abstention detection for _abs "
                   "(prompts.judge_longmemeval_prompt)",
}
LABELS = ("CORRECT", "WRONG")


@dataclass
class Verdict:
    label: str | None
    protocol: str
    model: str
    raw: str | None = None
    error: str | None = None


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


def judge_prompt(protocol: str, *, question: str, gold: str, answer: str, question_type: str = "",
                 abstention: bool = False) -> prompts.Prompt:
    if protocol == "paper":
        return prompts.judge_paper_prompt(question, gold, answer)
    if protocol == "longmemeval":
        return prompts.judge_longmemeval_prompt(question, gold, answer, question_type, abstention)
    raise ValueError(f"unknown judge protocol {protocol!r} (choose {', '.join(JUDGE_PROTOCOLS)})")


async def judge_answer(client: LLMClient, protocol: str, *, question: str, gold: str, answer: str,
                       question_type: str = "", abstention: bool = False) -> Verdict:
    """One verdict; a judge that still fails after retries gives label None and the reason."""
    prompt = judge_prompt(protocol, question=question, gold=gold, answer=answer, question_type=question_type,
                          abstention=abstention)
    try:
        label, res = await client.chat_json(prompt, parse_label)
    except LLMCallError as exc:
        return Verdict(None, protocol, client.model, raw=exc.last_output, error=exc.reason)
    return Verdict(label, protocol, res.model, raw=res.text)
