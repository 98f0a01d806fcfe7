"""The joint-rollout rendezvous on its own (a recording evaluator, no LLM): one-to-one pairing of the k-th sample of
each agent, the expert fallback after a timeout, idempotent resubmission, and the seeded sparse-reward selection."""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter, defaultdict

import pytest

from memory_system import AGENTS
from training.reward_server.engine import (AgentStatus, JointRendezvous, JointSample, SparseOptions, TaskRequest,
                                           TaskResult, validate_outputs)

EXPERT = {a: json.dumps({"operation": "APPEND", "content": "expert core"} if a == "core" else
                        {"operations": [{"action": "ADD", "memory": f"expert {a}"}]}) for a in AGENTS}


def out(agent: str, tag: str) -> str:
    if agent == "core":
        return json.dumps({"operation": "APPEND", "content": tag})
    return json.dumps({"operations": [{"action": "ADD", "memory": tag}]})


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.calls: list[TaskRequest] = []
        self.delay = delay

    async def __call__(self, req: TaskRequest) -> TaskResult:
        self.calls.append(req)
        await asyncio.sleep(self.delay)
        _, status = validate_outputs(req.actions)
        return TaskResult(req.session_group_id, 0.6, 3, 5, [], {"episodic": 1, "semantic": 0, "procedural": 0},
                          "episodic", 1, status)


def sample(group: str, agent: str, tag: str, **kw) -> JointSample:
    return JointSample(group, agent, out(agent, tag), "state", [{"question": "q", "answer": "a"}],
                       dict(EXPERT), **kw)


def test_pairs_kth_samples_one_to_one_in_any_arrival_order():
    async def run():
        rec = Recorder(delay=0.01)
        rdv = JointRendezvous(rec, default_timeout_s=30)
        samples = [sample(g, a, f"{g}/{a}/{k}") for g in ("s1", "s2") for a in AGENTS for k in range(8)]
        random.Random(7).shuffle(samples)
        outcomes = await asyncio.gather(*(rdv.submit(s) for s in samples))
        return rec, rdv, samples, outcomes

    rec, rdv, samples, outcomes = asyncio.run(run())
    by_joint = defaultdict(list)
    for s, o in zip(samples, outcomes):
        by_joint[o.joint_id].append(s)
        assert o.members == {a: "policy" for a in AGENTS} and not o.timed_out
    assert len(by_joint) == 16 and len(rec.calls) == 16  # 2 sessions x 8 joint rollouts, each evaluated once
    for joint, members in by_joint.items():
        assert sorted(m.agent for m in members) == sorted(AGENTS)  # one sample of each agent
        assert {m.session_group_id for m in members} == {joint.split("#")[0]}
    # The evaluated actions are exactly the members' outputs: every sample used once.
    used = Counter(req.actions[a] for req in rec.calls for a in AGENTS)
    assert set(used.values()) == {1} and len(used) == 64
    assert rdv.stats()["open_slots"] == 0 and rdv.counters["complete"] == 16


def test_missing_agent_takes_expert_output_after_timeout():
    async def run():
        rec = Recorder()
        rdv = JointRendezvous(rec, default_timeout_s=30)
        subs = [sample("s", a, f"{a}-{k}", timeout_s=0.3) for a in ("core", "episodic", "semantic") for k in range(2)]
        subs.append(sample("s", "procedural", "proc-0", timeout_s=0.3))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        outcomes = await asyncio.gather(*(rdv.submit(s) for s in subs))
        return rec, outcomes, loop.time() - t0

    rec, outcomes, elapsed = asyncio.run(run())
    assert len(rec.calls) == 2
    timed = [o for o in outcomes if o.timed_out]
    assert len(timed) == 3 and elapsed >= 0.3  # the second slot waited for its timeout
    assert timed[0].members["procedural"] == "expert"
    second = next(r for r in rec.calls if r.actions["procedural"] == EXPERT["procedural"])
    assert {a: second.actions[a] for a in ("core", "episodic", "semantic")} == \
        {a: out(a, f"{a}-1") for a in ("core", "episodic", "semantic")}


def test_absent_expert_is_a_no_op():
    async def run():
        rec = Recorder()
        rdv = JointRendezvous(rec)
        s = JointSample("g", "core", out("core", "x"), None, [], {}, timeout_s=0.05)
        return rec, await rdv.submit(s)

    rec, o = asyncio.run(run())
    assert o.members == {"core": "policy", "episodic": "absent", "semantic": "absent", "procedural": "absent"}
    assert rec.calls[0].actions["episodic"] is None


def test_resubmitting_the_same_sample_key_reattaches():
    async def run():
        rec = Recorder(delay=0.05)
        rdv = JointRendezvous(rec)
        first = [asyncio.create_task(rdv.submit(sample("g", a, a, sample_key=f"k-{a}"))) for a in AGENTS]
        await asyncio.sleep(0)
        again = await rdv.submit(sample("g", "core", "core", sample_key="k-core"))  # a retry after a lost reply
        return rec, rdv, await asyncio.gather(*first), again

    rec, rdv, first, again = asyncio.run(run())
    assert len(rec.calls) == 1 and again.joint_id == first[0].joint_id
    assert rdv.counters["resubmits"] == 1 and rdv.counters["joints"] == 1


def test_invalid_output_is_reported_not_raised():
    actions, status = validate_outputs({"core": '{"operation": "SKIP"}', "episodic": "{", "semantic": None,
                                        "procedural": {"operations": []}})
    assert status["core"].status == "invalid" and "SKIP" in status["core"].reason
    assert status["episodic"].status == "invalid" and actions["episodic"] == []
    assert status["semantic"] == AgentStatus("absent")
    assert status["procedural"].status == "valid"


def test_sparse_selection_is_seeded_and_about_half():
    opts = SparseOptions(drop_rate=0.5, seed=42)
    picks = [opts.selects(f"g{i}", k) for i in range(200) for k in range(8)]
    assert picks == [SparseOptions(0.5, 42).selects(f"g{i}", k) for i in range(200) for k in range(8)]
    assert 0.45 < sum(picks) / len(picks) < 0.55
    assert picks != [SparseOptions(0.5, 7).selects(f"g{i}", k) for i in range(200) for k in range(8)]
    assert not any(SparseOptions(0.0).selects("g", k) for k in range(50))
    assert all(SparseOptions(1.0).selects("g", k) for k in range(50))


def test_sparse_joint_gets_constant_reward_without_evaluation():
    async def run():
        rec = Recorder()
        rdv = JointRendezvous(rec)
        always = SparseOptions(drop_rate=1.0, default_reward=1.0)
        return rec, await asyncio.gather(*(rdv.submit(sample("g", a, a, sparse=always)) for a in AGENTS))

    rec, outs = asyncio.run(run())
    assert rec.calls == [] and all(o.sparse and o.task_reward == 1.0 and o.dominant_type is None for o in outs)


@pytest.mark.parametrize("bad", ["memory", ""])
def test_unknown_agent_refused(bad):
    async def run():
        return await JointRendezvous(Recorder()).submit(JointSample("g", bad, "{}", None, []))

    with pytest.raises(ValueError):
        asyncio.run(run())
