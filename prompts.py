"""Prompt builders: pure functions from structured inputs to chat messages.

Each builder returns a `Prompt` that names its task; the LLM client keys usage, caching and the offline
backend on that name, and the offline backend works from `inputs`, never from the rendered text.
The wording is this project's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import config

AGENT_TASKS = {
    "core": "agent.core",
    "episodic": "agent.episodic",
    "semantic": "agent.semantic",
    "procedural": "agent.procedural",
}
TASK_CORE_COMPRESS = "core.compress"
TASK_ANSWER = "answer"
TASK_JUDGE_PAPER = "judge.paper"
TASK_JUDGE_LONGMEMEVAL = "judge.longmemeval"
TASK_QA_GENERATE = "qa.generate"

TYPE_TAGS = {"episodic": "[EPISODIC]", "semantic": "[SEMANTIC]", "procedural": "[PROCEDURAL]"}


@dataclass
class Prompt:
    task: str
    messages: list[dict]
    inputs: dict = field(default_factory=dict)


def _msgs(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip()}]


def _numbered(texts: list[str]) -> str:
    if not texts:
        return "(none yet)"
    return "\n".join(f"{i}. {t}" for i, t in enumerate(texts, 1))


# --------------------------------------------------------------------------- memory-building agents

_COMMON_RULES = """
Reply with one JSON object and nothing else: no prose, no code fences.
Write memories in English, in the third person where a name is known, and keep names, numbers, places and dates exact.
Only record what the conversation supports; never invent details.
"""

_CORE_SYSTEM = """
You maintain the CORE MEMORY of a long-term assistant: one short text block describing the user that is shown
with every future question. It keeps only durable facts: identity and name, occupation and role, where they live,
personality, stable preferences and values, important relationships, long-term goals, habits and milestones.
Passing events, one-off plans and small talk do not belong here (other memories keep those).

Choose exactly ONE operation for this session:
- APPEND: add new durable facts as a new line. Use it while the block is under 90% of its limit.
  {"operation": "APPEND", "content": "<the new line(s)>"}
- REPLACE: correct a fact that this session shows is outdated. old_text must be copied exactly from the block.
  {"operation": "REPLACE", "old_text": "<exact text in the block>", "new_text": "<corrected text>"}
- REWRITE: rewrite the whole block, keeping every durable fact in a compact, organised form. Use it when the block
  is over 90% full or badly organised.
  {"operation": "REWRITE", "content": "<the complete new block>"}
If the session holds nothing durable, APPEND a brief line with the most useful stable detail it does contain.
Keep what you write short: a line or two for APPEND and REPLACE.
""" + _COMMON_RULES

_EPISODIC_SYSTEM = """
You maintain the EPISODIC MEMORY of a long-term assistant: time-anchored events from the user's life and
conversations, one event per entry. Each entry has the form
  "<absolute date>: <one-sentence summary> | Details: <the original time phrase, how the date was worked out, and the useful details>"
where <absolute date> is YYYY-MM-DD (add HH:MM when known), or YYYY-MM or YYYY when that is all that is known.
Convert every relative time ("yesterday", "last Friday", "two weeks ago", "next month") into an absolute date using
the session time, and say in Details how you computed it. Events without any time take the session date.

Operations (return a list; an empty list is a valid answer when nothing new happened):
- ADD a new event: {"action": "ADD", "memory": "<entry>"}
- UPDATE an existing entry with new or corrected information (the old entry is kept for history; copy it exactly):
  {"action": "UPDATE", "old_memory": "<existing entry, verbatim>", "new_memory": "<updated entry>"}
- MERGE several existing entries that describe one event (the old entries are kept for history; copy them exactly):
  {"action": "MERGE", "old_memories": ["<entry>", "<entry>"], "new_memory": "<merged entry>"}
Output: {"operations": [ ... ]}
""" + _COMMON_RULES

_SEMANTIC_SYSTEM = """
You maintain the SEMANTIC MEMORY of a long-term assistant: lasting knowledge about the people, pets, places,
work, hobbies, possessions and topics in the user's life. One entry per fine-grained topic, in the form
  "<Name - Topic>: <summary> | Details: <specifics>"
for example "Alex - Dog": "Alex - Dog: has a beagle named Pepper | Details: adopted from a shelter; Pepper is 3 years old".
General knowledge that anyone would know is not personal memory: SKIP it.

Operations (return a list; an empty list is a valid answer):
- ADD new knowledge: {"action": "ADD", "memory": "<entry>"}
- UPDATE an entry whose facts changed or grew (the old entry is kept for history; copy it exactly):
  {"action": "UPDATE", "old_memory": "<existing entry, verbatim>", "new_memory": "<updated entry>"}
