// `DtfedClient`: one player's connection to dtfed over client protocol v1, that keeps its
// rooms and cursors across reconnects and regions (see README.md for usage and
// docs/PROTOCOL.md for the frames).
//
// Where to start: `connect()` opens a WebSocket to the nearest region (`urls[0]`);
// `#onOpen` resubscribes every room with its cursor and resends unacknowledged publishes;
// `#onFrame` handles what the server says (the cursor checks are in cursor.js); `#onLost`
// plans the next attempt with reconnect.js (backoff, then the next region); `#probe`
// looks for a better region while on a worse one and `#moveTo` goes back to it.

import { RoomCursor, Verdict, malformedMessage } from "./cursor.js";
import { DEFAULT_RECONNECT, planAttempt } from "./reconnect.js";
import { defaultStore } from "./stores.js";

/** A publish the server refused for good (`code` is a v1 error code), or that was abandoned. */
export class DtfedError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = "DtfedError";
    this.code = code;
  }
}

const OPEN = 1; // WebSocket.OPEN, the same in every implementation
const ROOM_RE = /^[A-Za-z0-9._:-]{1,128}$/;
/** Rooms one connection may be in (the server refuses more with `forbidden`). */
const MAX_ROOMS = 256;
/** Errors after which an unacknowledged publish is sent again, with the same `ref`. */
const RETRY_PUBLISH = new Set(["unavailable", "rate_limited"]);
/** Errors after which rooms still waiting for `synced` are subscribed again. */
const RETRY_SUB = new Set(["unavailable", "rate_limited"]);

const DEFAULTS = {
  name: undefined,
  token: undefined,
  WebSocket: undefined,
  store: undefined,
  reconnect: DEFAULT_RECONNECT,
  probeIntervalMs: 15_000,
  pingIntervalMs: 15_000,
  drainTimeoutMs: 5_000,
  retryDelayMs: 1_000,
  maxPending: 1_000,
  history: "all",
  logger: undefined,
};

/**
 * Options: `urls` (region WebSocket URLs, nearest first; required), `name` (auth "none") or
 * `token` (a JWT, or a function returning one or a promise of one, called per connection),
 * `WebSocket` (constructor; default the global one), `store` (cursor store; default
 * localStorage in browsers, memory elsewhere), `reconnect` (`{initialMs, maxMs,
 * attemptsPerRegion}`), `probeIntervalMs` (how often to look for a better region),
 * `pingIntervalMs` (application pings; a connection silent for 2.5 intervals is dropped),
 * `history` ("all": a room with no cursor replays what the region retains; "none": live
 * only), `maxPending` (publishes waiting for their ack).
 *
 * Events (`on(name, fn)`): `message` (a new message, in order per room and origin), `gap`,
 * `state` (`{state, url, index}`: connecting, open, reconnecting, closed), `synced`
 * (`{room, cursor}`), `resync` (a hole was seen: `{room, origin, prev, last}`),
 * `watermark` (`{room, origins, changed}`: the serving region's replication watermark of the
 * room per remote origin, `{offset, live, lag_ms, since}`, after `synced` and every `wm`
 * frame; `origins` is every origin known, `changed` those this frame named), `error`
 * (`{code, message}` not tied to a publish).
 */
export class DtfedClient {
  #opts;
  #WebSocket;
  #store;
  #handlers = new Map();
  #rooms = new Map(); // room -> { cursor: RoomCursor, live: bool, resyncing: bool, marks: {origin: mark} }
  #pending = new Map(); // ref -> { room, body, resolve, reject, sentOn }
  #refPrefix = Math.random().toString(36).slice(2, 10) + Date.now().toString(36);
  #refSeq = 0;
  #ws = null;
  #generation = 0; // bumped per socket, so events of an old socket are ignored
  #index = 0; // the URL index of the current (or next) connection
  #attempt = 0; // failed attempts since the last open connection
  #lostFrom = 0;
  #retryTimer = null;
  #pingTimer = null;
  #probeTimer = null;
  #subRetryTimer = null;
  #lastFrameAt = 0;
  #draining = false;
  #closed = true; // not connected: before connect(), or after close()
  #ended = false; // close() was called
  #region = null;
  stats = { duplicates: 0, holes: 0, failovers: 0, reconnects: 0 };

