import math

import pytest

from eval import metrics
from eval.metrics import (
    CATEGORY_5_RULE,
    LEXICAL_PROTOCOL,
    LOCOMO_SCRIPT_PROTOCOL,
    adversarial_score,
    bleu1,
    category_key,
    expresses_unavailability,
    locomo_bleu1,
    locomo_f1,
    locomo_script_f1,
    multi_hop_f1,
    normalize_answer,
    summarize,
    token_f1,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- normalisation


def test_normalize_drops_commas_case_punctuation_articles():
    assert normalize_answer("The Quick, brown fox and a Dog!") == "quick brown fox dog"


def test_normalize_drops_commas_before_punctuation_so_numbers_join():
    assert normalize_answer("1,000 dollars.") == "1000 dollar"


def test_normalize_stems_tokens():
    assert normalize_answer("running dogs") == "run dog"
    assert normalize_answer("dog runs") == "dog run"


def test_normalize_keeps_article_letters_inside_words():
    # "and"/"a" only go as whole words: "andrew" and "banana" survive.
    assert normalize_answer("Andrew and a banana") == "andrew banana"


def test_normalize_handles_non_strings():
    assert normalize_answer(2022) == "2022"
    assert normalize_answer(None) == ""


# ----------------------------------------------------------------------------- F1


def test_token_f1_stemming_makes_reordered_forms_match():
    assert token_f1("running dogs", "dog runs") == pytest.approx(1.0)


def test_token_f1_hand_computed():
    # pred -> [cat, sat, on, mat], gold -> [cat, on, hat]: overlap 2, P=1/2, R=2/3, F1=4/7
    assert token_f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(4 / 7)


def test_token_f1_is_multiset():
    # overlap min(3, 1) = 1: P=1/3, R=1/2, F1=2/5
    assert token_f1("dog dog dog", "dog cat") == pytest.approx(0.4)


def test_token_f1_empty_cases():
    # LoCoMo's script gives F1 0 without a shared token, so empty against empty is 0 too (issue 10, item 4).
    assert token_f1("", "") == 0.0
    assert token_f1("the", "an") == 0.0  # both empty after normalisation
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "") == 0.0
    assert token_f1("London", "Paris") == 0.0


def test_multi_hop_splits_on_commas_and_averages_best_match_per_gold_part():
    # gold parts: pari / london / rome; prediction parts: "london pari" / "berlin"
    # pari -> 2/3, london -> 2/3, rome -> 0: mean 4/9 (plain token F1 would be 2/3)
    pred, gold = "London and Paris, Berlin", "Paris, London, Rome"
    assert multi_hop_f1(pred, gold) == pytest.approx(4 / 9)
    assert locomo_f1(pred, gold, 1) == pytest.approx(4 / 9)
    assert token_f1(pred, gold) == pytest.approx(2 / 3)


def test_multi_hop_exact_list_in_any_order_scores_one():
    assert locomo_f1("Rome, Paris", "Paris, Rome", 1) == pytest.approx(1.0)


def test_multi_hop_without_commas_is_plain_f1():
    expected = token_f1("painting pottery", "pottery")
    assert locomo_f1("painting pottery", "pottery", 1) == pytest.approx(expected)


def test_other_categories_use_token_f1():
    for cat in (2, 4, None):
        assert locomo_f1("the cat sat on the mat", "a cat on a hat", cat) == pytest.approx(4 / 7)


def test_open_domain_scores_gold_before_semicolon():
    assert locomo_f1("Likely no", "Likely no; since this one went badly", 3) == pytest.approx(1.0)


def test_adversarial_scores_expressed_unavailability():
    assert locomo_f1("Not answerable.", "Not answerable", 5) == 1.0
    assert locomo_f1("There is no information about her trip.", "Not answerable", 5) == 1.0
    assert locomo_f1("That wasn\u2019t mentioned in our chats", "Not answerable", 5) == 1.0
    assert locomo_f1("It is not mentioned.", "Not answerable", 5) == 1.0
    assert locomo_f1("Sweden", "Not answerable", 5) == 0.0
    assert locomo_f1("Sweden", "Sweden", 5) == 0.0  # adversarial: repeating a specific answer earns nothing


