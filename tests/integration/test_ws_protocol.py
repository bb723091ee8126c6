"""The WebSocket protocol frame by frame, with a real client against a real server."""

from __future__ import annotations

import json
import socket
import time

import jwt
import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import SECRET, Stack, close_code, wait_until


def test_connect_frame_then_ping_with_ref(web, token):
    client = web.ws()
    client.send({"op": "connect", "token": token})
    assert client.recv()["op"] == "connected"
    client.send({"op": "ping", "ref": "r1"})
    assert client.recv() == {"op": "pong", "ref": "r1"}
    client.close()


@pytest.mark.parametrize("bad", [
    "garbage",
    jwt.encode({"sub": "a", "exp": int(time.time()) - 3600}, SECRET, algorithm="HS256"),
    jwt.encode({"sub": "a", "exp": int(time.time()) + 3600}, "not-the-secret-not-the-secret-1234", algorithm="HS256"),
    jwt.encode({"sub": "a", "exp": int(time.time()) + 3600}, None, algorithm="none"),
])
def test_bad_tokens_close_4001(web, bad):
    client = web.ws()
    client.send({"op": "connect", "token": bad})
    assert close_code(client) == 4001
    client.close()
    on_url = web.ws(bad)
    assert close_code(on_url) == 4001
    on_url.close()


def test_first_frame_must_be_connect(web):
    client = web.ws()
    client.send({"op": "subscribe", "channel": "x"})
    assert close_code(client) == 4001
    client.close()


@pytest.mark.parametrize("value", [["x"], {"a": 1}, 7])
def test_a_connect_token_that_is_not_a_string_closes_4001_without_an_exception(web, value):
    client = web.ws()
    client.send({"op": "connect", "token": value})
    assert close_code(client) == 4001
    client.close()
    assert "TypeError" not in web.proc.log()


@pytest.mark.parametrize("ref", ['"\\ud800"', "1e400"])
def test_a_ref_no_reply_can_carry_is_a_bad_frame_and_the_connection_goes_on(web, token, ref):
    # A lone surrogate and an infinity parse, but no JSON reply can carry them.
    client = web.ws(token)
    client.recv()
    client.sock.send(f'{{"op": "ping", "ref": {ref}}}')
    assert client.recv() == {"op": "error", "code": "bad_frame", "message": "ref must be JSON a reply can carry"}
    client.send({"op": "ping", "ref": "next"})
    assert client.recv() == {"op": "pong", "ref": "next"}
    client.close()


def test_wrong_origin_is_refused_before_the_upgrade(web, token):
    # Our own TCP socket: websocket-client leaks its own when the handshake is refused.
    raw = socket.create_connection(("127.0.0.1", web.port), timeout=10)
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            web.ws(token, origin="https://evil.example", socket=raw)
    finally:
        raw.close()
    assert info.value.status_code == 403
    same = web.ws(token, origin=f"http://127.0.0.1:{web.port}")
    assert same.recv()["op"] == "connected"
    same.close()


def test_forbidden_subscribe_and_publish_are_error_frames(stack, web):
    client = web.ws(stack.token(subscribe=["chat:*"], publish=["chat:*"]))
    client.recv()
    client.send({"op": "subscribe", "channel": "news:x", "ref": 1})
    assert client.recv() == {"op": "error", "ref": 1, "code": "forbidden",
                             "message": "this token may not subscribe to news:x"}
    client.send({"op": "publish", "channel": "news:x", "data": 1, "ref": 2})
    error = client.recv()
    assert error["op"] == "error" and error["code"] == "forbidden" and error["ref"] == 2
    client.send({"op": "ping"})
    assert client.recv()["op"] == "pong"  # still connected
    client.close()


def test_publish_over_the_socket_acks_after_kafka_and_delivers(web, token, channel):
    client = web.ws(token)
    client.recv()
    client.subscribe(channel, status=True)
    client.send({"op": "publish", "channel": channel, "data": {"hi": 1}, "ref": "p1"})
    ack = client.expect(lambda f: f["op"] == "ack")
    assert ack["ref"] == "p1" and ack["status"] == "accepted"
    message = client.expect(lambda f: f["op"] == "message")
    assert message["id"] == ack["id"] and message["data"] == {"hi": 1}
    client.send({"op": "unsubscribe", "channel": channel, "ref": "u"})
    assert client.expect(lambda f: f["op"] == "unsubscribed") == {"op": "unsubscribed", "channel": channel, "ref": "u"}
    client.close()


