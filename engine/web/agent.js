// The agent console: the conversations assigned to this agent, most recently active first, each
// with its unread count; new assignments appear live (`members` pushes); the chat pane shows
// one conversation, loads older messages as one scrolls up, and `Resolve` ends the assignment.

import { params, connect, Status, Thread, atBottom, el, clock, who, learnProfiles } from './common.js';

const p = params();
const $ = (id) => document.getElementById(id);
const status = new Status($('status'));
const client = connect(p, status);
const scroller = $('scroller');

/** conv id → { conv, members, lastSeq, lastTs, preview, unread, thread, list, loaded, oldest } */
const convs = new Map();
let selected = null;

function buyerOf(c) {
  return c.members.find((uid) => !uid.startsWith('agent:')) ?? c.members[0] ?? 'unknown';
}

function entry(conv, members = []) {
  let c = convs.get(conv);
  if (!c) {
    const list = el('ol', { class: 'thread', role: 'log', 'aria-live': 'polite', 'aria-label': 'Conversation' });
    c = { conv, members, lastSeq: 0, lastTs: 0, preview: '', unread: 0, list, thread: new Thread(list, client.uid), loaded: false, oldest: false };
    convs.set(conv, c);
  }
  if (members.length) c.members = members;
  return c;
}

function renderList() {
  const items = [...convs.values()].sort((a, b) => b.lastTs - a.lastTs || Number(b.conv) - Number(a.conv));
  $('convs').replaceChildren(
    ...items.map((c) =>
      el(
        'li',
        {},
        el(
          'button',
          { type: 'button', class: 'conv', 'data-conv': c.conv, 'aria-current': c.conv === selected ? 'true' : null, onclick: () => select(c.conv) },
          el('span', { class: 'name' }, who(buyerOf(c))),
          el('time', { dateTime: c.lastTs ? new Date(c.lastTs).toISOString() : null }, c.lastTs ? clock(c.lastTs) : ''),
          el('span', { class: 'preview' }, c.preview || 'New conversation'),
          c.unread ? el('span', { class: 'badge', 'aria-label': `${c.unread} unread` }, String(c.unread)) : null,
        ),
      ),
    ),
  );
  $('no-convs').hidden = convs.size > 0;
  const total = items.reduce((n, c) => n + c.unread, 0);
  $('total-unread').textContent = String(total);
  $('total-unread').hidden = total === 0;
  document.title = `${total ? `(${total}) ` : ''}Agent console · chinwag`;
}

function readIfSeen() {
  const c = convs.get(selected);
  if (!c || document.visibilityState !== 'visible' || !atBottom(scroller)) return;
  if (c.unread > 0) {
    c.unread = 0;
    client.read(c.conv, Math.max(c.lastSeq, c.thread.lastSeq)).catch(() => {});
    renderList();
  }
}

async function select(conv) {
  const c = convs.get(conv);
  if (!c) return;
  selected = conv;
  $('pane-title').textContent = `${who(buyerOf(c))} · conversation ${conv}`;
  $('resolve').hidden = false;
  $('composer').hidden = false;
  $('older').hidden = true;
  scroller.replaceChildren($('older'), c.list);
  renderList();
  if (!c.loaded) {
    c.loaded = true;
    const page = await client.history(conv, { limit: 30 });
    for (const m of page.msgs) c.thread.add(m);
  }
  c.oldest = c.thread.bySeq.size === 0 || c.thread.firstSeq <= 1;
  if (selected !== conv) return;
  $('older').hidden = c.oldest;
  scroller.scrollTop = scroller.scrollHeight;
  $('text').focus();
  readIfSeen();
}

async function loadOlder() {
  const c = convs.get(selected);
  if (!c || c.oldest || c.loadingOlder || c.thread.bySeq.size === 0) return;
  c.loadingOlder = true;
  const height = scroller.scrollHeight;
  try {
    const page = await client.history(c.conv, { before: c.thread.firstSeq, limit: 30 });
    for (const m of page.msgs) c.thread.add(m);
    c.oldest = page.msgs.length === 0 || c.thread.firstSeq <= 1;
    $('older').hidden = c.oldest;
    scroller.scrollTop += scroller.scrollHeight - height;
  } finally {
    c.loadingOlder = false;
  }
}

function forget(conv) {
  convs.delete(conv);
  if (selected === conv) {
    selected = null;
    $('pane-title').textContent = 'Choose a conversation';
    $('resolve').hidden = true;
    $('composer').hidden = true;
    scroller.replaceChildren($('older'));
    $('older').hidden = true;
  }
  renderList();
}

client.on('login', async (session) => {
  $('who').textContent = `· ${who(session.uid)}`;
  // Assignments made or ended while this page was away are not pushed: ask for the list.
  const reply = await client.convs();
  const present = new Set();
  for (const s of reply.convs.filter((s) => s.type === 'shop')) {
    present.add(s.conv);
    learnProfiles(s.profiles);
    const c = entry(s.conv, s.members);
    c.unread = s.unread;
    c.lastSeq = Math.max(c.lastSeq, s.last_seq);
    if (s.last) {
      c.lastTs = Math.max(c.lastTs, s.last.ts);
      c.preview = s.last.body;
    }
  }
  for (const conv of [...convs.keys()]) if (!present.has(conv)) forget(conv);
  renderList();
});

client.on('members', (m) => {
  if (!m.members.includes(client.uid)) return forget(m.conv);
  const c = entry(m.conv, m.members);
  if (!c.lastTs) c.lastTs = Date.now();
  renderList();
  return undefined;
});

client.on('msg', (m) => {
  const c = entry(m.conv);
  const follow = selected === m.conv && atBottom(scroller);
  c.thread.add(m);
  c.lastSeq = Math.max(c.lastSeq, m.seq);
  c.lastTs = Math.max(c.lastTs, m.ts);
  c.preview = m.body;
  if (m.from === client.uid) c.unread = 0;
  else c.unread += 1;
  if (follow || (selected === m.conv && m.from === client.uid)) scroller.scrollTop = scroller.scrollHeight;
  renderList();
  readIfSeen();
});

client.on('receipt', (r) => {
  const c = convs.get(r.conv);
  if (!c) return;
  if (r.uid === client.uid) {
    c.unread = Math.max(0, c.lastSeq - r.seq); // Read on another device.
    renderList();
  } else {
    c.thread.readUpTo(r.seq);
  }
});

$('composer').addEventListener('submit', (event) => {
  event.preventDefault();
  const c = convs.get(selected);
  const body = $('text').value.trim();
  if (!c || !body) return;
  $('text').value = '';
  const cmid = client.newCmid();
  c.thread.addPending(cmid, body);
  scroller.scrollTop = scroller.scrollHeight;
  client.send({ conv: c.conv, body, cmid }).catch((e) => c.thread.failPending(cmid, e));
});

$('resolve').addEventListener('click', async () => {
  const conv = selected;
  if (!conv) return;
  $('resolve').disabled = true;
  try {
    await client.resolve(conv);
    forget(conv);
  } catch (e) {
    status.show('connected', `Could not resolve: ${e.message}`);
  } finally {
    $('resolve').disabled = false;
  }
});

scroller.addEventListener('scroll', () => {
  if (scroller.scrollTop < 40) loadOlder();
  readIfSeen();
});
$('older').addEventListener('click', loadOlder);
document.addEventListener('visibilitychange', readIfSeen);
window.addEventListener('focus', readIfSeen);
renderList();
