"""What clients are told while Redis is down: a generic `unavailable`, never its address."""

from __future__ import annotations

import json

import websocket

from tests.harness import Stack, close_code


def test_no_answer_or_frame_names_the_redis_address(tmp_path):
    stack = Stack(tmp_path / "outage", own_redis=True)
    try:
        web = stack.web(HERALD_PROBE_TTL=0)  # /readyz answers from a fresh probe
        token = stack.token()
        client = web.ws(token)
        client.recv()
        stack.redis.stop()
        address = f":{stack.redis_port}"  # host:port, or the port in any form
        channel = "test:outage"
        answers = [
            web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}, token=token,
                        headers={"Idempotency-Key": "outage-1"}),
            web.request("POST", "/api/v1/messages/batch", {"messages": [{"channel": channel, "data": 2,
                                                                         "id": "outage-2"}]}, token=token),
            web.request("GET", f"/api/v1/channels/{channel}/history", token=token),
            web.request("GET", "/api/v1/messages/outage-1", token=token),
            web.request("GET", "/readyz"),
        ]
        assert [status for status, _, _ in answers] == [503, 202, 503, 503, 503]
        for _, _, body in answers:
            assert address not in json.dumps(body), body
        assert answers[1][2]["results"][0]["status"] == 503
        assert answers[0][2]["detail"] == answers[1][2]["results"][0]["detail"]
        frames = []
        for n, frame in enumerate([{"op": "subscribe", "channel": channel, "since": "0-0"},
                                   {"op": "publish", "channel": channel, "data": 3, "id": "outage-3"}]):
            client.send({**frame, "ref": n})
            frames.append(client.expect(lambda f, n=n: f.get("ref") == n))
        assert [f["code"] for f in frames] == ["unavailable", "unavailable"]
        for frame in frames:
            assert address not in json.dumps(frame), frame
        # An outage is not the client's fault: five and more `unavailable` in a row close nothing.
        for n in range(2, 8):
            client.send({"op": "subscribe", "channel": channel, "ref": n})
            assert client.expect(lambda f, n=n: f.get("ref") == n)["code"] == "unavailable"
        client.send({"op": "ping", "ref": "alive"})
        assert client.expect(lambda f: f.get("ref") == "alive")["op"] == "pong"
        try:
            refused = web.ws(token)
        except websocket.WebSocketException:
            pass
        else:
            assert close_code(refused) == 1013
            refused.close()
        assert address in web.proc.log()  # the operator still sees it
        client.close()
    finally:
        stack.stop()
