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


# --------------------------------------------------------------------------- every slot resolved on every path

from training.reward_server.engine import JointError, UpstreamError  # noqa: E402


class Failing(Recorder):
    def __init__(self, exc: BaseException, times: int = 1, delay: float = 0.0):
        super().__init__(delay)
        self.exc, self.times = exc, times

    async def __call__(self, req):
        self.calls.append(req)
        await asyncio.sleep(self.delay)
        if len(self.calls) <= self.times:
            raise self.exc
        _, status = validate_outputs(req.actions)
        return TaskResult(req.session_group_id, 0.6, 3, 5, [], {"episodic": 1, "semantic": 0, "procedural": 0},
                          "episodic", 1, status)


def _full(rdv, group="g", **kw):
    return [rdv.submit(sample(group, a, a, sample_key=f"{group}-{a}", **kw)) for a in AGENTS]


@pytest.mark.parametrize("exc,status,retryable", [
    (RuntimeError("a bug"), 500, False),
    (RecursionError("deep"), 500, False),
    (UpstreamError("judge call failed"), 503, True),
    (KeyError("x"), 500, False),
])
def test_an_exception_in_scoring_reaches_every_member(exc, status, retryable):
    async def run():
        rdv = JointRendezvous(Failing(exc, times=99), default_timeout_s=30)
        results = await asyncio.wait_for(asyncio.gather(*_full(rdv), return_exceptions=True), 5)
        return rdv, results

    rdv, results = asyncio.run(run())
    assert all(isinstance(r, JointError) and r.status == status and r.retryable is retryable for r in results)
    assert rdv.stats()["open_slots"] == 0 and rdv.stats()["running"] == 0


def test_a_retryable_failure_is_rerun_by_a_resubmission_with_the_same_key():
    async def run():
        rec = Failing(UpstreamError("answer call failed"), times=1)
        rdv = JointRendezvous(rec, default_timeout_s=30)
        first = await asyncio.gather(*_full(rdv), return_exceptions=True)
        again = await asyncio.gather(*_full(rdv))  # every member retries with its key
        return rec, rdv, first, again

    rec, rdv, first, again = asyncio.run(run())
    assert all(isinstance(r, JointError) and r.retryable for r in first)
    assert len(rec.calls) == 2 and len({o.joint_id for o in again}) == 1  # the same slot, scored once more
    assert again[0].task_reward == 0.6 and rdv.counters["reruns"] == 1 and rdv.counters["joints"] == 1


def test_timeout_path_scores_with_the_expert():
    async def run():
        rdv = JointRendezvous(Recorder(), default_timeout_s=30)
        return await asyncio.wait_for(rdv.submit(sample("g", "core", "c", timeout_s=0.1)), 5)

    o = asyncio.run(run())
    assert o.timed_out and o.members == {"core": "policy", **{a: "expert" for a in AGENTS[1:]}}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -5.0, "soon"])
def test_a_bad_timeout_never_leaves_a_slot_unresolved(bad):
    async def run():
        rdv = JointRendezvous(Recorder(), default_timeout_s=0.1, max_timeout_s=1.0)
        return await asyncio.wait_for(rdv.submit(sample("g", "core", "c", timeout_s=bad)), 5)

    assert asyncio.run(run()).timed_out


def test_shutdown_scores_open_slots_with_the_expert_and_cancels_what_outlives_the_grace():
    async def run():
        slow = Recorder(delay=30)
        rdv = JointRendezvous(Recorder(), default_timeout_s=3600)
        waiting = asyncio.ensure_future(rdv.submit(sample("open", "core", "c")))
        rdv_slow = JointRendezvous(slow, default_timeout_s=3600)
        running = [asyncio.ensure_future(c) for c in _full(rdv_slow, "busy")]
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.gather(rdv.shutdown(grace_s=1.0), rdv_slow.shutdown(grace_s=0.2))
        elapsed = loop.time() - t0
        done = await asyncio.wait_for(waiting, 5)
        busy = await asyncio.wait_for(asyncio.gather(*running, return_exceptions=True), 5)
        late = await asyncio.gather(rdv.submit(sample("new", "core", "c")), return_exceptions=True)
        return done, busy, late, elapsed

    done, busy, late, elapsed = asyncio.run(run())
    assert done.timed_out and done.members["episodic"] == "expert"
    assert all(isinstance(r, JointError) and r.status == 503 and r.retryable for r in busy)
    assert isinstance(late[0], JointError) and late[0].retryable
    assert elapsed < 2.0