def test_bad_frames_get_errors_then_a_close(web, token):
    client = web.ws(token)
    client.recv()
    client.sock.send("not json")
    assert client.recv()["op"] == "error"
    client.send({"op": "nope"})
    assert client.recv()["code"] == "bad_frame"
    client.sock.send("[" * 30_000)  # nested too deep for the JSON parser
    assert client.recv()["op"] == "error"
    for _ in range(2):  # the fourth and fifth bad frames in a row
        client.sock.send("{")
    assert close_code(client) == 1008
    client.close()


@pytest.mark.parametrize("since", ["nope", "\u0663-1", "99999999999999999999999-0", " 1-2", 17, ""])
def test_a_bad_resume_offset_is_a_bad_frame_not_a_retry(web, token, channel, since):
    # Redis would refuse these: answered "unavailable", clients would retry them for ever.
    client = web.ws(token)
    client.recv()
    client.send({"op": "subscribe", "channel": channel, "since": since, "ref": "r"})
    assert client.recv() == {"op": "error", "code": "bad_frame", "ref": "r",
                             "message": "since is an offset from a message frame"}
    client.close()


def test_frame_over_the_limit_closes_4009(stack, web, token, channel):
    client = web.ws(token)
    client.recv()
    client.send({"op": "publish", "channel": channel, "data": "x" * (stack.settings.max_message_bytes + 10)})
    assert close_code(client) == 4009
    client.close()


def test_flooding_closes_4029(web, token):
    client = web.ws(token)
    client.recv()
    try:
        for _ in range(1000):
            client.send({"op": "ping"})
    except (websocket.WebSocketException, OSError):
        pass
    assert close_code(client) == 4029
    client.close()


def test_expired_token_closes_the_connection_4001(stack, web):
    client = web.ws(stack.token(ttl=1))
    client.recv()
    # The token's exp plus the verification leeway (10 s).
    assert close_code(client, timeout=20) == 4001
    client.close()


def test_resume_replays_exactly_what_was_missed(web, token, channel):
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    first = [web.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token)[2]["id"]
             for n in range(3)]
    seen = [client.expect(lambda f: f["op"] == "message") for _ in range(3)]
    assert [f["id"] for f in seen] == first
    client.close()
    missed = [web.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token)[2]["id"]
              for n in range(50)]
    wait_until(lambda: len(web.request("GET", f"/api/v1/channels/{channel}/history?limit=100",
                                       token=token)[2]["messages"]) == 53, 30, what="delivery of 50")
    again = web.ws(token)
    again.recv()
    reply = again.subscribe(channel, since=seen[-1]["offset"])
    assert reply["recovered"] is True and reply["replayed"] == 50
    replayed = [again.expect(lambda f: f["op"] == "message")["id"] for _ in range(50)]
    assert replayed == missed
    again.close()


def test_resume_while_messages_flow_has_no_gap_and_no_duplicate(web, token, channel):
    import threading

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
    flow = threading.Thread(target=publish, args=(60,))
    flow.start()
    time.sleep(0.3)
    again = web.ws(token)
    again.recv()
    again.subscribe(channel, since=seen[-1]["offset"])
    flow.join()
    got = []
    while len(got) < 60:
        got.append(again.expect(lambda f: f["op"] == "message")["id"])
    assert got == sent[5:]
    time.sleep(0.5)
    again.sock.settimeout(0.5)
    with pytest.raises(websocket.WebSocketTimeoutException):
        again.sock.recv()  # nothing twice
    again.close()


def test_presence_join_leave_and_listing(stack, web, channel):
    watcher = web.ws(stack.token("watcher"))
    watcher.recv()
    watcher.subscribe(channel, presence=True)
    lurker = web.ws(stack.token("lurker"))
    lurker.recv()
    lurker.subscribe(channel)  # `presence` false: it hears the channel without being listed
    joiner = web.ws(stack.token("ann"))
    hello = joiner.recv()
    joiner.subscribe(channel, presence=True)
    join = watcher.expect(lambda f: f["op"] == "join" and f["user"] == "ann")
    assert join == {"op": "join", "channel": channel, "user": "ann", "client": hello["client"]}
    clients = web.request("GET", f"/api/v1/channels/{channel}/presence", token=stack.token())[2]["clients"]
    assert {c["user"] for c in clients} == {"watcher", "ann"} and all(c["since"] > 0 for c in clients)
    assert all(f.get("user") != "lurker" for f in watcher.frames)
    joiner.close()
    leave = watcher.expect(lambda f: f["op"] == "leave")
    assert leave["user"] == "ann" and leave["client"] == hello["client"]
    lurker.close()
    watcher.close()


