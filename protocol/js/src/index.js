// chinwag's JavaScript client: an ES module with no dependencies, for browsers and Node >= 20
// (Node 20 needs --experimental-websocket, or pass `WebSocket` in the options).

export { Client, ChinwagError, DEFAULTS, CLOSE_KICKED } from './client.js';
export { backoffDelayMs, backoffCapMs, BACKOFF_DEFAULTS } from './backoff.js';
export { CodecError, OPS, UID_KINDS, DEVICES, CONV_TYPES, ERROR_CODES } from './model.js';
export * as json from './json.js';
export * as binary from './binary.js';
