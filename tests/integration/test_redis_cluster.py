"""Herald on a three-node Redis Cluster of local redis-server processes (docs/operations.md).

The stack runs with REDIS_CLUSTER=1: channel keys carry the channel as a hash
tag, workers SPUBLISH, the hub SSUBSCRIBEs on each channel's node; the
Celery broker is a plain Redis apart.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid

import pytest
import websocket

from tests.harness import running_stack, wait_until

pytestmark = pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")),
                                reason="needs redis-server and redis-cli (Debian: apt-get install redis-server)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A stack on its own Redis Cluster: a worker, the bridge, two web processes."""
    with running_stack(tmp_path_factory.mktemp("cluster"), cluster=True) as system:
        yield system


def node_of(stack, name: str) -> str:
    """The cluster node holding a key or shard channel."""
    return stack.store().redis.get_node_from_key(name).name


def channels_on_every_node(stack, per_node: int) -> list[str]:
    """Fresh channel names, `per_node` of them on each node of the cluster."""
    keys, found = stack.store().keys, {}
    while len(found) < 3 or min(len(names) for names in found.values()) < per_node:
        channel = f"cl:{uuid.uuid4().hex[:10]}"
        found.setdefault(node_of(stack, keys.history(channel)), []).append(channel)
    return [channel for names in found.values() for channel in names[:per_node]]


def shard_subscribers(stack, name: str) -> int:
    """Connections subscribed to a shard channel (PUBSUB SHARDNUMSUB on its node)."""
    client = stack.store().redis
    reply = client.get_redis_connection(client.get_node_from_key(name)).execute_command("PUBSUB", "SHARDNUMSUB",
                                                                                        name)
    return int(reply[1])


def received(web) -> float:
    """Pub/sub messages the web process's hub listener has received so far."""
    text = web.request("GET", "/metrics")[2]
    return float(re.search(r"^herald_hub_pubsub_messages_total (\S+)$", text, re.M).group(1))


def test_a_channels_keys_share_one_slot_and_channels_spread_over_every_node(cluster):
    keys = cluster.store().keys
    channel = "chat:room"
    names = [keys.history(channel), keys.epoch(channel), keys.gate(channel), keys.waiting(channel),
             keys.done("an-id", channel), keys.effect("route", "an-id", channel), keys.message_channel(channel),
             keys.status_channel(channel),
             keys.presence_channel(channel), keys.presence(channel)]
    assert len({cluster.store().redis.keyslot(name) for name in names}) == 1
    assert keys.history(channel) == f"{cluster.settings.redis_prefix}:hist:{{chat:room}}"
    assert len({node_of(cluster, keys.history(c)) for c in channels_on_every_node(cluster, 1)}) == 3


def test_messages_over_channels_on_every_node_arrive_once_each_in_order(cluster):
    web = cluster.webs[0]
    token = cluster.token()
    channels = channels_on_every_node(cluster, 4)
    client = web.ws(token)
    client.recv()
    for channel in channels:
        client.subscribe(channel)
    per_channel = 15
    ids = {channel: [] for channel in channels}
    for n in range(per_channel):
        batch = [{"channel": channel, "data": n} for channel in channels]
        status, _, body = web.request("POST", "/api/v1/messages/batch", {"messages": batch}, token=token)
        assert status == 202, body
        for item, answer in zip(batch, body["results"]):
            ids[item["channel"]].append(answer["id"])
    got = {channel: [] for channel in channels}
    for _ in range(per_channel * len(channels)):
        frame = client.expect(lambda f: f["op"] == "message", timeout=30)
        got[frame["channel"]].append(frame["id"])
    assert got == ids  # every message once, in publish order per channel
    client.sock.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        client.sock.recv()  # nothing twice
    client.close()
    some = ids[channels[0]][-1]
    message = wait_until(lambda: (m := web.request("GET", f"/api/v1/messages/{some}", token=token)[2])
                         .get("status") == "delivered" and m, 10, what="delivered status")
    assert message["channel"] == channels[0] and message["data"] == per_channel - 1
    history = web.request("GET", f"/api/v1/channels/{channels[-1]}/history?limit=100", token=token)[2]
    assert [m["id"] for m in history["messages"]] == ids[channels[-1]]
    # Nothing is left in flight: the index is cleared after each delivery.
    store = cluster.store()
    wait_until(lambda: store.redis.zcard(store.keys.in_flight_index) == 0, 10, what="an empty in-flight index")


