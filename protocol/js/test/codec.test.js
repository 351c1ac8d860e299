// Both codecs against the examples of docs/protocol.md: every ```hex block (first line `# ` and
// the frame as one-line JSON, then hex groups, each line optionally ending in `# comment`) must
// encode to exactly its bytes and decode back to its JSON; every line of every ```json block
// must survive JSON → binary → JSON unchanged.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';

import { binary, json, CodecError } from '../src/index.js';

const DOC = new URL('../../../docs/protocol.md', import.meta.url);

/** The fenced blocks of `markdown` whose info string is `info`, as lists of lines. */
function blocks(markdown, info) {
  const found = [];
  let current = null;
  for (const line of markdown.split('\n')) {
    if (current === null && line.trim() === '```' + info) current = [];
    else if (current !== null && line.trim() === '```') {
      found.push(current);
      current = null;
    } else if (current !== null) current.push(line);
  }
  return found;
}

/** A ```hex block as {frame, bytes}. */
function hexVector(lines) {
  const [first, ...rest] = lines;
  assert.match(first, /^# \{/, 'a hex block starts with "# " and the frame as JSON');
  const hex = rest
    .map((l) => l.replace(/#.*$/, ''))
    .join('')
    .replace(/\s+/g, '');
  assert.match(hex, /^([0-9a-f]{2})+$/i, `bad hex in block ${first}`);
  return { frame: JSON.parse(first.slice(2)), bytes: Uint8Array.from(hex.match(/../g).map((b) => parseInt(b, 16))) };
}

const hexOf = (bytes) => Buffer.from(bytes).toString('hex');

test('the binary codec matches every hex example of docs/protocol.md', () => {
  const vectors = blocks(readFileSync(DOC, 'utf8'), 'hex').map(hexVector);
  assert.ok(vectors.length >= 5, `expected the doc's hex examples, found ${vectors.length}`);
  for (const { frame, bytes } of vectors) {
    assert.equal(hexOf(binary.encode(frame)), hexOf(bytes), `encoding ${JSON.stringify(frame)}`);
    assert.deepEqual(binary.decode(bytes), [frame], `decoding ${JSON.stringify(frame)}`);
  }
});

test('every JSON example of docs/protocol.md survives the binary codec', () => {
  const lines = blocks(readFileSync(DOC, 'utf8'), 'json')
    .flat()
    .filter((l) => l.trim() !== '');
  assert.ok(lines.length >= 5, `expected the doc's JSON examples, found ${lines.length}`);
  for (const line of lines) {
    const frame = json.decode(line);
    // The binary form of history has one way to say "newest": no before (or before 0), limit
    // given (default 50).
    const expected = frame.op === 'history' ? { limit: 50, ...frame } : frame;
    if (expected.before === 0) delete expected.before;
    assert.deepEqual(binary.decode(binary.encode(frame)), [expected], line);
    assert.deepEqual(json.decode(json.encode(frame)), frame);
  }
});

test('frames back to back in one message decode in order', () => {
  const a = binary.encode({ op: 'pong', req: 1 });
  const b = binary.encode({ op: 'receipt', conv: '7', uid: 'agent:7', seq: 3 });
  const joined = new Uint8Array([...a, ...b]);
  assert.deepEqual(binary.decode(joined), [
    { op: 'pong', req: 1 },
    { op: 'receipt', conv: '7', uid: 'agent:7', seq: 3 },
  ]);
});

test('64-bit ids keep every digit; numbers past 2^53 - 1 are refused, not rounded', () => {
  const conv = '18446744073709551615';
  const frame = { op: 'send_ok', req: 1, conv, seq: Number.MAX_SAFE_INTEGER, ts: 1 };
  assert.deepEqual(binary.decode(binary.encode(frame)), [frame]);
  const big = binary.encode(frame);
  new DataView(big.buffer).setBigUint64(24, 1n << 53n); // seq := 2^53
  assert.throws(() => binary.decode(big), CodecError);
  assert.throws(() => binary.encode({ ...frame, seq: 2 ** 53 }), CodecError);
  assert.throws(() => binary.encode({ ...frame, conv: '18446744073709551616' }), CodecError);
  assert.throws(() => json.decode('{"op":"send_ok","conv":"7","seq":9007199254740993,"ts":1}'), CodecError);
});

test('bad frames are typed errors that keep their req', () => {
  const ok = binary.encode({ op: 'send', req: 5, conv: '7', cmid: 'c', kind: 'text', body: 'é' });
  const cases = {
    truncated: ok.slice(0, ok.length - 1),
    'unknown op': Uint8Array.from(ok, (b, i) => (i === 5 ? 0x7f : b)),
    'bad version': Uint8Array.from(ok, (b, i) => (i === 4 ? 2 : b)),
    'bad utf-8': Uint8Array.from(ok, (b, i) => (i === ok.length - 1 ? 0xff : b)),
  };
  for (const [name, bytes] of Object.entries(cases)) {
    assert.throws(() => binary.decode(bytes), (e) => e instanceof CodecError && (name === 'truncated' || e.req === 5), name);
  }
  const errors = [];
  const two = new Uint8Array([...cases['unknown op'], ...binary.encode({ op: 'pong' })]);
  assert.deepEqual(binary.decode(two, (e) => errors.push(e)), [{ op: 'pong' }]);
  assert.equal(errors.length, 1);
  assert.throws(() => json.decode('[1]'), CodecError);
  assert.throws(() => json.decode('{"op":'), CodecError);
});

test('encoding refuses what the contract does not allow', () => {
  const send = { op: 'send', conv: '7', cmid: 'c', kind: 'text', body: 'x' };
  assert.throws(() => binary.encode({ ...send, shop: '1' }), CodecError);
  assert.throws(() => binary.encode({ ...send, cmid: 'x'.repeat(129) }), CodecError);
  assert.throws(() => binary.encode({ ...send, conv: '07' }), CodecError);
  assert.throws(() => binary.encode({ op: 'history', conv: '7', limit: 201 }), CodecError);
  assert.throws(() => binary.encode({ op: 'login', token: 't', device: 'fax' }), CodecError);
  assert.throws(() => binary.encode({ op: 'nope' }), CodecError);
});

test('no input makes the decoders throw anything but a CodecError', () => {
  // A fixed-seed generator (mulberry32), so a failure is reproducible.
  let seed = 7;
  const random = () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const valid = [
    { op: 'convs_ok', req: 3, convs: [{ conv: '7', type: 'shop', shop: '42', members: ['buyer:1', 'agent:7'], member_count: 2, last_seq: 2, read_seq: 1, unread: 1, last: { conv: '7', seq: 2, from: 'agent:7', ts: 5, kind: 'text', body: 'hé', cmid: 'c' } }] },
    { op: 'history_ok', req: 4, conv: '7', msgs: [{ conv: '7', seq: 1, from: 'buyer:1', ts: 5, kind: 'text', body: 'x', cmid: 'c' }] },
    { op: 'login_ok', req: 1, uid: 'agent:7', device_id: '288230376151711744', node_id: '1', ts: 1 },
    { op: 'send', req: 2, user: 'buyer:9', cmid: 'c', kind: 'text', body: 'hello' },
  ].map((f) => binary.encode(f));
  let decoded = 0;
  for (let round = 0; round < 5000; round++) {
    const base = valid[round % valid.length];
    const bytes = Uint8Array.from(base);
    // Flip a few bytes, or cut the frame short, or both.
    for (let i = 0, n = 1 + Math.floor(random() * 4); i < n; i++) bytes[Math.floor(random() * bytes.length)] = Math.floor(random() * 256);
    const input = random() < 0.3 ? bytes.slice(0, Math.floor(random() * bytes.length)) : bytes;
    try {
      binary.decode(input);
      decoded++;
    } catch (e) {
      assert.ok(e instanceof CodecError, `round ${round}: ${e}`);
    }
    try {
      binary.decode(input, () => {});
    } catch (e) {
      assert.fail(`round ${round}: decode with onError threw ${e}`);
    }
    const text = new TextDecoder().decode(input);
    try {
      json.decode(text);
    } catch (e) {
      assert.ok(e instanceof CodecError, `round ${round}: ${e}`);
    }
  }
  assert.ok(decoded > 0, 'some mutations still decode (the test reaches the bodies)');
});
