"""Operations endpoints and development guards on real web processes (docs/operations.md, docs/guide.md).

/metrics outside development needs its token; /readyz and the cluster gauges
answer from one probe per HERALD_PROBE_TTL however many calls come at once;
`flask dev`'s web listens on loopback and /dev/token answers only this
machine; HERALD_AUTH=off does not start outside development.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devtools import embedded
from tests.harness import refused_start, start_environment

TOKEN = "ops-guards-metrics-token"
PROBE_TTL = 6  # seconds; the test waits it out once
CALLS = 20


def get(url: str, token: str | None = None, headers=None, timeout: float = 15) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def probes(web) -> dict[str, float]:
    """herald_probes_total by probe, from the web's /metrics."""
    status, text = get(f"{web.base}/metrics", TOKEN)
    assert status == 200, text
    return {sample.labels["probe"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "herald_probes_total"}


def refused(host: str, port: int) -> bool:
    """True when nothing listens for `host`:`port` (the connection is refused)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def outward_address() -> str | None:
    """An address of this machine that is not loopback (the source of a route outward), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # no packet is sent: only a route is chosen (TEST-NET-2)
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_metrics_outside_development_refuse_every_scrape_without_a_token(stack):
    # No HERALD_METRICS_TOKEN, no opt-out: the lag, DLQ size and rule ids are nobody's.
    closed = stack.web("ops-closed", HERALD_METRICS_PUBLIC="0")
    try:
        for token in (None, "anything"):
            status, body = get(f"{closed.base}/metrics", token)
            assert status == 401 and "HERALD_METRICS_TOKEN" in body, body
        assert "HERALD_METRICS_TOKEN is not set: /metrics refuses every scrape" in closed.proc.log()
    finally:
        closed.proc.stop(10)
    opened = stack.web("ops-public", HERALD_METRICS_PUBLIC="1")
    try:
        assert get(f"{opened.base}/metrics")[0] == 200  # the explicit opt-out
    finally:
        opened.proc.stop(10)


def test_parallel_readyz_and_metrics_calls_cost_one_probe_each(stack):
    web = stack.web("ops-probes", HERALD_METRICS_TOKEN=TOKEN, HERALD_PROBE_TTL=PROBE_TTL, WEB_CONCURRENCY=1)
    try:
        probes(web)  # the first scrape probes the cluster (its count shows from the next scrape on)
        before = probes(web)  # readiness was probed at start
        time.sleep(PROBE_TTL + 0.5)  # both answers are stale now
        with ThreadPoolExecutor(2 * CALLS) as pool:
            answers = list(pool.map(lambda path: get(f"{web.base}{path}", TOKEN),
                                    ["/readyz", "/metrics"] * CALLS))
        assert {status for status, _ in answers} == {200}
        after = probes(web)  # within the TTL of the burst's probes: answered from them
        print(f"\nOPS-PROBES {{\"calls\": {2 * CALLS}, \"before\": {before}, \"after\": {after}}}")
        assert after.get("ready", 0) - before.get("ready", 0) == 1
        assert after["cluster"] - before["cluster"] == 1
    finally:
        web.proc.stop(10)


def test_development_web_listens_on_loopback_only(dev_web):
    # dev_web runs as `flask dev` runs it: HERALD_DEV=1, no --bind.
    assert get(f"{dev_web.base}/healthz")[0] == 200
    assert refused("127.0.0.2", dev_web.port)  # another loopback address: only 127.0.0.1 listens
    outward = outward_address()
    if outward is not None:
        assert refused(outward, dev_web.port)


def test_dev_token_answers_only_this_machine_even_on_an_open_port(stack):
    port = embedded.free_port()
    # A developer who opened the port on purpose (a --bind wins over the default).
    web = stack.web("ops-dev-open", HERALD_DEV="1", PORT=port, GUNICORN_CMD_ARGS=f"--bind=0.0.0.0:{port}")
    try:
        assert get(f"{web.base}/dev/token")[0] == 200
        assert not refused("127.0.0.2", port)  # listening on every address, as asked
        status, body = get(f"http://127.0.0.2:{port}/dev/token")
        assert status == 200, body  # 127.0.0.2 is this machine too
        # Relayed by a proxy on this machine: from anyone.
        status, body = get(f"{web.base}/dev/token", headers={"X-Forwarded-For": "198.51.100.7"})
        assert status == 403 and "only requests from this machine" in body, body
        outward = outward_address()
        if outward is None:
            pytest.skip("this machine has no address but loopback to be reached from")
        status, body = get(f"http://{outward}:{port}/dev/token")
        assert status == 403 and "token" not in json.loads(body), body
        # The rest of the app answers there: only the token is kept to this machine.
        assert get(f"http://{outward}:{port}/healthz")[0] == 200
    finally:
        web.proc.stop(10)


def test_auth_off_outside_development_does_not_start(spare_redis_url):
    line = refused_start(start_environment(REDIS_URL=spare_redis_url, HERALD_AUTH="off"), "web")
    assert "HERALD_AUTH=off lets anyone in as an admin: it is for development only" in line, line


def test_one_node_name_for_several_web_workers_does_not_start(spare_redis_url):
    # Alike named, each worker would take its siblings' subscriptions for a dead one's (docs/occupancy.md).
    line = refused_start(start_environment(REDIS_URL=spare_redis_url, HERALD_NODE_ID="web.1", WEB_CONCURRENCY="2"),
                         "web")
    assert "HERALD_NODE_ID names one process" in line, line
