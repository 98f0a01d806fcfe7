"""``report.html``: one self-contained page to look into a run (and, for ``eval.compare``, a pair of runs).

The page needs no server and fetches nothing: styles, script and data are inline, and it opens from disk. The run
is embedded once as JSON and the page renders from it on demand: the question table a page at a time, a question's
details when it is opened, a sample's memory when it is chosen. So a full LoCoMo run (1,986 questions) or a
LongMemEval test run (400 samples) stays one file of a few MB that opens at once.

What is embedded, per sample, from ``<db_path>/<safe sample id>/memory.json``:

* the final core block, the per-session counts of entries by type (for the timeline) and the session failures;
* the memory entries: all of them when every sample's entries together hold at most ``FULL_MEMORY_CHARS``
  characters; otherwise only the entries some question retrieved and the entries they supersede (followed to the
  end of the chain), each entry once. The page says which of the two it holds.

The page reads its state from the URL hash (``#verdict=WRONG&cat=...&sample=...&q=...&page=2&open=<question id>
&msample=<sample>&session=<session id>``), so a view can be bookmarked or opened by a test.
"""
from __future__ import annotations

import html
import json
import logging
from urllib.parse import quote
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from eval import metrics, stats
from memory_store import atomic_write_text

log = logging.getLogger("eval.report_html")

REPORT_HTML = "report.html"
SUMMARY_FILE = "summary.json"
BUILD_FILE = "build.json"
ANSWERS_FILE = "answers.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
MEMORY_FILE = "memory.json"

FULL_MEMORY_CHARS = 3_000_000  # all samples' entry text together; above it only retrieved entries are kept
MAX_ENTRY_CHARS = 4_000
MAX_CORE_CHARS = 40_000
MAX_FIELD_CHARS = 4_000  # question, gold, answer, reasons
MAX_MEMORY_FILE_BYTES = 256 * 1024 * 1024
MAX_JSONL_BYTES = 512 * 1024 * 1024
MAX_LISTED_FAILURES = 500
VERDICTS = ("CORRECT", "WRONG", "FAILED")


# --------------------------------------------------------------------------- reading a run folder

def _clip(value: Any, limit: int = MAX_FIELD_CHARS) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + f" … [{len(text) - limit:,} more characters]"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _read_jsonl(path: Path) -> dict[str, dict]:
    """Records keyed by question id, the last one of a key winning (the runner's journal rule)."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    if path.stat().st_size > MAX_JSONL_BYTES:
        log.warning("%s: larger than %d bytes, not read", path, MAX_JSONL_BYTES)
        return out
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(rec, dict) and rec.get("question_id") is not None:
                out[str(rec["question_id"])] = rec
    return out


def _db_path(summary: Mapping[str, Any], run_dir: Path) -> Path | None:
    build = summary.get("build") if isinstance(summary.get("build"), Mapping) else {}
    memory = summary.get("memory") if isinstance(summary.get("memory"), Mapping) else {}
    raw = build.get("db_path") or summary.get("db_path") or memory.get("db_path")
    if not raw:
        return None
    path = Path(str(raw))
    if not path.is_absolute() and not path.exists() and (run_dir / path).exists():
        return run_dir / path
    return path


def _safe_id(sample_id: str) -> str:
    from eval.runner import _safe  # late: the runner imports this module

    return _safe(sample_id)


def _category(rec: Mapping[str, Any]) -> str:
    cat = rec.get("category")
    if cat not in (None, ""):
        try:
            return metrics.category_key(int(cat), rec.get("category_name"))
        except (TypeError, ValueError):
            return str(cat)
    return str(rec.get("type") or "uncategorised")


def _label(value: Any) -> str | None:
    return str(value).strip().upper() if value is not None else None


def merge_question(a: Mapping[str, Any], j: Mapping[str, Any]) -> dict:
    """One question as the page shows it: the runner's merge rule (an error, or no label, is a failure)."""
    label = _label(j.get("label"))
    reason = a.get("error") or j.get("error") or a.get("failure_reason") or j.get("failure_reason")
    if not reason and label not in ("CORRECT", "WRONG"):
        reason = "not judged" if not j else f"judge gave no CORRECT/WRONG label ({label})"
    verdict = "FAILED" if reason else label
    ids = a.get("retrieved_ids")
    ids = [str(x) for x in ids] if isinstance(ids, list) else []
    scores = a.get("retrieved_scores")
    scores = list(scores) if isinstance(scores, list) and len(scores) == len(ids) else [None] * len(ids)
    rec = {**j, **a}
    return {
        "id": str(rec.get("question_id")),
        "s": str(rec.get("sample_id") or ""),
        "c": _category(rec),
        "t": str(rec.get("type") or ""),
        "q": _clip(rec.get("question")),
        "g": _clip(rec.get("gold")),
        "a": _clip(a.get("answer") if "answer" in a else j.get("answer")),
        "v": verdict,
        "l": label,
        "jm": j.get("judge_model"),
        "jp": j.get("protocol"),
        "am": a.get("answer_model"),
        "fr": _clip(reason),
        "r": [[i, s if isinstance(s, (int, float)) and not isinstance(s, bool) else None]
              for i, s in zip(ids, scores)],
    }


