// Reconnect delays: exponential growth from 0.5 s to a 20 s ceiling, full jitter below it.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { backoffCapMs, backoffDelayMs, BACKOFF_DEFAULTS } from '../src/index.js';

test('the window doubles from 0.5 s and stops at 20 s', () => {
  const caps = Array.from({ length: 10 }, (_, n) => backoffCapMs(n));
  assert.deepEqual(caps, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000, 20000]);
  assert.equal(backoffCapMs(1e9), BACKOFF_DEFAULTS.maxMs);
  assert.equal(backoffCapMs(-1), BACKOFF_DEFAULTS.minMs);
});

test('full jitter: any delay from 0 up to the window, never beyond', () => {
  assert.equal(backoffDelayMs(3, BACKOFF_DEFAULTS, () => 0), 0);
  assert.equal(backoffDelayMs(3, BACKOFF_DEFAULTS, () => 0.5), 2000);
  assert.equal(backoffDelayMs(3, BACKOFF_DEFAULTS, () => 0.999999), 3999);
  // A fixed-seed generator (mulberry32) spreads delays over the whole window.
  let seed = 42;
  const random = () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const delays = Array.from({ length: 1000 }, () => backoffDelayMs(8, BACKOFF_DEFAULTS, random));
  assert.ok(delays.every((d) => d >= 0 && d < 20000));
  assert.ok(Math.min(...delays) < 2000 && Math.max(...delays) > 18000);
});

test('custom windows are honoured', () => {
  assert.deepEqual([0, 1, 2, 3].map((n) => backoffCapMs(n, { minMs: 100, maxMs: 250 })), [100, 200, 250, 250]);
});
