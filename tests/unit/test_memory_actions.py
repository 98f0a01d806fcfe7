"""parse_actions (the validity gate every consumer shares) and apply (the only code that changes memory)."""
import json

import pytest

from memory_system import (
    ALLOWED_ACTIONS,
    Action,
    ActionFormatError,
    MemoryEntry,
    MemoryState,
    actions_to_output,
    apply,
    dominant_type,
    no_op_actions,
    parse_actions,
)


def _entry_out(*ops) -> str:
    return json.dumps({"operations": list(ops)})


# ----------------------------------------------------------------------------- parse_actions: valid outputs


def test_parse_core_append():
    (a,) = parse_actions("core", '{"operation": "APPEND", "content": "Alex is a teacher."}')
    assert a == Action("core", "APPEND", content="Alex is a teacher.")


def test_parse_core_replace():
    (a,) = parse_actions("core", {"operation": "REPLACE", "old_text": "lives in Paris", "new_text": "lives in Rome"})
    assert (a.op, a.old_text, a.new_text) == ("REPLACE", "lives in Paris", "lives in Rome")


def test_parse_core_replace_allows_empty_new_text_to_delete_a_fact():
    (a,) = parse_actions("core", {"operation": "REPLACE", "old_text": "has a cat", "new_text": ""})
    assert a.new_text == ""


def test_parse_core_rewrite():
    (a,) = parse_actions("core", {"operation": "REWRITE", "content": "Alex, 34, teacher in Rome."})
    assert (a.op, a.content) == ("REWRITE", "Alex, 34, teacher in Rome.")


def test_parse_episodic_add_update_merge():
    raw = _entry_out(
        {"action": "ADD", "memory": "2023-05-08: Alex adopted Pepper"},
        {"action": "UPDATE", "old_memory": "old event", "new_memory": "new event"},
        {"action": "MERGE", "old_memories": ["a", "b"], "new_memory": "a and b"},
    )
    acts = parse_actions("episodic", raw)
    assert [a.op for a in acts] == ["ADD", "UPDATE", "MERGE"]
    assert acts[0].memory == "2023-05-08: Alex adopted Pepper"
    assert (acts[1].old_memory, acts[1].new_memory) == ("old event", "new event")
    assert acts[2].old_memories == ("a", "b") and acts[2].new_memory == "a and b"
    assert all(a.agent == "episodic" for a in acts)


def test_parse_semantic_add_update_skip():
    raw = _entry_out(
        {"action": "ADD", "memory": "Alex - Dog: beagle named Pepper"},
        {"action": "UPDATE", "old_memory": "Alex - Job: teacher", "new_memory": "Alex - Job: principal"},
        {"action": "SKIP", "reason": "common knowledge"},
    )
    acts = parse_actions("semantic", raw)
    assert [a.op for a in acts] == ["ADD", "UPDATE", "SKIP"]
    assert acts[2].reason == "common knowledge"


def test_parse_semantic_skip_without_reason_is_valid():
    (a,) = parse_actions("semantic", _entry_out({"action": "SKIP"}))
    assert a.op == "SKIP" and a.reason is None


def test_parse_procedural_add_update():
    raw = _entry_out({"action": "ADD", "memory": "Pancakes | Steps: 1. mix 2. fry"},
                     {"action": "UPDATE", "old_memory": "x", "new_memory": "y"})
    assert [a.op for a in parse_actions("procedural", raw)] == ["ADD", "UPDATE"]


@pytest.mark.parametrize("agent", ["episodic", "semantic", "procedural"])
def test_parse_empty_operations_list_is_valid_for_entry_agents(agent):
    assert parse_actions(agent, '{"operations": []}') == []


def test_parse_strips_think_block():
    raw = '<think>I could {"operation": "REWRITE"} but no.</think>\n{"operation": "APPEND", "content": "x"}'
    (a,) = parse_actions("core", raw)
    assert (a.op, a.content) == ("APPEND", "x")


