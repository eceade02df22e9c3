// The per-room cursor of client protocol v1 and the checks a client makes with it (pure
// logic, no I/O; see docs/PROTOCOL.md, "cursor", `prev`, `gap`, `more`).
//
// A cursor is `{ "<origin>": lastOffsetSeen }`. Per room and origin, offsets only grow, so
// the cursor is both the resume point (`sub` with `since`) and the dedupe key: a message at
// or below it was seen already. A message's `prev` names the previous message of the room
// from the same origin; a `prev` above the cursor means something in between never arrived
// (a hole), and the client resubscribes from its cursor instead of moving past it.
//
// Start with `RoomCursor.check`, which classifies one `msg` frame.

/** Largest offset a cursor accepts (Kafka offsets are 63-bit; JSON numbers are exact to 2^53). */
const MAX_OFFSET = Number.MAX_SAFE_INTEGER;

/** Is `n` a valid offset (a non-negative safe integer)? */
export function isOffset(n) {
  return Number.isSafeInteger(n) && n >= 0 && n <= MAX_OFFSET;
}

/** A cursor object with only valid entries (origin strings to offsets), from anything. */
export function sanitizeCursor(value) {
  const out = {};
  if (value === null || typeof value !== "object" || Array.isArray(value)) return out;
  for (const [origin, offset] of Object.entries(value)) {
    if (origin.length > 0 && origin.length <= 128 && isOffset(offset)) out[origin] = offset;
  }
  return out;
}

/**
 * Checks the shape of a `msg` frame: `room` and `origin` strings, `offset` an offset,
 * `prev` an offset below `offset` or `null`. Returns an error text, or `null` when it is fine.
 */
export function malformedMessage(m) {
  if (typeof m.room !== "string" || m.room.length === 0) return "msg without a room";
  if (typeof m.origin !== "string" || m.origin.length === 0) return "msg without an origin";
  if (!isOffset(m.offset)) return "msg with a bad offset";
  if (m.prev !== null && !(isOffset(m.prev) && m.prev < m.offset)) return "msg with a bad prev";
  return null;
}

/** What to do with a message: show it, drop it as seen, or resubscribe (a hole before it). */
export const Verdict = Object.freeze({
  DELIVER: "deliver",
  DUPLICATE: "duplicate",
  HOLE: "hole",
});

/** One room's cursor, with the origins whose next `prev` cannot be checked after a `gap`. */
export class RoomCursor {
  constructor(initial) {
    this.offsets = sanitizeCursor(initial);
    this.gapped = new Set();
  }

  /** A copy of the cursor, for `since` and for storage. */
  snapshot() {
    return { ...this.offsets };
  }

  /** The last offset seen from `origin`, or `undefined`. */
  last(origin) {
    return Object.hasOwn(this.offsets, origin) ? this.offsets[origin] : undefined;
  }

  /**
   * Classifies a well-formed `msg` frame (see `malformedMessage`) without changing anything:
   * - DUPLICATE: its offset is at or below the cursor (seen already);
   * - HOLE: its `prev` is above the cursor: a message of this origin in between is missing;
   * - DELIVER: new, and nothing is missing before it (or that cannot be known: the origin
   *   is not in the cursor yet, or a `gap` was announced just before).
   */
  check(m) {
    const last = this.last(m.origin);
    if (last !== undefined && m.offset <= last) return Verdict.DUPLICATE;
    if (last !== undefined && m.prev !== null && m.prev > last && !this.gapped.has(m.origin)) {
      return Verdict.HOLE;
    }
    return Verdict.DELIVER;
  }

  /** Records a delivered message. */
  advance(m) {
    this.offsets[m.origin] = m.offset;
    this.gapped.delete(m.origin);
  }

  /**
   * Raises the cursor to `cursor` where that is ahead (a `more` frame's cursor), or only
   * fills origins it lacks (`onlyMissing`, for a `synced` cursor). Returns whether it changed.
   */
  merge(cursor, { onlyMissing = false } = {}) {
    let changed = false;
    for (const [origin, offset] of Object.entries(sanitizeCursor(cursor))) {
      const last = this.last(origin);
      if (last === undefined || (!onlyMissing && offset > last)) {
        this.offsets[origin] = offset;
        changed = true;
      }
    }
    return changed;
  }

  /**
   * A `gap` frame: offsets `from..=to` of `origin` can no longer be served. The cursor moves
   * to `to` (nothing at or below it will come), and the next message's `prev` from that
   * origin is not checked (it may name a message inside the gap).
   */
  gap(origin, to) {
    if (typeof origin !== "string" || !isOffset(to)) return false;
    const last = this.last(origin);
    if (last === undefined || to > last) this.offsets[origin] = to;
    this.gapped.add(origin);
    return true;
  }
}
