// A zhibo client over WebSocket (browser WebSocket, or the `ws` package in Node) that applies the
// protocol's rules (proto/README.md): heartbeat at the advertised interval, resume from the last
// contiguous seq, sync on a gap, resend un-ACKed sends with the same client_msg_id, obey GoAway, never
// reconnect after Kick, back off with jitter while the gateway cannot be reached.
import { Wire, type Packet } from './wire.js';
import { MemorySeqStore, SeqTracker, type SeqStore } from './seq.js';

/** The subset of the WebSocket API the client uses (browser WebSocket and `ws` both have it). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: unknown) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}
export type WebSocketFactory = new (url: string) => WebSocketLike;

export interface ConnectOptions {
  /** The gateway's WebSocket URL, e.g. `ws://127.0.0.1:7002/ws`. */
  url: string;
  userId: string | number;
  deviceId: string | number;
  token: string;
  /** Where the last contiguous seq is kept (default: memory). */
  seqStore?: SeqStore;
  /** A WebSocket implementation (default: globalThis.WebSocket, else the `ws` package). */
  WebSocket?: WebSocketFactory;
  /** Reconnection back-off: first delay and cap, milliseconds (default 200 and 30000). */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** Longest wait for a connection and its sign-in, milliseconds (default 10000). */
  connectTimeoutMs?: number;
  /** Delay before resending a send refused as retryable (UNAVAILABLE, RATE_LIMITED), ms (default 1000). */
  retryAfterMs?: number;
}

/** An inbox or room message (64-bit values as decimal strings, enums by name). */
export interface Message {
  messageId: string;
  seq: string;
  senderUserId: string;
  senderDeviceId: string;
  receiverType: string;
  receiverId: string;
  clientMsgId: string;
  serverTimeMs: string;
  contentType: number;
  content: Uint8Array;
  /** The message's number in its conversation (1:1 pair or group); '0' for room messages. */
  convSeq: string;
}

/** content_type of a recalled message's tombstone (no content). */
export const RECALLED = -10;
/** content_type of a message the user deleted for themselves (no content). */
export const DELETED = -11;

/** A conversation as the user sees it: a peer (`RECEIVER_TYPE_USER`, id = the peer) or a group. */
export interface ConversationRef {
  type: string;
  id: string;
}

/** How methods name a conversation: `{user}`, `{group}`, or a ConversationRef from the server. */
export type ConversationTarget = { user: string | number } | { group: string | number } | ConversationRef;

/** One row of the user's conversation list (seqs are conversation seqs, except `version`). */
export interface Conversation {
  conversation: ConversationRef;
  lastSeq: string;
  lastMessage: Message | null;
  readSeq: string;
  /** 1:1: how far the peer has read ("read" ticks). */
  peerReadSeq: string;
  unread: string;
  muted: boolean;
  pinned: boolean;
  /** The user's inbox seq of this row's latest change (list sync: `changedAfter`). */
  version: string;
}

export interface ConversationList {
  conversations: Conversation[];
  hasMore: boolean;
  /** The next `changedAfter`. */
  version: string;
}

export interface ConversationListOptions {
  /** List sync: only rows changed after this version. */
  changedAfter?: string | number;
  /** Paging: the last row of the previous page. */
  after?: Conversation;
  /** 0 = 100, at most 500. */
  limit?: number;
}

export interface HistoryOptions {
  /** Messages with conv_seq < before, newest first (default: the latest page). */
  before?: string | number;
  /** Messages with conv_seq > after, oldest first. */
  after?: string | number;
  /** 0 = 50, at most 200. */
  limit?: number;
}

export interface History {
  messages: Message[];
  hasMore: boolean;
}

/** A row changed (read, settings, delete-for-me) on this or another device of the user. */
export interface ConversationUpdate {
  conversation: Conversation;
  /** With delete-for-me: the conv_seq of the message deleted ('0' otherwise). */
  deletedConvSeq: string;
}

