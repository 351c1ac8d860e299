// The client against an in-process fake gateway: matching replies, waiting while offline,
// ordered and deduplicated delivery, recovery, resent sends, and when it gives up.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { Client, ChinwagError } from '../src/index.js';
import { FakeNet, tick, msg } from './fake.js';

function client(net, options = {}) {
  const c = new Client({
    urls: ['ws://gateway/ws'],
    token: 't1',
    WebSocket: net.WebSocket,
    random: () => 0, // Reconnect at once.
    onlineTarget: null,
    ...options,
  });
  c.delivered = [];
  c.on('msg', (m, info) => c.delivered.push({ ...m, ...info }));
  return c;
}

async function connected(net, options, uid) {
  const c = client(net, options);
  c.connect();
  const ws = await net.nextSocket();
  await ws.accept(uid);
  assert.equal(c.state, 'connected');
  return { c, ws };
}

const seqs = (c, conv = '7') => c.delivered.filter((m) => m.conv === conv).map((m) => m.seq);

test('replies are matched to their requests by req, in any order', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net);
  const a = c.history('7');
  const b = c.history('8');
  const e = c.read('9', 1);
  const [ra, rb, re] = [await ws.next(), await ws.next(), await ws.next()];
  assert.notEqual(ra.req, rb.req);
  ws.push({ op: 'error', req: re.req, code: 'not_member', message: 'no' });
  ws.push({ op: 'history_ok', req: rb.req, conv: '8', msgs: [] });
  ws.push({ op: 'history_ok', req: ra.req, conv: '7', msgs: [msg('7', 1)] });
  assert.equal((await a).conv, '7');
  assert.equal((await b).conv, '8');
  await assert.rejects(e, (err) => err instanceof ChinwagError && err.code === 'not_member' && err.req === re.req);
  c.disconnect();
});

test('a request without a reply times out', async () => {
  const net = new FakeNet();
  const { c } = await connected(net, { requestTimeoutMs: 20 });
  await assert.rejects(c.convs(), { code: 'timeout' });
  c.disconnect();
});

test('calls made while disconnected wait for the connection, bounded in time and count', async () => {
  const net = new FakeNet();
  const c = client(net, { offlineWaitMs: 10000, pendingMax: 2 });
  const waiting = c.convs();
  const second = c.ping();
  await assert.rejects(c.read('7', 1), { code: 'queue_full' });
  c.connect();
  const ws = await net.nextSocket();
  await ws.accept();
  const convs = await ws.next();
  assert.equal(convs.op, 'convs');
  ws.push({ op: 'convs_ok', req: convs.req, convs: [] });
  assert.deepEqual((await waiting).convs, []);
  const ping = await ws.next();
  ws.push({ op: 'pong', req: ping.req });
  await second;
  c.disconnect();

  const late = client(new FakeNet(), { offlineWaitMs: 20 });
  await assert.rejects(late.convs(), { code: 'timeout' });
});

test('pushes are delivered in seq order, each once', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net);
  for (const seq of [1, 2, 2, 1, 3]) ws.push({ op: 'msg', ...msg('7', seq) });
  assert.deepEqual(seqs(c), [1, 2, 3]);
  assert.equal(c.stats.duplicatesDropped, 2);
  c.disconnect();
});

test('a gap in the pushes is filled from history before the later push is delivered', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net);
  ws.push({ op: 'msg', ...msg('7', 1) });
  ws.push({ op: 'msg', ...msg('7', 4) });
  assert.deepEqual(seqs(c), [1]);
  const h = await ws.next();
  assert.deepEqual({ op: h.op, conv: h.conv, after: h.after }, { op: 'history', conv: '7', after: 1 });
  ws.push({ op: 'msg', ...msg('7', 5) }); // Arrives while history is read: waits its turn.
  ws.push({ op: 'history_ok', req: h.req, conv: '7', msgs: [msg('7', 2), msg('7', 3), msg('7', 4)] });
  await tick();
  assert.deepEqual(seqs(c), [1, 2, 3, 4, 5]);
  c.disconnect();
});

