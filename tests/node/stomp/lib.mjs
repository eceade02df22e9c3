// Shared helpers for the STOMP scripts: a @stomp/stompjs Client over the `ws` package (Node
// 18 has no global WebSocket), promises for connect/receipt/error/close, and output.
// Every script prints what it saw as JSON lines on stdout (`RESULT {...}` last) and exits
// non-zero on failure; tests/tests/stomp.rs reads that output.
import { writeSync } from 'node:fs';
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

export const SUBPROTOCOLS = ['v12.stomp', 'v11.stomp', 'v10.stomp'];

export function fail(why) {
  writeSync(2, `FAIL ${why}\n`);
  process.exit(1);
}

/** One output line, written synchronously: `process.exit` drops what a pipe has not taken. */
export function out(kind, value) {
  writeSync(1, `${kind} ${JSON.stringify(value)}\n`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves with `pred()` once truthy, polling; rejects after `ms`. */
export async function until(what, ms, pred) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * Connects a stompjs Client; resolves { client, connected (the CONNECTED frame), ws, events }
 * once CONNECTED arrived. `events` records ERROR frames, the close and heart-beats.
 */
export function connect(url, { login, passcode, heartbeat = [10000, 10000], headers = {} } = {}) {
  const events = { errors: [], close: null, heartbeats: 0, heartbeatLost: 0 };
  let ws = null;
  const client = new Client({
    webSocketFactory: () => {
      ws = new WebSocket(url, SUBPROTOCOLS);
      return ws;
    },
    connectHeaders: {
      ...(login !== undefined ? { login } : {}),
      ...(passcode !== undefined ? { passcode } : {}),
      ...headers,
    },
    heartbeatOutgoing: heartbeat[0],
    heartbeatIncoming: heartbeat[1],
    reconnectDelay: 0,
    debug: (s) => {
      if (process.env.STOMP_DEBUG) console.error(s);
    },
  });
  client.onHeartbeatReceived = () => { events.heartbeats += 1; };
  client.onHeartbeatLost = () => { events.heartbeatLost += 1; };
  return new Promise((resolve, reject) => {
    client.onConnect = (frame) =>
      resolve({ client, connected: frame, ws, events });
    client.onStompError = (frame) => {
      events.errors.push({ headers: frame.headers, body: frame.body });
      reject(Object.assign(new Error(`ERROR ${frame.headers.message}`), { events }));
    };
    client.onWebSocketClose = (evt) => {
      events.close = { code: evt.code, reason: evt.reason, at: Date.now() };
      reject(Object.assign(new Error(`closed ${evt.code} before CONNECTED`), { events }));
    };
    client.activate();
  });
}

/** After connect: record later ERRORs and the close into `events` instead of rejecting. */
export function record(session) {
  const { client, events } = session;
  client.onStompError = (frame) => events.errors.push({ headers: frame.headers, body: frame.body });
  client.onWebSocketClose = (evt) => {
    events.close = { code: evt.code, reason: evt.reason, at: Date.now() };
  };
  client.onUnhandledMessage = (m) => out('UNHANDLED', m.headers);
}

/** A received MESSAGE as the scripts report it. */
export function describe(m) {
  const h = m.headers;
  return {
    destination: h.destination,
    subscription: h.subscription,
    messageId: h['message-id'],
    contentType: h['content-type'],
    origin: h['dtfed-origin'],
    offset: h['dtfed-offset'] === undefined ? null : Number(h['dtfed-offset']),
    prev: h['dtfed-prev'] === undefined ? null : Number(h['dtfed-prev']),
    from: h['dtfed-from'],
    ts: h['dtfed-ts'] === undefined ? null : Number(h['dtfed-ts']),
    gap: h['dtfed-gap'],
    body: m.body,
  };
}

/** Subscribes with a receipt; resolves once the RECEIPT came (the subscription is live). */
export function subscribe(client, destination, onMessage, headers = {}) {
  const receipt = `sub-${Math.random().toString(36).slice(2)}`;
  const done = new Promise((resolve) => client.watchForReceipt(receipt, resolve));
  const sub = client.subscribe(destination, onMessage, { ...headers, receipt });
  return done.then(() => sub);
}

/** Sends with a receipt; resolves with the RECEIPT frame's headers. */
export function send(client, destination, body, headers = {}) {
  const receipt = `send-${Math.random().toString(36).slice(2)}`;
  const done = new Promise((resolve) => client.watchForReceipt(receipt, (f) => resolve(f.headers)));
  client.publish({ destination, body, headers: { ...headers, receipt } });
  return done;
}
