// Unit tests of DtfedClient against a scripted WebSocket (no network): what it sends on
// open, holes, `more`, `gap`, duplicates, publish retries and failover order. The same
// behaviour against real daemons is tests/tests/js_client.rs in the repository.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DtfedClient, DtfedError, memoryStore } from "../src/index.js";

/** A fake WebSocket: records what the client sends; the test opens, speaks and closes it. */
function fakeSockets() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close() {
      this.readyState = 3;
    }
    // test side
    open() {
      this.readyState = 1;
      this.onopen?.();
    }
    say(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code, reason: "" });
    }
    take() {
      const s = this.sent;
      this.sent = [];
      return s;
    }
  }
  return { sockets, FakeSocket };
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const URLS = ["ws://a.test/ws", "ws://b.test/ws"];
const msg = (offset, prev, origin = "a") => ({ op: "msg", room: "t", origin, offset, prev, ts: 1, from: "x", body: { n: offset } });

function setup(extra = {}) {
  const { sockets, FakeSocket } = fakeSockets();
  const store = memoryStore();
  const client = new DtfedClient({
    urls: URLS,
    name: "ann",
    WebSocket: FakeSocket,
    store,
    reconnect: { initialMs: 2, maxMs: 4, attemptsPerRegion: 2 },
    probeIntervalMs: 5,
    ...extra,
  });
  const seen = { messages: [], gaps: [], resyncs: [], states: [], watermarks: [] };
  client.on("message", (m) => seen.messages.push(m));
  client.on("gap", (g) => seen.gaps.push(g));
  client.on("resync", (r) => seen.resyncs.push(r));
  client.on("state", (s) => seen.states.push(s));
  client.on("watermark", (w) => seen.watermarks.push(w));
  return { client, sockets, store, seen };
}

/** Waits until `n` sockets exist. */
async function socketCount(sockets, n) {
  for (let i = 0; i < 500 && sockets.length < n; i++) await tick(1);
  assert.equal(sockets.length, n);
  return sockets[n - 1];
}

test("subscribes with the stored cursor, drops duplicates, resubscribes on a hole", async () => {
  const { client, sockets, store, seen } = setup();
  store.save("t", { a: 4 });
  client.subscribe("t");
  client.connect();
  const ws = await socketCount(sockets, 1);
  assert.equal(ws.url, "ws://a.test/ws?name=ann");
  ws.open();
  assert.deepEqual(ws.take(), [{ op: "sub", room: "t", since: { a: 4 } }]);
  ws.say(msg(4, 3)); // seen already
  ws.say(msg(5, 4));
  ws.say({ op: "synced", room: "t", cursor: { a: 5 } });
  ws.say(msg(9, 7)); // 7 never arrived
  assert.deepEqual(ws.take(), [{ op: "unsub", room: "t" }, { op: "sub", room: "t", since: { a: 5 } }]);
  ws.say(msg(12, 9)); // a stale live frame while resyncing: dropped, no second resync
  assert.deepEqual(ws.take(), []);
  ws.say(msg(7, 5));
  ws.say(msg(9, 7));
  ws.say(msg(12, 9));
  ws.say({ op: "synced", room: "t", cursor: { a: 12 } });
  assert.deepEqual(seen.messages.map((m) => m.offset), [5, 7, 9, 12]);
  assert.equal(client.stats.duplicates, 1);
  assert.equal(seen.resyncs.length, 1);
  assert.deepEqual(store.load("t"), { a: 12 });
  client.close();
});

test("more continues from its cursor; gap moves past and is reported; wm is surfaced", async () => {
  const { client, sockets, seen } = setup();
  client.subscribe("t");
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  assert.deepEqual(ws.take(), [{ op: "sub", room: "t", since: {} }]);
  ws.say(msg(1, null));
  ws.say({ op: "more", room: "t", cursor: { a: 3, b: 8 } });
  assert.deepEqual(ws.take(), [{ op: "sub", room: "t", since: { a: 3, b: 8 } }]);
  ws.say(msg(6, 3)); // prev is the more cursor's offset, not a message: fine
  ws.say({ op: "gap", room: "t", origin: "b", from: 9, to: 20 });
  ws.say(msg(25, 14, "b")); // prev inside the gap: not a hole
  assert.deepEqual(seen.messages.map((m) => `${m.origin}${m.offset}`), ["a1", "a6", "b25"]);
  assert.deepEqual(seen.gaps, [{ room: "t", origin: "b", from: 9, to: 20 }]);
  assert.equal(seen.resyncs.length, 0);
  client.close();
});

