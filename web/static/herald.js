// Herald's browser client: connect, subscribe with automatic resume, publish.
// Reconnects with capped exponential backoff and resumes every channel from
// the last offset it saw, so a dropped network loses no message. A heartbeat
// notices a network that died without closing the socket (see `connect`).
(function (global) {
  "use strict";

  class Herald {
    constructor(url, options) {
      options = options || {};
      this.url = url;
      this.token = options.token || null;
      this.maxDelay = options.maxDelay || 10000;
      this.heartbeat = options.heartbeat || Herald.defaults.heartbeat;
      this.channels = new Map(); // channel -> {handler, status, offset}
      this.pending = new Map();  // ref -> {resolve, reject}
      this.listeners = {};
      this.nextRef = 1;
      this.attempt = 0;
      this.closed = false;
      this.ws = null;
      this.ready = false;
      this.outbox = [];
    }

    on(event, fn) { (this.listeners[event] = this.listeners[event] || []).push(fn); return this; }
    emit(event, value) { (this.listeners[event] || []).forEach((fn) => fn(value)); }

    connect() {
      this.closed = false;
      const ws = new WebSocket(this.url);
      this.ws = ws;
      // Browsers answer the server's protocol pings but never show them to
      // JavaScript, and a network that dies silently closes nothing. So the
      // client pings too ({"op":"ping"}, answered with a pong) and gives up
      // on a socket, connecting or open, that sent nothing for two intervals.
      let heard = Date.now();
      let ticks = 0;
      const timer = setInterval(() => {
        if (Date.now() - heard >= 2 * this.heartbeat) {
          clearInterval(timer);
          // Its close handshake would wait on the dead network: drop it now.
          ws.onopen = ws.onmessage = ws.onclose = null;
          ws.close();
          this.lost(1006, "heartbeat timeout");
        } else if (this.ready && ++ticks % 2 === 0) {
          ws.send(JSON.stringify({ op: "ping" }));
        }
      }, this.heartbeat / 2);
      ws.onopen = () => ws.send(JSON.stringify({ op: "connect", token: this.token || "" }));
      ws.onmessage = (event) => { heard = Date.now(); this.receive(JSON.parse(event.data)); };
      ws.onclose = (event) => { clearInterval(timer); this.lost(event.code, event.reason); };
      return this;
    }

    lost(code, reason) {
      this.ready = false;
      this.emit("disconnected", { code, reason });
      // Requests still in the outbox go out after the reconnect: they keep
      // their promises. Those already sent may be lost with the socket.
      const queued = new Set(this.outbox.map((f) => f.ref));
      this.pending.forEach((p, ref) => {
        if (!queued.has(ref)) { p.reject(new Error("disconnected")); this.pending.delete(ref); }
      });
      // 4001 (token refused or revoked), 4003 (forbidden), 4010 (disconnected by the server): final.
      if (this.closed || code === 4001 || code === 4003 || code === 4010) return;
      const delay = Math.min(this.maxDelay, 250 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
      this.attempt += 1;
      this.emit("reconnecting", { code, reason, delay, attempt: this.attempt });
      setTimeout(() => this.connect(), delay);
    }

    close() { this.closed = true; if (this.ws) this.ws.close(1000); }

    receive(frame) {
      if (frame.ref !== undefined && this.pending.has(frame.ref)) {
        const waiter = this.pending.get(frame.ref);
        this.pending.delete(frame.ref);
        if (frame.op === "error") waiter.reject(frame); else waiter.resolve(frame);
      }
      switch (frame.op) {
        case "connected":
          this.ready = true;
          this.attempt = 0;
          this.client = frame.client;
          this.user = frame.user;
          this.emit("connected", frame);
          this.channels.forEach((sub, channel) => this.sendSubscribe(channel, sub));
          this.outbox.splice(0).forEach((f) => this.ws.send(JSON.stringify(f)));
          break;
        case "message": {
          const sub = this.channels.get(frame.channel);
          // An ephemeral message has no offset: it moves no resume point.
          if (sub) { if (frame.offset) sub.offset = frame.offset; sub.handler(frame); }
          break;
        }
        case "subscribed": {
          // A channel that has sent us nothing yet still needs an offset to
          // resume from, or a reconnect would skip what was published while
          // we were away: take the server's (its newest message, or none yet).
          const sub = this.channels.get(frame.channel);
          if (sub && !sub.offset) sub.offset = frame.offset || "0-0";
          this.emit("subscribed", frame);
          if (frame.recovered === false) this.emit("gap", frame); // history lost: reload the view
          break;
        }
        default: this.emit(frame.op, frame);
      }
    }

    send(frame) {
      if (this.ready) this.ws.send(JSON.stringify(frame)); else this.outbox.push(frame);
    }

    request(frame) {
      const ref = String(this.nextRef++);
      return new Promise((resolve, reject) => {
        this.pending.set(ref, { resolve, reject });
        this.send(Object.assign({ ref }, frame));
      });
    }

    subscribe(channel, handler, options) {
      options = options || {};
      const sub = { handler, status: !!options.status, presence: !!options.presence, offset: options.since || null,
                    retries: 0 };
      this.channels.set(channel, sub);
      if (this.ready) this.sendSubscribe(channel, sub);
    }

    sendSubscribe(channel, sub) {
      const frame = { op: "subscribe", channel, status: sub.status, presence: sub.presence };
      if (sub.offset) frame.since = sub.offset;
      const ws = this.ws;
      this.request(frame).then(() => { sub.retries = 0; }, (error) => {
        // "unavailable": the server could not read history (Redis busy) and
        // keeps the connection open, so no reconnect would subscribe again.
        // Retry after a backoff, from the offset reached by then. A refusal
        // (forbidden, bad channel) stands: the channel is not asked for again
        // on every reconnect. A lost connection resubscribes when it is back.
        if (error.op === "error" && error.code !== "unavailable" && this.channels.get(channel) === sub) {
          this.channels.delete(channel);
        }
        if (error.code !== "unavailable") return;
        const delay = Math.min(this.maxDelay, 250 * 2 ** sub.retries++) * (0.5 + Math.random() / 2);
        setTimeout(() => {
          if (this.ws === ws && this.ready && this.channels.get(channel) === sub) this.sendSubscribe(channel, sub);
        }, delay);
      });
    }

    unsubscribe(channel) {
      this.channels.delete(channel);
      this.send({ op: "unsubscribe", channel });
    }

    publish(channel, data, options) {
      options = options || {};
      const frame = { op: "publish", channel, data };
      if (options.type) frame.type = options.type;
      // An id makes a retried publish idempotent (the server answers the first ack).
      frame.id = options.id || Herald.newId();
      return this.request(frame);
    }

    // Who is in a channel: every page of the listing, following each answer's
    // `next` (docs/guide.md: "Presence"), as one answer whose `clients` holds them all.
    presence(channel, baseUrl) {
      const url = (baseUrl || "") + "/api/v1/channels/" + encodeURIComponent(channel) + "/presence";
      const headers = this.token ? { Authorization: "Bearer " + this.token } : {};
      const clients = [];
      const page = (cursor) => fetch(cursor ? url + "?cursor=" + encodeURIComponent(cursor) : url, { headers })
        .then((r) => r.json()).then((body) => {
          if (!body || !Array.isArray(body.clients)) return body;  // a problem answer, as it came
          clients.push(...body.clients);
          return body.next ? page(body.next) : Object.assign(body, { clients });
        });
      return page(null);
    }
  }

  // Defaults for every client; `heartbeat` (ms) matches the server's HERALD_PING_INTERVAL.
  Herald.defaults = { heartbeat: 25000 };
  // A message id: a random UUID. randomUUID exists only on https:// and
  // localhost pages; getRandomValues everywhere. Never a time or Math.random:
  // a guessable id can be claimed first by someone else (review M7).
  Herald.newId = () => {
    const c = global.crypto;
    if (c && c.randomUUID) return c.randomUUID();
    if (!c || !c.getRandomValues) throw new Error("Herald needs crypto.getRandomValues for message ids");
    const b = c.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;  // version 4
    b[8] = (b[8] & 0x3f) | 0x80;  // variant 10
    const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
  };
  global.Herald = Herald;
})(typeof window !== "undefined" ? window : globalThis);
