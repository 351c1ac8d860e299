// The JSON form of docs/protocol.md: one object per text message. Ids are decimal strings and
// stay strings; number fields are checked on the way in, so a value the server sends above
// 2^53 - 1 (which JSON.parse would round) is an error instead of a silently wrong seq.

import { OPS, CodecError } from './model.js';

/** Encodes one message object into the text of one WebSocket message. */
export function encode(frame) {
  if (OPS[frame.op] === undefined) throw new CodecError(`unknown op ${frame.op}`);
  return JSON.stringify(frame);
}

function reviver(key, value) {
  if (typeof value === 'number' && !Number.isSafeInteger(value)) {
    throw new CodecError(`${key || 'value'} is not an integer in 0..=2^53-1`);
  }
  return value;
}

/** Decodes the text of one WebSocket message into a message object. */
export function decode(text) {
  let frame;
  try {
    frame = JSON.parse(text, reviver);
  } catch (e) {
    if (e instanceof CodecError) throw e;
    throw new CodecError(`bad JSON: ${e.message}`);
  }
  if (frame === null || typeof frame !== 'object' || Array.isArray(frame) || typeof frame.op !== 'string') {
    throw new CodecError('a message must be a JSON object with an op');
  }
  return frame;
}