test('after a reconnect, missed messages come from history in order, before new pushes, each once', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net);
  ws.push({ op: 'msg', ...msg('7', 1) });
  ws.push({ op: 'msg', ...msg('7', 2) });
  ws.drop(1006);
  assert.equal(c.state, 'connecting');
  const ws2 = await net.nextSocket();
  await ws2.accept();
  const h = await ws2.next();
  assert.deepEqual({ op: h.op, conv: h.conv, after: h.after }, { op: 'history', conv: '7', after: 2 });
  // A new push overtakes the history reply; it must still come after the recovered ones.
  ws2.push({ op: 'msg', ...msg('7', 5) });
  ws2.push({ op: 'history_ok', req: h.req, conv: '7', msgs: [msg('7', 2), msg('7', 3), msg('7', 4), msg('7', 5)] });
  await tick();
  assert.deepEqual(seqs(c), [1, 2, 3, 4, 5]);
  assert.deepEqual(
    c.delivered.map((m) => m.recovered),
    [false, false, true, true, true],
  );
  ws2.push({ op: 'msg', ...msg('7', 5) });
  ws2.push({ op: 'msg', ...msg('7', 6) });
  assert.deepEqual(seqs(c), [1, 2, 3, 4, 5, 6]);
  c.disconnect();
});

test('recovery pages through history until it is empty', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net, { historyPageLimit: 2 });
  ws.push({ op: 'msg', ...msg('7', 1) });
  ws.drop(1001);
  const ws2 = await net.nextSocket();
  await ws2.accept();
  for (const page of [[2, 3], [4], []]) {
    const h = await ws2.next();
    assert.equal(h.after, page.length ? page[0] - 1 : 4);
    ws2.push({ op: 'history_ok', req: h.req, conv: '7', msgs: page.map((s) => msg('7', s)) });
    await tick();
  }
  assert.deepEqual(seqs(c), [1, 2, 3, 4]);
  c.disconnect();
});

test('a send whose connection dropped is written again with the same cmid, and delivered once', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net, {}, 'buyer:1');
  const sent = c.send({ shop: '42', body: 'hello' });
  const first = await ws.next();
  assert.equal(first.cmid, sent.cmid);
  ws.drop(1006);
  const ws2 = await net.nextSocket();
  await ws2.accept('buyer:1');
  const again = await ws2.next();
  assert.equal(again.op, 'send');
  assert.equal(again.cmid, first.cmid);
  ws2.push({ op: 'send_ok', req: again.req, conv: '7', seq: 1, ts: 5 });
  const ok = await sent;
  assert.equal(ok.seq, 1);
  assert.deepEqual(c.delivered.map((m) => [m.seq, m.from, m.cmid, m.own]), [[1, 'buyer:1', first.cmid, true]]);
  c.disconnect();
});

test('a send made while offline goes out after login; a lost reply is retried on the same connection', async () => {
  const net = new FakeNet();
  const c = client(net, { requestTimeoutMs: 20 });
  const sent = c.send({ conv: '7', body: 'offline', cmid: 'x-1' });
  c.connect();
  const ws = await net.nextSocket();
  await ws.accept();
  const a = await ws.next();
  const b = await ws.next(); // The first reply "was lost": the client retried.
  assert.deepEqual([a.op, a.cmid, b.op, b.cmid], ['send', 'x-1', 'send', 'x-1']);
  assert.notEqual(a.req, b.req);
  // The late reply to the first attempt is as good as any.
  ws.push({ op: 'send_ok', req: a.req, conv: '7', seq: 3, ts: 5 });
  assert.equal((await sent).seq, 3);
  ws.push({ op: 'send_ok', req: b.req, conv: '7', seq: 3, ts: 5 });
  assert.equal(c.stats.sendAttempts >= 2, true);
  assert.deepEqual(seqs(c), [3]);
  c.disconnect();
});

