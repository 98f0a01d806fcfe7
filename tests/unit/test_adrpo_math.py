"""ADRPO advantage maths (training/rl/adrpo.py) against hand-computed numbers; needs torch, not veRL."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed in this environment")

from training.rl.adrpo import (
    ADRPOConfigError,
    ADRPOSettings,
    attribution_multipliers,
    compute_adrpo_advantage,
    weights_from_extra_fields,
)

EPS = 1e-6


def _rewards(scores, length=4, last=None):
    """token_level_rewards with each score on the last valid token, as veRL lays outcome rewards out."""
    rewards = torch.zeros(len(scores), length)
    for i, score in enumerate(scores):
        rewards[i, (last[i] if last else length) - 1] = score
    return rewards


def _hand(scores, groups, weights=None, norm=True):
    """The PAPER §5 formula, written out: (r - mean) / (stdev + eps) per group, times the weight."""
    weights = weights or [1.0] * len(scores)
    out = []
    for i, score in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        if len(members) == 1:
            out.append(0.0)
            continue
        centred = score - statistics.fmean(members)
        value = centred / (statistics.stdev(members) + EPS) if norm else centred
        out.append(value * weights[i])
    return out


def test_group_of_eight_matches_the_formula():
    scores = [0.8, 0.6, 0.6, 0.0, 1.0, 0.4, 0.6, 0.2]
    mask = torch.ones(8, 4)
    adv, returns = compute_adrpo_advantage(_rewards(scores), mask, np.array(["g"] * 8, dtype=object))
    # mean 0.525, squared deviations sum to 0.715, unbiased std sqrt(0.715 / 7) = 0.3195979...
    assert adv[0, 0].item() == pytest.approx(0.275 / (math.sqrt(0.715 / 7) + EPS), rel=1e-5)
    assert adv[0, 0].item() == pytest.approx(0.86047, abs=1e-4)
    assert adv[:, 0].tolist() == pytest.approx(_hand(scores, ["g"] * 8), rel=1e-5, abs=1e-6)
    assert torch.equal(adv, returns)
    assert adv[:, 0].sum().item() == pytest.approx(0.0, abs=1e-5)


def test_attribution_weight_scales_only_the_boosted_samples():
    scores = [1.0, 0.4, 0.4, 0.4, 0.0, 0.6, 0.8, 0.2]
    weights = [4.0, 4.0, 4.0, 1.0, None, 1.0, 1.0, float("nan")]  # None / NaN: no weight given
    groups = ["episodic"] * 8
    adv, _ = compute_adrpo_advantage(
        _rewards(scores), torch.ones(8, 3), np.array(groups, dtype=object), attribution_weight=weights
    )
    plain = _hand(scores, groups)
    expected = [p * (4.0 if i < 3 else 1.0) for i, p in enumerate(plain)]
    assert adv[:, 0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # the weight multiplies the advantage, so a boosted sample below the mean is pushed down harder
    assert adv[1, 0].item() == pytest.approx(4 * plain[1], rel=1e-5)
    assert adv[1, 0].item() < 0


def test_groups_are_normalised_separately_and_broadcast_over_the_mask():
    scores = [1.0, 0.0, 0.5, 0.2, 0.9, 0.9, 0.1]
    groups = ["core", "core", "core", "semantic", "semantic", "semantic", "semantic"]
    mask = torch.tensor(
        [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]],
        dtype=torch.float32,
    )
    lengths = mask.sum(-1).long().tolist()
    adv, _ = compute_adrpo_advantage(_rewards(scores, last=lengths), mask, np.array(groups, dtype=object))
    expected = _hand(scores, groups)
    for i in range(len(scores)):
        assert adv[i, : lengths[i]].tolist() == pytest.approx([expected[i]] * lengths[i], rel=1e-5, abs=1e-6)
        assert adv[i, lengths[i] :].abs().sum().item() == 0.0


def test_ties_give_zero_advantage_whatever_the_weight():
    adv, _ = compute_adrpo_advantage(
        _rewards([0.4] * 8), torch.ones(8, 2), np.array(["procedural"] * 8, dtype=object), attribution_weight=[4.0] * 8
    )
    assert adv.abs().max().item() < 1e-9


def test_partial_ties_follow_the_formula():
    scores = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    adv, _ = compute_adrpo_advantage(_rewards(scores), torch.ones(8, 2), np.array(["g"] * 8, dtype=object))
    assert adv[:, 0].tolist() == pytest.approx(_hand(scores, ["g"] * 8), rel=1e-5)
    assert len({round(v, 6) for v in adv[:3, 0].tolist()}) == 1


def test_a_group_of_one_gets_zero():
    scores = [0.7, 0.2, 0.9, 0.5]
    groups = ["solo", "pair", "pair", "other"]
    adv, _ = compute_adrpo_advantage(
        _rewards(scores), torch.ones(4, 2), np.array(groups, dtype=object), attribution_weight=[4.0, 1, 1, 4.0]
    )
    assert adv[0].abs().sum().item() == 0.0
    assert adv[3].abs().sum().item() == 0.0
    assert adv[1, 0].item() == pytest.approx(-0.35 / (math.sqrt(0.245) + EPS), rel=1e-5)


def test_without_std_normalisation_the_advantage_is_centred_only():
    scores = [1.0, 0.0, 0.5, 0.5]
    adv, _ = compute_adrpo_advantage(
        _rewards(scores), torch.ones(4, 1), np.array(["g"] * 4, dtype=object), norm_adv_by_std=False
    )
    assert adv[:, 0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0], abs=1e-6)
    cfg = {"norm_adv_by_std_in_grpo": False}
    adv_cfg, _ = compute_adrpo_advantage(
        _rewards(scores), torch.ones(4, 1), np.array(["g"] * 4, dtype=object), config=cfg
    )
    assert torch.allclose(adv, adv_cfg)


def test_attribution_off_is_plain_grpo_and_alpha_can_be_overridden():
    scores = [1.0, 0.0, 0.5, 0.25]
    weights = [4.0, 1.0, 1.0, 1.0]
    index = np.array(["g"] * 4, dtype=object)
    off = {"adrpo": {"enable_attribution": False}}
    adv_off, _ = compute_adrpo_advantage(_rewards(scores), torch.ones(4, 1), index, weights, config=off)
    assert adv_off[:, 0].tolist() == pytest.approx(_hand(scores, ["g"] * 4), rel=1e-5)
    alpha8 = {"adrpo": {"attribution_boost_factor": 8.0}}
    adv_8, _ = compute_adrpo_advantage(_rewards(scores), torch.ones(4, 1), index, weights, config=alpha8)
    assert adv_8[0, 0].item() == pytest.approx(8 * adv_off[0, 0].item(), rel=1e-5)
    assert adv_8[1:, 0].tolist() == pytest.approx(adv_off[1:, 0].tolist(), rel=1e-5)


def test_settings_come_from_config_then_environment():
    assert ADRPOSettings.resolve(None, env={}) == ADRPOSettings(True, None)
    env = {"ADRPO_ENABLE_ATTRIBUTION": "0", "ADRPO_ATTRIBUTION_BOOST_FACTOR": "8"}
    assert ADRPOSettings.resolve(None, env=env) == ADRPOSettings(False, 8.0)
    cfg = {"adrpo": {"enable_attribution": True, "attribution_boost_factor": None}}
    assert ADRPOSettings.resolve(cfg, env=env) == ADRPOSettings(True, 8.0)  # unset factor falls back to env
    with pytest.raises(ADRPOConfigError):
        ADRPOSettings.resolve({"adrpo": {"enable_attribution": "maybe"}}, env={})
    with pytest.raises(ADRPOConfigError):
        ADRPOSettings.resolve({"adrpo": {"attribution_boost_factor": -1}}, env={})


def test_multipliers_reject_weights_that_would_flip_or_zero_an_advantage():
    assert attribution_multipliers(None, 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        attribution_multipliers([1.0, -4.0], 2)
    with pytest.raises(ValueError):
        attribution_multipliers([1.0, 0.0], 2)
    with pytest.raises(ValueError):
        attribution_multipliers([1.0], 2)


def test_weights_are_read_from_the_v1_extra_fields():
    extra = [
        {"reward_extra_info": {"score": 0.5, "attribution_weight": 4.0}},
        {"reward_extra_info": {"score": 0.1}},
        {"turn_scores": []},
        None,
    ]
    assert weights_from_extra_fields(extra) == [4.0, None, None, None]
