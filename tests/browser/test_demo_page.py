"""The demo chat page in a real browser: two tabs chat, and one survives a network cut.

Headless Chromium (Debian's `chromium`, which `.ci/run` installs) is driven by
Playwright. Tab A talks to one web process directly; tab B reaches the other
web process through a TCP proxy the test can cut and restore, which drops B's
WebSocket the way a lost network does (Chromium's offline emulation,
`context.set_offline`, leaves an open WebSocket open: the page never notices).
"""

from __future__ import annotations

import re
import select
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.harness import wait_until

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
expect = sync_api.expect

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("chromium not installed; .ci/run installs it with apt-get", allow_module_level=True)

# No GPU, no sandbox (containers), and none of Chromium's own background
# connections, which a closed network refuses noisily.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


class CuttableProxy:
    """Forwards TCP connections to a port until cut: then it closes every open
    connection and drops new ones at once, until restored. Or held: a black
    hole that forwards nothing and closes nothing (a network that died
    silently), until released."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # the accept loop polls `stopping`
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.threads: list[threading.Thread] = []
        self.is_cut = False
        self.flowing = threading.Event()
        self.flowing.set()
        self.stopping = False
        self.accepted = 0
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        with self.listener:
            while not self.stopping:
                try:
                    client, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self.accepted += 1
                if self.is_cut:
                    client.close()  # a dead network: the browser's connect fails
                    continue
                self._start(self._relay, client)

    def _relay(self, client: socket.socket) -> None:
        # Held: a new connection gets no answer until released.
        self.flowing.wait()
        try:
            if self.stopping or self.is_cut:
                raise OSError("cut")
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self.lock:
            self.open.update((client, upstream))
        # This thread alone closes the pair; cut() only shuts them down, which
        # wakes select() here, so no socket is closed under another thread.
        with client, upstream:
            try:
                while True:
                    readable, _, _ = select.select([client, upstream], [], [])
                    if not self.flowing.is_set():
                        self.flowing.wait()  # held: the bytes wait in the kernel's buffers
                        continue
                    for src in readable:
                        data = src.recv(65536)
                        if not data:
                            return
                        (upstream if src is client else client).sendall(data)
            except OSError:
                pass
            finally:
                with self.lock:
                    self.open.difference_update((client, upstream))

    def cut(self) -> None:
        """Close every forwarded connection and refuse new ones."""
        with self.lock:
            self.is_cut = True
            for sock in self.open:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def restore(self) -> None:
        """Forward new connections again."""
        self.is_cut = False

    def hold(self) -> None:
        """Stop forwarding, on open connections and new ones, without closing any."""
        self.flowing.clear()

    def release(self) -> None:
        """Forward again what was held, and everything after."""
        self.flowing.set()

    def close(self) -> None:
        """Cut everything, stop accepting and wait for every thread."""
        self.stopping = True
        self.flowing.set()
        self.cut()
        for thread in self.threads:
            thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def proxy(stack):
    """A cuttable way to the second web process."""
    cuttable = CuttableProxy(stack.webs[1].port)
    try:
        yield cuttable
    finally:
        cuttable.close()


def open_chat(browser, base: str, token: str, channel: str, *, web, subscribers: int, heartbeat_ms: int = 0):
    """A tab in its own browser context, subscribed to `channel` and online
    (with herald.js's heartbeat every `heartbeat_ms`, when given).

    The page joins chat:lobby on load; the test joins its own channel instead
    and waits until `web` lists `subscribers` clients there (the server records
    presence once it answered the subscribe), and until the tab has that
    answer: its offset is where a reconnect resumes from, and a network cut
    while the answer is still on its way would leave the tab none (CI once
    saw such a tab miss the message published during the cut).
    """
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # "sign in with the link's token?": yes
    page.goto(f"{base}/#token={token}")
    if heartbeat_ms:
        page.evaluate(f"Herald.defaults.heartbeat = {heartbeat_ms}")  # for the client Join makes
    page.fill("#channel", channel)
    page.click("#join")
    wait_until(lambda: len(web.request("GET", f"/api/v1/channels/{channel}/presence", token=token)[2]["clients"])
               == subscribers, 20, 0.1, f"{subscribers} subscriber(s) on {channel}")
    page.wait_for_function("(channel) => herald && herald.channels.get(channel)"
                           " && herald.channels.get(channel).offset !== null", arg=channel)
    expect(page.locator("#state")).to_have_text("online")
    return context, page


def texts(page) -> list[str]:
    """The message texts in the tab's log, top to bottom."""
    return page.locator("#log li .text").all_text_contents()


def say(page, text: str) -> None:
    """Send `text` from the tab's form and wait until the channel delivered it back to the tab
    (a line shows at once, marked pending until then)."""
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator("#log li:not(.pending) .text", has_text=text)).to_have_count(1, timeout=TIMEOUT_MS)


