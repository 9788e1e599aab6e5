// The zhibo browser chat page: accounts, friends and groups over the user-api (api.js); messages and live
// rooms through the TypeScript SDK (clients/typescript, served as /sdk/zhibo-client.js), which owns the
// WebSocket and the protocol's rules: sign-in, heartbeats, resume from the last contiguous seq (kept in
// localStorage by the SDK's LocalStorageSeqStore), sync on a gap, resends with the same client_msg_id,
// GoAway, Kick, back-off. The page never touches the socket or the protobuf.
//
// Messages the SDK hands over (each seq once) are kept in localStorage per user and device, for the
// history after a reload; what arrived while the page was closed comes from the SDK's sync at connect.
// The page exposes `window.zhibo` ({sdk, client, acks}: the SDK module, the session's Client, each send's
// ACK by client_msg_id) for the browser test and the console.

import { api, ApiError } from './api.js';
import * as sdk from './sdk/zhibo-client.js';

const { Client, LocalStorageSeqStore, text } = sdk;

const TEXT = 1; // content_type of a UTF-8 text message (the command-line client uses the same)
const CACHE_LIMIT = 2000;
const REFRESH_MS = 5000;
const MAX_DANMAKU = 60;

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
  unread: new Map(), // conversation key → count
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

function peerItem(key, label) {
  const unread = state.unread.get(key) || 0;
  return el('li', { dataset: { conv: key }, class: key === state.current ? 'active' : '', onclick: () => openConversation(key) },
    el('span', { class: 'name', textContent: label }),
    unread ? el('span', { class: 'badge', textContent: String(unread) }) : '');
}

function renderSidebar() {
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
  if (state.current) $('conv-title').textContent = convTitle(state.current);
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
    text: m.contentType === TEXT ? text(m) : `[content type ${m.contentType}, ${m.content.length} bytes]`,
  };
}

const pendingKey = (m) => `${m.device}/${m.cmid}`;

/** Adds (or completes) a message; returns whether it was new. */
function addMessage(m) {
  if (m.id && state.byKey.has(m.id)) return false;
  const pending = state.byKey.get(pendingKey(m));
  if (pending) {
    // Our own send, confirmed by its ACK.
    Object.assign(pending, { id: m.id, seq: m.seq, time: m.time, state: '' });
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

/** New messages (pushed or synced, each seq once): store, render, count unread, learn names and groups. */
async function received(messages) {
  const fresh = messages.filter(addMessage);
  if (!fresh.length) return;
  for (const m of fresh) {
    const key = convOf(m);
    if (key !== state.current && m.from !== state.session.user_id) state.unread.set(key, (state.unread.get(key) || 0) + 1);
  }
  saveInbox();
  const unknownGroup = fresh.some((m) => m.type === 'RECEIVER_TYPE_GROUP' && !state.groups.some((g) => g.group_id === m.to));
  const unknownFriend = fresh.some((m) => m.type === 'RECEIVER_TYPE_USER' && !state.friends.includes(convOf(m).slice(5)));
  await loadUsers(fresh.map((m) => m.from));
  if (unknownGroup || unknownFriend) await refreshLists().catch(report);
  renderSidebar();
  renderMessages();
}

function renderMessages() {
  const list = $('messages');
  if (!state.current) { list.replaceChildren(); return; }
  const msgs = state.messages.filter((m) => convOf(m) === state.current)
    .sort((a, b) => sortKey(a) - sortKey(b));
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 40;
  list.replaceChildren(...msgs.map((m) => el('li', {
    class: `msg${m.from === state.session.user_id ? ' mine' : ''}${m.state ? ` ${m.state}` : ''}`,
    dataset: { messageId: m.id || '', seq: m.seq || '' },
  },
  el('span', { class: 'who', textContent: nameOf(m.from) }),
  el('span', { class: 'text', textContent: m.text }),
  el('time', { textContent: m.time ? new Date(m.time).toLocaleTimeString() : '…' }))));
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function openConversation(key) {
  state.current = key;
  state.unread.delete(key);
  $('conv-title').textContent = convTitle(key);
  for (const c of $('composer').elements) c.disabled = false;
  renderSidebar();
  renderMessages();
  $('messages').scrollTop = $('messages').scrollHeight;
  $('composer').elements.text.focus();
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
    addMessage({ ...m, id: ack.messageId, seq: ack.seq, time: Number(ack.serverTimeMs) });
    state.acks.set(m.cmid, ack);
    saveInbox();
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
  client.on('message', receivedFromSdk);
  client.on('synced', () => setStatus('synced'));
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
  client.on('serverError', (e) => toast(`${e.code}: ${e.message}`));
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
    send(state.current, text).catch(report);
  });
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
