// The binary codec of docs/protocol.md over DataView: a 16-byte big-endian header (u32 length,
// u8 version, u8 op, u16 flags, u64 req), then the op's body. It maps to and from the same
// plain objects as the JSON form, so an application never sees which codec is in use:
// 64-bit ids become decimal strings, uids "kind:id", and number fields JS numbers (refused
// above 2^53 - 1 rather than rounded, see checkNumber).

import {
  OPS,
  UID_KINDS,
  DEVICES,
  CONV_TYPES,
  ERROR_CODES,
  CodecError,
  checkNumber,
  checkId,
  parseUid,
  checkString,
  CMID_BYTES_MAX,
  KIND_BYTES_MAX,
  TOKEN_BYTES_MAX,
  HISTORY_LIMIT_MAX,
  HISTORY_LIMIT_DEFAULT,
} from './model.js';

export const HEADER_BYTES = 16;
export const VERSION = 1;
const FLAG_REQ = 0x0001;
const OP_NAMES = new Map(Object.entries(OPS).map(([name, code]) => [code, name]));
const TARGETS = { conv: 1, shop: 2, user: 3 };
const RANGE_NEWEST = 0;
const RANGE_BEFORE = 1;
const RANGE_AFTER = 2;
/** A profile's subject: a conversation (`conv_profile`). */
const SUBJECT_CONV = 1;

const utf8 = new TextEncoder();
// fatal: invalid UTF-8 from the network is an error, not replacement characters.
const utf8Strict = new TextDecoder('utf-8', { fatal: true });

class Writer {
  constructor() {
    this.bytes = new Uint8Array(256);
    this.view = new DataView(this.bytes.buffer);
    this.len = 0;
  }
  reserve(n) {
    if (this.len + n <= this.bytes.length) return;
    let size = this.bytes.length * 2;
    while (size < this.len + n) size *= 2;
    const bytes = new Uint8Array(size);
    bytes.set(this.bytes.subarray(0, this.len));
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer);
  }
  u8(v) {
    this.reserve(1);
    this.view.setUint8(this.len, v);
    this.len += 1;
  }
  u16(v) {
    this.reserve(2);
    this.view.setUint16(this.len, v);
    this.len += 2;
  }
  u32(v) {
    this.reserve(4);
    this.view.setUint32(this.len, v);
    this.len += 4;
  }
  /** A u64 from a BigInt. */
  u64(v) {
    this.reserve(8);
    this.view.setBigUint64(this.len, v);
    this.len += 8;
  }
  number(v, field) {
    this.u64(BigInt(checkNumber(v, field)));
  }
  id(v, field) {
    this.u64(BigInt(checkId(v, field)));
  }
  uid(v, field) {
    const { kind, id } = parseUid(v, field);
    this.u8(kind);
    this.u64(id);
  }
  uids(list, field) {
    if (!Array.isArray(list) || list.length > 0xffff) throw new CodecError(`${field} must be a list of at most 65535 uids`);
    this.u16(list.length);
    for (const uid of list) this.uid(uid, field);
  }
  str(v, field, lenBytes) {
    if (typeof v !== 'string') throw new CodecError(`${field} must be a string`);
    const bytes = utf8.encode(v);
    if (bytes.length > (lenBytes === 2 ? 0xffff : 0xffffffff)) throw new CodecError(`${field} is too long`);
    if (lenBytes === 2) this.u16(bytes.length);
    else this.u32(bytes.length);
    this.reserve(bytes.length);
    this.bytes.set(bytes, this.len);
    this.len += bytes.length;
  }
  /** A profile: `str16 name` · `str16 avatar`, an absent field as an empty string. */
  profile(name, avatar) {
    this.str(name ?? '', 'name', 2);
    this.str(avatar ?? '', 'avatar', 2);
  }
  /** Members' profiles: `u16 k` · (`uid` · profile) × k. */
  profiles(list) {
    const entries = list ?? [];
    if (!Array.isArray(entries) || entries.length > 0xffff) throw new CodecError('profiles must be a list');
    this.u16(entries.length);
    for (const p of entries) {
      this.uid(p.uid, 'profiles');
      this.profile(p.nick, p.avatar);
    }
  }
  msg(m) {
    this.id(m.conv, 'conv');
    this.number(m.seq, 'seq');
    this.uid(m.from, 'from');
    this.number(m.ts, 'ts');
    this.str(m.kind, 'kind', 2);
    this.str(m.body, 'body', 4);
    this.str(m.cmid, 'cmid', 2);
  }
}

