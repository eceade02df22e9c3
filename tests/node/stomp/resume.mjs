// Resume with dtfed-since: node resume.mjs <stomp url> <room> <cursor json|-> <count>
// Subscribes (with the dtfed-since header unless the cursor is "-"), waits for <count>
// messages and one more second for any extra, prints every MESSAGE and RESULT {cursor}:
// the cursor after them, built from dtfed-origin / dtfed-offset as a client keeps it.
// Env SYNC_DIR: write <SYNC_DIR>/subscribed once subscribed; WAIT_MS: how long to wait for
// the messages (default 15000).
import { writeFileSync } from 'node:fs';
import { connect, record, subscribe, describe, until, sleep, out, fail } from './lib.mjs';

const [url, room, since, count] = process.argv.slice(2);
const session = await connect(url, { login: 'resumer' }).catch((e) => fail(`connect: ${e.message}`));
record(session);
const got = [];
const headers = { id: 'r-1' };
if (since !== '-') headers['dtfed-since'] = since;
const { events } = session;
const refused = () => events.errors.length > 0;
await Promise.race([
  subscribe(session.client, `/sub/chat/room/${room}`, (m) => got.push(describe(m)), headers),
  until('an ERROR', 15000, refused).catch(() => {}),
]);
if (process.env.SYNC_DIR) writeFileSync(`${process.env.SYNC_DIR}/subscribed`, 'yes');
await until(`${count} messages`, Number(process.env.WAIT_MS ?? 15000), () => got.length >= Number(count) || refused()).catch((e) =>
  fail(`${e.message}; got ${JSON.stringify(got)}`),
);
if (refused()) fail(`ERROR frames: ${JSON.stringify(events.errors)}`);
await sleep(1000);
const cursor = {};
for (const m of got) {
  out('MESSAGE', m);
  if (m.origin && m.offset !== null) cursor[m.origin] = Math.max(cursor[m.origin] ?? -1, m.offset);
}
if (session.events.errors.length) fail(`ERROR frames: ${JSON.stringify(session.events.errors)}`);
await session.client.deactivate();
out('RESULT', { cursor, count: got.length });
process.exit(0);
