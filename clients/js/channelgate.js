// channelgate browser client: one WebSocket to a channelgate edge (or, where a WebSocket
// cannot get through, Server-Sent Events and POSTs), channel pushes, replies matched to
// requests, `call-route`, reconnect within the grace period, keepalive, and recovery of the
// pushes missed while away.
//
// A plain ES module with no dependencies and no build step. The edge serves it at
// `/channelgate.js`; it also runs in Node 20+ (`--experimental-websocket`) and Node 22+.
//
//   <body data-socket-connection-id="..." data-socket-url="ws://gateway.example:8080/ws">
//   <script type="module">
//     import { connect } from "http://gateway.example:8080/channelgate.js";
//     const gate = connect();                       // reads the body's data attributes
//     gate.on("room:lobby", (payload) => show(payload));
//     const reply = await gate.callRoute("POST", "/messages", { text: "hi" });
//     const pong = await gate.send("ping");         // {status, headers, body, ok}
//     gate.addEventListener("expired", () => location.reload()); // new credentials needed
//   </script>
//
// The socket key is not JavaScript's business: the application sets it as an HttpOnly cookie
// (default name `socket_key`) that the browser sends with the upgrade. `socketKey` exists for
// non-browser clients only.
//
// Close codes (the gateway's README has the table): 1000 and 4000-4099 end the connection for
// good ("closed"); 4200-4299 reconnect at once; anything else (1001 drain, 1006 lost, 1011,
// 4100-4199 ...) reconnects with exponential back-off and full jitter. Reconnecting stops when
// the grace period has passed since the drop (the last moment a socket was open, as the node
// counts it): the credentials are dead then, and the client fires "expired" so the page can
// fetch new ones (usually by reloading).
//
// Transports (option `transports`, default ["websocket", "sse"]): when a WebSocket does not open
// within `fallbackAfter` ms (3 s) or fails before opening (a proxy that strips `Upgrade`, a
// firewall), the client connects over Server-Sent Events (`/sse` on the same host, or
// `data-sse-url`) and sends its messages as POSTs to the same URL, with the same API and
// events. It remembers that for the session (sessionStorage) and tries the WebSocket again on a
// reconnect `retryWebSocketAfter` ms (5 min) later. Over SSE, `close()` cannot tell the node
// "for good": the credentials end when the grace period passes.
//
// Recovery: the client remembers, per channel, the epoch and offset of the last push it saw
// (in sessionStorage too, so a page refresh keeps them), and sends them when it connects. The
// gateway then replays every push missed since, in order, before live ones, or says that it
// cannot ("gap"): the page should then reload what it shows of that channel.
//
// Events (an EventTarget; `event.detail` carries the fields):
//   "open"         {resumed, recovered} the socket is open (resumed: the same credentials after
//                                       a drop; recovered: every channel it asked to recover
//                                       was, and it asked for at least one)
//   "gap"          {channel, epoch, offset} pushes to `channel` before `offset + 1` were missed
//                                       and cannot be replayed: reload that channel's state
//   "close"        {code, reason}       the socket closed (a reconnect may follow)
//   "reconnecting" {attempt, delay}     a reconnect is scheduled in `delay` ms
//   "closed"       {code, reason}       closed for good by the application (1000, 4000-4099)
//   "expired"      {}                   the grace period passed: fetch new credentials
//   "join", "leave" {channel, connection_id, user, info}  presence in a channel whose namespace
//                                       sets `join-leave` (the gateway's README: Presence)
//   "error"        {reply}              the gateway answered a message it could not read
//   "delta"        {channel, offset, ok: false, reason}
//                                       a delta did not apply (no base, bad checksum); the
//                                       client reconnects and recovers the channel whole
//   "state"        {state}              any change of `state`

/** Close codes: what the client does after each range. */
export const CLOSE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  APPLICATION_MIN: 4000,
  APPLICATION_MAX: 4099,
  RECONNECT_NOW_MIN: 4200,
  RECONNECT_NOW_MAX: 4299,
  // Sent by this client when its keepalive times out: the gateway keeps the credentials
  // resumable within the grace period (any other client close ends them).
  CLIENT_RECONNECT: 4200,
});

