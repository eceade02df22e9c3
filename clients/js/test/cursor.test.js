// Unit tests of the cursor checks (cursor.js): dedupe, hole detection, gaps, merges.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RoomCursor, Verdict, sanitizeCursor, malformedMessage } from "../src/cursor.js";

const msg = (origin, offset, prev) => ({ room: "r", origin, offset, prev });

test("a new origin is delivered whatever its prev, then chained", () => {
  const c = new RoomCursor();
  assert.equal(c.check(msg("seoul", 7, 3)), Verdict.DELIVER);
  c.advance(msg("seoul", 7, 3));
  assert.equal(c.check(msg("seoul", 9, 7)), Verdict.DELIVER);
  c.advance(msg("seoul", 9, 7));
  assert.deepEqual(c.snapshot(), { seoul: 9 });
});

test("at or below the cursor is a duplicate, per origin", () => {
  const c = new RoomCursor({ seoul: 10, tokyo: 2 });
  assert.equal(c.check(msg("seoul", 10, 8)), Verdict.DUPLICATE);
  assert.equal(c.check(msg("seoul", 4, null)), Verdict.DUPLICATE);
  assert.equal(c.check(msg("tokyo", 3, 2)), Verdict.DELIVER);
  assert.equal(c.check(msg("tokyo", 2, 1)), Verdict.DUPLICATE);
});

test("a prev above the cursor is a hole and does not move the cursor", () => {
  const c = new RoomCursor({ seoul: 10 });
  assert.equal(c.check(msg("seoul", 14, 12)), Verdict.HOLE);
  assert.deepEqual(c.snapshot(), { seoul: 10 });
  // the message that fills it, then the held one
  assert.equal(c.check(msg("seoul", 12, 10)), Verdict.DELIVER);
  c.advance(msg("seoul", 12, 10));
  assert.equal(c.check(msg("seoul", 14, 12)), Verdict.DELIVER);
});

test("a prev below the cursor (the cursor named a non-message offset) is not a hole", () => {
  // A `more` cursor may name an offset that is not a message of the room.
  const c = new RoomCursor({ seoul: 20 });
  assert.equal(c.check(msg("seoul", 25, 17)), Verdict.DELIVER);
  assert.equal(c.check(msg("seoul", 25, null)), Verdict.DELIVER);
});

test("after a gap the cursor skips it and the next prev is not checked", () => {
  const c = new RoomCursor({ seoul: 3 });
  assert.equal(c.gap("seoul", 50), true);
  assert.deepEqual(c.snapshot(), { seoul: 50 });
  assert.equal(c.check(msg("seoul", 40, 39)), Verdict.DUPLICATE);
  assert.equal(c.check(msg("seoul", 60, 55)), Verdict.DELIVER);
  c.advance(msg("seoul", 60, 55));
  assert.equal(c.check(msg("seoul", 70, 65)), Verdict.HOLE, "only the first prev after a gap is exempt");
  assert.equal(c.gap("seoul", -1), false);
  assert.equal(c.gap(7, 3), false);
});

test("a gap below the cursor leaves the cursor", () => {
  const c = new RoomCursor({ seoul: 80 });
  c.gap("seoul", 50);
  assert.deepEqual(c.snapshot(), { seoul: 80 });
});

test("merge raises, or only fills missing origins", () => {
  const c = new RoomCursor({ seoul: 5, tokyo: 9 });
  assert.equal(c.merge({ seoul: 7, tokyo: 3, frankfurt: 1 }), true);
  assert.deepEqual(c.snapshot(), { seoul: 7, tokyo: 9, frankfurt: 1 });
  assert.equal(c.merge({ seoul: 100, paris: 4 }, { onlyMissing: true }), true);
  assert.deepEqual(c.snapshot(), { seoul: 7, tokyo: 9, frankfurt: 1, paris: 4 });
  assert.equal(c.merge({ seoul: 1 }), false);
});

test("sanitizeCursor keeps only origin → offset entries", () => {
  assert.deepEqual(sanitizeCursor(null), {});
  assert.deepEqual(sanitizeCursor([1, 2]), {});
  assert.deepEqual(sanitizeCursor("x"), {});
  assert.deepEqual(
    sanitizeCursor({ a: 1, b: -1, c: 1.5, d: "3", e: 2 ** 60, "": 4, f: 0 }),
    { a: 1, f: 0 },
  );
  const c = new RoomCursor({ a: "junk", b: 2 });
  assert.deepEqual(c.snapshot(), { b: 2 });
});

test("malformedMessage names what is wrong", () => {
  assert.equal(malformedMessage({ room: "r", origin: "o", offset: 3, prev: null }), null);
  assert.equal(malformedMessage({ room: "r", origin: "o", offset: 3, prev: 2 }), null);
  assert.match(malformedMessage({ origin: "o", offset: 3, prev: null }), /room/);
  assert.match(malformedMessage({ room: "r", offset: 3, prev: null }), /origin/);
  assert.match(malformedMessage({ room: "r", origin: "o", offset: -3, prev: null }), /offset/);
  assert.match(malformedMessage({ room: "r", origin: "o", offset: 3, prev: 3 }), /prev/);
  assert.match(malformedMessage({ room: "r", origin: "o", offset: 3 }), /prev/);
});
