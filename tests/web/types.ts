// Compiled by `npm run typecheck` (tsc --strict): the client library's declarations
// (protocol/js/src/index.d.ts) must describe how the library is used, for every op, reply,
// push and event. Nothing here runs.

import {
  Client,
  ChinwagError,
  CodecError,
  binary,
  json,
  backoffDelayMs,
  type Frame,
  type Msg,
  type SendOk,
  type ConvsOk,
  type HistoryOk,
  type ReadOk,
  type ResolveOk,
  type Pong,
  type StateEvent,
} from '../../protocol/js/src/index.js';

const client = new Client({ urls: ['ws://127.0.0.1:7000/ws'], getToken: async () => 'jwt', codec: 'binary' });
client.on('state', (e: StateEvent) => e.retryInMs ?? e.reason);
client.on('login', (s) => s.device_id.length + s.ts);
client.on('msg', (m: Msg, info) => (info.recovered || info.own ? m.seq : m.cmid));
client.on('receipt', (r) => r.uid.startsWith('agent:') && r.seq);
client.on('members', (m) => m.members.includes('buyer:1') && m.profiles?.[0]?.nick);
client.on('msg', (m) => m.from_nick ?? m.from);
client.on('conv_profile', (p) => p.name ?? p.conv);
client.on('kicked', (k) => k.reason.length);
client.on('disconnect', (d) => d.code);
client.on('error', (e) => (e instanceof ChinwagError ? e.code : e.message));
const off = client.on('msg', () => {});
off();

async function everyCall(): Promise<void> {
  const sent = client.send({ shop: '42', body: 'hi' });
  const cmid: string = sent.cmid;
  const ok: SendOk = await sent;
  await client.send({ conv: ok.conv, body: 'again', cmid, kind: 'text' });
  await client.send({ user: 'agent:7', body: 'direct' });
  const read: ReadOk = await client.read(ok.conv, ok.seq);
  const resolved: ResolveOk = await client.resolve(ok.conv);
  const page: HistoryOk = await client.history(ok.conv, { before: read.seq, limit: 50 });
  const convs: ConvsOk = await client.convs();
  const pong: Pong = await client.ping();
  const generic: ConvsOk = await client.request({ op: 'convs' });
  const last = convs.convs[0]?.last?.body;
  void [resolved.conv, page.msgs[0]?.from, pong.op, generic.convs, last, client.lastSeq(ok.conv)];
}
void everyCall;

const frames: Frame[] = [
  { op: 'login', req: 1, token: 't', device: 'web' },
  { op: 'history', conv: '7', after: 0 },
  { op: 'msg', conv: '7', seq: 1, from: 'buyer:1', ts: 1, kind: 'text', body: 'b', cmid: 'c' },
  { op: 'receipt', conv: '7', uid: 'agent:7', seq: 1 },
  { op: 'members', conv: '7', members: ['buyer:1', 'agent:7'] },
  { op: 'members', conv: '7', members: ['agent:7'], profiles: [{ uid: 'agent:7', nick: 'Ted' }] },
  { op: 'msg', conv: '7', seq: 2, from: 'agent:7', ts: 1, kind: 'text', body: 'b', cmid: 'd', from_nick: 'Ted', conv_name: 'Tea' },
  { op: 'conv_profile', conv: '7', name: 'Club', avatar: 'https://a/c.png' },
  { op: 'kicked', reason: 'elsewhere' },
  { op: 'error', req: 2, code: 'not_member', message: 'no' },
  { op: 'convs_ok', convs: [{ conv: '7', type: 'shop', shop: '42', members: [], member_count: 0, last_seq: 0, read_seq: 0, unread: 0, last: null }] },
  { op: 'convs_ok', convs: [{ conv: '7', type: 'group', members: ['buyer:1'], member_count: 1, last_seq: 0, read_seq: 0, unread: 0, last: null, name: 'Club', profiles: [{ uid: 'buyer:1', nick: 'Ann' }] }] },
];
for (const frame of frames) {
  const decoded: Frame[] = binary.decode(binary.encode(frame), (e: CodecError) => e.req);
  json.decode(json.encode(decoded[0]!));
}
backoffDelayMs(3, { minMs: 500, maxMs: 20000 }, Math.random);

// @ts-expect-error: a send names exactly one target.
client.send({ conv: '7', shop: '42', body: 'x' });
// @ts-expect-error: ids are strings, not numbers.
client.read(7, 1);
// @ts-expect-error: an unknown op is not a frame.
const bad: Frame = { op: 'nope' };
void bad;
