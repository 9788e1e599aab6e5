// The zhibo browser chat page: accounts, friends and groups over the user-api (api.js); messages and live
// rooms through the TypeScript SDK (clients/typescript, served as /sdk/zhibo-client.js), which owns the
// WebSocket and the protocol's rules: sign-in, heartbeats, resume from the last contiguous seq (kept in
// localStorage by the SDK's LocalStorageSeqStore), sync on a gap, resends with the same client_msg_id,
// GoAway, Kick, back-off. The page never touches the socket or the protobuf.
//
// Messages the SDK hands over (each seq once) are kept in localStorage per user and device, for the
// history after a reload; what arrived while the page was closed comes from the SDK's sync at connect.
// Conversations (issue #13) come from the server: the chat list (last message, unread badge, mute/pin) is
// the SDK's conversationList, kept current by list sync (rows changed after the version the page holds)
// after every batch of messages, sync and recall; opening a chat marks it read (the user's other devices
// clear their badge on the ConversationUpdate the server pushes them); own 1:1 messages get a read tick
// up to the peer's read position (the row's peer_read_seq, then live ReadReceipts); recalls replace the
// message with a tombstone on every device (live Recalled); "typing…" is sent while typing (throttled)
// and shown for a few seconds on Typing; "load earlier" pages the conversation's history back.
// The page exposes `window.zhibo` ({sdk, client, acks}: the SDK module, the session's Client, each send's
// ACK by client_msg_id) for the browser test and the console.

import { api, ApiError } from './api.js';
import * as sdk from './sdk/zhibo-client.js';

const { Client, LocalStorageSeqStore, text, conversationKey, RECALLED, DELETED } = sdk;

const TEXT = 1; // content_type of a UTF-8 text message (the command-line client uses the same)
const CACHE_LIMIT = 2000;
const REFRESH_MS = 5000;
const MAX_DANMAKU = 60;
const HISTORY_PAGE = 20; // messages per "load earlier"
const RECALL_WINDOW_MS = 120_000; // the server's default logic.recall_window_secs (it has the last word)
const TYPING_SEND_MS = 2000; // at most one TypingInput per 2 s while typing (the server allows 1/s)
const TYPING_SHOW_MS = 4000; // a Typing notice is shown this long unless repeated

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e[k] = v;
  }
  e.append(...children);
  return e;
};

const state = {
  wsUrl: '',
  deviceId: localStorage.getItem('zhibo.device_id') || '',
  session: JSON.parse(localStorage.getItem('zhibo.session') || 'null'),
  client: null, // the SDK's Client of this session
  users: new Map(), // user id → {username, nickname}
  friends: [], // user ids
  groups: [], // {group_id, name}
  requests: [],
  invitations: [], // {group_id, name, inviter}
  messages: [], // every message of the inbox, oldest first as they came
  byKey: new Map(), // message id, or `${device}/${client_msg_id}` for unacknowledged sends → message
  acks: new Map(), // client_msg_id → the ACK the SDK resolved the send with (window.zhibo.acks)
  convs: new Map(), // conversation key → the SDK's Conversation row (unread, read positions, mute/pin)
  listVersion: '0', // the largest row version held: the next list sync's changedAfter
  typing: new Map(), // conversation key → {user, until}
  earlier: new Map(), // conversation key → true once history has no earlier page
  readers: new Map(), // message id → user ids who have read it (own group messages, asked with "Seen by")
  stale: new Set(), // conversation keys changed while this device was away: check the held messages
  afterSync: false, // the next list sync follows a (re)connection's sync
  current: null, // conversation key: 'user:<id>' | 'group:<id>'
  room: null, // {id, online}
  refreshTimer: 0,
};
window.zhibo = { sdk, client: null, acks: state.acks };

// ---------------------------------------------------------------------------------------------- UI bits

let toastTimer = 0;
function toast(text) {
  const t = $('toast');
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 6000);
}

function report(e) {
  console.error(e);
  toast(e instanceof ApiError ? `${e.code}: ${e.message}` : String(e.message || e));
}

function setStatus(s) {
  const st = $('conn-status');
  st.dataset.state = s;
  st.textContent = s;
}

function nameOf(id) {
  const u = state.users.get(id);
  return u ? (u.nickname || u.username) : `user ${id}`;
}

function convTitle(key) {
  const [kind, id] = key.split(':');
  if (kind === 'user') return nameOf(id);
  const g = state.groups.find((g) => g.group_id === id);
  return g ? `# ${g.name}` : `group ${id}`;
}

// ------------------------------------------------------------------------------------ users, friends

async function loadUsers(ids) {
  const missing = [...new Set(ids)].filter((id) => id !== '0' && !state.users.has(id));
  await Promise.all(missing.map(async (id) => {
    try {
      const u = await api('GET', `/v1/users/${id}`, { token: state.session.token });
      state.users.set(id, { username: u.username, nickname: u.nickname });
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 404)) throw e;
      state.users.set(id, { username: `user ${id}`, nickname: '' });
    }
  }));
}

