"""`python -m eval.compare` on run folders the runner wrote: the paired figures, the flipped questions, the refusals,
and compare.html in headless Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import stats
from tests.integration.test_viewer import CHROMIUM, copy_run, open_page, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eval.compare", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    subprocess.run([sys.executable, "-m", "eval.runner", "--dataset", "demo", "--provider", "offline",
                    "--output-dir", str(root / "a"), "--db-path", str(root / "db"), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    return root / "a"


def _flip(run: Path, qids: set[str]) -> None:
    judgments = read_jsonl(run / "judgments.jsonl")
    for j in judgments:
        if j["question_id"] in qids:
            j["label"] = "CORRECT" if j["label"] == "WRONG" else "WRONG"
    write_jsonl(run / "judgments.jsonl", judgments)


@pytest.fixture
def run_b(run_a, tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of A with three verdicts flipped (two WRONG -> CORRECT, one CORRECT -> WRONG) and one failed."""
    run = copy_run(run_a, tmp_path)
    labels = {j["question_id"]: j["label"] for j in read_jsonl(run / "judgments.jsonl")}
    wrong = [q for q, label in labels.items() if label == "WRONG"]
    correct = [q for q, label in labels.items() if label == "CORRECT"]
    flips = {wrong[0]: "gained", wrong[1]: "gained", correct[0]: "lost"}
    _flip(run, set(flips))
    answers = read_jsonl(run / "answers.jsonl")
    failed = wrong[2]
    for a in answers:
        if a["question_id"] == failed:
            a.update(answer=None, error="answer: rate limited after 4 attempts")
    write_jsonl(run / "answers.jsonl", answers)
    return run, {**flips, "_failed": failed}


def test_compare_reports_the_paired_figures_and_the_flipped_questions(run_a, run_b, tmp_path):
    run, flips = run_b
    failed = flips.pop("_failed")
    out = tmp_path / "cmp"
    proc = compare(str(run_a), str(run), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "compare.json").read_text())
    n_all = len(read_jsonl(run_a / "answers.jsonl"))
    assert result["questions"]["shared"] == n_all - 1
    assert result["questions"]["not_shared"] == 1 and result["questions"]["judged_only_in_a"] == 1
    o = result["overall"]
    assert (o["b_right_a_wrong"], o["a_right_b_wrong"]) == (2, 1)
    assert o["mcnemar_p"] == pytest.approx(stats.mcnemar_exact(1, 2)) == pytest.approx(1.0)
    labels_a = {j["question_id"]: j["label"] for j in read_jsonl(run_a / "judgments.jsonl") if j["question_id"] != failed}
    acc_a = 100 * sum(v == "CORRECT" for v in labels_a.values()) / len(labels_a)
    assert o["accuracy_a"] == round(acc_a, 2)
    assert o["difference"] == round(100 * (2 - 1) / len(labels_a), 2)
    lo, hi = o["difference_ci95"]
    assert lo <= o["difference"] <= hi and o["difference_method"] == stats.PAIRED_BOOTSTRAP  # one sample
    assert {f["question_id"]: f["direction"] for f in result["flipped"]} == flips
    assert sum(g["n"] for g in result["by_group"].values()) == o["n"]
    assert "shared questions (judged in both): 11; not shared: 1 (1 judged only in A" in proc.stdout
    assert "flipped: 3 (2 gained, 1 lost)" in proc.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (Debian: apt-get install -y chromium)")
def test_compare_html_shows_the_pair_and_filters_to_the_flipped(run_a, run_b, tmp_path):
    run, flips = run_b
    flips.pop("_failed")
    out = tmp_path / "cmp"
    assert compare(str(run_a), str(run), "--out", str(out)).returncode == 0
    dom = open_page(out / "compare.html", "verdict=changed", tmp=tmp_path)
    assert {r["data-qid"]: r["data-verdict"] for r in dom.rows} == flips
    qid = next(iter(flips))
    opened = open_page(out / "compare.html", f"open={qid}", tmp=tmp_path)
    rec = next(a for a in read_jsonl(run_a / "answers.jsonl") if a["question_id"] == qid)
    assert opened.detail_entries == rec["retrieved_ids"] * 2  # A's column, then B's
    assert "p = 1.000" in opened.text("mcnemar")


def test_compare_refuses_runs_on_different_datasets(run_a, tmp_path):
    run = copy_run(run_a, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["dataset"] = "locomo"
    (run / "summary.json").write_text(json.dumps(summary))
    proc = compare(str(run_a), str(run), "--out", str(tmp_path / "cmp"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "different datasets (demo vs locomo)" in proc.stderr
    assert not (tmp_path / "cmp").exists()


def test_compare_refuses_runs_judged_under_different_protocols(run_a, tmp_path):
    run = copy_run(run_a, tmp_path)
    judgments = read_jsonl(run / "judgments.jsonl")
    for j in judgments:
        j["protocol"] = "longmemeval"
    write_jsonl(run / "judgments.jsonl", judgments)
    summary = json.loads((run / "summary.json").read_text())
    summary["judge_protocol"] = "longmemeval"
    (run / "summary.json").write_text(json.dumps(summary))
    proc = compare(str(run_a), str(run))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "different protocols" in proc.stderr


def test_compare_bad_input_is_one_line_and_exit_2(run_a, tmp_path):
    proc = compare(str(run_a), str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no such run folder" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = compare(str(run_a), str(empty))
    assert proc.returncode == 2 and "no summary.json" in proc.stderr
    proc = compare(str(run_a))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


def test_compare_of_a_run_with_itself_is_no_difference(run_a, tmp_path):
    out = tmp_path / "same"
    proc = compare(str(run_a), str(run_a), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    o = json.loads((out / "compare.json").read_text())["overall"]
    assert o["difference"] == 0.0 and o["difference_ci95"] == [0.0, 0.0] and o["mcnemar_p"] == 1.0
    shutil.rmtree(out)
