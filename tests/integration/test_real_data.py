"""The loaders and data scripts on the real benchmark files in ../shared/data, and the scripts' CLIs.

Tests that need the real files skip, with the reason, when ../shared/data is absent. The download
script is exercised against a local HTTP server and an unreachable local port only.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from eval.datasets import NOT_ANSWERABLE, Sample, load_dataset, load_splits

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LOCOMO_DEV = SHARED / "locomo" / "locomo10_dev.json"
LME_SAMPLE = SHARED / "longmemeval" / "longmemeval_s_sample.json"
LME_SPLITS = SHARED / "longmemeval" / "longmemeval_splits.json"

needs_locomo = pytest.mark.skipif(not LOCOMO_DEV.is_file(), reason=f"real LoCoMo dev file absent: {LOCOMO_DEV}")
needs_lme = pytest.mark.skipif(not LME_SAMPLE.is_file(), reason=f"real LongMemEval sample absent: {LME_SAMPLE}")
needs_splits = pytest.mark.skipif(not LME_SPLITS.is_file(), reason=f"MemBuilder splits file absent: {LME_SPLITS}")


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    # no proxy: the download tests talk to 127.0.0.1 only
    base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and k != "MEMBUILDER_DATA_MIRROR"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**base, **env})


# ------------------------------------------------------------------------------------------ LoCoMo


@needs_locomo
def test_locomo_dev_file_counts():
    samples = load_dataset("locomo", dataset_path=LOCOMO_DEV)
    assert [s.id for s in samples] == ["conv-26", "conv-30"]
    assert [len(s.sessions) for s in samples] == [19, 19]
    assert sum(len(s.sessions) for s in samples) == 38
    assert [sum(len(x.messages) for x in s.sessions) for s in samples] == [419, 369]
    assert sum(len(s.questions) for s in samples) == 304
    assert Counter(q.category for s in samples for q in s.questions) == {4: 114, 5: 71, 2: 63, 1: 43, 3: 13}
    assert all(q.answer == NOT_ANSWERABLE for s in samples for q in s.questions if q.category == 5)
    assert sum(q.answer != NOT_ANSWERABLE for s in samples for q in s.questions) == 233


@needs_locomo
def test_locomo_dev_conv26_ignores_date_only_sessions():
    raw = json.loads(LOCOMO_DEV.read_text(encoding="utf-8"))[0]["conversation"]
    assert all(f"session_{n}_date_time" in raw and f"session_{n}" not in raw for n in range(20, 36))
    (s,) = load_dataset("locomo", dataset_path=LOCOMO_DEV, sample_ids=["conv-26"])
    assert [x.id for x in s.sessions] == [f"session_{n}" for n in range(1, 20)]
    assert s.current_time == raw["session_19_date_time"] == s.sessions[-1].time
    assert {m.role for x in s.sessions for m in x.messages} == {"user", "other"}
    assert s.sessions[0].messages[0].content.startswith("Caroline: ")
    images = [m for x in s.sessions for m in x.messages if "[shares an image: " in m.content]
    assert len(images) == 116  # every turn with a blip_caption (77 of them also carry img_url)
    assert {type(q.answer) for q in s.questions} == {str}
    assert [q.answer for q in s.questions if q.text == "How many children does Melanie have?"] == ["3"]  # an int in the file
    malformed = [q for q in s.questions if q.extra["evidence"] == ["D8:6", "D9:17"]]
    assert len(malformed) == 1


@needs_locomo
def test_process_locomo_end_to_end(tmp_path):
    out = tmp_path / "dialogues.json"
    result = _run("process_locomo.py", "--input", str(LOCOMO_DEV), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 conversations, 38 sessions, 788 turns, 304 questions" in result.stdout
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written == [s.to_dict() for s in load_dataset("locomo", dataset_path=LOCOMO_DEV)]
    assert load_dataset("dialogues", dataset_path=out) == load_dataset("locomo", dataset_path=LOCOMO_DEV)

    one = tmp_path / "conv30.json"
    assert _run("process_locomo.py", "--input", str(LOCOMO_DEV), "--output", str(one), "--conv-id", "conv-30").returncode == 0
    assert [d["id"] for d in json.loads(one.read_text(encoding="utf-8"))] == ["conv-30"]


@needs_locomo
def test_process_locomo_unknown_conversation_exits_2(tmp_path):
    result = _run("process_locomo.py", "--input", str(LOCOMO_DEV), "--output", str(tmp_path / "o.json"),
                  "--conv-id", "conv-99")
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: unknown sample id conv-99 for locomo; valid ids include conv-26, conv-30")
    assert not (tmp_path / "o.json").exists()


# ------------------------------------------------------------------------------------------ LongMemEval


@needs_lme
def test_longmemeval_sample_counts():
    (s,) = load_dataset("longmemeval", dataset_path=LME_SAMPLE)
    assert s.id == "e47becba" and s.current_time == "2023/05/30 (Tue) 23:40"
    assert len(s.sessions) == 53
    assert sum(len(x.messages) for x in s.sessions) == 550
    assert "reordered" not in s.meta  # LongMemEval_S haystacks are already chronological
    (q,) = s.questions
    assert (q.type, q.answer) == ("single-session-user", "Business Administration")
    assert q.extra["answer_session_ids"] == ["answer_280352e9"]
    assert q.extra["evidence"] and all(e.startswith("answer_280352e9#") for e in q.extra["evidence"])
    assert s.meta["split"] == "test"
    assert load_dataset("longmemeval", dataset_path=LME_SAMPLE, split="test") == [s]


@needs_splits
def test_splits_file_50_50_400_disjoint():
    shared = json.loads(LME_SPLITS.read_text(encoding="utf-8"))
    splits = load_splits(REPO / "data")
    assert splits == shared  # the committed copy is the released file
    assert {k: len(v) for k, v in splits.items()} == {"sft": 50, "rl": 50, "test": 400}
    sets = {k: set(v) for k, v in splits.items()}
    assert all(len(sets[k]) == len(splits[k]) for k in splits)
    assert not (sets["sft"] & sets["rl"]) and not (sets["sft"] & sets["test"]) and not (sets["rl"] & sets["test"])
    assert len(sets["sft"] | sets["rl"] | sets["test"]) == 500


# ------------------------------------------------------------------------------------------ CLIs


def test_process_scripts_exit_2_on_user_errors(tmp_path):
    missing = _run("process_locomo.py", "--input", str(tmp_path / "nope.json"), "--output", str(tmp_path / "o.json"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: LoCoMo file not found: {tmp_path / 'nope.json'}"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    malformed = _run("process_locomo.py", "--input", str(bad), "--output", str(tmp_path / "o.json"))
    assert malformed.returncode == 2 and "is not valid JSON" in malformed.stderr and "Traceback" not in malformed.stderr
    assert len(malformed.stderr.strip().splitlines()) == 1
    no_output = _run("process_locomo.py", "--input", str(bad))
    assert no_output.returncode == 2 and "--output" in no_output.stderr and "Traceback" not in no_output.stderr

    perl = _run("process_perltqa.py", "--input", str(tmp_path), "--output", str(tmp_path / "p.json"))
    assert perl.returncode == 2 and perl.stderr.startswith("error: PerLTQA files not found")
    assert len(perl.stderr.strip().splitlines()) == 1
    who = _run("process_perltqa.py", "--input", str(REPO / "tests/fixtures/perltqa/v2"), "--output",
               str(tmp_path / "p.json"), "--character", "Nobody")
    assert who.returncode == 2 and "unknown character id Nobody" in who.stderr


def test_process_perltqa_end_to_end(tmp_path):
    out = tmp_path / "perltqa.json"
    v1 = REPO / "tests" / "fixtures" / "perltqa" / "v1"
    result = _run("process_perltqa.py", "--input", str(v1 / "perltmem_en.json"), "--qa-input", str(v1 / "perltqa_en.json"),
                  "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "1 protagonists, 4 sessions, 4 questions" in result.stdout
    (d,) = json.loads(out.read_text(encoding="utf-8"))
    assert Sample.from_dict(d).id == "Zhao Lei"


# ------------------------------------------------------------------------------------------ download


def test_download_without_network_explains_and_exits_2(tmp_path):
    result = _run("download_data.py", "--datasets", "locomo", "perltqa", "--data-dir", str(tmp_path),
                  "--timeout", "5", MEMBUILDER_DATA_MIRROR="http://127.0.0.1:9")  # nothing listens on port 9
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("could not download 3 file(s)")
    for dest in ("locomo/locomo10.json", "perltqa/perltmem_en_v2.json", "perltqa/perltqa_en_v2.json"):
        assert str(tmp_path / dest) in result.stderr
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no partial file left behind


def test_download_from_local_mirror_is_atomic_and_keeps_existing(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "locomo").mkdir(parents=True)
    (mirror / "locomo" / "locomo10.json").write_text('[{"sample_id": "conv-1"}]', encoding="utf-8")
    (mirror / "longmemeval").mkdir()
    (mirror / "longmemeval" / "longmemeval_oracle.json").write_text("<html>not json</html>", encoding="utf-8")
    handler = functools.partial(_QuietHandler, directory=str(mirror))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        data = tmp_path / "data"
        ok = _run("download_data.py", "--datasets", "locomo", "--data-dir", str(data), "--mirror", url)
        assert ok.returncode == 0, ok.stderr
        assert (data / "locomo" / "locomo10.json").read_text(encoding="utf-8") == '[{"sample_id": "conv-1"}]'
        assert sorted(p.name for p in (data / "locomo").iterdir()) == ["locomo10.json"]
        again = _run("download_data.py", "--datasets", "locomo", "--data-dir", str(data), "--mirror", url)
        assert again.returncode == 0 and "present, kept" in again.stdout
        html = _run("download_data.py", "--datasets", "longmemeval", "--longmemeval-variant", "oracle",
                    "--data-dir", str(data), "--mirror", url)
        assert html.returncode == 2 and "did not return JSON" in html.stderr
        assert not (data / "longmemeval").exists() or not any((data / "longmemeval").iterdir())
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass
