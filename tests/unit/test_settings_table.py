"""docs/configuration.md's table of variables agrees with their declarations in pipeline/core/settings.py:
every declared variable has a row, every row names a declared variable, and a default the table
shows is the declared one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.core.settings import variables

TABLE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
# Rows of variables other software reads: prometheus_client, and Flower (tasks/flower.py
# only checks that its password is set).
READ_ELSEWHERE = {"PROMETHEUS_MULTIPROC_DIR", "FLOWER_BASIC_AUTH"}
# Rows whose default depends on other variables or on the machine, said in words.
DESCRIBED = {"CELERY_BROKER_URL", "KAFKA_SECURITY_PROTOCOL", "KAFKA_TRUSTED_CERT", "HERALD_TOPIC_REPLICATION",
             "HERALD_ORDER_WAIT", "HERALD_NODE_ID", "HERALD_CACHE_URL", "HERALD_RATE_LIMITS"}
EMPTY = "empty"  # how the table shows "" and ()
WORDS = object()  # a default cell that describes the default rather than showing it


def rows(markdown: str) -> dict[str, tuple[str, str]]:
    """{variable: (its default cell, its whole row)} for each table row whose first cell names
    variables in backticks; a row of several (`A` / `B`) gives each its part of a default
    written the same way (1 / 2), or the whole default."""
    found = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        _, first, default, _ = line.split("|", 3)
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", first)
        parts = [part.strip() for part in default.split(" / ")]
        if len(parts) != len(names):
            parts = [default.strip()] * len(names)
        found.update((name, (part, line)) for name, part in zip(names, parts))
    return found


def shown(cell: str) -> object:
    """The default a cell shows: a number (a unit of seconds and a note in brackets aside),
    on/off, a `string`, none or empty; WORDS for a description."""
    value = re.sub(r" \([^()]*\)$", "", cell)
    quoted = re.fullmatch(r"`([^`]*)`", value)
    if quoted:
        value = quoted.group(1)
    if value in ("on", "off"):
        return value == "on"
    if quoted:
        return value
    if value in ("none", EMPTY):
        return None if value == "none" else EMPTY
    number = re.fullmatch(r"\d[\d,]*(?:\.\d+)?(?: s)?", value)
    return float(value.removesuffix(" s").replace(",", "")) if number else WORDS


def agrees(cell: str, default: object) -> bool:
    """Whether a default cell shows `default`."""
    value = shown(cell)
    if isinstance(default, bool) or default is None:
        return value is default
    if isinstance(default, int | float):
        return isinstance(value, float) and value == default
    if default in ("", ()):
        return value == EMPTY
    return value == default


def problems(markdown: str) -> list[str]:
    """Where the table and the declarations disagree, one sentence each."""
    table = rows(markdown)
    declared = {var.name: (field.default, var) for field, var in variables()}
    found = []
    for name, (default, var) in declared.items():
        if name not in table:
            found.append(f"{name} has no row ({var.doc}; default {default!r})")
            continue
        cell, line = table[name]
        if name not in DESCRIBED and not agrees(cell, default):
            found.append(f"{name}: the table shows {cell!r}, the declared default is {default!r}")
        if var.alias and f"`{var.alias}`" not in line:
            found.append(f"{name}: its row does not name {var.alias}, read when it is unset")
    undeclared = table.keys() - declared.keys() - READ_ELSEWHERE
    found += [f"{name} has a row but no declaration" for name in sorted(undeclared)]
    return found


def test_the_table_documents_every_declared_variable_and_only_those():
    assert problems(TABLE.read_text()) == []


def test_every_default_said_in_words_is_one_the_code_derives():
    # A variable leaves DESCRIBED once its row shows a plain default.
    table = rows(TABLE.read_text())
    declared = {var.name for _, var in variables()}
    assert declared >= DESCRIBED
    assert table.keys() >= READ_ELSEWHERE and not READ_ELSEWHERE & declared
    described = {name for name, (cell, _) in table.items() if shown(cell) is WORDS}
    assert described - READ_ELSEWHERE <= DESCRIBED


@pytest.mark.parametrize("cell, value", [
    ("8000", 8000.0), ("3600 s", 3600.0), ("8388608 (8 MiB)", 8388608.0), ("10,000,000", 10_000_000.0),
    ("0 (for ever)", 0.0), ("0.001", 0.001), ("`on`", True), ("off", False), ("none", None),
    ("empty (any)", EMPTY), ("`alerts:rules`", "alerts:rules"), ("min(3, brokers)", WORDS),
])
def test_a_default_cell_is_read_as_the_value_it_shows(cell, value):
    assert shown(cell) == value


# The check can fail: each kind of disagreement, made in a copy of the table, is found.


def _edit(old: str, new: str) -> str:
    text = TABLE.read_text()
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_a_missing_row_is_found():
    line = next(line for line in TABLE.read_text().splitlines() if line.startswith("| `HERALD_BATCH_SIZE` |"))
    found = problems(_edit(line + "\n", ""))
    assert len(found) == 1 and found[0].startswith("HERALD_BATCH_SIZE has no row")


def test_a_wrong_default_is_found_in_a_row_of_one_and_in_a_row_of_two():
    assert problems(_edit("| `HERALD_BATCH_SIZE` | 100 |", "| `HERALD_BATCH_SIZE` | 200 |")) == [
        "HERALD_BATCH_SIZE: the table shows '200', the declared default is 100"]
    found = problems(_edit("| 0.5 / 60 s |", "| 0.5 / 30 s |"))
    assert found == ["HERALD_RETRY_MAX_DELAY: the table shows '30 s', the declared default is 60.0"]
    assert problems(_edit("| `HERALD_AUTH` | `on` |", "| `HERALD_AUTH` | `off` |")) == [
        "HERALD_AUTH: the table shows '`off`', the declared default is True"]


def test_a_default_said_in_words_is_found_unless_declared_as_described():
    found = problems(_edit("| `HERALD_BATCH_SIZE` | 100 |", "| `HERALD_BATCH_SIZE` | a hundred |"))
    assert found == ["HERALD_BATCH_SIZE: the table shows 'a hundred', the declared default is 100"]


def test_a_row_of_an_undeclared_variable_is_found():
    line = "| `HERALD_BATCH_SIZE` | 100 |"
    assert problems(_edit(line, "| `HERALD_NO_SUCH_VARIABLE` | 1 | nothing |\n" + line)) == [
        "HERALD_NO_SUCH_VARIABLE has a row but no declaration"]


def test_an_alias_its_row_does_not_name_is_found():
    found = problems(_edit("when unset, `KAFKA_URL`", "when unset, KAFKA_URL"))
    assert found == ["KAFKA_BOOTSTRAP_SERVERS: its row does not name KAFKA_URL, read when it is unset"]