class Reader {
  constructor(view, pos, end) {
    this.view = view;
    this.pos = pos;
    this.end = end;
  }
  need(n) {
    if (this.pos + n > this.end) throw new CodecError('truncated frame');
  }
  u8() {
    this.need(1);
    return this.view.getUint8(this.pos++);
  }
  u16() {
    this.need(2);
    const v = this.view.getUint16(this.pos);
    this.pos += 2;
    return v;
  }
  u32() {
    this.need(4);
    const v = this.view.getUint32(this.pos);
    this.pos += 4;
    return v;
  }
  u64() {
    this.need(8);
    const v = this.view.getBigUint64(this.pos);
    this.pos += 8;
    return v;
  }
  number(field) {
    const v = this.u64();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CodecError(`${field} ${v} is above 2^53-1`);
    return Number(v);
  }
  id() {
    return this.u64().toString();
  }
  uid() {
    const kind = UID_KINDS[this.u8()];
    if (kind === undefined) throw new CodecError('unknown uid kind');
    return `${kind}:${this.u64()}`;
  }
  uids() {
    const n = this.u16();
    const list = [];
    for (let i = 0; i < n; i++) list.push(this.uid());
    return list;
  }
  str(lenBytes) {
    const n = lenBytes === 2 ? this.u16() : this.u32();
    this.need(n);
    const bytes = new Uint8Array(this.view.buffer, this.view.byteOffset + this.pos, n);
    this.pos += n;
    try {
      return utf8Strict.decode(bytes);
    } catch {
      throw new CodecError('invalid UTF-8');
    }
  }
  /** A profile's two strings, set on `out` under `nameKey`/`avatarKey` when not empty. */
  profile(out, nameKey, avatarKey) {
    const name = this.str(2);
    const avatar = this.str(2);
    if (name !== '') out[nameKey] = name;
    if (avatar !== '') out[avatarKey] = avatar;
    return out;
  }
  /** Members' profiles, set on `out.profiles` when there are any. */
  profiles(out) {
    const n = this.u16();
    if (n === 0) return out;
    out.profiles = [];
    for (let i = 0; i < n; i++) out.profiles.push(this.profile({ uid: this.uid() }, 'nick', 'avatar'));
    return out;
  }
  msg() {
    return {
      conv: this.id(),
      seq: this.number('seq'),
      from: this.uid(),
      ts: this.number('ts'),
      kind: this.str(2),
      body: this.str(4),
      cmid: this.str(2),
    };
  }
}

function oneOf(list, value, field) {
  const i = list.indexOf(value);
  if (i < 0) throw new CodecError(`${field} must be one of ${list.join(', ')}, got ${value}`);
  return i;
}

/** The body of each op, written from its plain object. */
const WRITE = {
  login(w, f) {
    w.u8(oneOf(DEVICES, f.device, 'device'));
    w.str(checkString(f.token, 'token', 0, TOKEN_BYTES_MAX), 'token', 2);
  },
  send(w, f) {
    const targets = ['conv', 'shop', 'user'].filter((t) => f[t] !== undefined);
    if (targets.length !== 1) throw new CodecError('send needs exactly one of conv, shop, user');
    const target = targets[0];
    w.u8(TARGETS[target]);
    if (target === 'user') w.uid(f.user, 'user');
    else w.id(f[target], target);
    w.str(checkString(f.cmid, 'cmid', 1, CMID_BYTES_MAX), 'cmid', 2);
    w.str(checkString(f.kind, 'kind', 1, KIND_BYTES_MAX), 'kind', 2);
    w.str(f.body, 'body', 4);
  },
  read: cursor,
  read_ok: cursor,
  resolve: convOnly,
  resolve_ok: convOnly,
  history(w, f) {
    w.id(f.conv, 'conv');
    const before = f.before ?? 0;
    if (f.after !== undefined && before !== 0) throw new CodecError('history takes before or after, not both');
    if (f.after !== undefined) {
      w.u8(RANGE_AFTER);
      w.number(f.after, 'after');
    } else {
      w.u8(before === 0 ? RANGE_NEWEST : RANGE_BEFORE);
      w.number(before, 'before');
    }
    const limit = f.limit ?? HISTORY_LIMIT_DEFAULT;
    if (!Number.isInteger(limit) || limit < 1 || limit > HISTORY_LIMIT_MAX) throw new CodecError('limit must be 1..=200');
    w.u16(limit);
  },
  convs() {},
  ping() {},
  pong() {},
  login_ok(w, f) {
    w.uid(f.uid, 'uid');
    w.id(f.device_id, 'device_id');
    w.id(f.node_id, 'node_id');
    w.number(f.ts, 'ts');
  },
  send_ok(w, f) {
    w.id(f.conv, 'conv');
    w.number(f.seq, 'seq');
    w.number(f.ts, 'ts');
  },
  history_ok(w, f) {
    w.id(f.conv, 'conv');
    if (f.msgs.length > 0xffff) throw new CodecError('too many msgs');
    w.u16(f.msgs.length);
    for (const m of f.msgs) w.msg(m);
  },
  convs_ok(w, f) {
    w.u32(f.convs.length);
    for (const c of f.convs) {
      w.id(c.conv, 'conv');
      w.u8(oneOf(CONV_TYPES, c.type, 'type'));
      if (c.type === 'shop') w.id(c.shop, 'shop');
      w.u32(c.member_count);
      w.uids(c.members, 'members');
      w.number(c.last_seq, 'last_seq');
      w.number(c.read_seq, 'read_seq');
      w.number(c.unread, 'unread');
      w.u8(c.last ? 1 : 0);
      if (c.last) w.msg(c.last);
      w.profile(c.name, c.avatar);
      w.profiles(c.profiles);
    }
  },
  msg(w, f) {
    w.msg(f);
    w.profile(f.from_nick, f.from_avatar);
    w.profile(f.conv_name, f.conv_avatar);
  },
  conv_profile(w, f) {
    w.u8(SUBJECT_CONV);
    w.id(f.conv, 'conv');
    w.profile(f.name, f.avatar);
  },
  receipt(w, f) {
    w.id(f.conv, 'conv');
    w.uid(f.uid, 'uid');
    w.number(f.seq, 'seq');
  },
  members(w, f) {
    w.id(f.conv, 'conv');
    w.uids(f.members, 'members');
    w.profiles(f.profiles);
  },
  members_delta(w, f) {
    w.id(f.conv, 'conv');
    w.uids(f.added, 'added');
    w.uids(f.removed, 'removed');
    w.u32(f.count);
  },
  kicked(w, f) {
    w.str(f.reason, 'reason', 2);
  },
  notify(w, f) {
    w.str(f.kind, 'kind', 2);
    w.str(f.body, 'body', 4);
    w.number(f.ts, 'ts');
  },
  error(w, f) {
    w.u8(oneOf(ERROR_CODES, f.code, 'code') + 1);
    w.str(f.message ?? '', 'message', 2);
  },
};

