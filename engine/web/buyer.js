// The buyer view: one conversation with a shop. History loads as one scrolls up; the agent's
// receipts tick one's messages as read; the badge counts the agent's messages not seen yet
// (while the page is hidden or scrolled up); the status line says when the connection is down.

import { params, connect, Status, Thread, atBottom, el, who, learnProfiles } from './common.js';

const p = params();
const $ = (id) => document.getElementById(id);
const status = new Status($('status'));
$('shop-name').textContent = p.shop ? `Shop ${p.shop}` : 'Shop';
document.title = `Chat with shop ${p.shop ?? ''} · chinwag`;

if (!p.shop) {
  status.show('disconnected', 'Open this page with ?shop=ID (and ?uid=buyer:ID when the gateway mints tokens)');
  throw new Error('no shop');
}

const client = connect(p, status);
const scroller = $('scroller');
let thread = null;
let conv = null;
let unread = 0;
let loadingOlder = false;
let oldestLoaded = false;
let initialLoaded = false;

function setUnread(n) {
  unread = n;
  $('unread').textContent = String(n);
  $('unread').hidden = n === 0;
  document.title = `${n ? `(${n}) ` : ''}Chat with shop ${p.shop} · chinwag`;
}

/** Marks everything shown as read when the reader can see it. */
function readIfSeen() {
  if (!conv || !thread || document.visibilityState !== 'visible' || !atBottom(scroller)) return;
  const seq = thread.lastSeq;
  if (unread > 0 || seq > readSent) {
    readSent = seq;
    client.read(conv, seq).catch(() => {});
  }
  setUnread(0);
}
let readSent = 0;

async function loadOlder() {
  if (!conv || loadingOlder || oldestLoaded || thread.bySeq.size === 0) return;
  loadingOlder = true;
  const height = scroller.scrollHeight;
  try {
    const page = await client.history(conv, { before: thread.firstSeq, limit: 30 });
    for (const m of page.msgs) thread.add(m);
    oldestLoaded = page.msgs.length === 0 || thread.firstSeq <= 1;
    $('older').hidden = oldestLoaded;
    scroller.scrollTop += scroller.scrollHeight - height; // Keep the reader's place.
  } finally {
    loadingOlder = false;
  }
}

function show(m, { scroll }) {
  const follow = atBottom(scroller);
  if (!thread.add(m)) return;
  $('empty').hidden = true;
  if (m.from !== client.uid && !(follow && document.visibilityState === 'visible')) setUnread(unread + 1);
  if (scroll || follow) scroller.scrollTop = scroller.scrollHeight;
}

client.on('login', async (session) => {
  if (!thread) thread = new Thread($('thread'), session.uid);
  // The conversation with this shop, if there is one yet (the first send creates it).
  const { convs } = await client.convs();
  const mine = convs.find((c) => c.type === 'shop' && c.shop === p.shop);
  if (!mine) return;
  conv = mine.conv;
  learnProfiles(mine.profiles);
  if (mine.name) $('shop-name').textContent = mine.name;
  if (initialLoaded) return; // After a reconnect the client itself recovers what was missed.
  initialLoaded = true;
  const page = await client.history(conv, { limit: 30 });
  for (const m of page.msgs) thread.add(m);
  oldestLoaded = thread.bySeq.size === 0 || thread.firstSeq <= 1;
  $('older').hidden = oldestLoaded;
  $('empty').hidden = thread.bySeq.size > 0;
  setUnread(Math.min(mine.unread, page.msgs.length));
  scroller.scrollTop = scroller.scrollHeight;
  readIfSeen();
});

client.on('msg', (m) => {
  if (conv === null && m.from === client.uid) conv = m.conv; // The first send made it.
  if (m.conv !== conv) return;
  if (m.conv_name) $('shop-name').textContent = m.conv_name;
  show(m, { scroll: m.from === client.uid });
  readIfSeen();
});

client.on('receipt', (r) => {
  if (r.conv === conv && r.uid !== client.uid) thread.readUpTo(r.seq);
});

client.on('members', (m) => {
  if (m.conv !== conv) return;
  const agents = m.members.filter((uid) => uid.startsWith('agent:'));
  const line = el('li', { class: 'system' }, agents.length ? `${agents.map(who).join(', ')} is here to help` : 'Waiting for an agent…');
  $('thread').append(line);
});

$('composer').addEventListener('submit', (event) => {
  event.preventDefault();
  const body = $('text').value.trim();
  if (!body || !thread) return;
  $('text').value = '';
  const cmid = client.newCmid();
  thread.addPending(cmid, body);
  $('empty').hidden = true;
  scroller.scrollTop = scroller.scrollHeight;
  const target = conv ? { conv } : { shop: p.shop };
  client.send({ ...target, body, cmid }).catch((e) => thread.failPending(cmid, e));
});

scroller.addEventListener('scroll', () => {
  if (scroller.scrollTop < 40) loadOlder();
  readIfSeen();
});
$('older').addEventListener('click', loadOlder);
document.addEventListener('visibilitychange', readIfSeen);
window.addEventListener('focus', readIfSeen);
