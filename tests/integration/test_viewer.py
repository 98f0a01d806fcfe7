"""report.html opened in a real headless Chromium: the table, the filters, a question's retrieved entries, the
memory timeline and the failure lists, on a run folder the runner wrote.

The page reads its view from the URL hash, so each test loads ``report.html#...`` with ``chromium --headless
--dump-dom`` and inspects the DOM the page's script built.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from eval import report_html
from eval.report_html import write_report_html

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")]


# --------------------------------------------------------------------------- helpers

class Dom(HTMLParser):
    """The few things the tests look at, from the serialised DOM."""

    VOID = {"br", "img", "input", "meta", "link", "hr", "wbr", "source", "col", "area", "base", "embed", "track"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.rows: list[dict] = []  # question table rows
        self.detail_entries: list[str] = []  # top-level retrieved entries of the opened question, in rank order
        self.session_entries: list[str] = []
        self.timeline: list[str] = []
        self.supersedes_links: list[str] = []
        self.texts: dict[str, list[str]] = {}  # element id -> text inside it
        self.root_attrs: dict = {}
        self.feed(text)

    def _inside(self, key: str, value: str) -> bool:
        return any(a.get(key) == value for _, a in self.stack)

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag == "html":
            self.root_attrs = a
        if tag == "tr" and "data-qid" in a and self._inside("id", "qbody"):
            self.rows.append(a)
        if "data-entry-id" in a and self._inside("id", "detail"):
            # A retrieved entry is the card directly inside an li.entry; superseded cards nest deeper.
            if self.stack and self.stack[-1][0] == "li" and "entry" in self.stack[-1][1].get("class", ""):
                self.detail_entries.append(a["data-entry-id"])
        if "data-entry-id" in a and self._inside("id", "session-entries"):
            self.session_entries.append(a["data-entry-id"])
        if "data-supersedes" in a and self._inside("id", "detail"):
            self.supersedes_links.append(a["data-supersedes"])
        if "data-session" in a and self._inside("id", "timeline"):
            self.timeline.append(a["data-session"])
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        for _, a in self.stack:
            if a.get("id"):
                self.texts.setdefault(a["id"], []).append(data)

    def text(self, element_id: str) -> str:
        return "".join(self.texts.get(element_id, []))


def open_page(page: Path, fragment: str = "", tmp: Path | None = None) -> Dom:
    url = page.resolve().as_uri() + (f"#{fragment}" if fragment else "")
    profile = (tmp or page.parent) / ".chromium-profile"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = Dom(proc.stdout)
    assert dom.root_attrs.get("data-ready") == "1", "the page's script did not finish"
    return dom


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    run, db = root / "run", root / "db"
    subprocess.run([sys.executable, "-m", "eval.runner", "--dataset", "demo", "--provider", "offline",
                    "--output-dir", str(run), "--db-path", str(db), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    write_report_html(run)
    return run


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run folder and its memory, the summary pointing at the copied memory."""
    shutil.copytree(run, dest / "run")
    summary = json.loads((dest / "run" / "summary.json").read_text())
    shutil.copytree(summary["build"]["db_path"], dest / "db")
    summary["build"]["db_path"] = str(dest / "db")
    (dest / "run" / "summary.json").write_text(json.dumps(summary))
    return dest / "run"


# --------------------------------------------------------------------------- the run viewer

def test_report_is_one_self_contained_file(demo_run):
    text = (demo_run / "report.html").read_text(encoding="utf-8")
    lowered = text.lower()
    for needle in ("http://", "https://", "<link", "src=", "@import", "fetch(", "xmlhttprequest"):
        assert needle not in lowered, needle
    # Exactly one embedded copy of the data.
    assert text.count('id="report-data"') == 1


def test_table_renders_the_runs_questions(demo_run, tmp_path):
    answers = read_jsonl(demo_run / "answers.jsonl")
    dom = open_page(demo_run / "report.html", tmp=tmp_path)
    assert [r["data-qid"] for r in dom.rows] == [a["question_id"] for a in answers]
    assert dom.text("match-count") == str(len(answers))
    assert "OFFLINE BASELINE" in dom.text("baseline")