async function refreshLists() {
  const token = state.session.token;
  const [friends, requests, groups, invitations] = await Promise.all([
    api('GET', '/v1/friends', { token }),
    api('GET', '/v1/friends/requests', { token }),
    api('GET', '/v1/groups', { token }),
    api('GET', '/v1/groups/invitations', { token }),
  ]);
  state.friends = friends.friends.map((f) => String(f.friend_id));
  state.requests = requests.requests.map((r) => ({ from: String(r.from_user_id), message: r.message }));
  state.groups = groups.groups.map((g) => ({ group_id: String(g.group_id), name: g.name }));
  state.invitations = invitations.invitations.map((i) => ({ group_id: String(i.group_id), name: i.group_name, inviter: String(i.inviter_id) }));
  await loadUsers([...state.friends, ...state.requests.map((r) => r.from), ...state.invitations.map((i) => i.inviter)]);
  renderSidebar();
}

/** The unread count shown for a conversation (none for the open chat: it is being read). */
function unreadOf(key) {
  const row = state.convs.get(key);
  return row && key !== state.current ? Number(row.unread) : 0;
}

function badge(key) {
  const unread = unreadOf(key);
  const row = state.convs.get(key);
  return unread ? el('span', { class: `badge${row.muted ? ' muted' : ''}`, textContent: String(unread) }) : '';
}

function peerItem(key, label) {
  return el('li', { dataset: { conv: key }, class: key === state.current ? 'active' : '', onclick: () => openConversation(key) },
    el('span', { class: 'name', textContent: label }),
    badge(key));
}

/** A message's preview in the chat list. */
function preview(m) {
  if (!m) return '';
  const who = m.senderUserId === state.session.user_id ? 'You' : nameOf(m.senderUserId);
  if (m.contentType === RECALLED) return `${who}: message recalled`;
  if (m.contentType === DELETED) return 'message deleted';
  return `${who}: ${m.contentType === TEXT ? text(m) : `[content type ${m.contentType}]`}`;
}

function typingNow(key) {
  const t = state.typing.get(key);
  return t && t.until > Date.now() ? t : null;
}

/** The chat list: pinned first, then newest activity first. */
function renderConversations() {
  const activity = (row) => Number(row.lastMessage ? row.lastMessage.serverTimeMs : 0);
  const rows = [...state.convs.entries()].sort(([, a], [, b]) => (b.pinned - a.pinned) || (activity(b) - activity(a)));
  $('conversations').replaceChildren(...rows.map(([key, row]) => {
    const typing = typingNow(key);
    return el('li', {
      dataset: { conv: key, unread: String(unreadOf(key)) },
      class: `${key === state.current ? 'active' : ''}${row.muted ? ' muted' : ''}${row.pinned ? ' pinned' : ''}`,
      onclick: () => openConversation(key),
    },
    el('span', { class: 'name' }, convTitle(key),
      row.pinned ? el('span', { class: 'flag', textContent: 'pinned' }) : '',
      row.muted ? el('span', { class: 'flag', textContent: 'muted' }) : ''),
    badge(key),
    el('span', { class: `preview${typing ? ' typing' : ''}`, textContent: typing ? 'typing…' : preview(row.lastMessage) }));
  }));
  $('conversations-empty').hidden = state.convs.size > 0;
}

function renderSidebar() {
  renderConversations();
  $('friends').replaceChildren(...state.friends.map((id) => peerItem(`user:${id}`, nameOf(id))));
  $('groups').replaceChildren(...state.groups.map((g) => peerItem(`group:${g.group_id}`, `# ${g.name}`)));
  $('requests-section').hidden = state.requests.length === 0;
  $('requests').replaceChildren(...state.requests.map((r) => el('li', { dataset: { from: r.from } },
    el('span', { class: 'name', textContent: nameOf(r.from) }),
    r.message ? el('span', { class: 'hint', textContent: ` “${r.message}”` }) : '',
    el('button', { type: 'button', textContent: 'Agree', onclick: () => agree(r.from) }))));
  $('invitations-section').hidden = state.invitations.length === 0;
  $('invitations').replaceChildren(...state.invitations.map((i) => el('li', { dataset: { group: i.group_id } },
    el('span', { class: 'name', textContent: `# ${i.name}` }),
    el('span', { class: 'hint', textContent: ` from ${nameOf(i.inviter)} ` }),
    el('button', { type: 'button', textContent: 'Join', onclick: () => answerInvitation(i.group_id, 'accept').catch(report) }),
    el('button', { type: 'button', textContent: 'Refuse', onclick: () => answerInvitation(i.group_id, 'refuse').catch(report) }))));
  if (state.current) {
    $('conv-title').textContent = convTitle(state.current);
    renderConvTools();
  }
}

async function agree(from) {
  await api('POST', `/v1/friends/requests/${from}/agree`, { token: state.session.token, body: {} });
  await refreshLists();
}

/** Joins (`accept`) or refuses a group invitation. */
async function answerInvitation(groupId, answer) {
  await api('POST', `/v1/groups/invitations/${groupId}/${answer}`, { token: state.session.token });
  await refreshLists();
}

async function findUser(username) {
  const { users } = await api('GET', `/v1/users/search?username=${encodeURIComponent(username)}`,
    { token: state.session.token });
  if (!users.length) throw new Error(`no user named ${username}`);
  const u = users[0];
  state.users.set(String(u.user_id), { username: u.username, nickname: u.nickname });
  return String(u.user_id);
}

// ------------------------------------------------------------------------------------------ messages

