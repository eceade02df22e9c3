// Heart-beats over an idle connection: node idle.mjs <stomp url> <room> <idle ms> <hb out> <hb in>
// Connects with heart-beat "<hb out>,<hb in>", subscribes, stays silent (no frame but
// heart-beats) for <idle ms>, then sends with a receipt and waits for its own message.
// Prints RESULT {heartbeats, heartbeatLost, close, echoed}.
import { connect, record, subscribe, send, describe, until, sleep, out, fail } from './lib.mjs';

const [url, room, idleMs, hbOut, hbIn] = process.argv.slice(2);
const session = await connect(url, { login: 'idler', heartbeat: [Number(hbOut), Number(hbIn)] })
  .catch((e) => fail(`connect: ${e.message}`));
record(session);
const { client, connected, events } = session;
out('CONNECTED', connected.headers);
const got = [];
await subscribe(client, `/sub/chat/room/${room}`, (m) => got.push(describe(m)), { id: 'idle-1' });
const started = Date.now();
await sleep(Number(idleMs));
const idleFor = Date.now() - started;
if (events.close) fail(`closed while idle: ${JSON.stringify(events)}`);
const receipt = await Promise.race([
  send(client, `/pub/chat/room/${room}`, 'still here'),
  sleep(10000).then(() => null),
]);
if (!receipt) fail(`no RECEIPT after the idle time: ${JSON.stringify(events)}`);
await until('the echo', 10000, () => got.find((m) => m.body === 'still here')).catch((e) => fail(e.message));
out('RESULT', { idleFor, heartbeats: events.heartbeats, heartbeatLost: events.heartbeatLost, close: events.close, errors: events.errors });
await client.deactivate();
process.exit(0);
