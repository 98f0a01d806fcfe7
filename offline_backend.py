"""The `offline` provider's handlers: a deterministic baseline that runs the whole pipeline in process.

A rule-based builder (one episodic entry per non-assistant message, pattern-matched semantic facts and profile
lines, numbered lists as procedures), an extractive answerer (the best-overlapping memory sentence) and a lexical
judge. It is a smoke path and a floor to compare against, never an LLM result: every run it takes part in is
labelled a baseline. Handlers read the prompt's structured `inputs` and return what an agent would emit.
"""
from __future__ import annotations

import json
import re
from datetime import datetime

from typing import Callable

import config
import prompts

OfflineHandler = Callable[[dict], str]
OFFLINE_HANDLERS: dict[str, OfflineHandler] = {}


def register_offline_handler(task: str) -> Callable[[OfflineHandler], OfflineHandler]:
    def deco(fn: OfflineHandler) -> OfflineHandler:
        OFFLINE_HANDLERS[task] = fn
        return fn
    return deco


def offline_respond(prompt) -> str:
    """The offline reply to a `prompts.Prompt`, from its task's handler and structured inputs (KeyError: no handler)."""
    return OFFLINE_HANDLERS[prompt.task](prompt.inputs)

_STOP = set("""a an the and or but if then of to in on at for with by from as is are was were be been being am i me my
mine you your yours we our us he him his she her they them their it its this that these those what which who whom whose
when where why how do does did done have has had having will would could should can may might must shall not no yes so
too very just also about into over after before than there here up down out off again once only own same some any all
both each few more most other such nor s t don now d ll m o re ve y ain""".split())
_WORD = re.compile(r"[a-z0-9]+")
_UNAVAILABLE = re.compile(r"not answerable|no information|not (?:mentioned|available|specified|stated|known)|"
                          r"cannot be answered|can't be answered|unknown|don't know|do not know", re.IGNORECASE)


def _stem(w: str) -> str:
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def content_tokens(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP]


# --------------------------------------------------------------------------- dates

_DATE_FORMATS = ("%Y/%m/%d (%a) %H:%M", "%Y/%m/%d %H:%M", "%Y/%m/%d", "%Y-%m-%d %H:%M", "%Y-%m-%d",
                 "%I:%M %p on %d %B, %Y", "%I:%M %p on %d %b, %Y", "%d %B, %Y", "%d %B %Y", "%B %d, %Y",
                 "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S")


def normalize_date(raw: str | None) -> str | None:
    """A dataset timestamp as 'YYYY-MM-DD' (or 'YYYY-MM-DD HH:MM' when the time is given); None if unparseable."""
    if not raw:
        return None
    s = re.sub(r"\s+", " ", raw.strip())
    for fmt in _DATE_FORMATS:
        try:
            dt = datetime.strptime(s, fmt)
        except ValueError:
            continue
        return dt.strftime("%Y-%m-%d %H:%M") if "%H" in fmt or "%I" in fmt else dt.strftime("%Y-%m-%d")
    m = re.search(r"(\d{4})[-/](\d{1,2})[-/](\d{1,2})", s)
    if m:
        return f"{int(m.group(1)):04d}-{int(m.group(2)):02d}-{int(m.group(3)):02d}"
    return None


# --------------------------------------------------------------------------- session parsing

_LINE = re.compile(r"^(\w+):\s?(.*)$")
_SPEAKER = re.compile(r"^([A-Z][\w'.-]*(?: [A-Z][\w'.-]*)?): (.+)$", re.DOTALL)  # messages may span lines
_SENT = re.compile(r"(?<=[.!?])\s+")


def _messages(session_text: str) -> list[tuple[str, str]]:
    out = []
    for line in session_text.splitlines():
        m = _LINE.match(line.strip())
        if m:
            out.append((m.group(1).lower(), m.group(2).replace(" / ", "\n").strip()))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line.strip())
    return out


