// Tests of the browser client against a live gateway: the real `channelgate` binary (path in
// CHANNELGATE_BIN, default target/debug/channelgate), credentials minted and pushes sent with
// its CLI over gRPC, a TCP proxy in front of the edge so a test can kill the socket, and a
// plain HTTP server as the call-route upstream.
//
//   node --test --experimental-websocket clients/js/test/
//
// `cargo test` runs this file (tests/integration/js_client.rs).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { createServer as createTcpServer, connect as tcpConnect } from "node:net";
import { createServer as createHttpServer } from "node:http";
import { once } from "node:events";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";
import { resolve } from "node:path";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";

import { connect, closePlan, applyDelta, TimeoutError, ConnectionError } from "../channelgate.js";

const ROOT = resolve(fileURLToPath(import.meta.url), "../../../..");
const BIN = process.env.CHANNELGATE_BIN ?? resolve(ROOT, "target/debug/channelgate");
const PATIENCE = 10_000;
const run = promisify(execFile);

let node; // the gateway process
let edge; // "127.0.0.1:port" of its client plane
let control; // "http://127.0.0.1:port" of its control plane
let upstream; // the call-route upstream
const hanging = []; // upstream responses that never end

before(async () => {
  upstream = createHttpServer((req, res) => {
    let body = "";
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => {
      if (req.url.startsWith("/slow")) {
        hanging.push(res);
        return;
      }
      res.setHeader("content-type", "application/json");
      res.end(JSON.stringify({ method: req.method, url: req.url, body: body ? JSON.parse(body) : null }));
    });
  });
  upstream.listen(0, "127.0.0.1");
  await once(upstream, "listening");
  const upstreamUrl = `http://127.0.0.1:${upstream.address().port}`;

  // Pushes on `state:` channels go as deltas to clients that ask (the client does by default).
  const config = resolve(mkdtempSync(resolve(tmpdir(), "channelgate-js-")), "channelgate.toml");
  writeFileSync(config, "[namespaces.state]\ndelta = true\n");
  node = spawn(
    BIN,
    [
      "serve",
      "--listen", "127.0.0.1:0",
      "--grpc-listen", "127.0.0.1:0",
      "--log-format", "json",
      "--upstream", upstreamUrl,
      "--upstream-timeout", "30s",
      "--reconnect-grace", "3s",
      "--config", config,
    ],
    { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, CHANNELGATE_LOG: "info" } },
  );
  let buffered = "";
  const addresses = new Promise((resolveAddresses, reject) => {
    const timer = setTimeout(() => reject(new Error("the node did not log its addresses")), PATIENCE);
    node.stderr.on("data", (chunk) => {
      buffered += chunk;
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        let entry;
        try {
          entry = JSON.parse(line);
        } catch {
          continue;
        }
        const message = entry.fields?.message ?? "";
        if (message.startsWith("client plane listening")) edge = entry.fields.addr;
        if (message.startsWith("control plane listening")) control = `http://${entry.fields.addr}`;
        if (edge && control) {
          clearTimeout(timer);
          resolveAddresses();
        }
      }
    });
    node.on("exit", (code) => reject(new Error(`the node exited with ${code}`)));
  });
  await addresses;
});

after(async () => {
  for (const res of hanging) res.destroy();
  upstream?.close();
  if (node && node.exitCode === null) {
    node.kill("SIGTERM");
    await once(node, "exit");
  }
});

/** The CLI against the node's control plane; resolves with its stdout. */
async function cli(...args) {
  const { stdout } = await run(BIN, [...args, "--server", control]);
  return stdout;
}

/** Mints credentials subscribed to `channels`. */
async function issue(...channels) {
  const out = await cli("issue", ...channels.flatMap((c) => ["--channel", c]));
  return JSON.parse(out); // {connection_id, socket_key, digest, expires_at_unix_ms}
}

/** A TCP proxy to the edge whose connections a test can cut, or freeze (a dead path). */
async function proxy() {
  const sockets = new Set();
  let frozen = false;
  let port;
  const server = createTcpServer((client) => {
    const [host, port] = edge.split(":");
    const upstream = tcpConnect(Number(port), host);
    sockets.add(client).add(upstream);
    client.on("data", (chunk) => frozen || upstream.write(chunk));
    upstream.on("data", (chunk) => frozen || client.write(chunk));
    const drop = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    /** Cuts every connection without a close frame, as a network failure would. */
    cut() {
      for (const socket of sockets) socket.resetAndDestroy();
      sockets.clear();
    },
    /** Drops everything in both directions while the TCP connections stay up. */
    freeze(on = true) {
      frozen = on;
    },
    /** Stops accepting and cuts what is open. */
    close() {
      server.close();
      this.cut();
    },
    /** Cuts what is open and refuses new connections until `resume`. */
    async pause() {
      port = server.address().port;
      server.close();
      this.cut();
    },
    /** Accepts again, on the same port. */
    async resume() {
      server.listen(port, "127.0.0.1");
      await once(server, "listening");
    },
  };
}

/** Waits until `condition()` holds. */
async function until(condition) {
  const deadline = Date.now() + PATIENCE;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A Storage in memory (Node has no sessionStorage). */
function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => items.get(key) ?? null,
    setItem: (key, value) => items.set(key, String(value)),
    removeItem: (key) => items.delete(key),
  };
}

