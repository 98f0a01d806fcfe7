"""The `offline` provider's handlers: a deterministic baseline that runs the whole pipeline in process.

A rule-based builder (one episodic entry per non-assistant message, pattern-matched semantic facts and profile
lines, numbered lists as procedures), an extractive answerer (the best-overlapping memory sentence) and a lexical
judge. It is a smoke path and a floor to compare against, never an LLM result: every run it takes part in is
labelled a baseline. Handlers read the prompt's structured `inputs` and return what an agent would emit.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

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


# Dates in judged text. A date answer is CORRECT only at the gold's own precision: gold "June 2023" accepts any day of
# June 2023 and rejects 2023-07-20; gold "7 May 2023" rejects the coarser "May 2023"; gold "The week before 9 June
# 2023" stands for 2-8 June, so the anchor day itself is WRONG.
_MONTHS = {"january": 1, "jan": 1, "february": 2, "feb": 2, "march": 3, "mar": 3, "april": 4, "apr": 4, "may": 5,
           "june": 6, "jun": 6, "july": 7, "jul": 7, "august": 8, "aug": 8, "september": 9, "sept": 9, "sep": 9,
           "october": 10, "oct": 10, "november": 11, "nov": 11, "december": 12, "dec": 12}
_WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
           "nine": 9, "ten": 10, "a couple of": 2, "couple of": 2}
_MON = "(?:" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_ORD = r"(?:st|nd|rd|th)?"
_DATE_RE = re.compile(
    r"\b(?:(?:(?P<n>\d{1,2}|a couple of|couple of|an?|one|two|three|four|five|six|seven|eight|nine|ten)\s+)?"
    r"(?P<unit>days?|weeks?|weekends?|months?|years?|" + "|".join(f"{d}s?" for d in _WEEKDAYS) + r")\s+"
    r"(?P<rel>before|after|of|prior to)\s+)?"
    r"(?:(?P<iy>\d{4})[-/](?P<im>\d{1,2})(?:[-/](?P<id>\d{1,2}))?"
    rf"|(?P<dd>\d{{1,2}}){_ORD}(?:\s+of)?\s+(?P<dm>{_MON})(?:,?\s+(?P<dy>\d{{4}}))?"
    rf"|(?P<mm>{_MON})\s+(?P<md>\d{{1,2}}){_ORD}(?:,?\s+(?P<my>\d{{4}}))?"
    rf"|(?P<ym>{_MON}),?\s+(?:of\s+)?(?P<yy>\d{{4}})"
    r"|(?P<y>(?:19|20)\d{2}))\b")
# Words around a date that carry no content of their own ("since 2016", "in early June 2023").
_DATE_FILLER = {_stem(w) for w in ("since", "around", "about", "approximately", "roughly", "early", "late", "mid",
                                     "middle", "sometime", "during", "date", "day", "month", "year", "week", "weekend")}
_MAX_DATE_SCAN = 4000  # judged texts are short; the cap bounds the scan on a pathological answer
_NO_YEAR = 2000  # a leap year stands in for a date written without its year


@dataclass(frozen=True)
class DateSpan:
    """The days a date expression denotes, [lo, hi]; a date written without its year has year_known False."""
    lo: date
    hi: date
    year_known: bool = True


def _month_end(y: int, m: int) -> date:
    return (date(y + (m == 12), m % 12 + 1, 1) - timedelta(days=1))


def _absolute(g: dict) -> tuple[DateSpan, str] | None:
    """The span of the date part of a match and its precision ("day", "month" or "year"); None when invalid."""
    try:
        if g["iy"]:
            y, m = int(g["iy"]), int(g["im"])
            if g["id"]:
                d = date(y, m, int(g["id"]))
                return DateSpan(d, d), "day"
            return DateSpan(date(y, m, 1), _month_end(y, m)), "month"
        if g["dd"] or g["md"]:
            day, mon, yr = (g["dd"], g["dm"], g["dy"]) if g["dd"] else (g["md"], g["mm"], g["my"])
            y, m = (int(yr) if yr else _NO_YEAR), _MONTHS[mon.rstrip(".")]
            d = date(y, m, int(day))
            return DateSpan(d, d, year_known=bool(yr)), "day"
        if g["ym"]:
            y, m = int(g["yy"]), _MONTHS[g["ym"].rstrip(".")]
            return DateSpan(date(y, m, 1), _month_end(y, m)), "month"
        y = int(g["y"])
        return DateSpan(date(y, 1, 1), date(y, 12, 31)), "year"
    except ValueError:  # month 13, 31 February, ...
        return None


def _shift_months(d: date, n: int) -> tuple[int, int]:
    k = d.year * 12 + d.month - 1 + n
    return k // 12, k % 12 + 1


def _relative(anchor: DateSpan, precision: str, unit: str, rel: str, n: int) -> DateSpan | None:
    """The span of '<n> <unit> before|after|of <anchor>'; None when the anchor is too coarse to resolve it."""
    unit = unit[:-1] if unit.endswith("s") else unit
    rel = "before" if rel == "prior to" else rel
    sign = -1 if rel == "before" else 1
    if unit == "year":
        y = anchor.lo.year + (0 if rel == "of" else sign * n)
        return DateSpan(date(y, 1, 1), date(y, 12, 31), anchor.year_known)
    if unit == "month":
        if precision == "year":
            return None
        y, m = _shift_months(anchor.lo, 0 if rel == "of" else sign * n)
        return DateSpan(date(y, m, 1), _month_end(y, m), anchor.year_known)
    if precision != "day" or not anchor.year_known:  # weekdays need the real year
        return None
    d = anchor.lo
    if unit == "day":
        day = d if rel == "of" else d + timedelta(days=sign * n)
        return DateSpan(day, day)
    if unit == "week":
        if rel == "of":
            monday = d - timedelta(days=d.weekday())
            return DateSpan(monday, monday + timedelta(days=6))
        if rel == "before":
            return DateSpan(d - timedelta(days=7 * n), d - timedelta(days=7 * n - 6))
        return DateSpan(d + timedelta(days=7 * n - 6), d + timedelta(days=7 * n))
    if unit == "weekend":
        if rel == "of":
            sat = d - timedelta(days=d.weekday()) + timedelta(days=5)
        elif rel == "before":
            sun = d - timedelta(days=(d.weekday() - 6) % 7 or 7) - timedelta(days=7 * (n - 1))
            sat = sun - timedelta(days=1)
        else:
            sat = d + timedelta(days=(5 - d.weekday()) % 7 or 7) + timedelta(days=7 * (n - 1))
        return DateSpan(sat, sat + timedelta(days=1))
    wd = _WEEKDAYS.index(unit)
    if rel == "of":
        day = d - timedelta(days=d.weekday() - wd)
    elif rel == "before":
        day = d - timedelta(days=(d.weekday() - wd) % 7 or 7) - timedelta(days=7 * (n - 1))
    else:
        day = d + timedelta(days=(wd - d.weekday()) % 7 or 7) + timedelta(days=7 * (n - 1))
    return DateSpan(day, day)


def date_expressions(text: str) -> tuple[list[DateSpan | None], str]:
    """Every date expression of `text` as a span (None: a relative date that cannot be resolved), and the text
    with those expressions cut out."""
    low = (text or "")[:_MAX_DATE_SCAN].lower()
    spans: list[DateSpan | None] = []
    rest, last = [], 0
    for m in _DATE_RE.finditer(low):
        g = m.groupdict()
        absolute = _absolute(g)
        if absolute is None:
            continue
        span, precision = absolute
        if g["unit"]:
            n = int(g["n"]) if g["n"] and g["n"].isdigit() else _COUNTS.get(g["n"] or "a", 1)
            try:
                span = _relative(span, precision, g["unit"], g["rel"], n)
            except (ValueError, OverflowError):  # shifted past year 1 or 9999
                span = None
        spans.append(span)
        rest.append(low[last:m.start()])
        last = m.end()
    rest.append(low[last:])
    return spans, " ".join(rest)


def date_within(answer: DateSpan, gold: DateSpan) -> bool:
    """True when every day the answer names lies inside the gold's span (so the answer is at least as precise)."""
    if gold.year_known:
        return answer.year_known and gold.lo <= answer.lo and answer.hi <= gold.hi
    if answer.lo.year != answer.hi.year:  # a year-less gold ("13 August") compares month and day only
        return False
    key = lambda d: (d.month, d.day)  # noqa: E731
    return key(gold.lo) <= key(answer.lo) and key(answer.hi) <= key(gold.hi)