function convOf(m) {
  if (m.type === 'RECEIVER_TYPE_GROUP') return `group:${m.to}`;
  return `user:${m.from === state.session.user_id ? m.to : m.from}`;
}

/** An SDK message → the page's record (what the cache in localStorage holds). */
function fromSdk(m) {
  return {
    id: m.messageId,
    seq: m.seq,
    from: m.senderUserId,
    device: m.senderDeviceId,
    type: m.receiverType,
    to: m.receiverId,
    cmid: m.clientMsgId,
    time: Number(m.serverTimeMs),
    ct: m.contentType,
    cs: m.convSeq || '0',
    text: textOf(m.contentType, m),
  };
}

function textOf(ct, m) {
  if (ct === RECALLED) return 'message recalled';
  if (ct === DELETED) return 'message deleted';
  return ct === TEXT ? text(m) : `[content type ${ct}, ${m.content.length} bytes]`;
}

const pendingKey = (m) => `${m.device}/${m.cmid}`;

/** Adds (or completes) a message; returns whether it was new. */
function addMessage(m) {
  if (m.id && state.byKey.has(m.id)) return false;
  const pending = state.byKey.get(pendingKey(m));
  if (pending) {
    // Our own send, confirmed by its ACK.
    Object.assign(pending, { id: m.id, seq: m.seq, time: m.time, cs: m.cs, state: '' });
    state.byKey.delete(pendingKey(m));
    state.byKey.set(m.id, pending);
    return false;
  }
  if (m.id) state.byKey.set(m.id, m);
  else state.byKey.set(pendingKey(m), m);
  state.messages.push(m);
  return true;
}

function sortKey(m) { return m.time || Number.MAX_SAFE_INTEGER; }
/** Oldest first: by server time, then by inbox seq (history pages arrive newest first); pending last. */
function byTime(a, b) { return (sortKey(a) - sortKey(b)) || (Number(a.seq || Infinity) - Number(b.seq || Infinity)); }

// The SDK saves the seq in its LocalStorageSeqStore before it hands a message to the page; the page saves
// the message at the end of the same task (a microtask: no reload can come in between), and a page of
// synced messages is one save.
let savePending = false;
function saveInbox() {
  if (savePending) return;
  savePending = true;
  queueMicrotask(() => {
    savePending = false;
    if (!state.session) return;
    const msgs = state.messages.filter((m) => m.id).slice(-CACHE_LIMIT);
    localStorage.setItem(inboxKey(), JSON.stringify({ messages: msgs }));
  });
}

function inboxKey() { return `zhibo.inbox.${state.session.user_id}.${state.session.device_id}`; }
/** The SDK's seq store key: the last seq up to which this device holds every message. */
function seqKey() { return `zhibo.seq.${state.session.user_id}.${state.session.device_id}`; }

function loadInbox() {
  const saved = JSON.parse(localStorage.getItem(inboxKey()) || 'null');
  state.messages = [];
  state.byKey.clear();
  if (saved) for (const m of saved.messages) addMessage(m);
}

// Messages the SDK handed over in this task (a synced page is one task), handled together at its end.
let incoming = [];
function receivedFromSdk(m) {
  incoming.push(fromSdk(m));
  if (incoming.length === 1) queueMicrotask(() => { const batch = incoming; incoming = []; received(batch).catch(report); });
}

/** New messages (pushed or synced, each seq once): store, render, refresh the chat list, learn names and groups. */
async function received(messages) {
  const fresh = messages.filter(addMessage);
  if (!fresh.length) return;
  saveInbox();
  syncList();
  const unknownGroup = fresh.some((m) => m.type === 'RECEIVER_TYPE_GROUP' && !state.groups.some((g) => g.group_id === m.to));
  const unknownFriend = fresh.some((m) => m.type === 'RECEIVER_TYPE_USER' && !state.friends.includes(convOf(m).slice(5)));
  await loadUsers(fresh.map((m) => m.from));
  if (unknownGroup || unknownFriend) await refreshLists().catch(report);
  renderSidebar();
  renderMessages();
}

function messagesOf(key) {
  return state.messages.filter((m) => convOf(m) === key && m.ct !== DELETED);
}

/** Own 1:1 message: "✓" sent, "✓✓" read by the peer (up to the row's peer_read_seq). */
function tick(m) {
  if (m.from !== state.session.user_id || m.type !== 'RECEIVER_TYPE_USER' || !m.id || m.ct === RECALLED) return '';
  const row = state.convs.get(convOf(m));
  const cs = m.cs || '0';
  const read = row && cs !== '0' && BigInt(cs) <= BigInt(row.peerReadSeq);
  return el('span', { class: `tick${read ? ' read' : ''}`, title: read ? 'read' : 'sent', textContent: read ? '✓✓' : '✓' });
}

/** Own group message: "seen by" asks the server which members have read it (GroupReadersInput). */
function seenBy(m) {
  if (m.from !== state.session.user_id || m.type !== 'RECEIVER_TYPE_GROUP' || !m.cs || m.cs === '0' || m.ct === RECALLED) return '';
  const readers = state.readers.get(m.id);
  if (readers) {
    const names = readers.filter((id) => id !== state.session.user_id).map(nameOf);
    return el('span', { class: 'seen', textContent: names.length ? `read by ${names.join(', ')}` : 'read by nobody yet' });
  }
  return el('button', { type: 'button', class: 'seen-by', textContent: 'Seen by', title: 'who has read it', onclick: () => loadReaders(m).catch(report) });
}