function cursor(w, f) {
  w.id(f.conv, 'conv');
  w.number(f.seq, 'seq');
}

function convOnly(w, f) {
  w.id(f.conv, 'conv');
}

/** The body of each op, read into its plain object (without `op` and `req`). */
const READ = {
  login(r) {
    const device = DEVICES[r.u8()];
    if (device === undefined) throw new CodecError('unknown device type');
    return { token: r.str(2), device };
  },
  send(r) {
    const target = r.u8();
    const out = {};
    if (target === TARGETS.conv) out.conv = r.id();
    else if (target === TARGETS.shop) out.shop = r.id();
    else if (target === TARGETS.user) out.user = r.uid();
    else throw new CodecError('unknown send target');
    out.cmid = r.str(2);
    out.kind = r.str(2);
    out.body = r.str(4);
    return out;
  },
  read: (r) => ({ conv: r.id(), seq: r.number('seq') }),
  read_ok: (r) => ({ conv: r.id(), seq: r.number('seq') }),
  resolve: (r) => ({ conv: r.id() }),
  resolve_ok: (r) => ({ conv: r.id() }),
  history(r) {
    const conv = r.id();
    const range = r.u8();
    const seq = r.number('seq');
    const limit = r.u16();
    if (range === RANGE_NEWEST && seq === 0) return { conv, limit };
    if (range === RANGE_BEFORE && seq !== 0) return { conv, before: seq, limit };
    if (range === RANGE_AFTER) return { conv, after: seq, limit };
    throw new CodecError('bad history range');
  },
  convs: () => ({}),
  ping: () => ({}),
  pong: () => ({}),
  login_ok: (r) => ({ uid: r.uid(), device_id: r.id(), node_id: r.id(), ts: r.number('ts') }),
  send_ok: (r) => ({ conv: r.id(), seq: r.number('seq'), ts: r.number('ts') }),
  history_ok(r) {
    const conv = r.id();
    const n = r.u16();
    const msgs = [];
    for (let i = 0; i < n; i++) msgs.push(r.msg());
    return { conv, msgs };
  },
  convs_ok(r) {
    const n = r.u32();
    const convs = [];
    for (let i = 0; i < n; i++) {
      const c = { conv: r.id() };
      c.type = CONV_TYPES[r.u8()];
      if (c.type === undefined) throw new CodecError('unknown conversation type');
      if (c.type === 'shop') c.shop = r.id();
      c.member_count = r.u32();
      c.members = r.uids();
      c.last_seq = r.number('last_seq');
      c.read_seq = r.number('read_seq');
      c.unread = r.number('unread');
      const hasLast = r.u8();
      if (hasLast > 1) throw new CodecError('bad last presence byte');
      c.last = hasLast ? r.msg() : null;
      r.profile(c, 'name', 'avatar');
      r.profiles(c);
      convs.push(c);
    }
    return { convs };
  },
  msg: (r) => r.profile(r.profile(r.msg(), 'from_nick', 'from_avatar'), 'conv_name', 'conv_avatar'),
  conv_profile(r) {
    if (r.u8() !== SUBJECT_CONV) throw new CodecError('conv_profile names a conversation');
    return r.profile({ conv: r.id() }, 'name', 'avatar');
  },
  receipt: (r) => ({ conv: r.id(), uid: r.uid(), seq: r.number('seq') }),
  members: (r) => r.profiles({ conv: r.id(), members: r.uids() }),
  members_delta: (r) => ({ conv: r.id(), added: r.uids(), removed: r.uids(), count: r.u32() }),
  kicked: (r) => ({ reason: r.str(2) }),
  notify: (r) => ({ kind: r.str(2), body: r.str(4), ts: r.number('ts') }),
  error(r) {
    const code = ERROR_CODES[r.u8() - 1];
    if (code === undefined) throw new CodecError('unknown error code');
    return { code, message: r.str(2) };
  },
};

