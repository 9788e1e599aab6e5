// The TypeScript SDK against a real `zhibo dev`: what an app sees through network cuts, lost pushes, lost
// ACKs, server restarts, GoAway and Kick.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { connect, conversationKey, LocalStorageSeqStore, MemorySeqStore, RECALLED, SeqTracker, text } from '../dist/index.js';
import { App, Server, waitFor } from './server.mjs';
import { startProxy } from './proxy.mjs';

let server;
before(async () => { server = await Server.start(); });
after(async () => { await server?.stop(); });

const fast = { backoffMinMs: 50, backoffMaxMs: 500, retryAfterMs: 200 };

async function app(creds, url = server.wsUrl, extra = {}) {
  const a = new App(await connect({ url, ...creds, ...fast, ...extra }));
  await waitFor(() => a.synced >= 1, 'first sync');
  return a;
}

async function pair() {
  const alice = await server.user('alice');
  const bob = await server.user('bob');
  await server.befriend(alice, bob);
  return { alice, bob };
}

function assertExactly(a, expected) {
  assert.deepEqual([...a.texts()].sort(), [...expected].sort(), 'the app holds every message once');
  assert.equal(new Set(a.messages.map((m) => m.seq)).size, a.messages.length, 'distinct seqs');
}

test('send resolves with the ACK; the receiver gets the message once, the sender never its own', async () => {
  const { alice, bob } = await pair();
  const a = await app(alice);
  const b = await app(bob);
  const ack = await a.client.send({ user: bob.userId }, 'hello bob');
  assert.ok(BigInt(ack.seq) > 0n, JSON.stringify(ack));
  assert.equal(ack.duplicate, false);
  await waitFor(() => b.has('hello bob'), 'the message');
  await b.client.send({ user: alice.userId }, 'hi alice');
  await waitFor(() => a.has('hi alice'), 'the answer');
  assertExactly(a, ['hi alice']);
  assertExactly(b, ['hello bob']);
  a.client.close();
  b.client.close();
});

test('a network cut loses and repeats nothing, and the resume starts at the last contiguous seq', async () => {
  const { alice, bob } = await pair();
  const proxy = await startProxy(`ws://127.0.0.1:${server.wsPort}`);
  const a = await app(alice);
  const b = await app(bob, `${proxy.url}/ws`);
  await a.client.send({ user: bob.userId }, 'm1');
  await waitFor(() => b.has('m1'), 'm1');
  const firstSeq = b.messages[0].seq;
  proxy.cut();
  const expected = ['m1'];
  for (let i = 2; i <= 6; i++) {
    await a.client.send({ user: bob.userId }, `m${i}`);
    expected.push(`m${i}`);
  }
  await waitFor(() => b.messages.length >= 6, 'every message');
  await a.client.send({ user: bob.userId }, 'last');
  expected.push('last');
  await waitFor(() => b.has('last'), 'the last one');
  assert.ok(b.count('disconnected') >= 1, 'the cut was seen');
  // (State events start after connect() resolved: the first 'connected' is not among them.)
  assert.ok(b.count('connected') >= 1, 'and the client reconnected');
  assertExactly(b, expected);
  const resumedFrom = proxy.sent((p) => p.body === 'sync').map((p) => p.sync.seq);
  assert.ok(resumedFrom.includes(firstSeq), `a sync from ${firstSeq}: ${resumedFrom}`);
  a.client.close();
  b.client.close();
  proxy.close();
});

test('a gap in pushed seqs triggers a sync that fills it', async () => {
  const { alice, bob } = await pair();
  const proxy = await startProxy(`ws://127.0.0.1:${server.wsPort}`);
  const a = await app(alice);
  const b = await app(bob, `${proxy.url}/ws`);
  const syncsBefore = proxy.sent((p) => p.body === 'sync').length;
  proxy.dropPushes(1);
  await a.client.send({ user: bob.userId }, 'swallowed');
  await a.client.send({ user: bob.userId }, 'after the gap');
  await waitFor(() => b.has('swallowed') && b.has('after the gap'), 'both messages');
  assertExactly(b, ['swallowed', 'after the gap']);
  assert.ok(proxy.sent((p) => p.body === 'sync').length > syncsBefore, 'filled by a sync');
  assert.equal(b.count('connected'), 0, 'on the same connection (no reconnection)');
  a.client.close();
  b.client.close();
  proxy.close();
});