def _token_verdict(answer: str, gold: str) -> str:
    g = set(content_tokens(str(gold)))
    a = set(content_tokens(answer or ""))
    if not g:
        return "CORRECT" if (gold or "").strip().lower() in (answer or "").lower() else "WRONG"
    return "CORRECT" if len(g & a) / len(g) >= 0.5 else "WRONG"


def _gives_answer(answer: str, expected: str) -> bool:
    """The answer gives `expected`: for a yes/no answer its first word must be that word; otherwise tokens overlap."""
    polar = expected.strip().strip(".!").lower()
    if polar in ("yes", "no"):
        words = _WORD.findall((answer or "").lower())
        return bool(words) and words[0] == polar
    return _token_verdict(answer, expected) == "CORRECT"


def lexical_verdict(answer: str, gold: str, *, abstention: bool = False, also_correct: str | None = None) -> str:
    """CORRECT/WRONG by rule: abstention for an unanswerable gold (or the dataset's own answer `also_correct`), the
    gold's dates at the gold's precision, then at least half the gold's remaining content words."""
    gold_unanswerable = abstention or bool(re.fullmatch(r"\s*not answerable\.?\s*", gold or "", re.IGNORECASE))
    says_unavailable = bool(_UNAVAILABLE.search(answer or ""))
    if gold_unanswerable:
        if says_unavailable or (also_correct and _gives_answer(answer, also_correct)):
            return "CORRECT"
        return "WRONG"
    if says_unavailable:
        return "WRONG"
    gold_dates, gold_rest = date_expressions(str(gold))
    if not gold_dates or None in gold_dates:
        return _token_verdict(answer, gold)
    answer_dates, _ = date_expressions(answer or "")
    if not all(any(a is not None and date_within(a, g) for a in answer_dates) for g in gold_dates):
        return "WRONG"
    rest = [t for t in content_tokens(gold_rest) if t not in _DATE_FILLER]
    return _token_verdict(answer, " ".join(rest)) if rest else "CORRECT"


@register_offline_handler("judge.paper")
def judge_paper(inputs: dict) -> str:
    return json.dumps({"label": lexical_verdict(inputs.get("answer", ""), str(inputs.get("gold", "")),
                                                abstention=bool(inputs.get("abstention")),
                                                also_correct=inputs.get("also_correct"))})


@register_offline_handler("judge.longmemeval")
def judge_longmemeval(inputs: dict) -> str:
    label = lexical_verdict(inputs.get("answer", ""), str(inputs.get("gold", "")),
                            abstention=bool(inputs.get("abstention")))
    # Reply in the form the prompt asks for, as an LLM judge would: LongMemEval's own yes/no, or the JSON label.
    if inputs.get("reply") == "json":
        return json.dumps({"label": label})
    return "yes" if label == "CORRECT" else "no"


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