/** Pushes `payloads` to `channel` in one PushStream-free loop of CLI calls. */
async function pushAll(channel, payloads) {
  for (const payload of payloads) await cli("push", channel, JSON.stringify(payload));
}

/** Resolves with the first `type` event's detail. */
function next(gate, type) {
  return new Promise((resolveEvent, reject) => {
    const timer = setTimeout(() => reject(new Error(`no "${type}" event`)), PATIENCE);
    gate.addEventListener(
      type,
      (event) => {
        clearTimeout(timer);
        resolveEvent(event.detail);
      },
      { once: true },
    );
  });
}

/** Resolves with the next payload pushed to `channel`. */
function pushed(gate, channel) {
  return new Promise((resolvePush, reject) => {
    const timer = setTimeout(() => reject(new Error(`no push on ${channel}`)), PATIENCE);
    const off = gate.on(channel, (payload) => {
      clearTimeout(timer);
      off();
      resolvePush(payload);
    });
  });
}

async function open(credentials, options = {}) {
  const gate = connect({
    url: `ws://${edge}/ws`,
    connectionId: credentials.connection_id,
    socketKey: credentials.socket_key,
    ...options,
  });
  const detail = await next(gate, "open");
  assert.equal(detail.resumed, false);
  return gate;
}

test("the edge serves the client with caching headers", async () => {
  const res = await fetch(`http://${edge}/channelgate.js`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type"), /^text\/javascript/);
  assert.match(res.headers.get("cache-control"), /max-age=\d+/);
  assert.equal(res.headers.get("access-control-allow-origin"), "*");
  const etag = res.headers.get("etag");
  assert.ok(etag);
  assert.match(await res.text(), /export class Channelgate/);
  const again = await fetch(`http://${edge}/channelgate.js`, { headers: { "if-none-match": etag } });
  assert.equal(again.status, 304);
});

test("pushes reach on(channel) handlers and '*'", async () => {
  const creds = await issue("room:a", "room:b");
  const gate = await open(creds);
  const a = pushed(gate, "room:a");
  const all = [];
  gate.on("*", (payload, channel) => all.push([channel, payload]));
  await cli("push", "room:a", '{"n":1}');
  assert.deepEqual(await a, { n: 1 });
  const b = pushed(gate, "room:b");
  await cli("push", "room:b", '{"n":2}');
  assert.deepEqual(await b, { n: 2 });
  assert.deepEqual(all, [["room:a", { n: 1 }], ["room:b", { n: 2 }]]);
  gate.close();
});

test("send resolves with the reply that has its id", async () => {
  const gate = await open(await issue());
  const [pong, missing] = await Promise.all([gate.send("ping"), gate.send("nobody.handles.this", { x: 1 })]);
  assert.deepEqual(pong, { status: 200, headers: {}, body: "pong", ok: true });
  assert.equal(missing.status, 404);
  assert.equal(missing.ok, false);
  gate.close();
  await assert.rejects(gate.send("ping"), ConnectionError);
});

test("callRoute reaches the upstream; a slow one times out", async () => {
  const gate = await open(await issue());
  const reply = await gate.callRoute("POST", "/messages?room=a", { text: "hi" });
  assert.equal(reply.status, 200);
  assert.deepEqual(reply.body, { method: "POST", url: "/messages?room=a", body: { text: "hi" } });
  await assert.rejects(gate.callRoute("GET", "/slow", undefined, { timeout: 200 }), TimeoutError);
  // The socket is still fine after a timeout.
  assert.equal((await gate.send("ping")).status, 200);
  gate.close();
});

test("a cut socket reconnects, resumes its subscriptions, and sends what was queued", async () => {
  const creds = await issue("room:cut");
  const tcp = await proxy();
  const gate = await open(creds, { url: tcp.url, backoffInitial: 50 });
  const reconnecting = next(gate, "reconnecting");
  const reopened = next(gate, "open");
  tcp.cut();
  const close = await next(gate, "close");
  assert.equal(close.code, 1006);
  assert.ok((await reconnecting).attempt >= 1);
  // Sent while reconnecting: held, then sent on the new socket.
  const queued = gate.send("ping");
  assert.equal((await reopened).resumed, true);
  assert.equal((await queued).status, 200);
  const payload = pushed(gate, "room:cut");
  await cli("push", "room:cut", '"after"');
  assert.equal(await payload, "after");
  gate.close();
  tcp.close();
});

test("a keepalive that gets no answer drops the socket with 4200 and resumes", async () => {
  const creds = await issue("room:keepalive");
  const tcp = await proxy();
  const gate = await open(creds, { url: tcp.url, keepalive: 100, timeout: 300, backoffInitial: 50 });
  tcp.freeze();
  await next(gate, "reconnecting");
  tcp.freeze(false);
  assert.equal((await next(gate, "open")).resumed, true);
  const payload = pushed(gate, "room:keepalive");
  await cli("push", "room:keepalive", "1");
  assert.equal(await payload, 1);
  gate.close();
  tcp.close();
});

test("an application disconnect (4000) closes for good", async () => {
  const creds = await issue();
  const gate = await open(creds);
  const closed = next(gate, "closed");
  await cli("disconnect", creds.digest);
  const detail = await closed;
  assert.equal(detail.code, 4000);
  assert.equal(gate.state, "closed");
  await assert.rejects(gate.send("ping"), ConnectionError);
});

test("a client open for longer than the grace resumes after a cut: the grace counts from the drop", async () => {
  const creds = await issue("room:long");
  const tcp = await proxy();
  const gate = await open(creds, { url: tcp.url, grace: 500, backoffInitial: 50, backoffMax: 100 });
  try {
    let expired = false;
    gate.addEventListener("expired", () => (expired = true));
    await new Promise((done) => setTimeout(done, 800)); // open for longer than the grace
    const reopened = Promise.race([next(gate, "open"), next(gate, "expired").then(() => "expired")]);
    tcp.cut();
    assert.equal((await reopened).resumed, true);
    assert.equal(expired, false);
    const payload = pushed(gate, "room:long");
    await cli("push", "room:long", '"still here"');
    assert.equal(await payload, "still here");
  } finally {
    gate.close();
    tcp.close();
  }
});

test("past the grace period the client stops and fires expired", async () => {
  const creds = await issue();
  const tcp = await proxy();
  const gate = await open(creds, { url: tcp.url, grace: 500, backoffInitial: 50, backoffMax: 100 });
  const expired = next(gate, "expired");
  tcp.close(); // nothing answers any more
  await expired;
  assert.equal(gate.state, "expired");
});

test("refused credentials never open and end in expired", async () => {
  const creds = await issue();
  const gate = connect({
    url: `ws://${edge}/ws`,
    connectionId: creds.connection_id,
    socketKey: "wrong-key",
    grace: 400,
    backoffInitial: 50,
  });
  let opened = false;
  gate.addEventListener("open", () => (opened = true));
  await next(gate, "expired");
  assert.equal(opened, false);
});

test("close codes map to the documented plans", () => {
  assert.equal(closePlan(1000), "stop");
  assert.equal(closePlan(4000), "stop");
  assert.equal(closePlan(4099), "stop");
  assert.equal(closePlan(4100), "backoff");
  assert.equal(closePlan(4101), "backoff");
  assert.equal(closePlan(1001), "backoff");
  assert.equal(closePlan(1006), "backoff");
  assert.equal(closePlan(1011), "backoff");
  assert.equal(closePlan(4200), "now");
  assert.equal(closePlan(4299), "now");
});

test("a socket cut while pushes are made gets every push once, in order, then live ones", async () => {
  const creds = await issue("room:recover");
  const tcp = await proxy();
  const gate = await open(creds, { url: tcp.url, backoffInitial: 50, backoffMax: 100, storage: null });
  const got = [];
  gate.on("room:recover", (payload, _channel, offset) => got.push([payload, offset]));
  await pushAll("room:recover", [1, 2, 3]);
  await until(() => got.length === 3);
  await tcp.pause();
  await next(gate, "close");
  await pushAll("room:recover", [4, 5, 6, 7, 8, 9, 10]); // while the socket is away
  const reopened = next(gate, "open");
  await tcp.resume();
  assert.deepEqual(await reopened, { resumed: true, recovered: true });
  await pushAll("room:recover", [11]);
  await until(() => got.length >= 11);
  assert.deepEqual(got, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11].map((n) => [n, n]));
  gate.close();
  tcp.close();
});

