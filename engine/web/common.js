// What the buyer view and the agent console share: who the user is and where their token comes
// from, the connection status line, and how a message is drawn.
//
// Tokens: `#token=JWT` in the address (what a shop's backend would hand its page), or, when the
// gateway runs with --web-dev-tokens, `?uid=KIND:ID&shop=ID` and the page mints its own from
// /dev/token (for trying chinwag out only).

import { Client } from '/js/index.js';

/** The page's parameters: uid, shop, codec and the gateway URL. */
export function params() {
  const query = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return {
    uid: query.get('uid'),
    shop: query.get('shop'),
    token: fragment.get('token'),
    codec: query.get('codec') === 'binary' ? 'binary' : 'json',
    gateway: query.get('gateway') ?? `${scheme}//${location.host}/ws`,
  };
}

/** A client for this page's user, connected. */
export function connect(p, status) {
  let handed = p.token;
  const getToken = async () => {
    if (handed) {
      const token = handed;
      handed = null; // Used once; a renewal must come from elsewhere.
      return token;
    }
    if (!p.uid) throw new Error('no token: open this page with #token=… or ?uid=…');
    const query = new URLSearchParams({ uid: p.uid });
    if (p.shop) query.set('shop', p.shop);
    const answer = await fetch(`/dev/token?${query}`);
    if (answer.status === 404) {
      status.show('disconnected', 'This gateway does not mint tokens (start it with --web-dev-tokens, or pass #token=…)');
      throw new Error('dev tokens are off');
    }
    if (!answer.ok) throw new Error(`/dev/token: ${answer.status} ${await answer.text()}`);
    return (await answer.json()).token;
  };
  const client = new Client({ urls: [p.gateway], getToken, codec: p.codec });
  client.on('state', (event) => status.update(event));
  // Registered before the page's own handlers, so a message or member list is drawn with the
  // nicknames it brought.
  client.on('msg', (m) => {
    if (m.from_nick) nicks.set(m.from, m.from_nick);
  });
  client.on('members', (m) => learnProfiles(m.profiles));
  client.on('kicked', () => {
    status.show('kicked', 'This chat was opened in another tab or window, so this one stopped. Reload to use it here.');
    for (const control of document.querySelectorAll('form input, form button, #resolve')) control.disabled = true;
  });
  // Exposed for the browser tests and for curious developers.
  window.chat = { client, delivered: [] };
  client.on('msg', (m, info) => window.chat.delivered.push({ conv: m.conv, seq: m.seq, recovered: info.recovered }));
  client.connect();
  return client;
}

/** The status line: online, connecting, reconnecting (with the delay), or why it stopped. */
export class Status {
  constructor(element) {
    this.element = element;
    this.final = false;
    this.everConnected = false;
  }

  update({ state, reason, retryInMs }) {
    if (this.final) return;
    if (state === 'connected') {
      this.everConnected = true;
      return this.show('connected', 'Online');
    }
    if (state === 'connecting') {
      const again = this.everConnected ? 'Reconnecting' : 'Connecting';
      const when = retryInMs !== undefined ? ` in ${Math.ceil(retryInMs / 1000)} s` : '';
      return this.show('connecting', `${again}${when}… messages you send will go out when the connection is back`);
    }
    if (reason === 'kicked') return undefined; // The kicked handler said it better.
    if (reason === 'unauthorized') return this.show('disconnected', 'The gateway refused the sign-in token');
    return this.show('disconnected', 'Offline');
  }

  show(state, text) {
    if (this.final) return;
    this.final = state === 'kicked' || (state === 'disconnected' && text !== 'Offline');
    this.element.dataset.state = state;
    this.element.textContent = text;
  }
}

/** An element with attributes and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key.startsWith('data-')) node.setAttribute(key, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function clock(ts) {
  return new Date(ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** A readable name for a uid: "Agent 7", "Buyer 1001". */
/** Nicknames the gateway sent (docs/protocol.md, "Profiles"): uid → nickname. */
const nicks = new Map();