/** Encodes one message object (`{op, req?, ...fields}`) into one binary frame. */
export function encode(frame) {
  const code = OPS[frame.op];
  if (code === undefined) throw new CodecError(`unknown op ${frame.op}`);
  const w = new Writer();
  w.len = HEADER_BYTES;
  WRITE[frame.op](w, frame);
  if (w.len > 0xffffffff) throw new CodecError('frame too long');
  w.view.setUint32(0, w.len);
  w.view.setUint8(4, VERSION);
  w.view.setUint8(5, code);
  const hasReq = frame.req !== undefined && frame.req !== null;
  w.view.setUint16(6, hasReq ? FLAG_REQ : 0);
  w.view.setBigUint64(8, hasReq ? BigInt(checkNumber(frame.req, 'req')) : 0n);
  return w.bytes.slice(0, w.len);
}

function viewOf(bytes) {
  if (bytes instanceof ArrayBuffer) return new DataView(bytes);
  if (ArrayBuffer.isView(bytes)) return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  throw new CodecError('binary input must be an ArrayBuffer or a typed array');
}

/**
 * Decodes every frame of one binary WebSocket message (frames back to back). A bad frame
 * throws a CodecError (carrying `req` when its header could be read); with `onError`, a bad
 * frame whose length still frames it is reported there and skipped, and decoding goes on.
 */
export function decode(bytes, onError) {
  const view = viewOf(bytes);
  const frames = [];
  let pos = 0;
  while (pos < view.byteLength) {
    if (view.byteLength - pos < HEADER_BYTES) {
      const e = new CodecError('truncated header');
      if (!onError) throw e;
      onError(e);
      break;
    }
    const len = view.getUint32(pos);
    const end = pos + len;
    try {
      frames.push(decodeAt(view, pos, end));
    } catch (e) {
      if (!onError) throw e;
      onError(e);
      if (len < HEADER_BYTES || end > view.byteLength) break;
    }
    pos = end;
  }
  return frames;
}

function decodeAt(view, pos, end) {
  const flags = view.getUint16(pos + 6);
  const reqBig = view.getBigUint64(pos + 8);
  const hasReq = (flags & FLAG_REQ) !== 0;
  // The req is known as soon as the header is, so an error about the rest can still name it.
  const req = hasReq && reqBig <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(reqBig) : undefined;
  try {
    if (view.getUint8(pos + 4) !== VERSION) throw new CodecError(`unknown version ${view.getUint8(pos + 4)}`);
    if ((flags & ~FLAG_REQ) !== 0) throw new CodecError('reserved flag bits are set');
    if (!hasReq && reqBig !== 0n) throw new CodecError('req set without its flag');
    if (end - pos < HEADER_BYTES) throw new CodecError('frame shorter than its header');
    if (end > view.byteLength) throw new CodecError('truncated frame');
    if (hasReq && req === undefined) throw new CodecError('req above 2^53-1');
    const op = OP_NAMES.get(view.getUint8(pos + 5));
    if (op === undefined) throw new CodecError(`unknown op 0x${view.getUint8(pos + 5).toString(16)}`);
    const r = new Reader(view, pos + HEADER_BYTES, end);
    const body = READ[op](r);
    if (r.pos !== end) throw new CodecError('bytes after the body');
    return hasReq ? { op, req, ...body } : { op, ...body };
  } catch (e) {
    if (e instanceof CodecError && req !== undefined) e.req = req;
    throw e;
  }
}