test("a position from a lost epoch is a gap event, and open says recovered: false", async () => {
  const creds = await issue("room:gap");
  await pushAll("room:gap", [1, 2]);
  const storage = memoryStorage();
  const url = `ws://${edge}/ws`;
  storage.setItem(`channelgate.positions:${url}`, JSON.stringify({ "room:gap": { epoch: "stale", offset: 9 } }));
  const gate = connect({ url, connectionId: creds.connection_id, socketKey: creds.socket_key, storage });
  const gap = next(gate, "gap");
  assert.deepEqual(await next(gate, "open"), { resumed: false, recovered: false });
  const detail = await gap;
  assert.equal(detail.channel, "room:gap");
  assert.equal(detail.offset, 2, "the channel's current position");
  assert.notEqual(detail.epoch, "stale");
  const payload = pushed(gate, "room:gap");
  await pushAll("room:gap", [3]);
  assert.equal(await payload, 3);
  gate.close();
});

test("positions kept in storage let a new page's credentials recover what was missed", async () => {
  const storage = memoryStorage();
  const url = `ws://${edge}/ws`;
  const first = await issue("room:refresh");
  const page1 = connect({ url, connectionId: first.connection_id, socketKey: first.socket_key, storage });
  await next(page1, "open");
  const seen = [];
  page1.on("room:refresh", (payload) => seen.push(payload));
  await pushAll("room:refresh", [1, 2]);
  await until(() => seen.length === 2);
  page1.close(); // the page goes away (its positions are saved)
  await pushAll("room:refresh", [3, 4, 5]); // while no page is open
  const second = await issue("room:refresh"); // the reloaded page's new credentials
  const page2 = connect({ url, connectionId: second.connection_id, socketKey: second.socket_key, storage });
  const again = [];
  page2.on("room:refresh", (payload) => again.push(payload));
  assert.deepEqual(await next(page2, "open"), { resumed: false, recovered: true });
  await until(() => again.length === 3);
  assert.deepEqual(again, [3, 4, 5]);
  page2.close();
});

