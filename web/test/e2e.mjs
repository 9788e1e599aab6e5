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

async function openPage(browser, who) {
  const context = await browser.newContext({ viewport: VIEWPORT });
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
const peer = (page, name) => page.locator('.peers li', { hasText: name });
const message = (page, text) => page.locator('#messages .msg .text', { hasText: text });

async function say(page, text) {
  await page.locator('#composer [name=text]').fill(text);
  await page.locator('#composer button').click();
  // Acknowledged by the server: it has a message id (pending sends have none).
  await page.locator('#messages .msg:not(.pending)', { hasText: text }).waitFor();
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
      const texts = await b2.locator('#messages .msg .text').allTextContents();
      if (JSON.stringify(texts) !== JSON.stringify(['hello bob, this is alice', 'hi alice! 你好', 'sent while you were away'])) {
        throw new Error(`bob's history: ${JSON.stringify(texts)}`);
      }
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
    });

    if (SCREENSHOT) {
      await a.waitForTimeout(2500); // let the danmaku fly into the middle of the stage
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
