// The client against the real gateway binary: a buyer and an agent chat; the gateway restarts
// while messages are sent and every client ends up with every message once, in order; a send
// whose reply is lost is stored once.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';

import { Client } from '../src/index.js';
import { Gateway, Proxy, token, until } from './gateway.js';

if (typeof globalThis.WebSocket !== 'function') {
  throw new Error('these tests need the global WebSocket: run node with --experimental-websocket (Node 20) or Node >= 22');
}

const gateways = [];
const clients = [];
after(async () => {
  // Clients of a failed test would otherwise keep reconnecting and the process alive.
  for (const c of clients) c.disconnect();
  for (const g of gateways) await g.close();
});

async function gateway() {
  const g = await Gateway.start();
  gateways.push(g);
  return g;
}

let shopCounter = 100;
/** A shop id of its own per test, so tests never share conversations. */
const newShop = () => String(shopCounter++);

function client(url, uid, shop, options = {}) {
  const c = new Client({ urls: [url], getToken: async () => token(uid, shop), onlineTarget: null, ...options });
  clients.push(c);
  c.received = [];
  c.on('msg', (m, info) => c.received.push({ ...m, ...info }));
  c.connect();
  return c;
}

const seqs = (c, conv) => c.received.filter((m) => m.conv === conv).map((m) => m.seq);
const bodies = (c, conv) => c.received.filter((m) => m.conv === conv).map((m) => m.body);

for (const codec of ['json', 'binary']) {
  test(`a buyer and an agent chat, with receipts (${codec})`, async () => {
    const g = await gateway();
    const shop = newShop();
    const agent = client(g.wsUrl, 'agent:7', shop, { codec });
    const buyer = client(g.wsUrl, 'buyer:1001', undefined, { codec });
    const members = [];
    const receipts = [];
    agent.on('members', (m) => members.push(m));
    buyer.on('receipt', (r) => receipts.push(r));
    await until(() => agent.state === 'connected', 'the agent to log in');
    const hello = await buyer.send({ shop, body: 'hello' });
    assert.equal(hello.seq, 1);
    const conv = hello.conv;
    await until(() => seqs(agent, conv).length === 1, "the agent to get the buyer's message");
    assert.deepEqual(members[0].members.sort(), ['agent:7', 'buyer:1001']);
    assert.deepEqual((await agent.read(conv, 1)).seq, 1);
    await until(() => receipts.length > 0, 'the read receipt');
    assert.deepEqual(receipts[0], { conv, uid: 'agent:7', seq: 1 });
    const reply = await agent.send({ conv, body: 'how can I help?' });
    assert.equal(reply.seq, 2);
    await until(() => seqs(buyer, conv).length === 2, "the buyer to get the agent's reply");
    assert.deepEqual(bodies(buyer, conv), ['hello', 'how can I help?']);
    assert.deepEqual(bodies(agent, conv), ['hello', 'how can I help?']);
    assert.deepEqual(
      buyer.received.map((m) => m.own),
      [true, false],
    );
    const page = await buyer.history(conv, { before: 2 });
    assert.deepEqual(page.msgs.map((m) => m.body), ['hello']);
    const { convs } = await agent.convs();
    assert.equal(convs.find((c) => c.conv === conv).last_seq, 2);
    buyer.disconnect();
    agent.disconnect();
  });
}

test('after the gateway restarts, messages sent meanwhile reach everyone once, in order', async () => {
  const g = await gateway();
  const shop = newShop();
  // The agent reaches the gateway through a proxy that can keep it out, so that messages
  // certainly arrive while it is away and can only come back through history.
  const proxy = await Proxy.start(g.port);
  const agent = client(proxy.wsUrl, 'agent:8', shop, { backoff: { minMs: 50, maxMs: 200 } });
  const buyer = client(g.wsUrl, 'buyer:2002', undefined, { backoff: { minMs: 50, maxMs: 200 } });
  await until(() => agent.state === 'connected', 'the agent to log in');
  const first = await buyer.send({ shop, body: 'm1' });
  const conv = first.conv;
  await buyer.send({ conv, body: 'm2' });
  await until(() => seqs(agent, conv).length === 2, 'the first messages');

  proxy.mode = 'refuse';
  await g.restart('SIGKILL');
  // Sent while the buyer may still be reconnecting: they wait and go out after login.
  const sends = ['m3', 'm4', 'm5'].map((body) => buyer.send({ conv, body }));
  const acks = await Promise.all(sends);
  assert.deepEqual(acks.map((a) => a.seq), [3, 4, 5]);
  assert.equal(agent.state, 'connecting');
  proxy.mode = 'pass';
  await until(() => seqs(agent, conv).length === 5, 'the agent to recover m3..m5');
  await agent.send({ conv, body: 'm6' });
  await until(() => seqs(buyer, conv).length === 6, 'the buyer to get m6');

  assert.deepEqual(seqs(agent, conv), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(bodies(agent, conv), ['m1', 'm2', 'm3', 'm4', 'm5', 'm6']);
  assert.deepEqual(
    agent.received.filter((m) => m.recovered).map((m) => m.seq),
    [3, 4, 5],
  );
  assert.deepEqual(seqs(buyer, conv), [1, 2, 3, 4, 5, 6]);
  const stored = await buyer.history(conv, { after: 0 });
  assert.deepEqual(stored.msgs.map((m) => m.body), ['m1', 'm2', 'm3', 'm4', 'm5', 'm6']);
  buyer.disconnect();
  agent.disconnect();
  await proxy.close();
});

test('a send whose reply is lost is retried with the same cmid and stored once', async () => {
  const g = await gateway();
  const proxy = await Proxy.start(g.port);
  const buyer = client(proxy.wsUrl, 'buyer:3003', undefined, {
    requestTimeoutMs: 300,
    pingIntervalMs: 200,
    pongTimeoutMs: 300,
    backoff: { minMs: 50, maxMs: 200 },
  });
  await until(() => buyer.state === 'connected', 'login');
  const shop = newShop();
  const first = await buyer.send({ shop, body: 'before' });
  // From now on the gateway's answers vanish: the send is stored, its send_ok never arrives.
  proxy.mode = 'blackhole';
  const lost = buyer.send({ conv: first.conv, body: 'once' });
  await until(() => buyer.stats.sendAttempts >= 3, 'the send to be written again');
  // The client notices the dead connection (no pong) and reconnects through a sane network.
  proxy.mode = 'pass';
  proxy.cut();
  const ok = await lost;
  assert.equal(ok.seq, 2);
  const page = await buyer.history(first.conv, { after: 0 });
  assert.deepEqual(page.msgs.map((m) => [m.seq, m.body, m.cmid]), [
    [1, 'before', page.msgs[0].cmid],
    [2, 'once', lost.cmid],
  ]);
  assert.deepEqual(seqs(buyer, first.conv), [1, 2]);
  buyer.disconnect();
  await proxy.close();
});

test('a second connection of the same device kicks the first, which does not come back', async () => {
  const g = await gateway();
  const first = client(g.wsUrl, 'buyer:4004');
  await until(() => first.state === 'connected', 'the first login');
  const kicked = [];
  first.on('kicked', (k) => kicked.push(k));
  const second = client(g.wsUrl, 'buyer:4004');
  await until(() => first.state === 'disconnected', 'the kick');
  assert.equal(kicked.length, 1);
  await until(() => second.state === 'connected', 'the second login');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(first.state, 'disconnected');
  await assert.rejects(first.convs(), { code: 'kicked' });
  second.disconnect();
});