def test_parse_strips_code_fence():
    raw = 'Here you go:\n```json\n{"operations": [{"action": "ADD", "memory": "m"}]}\n```\nDone.'
    (a,) = parse_actions("semantic", raw)
    assert a.memory == "m"


def test_parse_ignores_prose_around_json():
    raw = 'Sure! The operations are {"operations": [{"action": "ADD", "memory": "m {with} braces"}]} as requested.'
    (a,) = parse_actions("procedural", raw)
    assert a.memory == "m {with} braces"


def test_parse_think_fence_and_prose_together():
    raw = ('<think>thinking about {braces}</think>Result:\n```\n{"operations": [{"action": "add", '
           '"memory": "2023-05-08: event"}]}\n```')
    (a,) = parse_actions("episodic", raw)
    assert (a.op, a.memory) == ("ADD", "2023-05-08: event")


@pytest.mark.parametrize("name", ["append", "Append", " APPEND "])
def test_parse_core_operation_is_case_insensitive(name):
    (a,) = parse_actions("core", {"operation": name, "content": "x"})
    assert a.op == "APPEND"


@pytest.mark.parametrize("agent,name,fields", [
    ("episodic", "merge", {"old_memories": ["a"], "new_memory": "b"}),
    ("semantic", "skip", {}),
    ("procedural", "Update", {"old_memory": "a", "new_memory": "b"}),
    ("episodic", "aDd", {"memory": "m"}),
])
def test_parse_entry_action_is_case_insensitive(agent, name, fields):
    (a,) = parse_actions(agent, {"operations": [{"action": name, **fields}]})
    assert a.op == name.upper()


def test_parse_strips_whitespace_of_fields():
    (a,) = parse_actions("semantic", _entry_out({"action": "ADD", "memory": "  spaced  "}))
    assert a.memory == "spaced"


# ----------------------------------------------------------------------------- parse_actions: invalid outputs


@pytest.mark.parametrize("agent,item", [
    ("core", {"operation": "SKIP", "reason": "nothing new"}),
    ("core", {"operation": "ADD", "content": "x"}),
    ("procedural", {"operations": [{"action": "MERGE", "old_memories": ["a", "b"], "new_memory": "c"}]}),
    ("procedural", {"operations": [{"action": "SKIP", "reason": "none"}]}),
    ("semantic", {"operations": [{"action": "MERGE", "old_memories": ["a", "b"], "new_memory": "c"}]}),
    ("episodic", {"operations": [{"action": "SKIP", "reason": "none"}]}),
    ("episodic", {"operations": [{"action": "APPEND", "memory": "x"}]}),
    ("semantic", {"operations": [{"action": "DELETE", "memory": "x"}]}),
])
def test_parse_rejects_disallowed_action(agent, item):
    with pytest.raises(ActionFormatError) as ei:
        parse_actions(agent, item)
    assert ei.value.agent == agent
    assert "not allowed" in ei.value.reason


def test_allowed_actions_match_the_paper():
    assert ALLOWED_ACTIONS == {
        "core": ("APPEND", "REPLACE", "REWRITE"),
        "episodic": ("ADD", "UPDATE", "MERGE"),
        "semantic": ("ADD", "UPDATE", "SKIP"),
        "procedural": ("ADD", "UPDATE"),
    }


def test_one_disallowed_action_invalidates_the_whole_output():
    raw = {"operations": [{"action": "ADD", "memory": "ok"}, {"action": "SKIP"}]}
    with pytest.raises(ActionFormatError, match=r"operations\[1\]"):
        parse_actions("episodic", raw)


