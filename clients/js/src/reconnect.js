// Where and when to reconnect (pure logic, no I/O): jittered exponential backoff, and
// failover through the list of region URLs (nearest first).
//
// After a connection that was open drops, the client retries the same region
// `attemptsPerRegion` times, then moves on to the next URL of the list (wrapping around),
// with the same cursors. The delay doubles with every failed attempt up to `maxMs`, each
// drawn between half of it and all of it ("equal jitter"), so many clients dropped by one
// region do not all come back in the same millisecond. `planAttempt` is the whole policy.

/** Defaults for the reconnect policy. */
export const DEFAULT_RECONNECT = Object.freeze({
  initialMs: 250,
  maxMs: 10_000,
  attemptsPerRegion: 2,
});

/**
 * The delay before attempt number `attempt` (0 = the first retry after a drop):
 * `min(maxMs, initialMs * 2^attempt)`, drawn in [half, full] with `random()` in [0, 1).
 */
export function backoffDelay(attempt, { initialMs, maxMs }, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.round(cap / 2 + (cap / 2) * random());
}

/**
 * Which URL index to try for attempt number `attempt` since the connection at `fromIndex`
 * was lost, among `count` URLs: `attemptsPerRegion` tries at each, in list order from
 * `fromIndex`, wrapping around.
 */
export function attemptIndex(fromIndex, attempt, count, { attemptsPerRegion }) {
  const per = Math.max(1, attemptsPerRegion);
  return (fromIndex + Math.floor(attempt / per)) % count;
}

/** The next attempt: `{ index, delayMs }`. */
export function planAttempt(fromIndex, attempt, count, policy, random = Math.random) {
  return {
    index: attemptIndex(fromIndex, attempt, count, policy),
    delayMs: backoffDelay(attempt, policy, random),
  };
}