async function loadReaders(m) {
  const out = await state.client.groupReaders(m.to, m.cs);
  await loadUsers(out.userIds);
  state.readers.set(m.id, out.userIds);
  renderMessages();
}

function canRecall(m) {
  return m.from === state.session.user_id && m.id && m.cs && m.cs !== '0' && m.ct !== RECALLED && Date.now() - m.time < RECALL_WINDOW_MS;
}

function renderMessages() {
  const list = $('messages');
  if (!state.current) { list.replaceChildren(); renderTyping(); return; }
  const msgs = messagesOf(state.current).sort(byTime);
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
  list.replaceChildren(...msgs.map((m) => el('li', {
    class: `msg${m.from === state.session.user_id ? ' mine' : ''}${m.state ? ` ${m.state}` : ''}${m.ct === RECALLED ? ' recalled' : ''}`,
    dataset: { messageId: m.id || '', seq: m.seq || '', convSeq: m.cs || '' },
  },
  el('span', { class: 'who', textContent: nameOf(m.from) }),
  el('span', { class: 'text', textContent: m.text }),
  el('span', { class: 'meta' },
    canRecall(m) ? el('button', { type: 'button', class: 'recall', textContent: 'Recall', title: 'recall this message for everyone', onclick: () => recall(m).catch(report) }) : '',
    el('time', { textContent: m.time ? new Date(m.time).toLocaleTimeString() : '…' }),
    tick(m),
    seenBy(m)))));
  const earliest = msgs.find((m) => m.cs && m.cs !== '0');
  $('load-earlier').hidden = state.earlier.get(state.current) === true || (earliest ? earliest.cs === '1' : !state.convs.has(state.current));
  if (atBottom) list.scrollTop = list.scrollHeight;
  renderTyping();
}

function renderTyping() {
  const t = state.current && typingNow(state.current);
  const list = $('messages');
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
  $('typing').textContent = t ? `${nameOf(t.user)} is typing…` : '';
  $('typing').hidden = !t;
  if (atBottom) list.scrollTop = list.scrollHeight; // the line took room from the list: keep the newest in view
}

/** The open chat's mute / pin toggles. */
function renderConvTools() {
  const row = state.current && state.convs.get(state.current);
  $('conv-tools').hidden = !row;
  if (!row) return;
  $('conv-mute').textContent = row.muted ? 'Unmute' : 'Mute';
  $('conv-mute').setAttribute('aria-pressed', String(row.muted));
  $('conv-pin').textContent = row.pinned ? 'Unpin' : 'Pin';
  $('conv-pin').setAttribute('aria-pressed', String(row.pinned));
}

function openConversation(key) {
  state.current = key;
  $('conv-title').textContent = convTitle(key);
  for (const c of $('composer').elements) c.disabled = false;
  renderSidebar();
  renderMessages();
  $('messages').scrollTop = $('messages').scrollHeight;
  $('composer').elements.text.focus();
  // Nothing of this chat held here (a cleared cache, an old conversation): its latest page.
  if (state.convs.has(key) && !messagesOf(key).some((m) => m.id)) loadEarlier(key).catch(report);
  else checkLatest(key).catch((e) => { if (e.code !== 'CLOSED') report(e); });
  markCurrentRead();
}

// ------------------------------------------------------------------------------------- conversations

/** Applies a row from the server (a list page or a ConversationUpdate) unless it is older than ours. */
function applyRow(row) {
  const key = conversationKey(row.conversation);
  const held = state.convs.get(key);
  if (held && BigInt(held.version) > BigInt(row.version)) return;
  // A ReadReceipt may have arrived before the row that carries it.
  if (held && BigInt(held.peerReadSeq) > BigInt(row.peerReadSeq)) row = { ...row, peerReadSeq: held.peerReadSeq };
  state.convs.set(key, row);
  if (BigInt(row.version) > BigInt(state.listVersion)) state.listVersion = row.version;
  // A recall or delete-for-me while this device was away: the row's copy of its last message says so.
  if (row.lastMessage && applyServerCopy(row.lastMessage)) saveInbox();
}