def caught_up_and_live(tab_a, tab_b, expected: list[str]) -> None:
    """Tab B is back online showing what A shows, each message once, in order, and B's next one reaches A."""
    expect(tab_b.locator("#state")).to_have_text("online", timeout=TIMEOUT_MS)
    expect(tab_b.locator("#log li .text")).to_have_text(expected, timeout=TIMEOUT_MS)
    ids_b = tab_b.locator("#log li").evaluate_all("(items) => items.map((li) => li.dataset.id)")
    ids_a = tab_a.locator("#log li").evaluate_all("(items) => items.map((li) => li.dataset.id)")
    assert ids_b == ids_a and len(set(ids_b)) == len(expected)
    say(tab_b, "B is back")  # and the live stream carries on both ways after the reconnect
    expect(tab_a.locator("#log li .text")).to_have_text([*expected, "B is back"], timeout=TIMEOUT_MS)


def test_two_tabs_chat_and_a_tab_catches_up_after_a_network_cut(browser, stack, proxy, channel):
    token = stack.token("alice")
    web1 = stack.webs[0]
    ctx_a, tab_a = open_chat(browser, web1.base, token, channel, web=web1, subscribers=1)
    ctx_b, tab_b = open_chat(browser, f"http://127.0.0.1:{proxy.port}", token, channel, web=web1, subscribers=2)
    try:
        # A message typed in one tab appears in the other (across web processes).
        say(tab_a, "hello from A")
        expect(tab_b.locator("#log li .text")).to_have_text(["hello from A"], timeout=TIMEOUT_MS)
        expect(tab_b.locator("#log li .who")).to_have_text(["alice"])

        # Cut B's network: its page notices and goes offline.
        proxy.cut()
        expect(tab_b.locator("#state")).to_have_text(re.compile(r"^reconnecting"), timeout=TIMEOUT_MS)
        attempts = proxy.accepted
        # Meanwhile, messages from tab A and from the HTTP API.
        missed = []
        for n in range(3):
            missed.append(f"while B was away {n} ({uuid.uuid4().hex[:6]})")
            say(tab_a, missed[-1])
        for n in range(2):
            missed.append(f"over HTTP {n}")
            status, _, body = web1.request("POST", "/api/v1/messages",
                                           {"channel": channel, "data": {"text": missed[-1]}}, token=token)
            assert status == 202, body
        expected = ["hello from A", *missed]
        expect(tab_a.locator("#log li .text")).to_have_text(expected, timeout=TIMEOUT_MS)
        # B keeps trying to reconnect while cut (its attempts reach the proxy and are dropped).
        wait_until(lambda: proxy.accepted > attempts, 20, 0.1, "tab B to try reconnecting")
        assert tab_b.locator("#state").text_content().startswith("reconnecting")
        assert texts(tab_b) == ["hello from A"]

        # Restore: B reconnects, resumes from its last offset and shows each missed message once, in order.
        proxy.restore()
        caught_up_and_live(tab_a, tab_b, expected)
        expect(tab_b.locator("#log li .text")).to_have_text([*expected, "B is back"])
    finally:
        ctx_a.close()
        ctx_b.close()


def test_a_tab_that_saw_no_message_yet_catches_up_after_a_network_cut(browser, stack, proxy, channel):
    token = stack.token("bob")
    web1 = stack.webs[0]
    ctx, tab = open_chat(browser, f"http://127.0.0.1:{proxy.port}", token, channel, web=web1, subscribers=1)
    try:
        # Nothing has arrived in the tab when the network goes: it resumes
        # from the offset its subscribe was answered with.
        proxy.cut()
        expect(tab.locator("#state")).to_have_text(re.compile(r"^reconnecting"), timeout=TIMEOUT_MS)
        status, _, body = web1.request("POST", "/api/v1/messages", {"channel": channel, "data": {"text": "missed"}},
                                       token=token)
        assert status == 202, body
        wait_until(lambda: stack.store().last_ids([channel])[0], 20, 0.1, "the message to be in history")
        proxy.restore()
        expect(tab.locator("#state")).to_have_text("online", timeout=TIMEOUT_MS)
        expect(tab.locator("#log li .text")).to_have_text(["missed"], timeout=TIMEOUT_MS)
    finally:
        ctx.close()


