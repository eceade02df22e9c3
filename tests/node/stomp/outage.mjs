// RECEIPT only after the durable append: node outage.mjs <stomp url> <room> <sync dir>
// Sends one message with a receipt (Kafka up: RECEIPT), writes <sync dir>/ready, waits for
// <sync dir>/go (the test stopped Kafka), sends another with a receipt and reports what
// came back: RESULT {before, during, error, close, errorAfterMs}.
import { existsSync, writeFileSync } from 'node:fs';
import { connect, record, send, until, out, fail } from './lib.mjs';

const [url, room, syncDir] = process.argv.slice(2);
const session = await connect(url, { login: 'scribe' }).catch((e) => fail(`connect: ${e.message}`));
record(session);
const { client, events } = session;
const dest = `/pub/chat/room/${room}`;
const before = await Promise.race([
  send(client, dest, 'before the outage'),
  until('a RECEIPT', 20000, () => false).catch(() => null),
]);
if (!before) fail(`no RECEIPT while Kafka is up: ${JSON.stringify(events)}`);
writeFileSync(`${syncDir}/ready`, 'yes');
await until('the go file', 60000, () => existsSync(`${syncDir}/go`)).catch((e) => fail(e.message));
const started = Date.now();
let during = null;
client.watchForReceipt('during-1', (f) => { during = f.headers; });
client.publish({ destination: dest, body: 'during the outage', headers: { receipt: 'during-1' } });
await until('the ERROR and the close', 30000, () => events.close || during).catch((e) => fail(e.message));
const error = events.errors[0] ?? null;
out('RESULT', { before, during, error, close: events.close, errorAfterMs: events.close ? events.close.at - started : null });
process.exit(0);