let listSyncing = false;
let listAgain = false;
/** List sync: the rows changed since the version the page holds (all of them the first time). */
function syncList() {
  if (listSyncing) { listAgain = true; return; }
  const client = state.client;
  if (!client) return;
  listSyncing = true;
  listAgain = false;
  const afterSync = state.afterSync;
  state.afterSync = false;
  // One changedAfter for every page: rows come in activity order, not version order, so a later page
  // may hold rows older than the versions of an earlier one (listVersion rises as rows are applied).
  const since = state.listVersion;
  (async () => {
    const names = [];
    for (let page = await client.conversationList({ changedAfter: since, limit: 500 }); ;) {
      for (const row of page.conversations) {
        applyRow(row);
        // Changed while away: a message held here may have been recalled or deleted meanwhile.
        if (afterSync) state.stale.add(conversationKey(row.conversation));
        if (row.conversation.type === 'RECEIVER_TYPE_USER') names.push(row.conversation.id);
        if (row.lastMessage) names.push(row.lastMessage.senderUserId);
      }
      if (!page.hasMore) break;
      page = await client.conversationList({ changedAfter: since, after: page.conversations.at(-1), limit: 500 });
    }
    await loadUsers(names);
  })().catch((e) => {
    if (e.code !== 'CLOSED') { report(e); }
    if (afterSync) state.afterSync = true;
    // Cut off midway: the pages not read yet may hold rows older than what was applied.
    if (BigInt(state.listVersion) > BigInt(since)) state.listVersion = since;
  }).finally(() => {
    listSyncing = false;
    if (listAgain) syncList();
    renderSidebar();
    renderMessages();
    markCurrentRead();
    // The open chat has nothing held here (a cleared cache, an old conversation): its latest page.
    const key = state.current;
    if (key && state.convs.has(key) && !messagesOf(key).some((m) => m.id)) loadEarlier(key).catch(report);
    else if (key) checkLatest(key).catch((e) => { if (e.code !== 'CLOSED') report(e); });
  });
}

/** Applies the server's copy of a held message: its conv_seq, and whether it is a tombstone now. */
function applyServerCopy(m) {
  const held = state.byKey.get(m.messageId);
  if (!held) return false;
  let changed = false;
  if (!held.cs || held.cs === '0') { held.cs = m.convSeq; changed = true; }
  if ((m.contentType === RECALLED || m.contentType === DELETED) && held.ct !== m.contentType) {
    Object.assign(held, { ct: m.contentType, text: textOf(m.contentType) });
    changed = true;
  }
  return changed;
}

/**
 * Checks the held messages of a chat against its latest history page, when the chat changed while this
 * device was away (a recall or a delete-for-me that no live notice told it: the inbox copy is a tombstone
 * now, but sync does not hand a seq over twice), or when own messages lack their conv_seq (a send's ACK
 * has none, and the sending device gets no copy of its own message; recall, ticks and "seen by" need it),
 * asked once per message.
 */
async function checkLatest(key) {
  const missing = messagesOf(key).filter((m) => m.id && (!m.cs || m.cs === '0') && !m.csAsked);
  const row = state.convs.get(key);
  if (!row || !state.client || (!missing.length && !state.stale.has(key))) return;
  for (const m of missing) m.csAsked = true;
  state.stale.delete(key);
  const page = await state.client.history(row.conversation, { limit: 50 });
  if (page.messages.map(applyServerCopy).some(Boolean)) {
    saveInbox();
    if (state.current === key) renderMessages();
  }
}

/** The open chat is read up to its last message (the server clears the badge on the user's other devices). */
function markCurrentRead() {
  const key = state.current;
  const row = key && state.convs.get(key);
  if (!row || !state.client || BigInt(row.readSeq) >= BigInt(row.lastSeq) || row.marking === row.lastSeq) return;
  row.marking = row.lastSeq;
  state.client.markRead(row.conversation, row.lastSeq)
    .then((u) => { applyRow(u.conversation); renderSidebar(); })
    .catch((e) => { row.marking = null; if (e.code !== 'CLOSED') report(e); });
}

/** A row changed on another device of this user (read, mute/pin, delete-for-me), or our own answer. */
function conversationUpdated(u) {
  applyRow(u.conversation);
  if (u.deletedConvSeq && u.deletedConvSeq !== '0') {
    const key = conversationKey(u.conversation.conversation);
    for (const m of state.messages) if (convOf(m) === key && m.cs === u.deletedConvSeq) Object.assign(m, { ct: DELETED, text: textOf(DELETED) });
    saveInbox();
  }
  renderSidebar();
  renderMessages();
}

function readReceipt(r) {
  const key = conversationKey(r.conversation);
  const row = state.convs.get(key);
  // In a group, the author of the message read up to is told: own messages up to it were read by r.userId.
  if (r.conversation.type === 'RECEIVER_TYPE_GROUP') {
    for (const m of state.messages) {
      const readers = state.readers.get(m.id);
      if (readers && convOf(m) === key && m.cs && BigInt(m.cs) <= BigInt(r.readSeq) && !readers.includes(r.userId)) readers.push(r.userId);
    }
    loadUsers([r.userId]).then(renderMessages).catch(() => {});
  }
  if (row && r.conversation.type === 'RECEIVER_TYPE_USER' && BigInt(r.readSeq) > BigInt(row.peerReadSeq)) row.peerReadSeq = r.readSeq;
  if (!row) syncList();
  renderMessages();
}

function recalled(r) {
  const key = conversationKey(r.conversation);
  for (const m of state.messages) {
    if (m.id === r.messageId || (convOf(m) === key && m.cs === r.convSeq)) Object.assign(m, { ct: RECALLED, text: textOf(RECALLED) });
  }
  saveInbox();
  syncList(); // the rows' previews and versions moved
  renderMessages();
}

async function recall(m) {
  await state.client.recall(m.type === 'RECEIVER_TYPE_GROUP' ? { group: m.to } : { user: convOf(m).slice(5) }, m.cs);
}

function typingReceived(t) {
  const key = conversationKey(t.conversation);
  state.typing.set(key, { user: t.userId, until: Date.now() + TYPING_SHOW_MS });
  renderConversations();
  renderTyping();
  setTimeout(() => { if (!typingNow(key)) { state.typing.delete(key); renderConversations(); renderTyping(); } }, TYPING_SHOW_MS + 50);
}