def _speaker_and_text(role: str, content: str) -> tuple[str, str]:
    m = _SPEAKER.match(content)
    if m:
        return m.group(1), m.group(2)
    return ("User" if role == "user" else role.capitalize()), content


def _clip(text: str, n: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(re.sub(r"\s+", " ", text)) if s.strip()]


def _speaking_messages(session_text: str) -> list[tuple[str, str]]:
    """(speaker, text) for the people in the conversation: the assistant's replies are not the user's memories."""
    msgs = _messages(session_text)
    people = [(r, c) for r, c in msgs if r != "assistant"]
    return [_speaker_and_text(r, c) for r, c in (people or msgs)]


# --------------------------------------------------------------------------- builder

_PROFILE = re.compile(r"\b(?:i am|i'm|my name is|i live|i work|i moved|i grew up|i was born|i have been|i've been|"
                      r"i love|i prefer|i enjoy|my (?:wife|husband|partner|son|daughter|kids|mom|dad|job|goal|dream))\b",
                      re.IGNORECASE)
_FACT = re.compile(r"\bmy ([a-z]+(?: [a-z]+)?) (?:is|are|was|were|'s)\b|\bi (have|own|adopted|bought|play|started|"
                   r"joined|love|like|prefer|enjoy|work|study|volunteer)\b", re.IGNORECASE)


@register_offline_handler("agent.core")
def core_agent(inputs: dict) -> str:
    core = inputs.get("core") or ""
    lines = []
    for speaker, text in _speaking_messages(inputs.get("session_text", "")):
        for s in _sentences(text):
            if _PROFILE.search(s) and len(s) <= 200:
                line = f"{speaker}: {_clip(s, 140)}"
                if line not in core and line not in lines:
                    lines.append(line)
    if float(inputs.get("usage_pct", 0.0)) >= 100 * config.CORE_MEMORY_REWRITE_THRESHOLD:
        kept = [ln for ln in dict.fromkeys(core.splitlines()) if ln.strip()]
        budget = int(config.CORE_MEMORY_CHAR_LIMIT * 0.6)
        content, total = [], 0
        for ln in reversed(kept + lines[:2]):  # the newest facts first: they supersede older ones
            if total + len(ln) + 1 > budget:
                break
            content.append(ln)
            total += len(ln) + 1
        return json.dumps({"operation": "REWRITE", "content": "\n".join(reversed(content)) or "(no profile facts)"})
    if not lines:
        msgs = _speaking_messages(inputs.get("session_text", ""))
        speaker = msgs[0][0] if msgs else "User"
        lines = [f"{speaker} took part in a conversation."] if f"{speaker} took part" not in core else []
        if not lines:
            first = _sentences(msgs[0][1])[0] if msgs and msgs[0][1] else "conversation"
            lines = [f"{speaker}: {_clip(first, 120)}"]
    return json.dumps({"operation": "APPEND", "content": "\n".join(lines[:3])})


@register_offline_handler("agent.episodic")
def episodic_agent(inputs: dict) -> str:
    date = normalize_date(inputs.get("session_time")) or (inputs.get("session_time") or "unknown date")
    day = date.split(" ")[0]
    ops = []
    for speaker, text in _speaking_messages(inputs.get("session_text", "")):
        if not text.strip():
            continue
        summary = _clip(_sentences(text)[0] if _sentences(text) else text, 160)
        ops.append({"action": "ADD", "memory": f"{day}: {speaker} said: {summary} | Details: session of {date}; "
                                             f"{speaker}: {_clip(text, 500)}"})
    return json.dumps({"operations": ops})