def test_filtering_to_wrong_shows_exactly_the_wrong_ones(demo_run, tmp_path):
    labels = {j["question_id"]: j["label"] for j in read_jsonl(demo_run / "judgments.jsonl")}
    wrong = {q for q, label in labels.items() if label == "WRONG"}
    assert wrong and len(wrong) < len(labels)  # the filter has something to leave out
    dom = open_page(demo_run / "report.html", "verdict=WRONG", tmp=tmp_path)
    assert {r["data-qid"] for r in dom.rows} == wrong
    assert len(dom.rows) == len(wrong)
    assert {r["data-verdict"] for r in dom.rows} == {"WRONG"}
    correct = open_page(demo_run / "report.html", "verdict=CORRECT", tmp=tmp_path)
    assert {r["data-qid"] for r in correct.rows} == set(labels) - wrong


def test_a_questions_retrieved_entries_appear(demo_run, tmp_path):
    answers = read_jsonl(demo_run / "answers.jsonl")
    rec = next(a for a in answers if a["retrieved_ids"])
    dom = open_page(demo_run / "report.html", f"open={rec['question_id']}", tmp=tmp_path)
    assert dom.detail_entries == rec["retrieved_ids"]
    detail = dom.text("detail")
    memory = json.loads((Path(json.loads((demo_run / "summary.json").read_text())["build"]["db_path"])
                         / rec["sample_id"] / "memory.json").read_text())
    by_id = {e["id"]: e for e in memory["entries"]}
    for eid in rec["retrieved_ids"]:
        assert by_id[eid]["text"] in detail
    judgment = next(j for j in read_jsonl(demo_run / "judgments.jsonl") if j["question_id"] == rec["question_id"])
    assert f"{judgment['label']} · {judgment['judge_model']} · protocol {judgment['protocol']}" in detail
    assert memory["core"].splitlines()[0] in detail  # the core block


def test_search_category_and_sample_filters(demo_run, tmp_path):
    answers = read_jsonl(demo_run / "answers.jsonl")
    target = answers[1]
    word = max(target["question"].replace("?", "").split(), key=len)
    expected = {a["question_id"] for a in answers
                if word.lower() in "\n".join([a["question_id"], a["question"], str(a["gold"]),
                                             str(a["answer"])]).lower()}
    dom = open_page(demo_run / "report.html", f"q={word}", tmp=tmp_path)
    assert target["question_id"] in {r["data-qid"] for r in dom.rows}
    assert {r["data-qid"] for r in dom.rows} == expected
    qtype = target["type"]
    dom = open_page(demo_run / "report.html", f"cat={qtype}&sample={target['sample_id']}", tmp=tmp_path)
    assert {r["data-qid"] for r in dom.rows} == {a["question_id"] for a in answers if a["type"] == qtype}
    dom = open_page(demo_run / "report.html", "sample=no-such-sample", tmp=tmp_path)
    assert dom.rows == []


def test_memory_timeline_lists_sessions_and_a_chosen_sessions_entries(demo_run, tmp_path):
    summary = json.loads((demo_run / "summary.json").read_text())
    memory = json.loads((Path(summary["build"]["db_path"]) / "demo-1" / "memory.json").read_text())
    session = memory["meta"]["sessions_done"][1]
    dom = open_page(demo_run / "report.html", f"msample=demo-1&session={session}", tmp=tmp_path)
    assert dom.timeline == memory["meta"]["sessions_done"]
    assert dom.session_entries == [e["id"] for e in memory["entries"] if e["session"] == session]