test('a send in flight during a reconnection is resent with the same client_msg_id and ACKed once', async () => {
  const { alice, bob } = await pair();
  const proxy = await startProxy(`ws://127.0.0.1:${server.wsPort}`);
  const a = await app(alice, `${proxy.url}/ws`);
  const b = await app(bob);
  proxy.mute();
  let resolved = 0;
  const inFlight = a.client.send({ user: bob.userId }, 'in flight').then((ack) => { resolved++; return ack; });
  await waitFor(() => b.has('in flight'), 'the message at bob');
  assert.equal(resolved, 0, 'the ACK was swallowed');
  proxy.cut();
  const ack = await inFlight;
  assert.ok(BigInt(ack.seq) > 0n);
  const ids = proxy.sent((p) => p.body === 'sendMessage').map((p) => p.sendMessage.clientMsgId);
  assert.ok(ids.length >= 2, `resent: ${ids}`);
  assert.ok(ids.every((i) => i === ids[0]), `same client_msg_id: ${ids}`);
  const marks = proxy.sent((p) => p.body === 'sendMessage').map((p) => p.sendMessage.firstAttempt === true);
  assert.deepEqual(marks, [true, ...marks.slice(1).map(() => false)], `only the first transmission says first_attempt: ${marks}`);
  await a.client.send({ user: bob.userId }, 'after');
  await waitFor(() => b.has('after'), 'the later message');
  assertExactly(b, ['in flight', 'after']);
  assertExactly(a, []);
  assert.equal(resolved, 1);
  a.client.close();
  b.client.close();
  proxy.close();
});

test('a server restart: back-off while down, a send made meanwhile is ACKed once, nothing lost', async () => {
  const own = await Server.start();
  try {
    const alice = await own.user('alice');
    const bob = await own.user('bob');
    await own.befriend(alice, bob);
    const a = new App(await connect({ url: own.wsUrl, ...alice, ...fast }));
    const b = new App(await connect({ url: own.wsUrl, ...bob, ...fast }));
    await waitFor(() => a.synced && b.synced, 'first syncs');
    await a.client.send({ user: bob.userId }, 'before');
    await waitFor(() => b.has('before'), 'before');
    await own.down();
    await waitFor(() => b.count('disconnected') >= 4, 'three refused attempts');
    const delays = b.states.filter((s) => s.state === 'disconnected').slice(1).map((s) => s.retryInMs);
    assert.ok(delays[2] > delays[0], `backing off: ${delays}`);
    const during = a.client.send({ user: bob.userId }, 'during');
    await own.up();
    assert.ok(BigInt((await during).seq) > 0n);
    await a.client.send({ user: bob.userId }, 'after');
    await waitFor(() => b.has('during') && b.has('after'), 'everything');
    assertExactly(b, ['before', 'during', 'after']);
    assertExactly(a, []);
    a.client.close();
    b.client.close();
  } finally {
    await own.stop();
  }
});

test('GoAway during a drain moves the client to the hinted gateway, with nothing lost', async () => {
  // The node the client is on drains with a hint naming the WebSocket port the next node will listen on.
  const [nextWs] = await (async () => {
    const net = await import('node:net');
    const s = net.createServer().listen(0, '127.0.0.1');
    await new Promise((ok) => s.once('listening', ok));
    const p = s.address().port;
    await new Promise((ok) => s.close(ok));
    return [p];
  })();
  const hint = `ws://127.0.0.1:${nextWs}/ws`;
  const first = await Server.start({ env: { ZHIBO_GATEWAY__RECONNECT_HINT_WS: hint } });
  let second;
  try {
    const alice = await first.user('alice');
    const bob = await first.user('bob');
    await first.befriend(alice, bob);
    const a = await app(alice, first.wsUrl);
    const b = new App(await connect({ url: first.wsUrl, ...bob, ...fast }));
    await b.client.send({ user: alice.userId }, 'before');
    await waitFor(() => a.has('before'), 'before');
    await first.down();
    assert.equal(a.goAways, 1, 'GoAway before the close');
    second = await Server.start({ storeOf: first, wsPort: nextWs });
    await waitFor(() => a.states.some((s) => s.state === 'connected' && s.url === hint), 'moved to the hint');
    assert.equal(a.client.url, hint);
    // Bob was on the same node (hinted too): he moves as well, then sends.
    await waitFor(() => b.client.url === hint && b.count('connected') >= 1, 'bob moved');
    await b.client.send({ user: alice.userId }, 'after');
    await waitFor(() => a.has('after'), 'after');
    assertExactly(a, ['before', 'after']);
    a.client.close();
    b.client.close();
  } finally {
    await second?.stop({ keepStore: true });
    await first.stop();
  }
});

