// Browser end-to-end test of the chat page: two users in two browser contexts (two "browsers": separate
// localStorage, separate devices) against a running `zhibo dev`. Started by run.sh, which sets
// ZHIBO_TEST_WEB_BASE (the user-api URL serving the page). Optional: ZHIBO_TEST_WEB_SCREENSHOT=path writes a picture of
// the two pages side by side after a passing run; ZHIBO_TEST_WEB_ARTIFACTS=dir gets screenshots on failure.
//
// Headless Debian chromium (/usr/bin/chromium) driven by playwright-core: no browser download.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.ZHIBO_TEST_WEB_BASE || 'http://127.0.0.1:7000';
const ARTIFACTS = process.env.ZHIBO_TEST_WEB_ARTIFACTS || 'artifacts';
const SCREENSHOT = process.env.ZHIBO_TEST_WEB_SCREENSHOT || '';
const CHROMIUM = process.env.ZHIBO_TEST_CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 10_000;
const VIEWPORT = { width: 1040, height: 640 };

// Unique names, except for the picture in docs/ (run.sh always starts a fresh in-memory server).
const suffix = SCREENSHOT ? '' : `-${Date.now().toString(36)}`;
const alice = { username: `alice${suffix}`, password: 'alice-password' };
const bob = { username: `bob${suffix}`, password: 'bob-password' };

