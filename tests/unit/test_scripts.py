"""The script runner's generated Lua: each script's KEYS and ARGV named from its NamedTuples,
and each file's header naming the same slots."""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple

import pipeline.store  # noqa: F401  (makes every script)
from pipeline.store import scripts
from pipeline.store.statuses import STATUS_RANK


class _Keys(NamedTuple):
    gate: str
    message: str | None = None


class _Args(NamedTuple):
    offset: int
    prev: str
    fields: list[str]


class _Rest(NamedTuple):
    markers: list[str]


def test_the_prelude_names_each_slot_and_gathers_a_rest():
    assert scripts.prelude("KEYS", _Keys) == "local gate, message = unpack(KEYS, 1, 2)\n"
    assert scripts.prelude("ARGV", _Args) == (
        "local offset, prev = unpack(ARGV, 1, 2)\n"
        "local fields = {} for i = 3, #ARGV do fields[i - 2] = ARGV[i] end\n")
    assert scripts.prelude("KEYS", _Rest) == "local markers = KEYS\n"
    assert scripts.header(_Keys, _Args) == "-- KEYS: gate, message\n-- ARGV: offset, prev, fields...\n"


def test_a_call_leaves_out_absent_trailing_slots_and_spreads_a_rest():
    keys, args = scripts._flattener(_Keys), scripts._flattener(_Args)
    assert keys(_Keys("g")) == ["g"]
    assert keys(_Keys("g", "m")) == ["g", "m"]
    assert args(_Args(5, "", ["a", "1", "b", "2"])) == [5, "", "a", "1", "b", "2"]


def test_every_lua_file_is_a_script_whose_header_names_its_namedtuples():
    made = {script.file: script for script in scripts._EVERY}
    files = {path.name for path in resources.files("pipeline.store").joinpath("lua").iterdir()
             if path.name.endswith(".lua")}
    assert files == set(made)
    for name, script in made.items():
        assert script.text.startswith(scripts.header(script.keys, script.args)), name
        assert script.text.count("KEYS[") == script.text.count("ARGV[") == 0, name  # slots by name only


def test_shared_values_are_generated_into_the_source_once():
    from pipeline.store.statuses import SET_STATUS

    assert scripts.lua_literal(STATUS_RANK) == "{accepted=1, processing=2, delivered=3, failed=3, rejected=3}"
    assert SET_STATUS.source.text.startswith(f"local RANK = {scripts.lua_literal(STATUS_RANK)}\n")
    assert scripts.lua_literal("a'\n") == "'a\\'\\n'"
    # In the batched form the constants come once, before the per-call function.
    assert SET_STATUS.batched is not None
    assert SET_STATUS.batched.text.startswith(f"local RANK = {scripts.lua_literal(STATUS_RANK)}\n")
    assert "local function run(KEYS, ARGV)\n" in SET_STATUS.batched.text