test('Kick stops reconnection; the other connection stays up', async () => {
  const alice = await server.user('alice');
  const a = await app(alice);
  const other = new App(await connect({ url: server.wsUrl, ...alice, ...fast }));
  await waitFor(() => a.kicked && a.count('closed') === 1, 'kicked and closed');
  assert.equal(a.kicked.reason, 'KICK_REASON_SIGNED_IN_ELSEWHERE');
  await assert.rejects(a.client.send({ user: alice.userId }, 'x'), /kicked/);
  // The other connection answers requests: nobody kicked it back.
  const p = await other.client.request({ heartbeat: {} });
  assert.equal(p.body, 'heartbeat');
  assert.equal(a.count('connecting'), 0, 'no reconnection attempt');
  assert.equal(a.count('disconnected'), 0);
  other.client.close();
});

test('rooms: join, send, and joined again after a reconnection', async () => {
  const { alice, bob } = await pair();
  const room = String(9_000_000 + (process.pid % 100_000));
  const a = await app(alice);
  const b = await app(bob);
  const joined = await b.client.joinRoom(room);
  assert.equal(joined.roomId, room);
  await a.client.joinRoom(room);
  const roomTexts = () => b.rooms.flatMap((r) => r.messages).filter((m) => m.contentType >= 0).map((m) => new TextDecoder().decode(m.content));
  await a.client.sendRoom(room, 'before');
  await waitFor(() => roomTexts().includes('before'), 'room message');
  b.client.reconnect();
  await waitFor(() => b.rejoined >= 1, 'rejoined');
  await a.client.sendRoom(room, 'after');
  await waitFor(() => roomTexts().includes('after'), 'room message after the reconnection');
  // The app may choose the client_msg_id (the browser page does, to recognise its own danmaku's echo).
  await a.client.sendRoom(room, 'mine', 1, 'page-chosen-id-1');
  await waitFor(() => roomTexts().includes('mine'), 'room message with the app\'s id');
  const mine = b.rooms.flatMap((r) => r.messages).find((m) => m.contentType >= 0 && new TextDecoder().decode(m.content) === 'mine');
  assert.equal(mine.clientMsgId, 'page-chosen-id-1');
  a.client.close();
  b.client.close();
});

test('the last contiguous seq persists: a new client resumes from the store (localStorage adapter)', async () => {
  const { alice, bob } = await pair();
  const storage = new Map();
  const local = { getItem: (k) => storage.get(k) ?? null, setItem: (k, v) => storage.set(k, v) };
  const store = new LocalStorageSeqStore(`zhibo:${bob.userId}:${bob.deviceId}`, local);
  const a = await app(alice);
  const b1 = await app(bob, server.wsUrl, { seqStore: store });
  await a.client.send({ user: bob.userId }, 'old');
  await waitFor(() => b1.has('old'), 'old');
  await waitFor(() => store.load() === b1.messages[0].seq, 'persisted');
  b1.client.close();
  await a.client.send({ user: bob.userId }, 'new');
  const b2 = await app(bob, server.wsUrl, { seqStore: store });
  await waitFor(() => b2.has('new'), 'new');
  assertExactly(b2, ['new']);
  a.client.close();
  b2.client.close();
});

/** Records the conversation events of a client. */
function conversationEvents(client) {
  const ev = { updates: [], receipts: [], recalled: [], typing: [], errors: [] };
  client.on('conversationUpdate', (u) => ev.updates.push(u));
  client.on('readReceipt', (r) => ev.receipts.push(r));
  client.on('recalled', (r) => ev.recalled.push(r));
  client.on('typing', (t) => ev.typing.push(t));
  client.on('serverError', (e) => ev.errors.push(e));
  return ev;
}