OTHERS = 100


def test_slow_consumer_is_closed_4008_and_the_others_keep_receiving(tmp_path, channel):
    system = Stack(tmp_path / "slow", HERALD_SEND_QUEUE=128, HERALD_WS_MAX_PER_USER=1000)
    try:
        system.worker()
        system.bridge()
        web = system.web()
        token = system.token()
        # A tiny receive buffer, and then it never reads again.
        slow = web.ws(token, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 2048),))
        slow.recv()
        slow.subscribe(channel)
        others = []
        for _ in range(OTHERS):
            other = web.ws(token)
            other.recv()
            other.subscribe(channel)
            others.append(other)
        big = "y" * 4000  # 200 of them fill the slow client's socket buffers, then its send queue
        import threading

        received = []

        def drain(other):
            for _ in range(200):
                other.expect(lambda f: f["op"] == "message", timeout=60)
            received.append(time.monotonic())

        readers = [threading.Thread(target=drain, args=(other,)) for other in others]
        for reader in readers:
            reader.start()
        started = time.monotonic()
        for n in range(200):  # a steady 20 messages/s, 2,000 deliveries/s
            assert web.request("POST", "/api/v1/messages", {"channel": channel, "data": big}, token=token)[0] == 202
            time.sleep(max(0.0, started + (n + 1) / 20 - time.monotonic()))
        for reader in readers:
            reader.join(90)
        assert len(received) == OTHERS
        elapsed = max(received) - started
        assert close_code(slow, timeout=30) == 4008
        metrics = web.request("GET", "/metrics")[2]
        closes = [sample.value for family in text_string_to_metric_families(metrics) for sample in family.samples
                  if sample.name == "herald_ws_slow_consumer_closes_total"]
        assert closes == [1.0]
        print("\nFIGURES " + json.dumps({"test": "slow consumer", "others": OTHERS, "messages_each": 200,
                                         "seconds_for_all_others": round(elapsed, 2)}))
        for client in [slow, *others]:
            client.close()
    finally:
        system.stop()


@pytest.fixture
def capped(tmp_path):
    system = Stack(tmp_path, HERALD_WS_MAX_PER_USER=2, HERALD_PRESENCE_TTL=3)
    try:
        system.webs = [system.web("capped1"), system.web("capped2")]
        yield system
    finally:
        system.stop()


def test_connection_cap_per_user_closes_4029_across_web_processes(capped):
    one, other = capped.webs
    token = capped.token("greedy")
    first, second = one.ws(token), other.ws(token)
    assert first.recv()["op"] == second.recv()["op"] == "connected"
    # The cap counts the user's connections on every web process.
    for web in (one, other):
        refused = web.ws(token)
        assert close_code(refused) == 4029
        refused.close()
    # A closed connection stops counting at once.
    second.close()
    def third_accepted():
        third = other.ws(token)
        try:
            return third.recv()["op"] == "connected"
        except (websocket.WebSocketException, OSError, ValueError):  # ValueError: the close frame's empty text
            return False
        finally:
            third.close()
    wait_until(third_accepted, 10, 0.2, "a connection to be accepted after one closed")
    first.close()


def test_a_killed_web_process_leaves_no_ghosts_in_presence(capped, channel):
    doomed, survivor = capped.webs
    ghost = doomed.ws(capped.token("ghost"))
    ghost.recv()
    ghost.subscribe(channel, presence=True)
    token = capped.token()
    def listing():
        return survivor.request("GET", f"/api/v1/channels/{channel}/presence", token=token)[2]["clients"]

    assert [c["user"] for c in listing()] == ["ghost"]
    doomed.proc.kill()
    started = time.monotonic()
    wait_until(lambda: listing() == [], 30, 0.5, "the ghost to leave presence")
    print("\nFIGURES " + json.dumps({"test": "presence after kill -9",
                                     "seconds_to_clear": round(time.monotonic() - started, 1), "presence_ttl": 3}))
    ghost.close()
    # Its connection stopped counting toward the cap (2) as well.
    wait_until(lambda: capped.store().redis.zcard(capped.store().keys.user_connections("ghost")) == 0, 10, 0.2,
               "the dead process's connection to lapse")
    again = [survivor.ws(capped.token("ghost")) for _ in range(2)]
    assert [client.recv()["op"] for client in again] == ["connected", "connected"]
    for client in again:
        client.close()


