// The chinwag client: one logical connection to a gateway that survives the network.
//
// What it keeps across reconnects, and why:
// - requests in flight are matched to replies by `req`; each has a timeout, and a call made
//   while the connection is down waits for it (bounded in time and in count) instead of failing;
// - unacknowledged sends, retried with the same `cmid` after a reconnect (or a lost reply), so
//   the gateway stores each once (it deduplicates by sender, conversation and cmid);
// - the last seq delivered per conversation: after a reconnect it reads `history` after it and
//   delivers what was missed, in order, before the pushes of the new connection, and it drops
//   any message it already delivered. Every stored message of a tracked conversation reaches
//   the `msg` event exactly once, in seq order, including one's own (from `send_ok`).
//
// The connection is given up only when the gateway says retrying cannot help: `kicked` (another
// tab or device took this device's place, close code 4001) or a token refused even after
// `getToken` renewed it.

import * as json from './json.js';
import * as binary from './binary.js';
import { backoffDelayMs, BACKOFF_DEFAULTS } from './backoff.js';

/** An error from the gateway (its `code`) or from the client itself. */
export class ChinwagError extends Error {
  /**
   * @param {string} code a contract error code, or one of the client's: `timeout`,
   *   `disconnected`, `closed`, `kicked`, `queue_full`, `bad_reply`.
   */
  constructor(code, message, req) {
    super(message || code);
    this.name = 'ChinwagError';
    this.code = code;
    if (req !== undefined) this.req = req;
  }
}

export const DEFAULTS = Object.freeze({
  device: 'web',
  codec: 'json',
  requestTimeoutMs: 5000,
  connectTimeoutMs: 10000,
  offlineWaitMs: 30000,
  sendDeadlineMs: 60000,
  pendingMax: 1000,
  backoff: BACKOFF_DEFAULTS,
  // Well inside the gateway's idle timeout (90 s by default): two pings fit in it even when
  // one is lost.
  pingIntervalMs: 25000,
  pongTimeoutMs: 10000,
  historyPageLimit: 200,
  retryDelayMs: 1000,
});

/** The close code with which the gateway ends a kicked device's connection. */
export const CLOSE_KICKED = 4001;

const REPLY_OF = {
  login: 'login_ok',
  send: 'send_ok',
  read: 'read_ok',
  resolve: 'resolve_ok',
  history: 'history_ok',
  convs: 'convs_ok',
  ping: 'pong',
};

/** Server errors after which a send is tried again rather than given up. */
const SEND_RETRY_CODES = new Set(['rate_limited', 'unavailable', 'internal']);

export class Client {
  constructor(options = {}) {
    this._o = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    const urls = options.urls ?? options.url;
    this._urls = Array.isArray(urls) ? [...urls] : [urls];
    if (this._urls.length === 0 || this._urls.some((u) => typeof u !== 'string')) {
      throw new TypeError('urls must be a gateway URL or a non-empty list of them');
    }
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError('no WebSocket: pass options.WebSocket (on Node < 22 run with --experimental-websocket)');
    }
    this._codec = this._o.codec === 'binary' ? binary : json;
    this._random = options.random ?? Math.random;
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    // True while the token in hand came straight from getToken: if it is refused, renewing
    // again cannot help.
    this._tokenFresh = false;

    this._listeners = new Map();
    this._state = 'disconnected';
    this._stopped = null;
    this._ws = null;
    this._attempt = 0;
    this._urlIndex = 0;
    this._connectTimer = null;
    this._reconnectTimer = null;
    this._pingTimer = null;
    this._kicked = false;
    this._unauthorized = false;
    this._login = null;
    // Bumped at every successful login: work started on one connection ends if it changes.
    this._connId = 0;
    // Bumped at every connection attempt (and at a stop): an attempt awaiting getToken ends if
    // it changes.
    this._connectAttempt = 0;

    this._nextReq = 1;
    this._inflight = new Map();
    this._waiting = [];
    this._sends = new Set();
    this._convs = new Map();
    this.stats = { connects: 0, sendAttempts: 0, recovered: 0, duplicatesDropped: 0 };

