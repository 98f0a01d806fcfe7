"""The ADRPO reward pieces equal PAPER §5: length penalties at and around every threshold, the reward formula,
the attribution weight (ties, core never boosted), and the per-sample result veRL stores."""
from __future__ import annotations

import json

import pytest

from memory_system import Action, dominant_type
from training.reward_server.reward_function import (RewardConfig, agent_reward, attribution_weight,
                                                    core_length_penalty, estimate_tokens, length_penalty,
                                                    other_length_penalty, score_sample)

CFG = RewardConfig()


def chars(tokens: float) -> str:
    """A text whose estimated length is exactly `tokens` (chars / 4)."""
    n = round(tokens * 4)
    assert n / 4 == tokens
    return "x" * n


def core(text: str, op: str = "APPEND") -> list[Action]:
    if op == "REPLACE":
        return [Action("core", "REPLACE", old_text="old", new_text=text)]
    return [Action("core", op, content=text)]


def adds(agent: str, *tokens: float) -> list[Action]:
    return [Action(agent, "ADD", memory=chars(t)) for t in tokens]


# --------------------------------------------------------------------------- core

@pytest.mark.parametrize("t,expected", [
    (0, 0.0), (100, 0.0), (149.75, 0.0), (150, 0.0),             # T <= 150: no penalty
    (150.25, 0.25 / 250), (151, 1 / 250), (275, 0.5), (399.75, 249.75 / 250),  # linear in between
    (400, 1.0), (400.25, 1.0), (10_000, 1.0),                    # T >= 400: full penalty
])
def test_core_penalty_thresholds(t, expected):
    assert core_length_penalty(t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("op", ["APPEND", "REWRITE", "REPLACE"])
@pytest.mark.parametrize("t,expected", [(150, 0.0), (150.25, 0.001), (275, 0.5), (400, 1.0)])
def test_core_penalty_measures_the_written_text(op, t, expected):
    # T is the length of what the action writes (REPLACE: the new text), in tokens on the same chars/4 scale.
    assert length_penalty("core", core(chars(t), op), [], CFG) == pytest.approx(expected)


def test_core_penalty_ignores_the_expert():
    assert length_penalty("core", core(chars(100)), core(chars(5)), CFG) == 0.0
    assert length_penalty("core", core(chars(400)), core(chars(1000)), CFG) == 1.0


def test_tokens_are_chars_over_four_on_both_sides():
    assert estimate_tokens("abcd" * 150) == 150
    assert estimate_tokens("") == 0


# --------------------------------------------------------------------------- other agents

@pytest.mark.parametrize("policy,expected", [
    (1000, 0.0), (1300, 0.0), (500, 0.0),                          # inside [0.5, 1.3]
    (1300.25, 0.00025 / 0.7), (1650, 0.5), (1999.75, 0.69975 / 0.7), (2000, 1.0), (2600, 1.0),  # above gamma_u
    (499.75, 0.00025 / 0.3), (350, 0.5), (200.25, 0.29975 / 0.3), (200, 1.0), (100, 1.0), (0, 1.0),  # below gamma_l
])
def test_other_penalty_ratio_thresholds(policy, expected):
    # L_expert = 1000 tokens, so |L_policy - L_expert| >= 200 wherever rho leaves [0.5, 1.3].
    assert other_length_penalty(policy, 1000) == pytest.approx(expected, abs=1e-12)


def test_other_penalty_rho_exact_saturation_points():
    assert other_length_penalty(2 * 400, 400) == 1.0  # rho = 2.0
    assert other_length_penalty(0.2 * 1500, 1500) == pytest.approx(1.0)  # rho = 0.2
    assert other_length_penalty(0.5 * 1500, 1500) == 0.0  # rho = 0.5 with |diff| = 750
    assert other_length_penalty(1.3 * 1500, 1500) == 0.0  # rho = 1.3 with |diff| = 450


@pytest.mark.parametrize("policy,expert,expected", [
    (299.75, 100, 0.0),    # rho ~ 3 but |diff| = 199.75 < 200: no penalty
    (300, 100, 1.0),       # |diff| = 200 is not < 200: rho = 3 -> full penalty
    (0, 199.75, 0.0),      # rho = 0 but |diff| < 200
    (0, 200, 1.0),         # |diff| = 200: rho = 0 -> full penalty
    (10_000, 0, 0.0),      # L_expert = 0: no penalty whatever the policy writes
    (0, 0, 0.0),
])
def test_other_penalty_absolute_tolerance_and_empty_expert(policy, expert, expected):
    assert other_length_penalty(policy, expert) == pytest.approx(expected)


def test_other_penalty_sums_every_entry_written_for_the_session():
    expert = adds("episodic", 300, 200)  # 500 tokens
    assert length_penalty("episodic", adds("episodic", 400, 400, 200), expert, CFG) == pytest.approx((2.0 - 1.3) / 0.7)
    assert length_penalty("episodic", adds("episodic", 300, 300), expert, CFG) == 0.0  # rho 1.2
    # UPDATE / MERGE count their new text; SKIP writes nothing.
    mixed = [Action("semantic", "UPDATE", old_memory="a", new_memory=chars(1300)),
             Action("semantic", "SKIP", reason=chars(5000))]
    assert length_penalty("semantic", mixed, adds("semantic", 1000), CFG) == 0.0
    merged = [Action("episodic", "MERGE", old_memories=("a", "b"), new_memory=chars(1650))]
    assert length_penalty("episodic", merged, adds("episodic", 1000), CFG) == pytest.approx(0.5)
    # An expert who wrote nothing is no reference.
    assert length_penalty("procedural", adds("procedural", 5000), [], CFG) == 0.0


def test_penalty_switch_and_configured_thresholds():
    off = RewardConfig(enable_expert_length_penalty=False)
    assert length_penalty("core", core(chars(1000)), [], off) == 0.0
    assert length_penalty("episodic", adds("episodic", 5000), adds("episodic", 100), off) == 0.0
    custom = RewardConfig(core_length_start_penalty=100, core_length_max_penalty=200)
    assert length_penalty("core", core(chars(150)), [], custom) == 0.5
    with pytest.raises(ValueError):
        RewardConfig(core_length_start_penalty=400, core_length_max_penalty=150)


# --------------------------------------------------------------------------- reward formula

@pytest.mark.parametrize("valid,r_task,p,lam,expected", [
    (True, 0.6, 0.0, 0.8, 0.6),
    (True, 0.6, 0.5, 0.8, 0.6 * (1 - 0.4)),
    (True, 0.6, 1.0, 0.8, 0.6 * 0.2),
    (True, 1.0, 1.0, 0.0, 1.0),
    (True, 0.0, 0.3, 0.8, 0.0),
    (False, 1.0, 0.0, 0.8, 0.0),  # invalid: 0 whatever the task reward
])
def test_reward_formula(valid, r_task, p, lam, expected):
    assert agent_reward(valid, r_task, p, lam) == pytest.approx(expected)


# --------------------------------------------------------------------------- attribution

@pytest.mark.parametrize("counts,expected", [
    ({"episodic": 5, "semantic": 3, "procedural": 2}, "episodic"),
    ({"episodic": 1, "semantic": 7, "procedural": 2}, "semantic"),
    ({"episodic": 0, "semantic": 1, "procedural": 9}, "procedural"),
    ({"episodic": 4, "semantic": 4, "procedural": 2}, "episodic"),   # ties: episodic first
    ({"episodic": 2, "semantic": 4, "procedural": 4}, "semantic"),   # then semantic
    ({"episodic": 3, "semantic": 3, "procedural": 3}, "episodic"),
    ({"episodic": 0, "semantic": 0, "procedural": 0}, None),         # nothing retrieved: no type
])
def test_dominant_type_and_ties(counts, expected):
    assert dominant_type(counts) == expected


@pytest.mark.parametrize("dominant", ["episodic", "semantic", "procedural"])
def test_attribution_boosts_only_the_dominant_agents_sample(dominant):
    for agent in ("core", "episodic", "semantic", "procedural"):
        w = attribution_weight(agent, dominant)
        assert w == (4.0 if agent == dominant else 1.0)


def test_attribution_core_never_boosted_and_switches():
    assert attribution_weight("core", "core") == 1.0
    assert all(attribution_weight(a, None) == 1.0 for a in ("core", "episodic", "semantic", "procedural"))
    assert attribution_weight("episodic", "none") == 1.0
    assert attribution_weight("semantic", "semantic", alpha=8.0) == 8.0
    assert attribution_weight("semantic", "semantic", enabled=False) == 1.0
    assert attribution_weight("semantic", "semantic", sparse=True) == 1.0


# --------------------------------------------------------------------------- the per-sample result

def _joint(**kw) -> dict:
    base = {"joint_id": "g#0", "sparse": False, "timed_out": False, "task_reward": 0.8, "dominant_type": "semantic",
            "members": {"core": "policy", "episodic": "policy", "semantic": "policy", "procedural": "expert"},
            "task": {"failed_questions": 1}}
    return {**base, **kw}


KEYS = {"score", "task_reward", "length_penalty", "valid", "dominant_type", "attribution_weight", "sparse",
        "joint_id", "joint_timed_out", "expert_filled", "failed_questions", "policy_tokens", "expert_tokens",
        "invalid_reason", "n_questions"}


def test_score_sample_valid_dominant_agent():
    out = json.dumps({"operations": [{"action": "ADD", "memory": chars(1650)}]})
    ref = json.dumps({"operations": [{"action": "ADD", "memory": chars(1000)}]})
    r = score_sample(CFG, "semantic", out, ref, _joint())
    assert set(r) == KEYS
    assert r["valid"] == 1.0 and r["length_penalty"] == pytest.approx(0.5)
    assert r["score"] == pytest.approx(0.8 * (1 - 0.8 * 0.5))
    assert r["attribution_weight"] == 4.0 and r["dominant_type"] == "semantic"
    assert r["expert_filled"] == 1 and r["failed_questions"] == 1
    assert all(isinstance(v, (int, float, str)) for v in r.values())  # veRL keeps scalars and strings only


def test_score_sample_says_how_many_questions_its_reward_is_over():
    out = json.dumps({"operations": []})
    assert score_sample(CFG, "semantic", out, None, _joint(task={"n_questions": 5}))["n_questions"] == 5
    none = score_sample(CFG, "semantic", out, None, _joint(task_reward=0.0, task={"n_questions": 0}))
    assert none["score"] == 0.0 and none["n_questions"] == 0  # "no questions", told apart from "all wrong"


def test_score_sample_invalid_output_scores_zero_with_reason():
    r = score_sample(CFG, "core", '{"operation": "SKIP"}', None, _joint())
    assert set(r) == KEYS
    assert r["valid"] == 0.0 and r["score"] == 0.0 and r["length_penalty"] == 0.0
    assert "SKIP" in r["invalid_reason"]
    r = score_sample(CFG, "episodic", "not json at all", None, _joint(dominant_type="episodic"))
    assert r["score"] == 0.0 and r["invalid_reason"]
    assert r["attribution_weight"] == 4.0  # the rule is about the type, not the sample's validity


def test_score_sample_sparse_and_no_retrieval():
    out = json.dumps({"operations": []})
    r = score_sample(CFG, "episodic", out, None, _joint(sparse=True, task_reward=1.0, dominant_type=None, task=None))
    assert r["score"] == 1.0 and r["sparse"] == 1.0 and r["attribution_weight"] == 1.0
    assert r["dominant_type"] == "none" and r["failed_questions"] == 0


def test_score_sample_unparseable_expert_is_no_reference():
    out = json.dumps({"operations": [{"action": "ADD", "memory": chars(5000)}]})
    r = score_sample(CFG, "procedural", out, "{broken", _joint())
    assert r["length_penalty"] == 0.0 and r["expert_tokens"] == 0.0 and r["policy_tokens"] == 5000


# --------------------------------------------------------------------------- configuration

def test_config_file_overrides_and_typos(tmp_path):
    cfg = RewardConfig.load()
    assert (cfg.expert_length_penalty_weight, cfg.core_length_start_penalty, cfg.core_length_max_penalty) == \
        (0.8, 150, 400)
    assert (cfg.other_length_upper_tolerance, cfg.other_length_lower_tolerance, cfg.attribution_boost_factor) == \
        (1.3, 0.5, 4.0)
    assert cfg.task_reward_mode in ("api", "local")
    assert RewardConfig.load(overrides={"attribution_boost_factor": 8.0}).attribution_boost_factor == 8.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"attribution_boost_factr": 8.0}))
    with pytest.raises(ValueError, match="attribution_boost_factr"):
        RewardConfig.load(bad)
    with pytest.raises(ValueError):
        RewardConfig(task_reward_mode="remote")