@register_offline_handler("agent.semantic")
def semantic_agent(inputs: dict) -> str:
    existing = {e.split(":", 1)[0].strip().lower(): e for e in inputs.get("existing") or []}
    ops, seen = [], set()
    for speaker, text in _speaking_messages(inputs.get("session_text", "")):
        for s in _sentences(text):
            m = _FACT.search(s)
            if not m or len(s) > 240:
                continue
            topic = (m.group(1) or m.group(2)).lower()
            head = f"{speaker} - {topic.capitalize()}"
            if head.lower() in seen:
                continue
            seen.add(head.lower())
            entry = f"{head}: {_clip(s, 200)} | Details: stated by {speaker}"
            old = existing.get(head.lower())
            if old and old != entry:
                ops.append({"action": "UPDATE", "old_memory": old, "new_memory": entry})
            elif not old:
                ops.append({"action": "ADD", "memory": entry})
            if len(ops) >= 6:
                return json.dumps({"operations": ops})
    return json.dumps({"operations": ops})


_STEP = re.compile(r"^\s*(?:\d+[.)]|step \d+[:.])\s*(.+)$", re.IGNORECASE)


@register_offline_handler("agent.procedural")
def procedural_agent(inputs: dict) -> str:
    ops = []
    for speaker, text in _speaking_messages(inputs.get("session_text", "")):
        lines = text.splitlines()
        steps = [m.group(1).strip() for m in (_STEP.match(ln) for ln in lines) if m]
        if len(steps) >= 3:
            title = _clip(next((ln for ln in lines if ln.strip() and not _STEP.match(ln)), "Procedure"), 100)
            body = " ".join(f"{i}. {_clip(s, 80)}" for i, s in enumerate(steps[:8], 1))
            ops.append({"action": "ADD", "memory": f"{title} | Steps: {body} | Context: described by {speaker}"})
    return json.dumps({"operations": ops[:2]})


@register_offline_handler("core.compress")
def compress_core(inputs: dict) -> str:
    target = int(inputs.get("target_chars") or config.CORE_MEMORY_COMPRESS_TARGET)
    kept, total = [], 0
    for ln in dict.fromkeys(l.strip() for l in (inputs.get("core") or "").splitlines()):
        if ln and total + len(ln) + 1 <= target:
            kept.append(ln)
            total += len(ln) + 1
    return json.dumps({"content": "\n".join(kept) or (inputs.get("core") or "")[:target]})


# --------------------------------------------------------------------------- answerer and judge

_DATE_HEAD = re.compile(r"^(\d{4}-\d{2}(?:-\d{2})?(?: \d{2}:\d{2})?):")


@register_offline_handler("answer")
def extractive_answer(inputs: dict) -> str:
    question = inputs.get("question", "")
    q = set(content_tokens(question))
    if not q:
        return "Not answerable"
    candidates: list[tuple[float, str, str | None]] = []
    for rank, (etype, text) in enumerate(inputs.get("entries") or []):
        date = _DATE_HEAD.match(text)
        body = text.split("| Details:", 1)
        for part in body:
            for s in _sentences(part):
                toks = set(content_tokens(s))
                overlap = len(q & toks)
                if overlap:
                    candidates.append((overlap - 0.01 * rank, s, date.group(1) if date else None))
    for s in (inputs.get("core") or "").splitlines():
        overlap = len(q & set(content_tokens(s)))
        if overlap:
            candidates.append((overlap - 0.05, s, None))
    if not candidates:
        return "Not answerable"
    # Every candidate shares at least one content word with the question; the rank term only breaks ties.
    score, sentence, date = max(candidates, key=lambda c: c[0])
    # Abstain when the best memory covers less than a third of the question's content words: the question is
    # most likely about something never said (LoCoMo's adversarial questions, LongMemEval's _abs ones).
    if round(score) < len(q) / 3:
        return "Not answerable"
    if question.strip().lower().startswith("when") and date:
        return date
    return _clip(re.sub(r"^\d{4}-\d{2}(?:-\d{2})?(?: \d{2}:\d{2})?:\s*", "", sentence), 200)


