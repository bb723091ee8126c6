"""A message that kills every worker process running it is isolated and dead-lettered."""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import ROOT, wait_until

POISON = Path(__file__).with_name("poison")


def test_a_message_that_kills_workers_is_dead_lettered_and_the_rest_delivered(make_stack, channel):
    stack = make_stack(env={"HERALD_MAX_REDELIVERIES": 2})
    worker = stack.worker(PYTHONPATH=f"{POISON}:{ROOT}")
    web = stack.web()
    token, admin = stack.token(), stack.token("ops", admin=True)
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    # Published before the bridge starts, so they reach the worker as one batch.
    ids = []
    for n in range(20):
        data = {"poison": True} if n == 7 else {"n": n}
        status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": data}, token=token)
        assert status == 202
        ids.append(answer["id"])
    poison = ids[7]
    stack.bridge()

    good = [i for i in ids if i != poison]
    seen = [client.expect(lambda f: f["op"] == "message", timeout=120)["id"] for _ in good]
    assert seen == good  # each good message once, in order; the poison one never
    letter = wait_until(lambda: (lambda p: p["total"] == 1 and p["items"][0])(
        web.request("GET", "/api/v1/dlq", token=admin)[2]), 60, 0.5, "the poison message in the DLQ")
    # Dead-lettered at its third death alone, past HERALD_MAX_REDELIVERIES=2.
    assert letter["id"] == poison and "worker died 3 times" in letter["reason"]
    message = web.request("GET", f"/api/v1/messages/{poison}", token=token)[2]
    assert message["status"] == "failed"
    history = web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"]
    assert [m["id"] for m in history] == good
    deaths = worker.log().count("exited with 'exitcode 137'")
    assert 3 <= deaths <= 4  # the poison message alone 3 times, after its batch (if it had one) once
    print("\nFAULT-FIGURES " + json.dumps({"test": "poison message", "published": len(ids), "delivered": len(seen),
                                           "dead_lettered": 1, "worker_deaths": deaths}))
    client.close()