    this._onOnline = () => {
      if (this._reconnectTimer === null) return;
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      this._attempt = 0;
      this._open();
    };
    this._onlineTarget = options.onlineTarget ?? (typeof globalThis.addEventListener === 'function' ? globalThis : null);
  }

  /** `disconnected`, `connecting` (including waiting to retry) or `connected`. */
  get state() {
    return this._state;
  }

  /** The logged-in user's uid (from the last `login_ok`), or null. */
  get uid() {
    return this._login?.uid ?? null;
  }

  /** The last `login_ok`, or null. */
  get session() {
    return this._login;
  }

  on(event, listener) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
  }

  _emit(event, ...args) {
    for (const listener of [...(this._listeners.get(event) ?? [])]) {
      try {
        listener(...args);
      } catch (e) {
        // A listener's bug must not break the connection; report it where it is seen.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  /** Starts connecting (again, after `disconnect()` or a final close). */
  connect() {
    if (this._state !== 'disconnected' || this._reconnectTimer !== null) return;
    this._stopped = null;
    this._kicked = false;
    this._attempt = 0;
    this._onlineTarget?.addEventListener('online', this._onOnline);
    this._open();
  }

  /** Closes the connection for good; pending calls and sends are rejected with `closed`. */
  disconnect() {
    this._stop('closed', new ChinwagError('closed', 'the client was disconnected'));
  }

  /** A fresh client message id. */
  newCmid() {
    const random = globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${this._random().toString(36).slice(2)}`;
    return random;
  }

  /**
   * Sends a message. `target` has exactly one of `conv`, `shop`, `user`; `kind` defaults to
   * `text`; `cmid` to a fresh id. The promise resolves with `send_ok` once the message is
   * stored, however many reconnects that takes, and rejects on a definitive error or after
   * `sendDeadlineMs`. The returned promise carries the `cmid`.
   */
  send({ conv, shop, user, kind = 'text', body, cmid }) {
    cmid ??= this.newCmid();
    const frame = { op: 'send', conv, shop, user, cmid, kind, body };
    for (const key of ['conv', 'shop', 'user']) if (frame[key] === undefined) delete frame[key];
    const promise = new Promise((resolve, reject) => {
      const refused = this._refuse(frame);
      if (refused) return reject(refused);
      const entry = { kind: 'send', frame, resolve, reject, timeoutMs: this._o.requestTimeoutMs, timer: null, reqs: [], retryTimer: null };
      entry.deadline = setTimeout(() => {
        this._finishSend(entry);
        reject(new ChinwagError('timeout', `send ${cmid} not acknowledged in ${this._o.sendDeadlineMs} ms; retry with the same cmid`));
      }, this._o.sendDeadlineMs);
      this._sends.add(entry);
      if (this._state === 'connected') this._write(entry);
    });
    promise.cmid = cmid;
    return promise;
  }

  /** Moves the user's read cursor of `conv` to `seq`. */
  read(conv, seq) {
    return this.request({ op: 'read', conv, seq });
  }

  /** Ends this agent's assignment to a shop conversation. */
  resolve(conv) {
    return this.request({ op: 'resolve', conv });
  }

  /** A page of `conv`'s messages: `{before}` (older than), `{after}` (newer than) or the newest. */
  history(conv, { before, after, limit } = {}) {
    const frame = { op: 'history', conv, before, after, limit };
    for (const key of ['before', 'after', 'limit']) if (frame[key] === undefined) delete frame[key];
    return this.request(frame);
  }

  /** The user's conversations with their cursors, unread counts and last messages. */
  convs() {
    return this.request({ op: 'convs' });
  }

  ping() {
    return this.request({ op: 'ping' });
  }

  /**
   * Sends any request (`{op, ...fields}`, without `req`) and resolves with its reply, or
   * rejects with a ChinwagError. While the connection is down the call waits up to
   * `offlineWaitMs`; once written, its reply is awaited `timeoutMs`.
   */
  request(frame, { timeoutMs = this._o.requestTimeoutMs, waitMs = this._o.offlineWaitMs } = {}) {
    return new Promise((resolve, reject) => {
      const refused = this._refuse(frame);
      if (refused) return reject(refused);
      const entry = { kind: 'request', frame, resolve, reject, timeoutMs, timer: null, reqs: [] };
      if (this._state === 'connected') return this._write(entry);
      if (waitMs <= 0) return reject(new ChinwagError('disconnected', 'not connected'));
      this._waiting.push(entry);
      entry.timer = setTimeout(() => {
        this._waiting = this._waiting.filter((e) => e !== entry);
        reject(new ChinwagError('timeout', `no connection within ${waitMs} ms`));
      }, waitMs);
    });
  }

  /**
   * Tracks `conv` from `lastSeq`: every later message will reach `msg` once, in order. A
   * conversation is tracked anyway from the first time the client sees it (a push, a
   * `send_ok`, a `convs` reply from its `last_seq`, or a newest `history` page).
   */
  track(conv, lastSeq) {
    if (!this._convs.has(conv)) this._convs.set(conv, newConvState(lastSeq));
  }

  /** The last seq delivered for `conv`, or undefined when it is not tracked. */
  lastSeq(conv) {
    return this._convs.get(conv)?.last;
  }

  /** Why a new call cannot be taken: a final close, a full queue or a bad frame. */
  _refuse(frame) {
    if (frame.op === 'login') return new ChinwagError('bad_request', 'the client logs in by itself');
    if (this._stopped) return new ChinwagError(this._stopped.reason, `the connection was closed (${this._stopped.reason})`);
    if (this._waiting.length + this._sends.size >= this._o.pendingMax) {
      return new ChinwagError('queue_full', `more than ${this._o.pendingMax} calls are waiting`);
    }
    try {
      this._codec.encode({ ...frame, req: 1 });
    } catch (e) {
      return e;
    }
    return null;
  }

  // ---- the connection ----

  _setState(state, detail = {}) {
    if (this._state === state && state !== 'connecting') return;
    const previous = this._state;
    this._state = state;
    this._emit('state', { state, previous, ...detail });
  }

  async _open() {
    this._reconnectTimer = null;
    const attemptId = ++this._connectAttempt;
    this._setState('connecting', { reason: 'connecting' });
    let token = this._token;
    if (!token) {
      if (!this._getToken) return this._stop('unauthorized', new ChinwagError('unauthorized', 'no token and no getToken'));
      try {
        token = await this._getToken();
      } catch (e) {
        if (attemptId !== this._connectAttempt || this._stopped) return;
        this._emit('error', e);
        return this._scheduleReconnect('getToken failed');
      }
      if (attemptId !== this._connectAttempt || this._stopped) return;
      this._token = token;
      this._tokenFresh = true;
    }
    const url = this._urls[this._urlIndex % this._urls.length];
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (e) {
      this._emit('error', e);
      return this._scheduleReconnect('bad url');
    }
    ws.binaryType = 'arraybuffer';
    this._ws = ws;
    this._unauthorized = false;
    this._connectTimer = setTimeout(() => this._drop(ws, 'connect timeout'), this._o.connectTimeoutMs);
    ws.onopen = () => {
      if (ws !== this._ws) return;
      const entry = { kind: 'login', frame: { op: 'login', token, device: this._o.device }, timeoutMs: this._o.requestTimeoutMs, timer: null, reqs: [] };
      this._write(entry);
    };
    ws.onmessage = (event) => {
      if (ws === this._ws) this._onData(event.data);
    };
    ws.onclose = (event) => {
      if (ws === this._ws) this._onSocketGone(event.code, event.reason || '');
    };
    ws.onerror = () => {}; // A close event follows.
  }

  _onLogin(frame) {
    clearTimeout(this._connectTimer);
    this._connectTimer = null;
    this._login = frame;
    this._attempt = 0;
    this._tokenFresh = false;
    this._connId++;
    this.stats.connects++;
    this._setState('connected');
    this._pingTimer = setInterval(() => this._heartbeat(), this._o.pingIntervalMs);
    this._emit('login', frame);
    // Recovery before the calls that waited and the sends to resend; pushes that arrive
    // meanwhile wait behind it (see _fill).
    for (const conv of this._convs.keys()) this._fill(conv, true);
    const waiting = this._waiting;
    this._waiting = [];
    for (const entry of waiting) this._write(entry);
    for (const entry of this._sends) if (entry.reqs.length === 0 && entry.retryTimer === null) this._write(entry);
  }

  _heartbeat() {
    const ws = this._ws;
    this.request({ op: 'ping' }, { timeoutMs: this._o.pongTimeoutMs, waitMs: 0 }).catch((e) => {
      if (e.code === 'timeout' && ws === this._ws) this._drop(ws, 'no pong');
    });
  }

  /** Gives up on a socket that stopped answering, without waiting for its close handshake. */
  _drop(ws, reason) {
    if (!ws || ws !== this._ws) return;
    try {
      ws.close();
    } catch {
      // Already closed.
    }
    this._onSocketGone(1006, reason);
  }

  _detach() {
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    clearTimeout(this._connectTimer);
    clearInterval(this._pingTimer);
    this._connectTimer = this._pingTimer = null;
    return ws;
  }

  _onSocketGone(code, reason) {
    this._detach();
    this._connId++;
    for (const [, entry] of this._inflight) {
      clearTimeout(entry.timer);
      entry.timer = null;
      entry.reqs = [];
      if (entry.kind === 'request') entry.reject(new ChinwagError('disconnected', `connection lost (${code} ${reason})`));
      // Sends stay in this._sends and are written again after the next login.
    }
    this._inflight.clear();
    // Recovery restarts from `last` on the next connection; what was buffered comes again.
    for (const c of this._convs.values()) {
      c.fillId++;
      c.filling = false;
      c.buffer = [];
    }
    this._emit('disconnect', { code, reason });
    if (this._kicked || code === CLOSE_KICKED) {
      return this._stop('kicked', new ChinwagError('kicked', 'this device logged in elsewhere'));
    }
    if (this._unauthorized) {
      if (this._getToken && !this._tokenFresh) {
        this._token = null;
        return this._open();
      }
      return this._stop('unauthorized', new ChinwagError('unauthorized', 'the gateway refused the token'));
    }
    if (this._stopped) return;
    this._scheduleReconnect(reason || `closed ${code}`);
  }

  _scheduleReconnect(reason) {
    const delayMs = backoffDelayMs(this._attempt++, this._o.backoff, this._random);
    this._urlIndex++;
    this._setState('connecting', { reason, retryInMs: delayMs });
    this._reconnectTimer = setTimeout(() => this._open(), delayMs);
  }

  _stop(reason, error) {
    if (this._stopped && reason !== 'closed') return;
    this._stopped = { reason };
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._connectAttempt++;
    this._onlineTarget?.removeEventListener('online', this._onOnline);
    const ws = this._detach();
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // Already closed.
      }
    }
    for (const [, entry] of this._inflight) {
      clearTimeout(entry.timer);
      if (entry.kind === 'request') entry.reject(error);
    }
    this._inflight.clear();
    for (const entry of this._waiting) {
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    this._waiting = [];
    for (const entry of [...this._sends]) {
      this._finishSend(entry);
      entry.reject(error);
    }
    this._setState('disconnected', { reason });
  }

  // ---- requests and replies ----

  _write(entry) {
    clearTimeout(entry.timer);
    const req = this._nextReq++;
    entry.reqs.push(req);
    this._inflight.set(req, entry);
    entry.timer = setTimeout(() => this._onTimeout(entry, req), entry.timeoutMs);
    if (entry.kind === 'send') this.stats.sendAttempts++;
    this._ws.send(this._codec.encode({ ...entry.frame, req }));
  }

  _onTimeout(entry, req) {
    entry.timer = null;
    if (entry.kind === 'login') return this._drop(this._ws, 'login timeout');
    if (entry.kind === 'send') {
      // The reply may be lost, or only late: write it again with the same cmid (the gateway
      // stores it once) and keep listening for the earlier req too.
      if (this._state === 'connected') this._write(entry);
      return;
    }
    this._inflight.delete(req);
    entry.reject(new ChinwagError('timeout', `no reply to ${entry.frame.op} in ${entry.timeoutMs} ms`, req));
  }

  _finishSend(entry) {
    clearTimeout(entry.timer);
    clearTimeout(entry.deadline);
    clearTimeout(entry.retryTimer);
    for (const req of entry.reqs) this._inflight.delete(req);
    entry.reqs = [];
    this._sends.delete(entry);
  }

  _onData(data) {
    let frames;
    try {
      frames = typeof data === 'string' ? [json.decode(data)] : binary.decode(data, (e) => this._onBadFrame(e));
    } catch (e) {
      return this._onBadFrame(e);
    }
    for (const frame of frames) this._onFrame(frame);
  }

  _onBadFrame(error) {
    const entry = error.req !== undefined ? this._inflight.get(error.req) : undefined;
    if (entry && entry.kind === 'request') {
      this._inflight.delete(error.req);
      clearTimeout(entry.timer);
      entry.reject(new ChinwagError('bad_reply', error.message, error.req));
    } else {
      this._emit('error', error);
    }
  }

  _onFrame(frame) {
    if (frame.req !== undefined) {
      const entry = this._inflight.get(frame.req);
      if (entry) return this._onReply(entry, frame);
      // A reply to a request already given up (timed out): nothing waits for it.
      if (frame.op === 'error') this._emit('error', new ChinwagError(frame.code, frame.message, frame.req));
      return;
    }
    switch (frame.op) {
      case 'msg': {
        const { op, ...msg } = frame;
        return this._onMsg(msg, false);
      }
      case 'receipt':
      case 'members': {
        const { op, ...push } = frame;
        if (op === 'members' && this.uid && !push.members.includes(this.uid)) this._convs.delete(push.conv);
        return this._emit(op, push);
      }
      case 'conv_profile': {
        const { op, ...push } = frame;
        return this._emit(op, push);
      }
      case 'kicked':
        this._kicked = true;
        return this._emit('kicked', { reason: frame.reason });
      case 'error':
        return this._emit('error', new ChinwagError(frame.code, frame.message));
      default:
        // A push this version does not know: ignored, as the contract allows new ops.
        return undefined;
    }
  }

  _onReply(entry, frame) {
    clearTimeout(entry.timer);
    entry.timer = null;
    for (const req of entry.reqs) this._inflight.delete(req);
    entry.reqs = [];
    if (entry.kind === 'login') {
      if (frame.op === 'login_ok') return this._onLogin(frame);
      if (frame.code === 'unauthorized') {
        // The gateway closes with 1008 next; _onSocketGone decides whether to renew.
        this._unauthorized = true;
        return undefined;
      }
      this._emit('error', new ChinwagError(frame.code ?? 'bad_reply', frame.message ?? `login answered with ${frame.op}`));
      return this._drop(this._ws, 'login failed');
    }
    if (frame.op === 'error') {
      const error = new ChinwagError(frame.code, frame.message, frame.req);
      if (entry.kind === 'send' && SEND_RETRY_CODES.has(frame.code)) {
        entry.retryTimer = setTimeout(() => {
          entry.retryTimer = null;
          if (this._state === 'connected' && this._sends.has(entry)) this._write(entry);
        }, this._o.retryDelayMs);
        return undefined;
      }
      if (entry.kind === 'send') this._finishSend(entry);
      return entry.reject(error);
    }
    if (frame.op !== REPLY_OF[entry.frame.op] && REPLY_OF[entry.frame.op] !== undefined) {
      if (entry.kind === 'send') this._finishSend(entry);
      return entry.reject(new ChinwagError('bad_reply', `${entry.frame.op} answered with ${frame.op}`, frame.req));
    }
    this._observeReply(entry.frame, frame);
    if (entry.kind === 'send') {
      this._finishSend(entry);
      const { cmid, kind, body } = entry.frame;
      this._onMsg({ conv: frame.conv, seq: frame.seq, from: this.uid, ts: frame.ts, kind, body, cmid }, true);
    }
    return entry.resolve(frame);
  }

  /** Learns the conversations a reply reveals, so that they are tracked from then on. */
  _observeReply(request, reply) {
    if (reply.op === 'convs_ok') {
      for (const c of reply.convs) this.track(c.conv, c.last_seq);
    } else if (reply.op === 'history_ok' && request.after === undefined && !request.before) {
      this.track(reply.conv, reply.msgs.length ? reply.msgs[reply.msgs.length - 1].seq : 0);
    } else if (reply.op === 'resolve_ok') {
      this._convs.delete(reply.conv);
    }
  }

  // ---- delivery in order, each message once ----

  _deliver(c, msg, info) {
    c.last = msg.seq;
    if (info.recovered) this.stats.recovered++;
    this._emit('msg', msg, info);
  }

  _onMsg(msg, own) {
    const c = this._convs.get(msg.conv);
    if (!c) {
      this._convs.set(msg.conv, newConvState(msg.seq - 1));
      return this._onMsg(msg, own);
    }
    if (c.filling) return c.buffer.push({ msg, own });
    if (msg.seq <= c.last) {
      this.stats.duplicatesDropped++;
      return undefined;
    }
    if (msg.seq === c.last + 1) return this._deliver(c, msg, { own, recovered: false });
    // A gap: the messages in between come from history first.
    c.buffer.push({ msg, own });
    return this._fill(msg.conv, false);
  }

  /**
   * Reads `conv`'s history after the last delivered seq until it meets the live pushes (or the
   * end of the log), delivering in order; pushes that arrive meanwhile wait in the buffer.
   * `always`: ask at least once even with nothing buffered (after a reconnect).
   */
  async _fill(conv, always) {
    const c = this._convs.get(conv);
    if (!c || c.filling) return;
    if (!always && c.buffer.length === 0) return;
    c.filling = true;
    const fillId = ++c.fillId;
    const connId = this._connId;
    const alive = () => c.fillId === fillId && this._convs.get(conv) === c;
    try {
      for (;;) {
        const page = await this.request(
          { op: 'history', conv, after: c.last, limit: this._o.historyPageLimit },
          { waitMs: 0 },
        );
        if (!alive()) return;
        for (const msg of page.msgs) {
          if (msg.seq > c.last) this._deliver(c, msg, { own: msg.from === this.uid, recovered: true });
        }
        const buffered = c.buffer.length > 0;
        c.buffer.sort((a, b) => a.msg.seq - b.msg.seq);
        while (c.buffer.length > 0 && c.buffer[0].msg.seq <= c.last + 1) {
          const { msg, own } = c.buffer.shift();
          if (msg.seq === c.last + 1) this._deliver(c, msg, { own, recovered: false });
          else this.stats.duplicatesDropped++;
        }
        if (page.msgs.length === 0) {
          // Nothing stored after `last` when the gateway answered: what is buffered came later
          // (a retention cut can leave a hole; it is delivered as is).
          for (const { msg, own } of c.buffer) if (msg.seq > c.last) this._deliver(c, msg, { own, recovered: false });
          c.buffer = [];
          break;
        }
        if (buffered && c.buffer.length === 0) break; // History met the live pushes.
      }
    } catch (e) {
      if (!alive()) return;
      if (e.code === 'not_member' || e.code === 'not_found') {
        this._convs.delete(conv);
        return;
      }
      if (this._connId === connId) {
        // A timeout or a rate limit on a live connection: try again shortly.
        setTimeout(() => {
          if (this._connId === connId && alive()) {
            c.filling = false;
            this._fill(conv, true);
          }
        }, this._o.retryDelayMs);
        return;
      }
    }
    if (alive()) c.filling = false;
  }
}

function newConvState(last) {
  return { last, filling: false, buffer: [], fillId: 0 };
}