export interface ReadReceipt {
  conversation: ConversationRef;
  userId: string;
  readSeq: string;
}

export interface Recalled {
  conversation: ConversationRef;
  convSeq: string;
  messageId: string;
  recalledBy: string;
  /** The receiver's inbox seq of its copy (now a tombstone). */
  seq: string;
}

export interface Typing {
  conversation: ConversationRef;
  userId: string;
}

export interface GroupReaders {
  groupId: string;
  convSeq: string;
  userIds: string[];
}

/** The server's answer to a send. */
export interface Ack {
  messageId: string;
  seq: string;
  serverTimeMs: string;
  duplicate: boolean;
}

export interface RoomJoined {
  roomId: string;
  onlineCount: string;
  recent: Message[];
}

export interface RoomMessages {
  roomId: string;
  messages: Message[];
  onlineCount: string;
}

export type ConnectionState = 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface Events {
  /** An inbox message (1:1 or group), pushed or synced: each seq exactly once. */
  message: Message;
  /** Room traffic. */
  room: RoomMessages;
  /** A room joined again after a reconnection. */
  roomRejoined: RoomJoined;
  /** Connection changes; `url` when connected, `retryInMs` when disconnected, `error` when closed. */
  state: { state: ConnectionState; url?: string; retryInMs?: number; reason?: string; error?: ZhiboError };
  /** A sync completed: every message up to `seq` has been delivered. */
  synced: { seq: string };
  goAway: { reason: string; reconnectHint: string; reconnectAfterMs: number };
  /** Kicked: the client stops and does not reconnect. */
  kicked: { reason: string; text: string };
  /** A conversation row of this user changed (another device read it, muted/pinned it, deleted a message). */
  conversationUpdate: ConversationUpdate;
  /** Someone read a conversation up to a message (1:1 peer; in groups, the author of that message). */
  readReceipt: ReadReceipt;
  /** A message was recalled: its copies are tombstones now. */
  recalled: Recalled;
  /** Someone is typing (ephemeral; show it for a few seconds). */
  typing: Typing;
  /** An error the server pushed outside any request (also a refused `typing`). */
  serverError: { code: string; message: string };
}

/** A refused request or a stopped client; `code` is the server's ErrorCode name when it answered. */
export class ZhiboError extends Error {
  constructor(
    message: string,
    readonly code: string = 'CLIENT',
  ) {
    super(message);
    this.name = 'ZhiboError';
  }
}

const RETRYABLE = new Set(['ERROR_CODE_UNAVAILABLE', 'ERROR_CODE_RATE_LIMITED']);
const FATAL_SIGN_IN = new Set(['ERROR_CODE_UNAUTHENTICATED', 'ERROR_CODE_TOKEN_EXPIRED']);
const SYNC_PAGE = 100;

type Listener<T> = (value: T) => void;

interface PendingSend {
  input: Record<string, unknown>;
  resolve: (ack: Ack) => void;
  reject: (e: ZhiboError) => void;
  inFlight: boolean;
}

type InFlight =
  | { kind: 'send'; clientMsgId: string }
  | { kind: 'request'; resolve: (p: Packet) => void; reject: (e: ZhiboError) => void }
  | { kind: 'join'; roomId: string }
  | { kind: 'sync' }
  | { kind: 'heartbeat' };

async function defaultWebSocket(): Promise<WebSocketFactory> {
  const g = (globalThis as { WebSocket?: WebSocketFactory }).WebSocket;
  if (g) return g;
  const ws = await import('ws');
  return ws.default as unknown as WebSocketFactory;
}

/** Connects and signs in (the first attempt's error is thrown), then stays connected. */
export async function connect(options: ConnectOptions): Promise<Client> {
  const client = new Client(options, options.WebSocket ?? (await defaultWebSocket()));
  await client.start();
  return client;
}