/** What to do after a close with `code`: "stop", "now" or "backoff". */
export function closePlan(code) {
  if (code === CLOSE.NORMAL) return "stop";
  if (code >= CLOSE.APPLICATION_MIN && code <= CLOSE.APPLICATION_MAX) return "stop";
  if (code >= CLOSE.RECONNECT_NOW_MIN && code <= CLOSE.RECONNECT_NOW_MAX) return "now";
  return "backoff";
}

const DEFAULTS = Object.freeze({
  timeout: 10_000, // ms to wait for a reply
  grace: 30_000, // ms after a drop during which the credentials can resume (the node's --grace)
  keepalive: 20_000, // ms between keepalive pings while idle; 0 turns them off
  backoffInitial: 250, // ms, first reconnect delay ceiling
  backoffMax: 5_000, // ms, largest reconnect delay ceiling
  maxQueued: 256, // messages held while (re)connecting
  recover: true, // ask the gateway to replay pushes missed while away
  delta: true, // take pushes on delta channels (namespace `delta = true`) as Fossil deltas
  transports: ["websocket", "sse"], // in order of preference
  fallbackAfter: 3_000, // ms a WebSocket may take to open before SSE is tried
  retryWebSocketAfter: 300_000, // ms after falling back before the WebSocket is tried again
});

/** Where positions are kept across page loads (per gateway endpoint). */
const STORAGE_PREFIX = "channelgate.positions:";
/** Where the transport that worked is kept for the session (per gateway endpoint). */
const TRANSPORT_PREFIX = "channelgate.transport:";

/**
 * Server-Sent Events and POSTs behind a WebSocket's face (readyState, onopen, onmessage,
 * onclose, onerror, send, close), so the client drives both the same way. "open" is the
 * stream's first event (the gateway's `connected`): a "come back later" answer never opens.
 * The reply to a message sent comes back in its POST's response and is handed over as a
 * message.
 */
class SseSocket {
  constructor(url, postUrl, { EventSource, fetch }) {
    this.readyState = 0;
    this.postUrl = postUrl;
    this.fetch = fetch;
    this.closeInfo = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    const stream = new EventSource(url, { withCredentials: true });
    this.stream = stream;
    stream.onmessage = (event) => {
      if (this.readyState === 0) {
        this.readyState = 1;
        this.onopen?.();
      }
      this.onmessage?.({ data: event.data });
    };
    // Why the gateway ended the stream: {code, reason}, as a WebSocket close would say.
    stream.addEventListener("close", (event) => {
      try {
        this.closeInfo = JSON.parse(event.data);
      } catch {
        this.closeInfo = null;
      }
    });
    // The stream ended or failed: this client decides about reconnecting, not EventSource.
    stream.onerror = () => this.#finish();
  }

  #finish() {
    if (this.readyState === 3) return;
    this.stream.close();
    this.readyState = 3;
    const { code = CLOSE.ABNORMAL, reason = "stream ended" } = this.closeInfo ?? {};
    this.onclose?.({ code, reason });
  }

  send(frame) {
    this.fetch(this.postUrl, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: frame,
      credentials: "include",
    })
      .then((response) => (response.status === 200 ? response.text() : null))
      .then((text) => {
        if (text && this.readyState === 1) this.onmessage?.({ data: text });
      })
      .catch(() => {
        // No reply: the request times out like one lost on a WebSocket.
      });
  }

  close() {
    if (this.readyState === 3) return;
    this.stream.close();
    this.readyState = 3;
  }
}

/** A reply or a timeout for one request. */
export class TimeoutError extends Error {
  constructor(action, ms) {
    super(`no reply to "${action}" within ${ms} ms`);
    this.name = "TimeoutError";
  }
}

/** The request could not complete: the socket closed first, or the client was closed. */
export class ConnectionError extends Error {
  constructor(message) {
    super(message);
    this.name = "ConnectionError";
  }
}

