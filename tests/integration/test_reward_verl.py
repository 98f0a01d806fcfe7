"""reward_function.py loaded by veRL 0.9.1's own reward loader and run on a DataProto batch by veRL's
`RewardLoopWorker` (mode `local`, offline provider), in the veRL environment `.venv-rl`.

The work happens in `verl_reward_probe.py` under `.venv-rl/bin/python` (veRL is not installed in the main
environment); this test checks what it reports."""
from __future__ import annotations

import json
import os
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from memory_system import AGENTS

REPO = Path(__file__).resolve().parents[2]
VENV_PY = REPO / ".venv-rl" / "bin" / "python"
PROBE = Path(__file__).with_name("verl_reward_probe.py")

pytestmark = [pytest.mark.integration, pytest.mark.rl, pytest.mark.slow]


def _verl_available() -> str | None:
    if not VENV_PY.is_file():
        return f"the veRL environment is absent ({VENV_PY}; make it with scripts/setup_rl_env.sh)"
    r = subprocess.run([str(VENV_PY), "-c", "import verl.experimental.reward_loop.reward_loop, omegaconf, tokenizers"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return f"veRL does not import in {VENV_PY}: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}"
    return None


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    reason = _verl_available()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("verl_probe")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    r = subprocess.run([str(VENV_PY), str(PROBE), str(work)], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_loaded_through_verls_reward_config_key(probe):
    assert probe["verl_version"] == "0.9.1"
    assert probe["manager"] == "NaiveRewardManager"
    # 0.9.1 reads reward.custom_reward_function; the old top-level key alone loads nothing.
    assert probe["legacy_key_ignored"] is True


def test_every_sample_rewarded_and_stored_as_veRL_stores_it(probe):
    n = probe["n"]
    assert n == 16 and len(probe["scores"]) == n
    assert probe["rm_scores_row_sums"] == pytest.approx(probe["scores"], abs=1e-6)
    required = {"score", "task_reward", "length_penalty", "valid", "dominant_type", "attribution_weight"}
    assert required <= set(probe["extra_keys"])
    dtypes = probe["extra_dtypes"]
    assert all(dtypes[k] == "float64" for k in ("score", "task_reward", "length_penalty", "valid",
                                                  "attribution_weight"))
    assert dtypes["dominant_type"].startswith("<U") and dtypes["joint_id"].startswith("<U")  # strings, not objects


def test_joint_rollouts_pair_one_sample_of_each_agent(probe):
    joints = defaultdict(list)
    for row, jid in zip(probe["rows"], probe["extra"]["joint_id"]):
        joints[jid].append(row)
    assert len(joints) == 4  # 2 sessions x n=2
    for jid, rows in joints.items():
        assert sorted(r["agent"] for r in rows) == sorted(AGENTS)
        assert {r["group"] for r in rows} == {jid.split("#")[0]}
    assert set(probe["extra"]["expert_filled"]) == {0}


def test_validity_gate_and_attribution(probe):
    ex = probe["extra"]
    invalid = [i for i, v in enumerate(ex["valid"]) if v == 0.0]
    assert len(invalid) == 1
    i = invalid[0]
    assert probe["rows"][i]["agent"] == "core" and probe["scores"][i] == 0.0 and "SKIP" in ex["invalid_reason"][i]
    for i, row in enumerate(probe["rows"]):
        dom = ex["dominant_type"][i]
        expected = 4.0 if row["agent"] == dom and row["agent"] != "core" else 1.0
        assert ex["attribution_weight"][i] == expected
        if ex["valid"][i]:
            assert probe["scores"][i] == pytest.approx(ex["task_reward"][i] * (1 - 0.8 * ex["length_penalty"][i]))