- SKIP something not worth storing: {"action": "SKIP", "reason": "<why>"}
Output: {"operations": [ ... ]}
""" + _COMMON_RULES

_PROCEDURAL_SYSTEM = """
You maintain the PROCEDURAL MEMORY of a long-term assistant: step-by-step processes, methods and routines that the
user follows or worked out in the conversation (a recipe, a workout routine, a setup procedure). Entry form:
  "<what the procedure achieves> | Steps: 1. ... 2. ... 3. ... | Context: <when or why it is used>"
Most sessions contain no procedure: then the right answer is an empty list.

Operations:
- ADD a new procedure: {"action": "ADD", "memory": "<entry>"}
- UPDATE a stored procedure that changed (the old entry is kept for history; copy it exactly):
  {"action": "UPDATE", "old_memory": "<existing entry, verbatim>", "new_memory": "<updated entry>"}
Output: {"operations": [ ... ]}
""" + _COMMON_RULES


def _session_block(session_text: str, session_time: str | None, with_time: bool) -> str:
    head = f"Session time: {session_time or 'unknown'}\n" if with_time else ""
    return f"{head}Conversation of this session (one message per line):\n{session_text}"


def core_agent_prompt(core: str, session_text: str, char_limit: int = config.CORE_MEMORY_CHAR_LIMIT) -> Prompt:
    usage = 100.0 * len(core) / char_limit if char_limit else 0.0
    user = (
        f"Current core memory ({len(core)} of {char_limit} characters, {usage:.1f}% full):\n"
        f"{core if core.strip() else '(empty)'}\n\n"
        f"{_session_block(session_text, None, with_time=False)}\n\n"
        "Return the single operation as JSON."
    )
    return Prompt(AGENT_TASKS["core"], _msgs(_CORE_SYSTEM, user),
                  {"core": core, "session_text": session_text, "usage_pct": round(usage, 1)})


def entry_agent_prompt(agent: str, existing: list[str], session_text: str, session_time: str | None) -> Prompt:
    system = {"episodic": _EPISODIC_SYSTEM, "semantic": _SEMANTIC_SYSTEM, "procedural": _PROCEDURAL_SYSTEM}[agent]
    with_time = agent == "episodic"
    user = (
        f"Existing {agent} memories most related to this session:\n{_numbered(existing)}\n\n"
        f"{_session_block(session_text, session_time, with_time=with_time)}\n\n"
        'Return {"operations": [...]} as JSON.'
    )
    inputs = {"existing": list(existing), "session_text": session_text}
    if with_time:
        inputs["session_time"] = session_time
    return Prompt(AGENT_TASKS[agent], _msgs(system, user), inputs)


def agent_prompt(agent: str, *, core: str, existing: list[str], session_text: str, session_time: str | None) -> Prompt:
    if agent == "core":
        return core_agent_prompt(core, session_text)
    return entry_agent_prompt(agent, existing, session_text, session_time)


def core_compress_prompt(core: str, target_chars: int = config.CORE_MEMORY_COMPRESS_TARGET) -> Prompt:
    system = f"""
You compress the core memory of a long-term assistant. Rewrite the block in at most about {target_chars} characters.
Keep, in this order of priority: identity (name, age, location, occupation), critical facts and relationships,
stable preferences and goals, then habits. Merge duplicates, drop passing details, keep names and dates exact.
Reply with JSON only: {{"content": "<the compressed block>"}}
"""
    user = f"Core memory to compress ({len(core)} characters):\n{core}"
    return Prompt(TASK_CORE_COMPRESS, _msgs(system, user), {"core": core, "target_chars": target_chars})


# --------------------------------------------------------------------------- answering

_ANSWER_SYSTEM = """
You answer questions about a user from their long-term memory: a core profile and memories retrieved for the
question. Rules:
- Answer factual questions only from the memories. Use the dates in them; work out durations and orders of events
  from those dates, relative to the current date when one is given.
- When memories contradict each other, trust the most recent one.
- For questions asking what would, could or is likely, reasonable inference from the memories is allowed.
- If the memories do not contain the answer, reply exactly: Not answerable
- Be concise: give the answer itself (a name, date, number or short phrase), not an explanation.
"""


def render_entry(entry_type: str, text: str) -> str:
    return f"{TYPE_TAGS.get(entry_type, '[' + entry_type.upper() + ']')} {text}"


def answer_prompt(question: str, core: str, entries: list[tuple[str, str]], current_time: str | None) -> Prompt:
    """entries: (type, text) pairs in retrieval order."""
    rendered = "\n".join(f"{i}. {render_entry(t, x)}" for i, (t, x) in enumerate(entries, 1)) or "(no memories retrieved)"
    user = (
        f"Core memory:\n{core if core.strip() else '(empty)'}\n\n"
        f"Retrieved memories:\n{rendered}\n\n"
        f"Current date: {current_time or 'unknown'}\n"
        f"Question: {question}\n"
        "Answer:"
    )
    return Prompt(TASK_ANSWER, _msgs(_ANSWER_SYSTEM, user),
                  {"question": question, "core": core, "entries": [list(e) for e in entries],
                   "current_time": current_time})


# --------------------------------------------------------------------------- judging

_JUDGE_PAPER_SYSTEM = """
You grade an answer produced by a memory system against a gold answer. Be generous:
- CORRECT when the answer refers to the same fact, topic or entity as the gold answer, even if it is longer, worded
  differently or only partly phrased the same way. Dates in any format that denote the same date are CORRECT.
