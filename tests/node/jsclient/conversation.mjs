// A conversation across two regions with @dtfed/client: alice on region A, bob on region
// B, each publishing in turn. Each must get every acknowledged message exactly once, in
// order, the other's marked with the other region as origin.
// Env: URL_A, URL_B (ws://.../ws), REGION_A, REGION_B, ROOM. Prints "ok" last on success.
import { player, log, waitFor, checkExactlyOnce, hasAll } from "./lib.mjs";

const { URL_A, URL_B, REGION_A, REGION_B, ROOM } = process.env;
const alice = player("alice", [URL_A, URL_B]);
const bob = player("bob", [URL_B, URL_A]);
const acked = [];
try {
  for (const p of [alice, bob]) {
    p.client.subscribe(ROOM);
    p.client.connect();
  }
  await waitFor("both synced", () => alice.synced > 0 && bob.synced > 0);
  for (let n = 0; n < 10; n++) {
    for (const p of [alice, bob]) {
      const ack = await p.client.publish(ROOM, { who: p.name, n, text: `${p.name} says ${n}` });
      acked.push({ ...ack, who: p.name });
    }
  }
  const origins = new Set(acked.map((a) => `${a.who}@${a.origin}`));
  if (!origins.has(`alice@${REGION_A}`) || !origins.has(`bob@${REGION_B}`) || origins.size !== 2) {
    throw new Error(`acks came from the wrong regions: ${[...origins]}`);
  }
  await waitFor("both have every message", () => hasAll(alice, ROOM, acked) && hasAll(bob, ROOM, acked));
  for (const p of [alice, bob]) checkExactlyOnce(p, ROOM, acked);
  const fromBob = alice.messages.find((m) => m.from === "bob");
  if (fromBob.origin !== REGION_B) throw new Error(`alice saw bob's message with origin ${fromBob.origin}`);
  if (alice.client.region !== REGION_A || bob.client.region !== REGION_B) throw new Error("region names from acks are wrong");
  log(`ok: ${acked.length} messages, each seen once by both, in order`);
} catch (e) {
  log(`FAILED: ${e.stack}`);
  process.exitCode = 1;
} finally {
  alice.client.close();
  bob.client.close();
}
