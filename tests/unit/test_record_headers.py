"""The Kafka record headers and the `node/client` origin have one codec each (pipeline/core/messages.py)."""

from __future__ import annotations

from pipeline.core.messages import (
    dead_letter_headers,
    from_headers,
    origin_of,
    parse_origin,
    replay_headers,
    to_headers,
)


def test_the_headers_ingest_writes_are_what_the_bridge_reads():
    assert from_headers(to_headers("node-1/client-2", "req-3")) == ("node-1/client-2", "req-3")
    assert to_headers(None, None) == [] and from_headers([]) == (None, None) and from_headers(None) == (None, None)
    assert from_headers(to_headers(None, "req")) == (None, "req")


def test_a_record_written_by_another_producer_keeps_its_other_headers_apart():
    assert from_headers([("trace", b"x"), ("herald-origin", b"n/c")]) == ("n/c", None)


def test_dead_letter_headers_say_why_and_where():
    headers = dict(dead_letter_headers(reason="x" * 5000, partition=2, offset=7, attempts=5, failed_at=1234))
    assert headers == {"herald-error": b"x" * 4096, "herald-partition": b"2", "herald-offset": b"7",
                       "herald-attempts": b"5", "herald-failed-at": b"1234"}
    assert replay_headers() == [("herald-replay", b"1")]


def test_an_origin_names_a_node_and_one_of_its_clients():
    assert origin_of("web-1", "01J") == "web-1/01J"
    assert parse_origin(origin_of("web-1", "01J")) == ("web-1", "01J")
    assert parse_origin(None) == ("", "") and parse_origin("") == ("", "") and parse_origin("no-slash") == ("", "")