test('conversations: list with unread, mark read clears it on the other device, the peer gets the receipt', async () => {
  const { alice, bob } = await pair();
  const bobTab2 = await server.secondDevice(bob);
  const a = await app(alice);
  const b = await app(bob);
  const b2 = await app(bobTab2);
  const aEv = conversationEvents(a.client);
  const b2Ev = conversationEvents(b2.client);
  for (const t of ['one', 'two', 'three']) await a.client.send({ user: bob.userId }, t);
  await waitFor(() => b.messages.length === 3 && b2.messages.length === 3, 'three messages on both of bob\'s devices');
  assert.deepEqual(b.messages.map((m) => m.convSeq), ['1', '2', '3'], 'conv_seq numbers the pair\'s messages');

  const list = await b.client.conversationList();
  assert.equal(list.conversations.length, 1);
  const row = list.conversations[0];
  assert.equal(conversationKey(row.conversation), `user:${alice.userId}`);
  assert.equal(row.unread, '3');
  assert.equal(row.lastSeq, '3');
  assert.equal(text(row.lastMessage), 'three');
  assert.ok(BigInt(list.version) > 0n);

  const answer = await b.client.markRead({ user: alice.userId }, 3);
  assert.equal(answer.conversation.unread, '0');
  await waitFor(() => b2Ev.updates.some((u) => u.conversation.unread === '0'), 'the other device\'s badge cleared live');
  await waitFor(() => aEv.receipts.some((r) => r.readSeq === '3' && r.userId === bob.userId), 'alice sees "read" live');
  assert.equal(conversationKey(aEv.receipts[0].conversation), `user:${bob.userId}`, 'as alice sees the conversation');
  const aliceRow = (await a.client.conversationList()).conversations[0];
  assert.equal(aliceRow.peerReadSeq, '3', 'and after the fact in her list');
  // List sync: nothing changed since the version bob holds... until alice writes again.
  const synced = (await b2.client.conversationList({ changedAfter: answer.conversation.version })).conversations;
  assert.equal(synced.length, 0, 'no change after the last version');
  await a.client.send({ user: bob.userId }, 'four');
  const changed = await b2.client.conversationList({ changedAfter: answer.conversation.version });
  assert.equal(changed.conversations.length, 1);
  assert.equal(changed.conversations[0].unread, '1');
  // Beyond the last message: refused with its code, nothing changed.
  await assert.rejects(b.client.markRead({ user: alice.userId }, 99), (e) => e.code === 'ERROR_CODE_OUT_OF_RANGE');
  for (const c of [a, b, b2]) c.client.close();
});

test('conversations: history pages back with no gap or repeat; mute, pin and delete-for-me', async () => {
  const { alice, bob } = await pair();
  const a = await app(alice);
  for (let i = 1; i <= 25; i++) await a.client.send({ user: bob.userId }, `h${i}`);
  const seen = [];
  let before = 0;
  for (;;) {
    const page = await a.client.history({ user: bob.userId }, { before, limit: 10 });
    seen.push(...page.messages.map((m) => text(m)));
    if (!page.hasMore) break;
    before = page.messages[page.messages.length - 1].convSeq;
  }
  assert.deepEqual(seen, Array.from({ length: 25 }, (_, i) => `h${25 - i}`));
  const forward = await a.client.history({ user: bob.userId }, { after: 20 });
  assert.deepEqual(forward.messages.map((m) => text(m)), ['h21', 'h22', 'h23', 'h24', 'h25']);

  const set = await a.client.conversationSettings({ user: bob.userId }, { muted: true, pinned: true });
  assert.equal(set.conversation.muted, true);
  assert.equal(set.conversation.pinned, true);
  const del = await a.client.deleteForMe({ user: bob.userId }, 25);
  assert.equal(del.deletedConvSeq, '25');
  const latest = await a.client.history({ user: bob.userId }, { limit: 1 });
  assert.equal(text(latest.messages[0]), 'h24', 'the deleted message is left out of her history');
  await assert.rejects(a.client.history({ user: '999999999' }), (e) => e.code === 'ERROR_CODE_NOT_IN_CONVERSATION');
  a.client.close();
});