test("watermarks: synced gives every origin, wm frames merge the ones that changed", async () => {
  const { client, sockets, seen } = setup();
  client.subscribe("t");
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  ws.take();
  const up = { offset: 30, live: true, lag_ms: 0, since: 1000 };
  const c = { offset: 4, live: true, lag_ms: 0, since: 900 };
  ws.say({ op: "synced", room: "t", cursor: {}, origins: { b: up, c } });
  assert.deepEqual(client.watermarks("t"), { b: up, c });
  const down = { offset: 30, live: false, lag_ms: 1500, since: 5000 };
  ws.say({ op: "wm", room: "t", origins: { b: down } });
  assert.deepEqual(client.watermarks("t"), { b: down, c });
  assert.deepEqual(seen.watermarks, [
    { room: "t", origins: { b: up, c }, changed: { b: up, c } },
    { room: "t", origins: { b: down, c }, changed: { b: down } },
  ]);
  // Malformed marks and other rooms' frames change nothing.
  ws.say({ op: "wm", room: "t", origins: { b: { offset: "x", live: true } } });
  ws.say({ op: "wm", room: "elsewhere", origins: { b: up } });
  ws.say({ op: "wm", room: "t", origins: [1] });
  assert.deepEqual(client.watermarks("t"), { b: down, c });
  // A synced without origins (a region that mirrors nothing) forgets them, and says so.
  ws.say({ op: "synced", room: "t", cursor: {} });
  assert.deepEqual(client.watermarks("t"), {});
  assert.equal(seen.watermarks.length, 3);
  assert.deepEqual(seen.watermarks[2], { room: "t", origins: {}, changed: {} });
  client.close();
});

test("malformed frames and frames of rooms not joined are ignored", async () => {
  const { client, sockets, seen } = setup();
  client.subscribe("t");
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  ws.onmessage({ data: "not json" });
  ws.onmessage({ data: "null" });
  ws.say({ ...msg(3, null), offset: "3" });
  ws.say({ ...msg(3, null), room: "other" });
  ws.say({ ...msg(3, 3) });
  ws.say({ op: "future-op" });
  assert.deepEqual(seen.messages, []);
  client.close();
});

test("a publish is resent with the same ref after a reconnect, and resolves on its ack", async () => {
  const { client, sockets } = setup();
  client.connect();
  const ws1 = await socketCount(sockets, 1);
  ws1.open();
  const p = client.publish("t", { text: "hi" });
  const [pub] = ws1.take();
  assert.equal(pub.op, "pub");
  ws1.drop();
  const ws2 = await socketCount(sockets, 2);
  assert.equal(ws2.url, "ws://a.test/ws?name=ann", "the same region first");
  ws2.open();
  const [again] = ws2.take();
  assert.deepEqual(again, pub);
  ws2.say({ op: "ack", ref: pub.ref, room: "t", origin: "a", offset: 41 });
  assert.deepEqual(await p, { room: "t", origin: "a", offset: 41 });
  assert.equal(client.region, "a");
  const bad = client.publish("t", { text: "x".repeat(10) });
  const [pub2] = ws2.take();
  ws2.say({ op: "error", code: "too_large", message: "too big", ref: pub2.ref });
  await assert.rejects(bad, (e) => e instanceof DtfedError && e.code === "too_large");
  client.close();
});

test("fails over after two failed retries, keeps the cursor, and probes its way back", async () => {
  const { client, sockets, seen } = setup();
  client.subscribe("t");
  client.connect();
  const a1 = await socketCount(sockets, 1);
  a1.open();
  a1.take();
  a1.say(msg(3, null));
  a1.drop(1001);
  (await socketCount(sockets, 2)).drop(); // a again: refused
  (await socketCount(sockets, 3)).drop(); // and again
  const b = await socketCount(sockets, 4);
  assert.equal(b.url, "ws://b.test/ws?name=ann");
  b.open();
  assert.deepEqual(b.take(), [{ op: "sub", room: "t", since: { a: 3 } }]);
  b.say({ op: "synced", room: "t", cursor: { a: 3 } });
  // The probe of a: it answers a ping with a pong.
  const probe = await socketCount(sockets, 5);
  assert.equal(probe.url, "ws://a.test/ws?name=ann");
  probe.open();
  assert.deepEqual(probe.take(), [{ op: "ping" }]);
  probe.say({ op: "pong" });
  const back = await socketCount(sockets, 6);
  assert.equal(back.url, "ws://a.test/ws?name=ann");
  assert.equal(b.readyState, 3, "the connection to b is closed");
  back.open();
  assert.deepEqual(back.take(), [{ op: "sub", room: "t", since: { a: 3 } }]);
  const opens = seen.states.filter((s) => s.state === "open").map((s) => s.index);
  assert.deepEqual(opens, [0, 1, 0]);
  assert.equal(client.stats.failovers, 1);
  client.close();
});