// A message from that user in that chat ends their "typing…".
function typingDone(messages) {
  let changed = false;
  for (const m of messages) {
    const t = state.typing.get(convOf(m));
    if (t && t.user === m.from) { state.typing.delete(convOf(m)); changed = true; }
  }
  if (changed) { renderConversations(); renderTyping(); }
}

let lastTypingSent = 0;
function userTyping() {
  const key = state.current;
  if (!key || !state.client || !state.convs.has(key) || Date.now() - lastTypingSent < TYPING_SEND_MS) return;
  lastTypingSent = Date.now();
  state.client.typing(state.convs.get(key).conversation);
}

/** "Load earlier": the page of the conversation's history before the earliest message shown. */
const loadingEarlier = new Set();
async function loadEarlier(key) {
  const row = state.convs.get(key);
  if (!row || loadingEarlier.has(key)) return;
  loadingEarlier.add(key);
  try {
    await loadEarlierPage(key, row);
  } finally {
    loadingEarlier.delete(key);
  }
}

async function loadEarlierPage(key, row) {
  const held = messagesOf(key).filter((m) => m.cs && m.cs !== '0');
  const before = held.length ? held.reduce((min, m) => (BigInt(m.cs) < BigInt(min) ? m.cs : min), held[0].cs) : '0';
  const page = await state.client.history(row.conversation, { before, limit: HISTORY_PAGE });
  if (!page.hasMore) state.earlier.set(key, true);
  const list = $('messages');
  const fromBottom = list.scrollHeight - list.scrollTop;
  const updated = page.messages.map(applyServerCopy).some(Boolean);
  const fresh = page.messages.map(fromSdk).filter(addMessage);
  if (updated && !fresh.length) renderMessages();
  await loadUsers(fresh.map((m) => m.from));
  saveInbox();
  if (state.current !== key) return;
  renderMessages();
  list.scrollTop = list.scrollHeight - fromBottom; // keep the view where it was
}

/**
 * Shows the message at once as pending and hands it to the SDK, which writes it now or after the next
 * reconnection and resends it with the same client_msg_id until the server ACKs it: resolved once.
 */
async function send(key, body) {
  const [kind, id] = key.split(':');
  const client = state.client;
  const m = {
    id: '', seq: '', from: state.session.user_id, device: state.session.device_id,
    type: kind === 'group' ? 'RECEIVER_TYPE_GROUP' : 'RECEIVER_TYPE_USER', to: id,
    cmid: client.newClientMsgId(), time: 0, text: body, state: 'pending',
  };
  addMessage(m);
  renderMessages();
  try {
    const ack = await client.send(kind === 'group' ? { group: id } : { user: id }, body, TEXT, m.cmid);
    addMessage({ ...m, id: ack.messageId, seq: ack.seq, cs: ack.convSeq || '', time: Number(ack.serverTimeMs) });
    state.acks.set(m.cmid, ack);
    saveInbox();
    syncList(); // the row's last message (and this message's conv_seq: see checkLatest)
  } catch (e) {
    m.state = 'failed';
    if (e.code !== 'CLOSED') report(e);
  }
  renderMessages();
}

// ---------------------------------------------------------------------------------------- live room

const lanes = [];
function danmaku(body, mine) {
  const stage = $('stage');
  if (stage.childElementCount >= MAX_DANMAKU) return; // like the server: room traffic may be dropped
  const laneCount = Math.max(1, Math.floor(stage.clientHeight / 28));
  const now = performance.now();
  let lane = 0;
  for (let i = 0; i < laneCount; i++) if ((lanes[i] || 0) < (lanes[lane] || 0)) lane = i;
  lanes[lane] = now;
  const item = el('span', { class: `danmaku${mine ? ' mine' : ''}`, textContent: body });
  item.style.top = `${lane * 28 + 4}px`;
  stage.append(item);
  const distance = stage.clientWidth + item.offsetWidth;
  item.animate([{ transform: 'translateX(0)' }, { transform: `translateX(-${distance}px)` }],
    { duration: 6000 + Math.random() * 2000, easing: 'linear' }).onfinish = () => item.remove();
}

