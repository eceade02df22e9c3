// @dtfed/client: a browser and Node client for dtfed's client protocol v1 (see README.md).
// `DtfedClient` (client.js) is the client; cursor.js and reconnect.js hold its pure logic;
// stores.js the cursor stores.

export { DtfedClient, DtfedError } from "./client.js";
export { RoomCursor, Verdict, sanitizeCursor, malformedMessage } from "./cursor.js";
export { DEFAULT_RECONNECT, backoffDelay, attemptIndex, planAttempt } from "./reconnect.js";
export { memoryStore, localStorageStore, defaultStore } from "./stores.js";