test('conversations: recall reaches both sides live; refused recalls reject with their code; typing', async () => {
  const { alice, bob } = await pair();
  const a = await app(alice);
  const b = await app(bob);
  const aEv = conversationEvents(a.client);
  const bEv = conversationEvents(b.client);
  await a.client.send({ user: bob.userId }, 'oops');
  await waitFor(() => b.has('oops'), 'the message');
  const convSeq = b.messages[0].convSeq;
  await assert.rejects(b.client.recall({ user: alice.userId }, convSeq), (e) => e.code === 'ERROR_CODE_NOT_ALLOWED');
  const r = await a.client.recall({ user: bob.userId }, convSeq);
  assert.equal(r.convSeq, convSeq);
  assert.equal(r.recalledBy, alice.userId);
  await waitFor(() => bEv.recalled.some((x) => x.convSeq === convSeq), 'bob sees the recall live');
  assert.equal(aEv.recalled.length, 1, 'the answer is also an event, once (the recalling device gets no push)');
  const page = await b.client.history({ user: alice.userId });
  assert.equal(page.messages[0].contentType, RECALLED, 'a tombstone by history');
  assert.equal(page.messages[0].content.length, 0);
  await assert.rejects(a.client.recall({ user: bob.userId }, convSeq), (e) => e.code === 'ERROR_CODE_ALREADY_RECALLED');
  await assert.rejects(a.client.recall({ user: bob.userId }, 42), (e) => e.code === 'ERROR_CODE_NOT_FOUND');

  assert.equal(a.client.typing({ user: bob.userId }), true);
  await waitFor(() => bEv.typing.some((t) => t.userId === alice.userId && conversationKey(t.conversation) === `user:${alice.userId}`), 'bob sees alice typing');
  assert.equal(aEv.typing.length, 0, 'not echoed to the typist');
  // More than the burst: refused as RATE_LIMITED, reported as a server error (typing has no answer).
  for (let i = 0; i < 5; i++) a.client.typing({ user: bob.userId });
  await waitFor(() => aEv.errors.some((e) => e.code === 'ERROR_CODE_RATE_LIMITED'), 'typing past its rate refused');
  a.client.close();
  b.client.close();
});

test('conversations: in a group, the author gets the receipt of the message read up to, and groupReaders says who', async () => {
  const { alice, bob } = await pair();
  const g = await server.call('POST', '/v1/groups', { name: 'readers', member_ids: [Number(bob.userId)] }, alice.token);
  const groupId = String(g.group_id);
  const a = await app(alice);
  const b = await app(bob);
  const aEv = conversationEvents(a.client);
  await a.client.send({ group: groupId }, 'read me');
  await waitFor(() => b.has('read me'), 'the group message');
  const convSeq = b.messages[0].convSeq;
  assert.deepEqual((await a.client.groupReaders(groupId, convSeq)).userIds, [alice.userId], 'only the author so far');
  const row = (await b.client.conversationList()).conversations.find((c) => conversationKey(c.conversation) === `group:${groupId}`);
  assert.equal(row.unread, '1');
  await b.client.markRead({ group: groupId }, convSeq);
  await waitFor(() => aEv.receipts.some((r) => r.userId === bob.userId && r.readSeq === convSeq), 'alice gets bob\'s receipt');
  assert.equal(conversationKey(aEv.receipts[0].conversation), `group:${groupId}`);
  const readers = await a.client.groupReaders(groupId, convSeq);
  assert.deepEqual([...readers.userIds].sort(), [alice.userId, bob.userId].sort());
  const stranger = await server.user('stranger');
  const s = await app(stranger);
  const sEv = conversationEvents(s.client);
  await assert.rejects(s.client.groupReaders(groupId, convSeq), (e) => e.code === 'ERROR_CODE_NOT_IN_CONVERSATION');
  assert.equal(s.client.typing({ group: groupId }), true);
  await waitFor(() => sEv.errors.some((e) => e.code === 'ERROR_CODE_NOT_IN_CONVERSATION'), 'typing in a group of others refused');
  for (const c of [a, b, s]) c.client.close();
});

test('SeqTracker and MemorySeqStore: gaps, duplicates, holes jumped by a completed sync', () => {
  const t = new SeqTracker('0');
  assert.ok(t.observe('1'));
  assert.ok(t.observe('3'));
  assert.ok(t.hasGap());
  assert.ok(!t.observe('3'));
  t.syncComplete('3');
  assert.equal(t.contiguous, '3');
  assert.ok(!t.hasGap());
  assert.ok(t.observe('2'), 'a late commit is still delivered');
  assert.ok(!t.observe('2'));
  const s = new MemorySeqStore();
  s.save('5');
  s.save('3');
  assert.equal(s.load(), '5');
});