- If the gold answer says the question is not answerable, any reply expressing that the information is not available
  is CORRECT; a specific answer is WRONG.
- If the gold answer is specific, a reply saying it is not answerable or unknown is WRONG.
- The right fact attributed to the wrong person is WRONG.
Reply with JSON only: {"label": "CORRECT"} or {"label": "WRONG"}
"""


def judge_paper_prompt(question: str, gold: str, answer: str, also_correct: str | None = None,
                       abstention: bool = False) -> Prompt:
    """`also_correct`: a second accepted answer (LoCoMo's two category-5 items whose own answer is "No").
    `abstention`: the question is unanswerable and `gold` only explains why (LongMemEval's `_abs` items)."""
    inputs = {"question": question, "gold": gold, "answer": answer}
    if abstention:
        user = f"Question: {question}\nGold answer: Not answerable ({gold})\n"
        inputs["abstention"] = True
    else:
        user = f"Question: {question}\nGold answer: {gold}\n"
    if also_correct:
        user += f"Also correct: {also_correct} (an answer that gives this is CORRECT as well)\n"
        inputs["also_correct"] = also_correct
    user += f"Answer to grade: {answer}"
    return Prompt(TASK_JUDGE_PAPER, _msgs(_JUDGE_PAPER_SYSTEM, user), inputs)


# LongMemEval's own judge (its authors' evaluate_qa.py) has one rule per question type; the wording here is ours.
_LME_STEPS = ("The response is correct when it contains the gold answer, is equivalent to it, or contains every "
              "intermediate step that leads to it. It is wrong when it gives only part of the information the gold "
              "answer requires, or a different answer.")
_LME_RULES = {
    "default": _LME_STEPS,
    "temporal-reasoning": _LME_STEPS + " Do not penalise an off-by-one error in a count of days, weeks or months "
                                       "(for example 19 days where the gold answer says 18): it is still correct.",
    "knowledge-update": "The user's information changed over time and the gold answer is the updated one. The "
                        "response is correct when it gives the updated answer, even if it also mentions earlier "
                        "information; it is wrong when it gives only an outdated or a different answer.",
    "single-session-preference": "The gold is a rubric that describes a good personalised response. The response is "
                                 "correct when it recalls the user's personal information and uses it correctly as "
                                 "the rubric asks; it need not cover every point of the rubric.",
    "abstention": "This question cannot be answered from the user's conversations; the explanation below says why "
                  "and is not an answer. The response is correct when it recognises that the question cannot be "
                  "answered: for example it says the information is incomplete or missing, or that related "
                  "information was given but not what was asked. It is wrong when it answers as if it knew.",
}
LME_REPLY_FORMS = ("yes_no", "json")


def longmemeval_rule(question_type: str, abstention: bool) -> str:
    return _LME_RULES["abstention"] if abstention else _LME_RULES.get(question_type, _LME_RULES["default"])


def judge_longmemeval_prompt(question: str, gold: str, answer: str, question_type: str, abstention: bool,
                             reply: str = "yes_no") -> Prompt:
    """LongMemEval's per-type judge. reply "yes_no": that judge's own form, one user message answered yes or no;
    "json": the same rules with a system message and a {"label": ...} reply."""
    if reply not in LME_REPLY_FORMS:
        raise ValueError(f"unknown reply form {reply!r} (choose {', '.join(LME_REPLY_FORMS)})")
    rule = longmemeval_rule(question_type, abstention)
    if abstention:
        gold_name = "Explanation (why it cannot be answered)"
    elif question_type == "single-session-preference":
        gold_name = "Rubric"
    else:
        gold_name = "Gold answer"
    case = f"Question: {question}\n{gold_name}: {gold}\nResponse: {answer}"
    inputs = {"question": question, "gold": gold, "answer": answer, "question_type": question_type,
              "abstention": abstention, "reply": reply}
    task = "You check a chat assistant's response to a question about the user's earlier conversations."
    if reply == "yes_no":
        user = f"{task}\n{rule}\n\n{case}\n\nIs the response correct? Reply with one word: yes or no."
        return Prompt(TASK_JUDGE_LONGMEMEVAL, [{"role": "user", "content": user}], inputs)
    system = (f"{task[:-1]} (LongMemEval, question type: {question_type}).\nRule: {rule}\n"
              'Reply with JSON only: {"label": "CORRECT"} or {"label": "WRONG"}')
    return Prompt(TASK_JUDGE_LONGMEMEVAL, _msgs(system, case), inputs)


# --------------------------------------------------------------------------- synthetic session QA

QA_TYPES = ("single-session", "multi-session", "temporal-reasoning")
QA_SOURCES = ("current_session", "cross_session")


def qa_type_mix(n: int) -> dict[str, tuple[int, int]]:
    """(min, max) questions per type for n questions: about 50 % single-session, 30 % multi-session, 20 % temporal.

    For n = 5: single-session 2-3, multi-session 1-2, temporal-reasoning 1 (PAPER §4).
    """
    if n <= 0:
        return {t: (0, 0) for t in QA_TYPES}
    temporal = max(1, round(0.2 * n)) if n >= 3 else 0
    multi_lo = max(1, int(0.3 * n)) if n >= 2 else 0
    multi_hi = max(multi_lo, -(-3 * n // 10))  # ceil(0.3 n)
    single_lo = max(1, n - temporal - multi_hi)
    single_hi = max(single_lo, n - temporal - multi_lo)
    return {"single-session": (single_lo, single_hi), "multi-session": (multi_lo, multi_hi),
            "temporal-reasoning": (temporal, temporal)}


def _count_range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def qa_generation_prompt(core: str, entries: list[tuple[str, str]], session_text: str, session_time: str | None,
                         n_questions: int = config.QA_PER_SESSION) -> Prompt:
    """Questions that test whether memory built from this session (on top of the earlier memory) can answer them.

    entries: (type, text) pairs of every memory entry that existed before the session.
    """
    mix = qa_type_mix(n_questions)
    has_history = bool(core.strip() or entries)
    system = f"""
You write evaluation questions for a personal assistant's long-term memory. You are shown what the assistant
remembered about the user BEFORE a conversation, and then the conversation itself with its date. Write exactly
{n_questions} questions that the assistant should be able to answer later, if it remembered this conversation well.

Every question:
- is asked by the user, in the first person ("What is my ...", "When did I ...", "Which ... did I ...");
- asks for one fact with a single, short, checkable answer (a name, number, date, place, item or short phrase);
- is anchored with the specific names, dates, places or objects it is about, so it cannot be confused with
  anything else in the user's life;
- is answerable from this conversation, alone or together with the earlier memory; never from general knowledge,
  and never about what the assistant said unless the user took it up;
- has an answer stated in or directly implied by the text: do not guess.

Types (aim for this mix):
- "single-session" ({_count_range(*mix['single-session'])} of them): a detail stated in this conversation.
- "multi-session" ({_count_range(*mix['multi-session'])} of them): needs this conversation together with an earlier
  memory (a change, a comparison, a count, or a link between the two). If there is no earlier memory, or nothing in it
  relates to this conversation, write a single-session question instead.
- "temporal-reasoning" ({_count_range(*mix['temporal-reasoning'])} of them): about when something happened or how much
  time lies between events; resolve relative times ("last week", "in two days") against the conversation date and
  give the answer as an absolute date or a duration.

"source" is "current_session" when the answer comes from this conversation alone, and "cross_session" when it also
needs the earlier memory.

Reply with one JSON object and nothing else:
{{"questions": [{{"question": "...", "answer": "...", "type": "single-session|multi-session|temporal-reasoning", "source": "current_session|cross_session"}}]}}
"""
    rendered = "\n".join(f"{i}. {render_entry(t, x)}" for i, (t, x) in enumerate(entries, 1)) or "(none)"
    user = (
        "MEMORY BEFORE THIS CONVERSATION\n"
        f"Core memory:\n{core if core.strip() else '(empty)'}\n\n"
        f"Memory entries ({len(entries)}):\n{rendered}\n\n"
        "THIS CONVERSATION\n"
        f"Date: {session_time or 'unknown'}\n"
        f"Messages (one per line):\n{session_text}\n\n"
        f"Write the {n_questions} questions as JSON."
        + ("" if has_history else " There is no earlier memory, so every question is about this conversation.")
    )
    return Prompt(TASK_QA_GENERATE, _msgs(system, user),
                  {"core": core, "entries": [list(e) for e in entries], "session_text": session_text,
                   "session_time": session_time, "n_questions": n_questions,
                   "type_mix": {t: list(r) for t, r in mix.items()}})
