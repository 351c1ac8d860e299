// The names and numbers of the chinwag client contract, shared by both codecs: ops and their
// binary codes, uid kinds, devices, conversation types, error codes, and the checks that keep
// a value in the range the contract allows.

/** Binary op codes (docs/protocol.md, "Ops"). */
export const OPS = Object.freeze({
  login: 0x01,
  send: 0x02,
  read: 0x03,
  resolve: 0x04,
  history: 0x05,
  convs: 0x06,
  ping: 0x07,
  login_ok: 0x81,
  send_ok: 0x82,
  read_ok: 0x83,
  resolve_ok: 0x84,
  history_ok: 0x85,
  convs_ok: 0x86,
  pong: 0x87,
  msg: 0xc1,
  receipt: 0xc2,
  members: 0xc3,
  kicked: 0xc4,
  error: 0xc5,
  notify: 0xc6,
  members_delta: 0xc7,
  conv_profile: 0xc8,
});

export const UID_KINDS = Object.freeze(['buyer', 'wechat', 'agent', 'service']);
export const DEVICES = Object.freeze(['web', 'ios', 'android', 'desktop']);
export const CONV_TYPES = Object.freeze(['shop', 'direct', 'group']);
/** Error codes by their binary number minus one. */
export const ERROR_CODES = Object.freeze([
  'bad_request',
  'unauthorized',
  'not_logged_in',
  'not_member',
  'not_found',
  'too_large',
  'rate_limited',
  'unavailable',
  'internal',
]);

export const CMID_BYTES_MAX = 128;
export const KIND_BYTES_MAX = 64;
export const TOKEN_BYTES_MAX = 4096;
export const HISTORY_LIMIT_MAX = 200;
export const HISTORY_LIMIT_DEFAULT = 50;

const U64_MAX = (1n << 64n) - 1n;
const DECIMAL = /^[0-9]{1,20}$/;

/** A malformed message, from the network or from the caller. */
export class CodecError extends Error {
  constructor(message) {
    super(message);
    this.name = 'CodecError';
  }
}

/**
 * Checks a number field (`seq`, `ts`, `unread`, `req`, `limit`). These are JSON numbers in
 * the contract; a JS number is exact only up to 2^53 - 1, so a larger value is refused here,
 * never silently rounded. 2^53 sequence numbers is 285 years of one message per microsecond.
 */
export function checkNumber(value, field) {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new CodecError(`${field} must be an integer in 0..=2^53-1, got ${value}`);
  }
  return value;
}

/** Checks a 64-bit id carried as a decimal string (`conv`, `shop`, `device_id`, `node_id`). */
export function checkId(value, field) {
  if (typeof value !== 'string' || !DECIMAL.test(value) || BigInt(value) > U64_MAX) {
    throw new CodecError(`${field} must be a decimal u64 string, got ${JSON.stringify(value)}`);
  }
  if (value.length > 1 && value[0] === '0') {
    throw new CodecError(`${field} must be canonical (no leading zero), got ${value}`);
  }
  return value;
}

/** Splits a uid `"kind:id"` into its kind index and its id as a BigInt. */
export function parseUid(value, field = 'uid') {
  if (typeof value !== 'string') throw new CodecError(`${field} must be a string`);
  const colon = value.indexOf(':');
  const kind = UID_KINDS.indexOf(value.slice(0, colon));
  if (colon < 0 || kind < 0) throw new CodecError(`${field} has an unknown kind: ${value}`);
  const id = checkId(value.slice(colon + 1), field);
  return { kind, id: BigInt(id) };
}

const encoder = new TextEncoder();

/** Checks a short string field's length in UTF-8 bytes. */
export function checkString(value, field, bytesMin, bytesMax) {
  if (typeof value !== 'string') throw new CodecError(`${field} must be a string`);
  const bytes = encoder.encode(value).length;
  if (bytes < bytesMin || bytes > bytesMax) {
    throw new CodecError(`${field} must be ${bytesMin}..=${bytesMax} bytes, got ${bytes}`);
  }
  return value;
}