def lexical_verdict(answer: str, gold: str, *, abstention: bool = False) -> str:
    gold_unanswerable = abstention or bool(re.fullmatch(r"\s*not answerable\.?\s*", gold or "", re.IGNORECASE))
    says_unavailable = bool(_UNAVAILABLE.search(answer or ""))
    if gold_unanswerable:
        return "CORRECT" if says_unavailable else "WRONG"
    if says_unavailable:
        return "WRONG"
    g = set(content_tokens(str(gold)))
    a = set(content_tokens(answer or ""))
    if not g:
        return "CORRECT" if (gold or "").strip().lower() in (answer or "").lower() else "WRONG"
    return "CORRECT" if len(g & a) / len(g) >= 0.5 else "WRONG"


@register_offline_handler("judge.paper")
def judge_paper(inputs: dict) -> str:
    return json.dumps({"label": lexical_verdict(inputs.get("answer", ""), str(inputs.get("gold", "")))})


@register_offline_handler("judge.longmemeval")
def judge_longmemeval(inputs: dict) -> str:
    return json.dumps({"label": lexical_verdict(inputs.get("answer", ""), str(inputs.get("gold", "")),
                                                abstention=bool(inputs.get("abstention")))})


# --------------------------------------------------------------------------- synthetic session QA

@register_offline_handler(prompts.TASK_QA_GENERATE)
def offline_qa(inputs: dict) -> str:
    """Deterministic template questions from the session's own sentences (a smoke path, never an LLM result)."""
    n = int(inputs.get("n_questions") or config.QA_PER_SESSION)
    mix = prompts.qa_type_mix(n)
    raw_time = inputs.get("session_time")
    date = (normalize_date(raw_time) or raw_time or "the day of our conversation").split(" ")[0]
    msgs = _speaking_messages(inputs.get("session_text", ""))
    cands = [s for _, text in msgs for s in _sentences(text) if len(content_tokens(s)) >= 3 and len(s) <= 400]
    if not cands:
        cands = [s for _, text in msgs for s in _sentences(text) if content_tokens(s)]
    entries = [tuple(e) for e in inputs.get("entries") or []]

    def keywords(sentence: str, k: int = 4) -> str:
        words, seen = [], set()
        for w in re.findall(r"[A-Za-z][A-Za-z0-9'-]*", sentence):  # list numbers ("2.") are no keywords
            t = content_tokens(w)
            if t and t[0] not in seen:
                seen.add(t[0])
                words.append(w)
            if len(words) == k:
                break
        return " ".join(words) or _clip(sentence, 40)

    n_temporal = mix["temporal-reasoning"][0]
    n_multi = mix["multi-session"][0] if entries else 0
    kinds = ["single-session"] * max(0, n - n_temporal - n_multi) + ["multi-session"] * n_multi
    kinds += ["temporal-reasoning"] * n_temporal
    questions = []
    for j, kind in enumerate(kinds):
        if not cands:
            break
        sent = cands[(j * len(cands)) // len(kinds)]
        kw = keywords(sent)
        if kind == "temporal-reasoning":
            questions.append({"question": f"On what date did I talk about {kw}?", "answer": date,
                              "type": kind, "source": "current_session"})
        elif kind == "multi-session":
            sent_toks = set(content_tokens(sent))
            etype, etext = max(reversed(entries), key=lambda e: len(sent_toks & set(content_tokens(e[1]))))
            head = _clip(etext.split("| Details:", 1)[0], 160)
            questions.append({"question": f"What had I told you before about {keywords(head)}, and what did I say "
                                          f"on {date} about {kw}?",
                              "answer": f"{head}; {_clip(sent, 200)}", "type": kind, "source": "cross_session"})
        else:
            form = ("In our conversation on {d}, what did I say about {k}?", "What did I mention on {d} about {k}?",
                    "What did I tell you about {k} on {d}?")[j % 3]
            questions.append({"question": form.format(d=date, k=kw), "answer": _clip(sent, 200), "type": kind,
                              "source": "current_session"})
    return json.dumps({"questions": questions}, ensure_ascii=False)
