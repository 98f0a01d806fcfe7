"""Synthetic session QA, the dense reward data of ADRPO (PAPER §4).

For one session, a strong model (`config.QA_GENERATION_MODEL`) reads the memory as it was BEFORE the session (the
whole core block and every entry) plus the session with its timestamp, and writes `--qa-per-session` (5) first-person
factual questions: about half single-session, ~30 % multi-session, ~20 % temporal-reasoning. The reward server later
answers them from the memory the policy builds, so only complete items are kept: a question, an answer, a known type
and a known source.

As a module: `await generate_session_qa(client, core=..., entries=..., session_text=..., session_time=...)`. The
sessions of expert-trajectory dialogues are filled (and cached, resumably) by `training/session_qa.py`, which is also
the CLI: `python -m training.session_qa --trajectory-dir expert_trajectories/longmemeval`.

The `offline` provider answers `qa.generate` with deterministic template questions drawn from the session's own
sentences (`offline_backend.offline_qa`), so the whole pipeline runs without a model; such questions are a smoke path.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import config
import prompts
from llm_client import ClientSettings, LLMCallError, LLMClient, extract_json
from prompts import QA_SOURCES, QA_TYPES

log = logging.getLogger("qa_generator")


class QAValidationError(ValueError):
    """A QA generation output that does not hold enough complete questions."""


# --------------------------------------------------------------------------- records and validation

@dataclass
class QAPair:
    question: str
    answer: str
    type: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QAPair":
        return cls(str(d["question"]), str(d["answer"]), str(d["type"]), str(d["source"]))


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


_TYPE_ALIASES = {_key(a): t for t in QA_TYPES for a in (t, t.replace("-", "_"), t.replace("-", " "), t.split("-")[0])}
_TYPE_ALIASES.update({"temporal": "temporal-reasoning", "temporal reasoning": "temporal-reasoning"})
_SOURCE_ALIASES = {_key(a): s for s in QA_SOURCES for a in (s, s.replace("_", "-"), s.split("_")[0])}


def normalize_type(value: Any) -> str | None:
    return _TYPE_ALIASES.get(_key(value)) if isinstance(value, str) else None


def normalize_source(value: Any) -> str | None:
    return _SOURCE_ALIASES.get(_key(value)) if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return " ".join(value.split())
    return None


def complete_item(item: Any) -> tuple[QAPair | None, str | None]:
    """(pair, None) for a complete item, else (None, why it was dropped)."""
    if not isinstance(item, dict):
        return None, "not an object"
    question, answer = _text(item.get("question")), _text(item.get("answer"))
    if question is None:
        return None, "no question"
    if answer is None:
        return None, "no answer"
    qtype = normalize_type(item.get("type"))
    if qtype is None:
        return None, f"unknown type {item.get('type')!r}"
    source = normalize_source(item.get("source"))
    if source is None:
        return None, f"unknown source {item.get('source')!r}"
    return QAPair(question, answer, qtype, source), None


@dataclass
class QAParse:
    pairs: list[QAPair]
    rejected: list[str] = field(default_factory=list)


def parse_qa(raw: str | dict, n: int) -> QAParse:
    """The complete, distinct items of an output (at most n, in order), and why the others were dropped.

    Raises QAValidationError when the output has no `questions` list at all."""
    if isinstance(raw, str):
        try:
            obj = extract_json(raw)
        except ValueError as exc:
            raise QAValidationError(str(exc)) from None
    else:
        obj = raw
    items = obj.get("questions") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise QAValidationError("output has no 'questions' list")
    pairs: list[QAPair] = []
    rejected: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        pair, why = complete_item(item)
        if pair is None:
            rejected.append(f"questions[{i}]: {why}")
        elif _key(pair.question) in seen:
            rejected.append(f"questions[{i}]: duplicate question")
        elif len(pairs) >= n:
            rejected.append(f"questions[{i}]: beyond the {n} asked for")
        else:
            seen.add(_key(pair.question))
            pairs.append(pair)
    return QAParse(pairs, rejected)


def validate_qa(raw: str | dict, n: int, min_complete: int | None = None) -> list[QAPair]:
    """The pairs of an output that holds at least `min_complete` (default n) complete items; else QAValidationError
    (which makes `LLMClient.chat_json` ask again)."""
    parsed = parse_qa(raw, n)
    need = n if min_complete is None else min_complete
    if len(parsed.pairs) < need:
        why = "; ".join(parsed.rejected[:3])
        raise QAValidationError(f"{len(parsed.pairs)} complete question(s), {need} needed" + (f" ({why})" if why else ""))
    return parsed.pairs


def mix_warnings(pairs: list[QAPair], n: int, has_history: bool = True) -> list[str]:
    """Where the type mix departs from the asked-for ranges (reported, not rejected: the session may not allow it)."""
    counts = {t: sum(p.type == t for p in pairs) for t in QA_TYPES}
    out = []
    for t, (lo, hi) in prompts.qa_type_mix(n).items():
        if t == "multi-session" and not has_history:
            continue
        if not lo <= counts[t] <= hi:
            out.append(f"{counts[t]} {t} question(s), {lo}-{hi} asked for")
    return out


@dataclass
class QAResult:
    pairs: list[QAPair]
    raw_output: str | None
    model: str
    error: str | None = None
    rejected: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return bool(self.pairs)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [p.to_dict() for p in self.pairs]
        return d


async def generate_session_qa(client: LLMClient, *, core: str, entries: list[tuple[str, str]], session_text: str,
                              session_time: str | None, n: int = config.QA_PER_SESSION) -> QAResult:
    """n questions for one session. An output with fewer complete items is asked again (with the client's retries);
    when retries are spent, whatever complete items the last output held are kept and the shortfall is noted."""
    prompt = prompts.qa_generation_prompt(core, entries, session_text, session_time, n)
    has_history = bool(core.strip() or entries)
    t0 = time.perf_counter()
    try:
        pairs, res = await client.chat_json(prompt, lambda text: validate_qa(text, n))
    except LLMCallError as exc:
        salvaged = QAParse([])
        if exc.last_output:
            try:
                salvaged = parse_qa(exc.last_output, n)
            except QAValidationError:
                pass
        result = QAResult(salvaged.pairs, exc.last_output, client.model, rejected=salvaged.rejected,
                          latency_s=time.perf_counter() - t0, attempts=exc.attempts)
        if salvaged.pairs:
            result.warnings.append(f"kept {len(salvaged.pairs)} of {n} questions after retries ({exc.reason})")
            result.warnings += mix_warnings(salvaged.pairs, n, has_history)
        else:
            result.error = exc.reason
        return result
    parsed = parse_qa(res.text, n)
    return QAResult(pairs, res.text, res.model, rejected=parsed.rejected, warnings=mix_warnings(pairs, n, has_history),
                    latency_s=res.latency_s, prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
                    attempts=res.attempts)


# --------------------------------------------------------------------------- client

def qa_client(provider: str, model: str, base_url: str | None, api_key: str | None, max_in_flight: int, *,
              timeout_s: float = config.DEFAULT_REQUEST_TIMEOUT_S, max_tokens: int | None = None) -> LLMClient:
    # QA generation needs no embeddings: the embedding settings stay at their defaults and are never used.
    return LLMClient(ClientSettings(provider=provider, model=model, base_url=base_url, api_key=api_key,
                                    embedding_provider="offline", max_in_flight=max(1, max_in_flight),
                                    timeout_s=timeout_s, max_tokens_by_task={"qa": max_tokens} if max_tokens else None))