def _session_order(meta: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    for sid in [*(meta.get("sessions_done") or []), *(e.get("session") for e in entries)]:
        sid = str(sid or "")
        if sid not in seen:
            seen.add(sid)
            order.append(sid)
    return order


def read_memory(db_path: Path | None, sample_id: str) -> dict | None:
    """A sample's memory.json, or None when it is absent or unreadable."""
    if db_path is None:
        return None
    path = db_path / _safe_id(sample_id) / MEMORY_FILE
    try:
        if path.stat().st_size > MAX_MEMORY_FILE_BYTES:
            log.warning("%s: larger than %d bytes, not embedded", path, MAX_MEMORY_FILE_BYTES)
            return None
    except OSError:
        return None
    data = _read_json(path)
    if not data:
        return None
    data["_path"] = str(path)
    return data


def _supersedes_closure(wanted: set[str], by_id: Mapping[str, Mapping[str, Any]]) -> set[str]:
    out, stack = set(), list(wanted)
    while stack:
        eid = stack.pop()
        if eid in out or eid not in by_id:
            continue
        out.add(eid)
        stack.extend(str(x) for x in by_id[eid].get("supersedes") or ())
    return out


def _memory_payload(data: Mapping[str, Any] | None, keep: set[str] | None, sample_id: str,
                    summary_build: Mapping[str, Any]) -> dict:
    """The page's view of one sample's memory; ``keep`` None means every entry."""
    stopped = (summary_build.get("samples_stopped") or {}) if isinstance(summary_build, Mapping) else {}
    if not data:
        return {"found": False, "entries": {}, "sessions": [], "core": "", "n_entries": 0, "full": True,
                "stopped": _clip(stopped.get(sample_id)) if isinstance(stopped, Mapping) else None}
    entries = [e for e in (data.get("entries") or []) if isinstance(e, Mapping) and e.get("id") is not None]
    meta = data.get("meta") if isinstance(data.get("meta"), Mapping) else {}
    failures = meta.get("session_failures") if isinstance(meta.get("session_failures"), Mapping) else {}
    sessions = []
    for sid in _session_order(meta, entries):
        counts: dict[str, int] = {}
        for e in entries:
            if str(e.get("session") or "") == sid:
                counts[str(e.get("type"))] = counts.get(str(e.get("type")), 0) + 1
        fails = failures.get(sid) if isinstance(failures.get(sid), Mapping) else {}
        sessions.append({"id": sid, "counts": counts, "failures": {str(k): _clip(v) for k, v in fails.items()}})
    kept = {}
    for e in entries:
        eid = str(e["id"])
        if keep is None or eid in keep:
            kept[eid] = [str(e.get("type")), _clip(e.get("text"), MAX_ENTRY_CHARS), str(e.get("session") or ""),
                         [str(x) for x in e.get("supersedes") or ()]]
    stop_reason = meta.get("build_error") or (stopped.get(sample_id) if isinstance(stopped, Mapping) else None)
    builder = meta.get("builder")
    return {
        "found": True, "path": data.get("_path"), "core": _clip(data.get("core") or "", MAX_CORE_CHARS),
        "entries": kept, "n_entries": len(entries), "full": keep is None, "sessions": sessions,
        "complete": meta.get("complete"), "stopped": _clip(stop_reason),
        "builder": f"{builder.get('provider')}/{builder.get('model')}" if isinstance(builder, Mapping) else None,
        "sessions_done": len(meta.get("sessions_done") or []),
    }


def _sample_ids(summary: Mapping[str, Any], questions: Sequence[Mapping[str, Any]]) -> list[str]:
    ids: dict[str, None] = {}
    for q in questions:
        ids.setdefault(q["s"], None)
    for sid in summary.get("by_sample") or {}:
        ids.setdefault(str(sid), None)
    build = summary.get("build") if isinstance(summary.get("build"), Mapping) else {}
    for sid in build.get("samples_stopped") or {}:
        ids.setdefault(str(sid), None)
    for f in build.get("agent_failures") or []:
        if isinstance(f, Mapping) and f.get("sample_id") is not None:
            ids.setdefault(str(f["sample_id"]), None)
    ids.pop("", None)
    return list(ids)


def _session_failures(summary: Mapping[str, Any], memory: Mapping[str, Mapping[str, Any]]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for sid, mem in memory.items():
        for sess in mem.get("sessions") or []:
            for agent, reason in (sess.get("failures") or {}).items():
                rows[(sid, sess["id"], agent)] = {"sample": sid, "session": sess["id"], "agent": agent,
                                                  "reason": reason}
    build = summary.get("build") if isinstance(summary.get("build"), Mapping) else {}
    for f in build.get("agent_failures") or []:
        if isinstance(f, Mapping):
            key = (str(f.get("sample_id")), str(f.get("session_id")), str(f.get("agent")))
            rows.setdefault(key, {"sample": key[0], "session": key[1], "agent": key[2],
                                  "reason": _clip(f.get("reason"))})
    return list(rows.values())


def load_run(run_dir: str | Path, *, full_memory_chars: int = FULL_MEMORY_CHARS) -> dict:
    """Everything the page shows about one run folder, as plain JSON-ready data."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / SUMMARY_FILE) if (run_dir / SUMMARY_FILE).is_file() else \
        _read_json(run_dir / BUILD_FILE)
    answers = _read_jsonl(run_dir / ANSWERS_FILE)
    judgments = _read_jsonl(run_dir / JUDGMENTS_FILE)
    questions = [merge_question(answers.get(qid) or {}, judgments.get(qid) or {})
                 for qid in [*answers, *(k for k in judgments if k not in answers)]]
    db_path = _db_path(summary, run_dir)
    raw = {sid: read_memory(db_path, sid) for sid in _sample_ids(summary, questions)}
    total_chars = sum(len(str(e.get("text") or "")) for d in raw.values() if d
                      for e in d.get("entries") or [] if isinstance(e, Mapping))
    full = total_chars <= full_memory_chars
    retrieved: dict[str, set[str]] = {}
    for q in questions:
        retrieved.setdefault(q["s"], set()).update(i for i, _ in q["r"])
    build = summary.get("build") if isinstance(summary.get("build"), Mapping) else {}
    memory = {}
    for sid, data in raw.items():
        keep = None
        if not full and data:
            by_id = {str(e.get("id")): e for e in data.get("entries") or [] if isinstance(e, Mapping)}
            keep = _supersedes_closure(retrieved.get(sid, set()), by_id)
        memory[sid] = _memory_payload(data, keep, sid, build)
    return {
        "name": run_dir.name, "path": str(run_dir.resolve()), "summary": summary, "questions": questions,
        "memory": memory, "db_path": str(db_path) if db_path else None, "memory_full": full,
        "memory_chars": total_chars, "session_failures": _session_failures(summary, memory),
    }


# --------------------------------------------------------------------------- static parts of the page

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _h(value: Any) -> str:
    """A value for a ``#key=value`` link: percent-encoded (ids may hold '&' or '#'), then HTML-escaped."""
    return _e(quote("" if value is None else str(value), safe=""))


def _fmt_pct(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}%"


def _fmt_ci(ci: Any) -> str:
    return f"[{ci[0]:.2f}–{ci[1]:.2f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _method_label(method: Any) -> str:
    return {stats.WILSON: "Wilson", stats.CLUSTER_BOOTSTRAP: "bootstrap over samples"}.get(method, str(method or ""))


_describe = metrics._describe  # one rendering of a mapping or list as text, shared with report.md


def _dl(pairs: Iterable[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs if v not in (None, "", [], {}))
    return f"<dl class='facts'>{items}</dl>"


def _generic(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested lists and tables: for provenance whose shape this module does not fix."""
    if isinstance(value, Mapping):
        if not value:
            return "<span class='muted'>none</span>"
        rows = "".join(f"<li><b>{_e(k)}</b>: {_generic(v, depth + 1)}</li>" for k, v in list(value.items())[:200])
        more = f"<li class='muted'>… {len(value) - 200} more</li>" if len(value) > 200 else ""
        return f"<ul class='tree'>{rows}{more}</ul>"
    if isinstance(value, list):
        if value and all(isinstance(v, Mapping) for v in value):
            cols: list[str] = []
            for v in value[:200]:
                cols += [c for c in v if c not in cols]
            head = "".join(f"<th>{_e(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{_e(_describe(v.get(c, '')))}</td>" for c in cols) + "</tr>"
                           for v in value[:200])
            more = f"<p class='muted'>… {len(value) - 200} more</p>" if len(value) > 200 else ""
            return f"<table class='plain'><tr>{head}</tr>{body}</table>{more}"
        return _e(_describe(value)) if value else "<span class='muted'>none</span>"
    return _e(value)


def _banner(summary: Mapping[str, Any]) -> str:
    baseline = summary.get("baseline")
    if not baseline:
        prov = summary.get("provenance") if isinstance(summary.get("provenance"), Mapping) else {}
        baseline = prov.get("baseline")
    if baseline:
        note = baseline if isinstance(baseline, str) else metrics.BASELINE_NOTE
        return f"<div class='banner baseline' id='baseline'>{_e(note)}</div>"
    return ""


def _provenance_banner(run: Mapping[str, Any]) -> str:
    """Who built, answered and judged, and how much of the memory exists: the line every number depends on."""
    s = run["summary"]
    models = s.get("models") if isinstance(s.get("models"), Mapping) else {}
    prov = s.get("provenance") if isinstance(s.get("provenance"), Mapping) else {}
    build = s.get("build") if isinstance(s.get("build"), Mapping) else {}
    parts = [f"memory built by {prov.get('builder') or models.get('builder') or 'unknown'}"]
    if build.get("sessions_total") is not None:
        done = (build.get("sessions_built") or 0) + (build.get("sessions_resumed") or 0)
        parts[-1] += f" ({done} of {build['sessions_total']} sessions)"
    parts.append(f"answered by {prov.get('answer') or models.get('answer') or 'unknown'}")
    parts.append(f"judged by {prov.get('judge') or models.get('judge') or 'unknown'} under protocol "
                 f"{s.get('judge_protocol') or 'not recorded'}")
    mem = run["memory"]
    short = [sid for sid, m in mem.items() if not m.get("found") or m.get("complete") is False or m.get("stopped")]
    if short:
        parts.append(f"memory missing or incomplete for {len(short)} of {len(mem)} samples")
    cls = "banner prov warn" if short else "banner prov"
    return f"<div class='{cls}' id='provenance-banner'>{_e(' · '.join(parts))}</div>"


def _run_facts(run: Mapping[str, Any]) -> str:
    s = run["summary"]
    models = s.get("models") if isinstance(s.get("models"), Mapping) else {}
    prov = s.get("provenance") if isinstance(s.get("provenance"), Mapping) else {}
    build = s.get("build") if isinstance(s.get("build"), Mapping) else {}
    settings = s.get("settings") if isinstance(s.get("settings"), Mapping) else {}
    acc = _fmt_pct(s.get("accuracy"))
    if s.get("accuracy_ci95"):
        acc += f" {_fmt_ci(s['accuracy_ci95'])} 95% interval, {_method_label(s.get('ci_method'))}"
    acc += f" ({s.get('n_correct', 0)} / {s.get('n_judged', 0)} judged)"
    acc_all = _fmt_pct(s.get("accuracy_all"))
    if s.get("accuracy_all_ci95"):
        acc_all += f" {_fmt_ci(s['accuracy_all_ci95'])}"
    pairs: list[tuple[str, Any]] = [
        ("dataset", s.get("dataset")), ("mode", s.get("mode")),
        ("accuracy", acc if "accuracy" in s else None),
        ("accuracy, failed = wrong", acc_all if "accuracy_all" in s else None),
    ]
    wo = s.get("without_adversarial")
    if isinstance(wo, Mapping):
        pairs.append(("without adversarial", f"{_fmt_pct(wo.get('accuracy'))} {_fmt_ci(wo.get('accuracy_ci95'))} "
                                             f"(n={wo.get('n')})"))
    pairs += [
        ("questions", f"{s.get('n_questions', len(run['questions']))}, failed {s.get('n_failed', 0)}"),
        ("builder", prov.get("builder") or models.get("builder")),
        ("answer model", prov.get("answer") or models.get("answer")),
        ("judge", prov.get("judge") or models.get("judge")),
        ("judge protocol", s.get("judge_protocol")), ("judge prompt", s.get("judge")),
        ("embedding", models.get("embedding")),
        ("sessions built", f"{build.get('sessions_built')} built + {build.get('sessions_resumed', 0)} resumed of "
                           f"{build.get('sessions_total')}" if build.get("sessions_total") is not None else None),
        ("agent calls failed", f"{build.get('agent_calls_failed')} of {build.get('agent_calls')}"
         if build.get("agent_calls") is not None else None),
        ("samples stopped", len(build.get("samples_stopped") or {}) if build else None),
        ("top-k", settings.get("top_k")),
        ("memory in this file", ("all entries" if run["memory_full"] else
                                 "entries retrieved by some question and those they supersede")
         + f" ({run['memory_chars']:,} characters of entry text in the run's memory)"),
        ("memory folder", run.get("db_path")),
        ("run folder", run.get("path")),
    ]
    return _dl(pairs)


def _chart_rows(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    groups = summary.get("by_category") or summary.get("by_type") or {}
    rows = [(str(k), g) for k, g in groups.items() if isinstance(g, Mapping)]
    rows.append(("overall", {"accuracy": summary.get("accuracy"), "accuracy_ci95": summary.get("accuracy_ci95"),
                             "ci_method": summary.get("ci_method"), "n": summary.get("n_questions"),
                             "n_judged": summary.get("n_judged")}))
    wo = summary.get("without_adversarial")
    if isinstance(wo, Mapping):
        rows.append(("overall w/o adversarial", wo))
    return rows


def _bar(value: Any, ci: Any, cls: str, track: str = "track") -> str:
    width = max(0.0, min(100.0, float(value))) if value is not None else 0.0
    whisker = ""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        lo, hi = max(0.0, float(ci[0])), min(100.0, float(ci[1]))
        whisker = f"<div class='whisker' style='left:{lo:.2f}%;width:{max(hi - lo, 0.3):.2f}%'></div>"
    return f"<div class='{track}'><div class='bar {cls}' style='width:{width:.2f}%'></div>{whisker}</div>"


def _chart(summary: Mapping[str, Any]) -> str:
    by = "category" if summary.get("by_category") else "type"
    rows = []
    for name, g in _chart_rows(summary):
        label = (f"{_fmt_pct(g.get('accuracy'))} {_fmt_ci(g.get('accuracy_ci95'))} "
                 f"n={g.get('n_judged', g.get('n'))}")
        if g.get("ci_method"):
            label += f" · {_method_label(g['ci_method'])}"
        rows.append(f"<div class='bar-row'><span class='bar-name'>{_e(name)}</span>"
                    f"{_bar(g.get('accuracy'), g.get('accuracy_ci95'), 'a')}<span class='bar-value'>{_e(label)}</span>"
                    f"</div>")
    if len(rows) <= 1 and summary.get("accuracy") is None:
        return ""
    return (f"<section id='chart'><h2>Judged accuracy by {by}</h2><p class='muted'>Bars: accuracy over judged "
            f"questions; whiskers: its 95% interval, by the method named after each value.</p>{''.join(rows)}"
            f"<details class='meta'><summary>interval methods</summary>{_e(_methods_note(summary))}</details>"
            f"</section>")


def _methods_note(summary: Mapping[str, Any]) -> str:
    methods = (summary.get("intervals") or {}).get("methods") if isinstance(summary.get("intervals"), Mapping) \
        else None
    return "; ".join(f"{_method_label(k)}: {v}" for k, v in (methods or {}).items()) or "not recorded"


def _failures(run: Mapping[str, Any], index: int) -> str:
    s = run["summary"]
    build = s.get("build") if isinstance(s.get("build"), Mapping) else {}
    parts = []
    stopped = {sid: m.get("stopped") for sid, m in run["memory"].items() if m.get("stopped")}
    for sid, reason in (build.get("samples_stopped") or {}).items():
        stopped.setdefault(str(sid), _clip(reason))
    if stopped:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in stopped.items())
        parts.append(f"<h3>Samples whose build stopped ({len(stopped)})</h3>"
                     f"<table class='plain' id='stopped-{index}'><tr><th>sample</th><th>reason</th></tr>{rows}</table>")
    sf = run["session_failures"]
    if sf:
        rows = "".join(f"<tr><td>{_e(f['sample'])}</td><td><a href='#mrun={index}&msample={_h(f['sample'])}"
                       f"&session={_h(f['session'])}'>{_e(f['session'])}</a></td><td>{_e(f['agent'])}</td>"
                       f"<td>{_e(f['reason'])}</td></tr>" for f in sf[:MAX_LISTED_FAILURES])
        more = f"<p class='muted'>… {len(sf) - MAX_LISTED_FAILURES} more in summary.json</p>" \
            if len(sf) > MAX_LISTED_FAILURES else ""
        parts.append(f"<h3>Failed agent calls in sessions ({len(sf)})</h3><p class='muted'>The agent's actions "
                     f"were a no-op for that session.</p><table class='plain' id='session-failures-{index}'>"
                     f"<tr><th>sample</th><th>session</th><th>agent</th><th>reason</th></tr>{rows}</table>{more}")
    fq = [q for q in run["questions"] if q["v"] == "FAILED"]
    if fq:
        rows = "".join(f"<tr data-qid='{_e(q['id'])}'><td>{_e(q['s'])}</td><td><a href='#open={_h(q['id'])}'>"
                       f"{_e(q['id'])}</a></td><td>{_e(q['fr'])}</td></tr>" for q in fq[:MAX_LISTED_FAILURES])
        more = f"<p class='muted'>… {len(fq) - MAX_LISTED_FAILURES} more: filter the table to FAILED</p>" \
            if len(fq) > MAX_LISTED_FAILURES else ""
        parts.append(f"<h3>Failed questions ({len(fq)})</h3><p class='muted'>Not counted as answers or verdicts; "
                     f"accuracy_all counts them as wrong.</p><table class='plain' id='question-failures-{index}'>"
                     f"<tr><th>sample</th><th>question</th><th>reason</th></tr>{rows}</table>{more}")
    if not parts:
        parts.append("<p class='muted' id='no-failures'>No failed sessions or questions.</p>")
    return "".join(parts)


def _provenance(summary: Mapping[str, Any]) -> str:
    prov = summary.get("provenance")
    if not prov:
        return ""
    return f"<details open id='provenance'><summary>Provenance</summary>{_generic(prov)}</details>"


# --------------------------------------------------------------------------- the page

_CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e3e6ea;--a:#3f6fb5;--b:#d08a2e;--ok:#2f8a4c;--bad:#c0392b;--fail:#7b5ea7}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);
margin:0;padding:16px 24px;background:#fafbfc}h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:22px 0 8px;
border-bottom:1px solid var(--line);padding-bottom:4px}h3{font-size:14px;margin:14px 0 6px}
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px 14px;margin:12px 0}
.muted{color:var(--muted)}.banner{padding:8px 12px;border-radius:5px;margin:8px 0;font-weight:600}
.baseline{background:#fff4d6;border:1px solid #e7c767}.prov{background:#eef3fa;border:1px solid #c9d7ea;
font-weight:500}.prov.warn{background:#fbeaea;border-color:#e3b4b4}.facts{display:grid;grid-template-columns:max-content 1fr;
gap:2px 14px;margin:4px 0}.facts dt{color:var(--muted)}.facts dd{margin:0}
.bar-row{display:grid;grid-template-columns:170px 1fr 290px;align-items:center;gap:8px;margin:3px 0}
.track{position:relative;height:16px;background:#eef1f4;border-radius:3px}.bar{height:100%;border-radius:3px}
.bar.a{background:var(--a)}.bar.b{background:var(--b)}.track.half{height:8px}
.whisker{position:absolute;top:50%;height:2px;background:#222;transform:translateY(-50%)}
.whisker:before,.whisker:after{content:"";position:absolute;top:-4px;width:2px;height:10px;background:#222}
.whisker:before{left:0}.whisker:after{right:0}.bar-value{font-variant-numeric:tabular-nums;color:#333}
.controls{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin-bottom:8px}
.controls input[type=search]{width:260px}select,input,button{font:inherit}
table.qt,table.plain{border-collapse:collapse;width:100%}table.qt th,table.qt td,table.plain th,table.plain td{
border-bottom:1px solid var(--line);padding:4px 6px;text-align:left;vertical-align:top}
table.qt tbody tr{cursor:pointer}table.qt tbody tr:hover{background:#f3f6fb}table.qt tr.open{background:#e8effa}
td.txt{max-width:360px;overflow:hidden;text-overflow:ellipsis}
.v{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-size:12px;font-weight:600}
.v-CORRECT{background:var(--ok)}.v-WRONG{background:var(--bad)}.v-FAILED{background:var(--fail)}
.v-none{background:#999}.pager{display:flex;gap:6px;align-items:center;margin-top:8px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
pre.core{white-space:pre-wrap;background:#f6f7f9;border:1px solid var(--line);padding:8px;max-height:260px;
overflow:auto;font-size:12.5px}ol.entries{padding-left:22px}li.entry{margin:4px 0;padding:4px 6px;
border-left:3px solid var(--line);background:#fcfcfd}.etype{font-size:11px;font-weight:700;text-transform:uppercase;
padding:0 5px;border-radius:3px;background:#e6ebf2;margin-right:4px}.t-episodic{background:#dbe8fb}
.t-semantic{background:#dff3e4}.t-procedural{background:#f7e6d3}.meta{color:var(--muted);font-size:12px}
.sup{margin:4px 0 0 14px;border-left:2px dashed #c5ccd6;padding-left:8px}a{color:#2457a6}
.tl-row{display:grid;grid-template-columns:40px 170px 1fr 260px;gap:8px;align-items:center;cursor:pointer;
padding:1px 0}.tl-row:hover{background:#f3f6fb}.tl-row.sel{background:#e8effa}.stack{display:flex;height:14px}
.stack span{height:100%}.s-episodic{background:#7aa6e0}.s-semantic{background:#78c28d}.s-procedural{background:#e2a868}
.s-other{background:#b9b9c9}.legend .la{background:var(--a)}.legend .lb{background:var(--b)}
.bar-row.pair .track{margin:1px 0}.legend span{display:inline-block;width:10px;height:10px;margin:0 3px 0 10px}
.fail-mark{color:var(--bad);font-weight:700}ul.tree{margin:2px 0;padding-left:18px}
.kv{font-variant-numeric:tabular-nums}.top{display:grid;grid-template-columns:minmax(380px,1fr) minmax(380px,1fr);
gap:0 12px}.top>section{margin:6px 0}.work{display:grid;grid-template-columns:minmax(0,3fr) minmax(360px,2fr);gap:12px;
align-items:start}.work>section{margin:6px 0}#detail{position:sticky;top:8px;max-height:calc(100vh - 16px);overflow:auto}
@media (max-width:1100px){.top,.work{grid-template-columns:1fr}#detail{position:static;max-height:none}}
"""

_JS = r"""
(function () {
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const PAIR = DATA.kind === "pair";
const RUNS = DATA.runs;
const Q = RUNS[0].questions;
const INDEX = new Map(Q.map((q, i) => [q.id, i]));
const DEFAULTS = {verdict: "", cat: "", sample: "", q: "", page: "1", per: "50", open: "", mrun: "0",
                  msample: "", session: ""};
const state = Object.assign({}, DEFAULTS);
const $ = (id) => document.getElementById(id);
let hay = null;

function el(tag, attrs, ...kids) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of kids.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    n.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return n;
}
function clear(n) { while (n.firstChild) n.removeChild(n.firstChild); return n; }
function short(s, n) { s = s == null ? "" : String(s); return s.length > n ? s.slice(0, n - 1) + "…" : s; }
function badge(v) { return el("span", {class: "v v-" + (v || "none")}, v || "n/a"); }
function hashFor(changes) {
  const s = Object.assign({}, state, changes);
  const p = new URLSearchParams();
  for (const k of Object.keys(DEFAULTS)) if (s[k] !== DEFAULTS[k] && s[k] !== "") p.set(k, s[k]);
  return "#" + p.toString();
}
function go(changes) {
  Object.assign(state, changes);
  history.replaceState(null, "", hashFor({}));
  render();
}
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of Object.keys(DEFAULTS)) state[k] = p.has(k) ? p.get(k) : DEFAULTS[k];
}

// ---------------------------------------------------------------- verdicts and filters
function outcome(i) {
  if (!PAIR) return Q[i].v;
  const a = RUNS[0].questions[i].v, b = RUNS[1].questions[i].v;
  if (a === b) return a === "CORRECT" ? "both-correct" : "both-wrong";
  return b === "CORRECT" ? "gained" : "lost";
}
const VERDICT_OPTIONS = PAIR
  ? [["", "all shared"], ["changed", "flipped (either way)"], ["gained", "B right, A wrong"],
     ["lost", "A right, B wrong"], ["both-correct", "both right"], ["both-wrong", "both wrong"]]
  : [["", "all verdicts"], ["CORRECT", "CORRECT"], ["WRONG", "WRONG"], ["FAILED", "FAILED"]];
function matches() {
  if (hay === null) hay = Q.map((q, i) => [q.id, q.q, q.g, ...RUNS.map((r) => r.questions[i].a)].join("\n").toLowerCase());
  const needle = state.q.toLowerCase().trim();
  const out = [];
  for (let i = 0; i < Q.length; i++) {
    const q = Q[i], o = outcome(i);
    if (state.verdict === "changed" ? (o !== "gained" && o !== "lost") : (state.verdict && o !== state.verdict)) continue;
    if (state.cat && q.c !== state.cat) continue;
    if (state.sample && q.s !== state.sample) continue;
    if (needle && hay[i].indexOf(needle) < 0) continue;
    out.push(i);
  }
  return out;
}
function distinct(key) { const s = new Set(); for (const q of Q) s.add(q[key]); return [...s]; }

function buildControls() {
  const box = $("controls");
  const sel = (id, opts, label) => el("label", {}, label + " ",
    el("select", {id: id, onchange: (e) => go({[id]: e.target.value, page: "1"})},
      opts.map(([v, t]) => el("option", {value: v}, t))));
  box.append(
    sel("verdict", VERDICT_OPTIONS, PAIR ? "outcome" : "verdict"),
    sel("cat", [["", "all"], ...distinct("c").map((c) => [c, c])], "category/type"),
    sel("sample", [["", "all"], ...distinct("s").map((s) => [s, s])], "sample"),
    el("input", {type: "search", id: "q", placeholder: "search question, gold, answer, id",
                 oninput: (e) => go({q: e.target.value, page: "1"})}),
    el("span", {class: "muted"}, el("span", {id: "match-count"}, ""), " of " + Q.length + " questions"));
}
function syncControls() {
  for (const id of ["verdict", "cat", "sample"]) { const s = $(id); if (s && s.value !== state[id]) s.value = state[id]; }
  const q = $("q"); if (q && q.value !== state.q && document.activeElement !== q) q.value = state.q;
}

// ---------------------------------------------------------------- table
function renderTable() {
  const rows = matches();
  const per = state.per === "all" ? Math.max(rows.length, 1) : Math.max(1, Math.min(1000, parseInt(state.per, 10) || 50));
  const pages = Math.max(1, Math.ceil(rows.length / per));
  const page = Math.min(pages, Math.max(1, parseInt(state.page, 10) || 1));
  $("match-count").textContent = rows.length;
  const head = $("qhead"); clear(head);
  const cols = PAIR ? ["sample", "category/type", "A", "B", "question", "gold", "answer A", "answer B"]
                    : ["sample", "category/type", "verdict", "question", "gold", "answer"];
  head.append(el("tr", {}, cols.map((c) => el("th", {}, c))));
  const body = $("qbody"); clear(body);
  for (const i of rows.slice((page - 1) * per, page * per)) {
    const q = Q[i];
    const cells = [el("td", {}, q.s), el("td", {}, q.c)];
    for (const r of RUNS) cells.push(el("td", {}, badge(r.questions[i].v)));
    cells.push(el("td", {class: "txt", title: q.q}, short(q.q, 140)), el("td", {class: "txt", title: q.g}, short(q.g, 80)));
    for (const r of RUNS) cells.push(el("td", {class: "txt", title: r.questions[i].a || ""},
                                       short(r.questions[i].a == null ? "—" : r.questions[i].a, PAIR ? 90 : 160)));
    body.append(el("tr", {"data-qid": q.id, "data-verdict": outcome(i), class: state.open === q.id ? "open" : null,
                          onclick: () => { go({open: q.id}); $("detail").scrollIntoView({block: "start"}); }}, cells));
  }
  const pager = clear($("pager"));
  const btn = (label, p, dis) => el("button", {disabled: dis, onclick: () => go({page: String(p)})}, label);
  pager.append(btn("« first", 1, page <= 1), btn("‹ prev", page - 1, page <= 1),
    el("span", {id: "page-info"}, rows.length ? `${(page - 1) * per + 1}–${Math.min(rows.length, page * per)} of ${rows.length} (page ${page} of ${pages})` : "no questions match"),
    btn("next ›", page + 1, page >= pages), btn("last »", pages, page >= pages));
}

// ---------------------------------------------------------------- a question
function entryCard(run, ri, sample, id, depth) {
  const mem = run.memory[sample] || {entries: {}};
  const e = mem.entries[id];
  if (!e) return el("div", {class: "meta"}, id + ": not in this file" + (mem.full === false ? " (only retrieved entries are kept)" : ""));
  const [type, text, session, sup] = e;
  const supBox = el("div", {});
  const links = sup.map((sid) => el("a", {href: "#", "data-supersedes": sid, onclick: (ev) => {
    ev.preventDefault();
    const open = supBox.querySelector(`[data-card="${CSS.escape(sid)}"]`);
    if (open) { open.remove(); return; }
    if (depth < 20) supBox.append(el("div", {class: "sup", "data-card": sid}, entryCard(run, ri, sample, sid, depth + 1)));
  }}, sid));
  return el("div", {"data-entry-id": id},
    el("span", {class: "etype t-" + type}, type), el("b", {}, id), " ", text,
    el("div", {class: "meta"}, "session ", el("a", {href: hashFor({mrun: String(ri), msample: sample, session: session})}, session || "?"),
       sup.length ? [" · supersedes ", links.flatMap((l, k) => k ? [", ", l] : [l])] : ""),
    supBox);
}
function runColumn(run, ri, i) {
  const q = run.questions[i];
  const mem = run.memory[q.s];
  const col = el("div", {class: "run-col", "data-run": ri});
  if (PAIR) col.append(el("h3", {}, (ri ? "B: " : "A: ") + run.name));
  col.append(el("dl", {class: "facts"},
    el("dt", {}, "answer"), el("dd", {class: "answer"}, q.a == null ? "—" : q.a),
    el("dt", {}, "verdict"), el("dd", {}, badge(q.v), q.l && q.v === "FAILED" ? " (label " + q.l + ")" : ""),
    el("dt", {}, "judge"), el("dd", {class: "judge"}, (q.l || "no label") + " · " + (q.jm || "judge model not recorded") + " · protocol " + (q.jp || "not recorded")),
    q.am ? [el("dt", {}, "answer model"), el("dd", {}, q.am)] : null,
    q.fr ? [el("dt", {}, "failure"), el("dd", {class: "failure"}, q.fr)] : null));
  col.append(el("h3", {}, `Retrieved entries (${q.r.length})`));
  const list = el("ol", {class: "entries"});
  q.r.forEach(([id, score], k) => {
    const card = entryCard(run, ri, q.s, id, 0);
    if (score !== null && score !== undefined) card.insertBefore(el("span", {class: "meta score"}, "score " + Number(score).toFixed(3) + " "), card.firstChild);
    list.append(el("li", {class: "entry", "data-rank": k + 1}, card));
  });
  col.append(q.r.length ? list : el("p", {class: "muted"}, "no entries retrieved"));
  col.append(el("details", {open: true}, el("summary", {}, "Core block (the memory's final core)"),
    mem && mem.found ? el("pre", {class: "core"}, mem.core || "(empty)") : el("p", {class: "muted"}, "memory not found for this sample")));
  return col;
}
function renderDetail() {
  const box = clear($("detail"));
  if (!state.open) { box.append(el("p", {class: "muted"}, "Click a question to open it.")); return; }
  const i = INDEX.get(state.open);
  if (i === undefined) { box.append(el("p", {class: "muted"}, "Question " + state.open + " is not in this file.")); return; }
  const q = Q[i];
  box.append(el("h2", {}, "Question " + q.id), el("p", {class: "qtext"}, q.q),
    el("dl", {class: "facts"}, el("dt", {}, "gold"), el("dd", {class: "gold"}, q.g), el("dt", {}, "sample"),
      el("dd", {}, el("a", {href: hashFor({msample: q.s, session: ""})}, q.s)), el("dt", {}, "category/type"), el("dd", {}, q.c + (q.t && q.t !== q.c ? " · " + q.t : ""))),
    el("div", {class: "cols"}, RUNS.map((r, ri) => runColumn(r, ri, i))),
    el("p", {}, el("a", {href: hashFor({open: ""})}, "close")));
}

// ---------------------------------------------------------------- memory timeline
const TYPES = ["episodic", "semantic", "procedural"];
function renderMemory() {
  const box = clear($("memory-view"));
  const ri = Math.min(RUNS.length - 1, Math.max(0, parseInt(state.mrun, 10) || 0));
  const run = RUNS[ri];
  const samples = Object.keys(run.memory);
  if (!samples.length) { box.append(el("p", {class: "muted"}, "No memory found for this run.")); return; }
  const sample = samples.includes(state.msample) ? state.msample : samples[0];
  const mem = run.memory[sample];
  const ctl = el("div", {class: "controls"});
  if (PAIR) ctl.append(el("label", {}, "run ", el("select", {id: "mrun", onchange: (e) => go({mrun: e.target.value, session: ""})},
    RUNS.map((r, k) => el("option", {value: k, selected: k === ri}, (k ? "B: " : "A: ") + r.name)))));
  ctl.append(el("label", {}, "sample ", el("select", {id: "msample", onchange: (e) => go({msample: e.target.value, session: ""})},
    samples.map((s) => el("option", {value: s, selected: s === sample}, s)))));
  box.append(ctl);
  if (!mem.found) {
    box.append(el("p", {class: "muted"}, "memory.json not found for " + sample + (mem.stopped ? "; build stopped: " + mem.stopped : "")));
    return;
  }
  const kept = Object.keys(mem.entries).length;
  const sessions = mem.sessions.map(([id, counts, failures]) => ({id, counts, failures: failures || {}}));
  box.append(el("p", {class: "meta"}, `${mem.n_entries} entries over ${sessions.length} sessions` +
    (mem.builder ? ` · built by ${mem.builder}` : "") + (mem.complete === false ? " · incomplete" : "") +
    (mem.full ? " · all entries in this file" : ` · ${kept} entries in this file (retrieved ones and what they supersede)`)),
    mem.stopped ? el("p", {class: "failure"}, "build stopped: " + mem.stopped) : "",
    el("p", {class: "legend meta"}, "entries added per session:", TYPES.map((t) => [el("span", {class: "s-" + t}), t]), el("span", {class: "s-other"}), "other"));
  const max = Math.max(1, ...sessions.map((s) => Object.values(s.counts).reduce((a, b) => a + b, 0)));
  const tl = el("div", {id: "timeline"});
  sessions.forEach((s, k) => {
    const total = Object.values(s.counts).reduce((a, b) => a + b, 0);
    const stack = el("div", {class: "stack"});
    for (const t of [...TYPES, "other"]) {
      const n = t === "other" ? total - TYPES.reduce((a, x) => a + (s.counts[x] || 0), 0) : (s.counts[t] || 0);
      if (n > 0) stack.append(el("span", {class: "s-" + t, style: `width:${(100 * n / max).toFixed(2)}%`, title: `${t}: ${n}`}));
    }
    const nf = Object.keys(s.failures).length;
    tl.append(el("div", {class: "tl-row" + (s.id === state.session ? " sel" : ""), "data-session": s.id,
                         onclick: () => go({mrun: String(ri), msample: sample, session: s.id})},
      el("span", {class: "meta"}, k + 1), el("span", {}, s.id), stack,
      el("span", {class: "meta"}, Object.entries(s.counts).map(([t, n]) => `${n} ${t}`).join(" · ") + ` = ${total}`,
         nf ? el("span", {class: "fail-mark", title: Object.entries(s.failures).map(([a, r]) => a + ": " + r).join("\n")}, ` ✗ ${nf} failed`) : "")));
  });
  box.append(tl);
  const sess = sessions.find((s) => s.id === state.session);
  const detail = el("div", {id: "session-entries"});
  if (sess) {
    const ids = Object.keys(mem.entries).filter((id) => mem.entries[id][2] === sess.id);
    const total = Object.values(sess.counts).reduce((a, b) => a + b, 0);
    detail.append(el("h3", {}, `Session ${sess.id}: ${total} entries added` + (ids.length < total ? `, ${ids.length} in this file` : "")));
    for (const [a, r] of Object.entries(sess.failures)) detail.append(el("p", {class: "failure"}, `${a} agent failed: ${r}`));
    const ol = el("ol", {class: "entries"});
    for (const id of ids.slice(0, 500)) ol.append(el("li", {class: "entry"}, entryCard(run, ri, sample, id, 0)));
    detail.append(ol);
    if (ids.length > 500) detail.append(el("p", {class: "muted"}, `… ${ids.length - 500} more`));
  } else detail.append(el("p", {class: "muted"}, "Click a session to list its entries."));
  box.append(detail);
}

function render() {
  syncControls();
  renderTable();
  renderDetail();
  renderMemory();
}

buildControls();
readHash();
render();
window.addEventListener("hashchange", () => { readHash(); render(); });
document.documentElement.setAttribute("data-ready", "1");
})();
"""


def _json_for_script(data: Any) -> str:
    # Inside <script> only "</" can end the element early; \u003c keeps the JSON valid and the element intact.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def _compact_memory(mem: Mapping[str, Any]) -> dict:
    # Sessions as [id, counts, failures?]: 400 samples of 50 sessions each would otherwise repeat the keys 60,000 times.
    sessions = [[x["id"], x["counts"], x["failures"]] if x["failures"] else [x["id"], x["counts"]]
                for x in mem.get("sessions") or []]
    return {**mem, "sessions": sessions}


def _page_data(kind: str, runs: Sequence[Mapping[str, Any]]) -> dict:
    return {"kind": kind, "runs": [{"name": r["name"], "questions": r["questions"],
                                    "memory": {sid: _compact_memory(m) for sid, m in r["memory"].items()}}
                                   for r in runs]}


def render_page(*, title: str, head_html: str, kind: str, runs: Sequence[Mapping[str, Any]]) -> str:
    """The whole page: static summary parts (``head_html``), then the table, question and memory views."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
{head_html}
<div class="work"><section id="questions"><h2>Questions</h2><div class="controls" id="controls"></div>
<table class="qt"><thead id="qhead"></thead><tbody id="qbody"></tbody></table><div class="pager" id="pager"></div>
</section>
<section id="detail"></section></div>
<section id="memory"><h2>Memory timeline</h2><div id="memory-view"></div></section>
<script type="application/json" id="report-data">{_json_for_script(_page_data(kind, runs))}</script>
<script>{_JS}</script>
<noscript><p>The question table, question details and memory timeline need JavaScript.</p></noscript>
</body></html>
"""


def render_run_html(run: Mapping[str, Any], *, title: str | None = None) -> str:
    s = run["summary"]
    title = title or f"MemBuilder run: {s.get('dataset', 'unknown dataset')} · {run['name']}"
    head = (f"{_banner(s)}{_provenance_banner(run)}<div class='top'><section id='summary'><h2>Summary</h2>{_run_facts(run)}"
            f"{_provenance(s)}</section>{_chart(s)}</div>"
            f"<section id='failures'><h2>Failures</h2>{_failures(run, 0)}</section>")
    return render_page(title=title, head_html=head, kind="run", runs=[run])


def write_report_html(run_dir: Path) -> Path:
    """Read the run folder (summary, answers, judgments and the memory it names) and write its ``report.html``."""
    run_dir = Path(run_dir)
    path = run_dir / REPORT_HTML
    atomic_write_text(path, render_run_html(load_run(run_dir)))
    return path
