"""Uncertainty for judged accuracies: intervals for one run, paired tests for two.

Pure functions over counts or 0/1 outcomes; the bootstraps take a seed, so the same inputs give the same interval.

* ``wilson_interval``: the Wilson score interval of a binomial proportion. Used when questions can be taken as
  independent (one sample, or one question per sample as in LongMemEval).
* ``cluster_bootstrap_interval``: a percentile bootstrap that resamples whole clusters (the questions of one
  sample share one memory, so their outcomes are correlated; resampling questions one by one would understate the
  spread). Used for groups that span several samples with several questions each (LoCoMo).
* ``paired_bootstrap_difference``: the interval of accuracy(A) - accuracy(B) over the same questions, resampling
  questions (or clusters of them) jointly so that each resample keeps the pairing.
* ``mcnemar_exact``: the two-sided exact McNemar p-value (a binomial test on the discordant pairs).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Hashable, Sequence

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0

# Below this many samples a bootstrap over samples has too few distinct resamples to mean anything.
MIN_CLUSTERS = 5

WILSON = "wilson"
CLUSTER_BOOTSTRAP = "cluster_bootstrap"
METHODS = {
    WILSON: f"Wilson score interval, questions taken as independent (used when the group has one question per "
            f"sample or fewer than {MIN_CLUSTERS} samples)",
    CLUSTER_BOOTSTRAP: f"percentile bootstrap over samples (questions clustered by sample), {N_RESAMPLES} resamples, "
                       f"seed {SEED}, never narrower than the Wilson interval",
}
PAIRED_BOOTSTRAP = "paired_bootstrap"
PAIRED_CLUSTER_BOOTSTRAP = "paired_cluster_bootstrap"
PAIRED_METHODS = {
    PAIRED_BOOTSTRAP: f"paired percentile bootstrap over questions, {N_RESAMPLES} resamples, seed {SEED}",
    PAIRED_CLUSTER_BOOTSTRAP: f"paired percentile bootstrap over samples (questions clustered by sample), "
                              f"{N_RESAMPLES} resamples, seed {SEED}, never narrower than the one over questions",
}


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The Wilson score interval of successes / n as proportions in [0, 1]; None when n is 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    z = _z(confidence)
    z2 = z * z
    p = successes / n
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # The closed form can land a hair outside [0, 1] (or off the exact 0 / 1 at the ends) in floating point.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _cluster_sums(outcomes: Sequence[float], clusters: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (sum of outcomes, count); every outcome is its own cluster when ``clusters`` is None."""
    if clusters is None:
        arr = np.asarray(outcomes, dtype=float)
        return arr, np.ones_like(arr)
    if len(clusters) != len(outcomes):
        raise ValueError(f"{len(outcomes)} outcomes but {len(clusters)} cluster labels")
    index: dict[Hashable, int] = {}
    for c in clusters:
        index.setdefault(c, len(index))
    sums = np.zeros(len(index))
    counts = np.zeros(len(index))
    for value, c in zip(outcomes, clusters):
        sums[index[c]] += value
        counts[index[c]] += 1
    return sums, counts


def _bootstrap_ratios(sums: np.ndarray, counts: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = len(sums)
    # Drawn in blocks so a large run (thousands of questions, no clusters) stays within a few MB.
    block = max(1, min(n_resamples, 2_000_000 // max(k, 1)))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, block):
        stop = min(n_resamples, start + block)
        idx = rng.integers(0, k, size=(stop - start, k))
        out[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return out


def cluster_bootstrap_interval(outcomes: Sequence[float], clusters: Sequence[Hashable] | None = None, *,
                               confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                               seed: int = SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of 0/1 outcomes, resampling whole clusters with replacement.

    Each resample draws as many clusters as there are and takes the pooled mean (sum of outcomes over sum of
    counts), so large clusters weigh what they hold. None when there are no outcomes.
    """
    _z(confidence)
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    if len(outcomes) == 0:
        return None
    sums, counts = _cluster_sums(outcomes, clusters)
    return _percentile_interval(_bootstrap_ratios(sums, counts, n_resamples, seed), confidence)


def paired_bootstrap_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable] | None = None,
                                *, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                                seed: int = SEED) -> tuple[float, float] | None:
    """Percentile bootstrap interval of mean(a) - mean(b) over paired outcomes (question i scored by A and by B).

    Questions (or, with ``clusters``, whole samples) are resampled once for both runs, which keeps the pairing.
    None when there are no pairs.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    return cluster_bootstrap_interval(diffs, clusters, confidence=confidence, n_resamples=n_resamples, seed=seed)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``a_only``: questions A got right and B wrong; ``b_only``: the reverse. Under the null hypothesis each
    discordant pair goes either way with probability 1/2, so the p-value is twice the smaller binomial tail,
    capped at 1 (1.0 when there are no discordant pairs).
    """
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be non-negative")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    # Exact integer arithmetic, then one division: no underflow for large n.
    return min(1.0, 2 * tail / 2**n)


def _clustered(clusters: Sequence[Hashable]) -> bool:
    """True when outcomes come several to a cluster from enough clusters for a bootstrap over clusters."""
    per_cluster: dict[Hashable, int] = {}
    for c in clusters:
        per_cluster[c] = per_cluster.get(c, 0) + 1
    return len(per_cluster) >= MIN_CLUSTERS and max(per_cluster.values()) >= 2


def _hull(a: tuple[float, float] | None, b: tuple[float, float] | None) -> tuple[float, float] | None:
    if a is None or b is None:
        return a or b
    return min(a[0], b[0]), max(a[1], b[1])


def accuracy_interval(outcomes: Sequence[int], clusters: Sequence[Hashable], *, confidence: float = CONFIDENCE,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[tuple[float, float] | None, str]:
    """The interval of one group's accuracy and the method used (a key of ``METHODS``).

    Questions of one sample share a memory, so their outcomes are correlated: when the group's questions come
    several to a sample from at least ``MIN_CLUSTERS`` samples, a bootstrap over samples; otherwise the Wilson
    interval. The bootstrap's interval is widened where needed to contain the Wilson one: with few clusters it
    understates the spread (it sees only between-sample variation, estimated from a handful of samples), and
    clustering does not make questions more informative than independent ones.
    """
    wilson = wilson_interval(int(sum(outcomes)), len(outcomes), confidence)
    if _clustered(clusters):
        boot = cluster_bootstrap_interval(outcomes, clusters, confidence=confidence, n_resamples=n_resamples,
                                          seed=seed)
        return _hull(boot, wilson), CLUSTER_BOOTSTRAP
    return wilson, WILSON


def paired_difference_interval(a: Sequence[int], b: Sequence[int], clusters: Sequence[Hashable], *,
                               confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                               seed: int = SEED) -> tuple[tuple[float, float] | None, str]:
    """The interval of accuracy(a) - accuracy(b) and its method (a key of ``PAIRED_METHODS``), by the same rule
    as ``accuracy_interval``: over samples when clustered, never narrower than the bootstrap over questions."""
    flat = paired_bootstrap_difference(a, b, None, confidence=confidence, n_resamples=n_resamples, seed=seed)
    if _clustered(clusters):
        boot = paired_bootstrap_difference(a, b, clusters, confidence=confidence, n_resamples=n_resamples, seed=seed)
        return _hull(boot, flat), PAIRED_CLUSTER_BOOTSTRAP
    return flat, PAIRED_BOOTSTRAP


def as_percent(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval of proportions as [lo, hi] percentages with 2 decimals (the unit of the accuracies)."""
    if interval is None:
        return None
    return [round(100.0 * interval[0], 2), round(100.0 * interval[1], 2)]