test("pushes on a delta channel arrive as deltas and reach handlers byte for byte", async () => {
  const creds = await issue("state:game");
  const gate = await open(creds);
  const got = [];
  gate.on("state:game", (payload, channel, offset, raw) => got.push({ payload, offset, raw }));
  const doc = (tick) =>
    JSON.stringify({ tick, city: "Zürich — 😀", rows: Array.from({ length: 40 }, (_, i) => ({ i, v: i === tick ? tick : 0 })) }, null, 1);
  const docs = [1, 2, 3, 4].map(doc);
  for (const d of docs) await cli("push", "state:game", d);
  await until(() => got.length === 4);
  assert.deepEqual(got.map((g) => g.raw), docs, "the exact text of every payload");
  assert.deepEqual(got.map((g) => g.offset), [1, 2, 3, 4]);
  assert.equal(got[3].payload.tick, 4);
  const metrics = await (await fetch(`http://${edge}/metrics`)).text();
  assert.match(metrics, /^channelgate_delta_frames_total [1-9]/m, "deltas went out");
  gate.close();
});

test("applyDelta refuses deltas that do not fit, and a bad delta is said and the channel recovered whole", async () => {
  const bytes = (s) => new TextEncoder().encode(s);
  assert.throws(() => applyDelta(bytes("hello"), bytes("5\n5@0,0;")), /checksum/);
  assert.throws(() => applyDelta(bytes("hello"), bytes("5\n9@0,")), /does not fit/);
  assert.throws(() => applyDelta(bytes("hello"), bytes("zz")), /malformed/);
  // A socket that hands the client a delta it has no base for, then one that does not check.
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      sockets.push(this);
      setTimeout(() => {
        this.readyState = 1;
        this.onopen?.();
      }, 0);
    }
    send() {}
    close(code) {
      this.readyState = 3;
      this.closedWith = code;
    }
  }
  const gate = connect({ url: "ws://fake/ws", connectionId: "c", socketKey: "k", WebSocket: FakeSocket, recover: false, storage: null });
  await next(gate, "open");
  assert.match(sockets[0].url, /[?&]delta=1/);
  const got = [];
  gate.on("s:1", (payload, channel, offset, raw) => got.push(raw));
  const bad = next(gate, "delta");
  sockets[0].onmessage({ data: '{"channel":"s:1","offset":7,"delta":"3\\n3:abc0;"}' });
  assert.deepEqual(await bad, { channel: "s:1", offset: 7, ok: false, reason: "no base: the previous push was not received" });
  assert.equal(sockets[0].closedWith, 4200, "the socket is dropped to reconnect at once");
  await next(gate, "open");
  sockets[1].onmessage({ data: '{"channel":"s:1","offset":8,"payload":{"a": 1}}' });
  const mismatch = next(gate, "delta");
  sockets[1].onmessage({ data: '{"channel":"s:1","offset":9,"delta":"8\\n8@0,0;"}' });
  assert.match((await mismatch).reason, /checksum/);
  assert.deepEqual(got, ['{"a": 1}'], "no handler saw a payload that did not check");
  gate.close();
});