export class Client {
  readonly #opts: Required<Omit<ConnectOptions, 'WebSocket' | 'seqStore'>>;
  readonly #store: SeqStore;
  readonly #WS: WebSocketFactory;
  readonly #wire = new Wire();
  readonly #tracker: SeqTracker;
  readonly #listeners = new Map<keyof Events, Set<Listener<never>>>();
  readonly #sends = new Map<string, PendingSend>();
  readonly #inFlight = new Map<string, InFlight>();
  readonly #rooms = new Set<string>();
  readonly #joinWaiters = new Map<string, { resolve: (r: RoomJoined) => void; reject: (e: ZhiboError) => void }[]>();
  #url: string;
  #ws: WebSocketLike | null = null;
  #nextRequest = 1;
  #nextMsg = 1;
  readonly #nonce = Math.floor(Math.random() * 2 ** 32).toString(16);
  #acked: bigint;
  #heartbeat: ReturnType<typeof setInterval> | null = null;
  #retryTimer: ReturnType<typeof setTimeout> | null = null;
  #reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  #attempt = 0;
  #syncRunning = false;
  #syncAgain = false;
  #goAway: { at: number; hint: string } | null = null;
  #closed: ZhiboError | null = null;
  #lastHeard = 0;

  constructor(options: ConnectOptions, WS: WebSocketFactory) {
    this.#opts = {
      url: options.url,
      userId: String(options.userId),
      deviceId: String(options.deviceId),
      token: options.token,
      backoffMinMs: options.backoffMinMs ?? 200,
      backoffMaxMs: options.backoffMaxMs ?? 30_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      retryAfterMs: options.retryAfterMs ?? 1000,
    };
    this.#url = options.url;
    this.#store = options.seqStore ?? new MemorySeqStore();
    this.#WS = WS;
    this.#tracker = new SeqTracker(this.#store.load());
    this.#acked = BigInt(this.#tracker.contiguous);
  }

  /** The gateway URL currently used (a GoAway hint replaces it). */
  get url(): string {
    return this.#url;
  }

  /** The last seq up to which every message was delivered. */
  get lastSeq(): string {
    return this.#tracker.contiguous;
  }

  /** Subscribes to an event; returns the unsubscribe function. */
  on<K extends keyof Events>(event: K, listener: Listener<Events[K]>): () => void {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  #emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const l of this.#listeners.get(event) ?? []) {
      try {
        (l as Listener<Events[K]>)(value);
      } catch (e) {
        console.error(`zhibo: a '${event}' listener threw`, e);
      }
    }
  }

  /** First connection: its failure is the caller's. */
  async start(): Promise<void> {
    await this.#open();
  }

  /** Sends to a user or a group; resolves with the ACK exactly once, resending across reconnections. */
  send(to: { user?: string | number; group?: string | number }, content: string | Uint8Array, contentType = 1, clientMsgId?: string): Promise<Ack> {
    if (this.#closed) return Promise.reject(this.#closed);
    const [receiverType, receiverId] =
      to.user !== undefined ? ['RECEIVER_TYPE_USER', to.user] : ['RECEIVER_TYPE_GROUP', to.group];
    if (receiverId === undefined) return Promise.reject(new ZhiboError('send: give a user or a group'));
    const id = clientMsgId ?? this.newClientMsgId();
    const input = {
      receiverType,
      receiverId: String(receiverId),
      clientMsgId: id,
      contentType,
      content: typeof content === 'string' ? new TextEncoder().encode(content) : content,
      // An id minted here was never sent: its first transmission says so (cleared for every resend).
      // An app's own id may be a resend from an earlier run: never marked.
      firstAttempt: clientMsgId === undefined,
    };
    return new Promise<Ack>((resolve, reject) => {
      this.#sends.set(id, { input, resolve, reject, inFlight: false });
      this.#resend();
    });
  }

  /** A fresh client_msg_id, unique for this device. */
  newClientMsgId(): string {
    return `${this.#opts.deviceId}-${this.#nonce}-${this.#nextMsg++}`;
  }

  /** Joins a live room (joined again after every reconnection until leaveRoom). */
  joinRoom(roomId: string | number): Promise<RoomJoined> {
    if (this.#closed) return Promise.reject(this.#closed);
    const room = String(roomId);
    return new Promise((resolve, reject) => {
      const waiters = this.#joinWaiters.get(room) ?? [];
      waiters.push({ resolve, reject });
      this.#joinWaiters.set(room, waiters);
      this.#rooms.add(room);
      if (this.#isOpen()) this.#write(this.#request({ kind: 'join', roomId: room }), { subscribeRoom: { roomId: room } });
    });
  }

  leaveRoom(roomId: string | number): void {
    const room = String(roomId);
    this.#rooms.delete(room);
    if (this.#isOpen()) this.#write('0', { unsubscribeRoom: { roomId: room } });
  }

  /** A room message (not stored, not resent); `clientMsgId` lets the app recognise the room's echo. */
  async sendRoom(roomId: string | number, content: string | Uint8Array, contentType = 1, clientMsgId?: string): Promise<Ack> {
    const p = await this.request({
      sendMessage: {
        receiverType: 'RECEIVER_TYPE_ROOM',
        receiverId: String(roomId),
        clientMsgId: clientMsgId ?? this.newClientMsgId(),
        contentType,
        content: typeof content === 'string' ? new TextEncoder().encode(content) : content,
      },
    });
    return p.sendMessageOutput as Ack;
  }

  /** Any request on the current connection (not resent); rejects with the server's error code. */
  request(body: Record<string, unknown>): Promise<Packet> {
    if (this.#closed) return Promise.reject(this.#closed);
    if (!this.#isOpen()) return Promise.reject(new ZhiboError('not connected', 'CLOSED'));
    return new Promise((resolve, reject) => {
      this.#write(this.#request({ kind: 'request', resolve, reject }), body);
    });
  }

  // --- conversations -------------------------------------------------------------------------------

  /** The user's conversations, newest activity first (`changedAfter`: list sync). */
  async conversationList(options: ConversationListOptions = {}): Promise<ConversationList> {
    const after = options.after;
    const p = await this.request({
      conversationList: {
        changedAfter: String(options.changedAfter ?? 0),
        after: after ? after.conversation : undefined,
        afterActivityMs: after ? (after.lastMessage?.serverTimeMs ?? '0') : '0',
        limit: options.limit ?? 0,
      },
    });
    const out = p.conversationListOutput as ConversationList;
    return { ...out, conversations: out.conversations.map(conversation) };
  }

  /** A page of one conversation's history (default: the latest page, newest first). */
  async history(target: ConversationTarget, options: HistoryOptions = {}): Promise<History> {
    const p = await this.request({
      history: {
        conversation: conversationRef(target),
        before: String(options.before ?? 0),
        after: String(options.after ?? 0),
        limit: options.limit ?? 0,
      },
    });
    return p.historyOutput as History;
  }

  /** Marks the conversation read up to `readSeq` (a conv_seq); resolves with the updated row. */
  async markRead(target: ConversationTarget, readSeq: string | number): Promise<ConversationUpdate> {
    const p = await this.request({ markRead: { conversation: conversationRef(target), readSeq: String(readSeq) } });
    return update(p.conversationUpdate as ConversationUpdate);
  }

  /** Recalls message `convSeq`; resolves with the recall notice (also emitted as 'recalled'). */
  async recall(target: ConversationTarget, convSeq: string | number): Promise<Recalled> {
    const p = await this.request({ recall: { conversation: conversationRef(target), convSeq: String(convSeq) } });
    const r = p.recalled as Recalled;
    this.#emit('recalled', r);
    return r;
  }

  /** Hides message `convSeq` on all of the user's devices; resolves with the updated row. */
  async deleteForMe(target: ConversationTarget, convSeq: string | number): Promise<ConversationUpdate> {
    const p = await this.request({ deleteForMe: { conversation: conversationRef(target), convSeq: String(convSeq) } });
    return update(p.conversationUpdate as ConversationUpdate);
  }

  /** Mutes / pins the conversation (both values are set); resolves with the updated row. */
  async conversationSettings(target: ConversationTarget, settings: { muted: boolean; pinned: boolean }): Promise<ConversationUpdate> {
    const p = await this.request({
      conversationSettings: { conversation: conversationRef(target), muted: settings.muted, pinned: settings.pinned },
    });
    return update(p.conversationUpdate as ConversationUpdate);
  }

  /** The current members of a group who have read its message `convSeq`. */
  async groupReaders(groupId: string | number, convSeq: string | number): Promise<GroupReaders> {
    const p = await this.request({ groupReaders: { groupId: String(groupId), convSeq: String(convSeq) } });
    return p.groupReadersOutput as GroupReaders;
  }

  /**
   * "Typing" in a conversation, relayed to the peer's / members' devices online now. Fire and forget:
   * the server answers only a refusal (RATE_LIMITED past 1/s with a burst of 3, NOT_IN_CONVERSATION),
   * emitted as 'serverError'. Returns false when not connected (nothing sent).
   */
  typing(target: ConversationTarget): boolean {
    if (!this.#isOpen()) return false;
    this.#write('0', { typingInput: { conversation: conversationRef(target) } });
    return true;
  }

  /** Drops the connection as a network failure would; the client reconnects at once. */
  reconnect(): void {
    const ws = this.#ws;
    if (!ws) return;
    this.#lost(ws, 'reconnect asked by the app', 0);
  }

  /** Closes for good: pending sends reject, 'state' closed. */
  close(): void {
    this.#stop(new ZhiboError('client closed', 'CLOSED'));
  }

  // --- connection ---------------------------------------------------------------------------------

  #isOpen(): boolean {
    return this.#ws !== null && this.#ws.readyState === 1 && this.#signedIn;
  }
  #signedIn = false;

  #signInUrl(): string {
    const q = `user_id=${encodeURIComponent(this.#opts.userId)}&device_id=${encodeURIComponent(this.#opts.deviceId)}&token=${encodeURIComponent(this.#opts.token)}`;
    return `${this.#url}${this.#url.includes('?') ? '&' : '?'}${q}`;
  }

  /** Opens a socket and waits for the sign-in answer. */
  #open(): Promise<void> {
    this.#emit('state', { state: 'connecting', url: this.#url });
    return new Promise<void>((resolve, reject) => {
      const ws = new this.#WS(this.#signInUrl());
      ws.binaryType = 'arraybuffer';
      this.#ws = ws;
      this.#signedIn = false;
      let settled = false;
      const fail = (e: ZhiboError) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.onmessage = ws.onclose = ws.onerror = null;
        try {
          ws.close();
        } catch {
          /* already closed */
        }
        if (this.#ws === ws) this.#ws = null;
        reject(e);
      };
      const timer = setTimeout(() => fail(new ZhiboError('connect timed out', 'TIMEOUT')), this.#opts.connectTimeoutMs);
      ws.onerror = () => fail(new ZhiboError(`cannot connect to ${this.#url}`, 'UNREACHABLE'));
      ws.onclose = () => fail(new ZhiboError('closed during sign-in', 'UNREACHABLE'));
      ws.onmessage = (ev) => {
        const p = this.#decode(ev.data);
        if (!p) return;
        if (p.body === 'signInOutput') {
          settled = true;
          clearTimeout(timer);
          this.#connected(ws, p.signInOutput as { heartbeatIntervalMs: number });
          resolve();
        } else if (p.body === 'error') {
          const e = p.error as { code: string; message: string };
          fail(new ZhiboError(`sign-in refused: ${e.message}`, e.code));
        } else {
          fail(new ZhiboError(`unexpected first packet ${p.body}`, 'UNEXPECTED'));
        }
      };
    });
  }

  #decode(data: unknown): Packet | null {
    try {
      const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : (data as Uint8Array);
      return this.#wire.decode(bytes);
    } catch (e) {
      console.error('zhibo: undecodable frame', e);
      return null;
    }
  }

  #connected(ws: WebSocketLike, out: { heartbeatIntervalMs: number }): void {
    this.#attempt = 0;
    this.#signedIn = true;
    this.#goAway = null;
    this.#lastHeard = Date.now();
    ws.onmessage = (ev) => {
      const p = this.#decode(ev.data);
      this.#lastHeard = Date.now();
      if (p) this.#onPacket(p);
    };
    ws.onclose = () => this.#lost(ws, 'connection closed');
    ws.onerror = () => this.#lost(ws, 'connection error');
    const interval = Math.max(100, Number(out.heartbeatIntervalMs) || 30_000);
    // Silence this long means the path is dead even if no error surfaced (heartbeats are answered).
    const deadAfter = interval * 2 + 5000;
    this.#heartbeat = setInterval(() => {
      if (Date.now() - this.#lastHeard > deadAfter) return this.#lost(ws, 'no answer to heartbeats');
      this.#write(this.#request({ kind: 'heartbeat' }), { heartbeat: {} });
      this.#ack();
    }, interval);
    this.#emit('state', { state: 'connected', url: this.#url });
    for (const room of this.#rooms) this.#write(this.#request({ kind: 'join', roomId: room }), { subscribeRoom: { roomId: room } });
    this.#resend();
    this.#startSync();
  }

  /** The connection ended: fail what cannot be resent, then reconnect (GoAway delay, or back-off). */
  #lost(ws: WebSocketLike, reason: string, delayMs?: number): void {
    if (this.#ws !== ws) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close();
    } catch {
      /* already closed */
    }
    this.#ws = null;
    this.#signedIn = false;
    this.#clearTimers();
    for (const [, f] of this.#inFlight) if (f.kind === 'request') f.reject(new ZhiboError('connection lost', 'CLOSED'));
    this.#inFlight.clear();
    for (const s of this.#sends.values()) s.inFlight = false;
    this.#syncRunning = false;
    this.#syncAgain = false;
    if (this.#closed) return;
    let delay = delayMs ?? this.#backoff();
    if (this.#goAway) {
      delay = Math.max(0, this.#goAway.at - Date.now());
      if (this.#goAway.hint) this.#url = this.#goAway.hint;
    }
    this.#scheduleReconnect(delay, reason);
  }

  #backoff(): number {
    const ceiling = Math.min(this.#opts.backoffMaxMs, this.#opts.backoffMinMs * 2 ** Math.min(this.#attempt, 16));
    this.#attempt++;
    return ceiling / 2 + Math.random() * (ceiling / 2);
  }

  #scheduleReconnect(delay: number, reason: string): void {
    this.#emit('state', { state: 'disconnected', retryInMs: Math.round(delay), reason });
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      if (this.#closed) return;
      this.#open().catch((e: ZhiboError) => {
        if (FATAL_SIGN_IN.has(e.code)) return this.#stop(e);
        if (!this.#closed) this.#scheduleReconnect(this.#backoff(), e.message);
      });
    }, delay);
  }

  #clearTimers(): void {
    if (this.#heartbeat) clearInterval(this.#heartbeat);
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#heartbeat = this.#retryTimer = null;
  }

  #stop(error: ZhiboError): void {
    if (this.#closed) return;
    this.#closed = error;
    this.#clearTimers();
    if (this.#reconnectTimer) clearTimeout(this.#reconnectTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close();
      } catch {
        /* already closed */
      }
    }
    for (const s of this.#sends.values()) s.reject(error);
    this.#sends.clear();
    for (const ws of this.#joinWaiters.values()) for (const w of ws) w.reject(error);
    this.#joinWaiters.clear();
    for (const [, f] of this.#inFlight) if (f.kind === 'request') f.reject(error);
    this.#inFlight.clear();
    this.#emit('state', { state: 'closed', error, reason: error.message });
  }

  #request(what: InFlight): string {
    const id = String(this.#nextRequest++);
    this.#inFlight.set(id, what);
    return id;
  }

  #write(requestId: string, body: Record<string, unknown>): void {
    if (!this.#ws || this.#ws.readyState !== 1) return;
    this.#ws.send(this.#wire.encode({ requestId, ...body }));
  }

  // --- protocol -----------------------------------------------------------------------------------

  #resend(): void {
    if (!this.#isOpen() || this.#goAway) return;
    for (const [id, s] of this.#sends) {
      if (s.inFlight) continue;
      s.inFlight = true;
      this.#write(this.#request({ kind: 'send', clientMsgId: id }), { sendMessage: { ...s.input } });
      // Whatever happens to this transmission, any later one is a resend.
      s.input.firstAttempt = false;
    }
  }

  #startSync(): void {
    if (this.#syncRunning) {
      this.#syncAgain = true;
      return;
    }
    this.#syncRunning = true;
    this.#syncAgain = false;
    this.#syncFrom(this.#tracker.contiguous);
  }

  #syncFrom(seq: string): void {
    this.#write(this.#request({ kind: 'sync' }), { sync: { seq, limit: SYNC_PAGE } });
  }

  #ack(): void {
    const seq = BigInt(this.#tracker.contiguous);
    if (seq > this.#acked) {
      this.#acked = seq;
      this.#write('0', { messageAck: { seq: seq.toString() } });
    }
  }

  #persist(): void {
    this.#store.save(this.#tracker.contiguous);
  }

  #retrySoon(): void {
    this.#retryTimer ??= setTimeout(() => {
      this.#retryTimer = null;
      this.#resend();
      if (this.#syncAgain && !this.#syncRunning) this.#startSync();
    }, this.#opts.retryAfterMs);
  }

  #onPacket(p: Packet): void {
    if (p.requestId !== '0') {
      const what = this.#inFlight.get(p.requestId);
      if (!what) return;
      this.#inFlight.delete(p.requestId);
      return this.#onAnswer(what, p);
    }
    switch (p.body) {
      case 'message':
        this.#deliver(p.message as Message);
        if (this.#tracker.hasGap()) this.#startSync();
        break;
      case 'roomMessages':
        this.#emit('room', p.roomMessages as RoomMessages);
        break;
      case 'kick': {
        const k = p.kick as { reason: string; text: string };
        this.#emit('kicked', k);
        this.#stop(new ZhiboError(`kicked: ${k.text}`, k.reason));
        break;
      }
      case 'goAway': {
        const g = p.goAway as { reason: string; reconnectHint: string; reconnectAfterMs: number };
        // Keep reading the replies still owed; the server closes, then we move after the delay.
        this.#goAway = { at: Date.now() + Number(g.reconnectAfterMs), hint: g.reconnectHint };
        this.#emit('goAway', g);
        const ws = this.#ws;
        setTimeout(() => {
          if (ws && this.#ws === ws) this.#lost(ws, 'gateway going away', 0);
        }, Number(g.reconnectAfterMs));
        break;
      }
      case 'conversationUpdate':
        this.#emit('conversationUpdate', update(p.conversationUpdate as ConversationUpdate));
        break;
      case 'readReceipt':
        this.#emit('readReceipt', p.readReceipt as ReadReceipt);
        break;
      case 'recalled':
        this.#emit('recalled', p.recalled as Recalled);
        break;
      case 'typing':
        this.#emit('typing', p.typing as Typing);
        break;
      case 'error':
        this.#emit('serverError', p.error as { code: string; message: string });
        break;
    }
  }

  /** An inbox message: the device's own pending send is answered by it; anything else once to the app. */
  #deliver(m: Message): void {
    if (m.senderDeviceId === this.#opts.deviceId && m.senderUserId === this.#opts.userId) {
      const pending = this.#sends.get(m.clientMsgId);
      if (pending) {
        this.#sends.delete(m.clientMsgId);
        this.#tracker.observe(m.seq);
        this.#persist();
        pending.resolve({ messageId: m.messageId, seq: m.seq, serverTimeMs: m.serverTimeMs, duplicate: true });
        return;
      }
    }
    if (this.#tracker.observe(m.seq)) {
      this.#persist();
      this.#emit('message', m);
    }
  }

  #onAnswer(what: InFlight, p: Packet): void {
    const error = p.body === 'error' ? (p.error as { code: string; message: string }) : null;
    switch (what.kind) {
      case 'send': {
        const s = this.#sends.get(what.clientMsgId);
        if (!s) return;
        if (error && RETRYABLE.has(error.code)) {
          s.inFlight = false;
          return this.#retrySoon();
        }
        this.#sends.delete(what.clientMsgId);
        if (error) return s.reject(new ZhiboError(error.message, error.code));
        const ack = p.sendMessageOutput as Ack;
        this.#tracker.observe(ack.seq);
        this.#persist();
        return s.resolve(ack);
      }
      case 'request':
        return error ? what.reject(new ZhiboError(error.message, error.code)) : what.resolve(p);
      case 'join': {
        const waiters = this.#joinWaiters.get(what.roomId);
        this.#joinWaiters.delete(what.roomId);
        if (error) {
          this.#rooms.delete(what.roomId);
          for (const w of waiters ?? []) w.reject(new ZhiboError(error.message, error.code));
          return;
        }
        const joined = p.subscribeRoomOutput as RoomJoined;
        if (waiters) for (const w of waiters) w.resolve(joined);
        else this.#emit('roomRejoined', joined);
        return;
      }
      case 'sync': {
        if (error) {
          this.#syncRunning = false;
          this.#syncAgain = true;
          return this.#retrySoon();
        }
        const page = p.syncOutput as { messages: Message[]; hasMore: boolean };
        for (const m of page.messages) this.#deliver(m);
        const last = page.messages.length ? page.messages[page.messages.length - 1].seq : null;
        if (last !== null && page.hasMore) return this.#syncFrom(last);
        if (last !== null) this.#tracker.syncComplete(last);
        this.#syncRunning = false;
        this.#persist();
        this.#ack();
        this.#emit('synced', { seq: this.#tracker.contiguous });
        if (this.#syncAgain || this.#tracker.hasGap()) {
          if (last !== null) this.#startSync();
          else {
            this.#syncAgain = true;
            this.#retrySoon();
          }
        }
        return;
      }
      case 'heartbeat':
        return;
    }
  }
}

/** The wire form of a conversation named by `{user}`, `{group}` or a ConversationRef. */
export function conversationRef(target: ConversationTarget): ConversationRef {
  if ('user' in target) return { type: 'RECEIVER_TYPE_USER', id: String(target.user) };
  if ('group' in target) return { type: 'RECEIVER_TYPE_GROUP', id: String(target.group) };
  return { type: target.type, id: String(target.id) };
}

/** A stable key for a conversation: `user:<id>` or `group:<id>`. */
export function conversationKey(target: ConversationTarget): string {
  const r = conversationRef(target);
  return `${r.type === 'RECEIVER_TYPE_GROUP' ? 'group' : 'user'}:${r.id}`;
}

/** protobuf.js gives an unset message field as null: keep that, and default the rest. */
function conversation(c: Conversation): Conversation {
  return { ...c, lastMessage: c.lastMessage ?? null };
}

function update(u: ConversationUpdate): ConversationUpdate {
  return { ...u, conversation: conversation(u.conversation) };
}

/** The text of a message whose content is UTF-8. */
export function text(m: { content: Uint8Array }): string {
  return new TextDecoder().decode(m.content);
}