def test_expresses_unavailability_unifies_apostrophes():
    assert expresses_unavailability("I don\u2019t know")
    assert not expresses_unavailability("She knows it well")


# ----------------------------------------------------------------------------- BLEU-1


def test_bleu1_brevity_penalty_hand_computed():
    # pred [cat, sat] (c=2), ref [cat, sat, on, mat] (r=4): precision 1, BP = exp(1 - 4/2)
    assert bleu1("cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1))


def test_bleu1_clips_counts_and_no_penalty_when_longer():
    # c=4 > r=2: BP 1; clipped matches min(4, 1) = 1 -> 1/4
    assert bleu1("dog dog dog dog", "dog cat") == pytest.approx(0.25)


def test_bleu1_equal_length_has_no_penalty():
    assert bleu1("red car", "red bike") == pytest.approx(0.5)


def test_bleu1_empty_cases():
    assert bleu1("", "") == 0.0
    assert bleu1("", "Paris") == 0.0
    assert bleu1("Paris", "") == 0.0


def test_locomo_bleu1_category_rules():
    assert locomo_bleu1("Not answerable", "Not answerable", 5) == 1.0
    assert locomo_bleu1("Sweden", "Not answerable", 5) == 0.0
    assert locomo_bleu1("Likely no", "Likely no; since this one went badly", 3) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- hand-computed table

E1 = math.exp(-1)

# (prediction, gold, category, also_correct, our F1, our BLEU-1, F1 under LoCoMo's own script), each worked by hand on
# normalised, Porter-stemmed tokens (commas, case, punctuation and a/an/the/and dropped).
HAND_CASES = [
    # [cat sat on mat] vs [cat on hat]: overlap 2, P 2/4, R 2/3, F1 4/7; BLEU c=4 > r=3, BP 1, 2/4
    ("The cat sat on the mat", "a cat on a hat", 4, None, 4 / 7, 0.5, 4 / 7),
    # multiset: overlap min(3,1)=1, P 1/3, R 1/2, F1 2/5; BLEU c=3 > r=2, clipped 1/3
    ("dog dog dog", "dog cat", 4, None, 0.4, 1 / 3, 0.4),
    # category 2, same date written with a comma: [7 may 2023] both sides
    ("7 May 2023", "7 May, 2023", 2, None, 1.0, 1.0, 1.0),
    # [on 8 may 2023] vs [7 may 2023]: overlap 2, P 2/4, R 2/3, F1 4/7; BLEU c=4 > r=3, 2/4
    ("On 8 May 2023", "7 May 2023", 2, None, 4 / 7, 0.5, 4 / 7),
    # category 1: gold parts pari / london; pred part pari: (1 + 0) / 2; BLEU [pari] vs [pari london]: 1 * e^(1-2/1)
    ("Paris", "Paris, London", 1, None, 0.5, E1, 0.5),
    # category 1 with a stray comma: gold parts london / pari / "" -> (1 + 1 + 0) / 3; BLEU c = r = 2, 2/2
    ("Paris, London", "London, Paris,", 1, None, 2 / 3, 1.0, 2 / 3),
    # category 3: only "Likely yes" is scored: [like ye] vs [ye like]
    ("yes, likely", "Likely yes; she loves the beach", 3, None, 1.0, 1.0, 1.0),
    # empty against empty: 0, as LoCoMo's script (and nltk's BLEU)
    ("", "", 4, None, 0.0, 0.0, 0.0),
    ("the", "Paris", 4, None, 0.0, 0.0, 0.0),
    # category 5: ours accepts "Not answerable" (our answer prompt's phrase); LoCoMo's script only its two phrases
    ("Not answerable", "Not answerable", 5, None, 1.0, 1.0, 0.0),
    ("There is no information available about it.", "Not answerable", 5, None, 1.0, 1.0, 1.0),
    ("That was not mentioned.", "Not answerable", 5, None, 1.0, 1.0, 1.0),
    ("I don't know", "Not answerable", 5, None, 1.0, 1.0, 0.0),
    ("Sweden", "Not answerable", 5, None, 0.0, 0.0, 0.0),
    # the two conv-26 items whose dataset answer is "No": a "No" answer counts under ours, not under the script
    ("No, Melanie made it.", "Not answerable", 5, "No", 1.0, 1.0, 0.0),
    ("No", "Not answerable", 5, "No", 1.0, 1.0, 0.0),
    ("Yes", "Not answerable", 5, "No", 0.0, 0.0, 0.0),
    ("Nobody knows", "Not answerable", 5, "No", 0.0, 0.0, 0.0),
    ("Not mentioned anywhere", "Not answerable", 5, "No", 1.0, 1.0, 1.0),
    # without the dataset's own answer a bare "No" is a specific (wrong) answer
    ("No", "Not answerable", 5, None, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("pred,gold,cat,also,f1,b1,script", HAND_CASES)
def test_lexical_metrics_match_hand_computed_values(pred, gold, cat, also, f1, b1, script):
    assert locomo_f1(pred, gold, cat, also) == pytest.approx(f1)
    assert locomo_bleu1(pred, gold, cat, also) == pytest.approx(b1)
    assert locomo_script_f1(pred, gold, cat) == pytest.approx(script)


@pytest.mark.parametrize("pred,gold", [("", ""), ("", "Paris"), ("Paris", ""), ("cat sat", "the cat sat on the mat"),
                                       ("dog dog dog dog", "dog cat"), ("red car", "red bike")])
def test_bleu1_equals_nltk_sentence_bleu_on_normalised_tokens(pred, gold):
    import warnings

    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when there is no overlap
        expected = sentence_bleu([normalize_answer(gold).split()], normalize_answer(pred).split(), weights=(1, 0, 0, 0))
    assert bleu1(pred, gold) == pytest.approx(expected)


def test_adversarial_score_needs_a_polar_dataset_answer():
    assert adversarial_score("No, it was Melanie", "No") == 1.0
    assert adversarial_score("No, it was Melanie", "Melanie") == 0.0  # only a yes/no answer is matched by its word
    assert adversarial_score("No, it was Melanie") == 0.0


# ----------------------------------------------------------------------------- summarize


def _rec(sample, qid, cat, label, prediction, gold, failed=False, reason=None):
    return {
        "sample_id": sample,
        "question_id": qid,
        "type": metrics.LOCOMO_CATEGORY_NAMES[cat],
        "category": cat,
        "category_name": metrics.LOCOMO_CATEGORY_NAMES[cat],
        "label": label,
        "failed": failed,
        "failure_reason": reason,
        "prediction": prediction,
        "gold": gold,
    }


@pytest.fixture
def locomo_records():
    return [
        _rec("s1", "q1", 4, "CORRECT", "Paris", "Paris"),
        _rec("s1", "q2", 4, "WRONG", "London", "Paris"),
        _rec("s1", "q3", 1, "CORRECT", "Rome, Paris", "Paris, Rome"),
        _rec("s1", "q4", 5, "CORRECT", "Not answerable", "Not answerable"),
        _rec("s1", "q5", 2, None, None, "7 May 2023", failed=True, reason="answer: LLMCallError"),
        _rec("s2", "q6", 4, "CORRECT", "a red car", "red car"),
        _rec("s2", "q7", 5, "WRONG", "Sweden", "Not answerable"),
        _rec("s2", "q8", 3, "correct", "Likely no", "Likely no; since this one went badly"),
    ]


def test_summarize_overall_counts(locomo_records):
    s = summarize(locomo_records, dataset="locomo")
    assert s["n_questions"] == 8
    assert s["n_failed"] == 1
    assert s["n_judged"] == 7
    assert s["n_correct"] == 5
    assert s["accuracy"] == 71.43  # 5 / 7
    assert s["accuracy_all"] == 62.5  # 5 / 8
    assert s["failure_reasons"] == {"answer: LLMCallError": 1}


def test_summarize_with_and_without_adversarial(locomo_records):
    s = summarize(locomo_records, dataset="locomo")
    assert s["with_adversarial"]["n"] == 8
    assert s["with_adversarial"]["accuracy"] == 71.43
    wo = s["without_adversarial"]
    assert (wo["n"], wo["n_judged"], wo["correct"]) == (6, 5, 4)
    assert wo["accuracy"] == 80.0
    assert wo["accuracy_all"] == 66.67


def test_summarize_by_category_keys_and_values(locomo_records):
    s = summarize(locomo_records, dataset="locomo")
    assert list(s["by_category"]) == [
        "1 multi-hop", "2 temporal", "3 open-domain", "4 single-hop", "5 adversarial",
    ]
    single = s["by_category"]["4 single-hop"]
    assert (single["n"], single["correct"], single["accuracy"]) == (3, 2, 66.67)
    assert s["by_category"]["5 adversarial"]["accuracy"] == 50.0
    temporal = s["by_category"]["2 temporal"]
    assert temporal["accuracy"] is None and temporal["accuracy_all"] == 0.0 and temporal["n_failed"] == 1


def test_summarize_by_type_and_sample(locomo_records):
    s = summarize(locomo_records, dataset="locomo")
    single = s["by_type"]["single-hop"]
    assert single["ci_method"] == "wilson" and single["accuracy_ci95"] == [20.77, 93.85]  # 2 of 3, two samples
    assert {k: v for k, v in single.items() if "ci" not in k} == {
        "n": 3, "n_judged": 3, "n_failed": 0, "correct": 2, "accuracy": 66.67, "accuracy_all": 66.67,
    }
    assert s["by_sample"]["s1"]["accuracy"] == 75.0  # 3 / 4 judged
    assert s["by_sample"]["s1"]["accuracy_all"] == 60.0  # 3 / 5
    assert s["by_sample"]["s2"]["accuracy"] == 66.67


def test_summarize_lexical(locomo_records):
    lex = summarize(locomo_records, dataset="locomo")["lexical"]
    assert lex["protocol"] == LEXICAL_PROTOCOL
    assert lex["n"] == 7 and lex["n_missing"] == 1
    # F1 per answered record: 1, 0, 1, 1, 1, 0, 1 -> 5/7
    assert lex["f1"] == 71.43
    assert lex["by_category"]["5 adversarial"] == {"n": 2, "f1": 50.0, "bleu1": 50.0}
    assert lex["by_category"]["4 single-hop"]["f1"] == 66.67
    assert lex["without_adversarial"]["n"] == 5
    assert lex["without_adversarial"]["f1"] == 80.0


def test_summarize_lexical_reports_locomo_script_rule_labelled(locomo_records):
    lex = summarize(locomo_records, dataset="locomo")["lexical"]
    assert lex["category_5_rule"] == CATEGORY_5_RULE and "31 phrases" in CATEGORY_5_RULE
    script = lex["locomo_script"]
    assert script["protocol"] == LOCOMO_SCRIPT_PROTOCOL
    assert "no information available" in script["protocol"] and "not mentioned" in script["protocol"]
    # q4 "Not answerable" scores 1 under ours, 0 under the script: 1, 0, 1, 0, 1, 0, 1 -> 4/7
    assert (script["n"], script["f1"]) == (7, 57.14)
    assert script["by_category"]["5 adversarial"] == {"n": 2, "f1": 0.0}
    assert script["without_adversarial"] == {"n": 5, "f1": lex["without_adversarial"]["f1"]}
    assert lex["f1"] == 71.43  # our figure is unchanged beside it


def test_summarize_grades_dataset_no_answer_of_adversarial_items():
    records = [
        {**_rec("conv-26", "q1", 5, "CORRECT", "No, Melanie made it.", "Not answerable"), "also_correct": "No"},
        {**_rec("conv-26", "q2", 5, "WRONG", "Yes, Oscar is hers.", "Not answerable"), "also_correct": "No"},
        _rec("conv-26", "q3", 5, "CORRECT", "It is not mentioned.", "Not answerable"),
        _rec("conv-26", "q4", 5, "WRONG", "No", "Not answerable"),
    ]
    lex = summarize(records, dataset="locomo")["lexical"]
    assert lex["by_category"]["5 adversarial"] == {"n": 4, "f1": 50.0, "bleu1": 50.0}  # q1, q3
    assert lex["locomo_script"]["by_category"]["5 adversarial"] == {"n": 4, "f1": 25.0}  # q3 only


def test_report_shows_locomo_script_f1(locomo_records):
    report = metrics.render_report(summarize(locomo_records, dataset="locomo"), title="t", chart_name=None)
    assert "F1 by LoCoMo's own script rules (category 5: two phrases) 57.14%" in report


def test_summarize_non_locomo_has_no_category_breakdown():
    records = [
        {"sample_id": "a1", "question_id": "a1", "type": "temporal-reasoning", "category": None,
         "category_name": None, "label": "CORRECT", "failed": False, "failure_reason": None,
         "prediction": "3 days", "gold": "3 days"},
        {"sample_id": "a2", "question_id": "a2_abs", "type": "knowledge-update", "category": None,
         "category_name": None, "label": "WRONG", "failed": False, "failure_reason": None,
         "prediction": "Boston", "gold": "Denver"},
    ]
    s = summarize(records, dataset="longmemeval")
    assert "by_category" not in s and "without_adversarial" not in s
    assert s["accuracy"] == 50.0
    assert s["by_type"]["temporal-reasoning"]["accuracy"] == 100.0
    assert s["lexical"]["f1"] == 50.0
    assert s["lexical"]["by_type"]["knowledge-update"]["f1"] == 0.0


def test_summarize_empty():
    s = summarize([], dataset="locomo")
    assert s["n_questions"] == 0 and s["accuracy"] is None and s["lexical"]["f1"] is None


def test_category_key_defaults_to_locomo_names():
    assert category_key(4) == "4 single-hop"
    assert category_key(4, "single hop") == "4 single hop"


# ----------------------------------------------------------------------------- report


def _full_summary(records, **extra):
    s = summarize(records, dataset="locomo")
    s.update(
        models={"answer": "gpt-4.1-mini", "agents": "Qwen3-4B"},
        judge={"protocol": "paper", "model": "gpt-4.1", "prompt": "judge.paper"},
        usage={"answer": {"calls": 8, "failures": 1, "prompt_tokens": 12000, "completion_tokens": 300,
                          "latency_s": 4.5}},
        timing={"build": 120.25, "answer": 10.0, "judge": 5.5},
        **extra,
    )
    return s


def test_write_report_writes_markdown_and_png(tmp_path, locomo_records):
    run_dir = tmp_path / "run"
    paths = write_report(run_dir, _full_summary(locomo_records), title="LoCoMo dev run")

    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert paths["report"] == run_dir / "report.md"
    assert report.startswith("# LoCoMo dev run")
    assert "71.43%" in report and "62.50%" in report
    assert "without adversarial 80.00%" in report
    assert "| 4 single-hop | 3 |" in report
    assert "| s1 |" in report and "| s2 |" in report
    assert "gpt-4.1-mini" in report and "judge.paper" in report
    assert "failed:** 1" in report
    assert "12,000" in report  # token usage table
    assert "120.2 s" in report or "120.3 s" in report  # timing table
    assert LEXICAL_PROTOCOL in report
    assert "](accuracy_by_category.png)" in report
    assert "OFFLINE BASELINE" not in report

    png = (run_dir / "accuracy_by_category.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert sorted(p.name for p in run_dir.iterdir()) == ["accuracy_by_category.png", "report.md"]


def test_write_report_baseline_note_is_prominent(tmp_path, locomo_records):
    write_report(tmp_path, _full_summary(locomo_records, baseline=True), title="Offline")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    header = report.splitlines()[:4]
    assert any("OFFLINE BASELINE" in line and "not an LLM result" in line for line in header)


def test_write_report_per_type_chart_for_longmemeval(tmp_path):
    records = [
        {"sample_id": f"q{i}", "question_id": f"q{i}", "type": t, "category": None, "category_name": None,
         "label": lab, "failed": False, "failure_reason": None, "prediction": "x", "gold": "x"}
        for i, (t, lab) in enumerate([("multi-session", "CORRECT"), ("temporal-reasoning", "WRONG")] * 15)
    ]
    s = summarize(records, dataset="longmemeval")
    write_report(tmp_path, s, title="LongMemEval")
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Accuracy by type" in report
    assert "30 samples" in report  # per-sample table folded when there are many samples
    assert (tmp_path / "accuracy_by_category.png").read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_overwrites_atomically(tmp_path, locomo_records):
    write_report(tmp_path, _full_summary(locomo_records), title="first")
    write_report(tmp_path, _full_summary(locomo_records), title="second")
    assert (tmp_path / "report.md").read_text(encoding="utf-8").startswith("# second")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