def test_python_client_publishes_and_resumes_after_a_dropped_connection(web, token, channel):
    from herald_client import HeraldClient, HeraldError

    with HeraldClient(f"ws://127.0.0.1:{web.port}/ws", token) as herald:
        assert herald.subscribe(channel)["op"] == "subscribed"
        ack = herald.publish(channel, {"n": 1})
        first = next(f for f in herald.frames(timeout=10) if f["op"] == "message")
        assert first["id"] == ack["id"]
        herald._sock.sock.close()  # the network drops
        answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": 2}}, token=token)[2]
        second = next(f for f in herald.frames(timeout=10) if f["op"] == "message")
        assert second["id"] == answer["id"]
        with pytest.raises(HeraldError, match="bad_channel"):
            herald.subscribe("bad channel name")
        # The refused channel is not resubscribed after the next drop.
        herald._sock.sock.close()
        answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": {"n": 3}}, token=token)[2]
        third = next(f for f in herald.frames(timeout=10) if f["op"] == "message")
        assert third["id"] == answer["id"]


def test_resume_from_the_start_replays_all_of_an_untrimmed_history(web, token, channel):
    for n in range(3):
        assert web.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token)[0] == 202
    wait_until(lambda: len(web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"])
               == 3, 30, what="three messages in history")
    client = web.ws(token)
    client.recv()
    reply = client.subscribe(channel, since="0-0")
    assert reply["recovered"] is True and reply["replayed"] == 3
    assert [client.expect(lambda f: f["op"] == "message")["data"] for _ in range(3)] == [0, 1, 2]
    client.close()


def test_resume_from_trimmed_history_reads_the_archive_and_lost_history_says_recovered_false(stack, web, token):
    import uuid

    from sqlalchemy import delete

    from pipeline.archive import Archive, ArchiveReader
    from pipeline.archive.tables import messages

    channel = f"short:{uuid.uuid4().hex[:8]}"  # the "short" namespace keeps 5 messages
    client = web.ws(token)
    client.recv()
    client.subscribe(channel)
    web.request("POST", "/api/v1/messages", {"channel": channel, "data": 0}, token=token)
    first = client.expect(lambda f: f["op"] == "message")
    client.close()
    for n in range(10):
        web.request("POST", "/api/v1/messages", {"channel": channel, "data": n}, token=token)
    archive = Archive(stack.settings.database_url)
    reader = ArchiveReader(archive)
    wait_until(lambda: len(reader.after(channel, "0-0", 100)) == 11, 30, what="11 messages archived")
    again = web.ws(token)
    again.recv()
    # Trimmed from the stream, still in the archive: resumed whole.
    reply = again.subscribe(channel, since=first["offset"])
    assert reply["recovered"] is True and reply["replayed"] == 10
    assert again.subscribe(channel, since="0-0")["recovered"] is True
    # Pruned from the archive as well: lost, and said so.
    with archive.engine.begin() as conn:
        conn.execute(delete(messages).where(messages.c.channel == channel))
    assert again.subscribe(channel, since=first["offset"])["recovered"] is False
    assert again.subscribe(channel, since="0-0")["recovered"] is False  # "from the start": trimmed too
    # History lost altogether (Redis flushed or restarted empty) also says so.
    store = stack.store()
    store.redis.delete(store.keys.history(channel), store.keys.epoch(channel))
    web.request("POST", "/api/v1/messages", {"channel": channel, "data": "after"}, token=token)
    wait_until(lambda: web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"],
               30, what="the new message")
    with archive.engine.begin() as conn:
        conn.execute(delete(messages).where(messages.c.channel == channel))
    third = web.ws(token)
    third.recv()
    assert third.subscribe(channel, since=reply["offset"])["recovered"] is False
    again.close()
    third.close()
    archive.dispose()


def test_a_burst_of_subscribes_waits_for_redis_connections_instead_of_failing(stack, channel):
    # A pool of 2 Redis connections and 60 clients subscribing at once: each
    # subscribe waits its turn for a connection; none is answered `unavailable`.
    import concurrent.futures

    web = stack.web("tiny-pool", HERALD_REDIS_POOL_SIZE=2, HERALD_WS_MAX_PER_USER=1000)
    token = stack.token("burst")

    def subscribe(_):
        client = web.ws(token)
        client.recv()
        client.send({"op": "subscribe", "channel": channel})
        reply = client.expect(lambda f: f["op"] in ("subscribed", "error"), timeout=30)
        return client, reply

    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        results = list(pool.map(subscribe, range(60)))
    try:
        assert [reply["op"] for _, reply in results] == ["subscribed"] * 60
        status, _, _ = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "to all"}, token=token)
        assert status == 202
        for client, _ in results:
            assert client.expect(lambda f: f["op"] == "message", timeout=30)["data"] == "to all"
    finally:
        for client, _ in results:
            client.close()
        web.proc.stop()