def test_failed_sessions_and_questions_are_listed_with_their_reasons(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path)
    answers = read_jsonl(run / "answers.jsonl")
    judgments = read_jsonl(run / "judgments.jsonl")
    failed_answer, failed_judge = answers[0]["question_id"], answers[1]["question_id"]
    answers[0].update(answer=None, retrieved_ids=[], retrieved_types=[], error="answer: timeout after 4 attempts")
    judgments = [j for j in judgments if j["question_id"] != failed_answer]
    for j in judgments:
        if j["question_id"] == failed_judge:
            j.update(label=None, error="judge: reply has no CORRECT/WRONG label")
    write_jsonl(run / "answers.jsonl", answers)
    write_jsonl(run / "judgments.jsonl", judgments)
    mem_path = tmp_path / "db" / "demo-1" / "memory.json"
    memory = json.loads(mem_path.read_text())
    bad_session = memory["meta"]["sessions_done"][2]
    memory["meta"]["session_failures"] = {bad_session: {"semantic": "semantic: invalid JSON after 4 attempts"}}
    mem_path.write_text(json.dumps(memory))
    summary = json.loads((run / "summary.json").read_text())
    summary["build"]["samples_stopped"] = {"demo-1": "session demo_s9: embedding endpoint unreachable"}
    (run / "summary.json").write_text(json.dumps(summary))
    write_report_html(run)

    dom = open_page(run / "report.html", "verdict=FAILED", tmp=tmp_path)
    assert {r["data-qid"] for r in dom.rows} == {failed_answer, failed_judge}
    failures = dom.text("failures")
    assert "answer: timeout after 4 attempts" in failures
    assert "judge: reply has no CORRECT/WRONG label" in failures
    assert bad_session in failures and "semantic: invalid JSON after 4 attempts" in failures
    assert "embedding endpoint unreachable" in failures
    assert "memory missing or incomplete for 1 of 1 samples" in dom.text("provenance-banner")
    wrong = open_page(run / "report.html", "verdict=WRONG", tmp=tmp_path)
    assert not {failed_answer, failed_judge} & {r["data-qid"] for r in wrong.rows}  # an error is never a verdict
    timeline = open_page(run / "report.html", f"msample=demo-1&session={bad_session}", tmp=tmp_path)
    assert "1 failed" in timeline.text("timeline")
    assert "semantic agent failed: semantic: invalid JSON after 4 attempts" in timeline.text("session-entries")


def test_scores_and_provenance_are_shown_when_the_run_records_them(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path)
    answers = read_jsonl(run / "answers.jsonl")
    rec = next(a for a in answers if a["retrieved_ids"])
    rec["retrieved_scores"] = [round(0.9 - 0.05 * i, 4) for i in range(len(rec["retrieved_ids"]))]
    write_jsonl(run / "answers.jsonl", answers)
    summary = json.loads((run / "summary.json").read_text())
    summary["provenance"] = {"builder": "offline/offline-baseline", "baseline": True,
                             "samples": [{"sample_id": "demo-1", "sessions_built": 6, "sessions_total": 6,
                                          "partial": False}]}
    (run / "summary.json").write_text(json.dumps(summary))
    write_report_html(run)
    dom = open_page(run / "report.html", f"open={rec['question_id']}", tmp=tmp_path)
    detail = dom.text("detail")
    assert "score 0.900" in detail and f"score {rec['retrieved_scores'][-1]:.3f}" in detail
    provenance = dom.text("provenance")
    assert "sessions_built" in provenance and "demo-1" in provenance


