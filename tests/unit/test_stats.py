"""Intervals and the exact McNemar test on cases whose values follow from the definitions."""
import math

import pytest

from eval import stats
from eval.metrics import render_report, summarize
from eval.stats import (accuracy_interval, cluster_bootstrap_interval, mcnemar_exact, paired_bootstrap_difference,
                        paired_difference_interval, wilson_interval)

Z95 = 1.959963984540054


def _wilson_by_hand(k, n, z=Z95):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# ----------------------------------------------------------------------------- Wilson


def test_wilson_eight_of_ten_matches_the_published_value():
    # The textbook case (Newcombe 1998, method 3): 8/10 -> 0.4902 to 0.9433.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


@pytest.mark.parametrize("k,n", [(1, 2), (5, 7), (37, 80), (990, 1000)])
def test_wilson_matches_the_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(_wilson_by_hand(k, n), abs=1e-12)


def test_wilson_at_the_ends_is_exact_and_stays_in_unit_range():
    # k = 0: the lower end is 0 and the upper end is z^2 / (n + z^2).
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z95**2 / (10 + Z95**2)))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + Z95**2))


def test_wilson_half_is_symmetric_around_one_half():
    lo, hi = wilson_interval(50, 100)
    assert lo + hi == pytest.approx(1.0) and lo == pytest.approx(0.4038, abs=1e-4)


def test_wilson_other_confidence_and_bad_input():
    lo90, hi90 = wilson_interval(8, 10, confidence=0.90)
    lo95, hi95 = wilson_interval(8, 10)
    assert lo95 < lo90 < hi90 < hi95
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


# ----------------------------------------------------------------------------- bootstraps


def test_cluster_bootstrap_two_opposite_clusters_spans_everything():
    # Clusters all-correct (10) and all-wrong (10): a resample is {A,A}, {A,B}, {B,A} or {B,B}, each 1/4, giving
    # 1, 1/2, 1/2, 0. The 2.5 % and 97.5 % points are therefore 0 and 1.
    outcomes = [1] * 10 + [0] * 10
    clusters = ["A"] * 10 + ["B"] * 10
    assert cluster_bootstrap_interval(outcomes, clusters) == (0.0, 1.0)
    # The same outcomes taken as independent questions give a much narrower interval around 1/2.
    lo, hi = cluster_bootstrap_interval(outcomes, None)
    assert 0.2 < lo < 0.5 < hi < 0.8


def test_cluster_bootstrap_weighs_clusters_by_their_size():
    # One cluster of 1 correct, one of 3 wrong: resamples give 1 (1/4), 1/4 (1/2 of the time), 0 (1/4).
    lo, hi = cluster_bootstrap_interval([1, 0, 0, 0], ["a", "b", "b", "b"], n_resamples=4000)
    assert (lo, hi) == (0.0, 1.0)
    lo, hi = cluster_bootstrap_interval([1, 0, 0, 0], ["a", "b", "b", "b"], confidence=0.40, n_resamples=4000)
    assert lo == hi == 0.25


def test_bootstrap_degenerate_cases_and_seed():
    assert cluster_bootstrap_interval([1, 1, 1], ["a", "b", "c"]) == (1.0, 1.0)
    assert cluster_bootstrap_interval([1, 0, 1, 0], ["a"] * 4) == (0.5, 0.5)  # one cluster: nothing to resample
    assert cluster_bootstrap_interval([], None) is None
    outcomes = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1] * 5
    assert cluster_bootstrap_interval(outcomes, seed=3) == cluster_bootstrap_interval(outcomes, seed=3)
    assert (cluster_bootstrap_interval(outcomes, seed=3, n_resamples=30)
            != cluster_bootstrap_interval(outcomes, seed=4, n_resamples=30))


def test_iid_bootstrap_is_close_to_wilson_for_a_large_sample():
    outcomes = [1] * 300 + [0] * 700
    lo, hi = cluster_bootstrap_interval(outcomes, None, n_resamples=4000)
    wlo, whi = wilson_interval(300, 1000)
    assert lo == pytest.approx(wlo, abs=0.006) and hi == pytest.approx(whi, abs=0.006)