@pytest.mark.parametrize("agent,obj,field", [
    ("core", {"content": "x"}, "operation"),
    ("core", {"operation": 3, "content": "x"}, "operation"),
    ("core", {"operation": "APPEND"}, "content"),
    ("core", {"operation": "APPEND", "content": "   "}, "content"),
    ("core", {"operation": "APPEND", "content": None}, "content"),
    ("core", {"operation": "REWRITE", "content": ""}, "content"),
    ("core", {"operation": "REPLACE", "new_text": "y"}, "old_text"),
    ("core", {"operation": "REPLACE", "old_text": "", "new_text": "y"}, "old_text"),
    ("core", {"operation": "REPLACE", "old_text": "x"}, "new_text"),
    ("semantic", {"operations": [{"memory": "x"}]}, "action"),
    ("semantic", {"operations": [{"action": "ADD"}]}, "memory"),
    ("semantic", {"operations": [{"action": "ADD", "memory": ""}]}, "memory"),
    ("procedural", {"operations": [{"action": "ADD", "memory": 5}]}, "memory"),
    ("semantic", {"operations": [{"action": "UPDATE", "new_memory": "n"}]}, "old_memory"),
    ("episodic", {"operations": [{"action": "UPDATE", "old_memory": "o"}]}, "new_memory"),
    ("procedural", {"operations": [{"action": "UPDATE", "old_memory": " ", "new_memory": "n"}]}, "old_memory"),
    ("episodic", {"operations": [{"action": "MERGE", "new_memory": "n"}]}, "old_memories"),
    ("episodic", {"operations": [{"action": "MERGE", "old_memories": [], "new_memory": "n"}]}, "old_memories"),
    ("episodic", {"operations": [{"action": "MERGE", "old_memories": "a", "new_memory": "n"}]}, "old_memories"),
    ("episodic", {"operations": [{"action": "MERGE", "old_memories": ["a", ""], "new_memory": "n"}]},
     "old_memories"),
    ("episodic", {"operations": [{"action": "MERGE", "old_memories": ["a", 1], "new_memory": "n"}]},
     "old_memories"),
    ("episodic", {"operations": [{"action": "MERGE", "old_memories": ["a", "b"]}]}, "new_memory"),
    ("episodic", {"operations": [{"action": "MERGE", "old_memories": ["a", "b"], "new_memory": ""}]},
     "new_memory"),
])
def test_parse_rejects_missing_or_empty_required_field(agent, obj, field):
    with pytest.raises(ActionFormatError) as ei:
        parse_actions(agent, obj)
    assert field in ei.value.reason


@pytest.mark.parametrize("agent", ["episodic", "semantic", "procedural"])
@pytest.mark.parametrize("obj", [{}, {"operations": None}, {"operations": {"action": "ADD"}},
                                 {"operation": "ADD", "memory": "x"}])
def test_parse_entry_agent_requires_operations_list(agent, obj):
    with pytest.raises(ActionFormatError, match="operations"):
        parse_actions(agent, obj)


@pytest.mark.parametrize("agent", ["episodic", "semantic", "procedural"])
def test_parse_rejects_non_object_operation_item(agent):
    with pytest.raises(ActionFormatError, match="must be an object"):
        parse_actions(agent, {"operations": ["ADD something"]})


@pytest.mark.parametrize("raw", ["[1, 2, 3]", "42", "not json at all", "", '"APPEND"'])
@pytest.mark.parametrize("agent", ["core", "semantic"])
def test_parse_rejects_non_object_text(agent, raw):
    with pytest.raises(ActionFormatError):
        parse_actions(agent, raw)


@pytest.mark.parametrize("raw", [[{"action": "ADD", "memory": "x"}], "ADD x", 7, None])
def test_parse_rejects_non_object_value(raw):
    with pytest.raises(ActionFormatError):
        parse_actions("episodic", raw)


def test_parse_rejects_truncated_json():
    with pytest.raises(ActionFormatError):
        parse_actions("semantic", '{"operations": [{"action": "ADD", "memory": "cut off')


def test_parse_rejects_unknown_agent():
    with pytest.raises(ActionFormatError) as ei:
        parse_actions("working", {"operations": []})
    assert ei.value.agent == "working"


def test_action_format_error_is_a_value_error_with_agent_and_reason():
    with pytest.raises(ValueError) as ei:
        parse_actions("procedural", {"operations": [{"action": "SKIP"}]})
    err = ei.value
    assert isinstance(err, ActionFormatError)
    assert err.agent == "procedural"
    assert "SKIP" in err.reason
    assert str(err).startswith("procedural: ") and err.reason in str(err)


