"""Loaders of eval/datasets.py on small inline files and the PerLTQA fixtures."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from eval.datasets import (
    NOT_ANSWERABLE,
    DatasetError,
    Message,
    Question,
    Sample,
    Session,
    load_dataset,
    load_splits,
    locomo_category_name,
    read_id_file,
    render_session,
    save_dialogues,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "perltqa"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _sample() -> Sample:
    return Sample(
        id="s1",
        dataset="demo",
        sessions=[Session("a", "2024/01/01 (Mon) 10:00", [Message("user", "hi"), Message("assistant", "hello")]),
                  Session("b", None, [Message("other", "Bob: hey\nthere")])],
        questions=[Question("q1", "What?", "That", "single-session-user"),
                   Question("q2", "When?", "Now", "temporal", 2, "temporal", {"evidence": ["D1:1"], "n": 1})],
        current_time="2024/01/02 (Tue) 09:00",
        meta={"k": [1, 2], "nested": {"a": None}},
    )


# ------------------------------------------------------------------------------------------ records


def test_records_round_trip_exactly():
    s = _sample()
    d = s.to_dict()
    assert Sample.from_dict(d) == s
    assert Sample.from_dict(d).to_dict() == d
    assert json.loads(json.dumps(d)) == d
    for q in s.questions:
        assert Question.from_dict(q.to_dict()) == q
    for sess in s.sessions:
        assert Session.from_dict(sess.to_dict()) == sess
        for m in sess.messages:
            assert Message.from_dict(m.to_dict()) == m


def test_to_dict_does_not_share_mutable_state():
    s = _sample()
    d = s.to_dict()
    d["meta"]["k"].append(3)
    d["questions"][1]["extra"]["evidence"].append("x")
    assert s.meta["k"] == [1, 2] and s.questions[1].extra["evidence"] == ["D1:1"]


def test_from_dict_names_missing_key_and_bad_role():
    d = _sample().to_dict()
    del d["questions"][0]["answer"]
    with pytest.raises(DatasetError, match=r"question 0.*missing key 'answer'"):
        Sample.from_dict(d)
    d = _sample().to_dict()
    d["sessions"][0]["messages"][0]["role"] = "narrator"
    with pytest.raises(DatasetError, match="unknown role 'narrator'"):
        Sample.from_dict(d)


def test_render_session_one_line_per_message_with_role_tags():
    text = render_session(_sample().sessions[1])
    assert text == "other: Bob: hey / there"
    assert render_session(_sample().sessions[0]).splitlines() == ["user: hi", "assistant: hello"]


def test_locomo_category_names_follow_the_readme():
    assert [locomo_category_name(c) for c in range(1, 6)] == [
        "multi-hop", "temporal", "open-domain", "single-hop", "adversarial"]
    with pytest.raises(ValueError):
        locomo_category_name(9)


def test_dataset_error_is_one_line():
    assert "\n" not in str(DatasetError("a\nb  c"))


# ------------------------------------------------------------------------------------------ LoCoMo


def _locomo() -> list[dict]:
    return [
        {
            "sample_id": "conv-1",
            "conversation": {
                "speaker_a": "Ann",
                "speaker_b": "Ben",
                "session_2": [{"speaker": "Ben", "dia_id": "D2:1", "text": "Back from Rome!"}],
                "session_2_date_time": "2:00 pm on 9 May, 2023",
                "session_10": [{"speaker": "Ann", "dia_id": "D10:1", "text": "Hi again"}],
                "session_10_date_time": "3:00 pm on 1 June, 2023",
                "session_1": [
                    {"speaker": "Ann", "dia_id": "D1:1", "text": "Hi Ben!"},
                    {"speaker": "Ben", "dia_id": "D1:2", "text": "Look at this",
                     "img_url": ["x"], "blip_caption": "a photo of a cat", "query": "cat"},
                ],
                "session_1_date_time": "1:56 pm on 8 May, 2023",
                "session_11_date_time": "4:00 pm on 2 June, 2023",
            },
            "qa": [
                {"question": "Where did Ben go?", "answer": "Rome", "evidence": ["D2:1"], "category": 4},
                {"question": "How many cats?", "answer": 1, "evidence": ["D1:2; D2:1", "D1:1 D10:1"], "category": 1},
                {"question": "Why did Ann cry?", "adversarial_answer": "onions", "evidence": [], "category": 5},
                {"question": "Is the cat Ann's?", "adversarial_answer": "Yes", "answer": "No", "evidence": [], "category": 5},
            ],
            "event_summary": {},
            "observation": {},
            "session_summary": {},
        },
        {"sample_id": "conv-2", "conversation": {"speaker_a": "C", "speaker_b": "D",
                                                 "session_1": [{"speaker": "C", "text": "x"}]}, "qa": []},
    ]


def test_locomo_sessions_in_numeric_order_with_roles_and_images(tmp_path):
    path = _write(tmp_path / "locomo" / "locomo10.json", _locomo())
    samples = load_dataset("locomo", data_dir=tmp_path)
    assert [s.id for s in samples] == ["conv-1", "conv-2"]
    s = samples[0]
    assert [x.id for x in s.sessions] == ["session_1", "session_2", "session_10"]  # session_11 has a date only
    assert s.sessions[0].time == "1:56 pm on 8 May, 2023"
    assert s.sessions[0].messages == [Message("user", "Ann: Hi Ben!"),
                                      Message("other", "Ben: Look at this [shares an image: a photo of a cat]")]
    assert s.current_time == "3:00 pm on 1 June, 2023"
    assert s.meta == {"speaker_a": "Ann", "speaker_b": "Ben"}
    assert load_dataset("locomo", dataset_path=path, sample_ids=["conv-1"])[0] == s


def test_locomo_questions(tmp_path):
    _write(tmp_path / "locomo" / "locomo10.json", _locomo())
    qs = load_dataset("locomo", data_dir=tmp_path)[0].questions
    assert [q.id for q in qs] == ["conv-1_q0", "conv-1_q1", "conv-1_q2", "conv-1_q3"]
    assert (qs[0].answer, qs[0].category, qs[0].category_name, qs[0].type) == ("Rome", 4, "single-hop", "single-hop")
    assert qs[1].answer == "1" and qs[1].extra["evidence"] == ["D1:2", "D2:1", "D1:1", "D10:1"]
    assert qs[2].answer == NOT_ANSWERABLE and qs[2].extra["adversarial_answer"] == "onions"
    assert qs[3].answer == NOT_ANSWERABLE and qs[3].extra["original_answer"] == "No"


def test_locomo_file_lookup(tmp_path):
    with pytest.raises(DatasetError, match="LoCoMo file not found.*download_data.py"):
        load_dataset("locomo", data_dir=tmp_path)
    _write(tmp_path / "locomo" / "locomo10_dev.json", _locomo())
    assert len(load_dataset("locomo", data_dir=tmp_path)) == 2  # the only JSON in the folder
    _write(tmp_path / "locomo" / "other.json", _locomo()[:1])
    with pytest.raises(DatasetError, match="several JSON files"):
        load_dataset("locomo", data_dir=tmp_path)
    _write(tmp_path / "locomo" / "locomo10.json", _locomo()[1:])
    assert [s.id for s in load_dataset("locomo", data_dir=tmp_path)] == ["conv-2"]  # the canonical name wins


def test_locomo_unknown_id_names_it_and_valid_ones(tmp_path):
    path = _write(tmp_path / "l.json", _locomo())
    with pytest.raises(DatasetError, match=r"unknown sample id conv-99 for locomo; valid ids include conv-1, conv-2"):
        load_dataset("locomo", dataset_path=path, sample_ids=["conv-1", "conv-99"])


def test_locomo_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[{", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"bad.json is not valid JSON"):
        load_dataset("locomo", dataset_path=bad)
    data = _locomo()
    del data[0]["qa"][0]["answer"]
    path = _write(tmp_path / "l.json", data)
    with pytest.raises(DatasetError, match=r"conv-1.*qa\[0\].*missing key 'answer'"):
        load_dataset("locomo", dataset_path=path)
    data = _locomo()
    del data[1]["sample_id"]
    with pytest.raises(DatasetError, match=r"record 1.*missing key 'sample_id'"):
        load_dataset("locomo", dataset_path=_write(tmp_path / "l2.json", data))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_dataset("locomo", dataset_path=_write(tmp_path / "l3.json", {"a": 1}))


# ------------------------------------------------------------------------------------------ LongMemEval


def _lme_instance(qid: str, dates: list[str], qtype: str = "multi-session") -> dict:
    return {
        "question_id": qid,
        "question_type": qtype,
        "question": f"question {qid}?",
        "answer": 3,
        "question_date": "2023/06/01 (Thu) 10:00",
        "haystack_session_ids": [f"{qid}_s{i}" for i in range(len(dates))],
        "haystack_dates": dates,
        "haystack_sessions": [
            [{"role": "user", "content": f"I am in session {i}", **({"has_answer": True} if i == 0 else {})},
             {"role": "assistant", "content": "Noted."}]
            for i in range(len(dates))
        ],
        "answer_session_ids": [f"{qid}_s0"],
    }


@pytest.fixture
def lme_dir(tmp_path) -> Path:
    sorted_dates = ["2023/05/01 (Mon) 09:00", "2023/05/02 (Tue) 09:00"]
    data = [
        _lme_instance("a1", sorted_dates),
        _lme_instance("b2_abs", sorted_dates, "temporal-reasoning"),
        _lme_instance("c3", ["2023/05/03 (Wed) 09:00", "2023/05/01 (Mon) 09:00", "2023/05/02 (Tue) 08:00"]),
        _lme_instance("d4", sorted_dates),
    ]
    _write(tmp_path / "longmemeval" / "longmemeval_s_cleaned.json", data)
    _write(tmp_path / "longmemeval" / "splits" / "longmemeval_splits.json",
           {"sft": ["a1"], "rl": ["b2_abs"], "test": ["c3", "d4", "zz_missing"]})
    return tmp_path


def test_longmemeval_instance(lme_dir):
    s = load_dataset("longmemeval", data_dir=lme_dir, sample_ids=["b2_abs"])[0]
    assert (s.id, s.dataset, s.current_time) == ("b2_abs", "longmemeval", "2023/06/01 (Thu) 10:00")
    assert [x.id for x in s.sessions] == ["b2_abs_s0", "b2_abs_s1"]
    assert s.sessions[0].time == "2023/05/01 (Mon) 09:00"
    assert s.sessions[0].messages[0] == Message("user", "I am in session 0")
    (q,) = s.questions
    assert (q.id, q.answer, q.type, q.category) == ("b2_abs", "3", "temporal-reasoning", None)
    assert q.extra == {"abstention": True, "answer_session_ids": ["b2_abs_s0"], "evidence": ["b2_abs_s0#0"]}
    assert s.meta == {"split": "rl"}
    assert load_dataset("longmemeval", data_dir=lme_dir, sample_ids="a1")[0].questions[0].extra["abstention"] is False


def test_longmemeval_sorts_unsorted_haystacks_only(lme_dir):
    samples = {s.id: s for s in load_dataset("longmemeval", data_dir=lme_dir)}
    c3 = samples["c3"]
    assert [x.id for x in c3.sessions] == ["c3_s1", "c3_s2", "c3_s0"]
    assert c3.meta["reordered"] is True
    assert "reordered" not in samples["a1"].meta
    assert [x.id for x in samples["a1"].sessions] == ["a1_s0", "a1_s1"]


def test_longmemeval_split_filtering(lme_dir):
    assert [s.id for s in load_dataset("longmemeval", data_dir=lme_dir, split="test")] == ["c3", "d4"]
    assert [s.id for s in load_dataset("longmemeval", data_dir=lme_dir, split="sft")] == ["a1"]
    assert [s.id for s in load_dataset("longmemeval", data_dir=lme_dir, split="test", sample_ids=["d4"])] == ["d4"]
    with pytest.raises(DatasetError, match=r"unknown split 'dev' \(valid: rl, sft, test\)"):
        load_dataset("longmemeval", data_dir=lme_dir, split="dev")
    with pytest.raises(DatasetError, match=r"a1 not in split 'test'"):
        load_dataset("longmemeval", data_dir=lme_dir, split="test", sample_ids=["a1"])
    with pytest.raises(DatasetError, match="longmemeval only"):
        load_dataset("locomo", data_dir=lme_dir, split="test")


def test_longmemeval_subset_file_text_and_json(lme_dir, tmp_path):
    txt = tmp_path / "ids.txt"
    txt.write_text("# my subset\nd4\n\na1  # the first\n", encoding="utf-8")
    assert read_id_file(txt) == ["d4", "a1"]
    assert [s.id for s in load_dataset("longmemeval", data_dir=lme_dir, subset_file=txt)] == ["a1", "d4"]
    js = _write(tmp_path / "ids.json", {"ids": ["c3"]})
    assert [s.id for s in load_dataset("longmemeval", data_dir=lme_dir, subset_file=js)] == ["c3"]
    js2 = _write(tmp_path / "ids2.json", ["c3", "a1"])
    got = load_dataset("longmemeval", data_dir=lme_dir, subset_file=js2, sample_ids=["a1", "d4"])
    assert [s.id for s in got] == ["a1"]  # filters narrow each other
    bad = _write(tmp_path / "bad.json", ["nope"])
    with pytest.raises(DatasetError, match=r"unknown id from .*bad.json nope for longmemeval"):
        load_dataset("longmemeval", data_dir=lme_dir, subset_file=bad)
    with pytest.raises(DatasetError, match="cannot read subset file"):
        load_dataset("longmemeval", data_dir=lme_dir, subset_file=tmp_path / "missing.txt")


def test_longmemeval_file_lookup_and_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"LongMemEval file not found.*longmemeval_s_cleaned.json"):
        load_dataset("longmemeval", data_dir=tmp_path)
    _write(tmp_path / "longmemeval" / "longmemeval_s_sample.json", [_lme_instance("x", ["2023/05/01 (Mon) 09:00"])])
    assert [s.id for s in load_dataset("longmemeval", data_dir=tmp_path)] == ["x"]
    inst = _lme_instance("y", ["2023/05/01 (Mon) 09:00"])
    inst["haystack_dates"] = []
    with pytest.raises(DatasetError, match="equal length"):
        load_dataset("longmemeval", dataset_path=_write(tmp_path / "y.json", [inst]))
    inst = _lme_instance("z", ["2023/05/01 (Mon) 09:00"])
    del inst["question_type"]
    with pytest.raises(DatasetError, match=r"\(z\): missing key 'question_type'"):
        load_dataset("longmemeval", dataset_path=_write(tmp_path / "z.json", [inst]))


def test_repository_splits_file_is_the_fallback(tmp_path):
    splits = load_splits(tmp_path)  # nothing under tmp_path: the committed copy
    assert {k: len(v) for k, v in splits.items()} == {"sft": 50, "rl": 50, "test": 400}


# ------------------------------------------------------------------------------------------ PerLTQA


def test_perltqa_v2_dict_layout():
    samples = load_dataset("perltqa", dataset_path=FIXTURES / "v2")
    assert [s.id for s in samples] == ["Wang Fang", "Chen Jie"]  # "Ghost Person" has no memory record
    s = samples[0]
    assert s.dataset == "perltqa" and s.meta["profile"]["Occupation"] == "architect"
    # undated event first, then by time; events and dialogues interleave
    assert [(x.id, x.time) for x in s.sessions] == [
        ("event_1_1_0", "during the spring festival"),
        ("event_1_0_0", "July 8, 2021"),
        ("1_0_0#0", "2021-07-12 18:30"),
        ("1_1_0#1", "2022-03-02 10:00"),
    ]
    assert s.current_time == "2022-03-02 10:00"
    assert s.sessions[1].messages == [Message(
        "user", "[Event record] Cycling trip around Qinghai Lake (with Li Na, cousin): "
                "Wang Fang and her cousin Li Na cycled around Qinghai Lake over three days.")]
    assert [(m.role, m.content) for m in s.sessions[3].messages] == [
        ("user", "Zhou Bo: Did you see the jury's decision?"),
        ("assistant", "Wang Fang: Yes! Our library design won first place."),
        ("user", "Zhou Bo: All those late nights paid off."),
    ]
    assert [(q.id, q.type) for q in s.questions] == [
        ("Wang Fang_q0", "profile"), ("Wang Fang_q1", "social_relationship"), ("Wang Fang_q2", "events"),
        ("Wang Fang_q3", "dialogues"), ("Wang Fang_q4", "dialogues")]
    assert s.questions[3].extra["memory_id"] == "1_1_0#1"
    assert s.questions[3].extra["reference_memory"] == "['1_1_0#1']"
    assert samples[1].questions[0].answer == "45"


def test_perltqa_v1_list_layout_with_other_key_casing():
    (s,) = load_dataset("perltqa", dataset_path=FIXTURES / "v1" / "perltmem_en.json")
    assert s.id == "Zhao Lei"
    assert [x.id for x in s.sessions] == ["event_3_0_1", "event_3_0_0", "3_0_0#0@0", "3_0_0#0@1"]
    assert s.current_time == "2020-09-20 20:00"
    assert [q.type for q in s.questions] == ["profile", "social_relationship", "events", "dialogues"]
    assert s.questions[3].answer == "Hotpot."


def test_perltqa_default_location_and_character_filter(tmp_path):
    for name in ("perltmem_en_v2.json", "perltqa_en_v2.json"):
        (tmp_path / "perltqa").mkdir(exist_ok=True)
        (tmp_path / "perltqa" / name).write_bytes((FIXTURES / "v2" / name).read_bytes())
    assert [s.id for s in load_dataset("perltqa", data_dir=tmp_path, character_ids=["Chen Jie"])] == ["Chen Jie"]
    with pytest.raises(DatasetError, match=r"unknown character id Nobody for perltqa; valid ids include Wang Fang, Chen Jie"):
        load_dataset("perltqa", data_dir=tmp_path, character_ids=["Nobody"])


def test_perltqa_skips_protagonists_missing_from_one_file(caplog):
    with caplog.at_level(logging.WARNING):
        load_dataset("perltqa", dataset_path=FIXTURES / "v2")
    assert "Ghost Person" in caplog.text


def test_perltqa_missing_key_names_key_and_record(tmp_path):
    mem = json.loads((FIXTURES / "v2" / "perltmem_en_v2.json").read_text(encoding="utf-8"))
    del mem["Chen Jie"]["dialogues"]
    _write(tmp_path / "perltmem_en_v2.json", mem)
    (tmp_path / "perltqa_en_v2.json").write_bytes((FIXTURES / "v2" / "perltqa_en_v2.json").read_bytes())
    with pytest.raises(DatasetError, match=r"perltmem_en_v2.json record 'Chen Jie': missing key 'dialogues'"):
        load_dataset("perltqa", dataset_path=tmp_path)
    mem = json.loads((FIXTURES / "v2" / "perltmem_en_v2.json").read_text(encoding="utf-8"))
    del mem["Wang Fang"]["events"]["1_0_0"]["content"]
    _write(tmp_path / "perltmem_en_v2.json", mem)
    with pytest.raises(DatasetError, match=r"record 'Wang Fang' event '1_0_0': missing key 'content'"):
        load_dataset("perltqa", dataset_path=tmp_path)
    qa = json.loads((FIXTURES / "v2" / "perltqa_en_v2.json").read_text(encoding="utf-8"))
    del qa[1]["Chen Jie"]["profile"][0]["Answer"]
    _write(tmp_path / "perltqa_en_v2.json", qa)
    _write(tmp_path / "perltmem_en_v2.json", json.loads((FIXTURES / "v2" / "perltmem_en_v2.json").read_text()))
    with pytest.raises(DatasetError, match=r"character 'Chen Jie' section 'profile' question 0: missing key 'Answer'"):
        load_dataset("perltqa", dataset_path=tmp_path)


def test_perltqa_files_not_found(tmp_path):
    with pytest.raises(DatasetError, match=r"PerLTQA files not found: .*perltmem_en_v2.json"):
        load_dataset("perltqa", data_dir=tmp_path)
    lone = _write(tmp_path / "perltmem_en_v2.json", {})
    with pytest.raises(DatasetError, match="QA file not found beside"):
        load_dataset("perltqa", dataset_path=lone)


def test_perltqa_swapped_files_are_reported(tmp_path):
    with pytest.raises(DatasetError, match="looks like a memory file"):
        load_dataset("perltqa", dataset_path=FIXTURES / "v2" / "perltqa_en_v2.json",
                     qa_path=FIXTURES / "v2" / "perltmem_en_v2.json")


# ------------------------------------------------------------------------------------------ demo, dialogues


def test_demo_loads_without_data():
    (s,) = load_dataset("demo", data_dir="/nonexistent")
    assert s.dataset == "demo" and len(s.sessions) == 6 and len(s.questions) == 12
    assert all(x.time and x.messages for x in s.sessions)
    types = {q.type for q in s.questions}
    assert {"single-session-user", "single-session-assistant", "multi-session", "temporal-reasoning",
            "knowledge-update"} <= types
    unanswerable = [q for q in s.questions if q.answer == NOT_ANSWERABLE]
    assert len(unanswerable) == 1 and unanswerable[0].extra["abstention"] is True
    assert s.current_time >= s.sessions[-1].time


def test_dialogues_format_round_trip(tmp_path):
    samples = load_dataset("demo") + [_sample()]
    path = save_dialogues(samples, tmp_path / "sub" / "d.json")
    assert not [p for p in path.parent.iterdir() if p.name != "d.json"]  # no temporary file left
    assert load_dataset("dialogues", dataset_path=path) == samples
    assert [s.id for s in load_dataset("dialogues", dataset_path=path, sample_ids=["s1"])] == ["s1"]
    with pytest.raises(DatasetError, match="needs --dataset-path"):
        load_dataset("dialogues")
    with pytest.raises(DatasetError, match="dialogue file not found"):
        load_dataset("dialogues", dataset_path=tmp_path / "nope.json")


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match=r"unknown dataset 'mmlu' \(valid: locomo, longmemeval, perltqa, demo, dialogues\)"):
        load_dataset("mmlu")
