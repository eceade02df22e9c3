// Shared by the @dtfed/client scripts: clients over the `ws` package, waiting, the control
// files the Rust test and a script coordinate through, and the check that a player's
// received messages are exactly the acknowledged ones, once each, chained by `prev`.
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import WebSocket from "ws";
import { DtfedClient, memoryStore } from "@dtfed/client";

/** A client for player `name` with the test's fast timers; it records what it sees. */
export function player(name, urls, extra = {}) {
  const client = new DtfedClient({
    urls,
    name,
    WebSocket,
    store: memoryStore(),
    reconnect: { initialMs: 100, maxMs: 1_000, attemptsPerRegion: 2 },
    probeIntervalMs: 1_000,
    pingIntervalMs: 2_000,
    ...extra,
  });
  const seen = { client, name, messages: [], states: [], synced: 0, gaps: [], resyncs: [] };
  client.on("message", (m) => seen.messages.push(m));
  client.on("state", (s) => {
    seen.states.push(s);
    if (s.state === "open") log(`${name} open on ${s.url} (index ${s.index})`);
  });
  client.on("synced", () => seen.synced++);
  client.on("gap", (g) => seen.gaps.push(g));
  client.on("resync", (r) => seen.resyncs.push(r));
  client.on("error", (e) => log(`${name} error ${e.code}: ${e.message}`));
  return seen;
}

export function log(text) {
  process.stdout.write(`${new Date().toISOString()} ${text}\n`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `predicate` every 20 ms until it holds; throws `what` after `timeoutMs`. */
export async function waitFor(what, predicate, timeoutMs = 30_000) {
  const end = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** Tells the Rust side `name` happened (a file in CONTROL_DIR). */
export function signal(name) {
  writeFileSync(join(process.env.CONTROL_DIR, name), `${Date.now()}\n`);
  log(`control: wrote ${name}`);
}

/** Waits for the Rust side to write `name` in CONTROL_DIR. */
export async function waitSignal(name, timeoutMs = 60_000) {
  await waitFor(`control file ${name}`, () => existsSync(join(process.env.CONTROL_DIR, name)), timeoutMs);
  log(`control: saw ${name}`);
}

const id = (m) => `${m.origin}:${m.offset}`;

/** The acknowledged messages of `room` that `p` has not received, as ids. */
export function missing(p, room, acked) {
  const got = new Set(p.messages.filter((m) => m.room === room).map(id));
  return acked.filter((a) => !got.has(id(a))).map((a) => `${id(a)} (${a.who} #${a.n})`);
}

/**
 * Has `p` received every acknowledged message (`acked`: `{origin, offset}`) of `room`?
 */
export function hasAll(p, room, acked) {
  const got = new Set(p.messages.filter((m) => m.room === room).map(id));
  return acked.every((a) => got.has(id(a)));
}

/**
 * Throws unless `p` received exactly the `acked` messages of `room` (a fresh room), each once,
 * in offset order per origin, each `prev` naming the previous one from its origin. With
 * `mayRepeat(body)`, a message no ack names is allowed when `mayRepeat` says its body may
 * have been stored twice (a publish in flight when its region crashed), at most twice.
 */
export function checkExactlyOnce(p, room, acked, mayRepeat = () => false) {
  const msgs = p.messages.filter((m) => m.room === room);
  const want = new Set(acked.map(id));
  const seenIds = new Set();
  const lastByOrigin = new Map();
  const copies = new Map();
  for (const m of msgs) {
    const k = id(m);
    if (seenIds.has(k)) throw new Error(`${p.name} got ${k} twice`);
    seenIds.add(k);
    if (!want.has(k) && !mayRepeat(m.body)) {
      throw new Error(`${p.name} got ${k} (${JSON.stringify(m.body)}), which no publish was acked for: a duplicate or a stranger`);
    }
    const last = lastByOrigin.has(m.origin) ? lastByOrigin.get(m.origin) : null;
    if (m.prev !== last) throw new Error(`${p.name}: ${k} has prev ${m.prev}, the previous one from ${m.origin} was ${last}`);
    lastByOrigin.set(m.origin, m.offset);
    const b = `${m.body.who}#${m.body.n}`;
    copies.set(b, (copies.get(b) ?? 0) + 1);
    if (copies.get(b) > (mayRepeat(m.body) ? 2 : 1)) throw new Error(`${p.name}: ${b} arrived ${copies.get(b)} times`);
  }
  for (const k of want) if (!seenIds.has(k)) throw new Error(`${p.name} missed ${k}`);
  return msgs.length - copies.size; // how many bodies came twice
}