HEARTBEAT_MS = 1000


def test_a_tab_notices_a_silently_dead_network_by_its_heartbeat_and_catches_up(browser, stack, proxy, channel):
    token = stack.token("carol")
    web1 = stack.webs[0]
    ctx_a, tab_a = open_chat(browser, web1.base, token, channel, web=web1, subscribers=1)
    ctx_b, tab_b = open_chat(browser, f"http://127.0.0.1:{proxy.port}", token, channel, web=web1, subscribers=2,
                             heartbeat_ms=HEARTBEAT_MS)
    try:
        say(tab_a, "before")
        expect(tab_b.locator("#log li .text")).to_have_text(["before"], timeout=TIMEOUT_MS)
        # Quiet for three intervals: the server's pongs keep B on its one connection.
        connections = proxy.accepted
        time.sleep(3 * HEARTBEAT_MS / 1000)
        assert tab_b.locator("#state").text_content() == "online" and proxy.accepted == connections

        # The network dies without a close: only the heartbeat can tell, within two intervals (and a tick).
        proxy.hold()
        expect(tab_b.locator("#state")).to_have_text(re.compile(r"^reconnecting"), timeout=3 * HEARTBEAT_MS)
        missed = []
        for n in range(3):
            missed.append(f"while B was in the dark {n} ({uuid.uuid4().hex[:6]})")
            say(tab_a, missed[-1])
        missed.append("over HTTP")
        status, _, body = web1.request("POST", "/api/v1/messages", {"channel": channel, "data": {"text": missed[-1]}},
                                       token=token)
        assert status == 202, body
        expected = ["before", *missed]
        expect(tab_a.locator("#log li .text")).to_have_text(expected, timeout=TIMEOUT_MS)
        assert texts(tab_b) == ["before"]

        # The network comes back: B reconnects, resumes, and shows each missed message once, in order.
        proxy.release()
        caught_up_and_live(tab_a, tab_b, expected)
    finally:
        ctx_a.close()
        ctx_b.close()


@pytest.fixture
def dev_proxy(dev_web):
    """A cuttable way to the development web process."""
    cuttable = CuttableProxy(dev_web.port)
    try:
        yield cuttable
    finally:
        cuttable.close()


