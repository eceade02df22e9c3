// Unit tests of the reconnect policy (reconnect.js): backoff bounds, failover order.
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, attemptIndex, planAttempt, DEFAULT_RECONNECT } from "../src/reconnect.js";

const policy = { initialMs: 100, maxMs: 1_000, attemptsPerRegion: 2 };

test("backoff doubles up to the cap, jittered between half and all of it", () => {
  assert.equal(backoffDelay(0, policy, () => 0), 50);
  assert.equal(backoffDelay(0, policy, () => 0.999999), 100);
  assert.equal(backoffDelay(1, policy, () => 0), 100);
  assert.equal(backoffDelay(3, policy, () => 0), 400);
  assert.equal(backoffDelay(4, policy, () => 0.999999), 1_000);
  assert.equal(backoffDelay(500, policy, () => 0), 500, "huge attempt counts stay capped");
  for (let a = 0; a < 20; a++) {
    const d = backoffDelay(a, policy);
    assert.ok(d >= 50 && d <= 1_000, `attempt ${a}: ${d}`);
  }
});

test("each region is tried attemptsPerRegion times, in list order from the lost one, wrapping", () => {
  const order = [0, 1, 2, 3, 4, 5, 6].map((a) => attemptIndex(1, a, 3, policy));
  assert.deepEqual(order, [1, 1, 2, 2, 0, 0, 1]);
  assert.deepEqual([0, 1, 2].map((a) => attemptIndex(0, a, 1, policy)), [0, 0, 0]);
  assert.deepEqual([0, 1, 2].map((a) => attemptIndex(0, a, 2, { attemptsPerRegion: 0 })), [0, 1, 0]);
});

test("planAttempt combines both, with sane defaults", () => {
  assert.deepEqual(planAttempt(0, 2, 2, policy, () => 0), { index: 1, delayMs: 200 });
  const p = planAttempt(0, 0, 2, DEFAULT_RECONNECT);
  assert.equal(p.index, 0);
  assert.ok(p.delayMs <= DEFAULT_RECONNECT.initialMs);
});
