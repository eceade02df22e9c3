// A STOMP player in a room with a v1 player (driven by the Rust test):
// node chat.mjs <stomp url> <room id> <sync dir> <peer name> <peer messages>
// Connects (login or passcode from env LOGIN / PASSCODE), subscribes to
// /sub/chat/room/<room>, writes <sync dir>/subscribed, sends three messages with receipts
// (JSON, plain text, JSON), then waits for its own three and <peer messages> from <peer>;
// prints CONNECTED, every RECEIPT and every MESSAGE in arrival order, then disconnects.
import { writeFileSync } from 'node:fs';
import { connect, record, subscribe, send, describe, until, out, fail } from './lib.mjs';

const [url, room, syncDir, peer, peerCount] = process.argv.slice(2);
const me = process.env.LOGIN ?? 'alice';
const session = await connect(url, {
  login: me,
  passcode: process.env.PASSCODE,
}).catch((e) => fail(`connect: ${e.message} ${JSON.stringify(e.events)}`));
record(session);
const { client, connected, ws, events } = session;
out('CONNECTED', { protocol: ws.protocol, headers: connected.headers });

const got = [];
const destination = `/sub/chat/room/${room}`;
await subscribe(client, destination, (m) => got.push(describe(m)), { id: 'chat-1' });
writeFileSync(`${syncDir}/subscribed`, 'yes');

const pub = `/pub/chat/room/${room}`;
const receipts = [];
receipts.push(await send(client, pub, JSON.stringify({ text: 'one', n: 1 }), { 'content-type': 'application/json' }));
receipts.push(await send(client, pub, 'two: plain text, with a colon'));
receipts.push(await send(client, pub, JSON.stringify({ text: 'three', n: 3 }), { 'content-type': 'application/json' }));
for (const r of receipts) out('RECEIPT', r);

const want = Number(peerCount);
await until('every message', 20000, () =>
  got.filter((m) => m.from === me).length >= 3 && got.filter((m) => m.from === peer).length >= want,
).catch((e) => fail(`${e.message}; got ${JSON.stringify(got)} events ${JSON.stringify(events)}`));
for (const m of got) out('MESSAGE', m);
if (events.errors.length) fail(`ERROR frames: ${JSON.stringify(events.errors)}`);
await client.deactivate();
out('RESULT', { messages: got.length });
process.exit(0);