export class Channelgate extends EventTarget {
  /**
   * @param {object} [options]
   * @param {string} [options.connectionId] the public connection id; default: the body's
   *   `data-socket-connection-id`
   * @param {string} [options.url] the WebSocket endpoint; default: the body's
   *   `data-socket-url`, else `/ws` on this page's host (ws: or wss: to match the page)
   * @param {string} [options.socketKey] non-browser clients only: the key, sent in the query
   * @param {number} [options.timeout] ms to wait for a reply (10 s)
   * @param {number} [options.grace] ms a dropped connection may resume (30 s, as the node)
   * @param {number} [options.keepalive] ms between pings while idle (20 s; 0 = off)
   * @param {number} [options.backoffInitial] ms (250)
   * @param {number} [options.backoffMax] ms (5 s)
   * @param {boolean} [options.recover] replay pushes missed while away (true)
   * @param {boolean} [options.delta] take pushes on channels whose namespace has `delta = true`
   *   as deltas against the previous push, applied and checked here (true)
   * @param {Storage|null} [options.storage] where positions survive a page refresh
   *   (default: sessionStorage when there is one; null: nowhere)
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket constructor (default: global)
   * @param {string[]} [options.transports] "websocket" and "sse", in order of preference
   * @param {string} [options.sseUrl] the event-stream endpoint; default: the body's
   *   `data-sse-url`, else `/sse` on the WebSocket endpoint's host
   * @param {number} [options.fallbackAfter] ms a WebSocket may take to open (3 s)
   * @param {number} [options.retryWebSocketAfter] ms before trying it again (5 min)
   * @param {typeof EventSource} [options.EventSource] (default: global)
   * @param {typeof fetch} [options.fetch] (default: global)
   */
  constructor(options = {}) {
    super();
    const body = globalThis.document?.body;
    this.options = { ...DEFAULTS, ...options };
    this.connectionId = options.connectionId ?? body?.dataset.socketConnectionId;
    if (!this.connectionId) {
      throw new Error("channelgate: no connection id (body data-socket-connection-id)");
    }
    this.url = endpoint(options.url ?? body?.dataset.socketUrl, this.connectionId, options.socketKey);
    this.sseUrl = sseEndpoint(options.sseUrl ?? body?.dataset.sseUrl, this.url);
    this.storage = options.storage === undefined ? storage() : options.storage;
    this.storageKey = STORAGE_PREFIX + this.url.split("?")[0];
    this.positions = this.options.recover ? loadPositions(this.storage, this.storageKey) : new Map();
    this.asked = new Map(); // what the current socket asked to recover
    this.bases = new Map(); // channel -> {offset, raw}: the last push, what a delta applies to
    this.dirty = false;
    this.saveTimer = null;
    globalThis.addEventListener?.("pagehide", () => this.#save());
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.EventSource = options.EventSource ?? globalThis.EventSource;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.transportKey = TRANSPORT_PREFIX + this.url.split("?")[0];
    this.transport = null; // of the current (or last) socket: "websocket" | "sse"
    this.fallbackTimer = null;
    this.state = "idle"; // idle | connecting | open | reconnecting | closed | expired
    this.socket = null;
    this.handlers = new Map(); // channel -> Set<fn>
    this.pending = new Map(); // id -> {resolve, reject, timer, action}
    this.queue = []; // frames waiting for an open socket
    this.nextId = 1;
    this.attempt = 0;
    // The last moment a socket was open: the grace period counts from here. A socket that is
    // open moves it on when it closes; dials that never open leave it where it is.
    this.lastOpen = Date.now();
    this.opened = false;
    this.reconnectTimer = null;
    this.keepaliveTimer = null;
    this.resumedSocket = false;
    this.lastReceived = 0;
  }

  /** Opens the socket (once; later calls do nothing). Returns this. */
  open() {
    if (this.state === "idle") this.#dial();
    return this;
  }

  /**
   * Calls `fn(payload, channel, offset, raw)` for every push to `channel` ("*" for every
   * channel); `offset` is the push's place in the channel's stream (undefined for a `Send` to
   * this one socket), `raw` the payload's JSON text exactly as pushed (a push that came as a
   * delta is rebuilt byte for byte; undefined for a `Send`). Returns a function that removes the
   * handler.
   */
  on(channel, fn) {
    let set = this.handlers.get(channel);
    if (!set) this.handlers.set(channel, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * Sends `{"action": action, "id": n, ...fields}` and resolves with the reply
   * `{status, headers, body, ok}` (ok: status 200-299), whatever its status, like fetch.
   * Rejects with TimeoutError after `timeout` ms, or ConnectionError when the socket closes
   * first (the reply, if any, went to the old socket) or the client is closed.
   */
  send(action, fields = {}, { timeout = this.options.timeout } = {}) {
    if (this.state === "closed" || this.state === "expired") {
      return Promise.reject(new ConnectionError(`channelgate is ${this.state}`));
    }
    const id = this.nextId++;
    const frame = JSON.stringify({ ...fields, action, id });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.queue = this.queue.filter((queued) => queued.id !== id);
        reject(new TimeoutError(action, timeout));
      }, timeout);
      this.pending.set(id, { resolve, reject, timer, action });
      if (this.state === "open") {
        this.socket.send(frame);
      } else if (this.queue.length < this.options.maxQueued) {
        this.queue.push({ id, frame });
      } else {
        this.#settle(id, null, new ConnectionError("too many messages queued while connecting"));
      }
    });
  }

  /** `call-route`: the application's REST route over the socket. Resolves like `send`. */
  callRoute(method, uri, input, options) {
    const fields = { method, uri };
    if (input !== undefined) fields.input = input;
    return this.send("call-route", fields, options);
  }

  /** Closes for good (code 1000: the gateway ends the credentials). */
  close() {
    this.#stop("closed", CLOSE.NORMAL, "closed by the page");
  }

  // Which transport to dial: the first wanted, unless it failed and a later one worked
  // within `retryWebSocketAfter` (remembered for the session).
  #available() {
    return this.options.transports.filter(
      (t) => (t === "websocket" && this.WebSocket) || (t === "sse" && this.EventSource && this.fetch),
    );
  }

  #pick() {
    const wanted = this.#available();
    if (wanted.length === 0) return null;
    let worked = null;
    try {
      worked = JSON.parse(this.storage?.getItem(this.transportKey) ?? "null");
    } catch {
      worked = null;
    }
    if (
      worked?.transport &&
      wanted.includes(worked.transport) &&
      Date.now() - worked.at < this.options.retryWebSocketAfter
    ) {
      return worked.transport;
    }
    return wanted[0];
  }

  #remember(transport) {
    try {
      if (transport === this.#available()[0]) this.storage?.removeItem(this.transportKey);
      else this.storage?.setItem(this.transportKey, JSON.stringify({ transport, at: Date.now() }));
    } catch {
      // Storage denied: the fallback is found again on the next page load.
    }
  }

  #dial(transport = this.#pick()) {
    this.#setState(this.opened ? "reconnecting" : "connecting");
    if (!transport) {
      this.#stop("closed", CLOSE.ABNORMAL, "no transport available");
      return;
    }
    let socket;
    let recover = this.options.delta ? "&delta=1" : "";
    if (this.options.recover) {
      this.asked = new Map(this.positions);
      recover += "&recover=" + encodeURIComponent(JSON.stringify(Object.fromEntries(this.asked)));
    }
    try {
      socket =
        transport === "sse"
          ? new SseSocket(this.sseUrl + recover, this.sseUrl, this)
          : new this.WebSocket(this.url + recover);
    } catch (err) {
      // A malformed URL, or a page not allowed to connect: nothing to retry.
      this.#stop("closed", CLOSE.ABNORMAL, String(err));
      return;
    }
    this.socket = socket;
    this.transport = transport;
    // A WebSocket that does not open in time, or fails before opening, makes way for the next
    // transport at once (a proxy that strips Upgrade, a firewall that holds it).
    const available = this.#available();
    const next = available[available.indexOf(transport) + 1];
    let opened = false;
    const fallBack = () => {
      if (this.socket !== socket || opened) return false;
      clearTimeout(this.fallbackTimer);
      this.socket = null;
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try {
        socket.close();
      } catch {
        // already closing
      }
      this.#dial(next);
      return true;
    };
    clearTimeout(this.fallbackTimer);
    if (next && transport === "websocket") {
      this.fallbackTimer = setTimeout(fallBack, this.options.fallbackAfter);
    }
    socket.onopen = () => {
      opened = true;
      clearTimeout(this.fallbackTimer);
      this.#remember(transport);
      const resumed = this.opened;
      this.opened = true;
      this.attempt = 0;
      this.lastOpen = Date.now();
      this.lastReceived = Date.now();
      this.#setState("open");
      for (const { frame } of this.queue.splice(0)) socket.send(frame);
      this.#armKeepalive();
      // With recovery on, the gateway's first frame (`connected`) says what was recovered;
      // "open" waits for it.
      this.resumedSocket = resumed;
      if (!this.options.recover) this.#emit("open", { resumed, recovered: false });
    };
    socket.onmessage = (event) => {
      this.lastReceived = Date.now();
      this.#receive(event.data);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return; // an abandoned socket, or handled on error
      if (next && transport === "websocket" && fallBack()) return;
      this.#closed(event.code, event.reason);
    };
    // Browsers follow an error with a close (1006); some runtimes (Node 20) fire only the error
    // when the connection fails. Either way the socket is finished: handle it once, as 1006.
    socket.onerror = () => {
      if (this.socket !== socket) return;
      if (next && transport === "websocket" && fallBack()) return;
      this.#closed(CLOSE.ABNORMAL, "connection failed");
    };
  }

  #receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return; // the gateway only sends JSON; ignore anything else
    }
    if (message === null || typeof message !== "object") return;
    if ("connected" in message) {
      this.#connected(message.connected);
      return;
    }
    if ("channel" in message && !("status" in message)) {
      const channel = message.channel;
      for (const kind of ["join", "leave"]) {
        if (kind in message) {
          // Presence, for channels whose namespace sets `join-leave`.
          this.#emit(kind, { channel, ...message[kind] });
          return;
        }
      }
      let raw;
      if ("delta" in message) {
        raw = this.#applyDelta(channel, message);
        if (raw === undefined) return;
        message.payload = JSON.parse(raw);
      } else if ("payload" in message && message.offset !== undefined) {
        // The payload's exact text: the frame ends with it (and "}").
        raw = data.slice(data.indexOf(',"payload":') + 11, -1);
      }
      if (!("payload" in message)) {
        // A position: where a new subscription starts, or a gap.
        this.#position(channel, message.epoch, message.offset);
        if (message.recovered === false) {
          this.#emit("gap", { channel, epoch: message.epoch, offset: message.offset });
        }
        return;
      }
      const offset = message.offset;
      if (offset !== undefined) {
        const known = this.positions.get(channel);
        if (known && offset <= known.offset) return; // seen already
        if (known) {
          known.offset = offset;
          this.#changed();
        }
        if (this.options.delta) this.bases.set(channel, { offset, raw });
      }
      for (const key of [channel, "*"]) {
        for (const fn of this.handlers.get(key) ?? []) {
          try {
            fn(message.payload, channel, offset, raw);
          } catch (err) {
            queueMicrotask(() => {
              throw err; // report the handler's error without stopping delivery
            });
          }
        }
      }
      return;
    }
    if ("status" in message) {
      const reply = {
        status: message.status,
        headers: message.headers ?? {},
        body: message.body,
        ok: message.status >= 200 && message.status < 300,
      };
      if (message.id === null || message.id === undefined || !this.pending.has(message.id)) {
        this.#emit("error", { reply });
        return;
      }
      this.#settle(message.id, reply, null);
    }
  }

  // A delta push: the payload's text, from the last push on the channel and the delta, checked
  // by its checksum; undefined (said with a "delta" event) when it does not apply, and the
  // channel is then recovered whole: the socket reconnects at once and asks for everything
  // after the last push that did apply, whose first push comes whole.
  #applyDelta(channel, message) {
    const base = this.bases.get(channel);
    const known = this.positions.get(channel);
    if (known && message.offset <= known.offset) return undefined; // seen already
    let reason = null;
    if (!base || base.offset !== message.offset - 1) {
      reason = "no base: the previous push was not received";
    } else {
      try {
        return UTF8_DECODER.decode(applyDelta(UTF8.encode(base.raw), UTF8.encode(message.delta)));
      } catch (err) {
        reason = String(err?.message ?? err);
      }
    }
    this.bases.delete(channel);
    this.#emit("delta", { channel, offset: message.offset, ok: false, reason });
    const socket = this.socket;
    if (socket && this.state === "open") {
      this.socket = null;
      socket.close(CLOSE.CLIENT_RECONNECT, "delta mismatch");
      this.#closed(CLOSE.CLIENT_RECONNECT, "delta mismatch");
    }
    return undefined;
  }

  // The socket's first frame: every channel it is subscribed to, where each continues from,
  // and (for those it asked about) whether what it missed follows.
  #connected({ channels = {} } = {}) {
    this.positions = new Map();
    let recovered = this.asked.size > 0;
    const gaps = [];
    for (const [channel, at] of Object.entries(channels)) {
      this.positions.set(channel, { epoch: at.epoch, offset: at.offset });
      if (at.recovered === false) {
        recovered = false;
        gaps.push({ channel, epoch: at.epoch, offset: at.offset });
      }
    }
    this.#changed();
    this.#emit("open", { resumed: this.resumedSocket, recovered });
    for (const gap of gaps) this.#emit("gap", gap);
  }

  #position(channel, epoch, offset) {
    if (typeof epoch !== "string" || typeof offset !== "number") return;
    this.positions.set(channel, { epoch, offset });
    this.#changed();
  }

  // Positions are saved at most once a second, and when the page goes away.
  #changed() {
    this.dirty = true;
    if (!this.storage || this.saveTimer) return;
    this.saveTimer = setTimeout(() => this.#save(), 1000);
  }

  #save() {
    clearTimeout(this.saveTimer);
    this.saveTimer = null;
    if (!this.dirty || !this.storage) return;
    this.dirty = false;
    try {
      this.storage.setItem(this.storageKey, JSON.stringify(Object.fromEntries(this.positions)));
    } catch {
      // Storage full or denied: recovery then covers reconnects, not page refreshes.
    }
  }

  #settle(id, reply, error) {
    const request = this.pending.get(id);
    if (!request) return;
    this.pending.delete(id);
    clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(reply);
  }

  #closed(code, reason) {
    // The socket was open until now (a dial that failed never was): the drop is now.
    if (this.state === "open") this.lastOpen = Date.now();
    this.socket = null;
    clearTimeout(this.keepaliveTimer);
    // Replies to what was sent on this socket will not come to the next one.
    for (const id of [...this.pending.keys()]) {
      if (!this.queue.some((queued) => queued.id === id)) {
        this.#settle(id, null, new ConnectionError(`socket closed (${code}) before the reply`));
      }
    }
    this.#emit("close", { code, reason });
    const plan = closePlan(code);
    if (plan === "stop") {
      this.#stop("closed", code, reason);
      return;
    }
    if (Date.now() - this.lastOpen >= this.options.grace) {
      this.#stop("expired", code, reason);
      return;
    }
    this.attempt += 1;
    const ceiling = Math.min(this.options.backoffMax, this.options.backoffInitial * 2 ** (this.attempt - 1));
    // Full jitter spreads a drained node's sockets over the ceiling; "now" still jitters a little.
    const delay = plan === "now" ? Math.random() * 50 : Math.random() * ceiling;
    const left = this.options.grace - (Date.now() - this.lastOpen);
    this.#setState("reconnecting");
    this.#emit("reconnecting", { attempt: this.attempt, delay: Math.round(delay) });
    this.reconnectTimer = setTimeout(() => this.#dial(), Math.min(delay, Math.max(left, 0)));
  }

  #stop(state, code, reason) {
    if (this.state === "closed" || this.state === "expired") return;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.keepaliveTimer);
    const socket = this.socket;
    this.socket = null;
    if (socket && socket.readyState <= 1) socket.close(CLOSE.NORMAL, "");
    for (const id of [...this.pending.keys()]) {
      this.#settle(id, null, new ConnectionError(`channelgate is ${state}`));
    }
    this.queue = [];
    this.#save();
    this.#setState(state);
    if (state === "expired") this.#emit("expired", {});
    else this.#emit("closed", { code, reason });
  }

  // While open, a ping goes out when nothing arrived for `keepalive` ms. No reply within
  // `timeout` means the path is dead (a browser sees the server's pings but cannot act on
  // them): drop the socket with 4200 so the credentials stay resumable, and reconnect.
  #armKeepalive() {
    const every = this.options.keepalive;
    if (!every) return;
    clearTimeout(this.keepaliveTimer);
    this.keepaliveTimer = setTimeout(() => {
      const socket = this.socket;
      if (this.state !== "open" || !socket) return;
      if (Date.now() - this.lastReceived < every) {
        this.#armKeepalive();
        return;
      }
      this.send("ping").then(
        () => this.#armKeepalive(),
        (err) => {
          if (err instanceof TimeoutError && this.socket === socket) {
            this.socket = null;
            socket.close(CLOSE.CLIENT_RECONNECT, "keepalive timeout");
            this.#closed(CLOSE.ABNORMAL, "keepalive timeout");
          }
        },
      );
    }, every);
  }

  #setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.#emit("state", { state });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

