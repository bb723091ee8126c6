"""Bad input: each gets its problem+json answer with the right 4xx, and nothing reaches Kafka."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.harness import topic_size, wait_until


@pytest.fixture
def unchanged_topic(stack):
    """Asserts, after the test, that no record was added to the topic."""
    before = topic_size(stack)
    yield
    assert topic_size(stack) == before


def assert_problem(response, status: int, *, field: str | None = None):
    code, headers, body = response
    assert code == status, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    assert headers["X-Request-ID"]
    if field is not None:
        assert field in {e["field"] for e in body["errors"]}, body
    return body


def test_malformed_json(web, token, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", raw=b'{"channel": "a", "data": ', token=token), 400)


def test_json_nested_too_deep_is_400_not_500(web, token, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", raw=b"[" * 60_000, token=token), 400)


def test_wrong_content_type(web, token, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", raw=b'{"channel":"a","data":1}', token=token,
                               content_type="text/plain"), 415)


def test_unknown_field(web, token, channel, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1, "colour": "red"},
                               token=token), 422, field="colour")


@pytest.mark.parametrize("bad", ["", "has space", "x" * 201, "semi;colon", "slash/es", 42])
def test_bad_channel_name(web, token, bad, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": bad, "data": 1}, token=token), 422,
                   field="channel")


def test_missing_data(web, token, channel, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": channel}, token=token), 422, field="data")


def test_body_over_max_message_bytes(stack, web, token, channel, unchanged_topic):
    big = "x" * (stack.settings.max_message_bytes + 1)
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": channel, "data": big}, token=token), 413)


def test_a_body_under_the_limit_that_encodes_past_it_is_413(stack, web, token, channel, unchanged_topic):
    # `1E15` is 4 bytes as sent and `1000000000000000.0` (18) as Herald encodes it for Kafka.
    numbers = ",".join(["1E15"] * (stack.settings.max_message_bytes // 6))
    raw = f'{{"channel":"{channel}","data":[{numbers}]}}'.encode()
    assert len(raw) < stack.settings.max_message_bytes
    assert_problem(web.request("POST", "/api/v1/messages", raw=raw, token=token), 413)
    client = web.ws(token)
    client.recv()
    client.sock.send(f'{{"op":"publish","ref":"big","channel":"{channel}","data":[{numbers}]}}')
    error = client.expect(lambda f: f["op"] == "error")
    assert error["ref"] == "big" and error["code"] == "payload_too_large", error
    client.close()


def test_not_an_object(web, token, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", [1, 2], token=token), 422)


def test_bad_id(web, token, channel, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1, "id": "no spaces"},
                               token=token), 422, field="id")


def test_missing_token_is_401(web, channel, unchanged_topic):
    body = assert_problem(web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}), 401)
    assert "token" in body["detail"]


def test_wrongly_signed_token_is_401(stack, web, channel, unchanged_topic):
    import jwt

    forged = jwt.encode({"sub": "x", "exp": 9999999999}, "another-secret-another-secret-12345", algorithm="HS256")
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}, token=forged), 401)


def test_channel_outside_token_globs_is_403(stack, web, unchanged_topic):
    limited = stack.token(publish=["chat:*"])
    assert_problem(web.request("POST", "/api/v1/messages", {"channel": "news:x", "data": 1}, token=limited), 403)


def test_a_batch_with_any_invalid_message_is_422_naming_each_fault(web, token, channel, unchanged_topic):
    body = assert_problem(web.request("POST", "/api/v1/messages/batch", {"messages": [
        {"channel": channel, "data": 1}, {"channel": "bad channel", "data": 2}, {"channel": channel},
        {"channel": channel, "data": 3, "colour": "red"}]}, token=token), 422)
    assert {(e["field"], e["problem"]) for e in body["errors"]} >= {
        ("messages[2].data", "required"), ("messages[3].colour", "unknown field")}
    assert "messages[1].channel" in {e["field"] for e in body["errors"]}
    assert "messages[0]" not in str(body["errors"])


def test_batch_reports_each_refused_message_and_accepts_the_good(stack, web, channel):
    limited = stack.token(publish=["test:*"], subscribe=["*"])
    big = "x" * stack.settings.max_message_bytes
    items = [{"channel": channel, "data": 1, "id": f"{channel}-ok1"}, {"channel": "news:x", "data": 2,
             "id": f"{channel}-forbidden"}, {"channel": channel, "data": big, "id": f"{channel}-big"},
             {"channel": channel, "data": 4, "id": f"{channel}-ok2"}]
    status, _, body = web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=limited)
    assert status == 202
    first, forbidden, too_big, last = body["results"]
    assert first["status"] == last["status"] == "accepted", body
    assert forbidden["status"] == 403 and too_big["status"] == 413
    # Only the accepted two are known (Tansu's high watermark lags a batch's records: not counted there).
    known = {item["id"]: web.request("GET", f"/api/v1/messages/{item['id']}", token=limited)[0] for item in items}
    assert known == {f"{channel}-ok1": 200, f"{channel}-forbidden": 404, f"{channel}-big": 404, f"{channel}-ok2": 200}


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "x"}, {"messages": [{}] * 1001}])
def test_bad_batch(web, token, body, unchanged_topic):
    assert_problem(web.request("POST", "/api/v1/messages/batch", body, token=token), 422)


def test_unknown_message_is_404(web, token):
    assert_problem(web.request("GET", "/api/v1/messages/01NOSUCHMESSAGE", token=token), 404)


def test_unknown_path_is_problem_404(web):
    assert_problem(web.request("GET", "/api/v1/nope"), 404)


def test_request_id_is_echoed(web):
    status, headers, _ = web.request("GET", "/healthz", headers={"X-Request-ID": "abc-123"})
    assert status == 200 and headers["X-Request-ID"] == "abc-123"


def test_history_and_presence_outside_subscribe_globs_are_403(stack, web):
    limited = stack.token(subscribe=["chat:*"])
    assert_problem(web.request("GET", "/api/v1/channels/news:x/history", token=limited), 403)
    assert_problem(web.request("GET", "/api/v1/channels/news:x/presence", token=limited), 403)
    assert web.request("GET", "/api/v1/channels/chat:x/presence", token=limited)[0] == 200


@pytest.mark.parametrize("query", ["?limit=0", "?limit=abc", "?since=nope", "?since=%D9%A3-1",
                                   "?since=99999999999999999999999-0", "?since=1-2-3"])
def test_bad_history_query_is_400(web, token, channel, query):
    assert_problem(web.request("GET", f"/api/v1/channels/{channel}/history{query}", token=token), 400)


@pytest.mark.parametrize("query", ["?limit=0", "?limit=501", "?cursor=-1", "?cursor=abc",
                                   "?cursor=100000000000000000000"])
def test_bad_dead_letter_query_is_400(stack, web, query):
    assert_problem(web.request("GET", f"/api/v1/dlq{query}", token=stack.token("ops", admin=True)), 400)


def test_openapi_document_and_docs_page(web):
    status, _, document = web.request("GET", "/api/v1/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1") and "/api/v1/messages" in document["paths"]
    status, headers, _ = web.request("GET", "/docs/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")


def test_odd_methods_and_paths_add_no_metric_series(web):
    import http.client

    def series():
        text = web.request("GET", "/metrics")[2]
        return [line for line in text.splitlines() if line.startswith("herald_http_")]

    for n in range(300):  # gunicorn passes any upper-case method name
        connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
        connection.request(f"AAAA{n}", "/healthz" if n % 2 else f"/no-such-path-{n}")
        assert connection.getresponse().status in (404, 405)
        connection.close()
    series()  # the first scrape adds the series of /metrics itself
    before = series()
    for n in range(300, 400):
        connection = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10)
        connection.request(f"BBBB{n}", f"/no-such-path-{n}")
        connection.getresponse().read()
        connection.close()
    after = series()
    assert not [line for line in after if "AAAA" in line or "BBBB" in line or "no-such-path" in line]
    assert len(after) == len(before)  # the same series, counted again
    for status in ("404", "405"):  # a wrong method on a known path matches no route either
        assert any(f'method="OTHER",route="unmatched",status="{status}"' in line for line in after)


def test_a_message_is_readable_only_with_its_channels_subscribe_glob(stack, web):
    publisher = stack.token("pub", publish=["secret:*"], subscribe=[])
    insider = stack.token("insider", publish=[], subscribe=["secret:*"])
    outsider = stack.token("outsider", publish=[], subscribe=["open:*"])
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": "secret:plans", "data": "x"},
                                    token=publisher)
    assert status == 202
    assert web.request("GET", f"/api/v1/messages/{answer['id']}", token=insider)[2]["channel"] == "secret:plans"
    # Not a 403: that would tell the outsider the id exists.
    body = assert_problem(web.request("GET", f"/api/v1/messages/{answer['id']}", token=outsider), 404)
    unknown = assert_problem(web.request("GET", "/api/v1/messages/01NOSUCHMESSAGE", token=outsider), 404)
    assert body["detail"].replace(answer["id"], "ID") == unknown["detail"].replace("01NOSUCHMESSAGE", "ID")
    assert_problem(web.request("GET", f"/api/v1/messages/{answer['id']}", token=publisher), 404)  # publish is not read


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_not_json(web, token, channel, constant, unchanged_topic):
    raw = f'{{"channel": "{channel}", "data": {{"x": {constant}}}}}'.encode()
    assert_problem(web.request("POST", "/api/v1/messages", raw=raw, token=token), 400)
    batch = f'{{"messages": [{{"channel": "{channel}", "data": {constant}}}]}}'.encode()
    assert_problem(web.request("POST", "/api/v1/messages/batch", raw=batch, token=token), 400)


def test_a_lone_surrogate_is_a_400_and_leaves_no_idempotency_claim(web, token, channel):
    raw = f'{{"channel": "{channel}", "data": "\\ud800"}}'.encode()  # valid JSON, not encodable
    key = f"surrogate-{channel}"
    body = assert_problem(web.request("POST", "/api/v1/messages", raw=raw, token=token,
                                      headers={"Idempotency-Key": key}), 400, field="data")
    assert "surrogate" in body["detail"]
    # The key is free at once: no claim was left pending (it was, for 24 h, behind a 500).
    started = time.monotonic()
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": "fine"}, token=token,
                                    headers={"Idempotency-Key": key})
    assert status == 202 and answer["id"] == key and time.monotonic() - started < 3


def test_a_batch_body_over_its_limit_is_refused_unparsed(web, token, unchanged_topic):
    # 1.2 MB announced, a thousandth of what was parsed before (64 MB): the answer comes from the
    # Content-Length alone, before the body is sent (a client sending it all would meet a closed socket).
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(f"POST /api/v1/messages/batch HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1200000\r\n\r\n".encode())
        sock.sendall(b'{"messages": [')
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = json.loads(response.read())
    assert response.status == 413 and response.getheader("Content-Type") == "application/problem+json", body
    assert "1048576" in body["detail"] or "larger" in body["detail"]


def test_a_batch_repeating_an_id_is_422_naming_the_duplicates(stack, web, token, channel):
    before = topic_size(stack)
    items = [{"channel": channel, "data": n, "id": f"{channel}-{n % 2}"} for n in range(5)]
    started = time.monotonic()
    body = assert_problem(web.request("POST", "/api/v1/messages/batch", {"messages": items}, token=token), 422)
    assert time.monotonic() - started < 3  # no item waited on another's claim
    assert body["errors"] == [{"field": "messages[2].id", "problem": "duplicate of messages[0]"},
                              {"field": "messages[3].id", "problem": "duplicate of messages[1]"},
                              {"field": "messages[4].id", "problem": "duplicate of messages[0]"}]
    assert topic_size(stack) == before
    # Nothing was claimed: the ids publish afterwards.
    again = web.request("POST", "/api/v1/messages/batch", {"messages": items[:2]}, token=token)
    assert again[0] == 202 and [r["status"] for r in again[2]["results"]] == ["accepted", "accepted"]


def test_a_batch_of_only_invalid_messages_is_422(web, token, channel, unchanged_topic):
    body = assert_problem(web.request("POST", "/api/v1/messages/batch", {"messages": [
        {"channel": "bad channel", "data": 1}, {"channel": channel}]}, token=token), 422)
    assert [e["field"] for e in body["errors"]] == ["messages[0].channel", "messages[1].data"]


def test_a_repeated_query_parameter_is_400(web, token, channel):
    body = assert_problem(web.request("GET", f"/api/v1/channels/{channel}/history?limit=5&limit=6", token=token),
                          400, field="limit")
    assert body["title"] == "Bad request"


@pytest.mark.parametrize("path", ["/api/v1/channels/bad%20channel/history", "/api/v1/channels/bad%20channel/presence",
                                  "/api/v1/messages/no%20spaces"])
def test_a_bad_path_parameter_is_400_naming_it(web, token, path):
    assert_problem(web.request("GET", path, token=token), 400)


def test_a_wrong_method_is_405_with_allow(web, token):
    code, headers, _ = assert_problem(web.request("DELETE", "/api/v1/messages", token=token), 405) and \
        web.request("DELETE", "/api/v1/messages", token=token)
    assert set(headers["Allow"].replace(" ", "").split(",")) == {"POST", "OPTIONS"}
    # /messages/batch is the batch endpoint only, not also a message whose id is "batch".
    code, headers, _ = web.request("GET", "/api/v1/messages/batch", token=token)
    assert code == 405 and set(headers["Allow"].replace(" ", "").split(",")) == {"POST", "OPTIONS"}


@pytest.mark.parametrize("since, later", [("9850190127006006806-9608", False), ("9999999999999999999", False),
                                          ("28-9340518410694389148", True)])
def test_an_offset_past_the_archives_integers_is_read_in_order(stack, web, token, channel, since, later):
    # Redis takes stream id parts up to 2**64 - 1; the archive's columns are signed
    # 64-bit (SQLite refuses a larger value).
    status, _, answer = web.request("POST", "/api/v1/messages", {"channel": channel, "data": 1}, token=token)
    assert status == 202
    wait_until(lambda: web.request("GET", f"/api/v1/channels/{channel}/history", token=token)[2]["messages"], 30)
    status, _, page = web.request("GET", f"/api/v1/channels/{channel}/history?since={since}", token=token)
    assert status == 200, page
    assert [m["id"] for m in page["messages"]] == ([answer["id"]] if later else [])