# ----------------------------------------------------------------------------- to_dict / actions_to_output


ROUND_TRIP = [
    ("core", {"operation": "APPEND", "content": "c"}),
    ("core", {"operation": "REWRITE", "content": "whole block"}),
    ("core", {"operation": "REPLACE", "old_text": "o", "new_text": "n"}),
    ("core", {"operation": "REPLACE", "old_text": "o", "new_text": ""}),
    ("episodic", {"operations": [{"action": "ADD", "memory": "m"},
                                 {"action": "UPDATE", "old_memory": "o", "new_memory": "n"},
                                 {"action": "MERGE", "old_memories": ["a", "b"], "new_memory": "ab"}]}),
    ("semantic", {"operations": [{"action": "SKIP", "reason": "r"}, {"action": "SKIP"},
                                 {"action": "ADD", "memory": "m"}]}),
    ("procedural", {"operations": [{"action": "UPDATE", "old_memory": "o", "new_memory": "n"}]}),
    ("procedural", {"operations": []}),
]


@pytest.mark.parametrize("agent,obj", ROUND_TRIP)
def test_to_dict_round_trips_through_parse_actions(agent, obj):
    acts = parse_actions(agent, obj)
    out = actions_to_output(agent, acts)
    assert out == obj
    assert parse_actions(agent, json.dumps(out)) == acts
    if agent != "core":
        assert [parse_actions(agent, {"operations": [a.to_dict()]})[0] for a in acts] == acts


def test_actions_to_output_core_without_actions_is_empty():
    assert actions_to_output("core", []) == {}


def test_actions_to_output_entry_agent_without_actions_is_empty_list():
    assert actions_to_output("semantic", []) == {"operations": []}


def test_written_text_per_action():
    assert Action("core", "APPEND", content="c").written_text() == "c"
    assert Action("core", "REPLACE", old_text="o", new_text="n").written_text() == "n"
    assert Action("episodic", "MERGE", old_memories=("a",), new_memory="m").written_text() == "m"
    assert Action("semantic", "SKIP", reason="r").written_text() == ""


# ----------------------------------------------------------------------------- apply: core


def _core(op, **kw):
    return {"core": [Action("core", op, **kw)]}


def test_apply_append_to_empty_core():
    res = apply(MemoryState(), _core("APPEND", content="Alex is a teacher."), "s1")
    assert res.state.core == "Alex is a teacher."
    assert res.new_entries == [] and res.notes == []


def test_apply_append_to_non_empty_core_adds_a_line():
    res = apply(MemoryState(core="Alex is a teacher.\n"), _core("APPEND", content="Alex lives in Rome."), "s1")
    assert res.state.core == "Alex is a teacher.\nAlex lives in Rome."


def test_apply_append_to_whitespace_core_replaces_it():
    res = apply(MemoryState(core="  \n"), _core("APPEND", content="x"), "s1")
    assert res.state.core == "x"


def test_apply_replace_found_replaces_first_occurrence():
    state = MemoryState(core="Alex lives in Paris.\nAlex likes Paris.")
    res = apply(state, _core("REPLACE", old_text="Paris", new_text="Rome"), "s1")
    assert res.state.core == "Alex lives in Rome.\nAlex likes Paris."
    assert res.notes == []


def test_apply_replace_not_found_appends_new_text_with_note():
    state = MemoryState(core="Alex is a teacher.")
    res = apply(state, _core("REPLACE", old_text="lives in Paris", new_text="Alex lives in Rome."), "s1")
    assert res.state.core == "Alex is a teacher.\nAlex lives in Rome."
    assert len(res.notes) == 1 and "not found" in res.notes[0]