test('a send refused for good rejects; rate_limited is retried', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net, { retryDelayMs: 5 });
  const refused = c.send({ conv: '9', body: 'x' });
  const r = await ws.next();
  ws.push({ op: 'error', req: r.req, code: 'not_member', message: 'no' });
  await assert.rejects(refused, { code: 'not_member' });
  const limited = c.send({ conv: '7', body: 'y' });
  const l1 = await ws.next();
  ws.push({ op: 'error', req: l1.req, code: 'rate_limited', message: 'slow down' });
  const l2 = await ws.next();
  assert.equal(l2.cmid, l1.cmid);
  ws.push({ op: 'send_ok', req: l2.req, conv: '7', seq: 1, ts: 1 });
  assert.equal((await limited).seq, 1);
  c.disconnect();
});

test('kicked: no reconnect, pending calls fail with kicked', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net);
  const events = [];
  c.on('kicked', (k) => events.push(k.reason));
  const pending = c.send({ conv: '7', body: 'x' });
  await ws.next();
  ws.push({ op: 'kicked', reason: 'logged in elsewhere' });
  ws.drop(4001);
  await assert.rejects(pending, { code: 'kicked' });
  await tick(20);
  assert.equal(c.state, 'disconnected');
  assert.deepEqual(events, ['logged in elsewhere']);
  assert.equal(net.sockets.length, 1);
  await assert.rejects(c.convs(), { code: 'kicked' });
});

test('a refused token is renewed once with getToken; a refused fresh token stops', async () => {
  const net = new FakeNet();
  const tokens = ['t2', 't3'];
  const c = client(net, { token: 't1', getToken: async () => tokens.shift() });
  const states = [];
  c.on('state', (s) => states.push(s.state + (s.reason ? `:${s.reason}` : '')));
  c.connect();
  const ws = await net.nextSocket();
  ws.open();
  const l1 = await ws.next();
  assert.equal(l1.token, 't1');
  ws.push({ op: 'error', req: l1.req, code: 'unauthorized', message: 'token has expired' });
  ws.drop(1008);
  const ws2 = await net.nextSocket();
  const l2 = await ws2.accept();
  assert.equal(l2.token, 't2');
  assert.equal(c.state, 'connected');
  ws2.drop(1006);
  const ws3 = await net.nextSocket();
  ws3.open();
  const l3 = await ws3.next();
  assert.equal(l3.token, 't2'); // The token that worked is used again.
  ws3.push({ op: 'error', req: l3.req, code: 'unauthorized', message: 'revoked' });
  ws3.drop(1008);
  const ws4 = await net.nextSocket();
  ws4.open();
  const l4 = await ws4.next();
  assert.equal(l4.token, 't3');
  ws4.push({ op: 'error', req: l4.req, code: 'unauthorized', message: 'revoked' });
  ws4.drop(1008);
  await tick(20);
  assert.equal(c.state, 'disconnected');
  assert.equal(states.at(-1), 'disconnected:unauthorized');
  assert.equal(net.sockets.length, 4);
});

test('a connection whose pongs stop is dropped and replaced', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net, { pingIntervalMs: 10, pongTimeoutMs: 10 });
  const ping = await ws.next();
  assert.equal(ping.op, 'ping');
  const ws2 = await net.nextSocket(); // No pong: the client gave up on ws.
  assert.notEqual(ws2, ws);
  assert.equal(ws.closedByClient !== null, true);
  c.disconnect();
});