def test_cancellation_when_every_member_went_away_stops_the_scoring():
    async def run():
        slow = Recorder(delay=30)
        rdv = JointRendezvous(slow, default_timeout_s=3600)
        members = [asyncio.ensure_future(c) for c in _full(rdv)]
        await asyncio.sleep(0.05)
        assert rdv.running() == 1
        for m in members:
            m.cancel()
        await asyncio.gather(*members, return_exceptions=True)
        await asyncio.sleep(0.05)
        running_after = rdv.running()
        slow.delay = 0.0
        again = await asyncio.wait_for(rdv.submit(sample("g", "core", "core", sample_key="g-core")), 5)
        return rdv, running_after, again

    rdv, running_after, again = asyncio.run(run())
    assert running_after == 0 and rdv.counters["cancelled"] == 1
    assert again.joint_id == "g#0" and rdv.counters["reruns"] == 1


def test_one_member_going_away_does_not_stop_the_others():
    async def run():
        rdv = JointRendezvous(Recorder(delay=0.2), default_timeout_s=3600)
        members = [asyncio.ensure_future(c) for c in _full(rdv)]
        await asyncio.sleep(0.05)
        members[0].cancel()
        return await asyncio.gather(*members[1:])

    outs = asyncio.run(run())
    assert len({o.joint_id for o in outs}) == 1 and all(o.task_reward == 0.6 for o in outs)


def test_an_abandoned_open_slot_costs_nothing_and_reruns_on_resubmission():
    async def run():
        rec = Recorder()
        rdv = JointRendezvous(rec, default_timeout_s=3600)
        t = asyncio.ensure_future(rdv.submit(sample("g", "core", "c", sample_key="k", timeout_s=0.1)))
        await asyncio.sleep(0.02)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        await asyncio.sleep(0.2)  # the slot times out with nobody waiting
        calls_then = len(rec.calls)
        again = await asyncio.wait_for(rdv.submit(sample("g", "core", "c", sample_key="k")), 5)
        return rdv, calls_then, again, rec

    rdv, calls_then, again, rec = asyncio.run(run())
    assert calls_then == 0 and rdv.counters["abandoned"] == 1
    assert again.timed_out and len(rec.calls) == 1


def test_a_sample_key_is_bound_to_its_group_and_agent():
    async def run():
        rdv = JointRendezvous(Recorder(), default_timeout_s=30)
        first = await asyncio.gather(*_full(rdv, "g1"))
        other_group = await asyncio.gather(rdv.submit(sample("g2", "core", "x", sample_key="g1-core")),
                                           return_exceptions=True)
        other_agent = await asyncio.gather(rdv.submit(sample("g1", "semantic", "x", sample_key="g1-core")),
                                           return_exceptions=True)
        return first, other_group[0], other_agent[0]

    first, other_group, other_agent = asyncio.run(run())
    assert first[0].joint_id == "g1#0"
    for err in (other_group, other_agent):
        assert isinstance(err, JointError) and err.status == 422 and not err.retryable


def test_sparse_options_are_validated():
    for bad in ({"default_reward": 1e308}, {"default_reward": -0.1}, {"drop_rate": 2.0},
                {"default_reward": float("nan")}, {"seed": "x"}):
        with pytest.raises(ValueError):
            SparseOptions(**bad)


def test_a_scored_slot_keeps_its_outcome_but_not_its_outputs():
    """Keys are remembered for result_ttl_s; the outputs behind them (up to the body limit each) are not."""
    async def run():
        rdv = JointRendezvous(Recorder(), default_timeout_s=30)
        subs = [sample("g", a, a, sample_key=f"g-{a}") for a in AGENTS]
        outs = await asyncio.gather(*(rdv.submit(s) for s in subs))
        again = await rdv.submit(sample("g", "core", "core", sample_key="g-core"))
        return subs, outs, again

    subs, outs, again = asyncio.run(run())
    assert all(s.output is None and s.expert_outputs == {} for s in subs)
    assert again.joint_id == outs[0].joint_id and again.task_reward == 0.6