def test_apply_replace_not_found_with_empty_new_text_keeps_core():
    res = apply(MemoryState(core="Alex is a teacher."), _core("REPLACE", old_text="cat", new_text=""), "s1")
    assert res.state.core == "Alex is a teacher."
    assert any("not found" in n for n in res.notes)


def test_apply_rewrite_replaces_whole_block():
    res = apply(MemoryState(core="old\nlines"), _core("REWRITE", content="new block"), "s1")
    assert res.state.core == "new block"


def test_apply_core_overflow_flag():
    res = apply(MemoryState(core="a" * 90), _core("APPEND", content="b" * 20), "s1", core_char_limit=100)
    assert res.core_overflow is True
    assert len(res.state.core) == 111  # apply does not cap; the caller compresses
    res = apply(MemoryState(core="a" * 50), _core("APPEND", content="b" * 20), "s1", core_char_limit=100)
    assert res.core_overflow is False


def test_apply_core_exactly_at_limit_is_not_overflow():
    res = apply(MemoryState(), _core("REWRITE", content="x" * 100), "s1", core_char_limit=100)
    assert res.core_overflow is False


# ----------------------------------------------------------------------------- apply: entries


def _state(*entries):
    return MemoryState(core="", entries=[MemoryEntry(f"m{i:06d}", t, x, "s0") for i, (t, x) in enumerate(entries)])


def test_apply_add_creates_entry_with_type_session_and_no_links():
    res = apply(MemoryState(), {"semantic": [Action("semantic", "ADD", memory="Alex - Dog: Pepper")]}, "s7")
    (e,) = res.new_entries
    assert e == MemoryEntry("m000000", "semantic", "Alex - Dog: Pepper", "s7", ())
    assert res.state.entries == [e]


def test_apply_update_keeps_old_entry_and_links_it():
    state = _state(("semantic", "Alex - Job: teacher"), ("semantic", "Alex - Dog: Pepper"))
    act = Action("semantic", "UPDATE", old_memory="Alex - Job: teacher", new_memory="Alex - Job: principal")
    res = apply(state, {"semantic": [act]}, "s1")
    assert [e.text for e in res.state.entries] == ["Alex - Job: teacher", "Alex - Dog: Pepper",
                                                   "Alex - Job: principal"]
    assert res.new_entries[0].supersedes == ("m000000",)
    assert res.new_entries[0].id == "m000002"
    assert res.notes == []


def test_apply_merge_keeps_old_entries_and_links_all():
    state = _state(("episodic", "2023-05-01: ran 5k"), ("episodic", "2023-05-02: ate"),
                   ("episodic", "2023-05-01: got a medal at the 5k"))
    act = Action("episodic", "MERGE", old_memories=("2023-05-01: got a medal at the 5k", "2023-05-01: ran 5k"),
                 new_memory="2023-05-01: ran a 5k and got a medal")
    res = apply(state, {"episodic": [act]}, "s1")
    assert len(res.state.entries) == 4
    assert res.new_entries[0].supersedes == ("m000002", "m000000")