def first_look(browser, base: str):
    """A fresh tab (nothing saved) opening the page, as after `make dev`: online in chat:lobby;
    returns it and its user."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{base}/")
    expect(page.locator("#state")).to_have_text("online")
    expect(page.locator("#me")).to_have_text(re.compile(r"^you are guest-"))
    assert page.input_value("#channel") == "chat:lobby" and page.input_value("#token")
    return context, page, page.locator("#me").text_content().removeprefix("you are ")


def line_of(page, text: str):
    """The log line of the message `text`."""
    return page.locator("#log li", has_text=text)


def test_first_look_in_development_two_tabs_chat_in_the_lobby_with_statuses_and_presence(
        browser, dev_web, dev_proxy):
    ctx_a, tab_a, alice = first_look(browser, dev_web.base)
    ctx_b, tab_b, bob = first_look(browser, f"http://127.0.0.1:{dev_proxy.port}")
    try:
        # Two tabs, two dev users: the page gave each a token of its own and saved neither.
        assert alice != bob
        assert tab_a.evaluate("localStorage.getItem('herald-token')") is None
        lobby = dev_web.request("GET", "/api/v1/channels/chat:lobby/presence",
                                token=tab_a.input_value("#token"))[2]["clients"]
        assert {alice, bob} <= {c["user"] for c in lobby}
        for tab in (tab_a, tab_b):  # each lists both, from GET presence and join frames
            for user in (alice, bob):
                expect(tab.locator(f"#presence li[data-user='{user}']")).to_have_count(1)

        # A message shows at once in its tab, then its status as it moves on, up to delivered.
        hello = f"hello from A {uuid.uuid4().hex[:6]}"
        say(tab_a, hello)
        expect(line_of(tab_a, hello).locator(".status")).to_have_text("delivered")
        trail = line_of(tab_a, hello).get_attribute("data-trail").split()
        assert trail[0] == "sending" and trail[-1] == "delivered", trail
        assert {"accepted", "delivered"} <= set(trail) and trail == sorted(trail, key=RANKS.index), trail
        # The other tab shows it, with its sender and status.
        expect(line_of(tab_b, hello).locator(".who")).to_have_text(alice)
        expect(line_of(tab_b, hello).locator(".status")).to_have_text("delivered")
        reply = f"hi A, B here {uuid.uuid4().hex[:6]}"
        say(tab_b, reply)
        expect(line_of(tab_a, reply).locator(".who")).to_have_text(bob)

        # B's network goes: B says it is reconnecting, and A sees B leave.
        dev_proxy.cut()
        expect(tab_b.locator("#state")).to_have_text(re.compile(r"^reconnecting"))
        expect(tab_a.locator(f"#presence li[data-user='{bob}']")).to_have_count(0)
        # What B says meanwhile waits, shown as sending, and goes out when the network is back.
        later = f"said while away {uuid.uuid4().hex[:6]}"
        tab_b.fill("#text", later)
        tab_b.press("#text", "Enter")
        expect(line_of(tab_b, later).locator(".status")).to_have_text("sending")
        dev_proxy.restore()
        expect(tab_b.locator("#state")).to_have_text("online")
        expect(line_of(tab_b, later).locator(".status")).to_have_text("delivered")
        expect(line_of(tab_a, later).locator(".who")).to_have_text(bob)
        expect(tab_a.locator(f"#presence li[data-user='{bob}']")).to_have_count(1)
        expect(tab_b.locator(f"#presence li[data-user='{alice}']")).to_have_count(1)
        # One order in both tabs, each message once.
        ids = "(items) => items.map((li) => li.dataset.id)"
        assert tab_a.locator("#log li").evaluate_all(ids)[-3:] == tab_b.locator("#log li").evaluate_all(ids)[-3:]
        assert tab_b.locator("#log li", has_text=later).count() == 1
    finally:
        ctx_a.close()
        ctx_b.close()


def test_without_development_mode_the_page_waits_for_a_token(browser, web):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto(f"{web.base}/")
        expect(page.locator("#state")).to_have_text("offline (4001)")
        assert page.input_value("#token") == "" and page.locator("#me").text_content() == ""
    finally:
        context.close()


RANKS = ["sending", "accepted", "processing", "delivered"]


# A stand-in for the server's WebSocket, so the test can script what a real
# one rarely does: refuse a subscribe with "unavailable" (Redis busy).
FAKE_SOCKET = """
window.sent = [];
window.sockets = [];
window.refuse = 1;  // how many subscribes to answer with "unavailable"
window.failing = 0;  // how many connection attempts to fail
window.WebSocket = class {
  constructor(url) {
    sockets.push(this);
    if (failing > 0) { failing -= 1; this.drop(1006); } else setTimeout(() => this.onopen(), 0);
  }
  deliver(frame) { setTimeout(() => this.onmessage({ data: JSON.stringify(frame) }), 0); }
  drop(code) { setTimeout(() => this.onclose({ code, reason: "" }), 0); }
  close(code) { this.drop(code); }
  send(text) {
    const frame = JSON.parse(text);
    sent.push(frame);
    if (frame.op === "connect") this.deliver({ op: "connected", client: "c" + sockets.length });
    if (frame.op === "publish") this.deliver({ op: "ack", id: frame.id, status: "accepted", ref: frame.ref });
    if (frame.op !== "subscribe") return;
    if (frame.channel === "chat:forbidden") {
      this.deliver({ op: "error", code: "forbidden", message: "not yours", ref: frame.ref });
    } else if (refuse > 0) {
      refuse -= 1;
      this.deliver({ op: "error", code: "unavailable", message: "history is unavailable, retry", ref: frame.ref });
    } else {
      this.deliver({ op: "subscribed", channel: frame.channel, offset: frame.since || "3-0", recovered: true,
                     replayed: 0, ref: frame.ref });
    }
  }
};
"""


def scripted_page(browser):
    """The demo page and herald.js from the source tree, under a made-up origin, with FAKE_SOCKET."""
    static = Path(__file__).resolve().parents[2] / "web" / "static"
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(FAKE_SOCKET)
    context.route("http://herald.test/**", lambda route: route.fulfill(
        path=static / ("herald.js" if route.request.url.endswith("/herald.js") else "index.html")))
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the link's #token=t is the test's own
    return context, page


def test_client_retries_a_subscribe_refused_as_unavailable_and_keeps_its_offset(browser):
    context, page = scripted_page(browser)
    try:
        page.goto("http://herald.test/#token=t")
        subscribes = lambda: page.evaluate("sent.filter((f) => f.op === 'subscribe')")  # noqa: E731

        # Refused once, subscribed on the retry (each with its own ref).
        wait_until(lambda: len(subscribes()) == 2, 20, 0.1, "the subscribe to be retried")
        first, retry = subscribes()
        assert first["channel"] == retry["channel"] == "chat:lobby"
        assert "since" not in first and "since" not in retry and first["ref"] != retry["ref"]
        expect(page.locator("#state")).to_have_text("online")

        # Dropped before any message: it resumes from the offset the subscribe was answered with.
        page.evaluate("sockets.at(-1).drop(1006)")
        wait_until(lambda: len(subscribes()) == 3, 20, 0.1, "a resubscribe after the reconnect")
        assert subscribes()[-1]["since"] == "3-0"

        # A message moves the offset; a resubscribe refused twice retries from it.
        page.evaluate("""sockets.at(-1).deliver({op: "message", channel: "chat:lobby", id: "m1", offset: "7-0",
                                                 sender: "carol", data: {text: "hi"}})""")
        expect(page.locator("#log li .text")).to_have_text(["hi"])
        page.evaluate("refuse = 2; sockets.at(-1).drop(1006)")
        wait_until(lambda: len(subscribes()) == 6, 20, 0.1, "two retries of the refused resubscribe")
        assert [f.get("since") for f in subscribes()[3:]] == ["7-0"] * 3
        expect(page.locator("#state")).to_have_text("online")
        assert page.evaluate("sockets.length") == 3
    finally:
        context.close()


def test_a_publish_made_while_offline_is_sent_after_the_reconnect_and_resolves(browser):
    context, page = scripted_page(browser)
    try:
        page.goto("http://herald.test/#token=t")
        expect(page.locator("#state")).to_have_text("online")
        # The connection drops, and the next two attempts fail too.
        page.evaluate("failing = 2; sockets.at(-1).drop(1006)")
        expect(page.locator("#state")).to_have_text(re.compile(r"^reconnecting"))
        page.evaluate("""window.outcome = null;
            herald.publish("chat:lobby", {text: "queued"}).then((a) => { outcome = "ack " + a.id; },
                                                                   () => { outcome = "rejected"; });""")
        wait_until(lambda: page.evaluate("outcome"), 20, 0.1, "the publish to be answered")
        assert page.evaluate("outcome").startswith("ack ")
        assert page.evaluate("sent.filter((f) => f.op === 'publish').length") == 1
        assert page.evaluate("sockets.length") >= 4
    finally:
        context.close()


def test_a_refused_subscribe_is_not_asked_again_after_a_reconnect(browser):
    context, page = scripted_page(browser)
    try:
        page.goto("http://herald.test/#token=t")
        expect(page.locator("#state")).to_have_text("online")
        sent_to = lambda name: page.evaluate(  # noqa: E731
            f"sent.filter((f) => f.op === 'subscribe' && f.channel === '{name}').length")
        page.evaluate("herald.subscribe('chat:forbidden', () => {})")
        wait_until(lambda: sent_to("chat:forbidden") == 1, 20, 0.1, "the forbidden subscribe")
        lobby = sent_to("chat:lobby")
        page.evaluate("sockets.at(-1).drop(1006)")
        wait_until(lambda: sent_to("chat:lobby") > lobby, 20, 0.1, "the lobby to be resubscribed")
        assert sent_to("chat:forbidden") == 1
    finally:
        context.close()


def test_a_token_in_a_link_is_used_only_if_the_user_agrees_saved_token_or_not(browser):
    context, page = scripted_page(browser)
    asked: list[str] = []

    def visit(token: str, agree: bool | None = None):
        tab = context.new_page()
        tab.on("dialog", lambda dialog: (asked.append(dialog.message),
                                         dialog.accept() if agree else dialog.dismiss()))
        tab.goto(f"http://herald.test/#token={token}")
        expect(tab.locator("#state")).to_have_text("online")
        return (tab.evaluate("localStorage.getItem('herald-token')"), tab.input_value("#token"),
                tab.evaluate("sent.find((f) => f.op === 'connect').token"))

    try:
        page.close()
        # Nothing saved yet: still asked (a link may sign a first-time visitor in as someone else).
        assert visit("theirs", agree=False) == ("", "", "") and len(asked) == 1
        assert "Sign in with it" in asked[-1]
        assert visit("mine", agree=True) == ("mine",) * 3 and len(asked) == 2
        assert visit("theirs", agree=False) == ("mine",) * 3 and len(asked) == 3
        assert "different token" in asked[-1]
        assert visit("mine") == ("mine",) * 3 and len(asked) == 3  # the saved one: no question
        assert visit("theirs", agree=True) == ("theirs",) * 3 and len(asked) == 4
    finally:
        context.close()
