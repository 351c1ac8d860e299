// The web chat in a real browser: Chromium (the machine's package, /usr/bin/chromium or
// $CHROMIUM) driven by puppeteer-core, against the real gateway started with --web-dev-tokens.
// A buyer and an agent, each in their own browser context, chat; receipts and unread badges
// update; the gateway restarts mid-conversation and both pages end with every message once, in
// order; a second tab of the buyer's device kicks the first. Screenshots go to target/web/.
//
// The tests share one browser and one gateway and run in order: each continues the
// conversation the previous one left.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import puppeteer from 'puppeteer-core';

import { Client } from '../../protocol/js/src/index.js';
import { Gateway, ROOT, token, until } from '../../protocol/js/test/gateway.js';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SHOTS = join(ROOT, 'target', 'web');
const WAIT_MS = 20000;
const SHOP = '42';
const BUYER = 'buyer:1001';
const AGENT = 'agent:7';

let gateway;
let browser;
let profile;
let buyerContext;
let buyer;
let agent;
let conv;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium chromium-driver, or set CHROMIUM`);
  }
  mkdirSync(SHOTS, { recursive: true });
  gateway = await Gateway.start({ args: ['--web-dev-tokens'] });
  profile = mkdtempSync(join(tmpdir(), 'chinwag-chromium-'));
  try {
    browser = await puppeteer.launch({
      executablePath: CHROMIUM,
      headless: true,
      userDataDir: profile,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
      defaultViewport: { width: 1100, height: 700 },
    });
  } catch (e) {
    throw new Error(`Chromium did not start (${CHROMIUM}): ${e.message}`);
  }
});

after(async () => {
  await browser?.close();
  await gateway?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

async function open(context, path) {
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e.message));
  await page.goto(`${gateway.httpUrl}${path}`);
  return page;
}

function waitFor(page, fn, ...args) {
  return page.waitForFunction(fn, { timeout: WAIT_MS, polling: 50 }, ...args);
}

const statusOf = (page) => page.$eval('#status', (s) => s.dataset.state);

/** The stored messages a page shows, as [seq, body], in document order. */
const shown = (page) =>
  page.$$eval('.msg[data-seq]', (items) => items.map((i) => [Number(i.dataset.seq), i.querySelector('.body').textContent]));

async function say(page, text) {
  await page.type('#text', text);
  await page.keyboard.press('Enter');
}

test('a buyer and an agent chat; unread badges and read receipts update; the agent resolves', async () => {
  buyerContext = await browser.createBrowserContext();
  const agentContext = await browser.createBrowserContext();
  // The agent speaks the binary codec, the buyer JSON: both encodings work in a browser.
  agent = await open(agentContext, `/agent?uid=${AGENT}&shop=${SHOP}&codec=binary`);
  await waitFor(agent, () => document.querySelector('#status').dataset.state === 'connected');
  buyer = await open(buyerContext, `/buyer?uid=${BUYER}&shop=${SHOP}`);
  await waitFor(buyer, () => document.querySelector('#status').dataset.state === 'connected');

  await say(buyer, 'Hello! Is the blue teapot still in stock?');
  await say(buyer, 'I would need it by Friday.');
  // The new assignment appears in the agent's list with two unread messages.
  await waitFor(agent, () => document.querySelector('.conv .badge')?.textContent === '2');
  assert.equal(await agent.$eval('#total-unread', (b) => b.textContent), '2');
  await waitFor(buyer, () => document.querySelectorAll('.msg[data-seq] .tick[data-state="sent"]').length === 2);
  conv = await agent.$eval('.conv', (b) => b.dataset.conv);

  // The agent opens it: the badge goes, and the buyer's messages are ticked as read.
  await agent.click('.conv');
  await waitFor(agent, () => document.querySelectorAll('.msg[data-seq]').length === 2);
  await waitFor(agent, () => !document.querySelector('.conv .badge') && document.querySelector('#total-unread').hidden);
  await waitFor(buyer, () => document.querySelectorAll('.msg[data-seq] .tick[data-state="read"]').length === 2);

  await say(agent, 'Hi! Yes, we have three left. Shall I put one aside for you?');
  await waitFor(buyer, () => document.querySelectorAll('.msg[data-seq]').length === 3);
  // The buyer's page is in view, so it reads the reply, and the agent sees that.
  await waitFor(agent, () => document.querySelector('.msg.mine .tick')?.dataset.state === 'read');
  await say(buyer, 'Yes please, thank you!');
  await waitFor(agent, () => document.querySelectorAll('.msg[data-seq]').length === 4);

  // A buyer scrolled up does not see a new reply: it is counted in the badge (and the title)
  // until the buyer scrolls down to it, which reads it and ticks it on the agent's side.
  await buyer.setViewport({ width: 1100, height: 260 });
  await buyer.evaluate(() => {
    document.querySelector('#scroller').scrollTop = 0;
  });
  await say(agent, 'Done: it is reserved under your name.');
  await waitFor(buyer, () => document.querySelector('#unread').textContent === '1' && !document.querySelector('#unread').hidden);
  assert.match(await buyer.title(), /^\(1\) /);
  assert.equal(await agent.$eval('.msg.mine:last-child .tick', (t) => t.dataset.state), 'sent');
  await buyer.evaluate(() => {
    const scroller = document.querySelector('#scroller');
    scroller.scrollTop = scroller.scrollHeight;
  });
  await waitFor(buyer, () => document.querySelector('#unread').hidden);
  await waitFor(agent, () => document.querySelector('.msg.mine:last-child .tick').dataset.state === 'read');
  await buyer.setViewport({ width: 1100, height: 700 });

  assert.deepEqual(await shown(buyer), await shown(agent));
  assert.deepEqual(
    (await shown(buyer)).map(([seq]) => seq),
    [1, 2, 3, 4, 5],
  );

  // Another buyer writes: the conversation is assigned to the agent, appears live at the top of
  // the list (most recent activity first) with its unread badge, and the open one stays open.
  const other = new Client({ urls: [gateway.wsUrl], token: token('buyer:1002'), onlineTarget: null });
  other.connect();
  await other.send({ shop: SHOP, body: 'Do you ship to Lyon?' });
  await waitFor(agent, () => document.querySelectorAll('.conv').length === 2);
  await waitFor(agent, () => document.querySelector('#total-unread').textContent === '1');
  assert.deepEqual(
    await agent.$$eval('.conv', (items) => items.map((b) => [b.querySelector('.name').textContent, b.querySelector('.badge')?.textContent ?? ''])),
    [
      ['Buyer 1002', '1'],
      ['Buyer 1001', ''],
    ],
  );
  await buyer.screenshot({ path: join(SHOTS, 'buyer.png') });
  await agent.screenshot({ path: join(SHOTS, 'agent.png') });

  // The agent answers the other buyer and resolves: the conversation leaves the list, the
  // buyer is told (members), and the first conversation is open again.
  const otherMembers = [];
  other.on('members', (m) => otherMembers.push(m.members));
  await agent.click('.conv[data-conv]:not([aria-current])');
  await waitFor(agent, () => document.querySelectorAll('.msg[data-seq]').length === 1 && document.querySelector('#total-unread').hidden);
  await say(agent, 'Yes, we ship everywhere in France.');
  await waitFor(agent, () => document.querySelector('.msg.mine .tick')?.dataset.state === 'sent');
  await agent.click('#resolve');
  await waitFor(agent, () => document.querySelectorAll('.conv').length === 1);
  await until(() => otherMembers.some((members) => !members.includes(AGENT)), 'the members push of the resolve');
  await agent.click('.conv');
  await waitFor(agent, () => document.querySelectorAll('.msg[data-seq]').length === 5);
  other.disconnect();
  assert.deepEqual([buyer.errors, agent.errors], [[], []]);
});

test('the gateway restarts mid-conversation; both pages recover every message once, in order', async () => {
  assert.ok(conv, 'the chat test ran first');
  await gateway.stop('SIGKILL');
  await waitFor(buyer, () => document.querySelector('#status').dataset.state === 'connecting');
  await waitFor(agent, () => document.querySelector('#status').dataset.state === 'connecting');
  assert.match(await buyer.$eval('#status', (s) => s.textContent), /Reconnecting/);

  // Written while the gateway is down: shown as pending, sent when it is back.
  await say(buyer, 'Are you still there?');
  await say(agent, 'Sorry, our connection dropped.');
  await waitFor(buyer, () => document.querySelector('.msg.sending .tick')?.dataset.state === 'sending');
  await buyer.screenshot({ path: join(SHOTS, 'buyer-reconnecting.png') });

  await gateway.startAgain();
  // The buyer's phone (another device) writes the moment the gateway is back: those messages
  // reach the pages by push or, if they were still reconnecting, from history.
  const phone = new Client({ urls: [gateway.wsUrl], token: token(BUYER), device: 'ios', onlineTarget: null });
  phone.connect();
  for (const body of ['(from my phone) one', '(from my phone) two', '(from my phone) three']) {
    await phone.send({ conv, body });
  }

  // The pages send what they held once they are back: wait for that before reading the
  // stored conversation (the phone may be faster than the pages' reconnect).
  for (const page of [buyer, agent]) {
    await waitFor(page, () => document.querySelector('#status').dataset.state === 'connected' && !document.querySelector('.msg.sending'));
  }
  const stored = (await phone.history(conv, { after: 0 })).msgs.map((m) => [m.seq, m.body]);
  assert.equal(stored.length, 10);
  for (const page of [buyer, agent]) {
    await waitFor(page, (n) => document.querySelectorAll('.msg[data-seq]').length >= n && !document.querySelector('.msg.sending'), stored.length);
    assert.deepEqual(await shown(page), stored);
    // The client library delivered each message once, in order (the page's merge by seq
    // cannot hide a duplicate here).
    const delivered = await page.evaluate((c) => window.chat.delivered.filter((d) => d.conv === c).map((d) => d.seq), conv);
    assert.deepEqual(delivered, [...delivered].sort((a, b) => a - b));
    assert.equal(new Set(delivered).size, delivered.length);
  }
  phone.disconnect();
  await agent.screenshot({ path: join(SHOTS, 'agent-recovered.png') });
  assert.deepEqual([buyer.errors, agent.errors], [[], []]);
});

test('a second tab of the same device kicks the first; it loads history as one scrolls up', async () => {
  assert.ok(buyer, 'the chat test ran first');
  // More messages than one page (30) of the view, so that the new tab has older ones to load.
  const phone = new Client({ urls: [gateway.wsUrl], token: token(BUYER), device: 'ios', onlineTarget: null });
  phone.connect();
  for (let i = 1; i <= 30; i++) await phone.send({ conv, body: `(from my phone) note ${i}` });
  const stored = (await phone.history(conv, { after: 0, limit: 200 })).msgs.map((m) => [m.seq, m.body]);
  phone.disconnect();
  assert.equal(stored.length, 40);
  await waitFor(buyer, () => document.querySelectorAll('.msg[data-seq]').length === 40);

  const second = await open(buyerContext, `/buyer?uid=${BUYER}&shop=${SHOP}`);
  await waitFor(second, () => document.querySelector('#status').dataset.state === 'connected');
  await waitFor(buyer, () => document.querySelector('#status').dataset.state === 'kicked');
  assert.match(await buyer.$eval('#status', (s) => s.textContent), /another tab/);
  // The second tab shows the newest page, then the older messages once scrolled to the top.
  await waitFor(second, () => document.querySelectorAll('.msg[data-seq]').length === 30);
  assert.deepEqual(await shown(second), stored.slice(10));
  await second.evaluate(() => {
    document.querySelector('#scroller').scrollTop = 0;
  });
  await waitFor(second, () => document.querySelectorAll('.msg[data-seq]').length === 40);
  assert.deepEqual(await shown(second), stored);
  await waitFor(second, () => document.querySelector('#older').hidden);
  await buyer.bringToFront();
  await buyer.screenshot({ path: join(SHOTS, 'buyer-kicked.png') });
  // The kicked tab does not come back and kick the other in turn.
  await new Promise((resolve) => setTimeout(resolve, 1500));
  assert.equal(await statusOf(buyer), 'kicked');
  assert.equal(await statusOf(second), 'connected');
  assert.equal(await buyer.evaluate(() => window.chat.client.state), 'disconnected');
  assert.deepEqual([buyer.errors, second.errors], [[], []]);
});