def test_apply_merge_lists_each_superseded_id_once():
    state = _state(("episodic", "e1"))
    act = Action("episodic", "MERGE", old_memories=("e1", "1. e1"), new_memory="merged")
    res = apply(state, {"episodic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000000",)


def test_apply_update_links_latest_copy_of_the_text():
    state = _state(("semantic", "Alex - Dog: Pepper"), ("semantic", "other"), ("semantic", "Alex - Dog: Pepper"))
    act = Action("semantic", "UPDATE", old_memory="Alex - Dog: Pepper", new_memory="Alex - Dog: Pepper, 3 years")
    res = apply(state, {"semantic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000002",)


def test_apply_update_prefers_entry_of_own_type():
    state = _state(("semantic", "shared text"), ("episodic", "shared text"), ("procedural", "shared text"))
    act = Action("semantic", "UPDATE", old_memory="shared text", new_memory="new")
    res = apply(state, {"semantic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000000",)


def test_apply_update_falls_back_to_other_type_when_own_has_no_match():
    state = _state(("episodic", "only here"), ("semantic", "x"))
    act = Action("semantic", "UPDATE", old_memory="only here", new_memory="new")
    res = apply(state, {"semantic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000000",)


@pytest.mark.parametrize("quoted", [
    "3. [EPISODIC] 2023-05-08: Alex adopted Pepper",
    "[EPISODIC] 2023-05-08: Alex adopted Pepper",
    "12) 2023-05-08: Alex adopted Pepper",
    "  2023-05-08:   Alex  adopted\nPepper ",
    "2023-05-08: ALEX ADOPTED PEPPER",
    "1. [episodic] 2023-05-08: Alex adopted Pepper",
])
def test_apply_matches_numbered_tagged_or_reformatted_copies(quoted):
    state = _state(("episodic", "2023-05-01: other"), ("episodic", "2023-05-08: Alex adopted Pepper"))
    act = Action("episodic", "UPDATE", old_memory=quoted, new_memory="2023-05-08: Alex adopted Pepper, a beagle")
    res = apply(state, {"episodic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000001",)
    assert res.notes == []


def test_apply_matches_prefix_when_details_tail_dropped():
    state = _state(("episodic", "2023-05-08: Alex adopted Pepper | Details: said 'today'"))
    act = Action("episodic", "UPDATE", old_memory="2023-05-08: Alex adopted Pepper", new_memory="n")
    res = apply(state, {"episodic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000000",)


def test_apply_update_unmatched_adds_unlinked_entry_with_note():
    state = _state(("semantic", "Alex - Dog: Pepper"))
    act = Action("semantic", "UPDATE", old_memory="Alex - Cat: Tom", new_memory="Alex - Cat: Tom, 2 years")
    res = apply(state, {"semantic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ()
    assert res.new_entries[0].text == "Alex - Cat: Tom, 2 years"
    assert len(res.notes) == 1 and "not found" in res.notes[0] and "semantic UPDATE" in res.notes[0]


def test_apply_merge_partially_matched_links_found_and_notes_missing():
    state = _state(("episodic", "a"), ("episodic", "b"))
    act = Action("episodic", "MERGE", old_memories=("a", "zzz", "b"), new_memory="ab")
    res = apply(state, {"episodic": [act]}, "s1")
    assert res.new_entries[0].supersedes == ("m000000", "m000001")
    assert len(res.notes) == 1 and "1 old memory" in res.notes[0]


def test_apply_update_only_links_pre_session_entries():
    # An UPDATE cannot refer to an entry added in the same session: the agents only saw the pre-session state.
    acts = {"semantic": [Action("semantic", "ADD", memory="fresh"),
                         Action("semantic", "UPDATE", old_memory="fresh", new_memory="fresher")]}
    res = apply(MemoryState(), acts, "s1")
    assert res.new_entries[1].supersedes == ()
    assert any("not found" in n for n in res.notes)


def test_apply_skip_is_a_no_op():
    state = _state(("semantic", "x"))
    res = apply(state, {"semantic": [Action("semantic", "SKIP", reason="common knowledge")]}, "s1")
    assert res.new_entries == [] and res.notes == []
    assert res.state.entries == state.entries


def test_apply_no_op_actions_changes_nothing():
    state = MemoryState(core="c", entries=_state(("episodic", "e")).entries)
    res = apply(state, no_op_actions(), "s1")
    assert res.state.to_dict() == state.to_dict()
    assert res.new_entries == [] and res.core_overflow is False


def _mixed_actions():
    return {
        "procedural": [Action("procedural", "ADD", memory="P1")],
        "semantic": [Action("semantic", "ADD", memory="S1"), Action("semantic", "ADD", memory="S2")],
        "core": [Action("core", "APPEND", content="C")],
        "episodic": [Action("episodic", "ADD", memory="E1")],
    }


def test_apply_fixed_order_regardless_of_dict_order():
    forward = {k: _mixed_actions()[k] for k in ("core", "episodic", "semantic", "procedural")}
    backward = _mixed_actions()
    for acts in (forward, backward):
        res = apply(MemoryState(), acts, "s1")
        assert [(e.id, e.type, e.text) for e in res.new_entries] == [
            ("m000000", "episodic", "E1"), ("m000001", "semantic", "S1"), ("m000002", "semantic", "S2"),
            ("m000003", "procedural", "P1")]
        assert res.state.core == "C"


def test_apply_ids_are_sequential_and_deterministic():
    state = _state(("episodic", "a"), ("semantic", "b"))
    r1 = apply(state, _mixed_actions(), "s1")
    r2 = apply(state, _mixed_actions(), "s1")
    assert r1.state.to_dict() == r2.state.to_dict()
    assert [e.id for e in r1.state.entries] == [f"m{i:06d}" for i in range(6)]


def test_apply_ids_continue_across_sessions():
    r1 = apply(MemoryState(), _mixed_actions(), "s1")
    r2 = apply(r1.state, {"episodic": [Action("episodic", "ADD", memory="E2")]}, "s2")
    assert r2.new_entries[0].id == "m000004" and r2.new_entries[0].session == "s2"


def test_apply_is_pure():
    state = MemoryState(core="Alex lives in Paris.", entries=_state(("semantic", "Alex - Job: teacher")).entries)
    before = json.dumps(state.to_dict())
    entries_obj = state.entries
    acts = {
        "core": [Action("core", "REPLACE", old_text="Paris", new_text="Rome")],
        "semantic": [Action("semantic", "UPDATE", old_memory="Alex - Job: teacher", new_memory="principal")],
        "episodic": [Action("episodic", "ADD", memory="e")],
    }
    res = apply(state, acts, "s1")
    assert json.dumps(state.to_dict()) == before
    assert state.entries is entries_obj and len(entries_obj) == 1
    assert res.state is not state and res.state.entries is not state.entries
    assert res.state.core == "Alex lives in Rome."


def test_apply_accepts_parsed_actions_end_to_end():
    state = _state(("episodic", "2023-05-01: Alex ran a 5k"))
    actions = {
        "core": parse_actions("core", '{"operation": "APPEND", "content": "Alex runs."}'),
        "episodic": parse_actions("episodic", _entry_out(
            {"action": "update", "old_memory": "1. [EPISODIC] 2023-05-01: Alex ran a 5k",
             "new_memory": "2023-05-01: Alex ran a 5k in 25 minutes"})),
        "semantic": parse_actions("semantic", _entry_out({"action": "skip"})),
        "procedural": parse_actions("procedural", '{"operations": []}'),
    }
    res = apply(state, actions, "s2")
    assert res.state.core == "Alex runs."
    assert [(e.text, e.supersedes) for e in res.new_entries] == [
        ("2023-05-01: Alex ran a 5k in 25 minutes", ("m000000",))]


# ----------------------------------------------------------------------------- state round trip


def test_memory_state_dict_round_trip():
    state = MemoryState(core="c", entries=[MemoryEntry("m000000", "episodic", "e", "s1", ("m9",))])
    again = MemoryState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state


def test_entry_tagged_carries_type_tag():
    assert MemoryEntry("m0", "procedural", "do x", "s").tagged() == "[PROCEDURAL] do x"


# ----------------------------------------------------------------------------- dominant_type


@pytest.mark.parametrize("counts,expected", [
    ({"episodic": 3, "semantic": 5, "procedural": 1}, "semantic"),
    ({"episodic": 0, "semantic": 0, "procedural": 2}, "procedural"),
    ({"episodic": 4, "semantic": 4, "procedural": 4}, "episodic"),
    ({"episodic": 1, "semantic": 4, "procedural": 4}, "semantic"),
    ({"episodic": 4, "semantic": 0, "procedural": 4}, "episodic"),
    ({"episodic": 0, "semantic": 0, "procedural": 0}, None),
    ({}, None),
    ({"semantic": 2}, "semantic"),
])
def test_dominant_type_with_ties(counts, expected):
    assert dominant_type(counts) == expected
