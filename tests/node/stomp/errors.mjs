// A STOMP client that does one wrong thing and reports the ERROR and the close:
// node errors.mjs <stomp url> <case>
// cases: bad-destination, too-large <bytes>, rate <sends>, forbidden <room>, unauthorized,
//        bad-frame, shutdown <sync dir> (subscribe, write <sync dir>/ready, wait for the
//        server to close). LOGIN / PASSCODE from env. Prints RESULT {error, close, receipts}.
import { writeFileSync } from 'node:fs';
import WebSocket from 'ws';
import { connect, record, subscribe, send, out, fail, until, SUBPROTOCOLS } from './lib.mjs';

const [url, kind, arg] = process.argv.slice(2);
const auth = {
  login: process.env.LOGIN ?? 'mallory',
  passcode: process.env.PASSCODE,
  headers: process.env.BEARER ? { Authorization: `Bearer ${process.env.BEARER}` } : {},
};

async function finish(events, extra = {}) {
  await until('the close', 15000, () => events.close).catch((e) => fail(`${e.message}: ${JSON.stringify(events)}`));
  out('RESULT', { error: events.errors[0] ?? null, errors: events.errors.length, close: events.close, ...extra });
  process.exit(0);
}

if (kind === 'unauthorized') {
  try {
    await connect(url, auth);
    fail('CONNECT with bad credentials was accepted');
  } catch (e) {
    if (!e.events) fail(e.message);
    await finish(e.events);
  }
}

if (kind === 'bad-frame') {
  // Raw bytes no STOMP library would send: a header line without a colon.
  const ws = new WebSocket(url, SUBPROTOCOLS);
  const events = { errors: [], close: null };
  ws.on('message', (data) => {
    const text = data.toString();
    if (text.startsWith('ERROR')) events.errors.push({ raw: text });
  });
  ws.on('close', (code, reason) => { events.close = { code, reason: reason.toString() }; });
  await new Promise((r) => ws.on('open', r));
  ws.send(`CONNECT\naccept-version:1.2\nhost:x\nlogin:${auth.login}\n\n\0`);
  ws.send('SEND\ndestination /pub/chat/room/x\n\nhi\0');
  await finish(events);
}

const session = await connect(url, auth).catch((e) => fail(`connect: ${e.message}`));
record(session);
const { client, events } = session;
const receipts = [];

if (kind === 'bad-destination') {
  client.subscribe('/topic/nowhere', () => {}, { id: 'x', receipt: 'sub-x' });
} else if (kind === 'forbidden') {
  client.subscribe(`/sub/chat/room/${arg}`, () => {}, { id: 'x', receipt: 'sub-x' });
} else if (kind === 'shutdown') {
  await subscribe(client, '/sub/chat/room/lobby', () => {}, { id: 'lobby' });
  writeFileSync(`${arg}/ready`, 'yes');
  await until('the close', 30000, () => events.close).catch((e) => fail(e.message));
} else if (kind === 'too-large') {
  client.publish({ destination: '/pub/chat/room/big', body: 'x'.repeat(Number(arg)), headers: { receipt: 'big-1' } });
} else if (kind === 'rate') {
  for (let i = 0; i < Number(arg); i++) {
    client.publish({ destination: '/pub/chat/room/flood', body: `m${i}`, headers: { receipt: `r${i}` } });
  }
  client.onUnhandledReceipt = (f) => receipts.push(f.headers['receipt-id']);
} else {
  fail(`unknown case ${kind}`);
}
await finish(events, { receipts });
