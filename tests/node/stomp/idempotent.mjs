// Idempotent sends with dtfed-ref: node idempotent.mjs <stomp url> <room>
// Sends "roll 1d20" with dtfed-ref r-1 twice (the retry of a send whose RECEIPT was lost),
// then the same body with dtfed-ref r-2 (another message); prints RESULT {receipts}.
import { connect, record, send, out, fail } from './lib.mjs';

const [url, room] = process.argv.slice(2);
const session = await connect(url, { login: 'dice' }).catch((e) => fail(`connect: ${e.message}`));
record(session);
const dest = `/pub/chat/room/${room}`;
const receipts = [];
for (const ref of ['r-1', 'r-1', 'r-2']) {
  receipts.push(await send(session.client, dest, 'roll 1d20', { 'dtfed-ref': ref }));
}
if (session.events.errors.length) fail(`ERROR frames: ${JSON.stringify(session.events.errors)}`);
out('RESULT', { receipts });
await session.client.deactivate();
process.exit(0);