test("bad options are refused", () => {
  assert.throws(() => new DtfedClient({ urls: [] }), /urls/);
  assert.throws(() => new DtfedClient({ urls: ["http://x"] }), /ws:\/\//);
  assert.throws(() => new DtfedClient({ urls: URLS, WebSocket: {} }), /WebSocket/);
  const { client } = setup();
  assert.throws(() => client.subscribe("bad room"), /room/);
  for (let i = 0; i < 256; i++) client.subscribe(`r${i}`);
  assert.throws(() => client.subscribe("one-too-many"), /256/);
});

test("a connection silent for 2.5 ping intervals is dropped and replaced", async () => {
  const { client, sockets, seen } = setup({ pingIntervalMs: 10 });
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  await tick(15);
  assert.deepEqual(ws.take(), [{ op: "ping" }], "an application ping per interval");
  ws.say({ op: "pong" });
  const next = await socketCount(sockets, 2); // nothing more arrives: dropped
  assert.equal(ws.readyState, 3);
  assert.equal(next.url, "ws://a.test/ws?name=ann");
  assert.ok(seen.states.some((s) => s.state === "reconnecting" && s.reason === "silent"));
  client.close();
});

test("a token provider is asked again for every connection", async () => {
  let n = 0;
  const { client, sockets } = setup({ name: undefined, token: async () => `tok${++n}` });
  client.connect();
  const ws1 = await socketCount(sockets, 1);
  assert.equal(ws1.url, "ws://a.test/ws?token=tok1");
  ws1.open();
  ws1.drop(1008);
  const ws2 = await socketCount(sockets, 2);
  assert.equal(ws2.url, "ws://a.test/ws?token=tok2");
  client.close();
});

test("a fixed token that is refused ends the client; publishes are rejected", async () => {
  const { client, sockets, seen } = setup({ name: undefined, token: "t0k" });
  const errors = [];
  client.on("error", (e) => errors.push(e.code));
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  const p = client.publish("t", { text: "hi" });
  ws.drop(1008);
  await assert.rejects(p, (e) => e.code === "closed");
  assert.deepEqual(errors, ["unauthorized"]);
  assert.equal(seen.states.at(-1).state, "closed");
  await tick(20);
  assert.equal(sockets.length, 1, "no reconnect");
});

test("a sub answered unavailable is retried with the same cursor; a publish too, same ref", async () => {
  const { client, sockets } = setup({ retryDelayMs: 5 });
  client.subscribe("t");
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  ws.take();
  ws.say(msg(2, null));
  ws.say({ op: "error", code: "unavailable", message: "log busy" });
  const p = client.publish("t", 7);
  const [pub] = ws.take();
  ws.say({ op: "error", code: "unavailable", message: "no answer yet", ref: pub.ref });
  await tick(20);
  const again = ws.take();
  assert.deepEqual(again.filter((f) => f.op === "sub"), [{ op: "sub", room: "t", since: { a: 2 } }]);
  assert.deepEqual(again.filter((f) => f.op === "pub"), [pub]);
  ws.say({ op: "ack", ref: pub.ref, room: "t", origin: "a", offset: 3 });
  assert.equal((await p).offset, 3);
  client.close();
});

test("history none: a room without a cursor goes live only, then resumes from the synced cursor", async () => {
  const { client, sockets } = setup({ history: "none" });
  client.subscribe("t");
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  assert.deepEqual(ws.take(), [{ op: "sub", room: "t" }]);
  ws.say({ op: "synced", room: "t", cursor: { a: 17 } });
  assert.deepEqual(client.cursor("t"), { a: 17 });
  ws.say(msg(19, 17));
  ws.drop();
  const ws2 = await socketCount(sockets, 2);
  ws2.open();
  assert.deepEqual(ws2.take(), [{ op: "sub", room: "t", since: { a: 19 } }]);
  client.unsubscribe("t");
  assert.deepEqual(ws2.take(), [{ op: "unsub", room: "t" }]);
  ws2.say(msg(20, 19)); // in flight before the unsub: ignored
  client.close();
  await assert.rejects(client.publish("t", 1), (e) => e.code === "closed");
  assert.throws(() => client.connect(), /closed/);
});

test("a publish that closed the connection with 1009 is rejected, not resent forever", async () => {
  const { client, sockets } = setup();
  client.connect();
  const ws = await socketCount(sockets, 1);
  ws.open();
  const small = client.publish("t", "hi");
  const big = client.publish("t", "x".repeat(200_000));
  ws.take();
  ws.drop(1009);
  await assert.rejects(big, (e) => e.code === "too_large");
  const ws2 = await socketCount(sockets, 2);
  ws2.open();
  const resent = ws2.take();
  assert.deepEqual(resent.map((f) => f.body), ["hi"]);
  ws2.say({ op: "ack", ref: resent[0].ref, room: "t", origin: "a", offset: 1 });
  assert.equal((await small).offset, 1);
  client.close();
});
