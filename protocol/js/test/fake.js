// An in-process stand-in for the network: a WebSocket class whose sockets the test drives as
// the gateway would (open, push frames, read what the client wrote, close with a code).

import * as json from '../src/json.js';
import * as binary from '../src/binary.js';

export class FakeNet {
  constructor() {
    this.sockets = [];
    this._waiters = [];
    const net = this;
    this.WebSocket = class FakeWebSocket {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.written = [];
        this._readers = [];
        this.closedByClient = null;
        net.sockets.push(this);
        for (const w of net._waiters.splice(0)) w(this);
      }
      send(data) {
        if (this.readyState !== 1) throw new Error(`send in state ${this.readyState}`);
        const frames = typeof data === 'string' ? [json.decode(data)] : binary.decode(data);
        for (const frame of frames) {
          this.written.push(frame);
          const reader = this._readers.shift();
          if (reader) reader(frame);
        }
      }
      close(code) {
        if (this.readyState >= 2) return;
        this.closedByClient = code ?? 1005;
        this.readyState = 3;
        setTimeout(() => this.onclose?.({ code: code ?? 1005, reason: '' }));
      }
      // ---- the gateway's side ----
      open() {
        this.readyState = 1;
        this.onopen?.({});
      }
      /** The next frame the client writes (frames already written are taken in order). */
      next() {
        if (this._taken === undefined) this._taken = 0;
        if (this._taken < this.written.length) return Promise.resolve(this.written[this._taken++]);
        return new Promise((resolve) =>
          this._readers.push((frame) => {
            this._taken++;
            resolve(frame);
          }),
        );
      }
      push(frame, { asBinary = false } = {}) {
        const data = asBinary ? binary.encode(frame).buffer : json.encode(frame);
        this.onmessage?.({ data });
      }
      drop(code = 1006, reason = '') {
        this.readyState = 3;
        this.onclose?.({ code, reason });
      }
      /** Opens the socket and answers the client's login. Returns the login frame. */
      async accept(uid = 'buyer:1') {
        this.open();
        const login = await this.next();
        if (login.op !== 'login') throw new Error(`expected login, got ${login.op}`);
        this.push({ op: 'login_ok', req: login.req, uid, device_id: '1', node_id: '1', ts: 1 });
        return login;
      }
    };
  }

  /** The next socket the client opens (or the newest unclaimed one). */
  nextSocket() {
    if (this._claimed === undefined) this._claimed = 0;
    if (this._claimed < this.sockets.length) return Promise.resolve(this.sockets[this._claimed++]);
    return new Promise((resolve) =>
      this._waiters.push((s) => {
        this._claimed++;
        resolve(s);
      }),
    );
  }
}

export const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

/** A message of conversation `conv` with seq `seq`. */
export function msg(conv, seq, from = 'agent:7') {
  return { conv, seq, from, ts: 1767225600000 + seq, kind: 'text', body: `m${seq}`, cmid: `c${seq}` };
}