const UTF8 = new TextEncoder();
const UTF8_DECODER = new TextDecoder("utf-8", { fatal: true });

/** Fossil's base-64 digits, by character code (-1: not a digit). */
const DIGIT = new Int8Array(128).fill(-1);
"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
  .split("")
  .forEach((c, i) => (DIGIT[c.charCodeAt(0)] = i));

/**
 * Applies a Fossil delta (bytes) to `source` (bytes) and returns the target's bytes; throws when
 * the delta is malformed, does not fit the source, or its checksum or size is not the target's.
 * The same format the gateway's `edge/fossil.rs` writes.
 */
export function applyDelta(source, delta) {
  let at = 0;
  const int = () => {
    const start = at;
    let n = 0;
    while (at < delta.length && delta[at] < 128 && DIGIT[delta[at]] >= 0) {
      n = n * 64 + DIGIT[delta[at++]];
      if (n > 2 ** 40) throw new Error("malformed delta");
    }
    if (at === start) throw new Error("malformed delta");
    return n;
  };
  const size = int();
  if (delta[at++] !== 0x0a) throw new Error("malformed delta");
  const out = new Uint8Array(size);
  let len = 0;
  for (;;) {
    const n = int();
    const op = delta[at++];
    if (op === 0x40) {
      // "@": copy n bytes of the source from an offset, then ","
      const offset = int();
      if (delta[at++] !== 0x2c) throw new Error("malformed delta");
      if (offset + n > source.length || len + n > size) throw new Error("delta does not fit its source");
      out.set(source.subarray(offset, offset + n), len);
      len += n;
    } else if (op === 0x3a) {
      // ":": n literal bytes
      if (at + n > delta.length || len + n > size) throw new Error("delta does not fit its source");
      out.set(delta.subarray(at, at + n), len);
      len += n;
      at += n;
    } else if (op === 0x3b) {
      // ";": n is the target's checksum
      if (len !== size || checksum(out) !== n) throw new Error("delta checksum mismatch");
      return out;
    } else {
      throw new Error("malformed delta");
    }
  }
}

