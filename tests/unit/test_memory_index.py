"""VectorIndex (cosine, type filter, forks, truncation, persistence) and MemorySystem on the offline provider."""
import asyncio
import json
from dataclasses import dataclass, field

import numpy as np
import pytest

import config
from llm_client import LLMClient
from memory_system import (
    ENTRY_TYPES,
    INDEX_FILE,
    MEMORY_FILE,
    Action,
    MemoryStoreError,
    MemorySystem,
    VectorIndex,
    render_session,
)


def _unit(rows) -> np.ndarray:
    m = np.asarray(rows, dtype=np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _cos(a, b) -> float:
    return float(np.dot(a, b))


# ----------------------------------------------------------------------------- VectorIndex


def test_vector_index_search_orders_by_cosine():
    rng = np.random.default_rng(0)
    vecs = _unit(rng.normal(size=(12, 16)))
    vi = VectorIndex()
    vi.add(vecs)
    q = _unit(rng.normal(size=(1, 16)))[0]
    hits = vi.search(q, 5)
    expected = sorted(range(12), key=lambda i: -_cos(vecs[i], q))[:5]
    assert [i for i, _ in hits] == expected
    assert all(abs(s - _cos(vecs[i], q)) < 1e-5 for i, s in hits)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_vector_index_exact_match_scores_one():
    vecs = _unit([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    vi = VectorIndex()
    vi.add(vecs)
    hits = vi.search(vecs[1], 3)
    assert hits[0][0] == 1 and abs(hits[0][1] - 1.0) < 1e-6
    assert hits[1][0] == 2 and abs(hits[1][1] - 2 ** -0.5) < 1e-6
    assert hits[2][0] == 0 and abs(hits[2][1]) < 1e-6


def test_vector_index_ids_continue_across_adds():
    vi = VectorIndex()
    vi.add(_unit([[1, 0], [0, 1]]))
    vi.add(_unit([[1, 1]]))
    assert vi.ntotal == 3 and vi.dim == 2
    assert vi.search(_unit([[1, 1]])[0], 1)[0][0] == 2


def test_vector_index_k_larger_than_index_and_empty_index():
    vi = VectorIndex()
    assert vi.search(_unit([[1, 0]])[0], 5) == []
    vi.add(_unit([[1, 0], [0, 1]]))
    assert len(vi.search(_unit([[1, 0]])[0], 10)) == 2
    assert vi.search(_unit([[1, 0]])[0], 0) == []


def test_vector_index_add_empty_is_a_no_op():
    vi = VectorIndex()
    vi.add(np.zeros((0, 4), dtype=np.float32))
    assert vi.ntotal == 0 and vi.dim is None


def test_vector_index_rejects_other_dimension():
    vi = VectorIndex()
    vi.add(_unit([[1, 0, 0]]))
    with pytest.raises(ValueError, match="dimension"):
        vi.add(_unit([[1, 0]]))


def _two_type_index(n_own=25, n_other=25, dim=8, seed=1):
    """Other-type vectors sit right next to the query; own-type vectors are far from it."""
    rng = np.random.default_rng(seed)
    q = np.zeros(dim, dtype=np.float32)
    q[0] = 1
    other = _unit(np.c_[np.full(n_other, 10.0), rng.normal(size=(n_other, dim - 1))])
    own = _unit(np.c_[np.full(n_own, 0.5), rng.normal(size=(n_own, dim - 1))])
    vecs = np.empty((n_own + n_other, dim), dtype=np.float32)
    own_ids = np.arange(0, n_own + n_other, 2)[:n_own]  # interleaved positions
    other_ids = np.setdiff1d(np.arange(n_own + n_other), own_ids)
    vecs[own_ids] = own
    vecs[other_ids] = other
    return q, vecs, own_ids.astype(np.int64), other_ids


def test_type_filtered_search_returns_exactly_top_k_of_that_type():
    q, vecs, own_ids, other_ids = _two_type_index()
    vi = VectorIndex()
    vi.add(vecs)
    unfiltered = vi.search(q, 20)
    assert {i for i, _ in unfiltered} <= set(other_ids.tolist())  # the other type is more similar
    hits = vi.search(q, 20, allowed=own_ids)
    assert len(hits) == 20
    assert {i for i, _ in hits} <= set(own_ids.tolist())
    expected = sorted(own_ids.tolist(), key=lambda i: -_cos(vecs[i], q))[:20]
    assert [i for i, _ in hits] == expected


def test_type_filtered_search_with_fewer_allowed_than_k():
    q, vecs, own_ids, _ = _two_type_index(n_own=3, n_other=30)
    vi = VectorIndex()
    vi.add(vecs)
    hits = vi.search(q, 20, allowed=own_ids)
    assert sorted(i for i, _ in hits) == sorted(own_ids.tolist())


def test_fork_shares_parent_and_merges_results():
    parent = VectorIndex()
    parent.add(_unit([[1, 0, 0], [0, 1, 0]]))
    fork = VectorIndex(parent=parent)
    assert fork.ntotal == 2 and fork.own_count == 0
    fork.add(_unit([[0.9, 0.1, 0], [0, 0, 1]]))
    assert fork.ntotal == 4 and fork.own_count == 2
    hits = fork.search(_unit([[1, 0, 0]])[0], 4)
    assert [i for i, _ in hits] == [0, 2, 1, 3]  # parent 0, fork 2, then the ties by id
    # the parent is read-only: it still holds its own two vectors only
    assert parent.ntotal == 2
    assert {i for i, _ in parent.search(_unit([[0, 0, 1]])[0], 5)} == {0, 1}


def test_fork_type_filter_spans_parent_and_fork():
    parent = VectorIndex()
    parent.add(_unit([[1, 0], [0.8, 0.2], [0, 1]]))
    fork = VectorIndex(parent=parent)
    fork.add(_unit([[0.95, 0.05], [0.1, 0.9]]))
    hits = fork.search(_unit([[1, 0]])[0], 2, allowed=np.array([1, 2, 3, 4]))
    assert [i for i, _ in hits] == [3, 1]
    hits = fork.search(_unit([[1, 0]])[0], 5, allowed=np.array([0, 2]))
    assert [i for i, _ in hits] == [0, 2]
    hits = fork.search(_unit([[1, 0]])[0], 5, allowed=np.array([4]))
    assert [i for i, _ in hits] == [4]


def test_fork_is_not_saved(tmp_path):
    parent = VectorIndex()
    parent.add(_unit([[1, 0]]))
    with pytest.raises(ValueError):
        VectorIndex(parent=parent).save(tmp_path / "x.faiss")


def test_truncate_drops_trailing_ids_and_adds_continue():
    vi = VectorIndex()
    vi.add(_unit(np.eye(5)))
    vi.truncate(3)
    assert vi.ntotal == 3
    assert {i for i, _ in vi.search(_unit(np.eye(5))[4], 10)} == {0, 1, 2}
    vi.add(_unit(np.eye(5)[4:5]))
    hits = vi.search(_unit(np.eye(5))[4], 1)
    assert hits[0][0] == 3 and abs(hits[0][1] - 1) < 1e-6
    vi.truncate(10)  # nothing beyond: no-op
    assert vi.ntotal == 4


def test_truncate_on_fork_keeps_parent():
    parent = VectorIndex()
    parent.add(_unit(np.eye(4)[:2]))
    fork = VectorIndex(parent=parent)
    fork.add(_unit(np.eye(4)[2:]))
    fork.truncate(0)
    assert fork.ntotal == 2 and parent.ntotal == 2


def test_vector_index_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    vecs = _unit(rng.normal(size=(20, 8)))
    vi = VectorIndex()
    vi.add(vecs)
    vi.save(tmp_path / INDEX_FILE)
    again = VectorIndex.load(tmp_path / INDEX_FILE)
    assert (again.ntotal, again.dim) == (20, 8)
    q = vecs[7]
    assert [i for i, _ in again.search(q, 5)] == [i for i, _ in vi.search(q, 5)]
    allowed = np.arange(0, 20, 3)
    assert again.search(q, 4, allowed) == vi.search(q, 4, allowed)
    again.add(_unit(rng.normal(size=(1, 8))))
    assert again.ntotal == 21
    assert not list(tmp_path.glob("*.tmp"))


def test_empty_index_save_load_then_add(tmp_path):
    VectorIndex().save(tmp_path / INDEX_FILE)
    again = VectorIndex.load(tmp_path / INDEX_FILE)
    assert again.ntotal == 0
    again.add(_unit([[1, 0, 0, 0]]))  # any dimension: the empty index fixed none
    assert again.ntotal == 1 and again.dim == 4


# ----------------------------------------------------------------------------- MemorySystem (offline)


@dataclass
class _Session:
    id: str
    time: str | None
    messages: list = field(default_factory=list)


def _msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


SESSION_1 = _Session("s1", "1:56 pm on 8 May, 2023", _msgs(
    ("user", "Alex: I adopted a beagle named Pepper yesterday. My job is teaching math at Lincoln High."),
    ("assistant", "Congratulations on adopting Pepper!"),
    ("user", "Alex: My pancake recipe:\n1. Mix flour and milk\n2. Add two eggs\n3. Fry in butter"),
))
SESSION_2 = _Session("s2", "2023/05/30 (Tue) 23:40", _msgs(
    ("user", "Alex: I live in Rome with my wife Maria. Last week I went hiking on Monte Cavo."),
    ("assistant", "That sounds like a lovely hike."),
    ("user", "Alex: I prefer tea over coffee in the morning."),
))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    # The on-disk cache makes repeated texts (the same sessions built again) free: the CPU embedder is slow here.
    c = LLMClient(provider="offline", cache_dir=str(tmp_path_factory.mktemp("llm-cache")))
    asyncio.run(c.embed(["warm up the local embedder"]))  # loads the model once for this module
    return c


@pytest.fixture(scope="module")
def built(client):
    ms = MemorySystem(client)

    async def go():
        return [await ms.build_session(SESSION_1), await ms.build_session(SESSION_2)]

    results = asyncio.run(go())
    return ms, results


def test_build_two_sessions(built):
    ms, results = built
    assert [r.session_id for r in results] == ["s1", "s2"]
    assert all(r.failures == {} for r in results)
    assert ms.meta["sessions_done"] == ["s1", "s2"]
    ids = [e.id for e in ms.state.entries]
    assert ids == [f"m{i:06d}" for i in range(len(ids))]
    assert ms.index.ntotal == len(ms.state.entries)
    types = {e.type for e in ms.state.entries}
    assert types == set(ENTRY_TYPES)  # the recipe gives a procedure, the facts give semantic entries
    sessions = [e.session for e in ms.state.entries]
    assert sessions == sorted(sessions)  # s1's entries come first
    assert "Alex" in ms.state.core


def test_build_records_each_agent_call(built):
    _, results = built
    for r in results:
        assert set(r.calls) == {"core", "episodic", "semantic", "procedural"}
        for agent, call in r.calls.items():
            assert call.error is None and call.raw_output and call.task == f"agent.{agent}"
            assert call.model == config.OFFLINE_MODEL_NAME
            assert call.messages[0]["role"] == "system"
        assert len(r.new_entries) == sum(len(c.actions) for a, c in r.calls.items() if a != "core")


def test_build_episodic_entries_carry_absolute_session_dates(built):
    ms, _ = built
    epis = [e for e in ms.state.entries if e.type == "episodic"]
    assert {e.text[:10] for e in epis if e.session == "s1"} == {"2023-05-08"}
    assert {e.text[:10] for e in epis if e.session == "s2"} == {"2023-05-30"}


def test_search_finds_relevant_entry(built):
    ms, _ = built
    hits = asyncio.run(ms.search("beagle named Pepper", 3))
    assert len(hits) == 3
    assert "Pepper" in hits[0].entry.text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_with_type_filter(built, client):
    ms, _ = built
    qvec = asyncio.run(client.embed(["Alex"]))[0]
    for t in ENTRY_TYPES:
        hits = asyncio.run(ms.search_vector(qvec, 50, types=[t]))
        assert hits and all(h.entry.type == t for h in hits)
        assert len(hits) == sum(e.type == t for e in ms.state.entries)


def test_search_on_empty_memory(client):
    assert asyncio.run(MemorySystem(client).search("anything", 5)) == []


def test_answer_returns_retrieved_entries_and_core(built, client):
    ms, _ = built
    res = asyncio.run(ms.answer("Where did I go hiking?", client, current_time="2023-06-01"))
    assert res.core == ms.state.core
    assert 0 < len(res.retrieved) <= ms.answer_top_k
    assert len(res.retrieved) == min(ms.answer_top_k, len(ms.state.entries))
    assert "Monte Cavo" in res.answer
    assert res.model == config.OFFLINE_MODEL_NAME and res.error is None
    counts = res.type_counts()
    assert set(counts) >= set(ENTRY_TYPES) and sum(counts.values()) == len(res.retrieved)


def test_answer_respects_k(built, client):
    ms, _ = built
    res = asyncio.run(ms.answer("Pepper", client, k=2))
    assert len(res.retrieved) == 2


def test_save_load_equality(built, client, tmp_path):
    ms, _ = built
    ms.save(tmp_path)
    saved = json.loads((tmp_path / MEMORY_FILE).read_text())
    assert saved["meta"]["n_indexed"] == len(ms.state.entries)
    assert saved["meta"]["embedding_model"] == config.OFFLINE_EMBEDDING_MODEL
    loaded = MemorySystem.load(tmp_path, client)
    assert loaded.state.to_dict() == ms.state.to_dict()
    assert loaded.meta["sessions_done"] == ["s1", "s2"]
    assert loaded.index.ntotal == ms.index.ntotal
    a = asyncio.run(ms.search("tea or coffee", 5))
    b = asyncio.run(loaded.search("tea or coffee", 5))
    assert [r.entry.id for r in a] == [r.entry.id for r in b]
    assert np.allclose([r.score for r in a], [r.score for r in b], atol=1e-5)


def test_load_drops_vectors_written_before_a_crash(built, client, tmp_path):
    ms, _ = built
    ms.save(tmp_path)
    # A crash after the index was written but before memory.json: the index holds one vector too many.
    index = VectorIndex.load(tmp_path / INDEX_FILE)
    index.add(asyncio.run(client.embed(["[SEMANTIC] orphan vector about volcanoes"])))
    index.save(tmp_path / INDEX_FILE)
    assert VectorIndex.load(tmp_path / INDEX_FILE).ntotal == len(ms.state.entries) + 1

    loaded = MemorySystem.load(tmp_path, client)
    assert loaded.index.ntotal == len(loaded.state.entries)
    hits = asyncio.run(loaded.search("volcanoes", 50))
    assert all(0 <= int(h.entry.id[1:]) < len(loaded.state.entries) for h in hits)
    # new entries line up with their own vectors again
    res = asyncio.run(loaded.apply_actions({"semantic": [Action("semantic", "ADD", memory="Alex - Pet: a parrot named Kiwi")]}, "s3"))
    top = asyncio.run(loaded.search("parrot named Kiwi", 1))[0]
    assert top.entry.id == res.new_entries[0].id


def test_load_with_missing_vectors_is_an_error(built, client, tmp_path):
    ms, _ = built
    ms.save(tmp_path)
    index = VectorIndex.load(tmp_path / INDEX_FILE)
    index.truncate(len(ms.state.entries) - 1)
    index.save(tmp_path / INDEX_FILE)
    with pytest.raises(MemoryStoreError, match="vectors"):
        MemorySystem.load(tmp_path, client)


def test_load_missing_or_corrupt_memory_is_a_store_error(client, tmp_path):
    with pytest.raises(MemoryStoreError, match="no memory"):
        MemorySystem.load(tmp_path / "nowhere", client)
    (tmp_path / MEMORY_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(MemoryStoreError, match="not valid JSON.*delete"):
        MemorySystem.load(tmp_path, client)
    assert MemorySystem.exists(tmp_path) and not MemorySystem.exists(tmp_path / "nowhere")


def test_load_from_other_embedding_model_reembeds(built, client, tmp_path):
    ms, _ = built
    ms.save(tmp_path)
    data = json.loads((tmp_path / MEMORY_FILE).read_text())
    data["meta"]["embedding_model"] = "text-embedding-3-small"
    (tmp_path / MEMORY_FILE).write_text(json.dumps(data))
    loaded = MemorySystem.load(tmp_path, client)
    asyncio.run(loaded.ensure_index())
    assert loaded.index.ntotal == len(loaded.state.entries)
    assert "Pepper" in asyncio.run(loaded.search("beagle named Pepper", 1))[0].entry.text


def test_save_load_empty_memory_then_build(client, tmp_path):
    MemorySystem(client).save(tmp_path)
    loaded = MemorySystem.load(tmp_path, client)
    assert loaded.state.entries == [] and loaded.index.ntotal == 0
    asyncio.run(loaded.build_session(SESSION_1))
    assert loaded.index.ntotal == len(loaded.state.entries) > 0


def test_fork_leaves_original_untouched(built):
    ms, _ = built
    before_state = json.dumps(ms.state.to_dict())
    before_n = ms.index.ntotal
    before_meta = json.dumps(ms.meta)
    fork = ms.fork()
    res = asyncio.run(fork.apply_actions({
        "core": [Action("core", "REWRITE", content="Alex is a forked person.")],
        "episodic": [Action("episodic", "ADD", memory="2023-06-02: Alex bought a kayak")],
    }, "s3"))
    asyncio.run(fork.build_session(_Session("s4", "2023/06/05 (Mon) 10:00", _msgs(("user", "I joined a choir.")))))
    assert json.dumps(ms.state.to_dict()) == before_state
    assert ms.index.ntotal == before_n
    assert json.dumps(ms.meta) == before_meta
    assert fork.state.core.startswith("Alex is a forked person.")
    assert fork.index.ntotal == len(fork.state.entries) > before_n
    # the fork sees both the shared entries and its own
    assert asyncio.run(fork.search("kayak", 1))[0].entry.id == res.new_entries[0].id
    assert "Pepper" in asyncio.run(fork.search("beagle named Pepper", 1))[0].entry.text
    assert all(r.entry.id != res.new_entries[0].id for r in asyncio.run(ms.search("kayak", 50)))


@pytest.fixture(scope="module")
def typed_system(client):
    """Eight entries of each type; the semantic ones are about the session topic, the others are not."""
    ms = MemorySystem(client, construction_top_k=3)
    actions = {
        "episodic": [Action("episodic", "ADD", memory=f"2023-0{i + 1}-01: Alex paid the electricity bill no. {i}")
                     for i in range(8)],
        "semantic": [Action("semantic", "ADD", memory=f"Alex - Dog {i}: the beagle Pepper likes walks in the park {i}")
                     for i in range(8)],
        "procedural": [Action("procedural", "ADD", memory=f"Tax filing {i} | Steps: 1. gather forms 2. submit")
                       for i in range(8)],
    }
    asyncio.run(ms.apply_actions(actions, "s0"))
    ms.state.core = "Alex is a teacher."
    return ms


def test_agents_receive_only_their_own_type(typed_system):
    ms = typed_system
    session = _Session("s9", "2023/06/01 (Thu) 09:00", _msgs(("user", "Pepper the beagle loved the park walk today.")))
    prompts_by_agent = asyncio.run(ms.prepare_session(session))
    mixed = asyncio.run(ms.search(render_session(session.messages), ms.construction_top_k))
    assert {r.entry.type for r in mixed} == {"semantic"}  # a mixed top-k would starve the other agents
    by_type = {t: {e.text for e in ms.state.entries if e.type == t} for t in ENTRY_TYPES}
    for t in ENTRY_TYPES:
        existing = prompts_by_agent[t].inputs["existing"]
        assert len(existing) == ms.construction_top_k  # exactly top-k even when other types are closer
        assert set(existing) <= by_type[t]
        for line in existing:
            assert line in prompts_by_agent[t].messages[1]["content"]
    assert prompts_by_agent["core"].inputs["core"] == "Alex is a teacher."
    assert "existing" not in prompts_by_agent["core"].inputs
    assert prompts_by_agent["episodic"].inputs["session_time"] == session.time
    assert prompts_by_agent["semantic"].inputs["session_text"] == render_session(session.messages)


def test_agents_see_most_similar_entries_of_their_type(typed_system):
    ms = typed_system
    session = _Session("s9", None, _msgs(("user", "Tax filing: gather forms and submit them.")))
    existing = asyncio.run(ms.prepare_session(session))["procedural"].inputs["existing"]
    ranked = [r.entry.text for r in asyncio.run(ms.search(render_session(session.messages), 3, types=["procedural"]))]
    assert existing == ranked


def test_agents_see_at_most_construction_top_k(client, typed_system):
    session = _Session("s9", None, _msgs(("user", "Pepper the beagle")))
    wide = MemorySystem(client, construction_top_k=config.MEMORY_CONSTRUCTION_TOP_K)
    wide.state, wide.index = typed_system.state, typed_system.index
    existing = asyncio.run(wide.prepare_session(session))
    for t in ENTRY_TYPES:
        assert len(existing[t].inputs["existing"]) == 8  # fewer entries than top-k: all of that type


def test_agents_see_nothing_on_empty_memory(client):
    out = asyncio.run(MemorySystem(client).prepare_session(SESSION_1))
    assert all(out[t].inputs["existing"] == [] for t in ENTRY_TYPES)
    assert out["core"].inputs["core"] == ""


def test_core_overflow_is_compressed_and_capped(client):
    ms = MemorySystem(client, core_char_limit=300, core_compress_target=150)
    lines = "\n".join(f"Alex fact {i}: " + "x" * 30 for i in range(15))
    res = asyncio.run(ms.apply_actions({"core": [Action("core", "APPEND", content=lines)]}, "s1"))
    assert res.core_overflow
    assert len(ms.state.core) <= 150
    assert "core compressed" in res.notes
    assert ms.state.core.startswith("Alex fact 0:")


def test_core_overflow_without_client_is_hard_capped(client):
    ms = MemorySystem(None, embedder=client, core_char_limit=100)
    res = asyncio.run(ms.apply_actions({"core": [Action("core", "REWRITE", content="y" * 250)]}, "s1"))
    assert res.core_overflow and ms.state.core == "y" * 100


def test_builds_are_deterministic(client, built):
    async def build():
        ms = MemorySystem(client)
        await ms.build_session(SESSION_1)
        await ms.build_session(SESSION_2)
        return ms

    assert asyncio.run(build()).state.to_dict() == built[0].state.to_dict()


def test_failed_agent_is_recorded_not_dropped(client):
    from scripts.scripted_server import ScriptedServer, default_responder

    def responder(task, body):
        return "no json, sorry" if task == "agent.procedural" else default_responder(task, body)

    with ScriptedServer(responder) as srv:
        builder = LLMClient(provider="openai", base_url=srv.base_url, api_key="x", model="m", max_retries=1,
                            backoff_base_s=0.001)
        ms = MemorySystem(builder, embedder=client)
        res = asyncio.run(ms.build_session(SESSION_1))
    assert set(res.failures) == {"procedural"} and "invalid output" in res.failures["procedural"]
    assert res.calls["procedural"].raw_output == "no json, sorry" and res.calls["procedural"].actions == []
    assert ms.meta["session_failures"] == {"s1": {"procedural": res.failures["procedural"]}}
    assert {e.type for e in res.new_entries} == {"episodic", "semantic"}
    assert ms.state.core.startswith("profile note:")