function roomLog(line, cls = '') {
  const log = $('room-log');
  log.append(el('li', { class: cls, textContent: line }));
  while (log.childElementCount > 200) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

const NOTICES = { '-1': 'joined', '-2': 'left', '-3': 'the room was closed' };

function roomMessages(messages, live) {
  const fresh = messages.map(fromSdk).filter((m) => {
    // Our own danmaku was shown when the server accepted it; skip it if the room echoes it back.
    // Room copies carry no device id (issue 19): the user and our own client_msg_id are enough.
    if (m.from !== state.session.user_id || !ownDanmaku.has(m.cmid)) return true;
    ownDanmaku.delete(m.cmid);
    return false;
  });
  loadUsers(fresh.map((m) => m.from)).catch(() => {}).finally(() => {
    for (const m of fresh) {
      if (m.ct < 0) {
        roomLog(m.ct === -3 ? NOTICES[-3] : `${nameOf(m.from)} ${NOTICES[m.ct] || `notice ${m.ct}`}`, 'notice');
        continue;
      }
      roomLog(`${nameOf(m.from)}: ${m.text}`, 'danmaku-line');
      if (live) danmaku(m.text, m.from === state.session.user_id);
    }
  });
}

const ownDanmaku = new Set();

async function sendDanmaku(body) {
  const client = state.client;
  const cmid = client.newClientMsgId();
  ownDanmaku.add(cmid);
  await client.sendRoom(state.room.id, body, TEXT, cmid).catch((e) => { ownDanmaku.delete(cmid); throw e; });
  roomLog(`${nameOf(state.session.user_id)}: ${body}`, 'danmaku-line mine');
  danmaku(body, true);
  if (ownDanmaku.size > 100) ownDanmaku.delete(ownDanmaku.values().next().value);
}

function showOnline(n) { $('room-online').textContent = String(n); }

/** Joins through the SDK, which joins again after every reconnection until leaveRoom. */
async function joinRoom(roomId) {
  if (state.room && state.room.id !== roomId) leaveRoom();
  const joined = await state.client.joinRoom(roomId);
  state.room = { id: roomId };
  $('room').hidden = false;
  $('room-id').textContent = roomId;
  $('room-log').replaceChildren();
  showOnline(joined.onlineCount);
  roomMessages(joined.recent, false);
}

function leaveRoom() {
  if (!state.room) return;
  const id = state.room.id;
  state.room = null;
  $('room').hidden = true;
  $('stage').replaceChildren();
  if (state.client) state.client.leaveRoom(id);
}

// ----------------------------------------------------------------------------------------- connection

const FATAL_SIGN_IN = new Set(['ERROR_CODE_UNAUTHENTICATED', 'ERROR_CODE_TOKEN_EXPIRED']);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * The SDK client of this session: it owns the WebSocket (sign-in, heartbeats, resume from the stored
 * seq, gap syncs, resends, GoAway, Kick, back-off). The page listens to its events and keeps trying the
 * first connection (after that, reconnecting is the SDK's).
 */
async function connectClient() {
  const s = state.session;
  const client = new Client({
    url: state.wsUrl,
    userId: s.user_id,
    deviceId: s.device_id,
    token: s.token,
    seqStore: new LocalStorageSeqStore(seqKey()),
  }, globalThis.WebSocket);
  state.client = client;
  window.zhibo.client = client;
  client.on('message', (m) => { typingDone([fromSdk(m)]); receivedFromSdk(m); });
  client.on('synced', () => { setStatus('synced'); state.afterSync = true; syncList(); });
  client.on('conversationUpdate', conversationUpdated);
  client.on('readReceipt', readReceipt);
  client.on('recalled', recalled);
  client.on('typing', typingReceived);
  client.on('state', (st) => {
    if (st.state === 'connecting') setStatus('connecting');
    else if (st.state === 'connected') setStatus('online');
    else setStatus('offline');
    if (st.state === 'closed' && st.error && FATAL_SIGN_IN.has(st.error.code) && client === state.client) {
      toast(`${st.error.code}: ${st.error.message}; please sign in again`);
      forgetSession();
    }
  });
  client.on('room', (r) => {
    if (state.room && (r.roomId === state.room.id || r.roomId === '0')) {
      showOnline(r.onlineCount);
      roomMessages(r.messages, true);
    }
  });
  client.on('roomRejoined', (r) => { if (state.room && r.roomId === state.room.id) showOnline(r.onlineCount); });
  client.on('kicked', (k) => {
    toast(`signed out by the server: ${k.reason} ${k.text}`);
    if (k.reason === 'KICK_REASON_SIGNED_OUT' && client === state.client) forgetSession();
  });
  // A refused typing notice (rate) is not worth a toast.
  client.on('serverError', (e) => { console.warn(`zhibo: server error ${e.code}: ${e.message}`); if (e.code !== 'ERROR_CODE_RATE_LIMITED') toast(`${e.code}: ${e.message}`); });
  for (let delay = 500; client === state.client; delay = Math.min(delay * 2, 15000)) {
    try {
      await client.start();
      return;
    } catch (e) {
      if (client !== state.client) return;
      if (FATAL_SIGN_IN.has(e.code)) {
        toast(`${e.code}: ${e.message}; please sign in again`);
        forgetSession();
        return;
      }
      setStatus('offline');
      await sleep(delay);
    }
  }
}

// ---------------------------------------------------------------------------------- sign-in, startup

async function ensureDevice(force = false) {
  if (state.deviceId && !force) return state.deviceId;
  const d = await api('POST', '/v1/devices', { body: { type: 'web', model: 'browser', sdk_version: 'zhibo-web' } });
  state.deviceId = String(d.device_id);
  localStorage.setItem('zhibo.device_id', state.deviceId);
  $('device-id').textContent = state.deviceId;
  return state.deviceId;
}

async function signIn(username, password) {
  const body = { username, password, device_id: Number(await ensureDevice()) };
  let s;
  try {
    s = await api('POST', '/v1/sessions', { body });
  } catch (e) {
    // The server forgot this browser (an in-memory dev server restarted): register it again.
    if (!(e instanceof ApiError && e.code === 'device_not_found')) throw e;
    body.device_id = Number(await ensureDevice(true));
    s = await api('POST', '/v1/sessions', { body });
  }
  state.session = { user_id: String(s.user_id), device_id: String(s.device_id), token: s.token, expires_at: s.expires_at, username };
  localStorage.setItem('zhibo.session', JSON.stringify(state.session));
  await enter();
}

function forgetSession() {
  const client = state.client;
  state.client = null;
  window.zhibo.client = null;
  if (client) client.close();
  leaveRoom();
  clearInterval(state.refreshTimer);
  state.session = null;
  state.current = null;
  state.convs.clear();
  state.listVersion = '0';
  state.earlier.clear();
  state.typing.clear();
  state.readers.clear();
  state.stale.clear();
  localStorage.removeItem('zhibo.session');
  showAuth();
}

function showAuth() {
  $('chat-view').hidden = true;
  $('auth-view').hidden = false;
  $('sign-out').hidden = true;
  $('me').textContent = '';
  setStatus('offline');
}

/** Signed in: show the chat, load lists and the cached inbox, connect. */
async function enter() {
  const s = state.session;
  const me = await api('GET', '/v1/users/me', { token: s.token });
  state.users.set(s.user_id, { username: me.username, nickname: me.nickname });
  $('me').textContent = `${me.nickname || me.username} (#${s.user_id})`;
  $('me').dataset.userId = s.user_id;
  $('auth-view').hidden = true;
  $('chat-view').hidden = false;
  $('sign-out').hidden = false;
  loadInbox();
  await refreshLists();
  clearInterval(state.refreshTimer);
  state.refreshTimer = setInterval(() => { if (!document.hidden) refreshLists().catch(() => {}); }, REFRESH_MS);
  connectClient().catch(report);
}

function wireForms() {
  const auth = $('auth-form');
  const creds = () => ({ username: auth.elements.username.value.trim(), password: auth.elements.password.value });
  auth.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const { username, password } = creds();
    signIn(username, password).catch(report);
  });
  $('sign-up').addEventListener('click', () => {
    if (!auth.reportValidity()) return;
    const { username, password } = creds();
    api('POST', '/v1/users', { body: { username, password } })
      .then(() => signIn(username, password)).catch(report);
  });
  $('sign-out').addEventListener('click', () => {
    const token = state.session && state.session.token;
    if (state.session) {
      localStorage.removeItem(inboxKey());
      localStorage.removeItem(seqKey());
    }
    forgetSession();
    if (token) api('DELETE', '/v1/sessions', { token }).catch(() => {});
  });
  $('refresh').addEventListener('click', () => refreshLists().catch(report));
  $('add-friend-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const f = ev.target;
    findUser(f.elements.username.value.trim())
      .then((id) => api('POST', '/v1/friends/requests', { token: state.session.token, body: { to_user_id: Number(id) } }))
      .then(() => { toast(`friend request sent to ${f.elements.username.value.trim()}`); f.reset(); })
      .catch(report);
  });
  $('new-group-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const names = f.elements.members.value.split(',').map((s) => s.trim()).filter(Boolean);
    Promise.all(names.map(findUser))
      .then((ids) => api('POST', '/v1/groups', { token: state.session.token, body: { name: f.elements.name.value.trim(), member_ids: ids.map(Number) } }))
      .then((g) => {
        f.reset();
        // Members who are not our friends were invited; they join when they accept.
        if (g.invited.length) toast(`invited (not friends yet): ${g.invited.map((id) => nameOf(String(id))).join(', ')}`);
        return refreshLists().then(() => openConversation(`group:${g.group_id}`));
      })
      .catch(report);
  });
  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = ev.target.elements.text;
    const text = input.value.trim();
    if (!text || !state.current) return;
    input.value = '';
    lastTypingSent = 0; // the message ends "typing…" at the peer: the next keystroke says it again
    send(state.current, text).catch(report);
  });
  $('composer').elements.text.addEventListener('input', (ev) => { if (ev.target.value.trim()) userTyping(); });
  $('load-earlier').addEventListener('click', () => { if (state.current) loadEarlier(state.current).catch(report); });
  const settings = (change) => {
    const row = state.current && state.convs.get(state.current);
    if (!row) return;
    state.client.conversationSettings(row.conversation, { muted: row.muted, pinned: row.pinned, ...change(row) })
      .then((u) => conversationUpdated(u)).catch(report);
  };
  $('conv-mute').addEventListener('click', () => settings((row) => ({ muted: !row.muted })));
  $('conv-pin').addEventListener('click', () => settings((row) => ({ pinned: !row.pinned })));
  $('room-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    joinRoom(String(ev.target.elements.room_id.value)).catch(report);
  });
  $('room-leave').addEventListener('click', () => leaveRoom());
  $('room-composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = ev.target.elements.text;
    const text = input.value.trim();
    if (!text || !state.room) return;
    input.value = '';
    sendDanmaku(text).catch(report);
  });
}

async function main() {
  wireForms();
  const config = await api('GET', '/config.json');
  state.wsUrl = config.ws_url || `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.hostname}:7002/ws`;
  $('device-id').textContent = state.deviceId || '(registered at sign-in)';
  if (state.session && state.session.expires_at * 1000 > Date.now()) {
    try {
      await enter();
      return;
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) throw e;
      forgetSession();
    }
  }
  showAuth();
}

main().catch(report);