def test_server_pings_and_drops_a_client_that_answers_nothing(stack, token):
    web = stack.web("fast-pings", HERALD_PING_INTERVAL=1)
    silent, lively = web.ws(token), web.ws(token)
    try:
        assert silent.recv()["op"] == lively.recv()["op"] == "connected"
        # websocket-client answers the server's pings while it reads.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            lively.sock.settimeout(0.2)
            with pytest.raises(websocket.WebSocketTimeoutException):
                lively.sock.recv()
        lively.send({"op": "ping", "ref": "still"})
        assert lively.recv() == {"op": "pong", "ref": "still"}
        # The silent one was pinged, answered nothing for two intervals, and was dropped.
        silent.sock.settimeout(5)
        first = silent.sock.recv_frame()
        assert first.opcode == websocket.ABNF.OPCODE_PING
        assert close_code(silent) == 1008
    finally:
        silent.close()
        lively.close()
        web.proc.stop()


@pytest.mark.parametrize("proxies", [0, 1])
def test_the_address_cap_and_logs_trust_only_the_configured_proxies(stack, proxies):
    import uuid

    prefix = f"px{uuid.uuid4().hex[:8]}"  # its own connection counts
    web = stack.web(f"proxies{proxies}", HERALD_TRUSTED_PROXIES=proxies, HERALD_WS_MAX_PER_IP=2,
                    HERALD_REDIS_PREFIX=prefix)
    redis = stack.store().redis
    def counted(address):
        return redis.zcard(f"{prefix}:wsaddr:{address}")

    token = stack.token("spoofer")
    clients = []

    def connect(forwarded):
        client = web.ws(token, header=[f"X-Forwarded-For: {forwarded}"])
        clients.append(client)
        return client

    try:
        if proxies == 0:
            # Each claims another address; all of them are the socket's peer.
            for forwarded in ("10.0.0.1", "10.0.0.2"):
                assert connect(forwarded).recv()["op"] == "connected"
            assert counted("127.0.0.1") == 2 and counted("10.0.0.1") == counted("10.0.0.2") == 0
            assert close_code(connect("10.0.0.3")) == 4029  # not dodged
            client = "127.0.0.1"
        else:
            # The router appends the peer it saw: the last entry; the rest is the client's word.
            for _ in range(2):
                assert connect("10.9.9.9, 10.0.0.1").recv()["op"] == "connected"
            assert counted("10.0.0.1") == 2 and counted("10.9.9.9") == counted("127.0.0.1") == 0
            assert close_code(connect("10.0.0.2, 10.0.0.1")) == 4029
            assert connect("10.0.0.1, 10.0.0.2").recv()["op"] == "connected"  # another client
            client = "10.0.0.7"
        web.request("GET", "/healthz", headers={"X-Forwarded-For": "10.9.9.9, 10.0.0.7"})
        web.proc.wait_for_log(f'"path": "/healthz".*"remote": "{client}"')
        assert "10.9.9.9" not in web.proc.log()
    finally:
        for client in clients:
            client.close()
        web.proc.stop()


@pytest.mark.parametrize("data", ["NaN", "Infinity", '"\\ud800"'])
def test_unencodable_data_over_the_socket_is_an_error_frame(web, token, channel, data):
    client = web.ws(token)
    client.recv()
    client.sock.send(f'{{"op": "publish", "channel": "{channel}", "data": {data}, "id": "x-{channel}", "ref": "r"}}')
    assert client.recv()["op"] == "error"
    client.send({"op": "publish", "channel": channel, "data": "fine", "id": f"x-{channel}", "ref": "ok"})
    assert client.expect(lambda f: f.get("ref") == "ok", timeout=5)["op"] == "ack"  # the id was not claimed
    client.close()