let passed = 0;
let failed = 0;
const pages = {};
const logs = [];

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
    passed += 1;
    console.log(`ok ${passed + failed} - ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`not ok ${passed + failed} - ${name}\n  ${String(e.stack || e).split('\n').join('\n  ')}`);
    throw e;
  }
}

async function waitForServer() {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      const r = await fetch(`${BASE}/readyz`);
      if (r.ok) return;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error(`${BASE}/readyz did not answer within 60 s`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

// Before the page's scripts: every WebSocket the page opens is recorded, so the test can drop one as a
// network cut would, and can make new ones fail (closed while connecting) to hold a reconnection back.
function recordSockets() {
  const Native = window.WebSocket;
  const rec = { sockets: [], refuse: false };
  window.__ws = rec;
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      rec.sockets.push(this);
      if (rec.refuse) this.close();
    }
  };
}

async function openPage(browser, who) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  await context.addInitScript(recordSockets);
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('console', (m) => logs.push(`[${who} console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[${who} pageerror] ${e.stack || e}`));
  await page.goto(BASE);
  pages[who] = page;
  return page;
}

async function signUp(page, user) {
  await page.locator('#auth-form [name=username]').fill(user.username);
  await page.locator('#auth-form [name=password]').fill(user.password);
  await page.locator('#sign-up').click();
  await page.locator('#me').getByText(user.username).waitFor();
  await synced(page);
}

const synced = (page) => page.locator('#conn-status[data-state=synced]').waitFor();
const status = (page, state) => page.locator(`#conn-status[data-state=${state}]`).waitFor();
const socketCount = (page) => page.evaluate(() => window.__ws.sockets.length);
/** Signed in and synced again on a socket opened after the first `before` ones. */
const resynced = (page, before) => page.waitForFunction((n) => window.__ws.sockets.length > n
  && window.__ws.sockets.at(-1).readyState === WebSocket.OPEN
  && document.getElementById('conn-status').dataset.state === 'synced', before);
/** The texts of the open conversation, oldest first. */
const texts = (page) => page.locator('#messages .msg .text').allTextContents();
function sameList(got, want, what) {
  if (JSON.stringify(got) !== JSON.stringify(want)) throw new Error(`${what}: ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
}
const peer = (page, name) => page.locator('.peers li', { hasText: name });
/** A row of the chat list (`user:<id>` or `group:<id>`). */
const convRow = (page, key) => page.locator(`#conversations li[data-conv="${key}"]`);
const userIdOf = (page) => page.locator('#me').getAttribute('data-user-id');
const msgCount = (page) => page.locator('#messages .msg').count();
const message = (page, text) => page.locator('#messages .msg .text', { hasText: text });

async function say(page, text) {
  await page.locator('#composer [name=text]').fill(text);
  await page.locator('#composer button').click();
  // Acknowledged by the server: it has a message id (pending sends have none).
  await page.locator('#messages .msg:not(.pending)', { hasText: text }).waitFor();
}

async function signIn(page, user) {
  await page.locator('#auth-form [name=username]').fill(user.username);
  await page.locator('#auth-form [name=password]').fill(user.password);
  await page.locator('#sign-in').click();
  await page.locator('#me').getByText(user.username).waitFor();
  await synced(page);
}

async function sideBySide(browser, a, b, path) {
  for (const p of [a, b]) await p.evaluate(() => { document.getElementById('toast').hidden = true; });
  const [left, right] = await Promise.all([a.screenshot(), b.screenshot()]);
  const page = await browser.newPage({ viewport: { width: VIEWPORT.width * 2 + 12, height: VIEWPORT.height } });
  const img = (buf) => `<img src="data:image/png;base64,${buf.toString('base64')}">`;
  await page.setContent(`<body style="margin:0;background:#9aa3ad;display:flex;gap:12px">${img(left)}${img(right)}</body>`);
  await page.screenshot({ path });
  await page.close();
}

async function main() {
  await waitForServer();
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-dev-shm-usage'],
  });
  try {
    const a = await openPage(browser, 'alice');
    const b = await openPage(browser, 'bob');

    await step('sign up two users in two browsers (device registered, token, WebSocket signed in, synced)', async () => {
      await Promise.all([signUp(a, alice), signUp(b, bob)]);
    });

    await step('the page runs the SDK: its Client owns the one WebSocket, no hand-written protocol is loaded', async () => {
      for (const p of [a, b]) {
        const got = await p.evaluate(() => {
          const { sdk, client } = window.zhibo;
          const scripts = performance.getEntriesByType('resource').map((r) => new URL(r.name).pathname).filter((n) => n.endsWith('.js'));
          return {
            isClient: client instanceof sdk.Client,
            url: client.url,
            sockets: window.__ws.sockets.map((s) => s.url.split('?')[0]),
            open: window.__ws.sockets.filter((s) => s.readyState === WebSocket.OPEN).length,
            scripts: scripts.sort(),
            seqStore: typeof sdk.LocalStorageSeqStore,
          };
        });
        if (!got.isClient) throw new Error('window.zhibo.client is not an SDK Client');
        if (got.open !== 1 || got.sockets.some((u) => u !== got.url)) throw new Error(`sockets: ${JSON.stringify(got)}`);
        sameList(got.scripts, ['/api.js', '/app.js', '/sdk/zhibo-client.js'], 'scripts loaded');
      }
    });

    await step('alice asks bob to be friends; bob agrees; both see each other in Friends', async () => {
      await a.locator('#add-friend-form [name=username]').fill(bob.username);
      await a.locator('#add-friend-form button').click();
      await a.locator('#toast', { hasText: 'friend request sent' }).waitFor();
      await b.locator('#refresh').click();
      await b.locator('#requests li', { hasText: alice.username }).getByRole('button', { name: 'Agree' }).click();
      await peer(b, alice.username).waitFor();
      await a.locator('#refresh').click();
      await peer(a, bob.username).waitFor();
    });

    await step('alice sends to bob; it arrives live on bob\'s page (unread badge, then in the chat)', async () => {
      await peer(a, bob.username).click();
      await say(a, 'hello bob, this is alice');
      await peer(b, alice.username).locator('.badge', { hasText: '1' }).waitFor();
      await peer(b, alice.username).click();
      await message(b, 'hello bob, this is alice').waitFor();
    });

    await step('bob replies; alice sees it live', async () => {
      await say(b, 'hi alice! 你好');
      await message(a, 'hi alice! 你好').waitFor();
    });

    await step('bob reloads: signed in again from storage, history shown', async () => {
      await b.reload();
      await synced(b);
      await peer(b, alice.username).click();
      await message(b, 'hello bob, this is alice').waitFor();
      await message(b, 'hi alice! 你好').waitFor();
    });

    await step('bob closes the page; alice sends; bob opens the page again and gets the missed message by sync', async () => {
      const context = b.context();
      await b.close();
      await say(a, 'sent while you were away');
      const b2 = await context.newPage();
      b2.setDefaultTimeout(TIMEOUT);
      b2.on('console', (m) => logs.push(`[bob console.${m.type()}] ${m.text()}`));
      pages.bob = b2;
      await b2.goto(BASE);
      await synced(b2);
      await peer(b2, alice.username).locator('.badge', { hasText: '1' }).waitFor();
      await peer(b2, alice.username).click();
      for (const text of ['hello bob, this is alice', 'hi alice! 你好', 'sent while you were away']) {
        await message(b2, text).waitFor();
      }
      // Oldest first, each once.
      sameList(await texts(b2), ['hello bob, this is alice', 'hi alice! 你好', 'sent while you were away'], "bob's history");
      // The SDK's LocalStorageSeqStore holds the seq the client resumed from and has reached since.
      const seq = await b2.evaluate(() => {
        const c = window.zhibo.client;
        const key = Object.keys(localStorage).find((k) => k.startsWith('zhibo.seq.'));
        return { stored: key && localStorage.getItem(key), last: c.lastSeq };
      });
      if (!(Number(seq.stored) >= 3 && seq.stored === seq.last)) throw new Error(`seq store: ${JSON.stringify(seq)}`);
    });

    await step('alice creates a group with bob; a group message reaches bob', async () => {
      const b2 = pages.bob;
      await a.locator('#new-group-form [name=name]').fill('weekend');
      await a.locator('#new-group-form [name=members]').fill(bob.username);
      await a.locator('#new-group-form button').click();
      await a.locator('#conv-title', { hasText: '# weekend' }).waitFor();
      await say(a, 'group hello from alice');
      await peer(b2, '# weekend').click();
      await message(b2, 'group hello from alice').waitFor();
      await say(b2, 'bob here too');
      await message(a, 'bob here too').waitFor();
      // Back to the 1:1 chat for the picture.
      await peer(a, bob.username).click();
      await peer(b2, alice.username).click();
    });

    await step('both join live room 7: online count 2; alice\'s danmaku scrolls across bob\'s stage', async () => {
      const b2 = pages.bob;
      for (const p of [a, b2]) {
        await p.locator('#room-form [name=room_id]').fill('7');
        await p.locator('#room-form button').click();
        await p.locator('#room-id', { hasText: '7' }).waitFor();
      }
      await b2.locator('#room-online', { hasText: /^2$/ }).waitFor();
      await a.locator('#room-online', { hasText: /^2$/ }).waitFor();
      for (const text of ['前方高能 666', 'hello room']) {
        await a.locator('#room-composer [name=text]').fill(text);
        await a.locator('#room-composer button').click();
        await b2.locator('#stage .danmaku', { hasText: text }).waitFor();
        await b2.locator('#room-log li', { hasText: `${alice.username}: ${text}` }).waitFor();
      }
      await b2.locator('#room-composer [name=text]').fill('bob says 加油!');
      await b2.locator('#room-composer button').click();
      await a.locator('#stage .danmaku', { hasText: 'bob says' }).waitFor();
      // Bob's danmaku came after alice's, so any echo of alice's own has arrived too: each shown once.
      sameList(await a.locator('#room-log li.danmaku-line').allTextContents(),
        [`${alice.username}: 前方高能 666`, `${alice.username}: hello room`, `${bob.username}: bob says 加油!`], "alice's room log");
    });

    await step('alice\'s socket drops and reconnecting fails for a while: bob\'s messages and alice\'s send meanwhile arrive once each, in order', async () => {
      const b2 = pages.bob;
      for (const p of [a, b2]) await peer(p, '# weekend').click();
      const before = await socketCount(a);
      await a.evaluate(() => { window.__ws.refuse = true; window.__ws.sockets.at(-1).close(); });
      await status(a, 'offline');
      await say(b2, 'bob while alice is offline 1');
      await say(b2, 'bob while alice is offline 2');
      // Alice writes while offline: pending in the SDK, sent when it is connected again.
      await a.locator('#composer [name=text]').fill('alice wrote this offline');
      await a.locator('#composer button').click();
      await a.locator('#messages .msg.pending', { hasText: 'alice wrote this offline' }).waitFor();
      await a.waitForFunction((n) => window.__ws.sockets.length > n, before); // a refused attempt
      await a.evaluate(() => { window.__ws.refuse = false; });
      await resynced(a, before);
      await a.locator('#messages .msg:not(.pending)', { hasText: 'alice wrote this offline' }).waitFor();
      await message(b2, 'alice wrote this offline').waitFor();
      const want = ['group hello from alice', 'bob here too', 'bob while alice is offline 1', 'bob while alice is offline 2', 'alice wrote this offline'];
      sameList(await texts(a), want, "alice's group chat");
      sameList(await texts(b2), want, "bob's group chat");
    });

    await step('a send in flight when the socket drops is resent by the SDK and ACKed once: one message on both pages', async () => {
      const b2 = pages.bob;
      const before = await socketCount(a);
      await a.locator('#composer [name=text]').fill('in flight across a reconnect');
      // The click writes the send to the socket (SDK), and the socket closes before its ACK can arrive.
      await a.evaluate(() => { document.querySelector('#composer button').click(); window.__ws.sockets.at(-1).close(); });
      await resynced(a, before);
      await a.locator('#messages .msg:not(.pending)', { hasText: 'in flight across a reconnect' }).waitFor();
      await message(b2, 'in flight across a reconnect').waitFor();
      const ack = await a.evaluate(() => [...window.zhibo.acks.values()].at(-1));
      const ids = await Promise.all([a, b2].map((p) => p.locator('#messages .msg', { hasText: 'in flight across a reconnect' })
        .evaluateAll((els) => els.map((e) => e.dataset.messageId))));
      sameList(ids, [[ack.messageId], [ack.messageId]], 'message ids on alice\'s and bob\'s pages');
      console.log(`# ACK after the reconnect: message ${ack.messageId}, duplicate=${ack.duplicate} (true: the server had the first copy)`);
      // Each once, and the rooms still work: the SDK joined room 7 again on the new socket.
      await b2.locator('#room-composer [name=text]').fill('still here after your reconnect');
      await b2.locator('#room-composer button').click();
      await a.locator('#room-log li', { hasText: 'still here after your reconnect' }).waitFor();
      for (const p of [a, b2]) await peer(p, p === a ? bob.username : alice.username).click();
      // A text of its own: step 9's danmaku may still be crossing the stage (6-8 s).
      await a.locator('#room-composer [name=text]').fill('再来一波 666');
      await a.locator('#room-composer button').click();
      await b2.locator('#stage .danmaku', { hasText: '再来一波 666' }).waitFor();
    });

    // ---- conversations (issue #13): list, unread across devices, read ticks, recall, typing, history
    const b2 = pages.bob;
    const aliceId = await userIdOf(a);
    const bobId = await userIdOf(b2);
    const withAlice = `user:${aliceId}`;
    const withBob = `user:${bobId}`;

    await step('the chat list shows both chats with the last message; "load earlier" pages a chat back from the server with no gap or repeat', async () => {
      await convRow(a, withBob).locator('.preview', { hasText: 'You: sent while you were away' }).waitFor();
      await convRow(b2, withAlice).locator('.preview', { hasText: `${alice.username}: sent while you were away` }).waitFor();
      for (const p of [a, b2]) await p.locator('#conversations li', { hasText: '# weekend' }).locator('.preview', { hasText: 'in flight across a reconnect' }).waitFor();
      const pageTexts = Array.from({ length: 25 }, (_, i) => `page ${String(i + 1).padStart(2, '0')}`);
      for (const t of pageTexts) await say(a, t);
      await message(b2, 'page 25').waitFor();
      // Bob's page forgets what it held (its cache is gone; the SDK's seq store stays): after the reload
      // nothing is synced again, and the chat's history comes from the server, a page at a time.
      await b2.evaluate(() => { for (const k of Object.keys(localStorage)) if (k.startsWith('zhibo.inbox.')) localStorage.removeItem(k); });
      await b2.reload();
      await synced(b2);
      await convRow(b2, withAlice).click();
      await b2.locator('#messages .msg').nth(19).waitFor();
      if (await msgCount(b2) !== 20) throw new Error(`the latest page: ${await msgCount(b2)} messages, expected 20`);
      sameList((await texts(b2)).slice(-2), ['page 24', 'page 25'], 'the latest page ends with the newest message');
      for (let pages = 0; await b2.locator('#load-earlier').isVisible(); pages++) {
        if (pages > 5) throw new Error('"load earlier" never ends');
        const n = await msgCount(b2);
        await b2.locator('#load-earlier').click();
        await b2.waitForFunction((n) => document.querySelectorAll('#messages .msg').length > n
          || document.getElementById('load-earlier').hidden, n);
      }
      const want = ['hello bob, this is alice', 'hi alice! 你好', 'sent while you were away', ...pageTexts];
      sameList(await texts(b2), want, "bob's history paged back");
      const ids = await b2.locator('#messages .msg').evaluateAll((els) => els.map((e) => e.dataset.messageId));
      if (new Set(ids).size !== ids.length) throw new Error(`a message twice: ${ids}`);
    });

    let a2;
    await step('an unread badge appears on both of alice\'s devices and clears on one when she reads on the other', async () => {
      a2 = await openPage(browser, 'alice2');
      await signIn(a2, alice);
      await convRow(a2, withBob).waitFor();
      await convRow(a, (await a.locator('#conversations li', { hasText: '# weekend' }).getAttribute('data-conv'))).click();
      await say(b2, 'are you there, alice?');
      for (const p of [a, a2]) await convRow(p, withBob).locator('.badge', { hasText: /^1$/ }).waitFor();
      await peer(a, bob.username).locator('.badge', { hasText: /^1$/ }).waitFor();
      await convRow(a2, withBob).click();
      await message(a2, 'are you there, alice?').waitFor();
      // Read on the second device: the server pushes the row to the first, whose badge goes.
      await convRow(a, withBob).locator('.badge').waitFor({ state: 'detached' });
      await peer(a, bob.username).locator('.badge').waitFor({ state: 'detached' });
      if (await convRow(a, withBob).getAttribute('data-unread') !== '0') throw new Error('alice\'s first device still counts it unread');
    });

    await step('a read tick appears on alice\'s message when bob opens the chat', async () => {
      const weekend = await b2.locator('#conversations li', { hasText: '# weekend' }).getAttribute('data-conv');
      await convRow(b2, weekend).click();
      await peer(a, bob.username).click();
      await say(a, 'did you read this?');
      const mine = a.locator('#messages .msg.mine', { hasText: 'did you read this?' });
      await mine.locator('.tick:not(.read)').waitFor();
      await convRow(b2, withAlice).locator('.badge', { hasText: /^1$/ }).waitFor();
      await convRow(b2, withAlice).click();
      await mine.locator('.tick.read').waitFor();
      // And on her other device, from the receipt too.
      await a2.locator('#messages .msg.mine', { hasText: 'did you read this?' }).locator('.tick.read').waitFor();
    });

    await step('alice recalls a message: "message recalled" on both sides (and her other device), the text gone', async () => {
      await say(a, 'oops, wrong chat');
      await message(b2, 'oops, wrong chat').waitFor();
      await message(a2, 'oops, wrong chat').waitFor();
      await a.locator('#messages .msg.mine', { hasText: 'oops, wrong chat' }).locator('.recall').click();
      for (const p of [a, b2, a2]) {
        await p.locator('#messages .msg.recalled', { hasText: 'message recalled' }).waitFor();
        await message(p, 'oops, wrong chat').waitFor({ state: 'detached' });
      }
      await convRow(b2, withAlice).locator('.preview', { hasText: 'message recalled' }).waitFor();
      // Bob cannot recall alice's messages: his own only.
      const foreign = await b2.locator('#messages .msg:not(.mine) .recall').count();
      if (foreign !== 0) throw new Error(`recall offered on ${foreign} messages of alice`);
    });

    await step('alice\'s other device, offline during a recall of an earlier message, shows the tombstone when back', async () => {
      await say(a, 'recall me while you are away');
      await say(a, 'and this one stays');
      await message(a2, 'and this one stays').waitFor();
      const before = await socketCount(a2);
      await a2.evaluate(() => { window.__ws.refuse = true; window.__ws.sockets.at(-1).close(); });
      await status(a2, 'offline');
      await a.locator('#messages .msg.mine', { hasText: 'recall me while you are away' }).locator('.recall').click();
      await message(b2, 'recall me while you are away').waitFor({ state: 'detached' });
      await a2.evaluate(() => { window.__ws.refuse = false; });
      await resynced(a2, before);
      await message(a2, 'recall me while you are away').waitFor({ state: 'detached' });
      sameList((await texts(a2)).slice(-2), ['message recalled', 'and this one stays'], "alice's other device");
    });

    await step('bob types: "typing…" shows on alice\'s devices (chat and list), not on his own, and goes away', async () => {
      await b2.locator('#composer [name=text]').fill('typing a reply');
      await a.locator('#typing', { hasText: `${bob.username} is typing…` }).waitFor();
      await convRow(a2, withBob).locator('.preview.typing', { hasText: 'typing…' }).waitFor();
      if (await b2.locator('#typing').isVisible()) throw new Error('bob sees himself typing');
      await a.locator('#typing').waitFor({ state: 'hidden' });
      await b2.locator('#composer [name=text]').fill('');
    });

    await step('in the group, alice asks who has read her message: nobody, then bob once he opened the group', async () => {
      const weekend = await a.locator('#conversations li', { hasText: '# weekend' }).getAttribute('data-conv');
      await convRow(a, weekend).click();
      await say(a, 'who read this?');
      const mine = a.locator('#messages .msg.mine', { hasText: 'who read this?' });
      await mine.locator('.seen-by').click();
      await mine.locator('.seen', { hasText: 'read by nobody yet' }).waitFor();
      await convRow(b2, weekend).click();
      await message(b2, 'who read this?').waitFor();
      await convRow(b2, weekend).locator('.badge').waitFor({ state: 'detached' });
      // The author of the message bob read up to gets his ReadReceipt: the list grows live.
      await mine.locator('.seen', { hasText: `read by ${bob.username}` }).waitFor();
      await convRow(b2, withAlice).click();
      await convRow(a, withBob).click();
    });

    await step('mute and pin: set on one device, shown on the other', async () => {
      await a.locator('#conv-pin').click();
      await a.locator('#conv-pin[aria-pressed=true]').waitFor();
      await convRow(a2, withBob).and(a2.locator('li.pinned')).waitFor();
      await a2.locator('#conv-mute').click();
      await convRow(a, withBob).and(a.locator('li.muted')).waitFor();
      await a.locator('#conv-mute[aria-pressed=true]').waitFor();
      await a.locator('#conv-mute').click();
      await convRow(a2, withBob).and(a2.locator('li:not(.muted)')).waitFor();
      if (await a.locator('#conversations li').first().getAttribute('data-conv') !== withBob) throw new Error('the pinned chat is not first');
    });

    if (SCREENSHOT) {
      // For the picture: an unread group message on alice's list, bob typing in her open chat.
      const weekend = await b2.locator('#conversations li', { hasText: '# weekend' }).getAttribute('data-conv');
      await convRow(b2, weekend).click();
      await say(b2, 'see you on saturday');
      await convRow(a, weekend).locator('.badge', { hasText: /^1$/ }).waitFor();
      await convRow(b2, withAlice).click();
      // Bob's reload left the room: join it again for the picture's danmaku.
      await b2.locator('#room-form [name=room_id]').fill('7');
      await b2.locator('#room-form button').click();
      await b2.locator('#room-id', { hasText: '7' }).waitFor();
      await a.locator('#room-composer [name=text]').fill('前方高能 666');
      await a.locator('#room-composer button').click();
      await b2.locator('#stage .danmaku', { hasText: '前方高能 666' }).waitFor();
      await a.waitForTimeout(2500); // let the danmaku fly into the middle of the stage
      await b2.locator('#composer [name=text]').fill('sounds good');
      await a.locator('#typing', { hasText: 'is typing' }).waitFor();
      await sideBySide(browser, a, pages.bob, SCREENSHOT);
      console.log(`# wrote ${SCREENSHOT}`);
    }
  } catch (e) {
    mkdirSync(ARTIFACTS, { recursive: true });
    for (const [who, page] of Object.entries(pages)) {
      if (page.isClosed()) continue;
      const path = join(ARTIFACTS, `failure-${who}.png`);
      await page.screenshot({ path, fullPage: true }).catch(() => {});
      console.log(`# screenshot: ${path}`);
    }
    writeFileSync(join(ARTIFACTS, 'browser-console.log'), logs.join('\n') + '\n');
    console.log(`# browser console: ${join(ARTIFACTS, 'browser-console.log')}`);
    if (!failed) {
      failed += 1;
      console.log(`not ok - ${String(e.stack || e)}`);
    }
  } finally {
    await browser.close();
  }
  console.log(`browser: ${passed} passed, ${failed} failed`);
  process.exitCode = failed ? 1 : 0;
}

await main();