def test_paired_bootstrap_difference_known_cases():
    # B wins every question: the difference is exactly -1 in every resample.
    assert paired_bootstrap_difference([0] * 8, [1] * 8) == (-1.0, -1.0)
    # Identical runs: the difference is 0 in every resample, however the accuracies vary.
    a = [1, 0, 1, 1, 0, 0, 1, 0]
    assert paired_bootstrap_difference(a, a) == (0.0, 0.0)
    # Pairing matters: A and B differ on two opposite questions only, so each resample's difference is
    # (wins - losses) / 2 over two draws: -1, 0, 0, 1 -> the interval is [-1, 1].
    assert paired_bootstrap_difference([1, 0], [0, 1]) == (-1.0, 1.0)
    with pytest.raises(ValueError):
        paired_bootstrap_difference([1], [1, 0])


def test_paired_bootstrap_resamples_clusters_together():
    # Sample s1: A better on both; sample s2: B better on both. Clustered, the only resampled differences are
    # +1, 0, 0, -1.
    a, b, clusters = [1, 1, 0, 0], [0, 0, 1, 1], ["s1", "s1", "s2", "s2"]
    assert paired_bootstrap_difference(a, b, clusters) == (-1.0, 1.0)
    lo, hi = paired_bootstrap_difference(a, b, clusters, confidence=0.40, n_resamples=4000)
    assert lo == hi == 0.0


# ----------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_known_values():
    # 1 vs 9 discordant: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    # 0 vs 5: 2 / 32.
    assert mcnemar_exact(0, 5) == pytest.approx(1 / 16)
    # 2 vs 8: 2 * (1 + 10 + 45) / 1024 = 0.109375.
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375)
    # A tie, or no discordant pairs at all: no evidence, p = 1.
    assert mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 1) == 1.0


def test_mcnemar_exact_large_counts_do_not_underflow():
    p = mcnemar_exact(400, 600)
    assert 0.0 < p < 1e-9
    # The normal approximation with continuity correction is close for this many pairs.
    z = (abs(400 - 600) - 1) / math.sqrt(1000)
    approx = math.erfc(z / math.sqrt(2))
    assert p == pytest.approx(approx, rel=0.2)


# ----------------------------------------------------------------------------- choice of method and summaries


def test_accuracy_interval_picks_the_method_from_the_clustering():
    ci, method = accuracy_interval([1, 0, 1], ["s1", "s1", "s1"])
    assert method == stats.WILSON and ci == wilson_interval(2, 3)
    ci, method = accuracy_interval([1, 0, 1], ["a", "b", "c"])  # one question per sample (LongMemEval)
    assert method == stats.WILSON
    # Two samples are too few to resample: Wilson.
    ci, method = accuracy_interval([1, 1, 0, 0], ["a", "a", "b", "b"])
    assert method == stats.WILSON and ci == wilson_interval(2, 4)
    assert accuracy_interval([], []) == (None, stats.WILSON)


def test_accuracy_interval_bootstraps_over_five_or_more_samples():
    # Samples a, b, c all right, d, e all wrong (4 questions each). A resample's accuracy is the share of right
    # samples among 5 drawn, Binomial(5, 0.6) / 5: P(0) = 1 %, P(<= 1) = 8.7 %, P(5) = 7.8 %, so the 2.5 % and
    # 97.5 % points are 0.2 and 1.0, wider than Wilson's for 12 of 20 on both ends.
    outcomes = [1] * 12 + [0] * 8
    clusters = [c for c in "abcde" for _ in range(4)]
    ci, method = accuracy_interval(outcomes, clusters)
    assert method == stats.CLUSTER_BOOTSTRAP and ci == (0.2, 1.0)
    wlo, whi = wilson_interval(12, 20)
    assert ci[0] < wlo and ci[1] > whi


def test_cluster_interval_is_never_narrower_than_wilson():
    # Every sample 1 right of 2: each resample gives exactly 1/2, so the bootstrap alone is a point.
    outcomes = [1, 0] * 5
    clusters = [c for c in "abcde" for _ in range(2)]
    assert cluster_bootstrap_interval(outcomes, clusters) == (0.5, 0.5)
    assert accuracy_interval(outcomes, clusters) == (wilson_interval(5, 10), stats.CLUSTER_BOOTSTRAP)