def test_a_websocket_publisher_gets_its_status_and_watchers_get_presence(cluster):
    web = cluster.webs[0]
    channel = channels_on_every_node(cluster, 1)[2]
    watcher = web.ws(cluster.token("watcher"))
    watcher.recv()
    watcher.subscribe(channel, presence=True, status=True)
    sender = cluster.webs[1].ws(cluster.token("ann"))
    sender.recv()
    sender.send({"op": "publish", "channel": channel, "data": "hi", "ref": "p"})
    ack = sender.expect(lambda f: f["op"] == "ack")
    # Not subscribed to the channel: its own status frames come over its process's node channel.
    delivered = sender.expect(lambda f: f["op"] == "status" and f["status"] == "delivered", timeout=20)
    assert delivered["id"] == ack["id"]
    assert watcher.expect(lambda f: f["op"] == "message")["id"] == ack["id"]
    watcher.expect(lambda f: f["op"] == "status" and f["status"] == "delivered" and f["id"] == ack["id"])
    sender.subscribe(channel, presence=True)
    assert watcher.expect(lambda f: f["op"] == "join")["user"] == "ann"
    sender.close()
    assert watcher.expect(lambda f: f["op"] == "leave")["user"] == "ann"
    watcher.close()


def test_a_channel_is_shard_subscribed_while_a_local_client_is_on_it(cluster):
    one, two = cluster.webs
    keys = cluster.store().keys
    channel = channels_on_every_node(cluster, 1)[1]
    messages, status = keys.message_channel(channel), keys.status_channel(channel)
    token = cluster.token()
    first, second = one.ws(token), one.ws(token)
    first.recv(), second.recv()
    assert shard_subscribers(cluster, messages) == 0
    first.subscribe(channel)
    assert shard_subscribers(cluster, messages) == 1 and shard_subscribers(cluster, status) == 0
    second.subscribe(channel, status=True)
    assert shard_subscribers(cluster, messages) == 1 and shard_subscribers(cluster, status) == 1
    before = received(two), received(one)
    for n in range(20):
        assert one.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token)[0] == 202
    for client in (first, second):
        assert [client.expect(lambda f: f["op"] == "message")["data"] for _ in range(20)] == list(range(20))
    second.expect(lambda f: f["op"] == "status" and f["status"] == "delivered")
    assert received(two) == before[0]  # the other process has no client there: it gets none of them
    assert received(one) >= before[1] + 20
    second.send({"op": "unsubscribe", "channel": channel})
    second.expect(lambda f: f["op"] == "unsubscribed")
    assert shard_subscribers(cluster, messages) == 1 and shard_subscribers(cluster, status) == 0
    first.close()
    wait_until(lambda: shard_subscribers(cluster, messages) == 0, 10, what="the channel to be unsubscribed")
    second.close()


def test_resume_while_messages_flow_has_no_gap_and_no_duplicate(cluster):
    web = cluster.webs[0]
    token = cluster.token()
    channel = channels_on_every_node(cluster, 1)[0]
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    sent = []

    def publish(count):
        for n in range(count):
            sent.append(web.request("POST", "/api/v1/messages", {"channel": channel, "data": n},
                                    token=token)[2]["id"])

    publish(5)
    seen = [client.expect(lambda f: f["op"] == "message") for _ in range(5)]
    client.close()
    publish(10)  # missed while away
    flow = threading.Thread(target=publish, args=(50,))
    flow.start()
    time.sleep(0.3)
    again = web.ws(token)
    again.recv()
    reply = again.subscribe(channel, since=seen[-1]["offset"])
    assert reply["recovered"] is True
    flow.join()
    got = [again.expect(lambda f: f["op"] == "message", timeout=20)["id"] for _ in range(60)]
    assert got == sent[5:]
    again.sock.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        again.sock.recv()  # nothing twice
    again.close()


def test_two_senders_ids_and_a_retry_on_a_cluster(cluster):
    # The idempotency answers are written by a script of their own on each claim's node (docs/design.md: "Message ids").
    web = cluster.webs[0]
    channel = channels_on_every_node(cluster, 1)[1]
    watcher = web.ws(cluster.token("watcher"))
    watcher.recv()
    watcher.subscribe(channel)
    answers = {}
    for sender in ("alice", "mallory"):
        status, _, answers[sender] = web.request("POST", "/api/v1/messages", {"id": "same", "channel": channel,
                                                                             "data": sender},
                                                 token=cluster.token(sender))
        assert status == 202 and answers[sender]["id"] == "same"
    frames = [watcher.expect(lambda f: f["op"] == "message", timeout=30) for _ in range(2)]
    assert sorted((f["id"], f["data"]) for f in frames) == [("same", "alice"), ("same", "mallory")]
    again = web.request("POST", "/api/v1/messages", {"id": "same", "channel": channel, "data": "alice"},
                        token=cluster.token("alice"))
    assert again[2] == answers["alice"]
    message = wait_until(lambda: (m := web.request("GET", "/api/v1/messages/same", token=cluster.token("mallory"))[2])
                         .get("status") == "delivered" and m, 10, what="delivered status")
    assert message["data"] == "mallory"
    watcher.close()
