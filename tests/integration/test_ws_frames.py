"""Every kind of frame the hub sends matches its model in web/hub/frames.py, which
the AsyncAPI document at /api/v1/asyncapi.json is generated from."""

from __future__ import annotations

import pydantic
import pytest

from web.hub import frames


def test_the_asyncapi_document_lists_every_frame(web):
    status, _, document = web.request("GET", "/api/v1/asyncapi.json")
    assert status == 200 and document["asyncapi"] == "3.0.0"
    names = set(document["components"]["messages"])
    assert names == {m.__name__ for m in frames.CLIENT_FRAMES + frames.SERVER_FRAMES}
    publish = document["components"]["schemas"]["PublishOp"]
    assert set(publish["required"]) == {"op", "channel", "data"} and publish["additionalProperties"] is False


def test_each_frame_the_hub_sends_matches_its_model(stack, web, channel):
    token = stack.token("ann")
    watcher, ann = web.ws(stack.token("watcher")), web.ws()
    seen: list[dict] = [watcher.recv()]
    ann.send({"op": "connect", "token": token, "ref": 1})
    seen.append(ann.recv())
    watcher.send({"op": "subscribe", "channel": channel, "status": True, "presence": True, "ref": "w"})
    seen.append(watcher.expect(lambda f: f["op"] == "subscribed"))
    ann.send({"op": "subscribe", "channel": channel, "presence": True, "ref": "a"})
    seen.append(ann.expect(lambda f: f["op"] == "subscribed"))
    seen.append(watcher.expect(lambda f: f["op"] == "join" and f["user"] == "ann"))
    ann.send({"op": "publish", "channel": channel, "data": {"n": 1}, "ref": "p"})
    ack = ann.expect(lambda f: f["op"] == "ack")
    seen += [ack, watcher.expect(lambda f: f["op"] == "message" and f["id"] == ack["id"])]
    seen.append(watcher.expect(lambda f: f["op"] == "status" and f["status"] == "delivered"))
    ann.send({"op": "ping", "ref": 2})
    seen.append(ann.expect(lambda f: f["op"] == "pong"))
    ann.send({"op": "subscribe", "channel": "bad channel", "ref": 3})
    seen.append(ann.expect(lambda f: f["op"] == "error"))
    ann.send({"op": "publish", "channel": channel, "colour": "red", "ref": 4})
    refused = ann.expect(lambda f: f["op"] == "error")
    seen.append(refused)
    ann.send({"op": "unsubscribe", "channel": channel, "ref": 5})
    seen.append(ann.expect(lambda f: f["op"] == "unsubscribed"))
    seen.append(watcher.expect(lambda f: f["op"] == "leave" and f["user"] == "ann"))
    resumed = web.ws(token)
    resumed.recv()
    resumed.send({"op": "subscribe", "channel": channel, "since": "0-0"})
    seen.append(resumed.expect(lambda f: f["op"] == "subscribed"))
    seen.append(resumed.expect(lambda f: f["op"] == "message"))
    for client in (watcher, ann, resumed):
        client.close()
    assert {f["op"] for f in seen} == {"connected", "subscribed", "join", "ack", "message", "status", "pong",
                                       "error", "unsubscribed", "leave"}
    for frame in seen:
        frames.server_frame(frame)  # raises on any field the model does not know or has otherwise
    assert refused["code"] == "invalid_message"


@pytest.mark.parametrize("frame", [
    {"op": "message", "channel": "c", "id": "x", "type": "m", "data": 1, "sender": "s", "ts": 1},  # no offset
    {"op": "status", "channel": "c", "id": "x", "status": "lost"},
    {"op": "pong", "extra": 1},
])
def test_a_frame_unlike_its_model_is_refused(frame):
    with pytest.raises(pydantic.ValidationError):
        frames.server_frame(frame)


@pytest.mark.parametrize("frame, code, says", [
    ({"op": "subscribe", "channel": "c", "colour": "red"}, "bad_frame", "colour: unknown field"),
    ({"op": "subscribe", "channel": "c", "status": "yes"}, "bad_frame", "status:"),
    ({"op": "unsubscribe"}, "bad_channel", "channel must match"),
    ({"op": "ping", "extra": 1}, "bad_frame", "extra: unknown field"),
    ({"op": "publish", "channel": "c", "data": 1, "id": 7}, "invalid_message", "invalid fields"),
])
def test_an_op_unlike_its_model_is_refused_naming_the_fault(web, token, frame, code, says):
    client = web.ws(token)
    client.recv()
    client.send({**frame, "ref": "r"})
    error = client.expect(lambda f: f["op"] == "error")
    assert error["code"] == code and says in error["message"] and error["ref"] == "r", error
    client.send({"op": "ping", "ref": "after"})
    assert client.expect(lambda f: f["op"] == "pong")["ref"] == "after"  # the connection goes on
    client.close()