def test_paired_difference_interval_method_and_hull():
    a, b = [1, 0] * 5, [0, 1] * 5  # within every sample A wins one and loses one
    clusters = [c for c in "abcde" for _ in range(2)]
    ci, method = paired_difference_interval(a, b, clusters)
    assert method == stats.PAIRED_CLUSTER_BOOTSTRAP
    assert paired_bootstrap_difference(a, b, clusters) == (0.0, 0.0)  # every cluster's difference is 0
    assert ci == paired_bootstrap_difference(a, b, None)  # so the interval is the one over questions
    assert ci[0] < 0 < ci[1]
    ci, method = paired_difference_interval([1, 1], [0, 0], ["x", "y"])
    assert method == stats.PAIRED_BOOTSTRAP and ci == (1.0, 1.0)


def _rec(sample, qid, label, failed=False):
    return {"sample_id": sample, "question_id": qid, "type": "t", "category": 4, "category_name": "single-hop",
            "label": label, "failed": failed, "failure_reason": "answer: timeout" if failed else None,
            "prediction": None if failed else "x", "gold": "x"}


def test_summarize_gives_every_accuracy_an_interval_and_its_method():
    records = [_rec("s1", "q1", "CORRECT"), _rec("s1", "q2", "WRONG"), _rec("s1", "q3", "CORRECT"),
               _rec("s2", "q4", "CORRECT"), _rec("s2", "q5", None, failed=True), _rec("s2", "q6", "CORRECT"),
               {**_rec("s2", "q7", "WRONG"), "category": 5, "category_name": "adversarial"}]
    records += [_rec(f"s{k}", f"q{k}{j}", "CORRECT" if j else "WRONG") for k in (3, 4, 5) for j in range(3)]
    s = summarize(records, dataset="locomo")
    assert s["intervals"]["confidence"] == 0.95 and set(s["intervals"]["methods"]) == set(stats.METHODS)
    assert s["ci_method"] == stats.CLUSTER_BOOTSTRAP  # 5 samples, several questions each
    lo, hi = s["accuracy_ci95"]
    wlo, whi = wilson_interval(s["n_correct"], s["n_judged"])
    assert lo <= round(100 * wlo, 2) and round(100 * whi, 2) <= hi
    # Per sample the questions are one cluster: Wilson, by hand.
    wlo, whi = wilson_interval(2, 3)
    assert s["by_sample"]["s1"]["ci_method"] == stats.WILSON
    assert s["by_sample"]["s1"]["accuracy_ci95"] == [round(100 * wlo, 2), round(100 * whi, 2)]
    # accuracy_all counts the failed question as wrong: s2 is 2 of 4.
    wlo, whi = wilson_interval(2, 4)
    assert s["by_sample"]["s2"]["accuracy_all_ci95"] == [round(100 * wlo, 2), round(100 * whi, 2)]
    for group in [*s["by_category"].values(), *s["by_type"].values(), s["with_adversarial"],
                  s["without_adversarial"]]:
        assert group["ci_method"] in stats.METHODS and group["ci_method_all"] in stats.METHODS
        assert group["accuracy_ci95"] is not None
    # One adversarial question from one sample: Wilson for 0 of 1.
    assert s["by_category"]["5 adversarial"]["accuracy_ci95"] == [0.0, round(100 * wilson_interval(0, 1)[1], 2)]


def test_summarize_is_deterministic():
    records = [_rec(f"s{i % 3}", f"q{i}", "CORRECT" if i % 4 else "WRONG") for i in range(30)]
    assert summarize(records, dataset="locomo") == summarize(records, dataset="locomo")


def test_report_prints_the_intervals_with_their_method():
    records = [_rec("s1", "q1", "CORRECT"), _rec("s1", "q2", "WRONG"), _rec("s2", "q3", "CORRECT"),
               _rec("s2", "q4", "CORRECT")]
    records += [_rec(f"s{k}", f"q{k}{j}", "CORRECT") for k in (3, 4, 5) for j in range(2)]
    s = summarize(records, dataset="locomo")
    text = render_report(s, title="t")
    lo, hi = s["accuracy_ci95"]
    assert f"**95% interval:** {lo:.2f}–{hi:.2f}% (bootstrap over samples)" in text
    assert "| 95% interval |" in text
    wlo, whi = (round(100 * x, 2) for x in wilson_interval(1, 2))
    assert f"| s1 | 2 | 2 | 1 | 0 | 50.00% | {wlo:.2f}–{whi:.2f}% (Wilson) |" in text