  constructor(opts) {
    const o = { ...DEFAULTS, ...opts, reconnect: { ...DEFAULT_RECONNECT, ...opts?.reconnect } };
    if (!Array.isArray(o.urls) || o.urls.length === 0) throw new TypeError("urls: a non-empty array of ws:// or wss:// URLs");
    for (const u of o.urls) {
      if (typeof u !== "string" || !/^wss?:\/\//.test(u)) throw new TypeError(`not a ws:// or wss:// URL: ${u}`);
    }
    if (o.history !== "all" && o.history !== "none") throw new TypeError('history: "all" or "none"');
    this.#WebSocket = o.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== "function") throw new TypeError("no WebSocket: pass the WebSocket option (e.g. the ws package in Node)");
    this.#store = o.store ?? defaultStore();
    this.#opts = o;
  }

  // ---- public API ----

  /** Registers `fn` for event `name`; returns a function that removes it. */
  on(name, fn) {
    if (!this.#handlers.has(name)) this.#handlers.set(name, new Set());
    this.#handlers.get(name).add(fn);
    return () => this.#handlers.get(name)?.delete(fn);
  }

  /** The URL of the region connected to (or being connected to). */
  get url() {
    return this.#opts.urls[this.#index];
  }

  /** The index in `urls` of that region (0 = the preferred one). */
  get index() {
    return this.#index;
  }

  /** The serving region's name, once an `ack` told it. */
  get region() {
    return this.#region;
  }

  /** Is the client connected and every room live? */
  get live() {
    return this.#ws?.readyState === OPEN && [...this.#rooms.values()].every((r) => r.live);
  }

  /** Starts connecting to the preferred region (`urls[0]`). */
  connect() {
    if (!this.#closed) return;
    if (this.#ended) throw new Error("this client was closed: make a new one");
    this.#closed = false;
    this.#open(0);
  }

  /** Closes for good: pending publishes are rejected (`closed`). */
  close() {
    this.#closed = true;
    this.#ended = true;
    this.#clearTimers();
    this.#dropSocket(1000, "client closed");
    for (const [ref, p] of this.#pending) {
      this.#pending.delete(ref);
      p.reject(new DtfedError("closed", "the client was closed before the ack"));
    }
    this.#emit("state", { state: "closed", url: this.url, index: this.#index });
  }

  /** Joins `room`, resuming from its stored cursor (at most 256 rooms). */
  subscribe(room) {
    if (typeof room !== "string" || !ROOM_RE.test(room)) throw new TypeError(`bad room id: ${room}`);
    if (this.#rooms.has(room)) return;
    if (this.#rooms.size >= MAX_ROOMS) throw new RangeError(`a connection is in at most ${MAX_ROOMS} rooms`);
    let saved = null;
    try {
      saved = this.#store.load(room);
    } catch (e) {
      this.#log("cursor store load failed", room, e);
    }
    this.#rooms.set(room, { cursor: new RoomCursor(saved), live: false, resyncing: false, fresh: saved === null, marks: {} });
    this.#sendSub(room);
  }

  /** Leaves `room` (its cursor stays in the store). */
  unsubscribe(room) {
    if (!this.#rooms.delete(room)) return;
    this.#send({ op: "unsub", room });
  }

  /**
   * The serving region's replication watermark of `room` per remote origin (`{offset, live,
   * lag_ms, since}`), as last told (`synced`, then `wm` frames); `{}` before that.
   */
  watermarks(room) {
    return { ...(this.#rooms.get(room)?.marks ?? {}) };
  }

  /** A copy of `room`'s cursor. */
  cursor(room) {
    return this.#rooms.get(room)?.cursor.snapshot() ?? {};
  }

  /**
   * Publishes `body` (any JSON value but null) to `room`. Resolves with `{room, origin,
   * offset}` once the message is durable; retried with the same `ref` across reconnects
   * (stored at most once per region, see README.md). Rejects with a `DtfedError` when the
   * server refuses it (`bad_frame`, `too_large`, `forbidden`, ...).
   */
  publish(room, body) {
    if (typeof room !== "string" || !ROOM_RE.test(room)) return Promise.reject(new TypeError(`bad room id: ${room}`));
    if (body === null || body === undefined) return Promise.reject(new TypeError("body must not be null"));
    if (this.#ended) return Promise.reject(new DtfedError("closed", "the client was closed"));
    if (this.#pending.size >= this.#opts.maxPending) {
      return Promise.reject(new DtfedError("queue_full", `${this.#pending.size} publishes wait for their ack already`));
    }
    const ref = `${this.#refPrefix}-${++this.#refSeq}`;
    return new Promise((resolve, reject) => {
      this.#pending.set(ref, { room, body, resolve, reject, sentOn: 0 });
      this.#sendPublish(ref);
    });
  }

  // ---- connection ----

  async #open(index) {
    this.#clearRetry();
    this.#index = index;
    const generation = ++this.#generation;
    this.#emit("state", { state: "connecting", url: this.url, index });
    let href;
    try {
      href = await this.#authUrl(this.url);
    } catch (e) {
      this.#log("token provider failed", e);
      if (generation === this.#generation && !this.#closed) this.#onLost(generation, 0, "token provider failed");
      return;
    }
    if (generation !== this.#generation || this.#closed) return;
    let ws;
    try {
      ws = new this.#WebSocket(href);
    } catch (e) {
      this.#log("WebSocket constructor failed", e);
      this.#onLost(generation, 0, String(e));
      return;
    }
    this.#ws = ws;
    ws.onopen = () => generation === this.#generation && this.#onOpen();
    ws.onmessage = (ev) => generation === this.#generation && this.#onFrame(ev.data);
    ws.onclose = (ev) => generation === this.#generation && this.#onLost(generation, ev.code, ev.reason);
    ws.onerror = () => {}; // a close follows
  }

  async #authUrl(url, opts = this.#opts) {
    const u = new URL(url);
    if (opts.name !== undefined) u.searchParams.set("name", opts.name);
    if (opts.token !== undefined) {
      const token = typeof opts.token === "function" ? await opts.token() : opts.token;
      u.searchParams.set("token", token);
    }
    return u.href;
  }

  #onOpen() {
    const wasAway = this.#attempt > 0 && this.#index !== this.#lostFrom;
    if (wasAway) this.stats.failovers++;
    this.#attempt = 0;
    this.#draining = false;
    this.#lastFrameAt = Date.now();
    this.#emit("state", { state: "open", url: this.url, index: this.#index });
    for (const room of this.#rooms.keys()) {
      const r = this.#rooms.get(room);
      r.live = false;
      r.resyncing = false;
      this.#sendSub(room);
    }
    for (const ref of this.#pending.keys()) this.#sendPublish(ref);
    clearInterval(this.#pingTimer);
    this.#pingTimer = setInterval(() => this.#checkAlive(), this.#opts.pingIntervalMs);
    this.#scheduleProbe();
  }

  /** Sends an application ping; drops a connection silent for 2.5 ping intervals. */
  #checkAlive() {
    if (Date.now() - this.#lastFrameAt > 2.5 * this.#opts.pingIntervalMs) {
      this.#log("no frame for", Date.now() - this.#lastFrameAt, "ms: dropping the connection");
      this.#dropSocket(4000, "silent");
      this.#onLost(this.#generation, 4000, "silent");
      return;
    }
    this.#send({ op: "ping" });
  }

  #onLost(generation, code, reason) {
    if (generation !== this.#generation) return;
    if (code === 1009) this.#rejectLargest(generation);
    this.#ws = null;
    this.#generation++;
    clearInterval(this.#pingTimer);
    clearTimeout(this.#probeTimer);
    for (const r of this.#rooms.values()) r.live = false;
    if (this.#closed) return;
    if (code === 1008 && typeof this.#opts.token !== "function" && this.#opts.token !== undefined) {
      // The token was refused or expired and there is no way to get another one.
      this.#emit("error", { code: "unauthorized", message: reason || "token refused" });
      this.close();
      return;
    }
    if (this.#attempt === 0) this.#lostFrom = this.#index;
    const plan = planAttempt(this.#lostFrom, this.#attempt, this.#opts.urls.length, this.#opts.reconnect);
    const delayMs = plan.delayMs + (code === 4002 ? 3_000 : 0); // flood: back off harder
    this.#attempt++;
    this.stats.reconnects++;
    this.#emit("state", { state: "reconnecting", url: this.#opts.urls[plan.index], index: plan.index, delayMs, code, reason });
    this.#retryTimer = setTimeout(() => this.#open(plan.index), delayMs);
  }

  /**
   * Close 1009: a frame beyond the server's hard limit. Only a publish can be that large;
   * the largest one sent on that connection is rejected, or it would be resent forever.
   */
  #rejectLargest(generation) {
    let largest = null;
    for (const [ref, p] of this.#pending) {
      if (p.sentOn === generation && (largest === null || p.size > largest[1].size)) largest = [ref, p];
    }
    if (largest) {
      this.#pending.delete(largest[0]);
      largest[1].reject(new DtfedError("too_large", "the server closed the connection on this frame (1009)"));
    }
  }

  // ---- moving back to a better region ----

  #scheduleProbe() {
    clearTimeout(this.#probeTimer);
    if (this.#index === 0 || this.#closed) return;
    this.#probeTimer = setTimeout(() => this.#probe(), this.#opts.probeIntervalMs);
  }

  /** Tries the regions before the current one, best first; moves to the first that answers. */
  async #probe() {
    const generation = this.#generation;
    for (let i = 0; i < this.#index; i++) {
      const ok = await this.#probeOne(this.#opts.urls[i]);
      if (generation !== this.#generation || this.#closed) return;
      if (ok) {
        this.#moveTo(i);
        return;
      }
    }
    this.#scheduleProbe();
  }

  /** Opens a WebSocket to `url` and waits for a `pong`; true if it came within 3 s. */
  async #probeOne(url) {
    let href;
    try {
      href = await this.#authUrl(url);
    } catch {
      return false;
    }
    return new Promise((resolve) => {
      let ws;
      const done = (ok) => {
        clearTimeout(timer);
        resolve(ok);
        try {
          ws?.close(1000, "probe");
        } catch {
          // already closed
        }
      };
      const timer = setTimeout(() => done(false), 3_000);
      try {
        ws = new this.#WebSocket(href);
      } catch {
        done(false);
        return;
      }
      ws.onopen = () => ws.send(JSON.stringify({ op: "ping" }));
      ws.onmessage = (ev) => {
        try {
          if (JSON.parse(String(ev.data)).op === "pong") done(true);
        } catch {
          done(false);
        }
      };
      ws.onerror = () => {};
      ws.onclose = () => done(false);
    });
  }

  /**
   * A planned move to region `index`: new publishes wait, the ones in flight get their
   * acks here first (so no retry crosses regions), then the connection moves.
   */
  #moveTo(index) {
    this.#draining = true;
    const generation = this.#generation;
    const started = Date.now();
    const step = () => {
      if (generation !== this.#generation || this.#closed) return;
      const inFlight = [...this.#pending.values()].some((p) => p.sentOn === generation);
      if (inFlight && Date.now() - started < this.#opts.drainTimeoutMs) {
        setTimeout(step, 20);
        return;
      }
      this.#log("moving back to", this.#opts.urls[index]);
      this.#dropSocket(1000, "moving to a nearer region");
      this.#attempt = 0;
      this.#open(index);
    };
    step();
  }

  // ---- frames ----

  #send(frame) {
    if (this.#ws?.readyState !== OPEN) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  #sendSub(room) {
    const r = this.#rooms.get(room);
    if (!r) return;
    r.live = false;
    const since = r.cursor.snapshot();
    if (r.fresh && this.#opts.history === "none" && Object.keys(since).length === 0) this.#send({ op: "sub", room });
    else this.#send({ op: "sub", room, since });
  }

  #sendPublish(ref) {
    const p = this.#pending.get(ref);
    if (!p || this.#draining || this.#ws?.readyState !== OPEN) return;
    const frame = JSON.stringify({ op: "pub", room: p.room, body: p.body, ref });
    this.#ws.send(frame);
    p.sentOn = this.#generation;
    p.size = frame.length;
  }

  #onFrame(data) {
    this.#lastFrameAt = Date.now();
    let f;
    try {
      f = JSON.parse(typeof data === "string" ? data : String(data));
    } catch {
      this.#log("unparseable frame from the server");
      return;
    }
    if (f === null || typeof f !== "object") return;
    switch (f.op) {
      case "msg":
        return this.#onMsg(f);
      case "ack":
        return this.#onAck(f);
      case "synced":
        return this.#onSynced(f);
      case "more":
        return this.#onMore(f);
      case "gap":
        return this.#onGap(f);
      case "error":
        return this.#onError(f);
      case "wm":
        return this.#onWatermark(f, false);
      default:
        return; // pong, and ops of later versions
    }
  }

  #onMsg(m) {
    const bad = malformedMessage(m);
    if (bad) return this.#log(bad, m);
    const r = this.#rooms.get(m.room);
    if (!r) return; // a room left, frames still in flight
    switch (r.cursor.check(m)) {
      case Verdict.DUPLICATE:
        this.stats.duplicates++;
        return;
      case Verdict.HOLE:
        if (r.resyncing) return; // the replay from the cursor brings it
        this.stats.holes++;
        r.resyncing = true;
        this.#emit("resync", { room: m.room, origin: m.origin, prev: m.prev, last: r.cursor.last(m.origin) });
        // A `sub` for a room the connection is in only answers `synced`: leave, then resume.
        this.#send({ op: "unsub", room: m.room });
        this.#sendSub(m.room);
        return;
      case Verdict.DELIVER:
        r.cursor.advance(m);
        this.#save(m.room, r);
        this.#emit("message", {
          room: m.room,
          origin: m.origin,
          offset: m.offset,
          prev: m.prev,
          ts: m.ts,
          from: m.from,
          body: m.body,
        });
    }
  }

  #onSynced(f) {
    const r = this.#rooms.get(f.room);
    if (!r) return;
    r.live = true;
    r.resyncing = false;
    // Only fill origins the cursor lacks (a live-only `sub`): never skip past what arrived.
    if (r.cursor.merge(f.cursor, { onlyMissing: true })) this.#save(f.room, r);
    this.#emit("synced", { room: f.room, cursor: r.cursor.snapshot() });
    this.#onWatermark(f, true);
  }

  /** `synced` (all origins: replaces) or `wm` (the origins that changed: merged). */
  #onWatermark(f, whole) {
    const r = this.#rooms.get(f.room);
    const origins = whole ? (f.origins ?? {}) : f.origins;
    if (!r || origins === null || typeof origins !== "object" || Array.isArray(origins)) return;
    const changed = {};
    for (const [origin, m] of Object.entries(origins)) {
      if (m === null || typeof m !== "object" || !Number.isSafeInteger(m.offset) || typeof m.live !== "boolean") {
        this.#log("malformed watermark", origin, m);
        continue;
      }
      changed[origin] = { offset: m.offset, live: m.live, lag_ms: m.lag_ms ?? null, since: m.since ?? null };
    }
    const forgotten = whole && Object.keys(r.marks).length > 0;
    r.marks = whole ? changed : { ...r.marks, ...changed };
    if (forgotten || Object.keys(changed).length > 0) {
      this.#emit("watermark", { room: f.room, origins: { ...r.marks }, changed });
    }
  }

  #onMore(f) {
    const r = this.#rooms.get(f.room);
    if (!r) return;
    if (r.cursor.merge(f.cursor)) this.#save(f.room, r);
    this.#sendSub(f.room);
  }

  #onGap(f) {
    const r = this.#rooms.get(f.room);
    if (!r || !r.cursor.gap(f.origin, f.to)) return;
    this.#save(f.room, r);
    this.#emit("gap", { room: f.room, origin: f.origin, from: f.from, to: f.to });
  }

  #onAck(a) {
    if (typeof a.origin === "string") this.#region = a.origin;
    const p = this.#pending.get(a.ref);
    if (!p) return;
    this.#pending.delete(a.ref);
    p.resolve({ room: a.room, origin: a.origin, offset: a.offset });
  }

  #onError(e) {
    const p = e.ref != null ? this.#pending.get(e.ref) : undefined;
    if (p) {
      if (RETRY_PUBLISH.has(e.code)) {
        // Not stored (rate_limited), or not known yet (unavailable): the same ref again.
        const generation = this.#generation;
        setTimeout(() => generation === this.#generation && this.#sendPublish(e.ref), this.#opts.retryDelayMs);
        return;
      }
      this.#pending.delete(e.ref);
      p.reject(new DtfedError(e.code, e.message));
      return;
    }
    if (RETRY_SUB.has(e.code) && [...this.#rooms.values()].some((r) => !r.live)) {
      // A `sub` that could not be served now (errors name no room): retry the waiting ones.
      clearTimeout(this.#subRetryTimer);
      const generation = this.#generation;
      const delay = this.#opts.retryDelayMs * (0.75 + Math.random() / 2);
      this.#subRetryTimer = setTimeout(() => {
        if (generation !== this.#generation) return;
        for (const [room, r] of this.#rooms) if (!r.live) this.#sendSub(room);
      }, delay);
    }
    this.#emit("error", { code: e.code, message: e.message });
  }

  // ---- helpers ----

  #save(room, r) {
    try {
      this.#store.save(room, r.cursor.snapshot());
    } catch (e) {
      this.#log("cursor store save failed", room, e);
    }
  }

  #emit(name, value) {
    for (const fn of this.#handlers.get(name) ?? []) {
      try {
        fn(value);
      } catch (e) {
        this.#log(`a "${name}" handler threw`, e);
      }
    }
  }

  #log(...args) {
    this.#opts.logger?.(...args);
  }

  #dropSocket(code, reason) {
    const ws = this.#ws;
    this.#ws = null;
    this.#generation++;
    clearInterval(this.#pingTimer);
    clearTimeout(this.#probeTimer);
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        // closing a socket that never opened
      }
    }
  }

  #clearRetry() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
  }

  #clearTimers() {
    this.#clearRetry();
    clearInterval(this.#pingTimer);
    clearTimeout(this.#probeTimer);
    clearTimeout(this.#subRetryTimer);
  }
}