def test_the_frame_size_limit_counts_bytes(stack, web, token, channel):
    client = web.ws(token)
    client.recv()
    # Fewer characters than the limit, more bytes (two each in UTF-8).
    data = "\u00e9" * (stack.settings.max_message_bytes // 2 + 64)
    client.sock.send(json.dumps({"op": "publish", "channel": channel, "data": data}, ensure_ascii=False))
    assert close_code(client) == 4009
    client.close()


def test_subscriptions_per_connection_are_bounded(stack, channel):
    web = stack.web("few-subs", HERALD_WS_MAX_SUBSCRIPTIONS=3)
    client = web.ws(stack.token())
    try:
        client.recv()
        for n in range(3):
            client.subscribe(f"{channel}-{n}")
        client.subscribe(f"{channel}-0", since="0-0")  # again: no new subscription
        client.send({"op": "subscribe", "channel": f"{channel}-3", "ref": "over"})
        assert client.expect(lambda f: f.get("ref") == "over") == {
            "op": "error", "code": "too_many_subscriptions", "ref": "over",
            "message": "at most 3 subscriptions per connection (HERALD_WS_MAX_SUBSCRIPTIONS)"}
        client.send({"op": "unsubscribe", "channel": f"{channel}-1"})
        client.subscribe(f"{channel}-3")  # room again
    finally:
        client.close()
        web.proc.stop()


def test_a_long_resume_is_replayed_in_pages_each_message_once_in_order(stack, channel):
    # 3,000 messages of 1 KB in history, far more than a send queue (512 frames)
    # and the kernel buffers hold; a client with a small receive buffer that
    # reads nothing for a second, while 200 more are published live.
    import threading

    import redis

    from pipeline.core.messages import parse_publish
    from pipeline.core.settings import Settings
    from pipeline.store import Store, connect

    web = stack.web("replay-pages", HERALD_HISTORY_MAXLEN=5000, HERALD_WS_REPLAY_PAGE=100)
    store = Store(connect(stack.settings), Settings.from_env({**stack.env, "HERALD_HISTORY_MAXLEN": "5000"}))
    stream = store.keys.history(channel)

    def publish(first, count, pause=0.0):
        ids = []
        for n in range(first, first + count, 100 if not pause else 1):
            batch = [parse_publish({"channel": channel, "data": {"n": m, "pad": "x" * 1000}}, sender="t")
                     for m in range(n, min(n + (100 if not pause else 1), first + count))]
            assert [outcome for outcome, *_ in store.deliver(batch)] == ["delivered"] * len(batch)
            ids += [envelope.id for envelope in batch]
            time.sleep(pause)
        return ids

    reads = []  # the web process's reads of this channel's history (XRANGE ... COUNT n)

    def watch(monitor):
        try:
            for command in monitor.listen():
                words = command["command"].split()
                if words[0].upper() == "XRANGE" and words[1] == stream:
                    reads.append(int(words[-1]))
        except (redis.RedisError, OSError, AttributeError):
            pass  # the test closed the monitor connection

    watcher = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    monitor = watcher.monitor().__enter__()
    threading.Thread(target=watch, args=(monitor,), daemon=True).start()
    client = web.ws(stack.token(), sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    try:
        sent = publish(0, 3000)
        client.recv()
        client.send({"op": "subscribe", "channel": channel, "since": "0-0"})
        live = []
        flow = threading.Thread(target=lambda: live.extend(publish(3000, 200, pause=0.002)))
        flow.start()
        time.sleep(1.0)  # meanwhile the replay waits for us; the live frames overflow its hold (100)
        reply = client.expect(lambda f: f["op"] == "subscribed", timeout=30)
        assert reply["recovered"] is True and reply["replayed"] == 100 and reply["more"] is True
        got = [client.expect(lambda f: f["op"] == "message", timeout=30) for _ in range(3200)]
        flow.join()
        assert [f["id"] for f in got] == sent + live  # every message once, in offset order
        client.sock.settimeout(0.5)
        with pytest.raises(websocket.WebSocketTimeoutException):
            client.sock.recv()  # and nothing twice
        # Paged: no read of more than one page (and the one extra entry that says "more").
        assert reads and max(reads) <= 101 and len(reads) >= 32, reads
    finally:
        client.close()
        watcher.close()
        store.redis.close()
        web.proc.stop()