def _synthetic_run(root: Path, n_samples: int, per_sample: int, entries_per_sample: int) -> Path:
    """A run folder in the runner's format, as large as a full LongMemEval or LoCoMo run."""
    run, db = root / "big", root / "bigdb"
    answers, judgments = [], []
    for s in range(n_samples):
        sid = f"sample-{s:03d}"
        entries = [{"id": f"m{e:06d}", "type": ("episodic", "semantic", "procedural")[e % 3],
                    "text": f"entry {e} of {sid}: " + "words about the past " * 12, "session": f"s{e // 10}",
                    "supersedes": [f"m{e - 1:06d}"] if e % 7 == 6 else []} for e in range(entries_per_sample)]
        (db / sid).mkdir(parents=True)
        (db / sid / "memory.json").write_text(json.dumps(
            {"core": f"core of {sid}", "entries": entries,
             "meta": {"sessions_done": [f"s{i}" for i in range(entries_per_sample // 10)], "session_failures": {}}}))
        for q in range(per_sample):
            qid = f"{sid}_q{q}"
            answers.append({"sample_id": sid, "question_id": qid, "question": f"question {qid} token{s}x{q}?",
                            "gold": "gold", "type": "multi-session", "category": None, "category_name": None,
                            "answer": "an answer", "retrieved_ids": [f"m{(q * 3 + k) % entries_per_sample:06d}"
                                                                     for k in range(10)],
                            "retrieved_types": ["episodic"] * 10, "error": None})
            judgments.append({"sample_id": sid, "question_id": qid, "label": "CORRECT" if (s + q) % 3 else "WRONG",
                              "judge_model": "judge", "protocol": "paper", "answer": "an answer", "error": None})
    run.mkdir()
    write_jsonl(run / "answers.jsonl", answers)
    write_jsonl(run / "judgments.jsonl", judgments)
    (run / "summary.json").write_text(json.dumps({"dataset": "longmemeval", "judge_protocol": "paper",
                                                  "build": {"db_path": str(db)}}))
    return run


@pytest.mark.slow
def test_a_run_of_two_thousand_questions_stays_small_and_pages(tmp_path):
    # 400 samples x 5 questions; each sample's memory holds 500 entries (about 130 MB of text in all), far over
    # the budget, so only retrieved entries (and what they supersede) are embedded.
    run = _synthetic_run(tmp_path, n_samples=400, per_sample=5, entries_per_sample=500)
    page = write_report_html(run)
    size = page.stat().st_size
    assert size < 6_000_000, size
    loaded = report_html.load_run(run)
    assert not loaded["memory_full"]
    kept = loaded["memory"]["sample-000"]["entries"]
    retrieved = {i for a in read_jsonl(run / "answers.jsonl") if a["sample_id"] == "sample-000"
                 for i in a["retrieved_ids"]}
    assert retrieved <= set(kept) and len(kept) < 60
    assert len(loaded["memory"]["sample-000"]["sessions"]) == 50  # the timeline still counts every session

    dom = open_page(page, tmp=tmp_path)
    assert len(dom.rows) == 50 and dom.text("match-count") == "2000"
    assert "1–50 of 2000 (page 1 of 40)" in dom.text("page-info")
    last = open_page(page, "page=40", tmp=tmp_path)
    assert [r["data-qid"] for r in last.rows][-1] == "sample-399_q4"
    one = open_page(page, "q=token123x4", tmp=tmp_path)
    assert [r["data-qid"] for r in one.rows] == ["sample-123_q4"]
    opened = open_page(page, "open=sample-123_q4", tmp=tmp_path)
    assert len(opened.detail_entries) == 10


def test_supersedes_links_point_at_embedded_entries(tmp_path):
    run = _synthetic_run(tmp_path, n_samples=3, per_sample=1, entries_per_sample=2000)
    loaded = report_html.load_run(run, full_memory_chars=10_000)  # force "retrieved only"
    kept = loaded["memory"]["sample-000"]["entries"]
    # Question 0 retrieves m000000..m000009; m000006 supersedes m000005, which is retrieved anyway.
    assert kept["m000006"][3] == ["m000005"] and "m000005" in kept
    page = run / "report.html"
    page.write_text(report_html.render_run_html(loaded), encoding="utf-8")
    dom = open_page(page, "open=sample-000_q0", tmp=tmp_path)
    assert dom.supersedes_links == ["m000005"]
    # A chain reached only through supersedes is embedded too: m000013 -> m000012 is not retrieved.
    answers = read_jsonl(run / "answers.jsonl")
    answers[0]["retrieved_ids"] = ["m000013"]
    write_jsonl(run / "answers.jsonl", answers)
    kept = report_html.load_run(run, full_memory_chars=10_000)["memory"]["sample-000"]["entries"]
    assert set(kept) == {"m000013", "m000012"}


def test_markup_in_the_data_is_shown_as_text(demo_run, tmp_path):
    run = copy_run(demo_run, tmp_path)
    answers = read_jsonl(run / "answers.jsonl")
    payload = '</script><b id="injected">bold</b><!-- & "quotes"'
    answers[0]["answer"] = payload
    write_jsonl(run / "answers.jsonl", answers)
    write_report_html(run)
    dom = open_page(run / "report.html", f"open={answers[0]['question_id']}", tmp=tmp_path)
    assert "injected" not in dom.texts  # no element was made from the data
    assert payload in dom.text("detail")
    assert len(dom.rows) == len(answers)
