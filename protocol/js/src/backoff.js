// Reconnect delays: exponential backoff with full jitter (the "Full Jitter" of AWS's
// "Exponential Backoff And Jitter"): attempt n waits a uniformly random time in
// [0, min(maxMs, minMs * 2^n)). Randomness spreads a crowd of clients that lost the same
// server over the window instead of having them all return at the same instant.

/** The default reconnect window: 0.5 s growing to 20 s. */
export const BACKOFF_DEFAULTS = Object.freeze({ minMs: 500, maxMs: 20000 });

/** The upper bound of the delay before reconnect attempt `attempt` (0-based). */
export function backoffCapMs(attempt, { minMs, maxMs } = BACKOFF_DEFAULTS) {
  // 2^30 is past any sensible maxMs / minMs ratio; clamping keeps the power finite.
  const exp = Math.min(Math.max(attempt, 0), 30);
  return Math.min(maxMs, minMs * 2 ** exp);
}

/** The delay before reconnect attempt `attempt`; `random` returns a number in [0, 1). */
export function backoffDelayMs(attempt, options = BACKOFF_DEFAULTS, random = Math.random) {
  return Math.floor(random() * backoffCapMs(attempt, options));
}