test('backoff grows between failed attempts and the online event cuts it short', async () => {
  const net = new FakeNet();
  const online = new EventTarget();
  const c = client(net, { onlineTarget: online, random: () => 0.999, backoff: { minMs: 60000, maxMs: 60000 } });
  const retries = [];
  c.on('state', (s) => s.retryInMs !== undefined && retries.push(s.retryInMs));
  c.connect();
  const ws = await net.nextSocket();
  ws.drop(1006);
  assert.equal(retries.length, 1);
  assert.equal(retries[0] > 50000, true);
  await tick(10);
  assert.equal(net.sockets.length, 1);
  online.dispatchEvent(new Event('online'));
  const ws2 = await net.nextSocket();
  await ws2.accept();
  assert.equal(c.state, 'connected');
  c.disconnect();
});

test('several URLs are tried in turn', async () => {
  const net = new FakeNet();
  const c = client(net, { urls: ['ws://a/ws', 'ws://b/ws'] });
  c.connect();
  const a = await net.nextSocket();
  a.drop(1006);
  const b = await net.nextSocket();
  assert.deepEqual([a.url, b.url], ['ws://a/ws', 'ws://b/ws']);
  await b.accept();
  assert.equal(c.state, 'connected');
  c.disconnect();
});

test('a node that dies under a connected client: the next URL takes over, catches up, and the list wraps', async () => {
  const net = new FakeNet();
  const urls = ['ws://node-1/ws', 'ws://node-2/ws', 'ws://node-3/ws'];
  const { c, ws } = await connected(net, { urls });
  assert.equal(ws.url, urls[0]);
  ws.push({ op: 'msg', ...msg('7', 1) });
  const sent = c.send({ conv: '7', body: 'in flight when node 1 died' });
  const first = await ws.next();
  assert.equal(first.op, 'send');
  ws.drop(1006); // node 1 is killed
  const two = await net.nextSocket();
  assert.equal(two.url, urls[1]);
  two.drop(1006); // node 2 refuses too
  const three = await net.nextSocket();
  assert.equal(three.url, urls[2]);
  await three.accept();
  // On node 3: the missed messages from history, and the send again with its cmid.
  const frames = [await three.next(), await three.next()];
  const h = frames.find((f) => f.op === 'history');
  const again = frames.find((f) => f.op === 'send');
  assert.deepEqual({ conv: h.conv, after: h.after }, { conv: '7', after: 1 });
  assert.equal(again.cmid, first.cmid, 'the same cmid, so the message is stored once');
  three.push({ op: 'history_ok', req: h.req, conv: '7', msgs: [msg('7', 2)] });
  three.push({ op: 'send_ok', req: again.req, conv: '7', seq: 3, ts: 3 });
  assert.equal((await sent).seq, 3);
  await tick();
  assert.deepEqual(seqs(c), [1, 2, 3]);
  three.drop(1006); // and node 3 dies: back to the first URL
  const back = await net.nextSocket();
  assert.equal(back.url, urls[0]);
  c.disconnect();
});

test('the binary codec carries the same calls and pushes', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net, { codec: 'binary' });
  const h = c.history('7', { after: 0 });
  const frame = await ws.next();
  assert.deepEqual(frame, { op: 'history', req: frame.req, conv: '7', after: 0, limit: 50 });
  ws.push({ op: 'history_ok', req: frame.req, conv: '7', msgs: [msg('7', 1)] }, { asBinary: true });
  assert.deepEqual((await h).msgs, [msg('7', 1)]);
  ws.push({ op: 'msg', ...msg('7', 2) }, { asBinary: true });
  assert.deepEqual(seqs(c), [2]);
  c.disconnect();
});

test('a reply with a seq beyond 2^53 is an error, not a rounded number', async () => {
  const net = new FakeNet();
  const { c, ws } = await connected(net);
  const errors = [];
  c.on('error', (e) => errors.push(e));
  ws.onmessage({ data: '{"op":"msg","conv":"7","seq":9007199254740993,"from":"agent:7","ts":1,"kind":"text","body":"x","cmid":"c"}' });
  assert.equal(errors.length, 1);
  assert.deepEqual(c.delivered, []);
  c.disconnect();
});
