// Where cursors are kept between connections and page loads: `memoryStore()` (a Map) or
// `localStorageStore()` (browsers; survives reloads). Any object with `load(room)` →
// cursor-or-null and `save(room, cursor)` will do; a store that throws is logged by the
// client and otherwise ignored (the cursor in memory stays authoritative).

/** Cursors in memory, for Node and for pages that should start fresh every load. */
export function memoryStore() {
  const cursors = new Map();
  return {
    load: (room) => (cursors.has(room) ? { ...cursors.get(room) } : null),
    save: (room, cursor) => {
      cursors.set(room, { ...cursor });
    },
  };
}

/**
 * Cursors in `localStorage` under `<prefix><room>` as JSON. Unreadable entries load as
 * `null`; a full or disabled storage (private mode) loses the saved copy, not the session.
 */
export function localStorageStore(prefix = "dtfed.cursor.", storage = globalThis.localStorage) {
  if (!storage) throw new Error("localStorage is not available here: use memoryStore()");
  return {
    load(room) {
      try {
        const text = storage.getItem(prefix + room);
        return text === null ? null : JSON.parse(text);
      } catch {
        return null;
      }
    },
    save(room, cursor) {
      storage.setItem(prefix + room, JSON.stringify(cursor));
    },
  };
}

/** `localStorageStore()` where there is a `localStorage`, else `memoryStore()`. */
export function defaultStore() {
  try {
    if (globalThis.localStorage) return localStorageStore();
  } catch {
    // Some browsers throw on access to localStorage when storage is disabled.
  }
  return memoryStore();
}