/** Remembers the members' nicknames of a `convs_ok` entry or a `members` push. */
export function learnProfiles(profiles) {
  for (const p of profiles ?? []) {
    if (p.nick) nicks.set(p.uid, p.nick);
    else nicks.delete(p.uid);
  }
}

/** A user as people read it: its nickname when the gateway sent one, else "Buyer 1001". */
export function who(uid) {
  const nick = nicks.get(uid);
  if (nick) return nick;
  const [kind, id] = uid.split(':');
  return `${kind[0].toUpperCase()}${kind.slice(1)} ${id}`;
}

/**
 * One conversation's messages in a list element: merges history pages and live messages by
 * seq (each shown once, in order), shows pending sends until they are stored, and read ticks on
 * one's own messages from the other members' receipts.
 */
export class Thread {
  constructor(list, me) {
    this.list = list;
    this.me = me;
    this.bySeq = new Map();
    this.pending = new Map();
    this.readByOthers = 0;
  }

  get firstSeq() {
    return Math.min(...this.bySeq.keys());
  }

  get lastSeq() {
    return this.bySeq.size ? Math.max(...this.bySeq.keys()) : 0;
  }

  /** Shows a send that is not stored yet. */
  addPending(cmid, body) {
    const item = this._item({ from: this.me, body, ts: Date.now() }, 'sending');
    item.dataset.cmid = cmid;
    this.pending.set(cmid, item);
    this.list.append(item);
    return item;
  }

  /** Shows a stored message (from history or live); returns false if it was already shown. */
  add(msg) {
    if (this.bySeq.has(msg.seq)) return false;
    const mine = msg.from === this.me;
    const item = this._item(msg, mine ? (msg.seq <= this.readByOthers ? 'read' : 'sent') : null);
    item.dataset.seq = String(msg.seq);
    this.bySeq.set(msg.seq, item);
    this.pending.get(msg.cmid)?.remove();
    this.pending.delete(msg.cmid);
    // Insert before the first shown message with a higher seq (pending sends stay last).
    let before = null;
    for (const [seq, other] of this.bySeq) if (seq > msg.seq && (!before || seq < Number(before.dataset.seq))) before = other;
    before ??= this.pending.values().next().value ?? null;
    this.list.insertBefore(item, before);
    return true;
  }

  /** Another member read up to `seq`: tick one's own messages up to it. */
  readUpTo(seq) {
    if (seq <= this.readByOthers) return;
    this.readByOthers = seq;
    for (const [s, item] of this.bySeq) {
      if (s <= seq && item.classList.contains('mine')) setTick(item, 'read');
    }
  }

  failPending(cmid, error) {
    const item = this.pending.get(cmid);
    if (item) setTick(item, 'failed', `Not sent: ${error.message}`);
  }

  _item(msg, tick) {
    const mine = msg.from === this.me;
    const item = el(
      'li',
      { class: mine ? 'msg mine' : 'msg' },
      el('span', { class: 'from' }, mine ? 'You' : who(msg.from)),
      el('p', { class: 'body' }, msg.body),
      el('span', { class: 'meta' }, el('time', { dateTime: new Date(msg.ts).toISOString() }, clock(msg.ts)), el('span', { class: 'tick' })),
    );
    if (tick) setTick(item, tick);
    return item;
  }
}

const TICKS = {
  sending: ['…', 'Sending'],
  sent: ['✓', 'Sent'],
  read: ['✓✓', 'Read'],
  failed: ['!', 'Not sent'],
};

function setTick(item, state, label) {
  const tick = item.querySelector('.tick');
  tick.dataset.state = state;
  tick.textContent = TICKS[state][0];
  tick.title = label ?? TICKS[state][1];
  tick.setAttribute('aria-label', label ?? TICKS[state][1]);
  item.classList.toggle('sending', state === 'sending');
}

/** Whether a scrolled list shows its bottom (within a few pixels). */
export function atBottom(scroller) {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
}