/** Fossil's checksum: the sum of big-endian 32-bit words (the last padded with zeros), mod 2^32. */
function checksum(bytes) {
  let sum = 0;
  let i = 0;
  for (; i + 4 <= bytes.length; i += 4) {
    sum = (sum + ((bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3])) >>> 0;
  }
  let tail = 0;
  for (let shift = 24; i < bytes.length; i++, shift -= 8) tail |= bytes[i] << shift;
  return (sum + tail) >>> 0;
}

/** Creates a client and opens it: `connect()` in a page, `connect({...})` elsewhere. */
export function connect(options) {
  return new Channelgate(options).open();
}

function storage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // denied (sandboxed frames, privacy settings)
  }
}

function loadPositions(store, key) {
  const positions = new Map();
  try {
    const saved = JSON.parse(store?.getItem(key) ?? "{}");
    for (const [channel, at] of Object.entries(saved ?? {})) {
      if (typeof at?.epoch === "string" && Number.isSafeInteger(at?.offset)) {
        positions.set(channel, { epoch: at.epoch, offset: at.offset });
      }
    }
  } catch {
    // Nothing usable saved: start without positions.
  }
  return positions;
}

/** The event-stream URL: `base`, else `/sse` on the WebSocket endpoint's host, with its query. */
function sseEndpoint(base, wsUrl) {
  const ws = new URL(wsUrl);
  const url = base ? new URL(base, globalThis.location?.href ?? ws.href) : new URL("/sse", ws.href);
  if (url.protocol === "ws:") url.protocol = "http:";
  if (url.protocol === "wss:") url.protocol = "https:";
  for (const [name, value] of ws.searchParams) url.searchParams.set(name, value);
  return url.toString();
}

function endpoint(base, connectionId, socketKey) {
  const location = globalThis.location;
  let url;
  if (base) {
    url = new URL(base, location?.href);
  } else if (location) {
    url = new URL("/ws", location.href);
  } else {
    throw new Error("channelgate: no url (data-socket-url) and no page location");
  }
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  url.searchParams.set("socket_connection_id", connectionId);
  if (socketKey) url.searchParams.set("socket_key", socketKey);
  return url.toString();
}
