// Test fixtures: a real `zhibo dev` (target/debug/zhibo, or $ZHIBO_TEST_BIN) on free loopback ports with
// its own store file, restartable on the same ports; user-api helpers; an app recorder that waits on
// conditions with a deadline.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '../../..');
const BIN = process.env.ZHIBO_TEST_BIN || join(root, 'target/debug/zhibo');
export const WAIT_MS = 20_000;

async function freePorts(n) {
  const servers = await Promise.all(
    Array.from({ length: n }, () => new Promise((ok) => { const s = net.createServer().listen(0, '127.0.0.1', () => ok(s)); })),
  );
  const ports = servers.map((s) => s.address().port);
  await Promise.all(servers.map((s) => new Promise((ok) => s.close(ok))));
  return ports;
}

function reachable(port) {
  return new Promise((ok) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => { s.destroy(); ok(true); });
    s.once('error', () => ok(false));
  });
}

/** Polls `cond` every 20 ms until it holds; throws `what` after `ms`. */
export async function waitFor(cond, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export class Server {
  constructor(ports, dir, extraEnv = {}) {
    [this.apiPort, this.tcpPort, this.wsPort, this.quicPort] = ports;
    this.dir = dir;
    this.extraEnv = extraEnv;
    this.child = null;
    this.log = '';
  }

  /** A new `zhibo dev` on free ports (`sharedStoreOf`: use that server's store file). */
  static async start({ env = {}, storeOf = null, wsPort = null } = {}) {
    const ports = await freePorts(4);
    if (wsPort) ports[2] = wsPort;
    const dir = storeOf ? storeOf.dir : mkdtempSync(join(tmpdir(), 'zhibo-ts-'));
    const s = new Server(ports, dir, env);
    await s.up();
    return s;
  }

  get api() { return `http://127.0.0.1:${this.apiPort}`; }
  get wsUrl() { return `ws://127.0.0.1:${this.wsPort}/ws`; }

  /** Starts the process and waits until its user-api and WebSocket ports answer. */
  async up() {
    const env = {};
    // Only our configuration: the caller's ZHIBO_* (e.g. test settings) would be refused as unknown keys.
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('ZHIBO_') || k === 'ZHIBO_LOG') env[k] = v;
    Object.assign(env, {
      ZHIBO_STORE__PATH: join(this.dir, 'zhibo.redb'),
      ZHIBO_METRICS_ADDR: '127.0.0.1:0',
      ZHIBO_API_ADDR: `127.0.0.1:${this.apiPort}`,
      ZHIBO_GATEWAY__TCP_ADDR: `127.0.0.1:${this.tcpPort}`,
      ZHIBO_GATEWAY__WS_ADDR: `127.0.0.1:${this.wsPort}`,
      ZHIBO_GATEWAY__QUIC_ADDR: `127.0.0.1:${this.quicPort}`,
      ZHIBO_GRACE_SECS: '2',
      // Every test user signs in from 127.0.0.1.
      ZHIBO_API__SIGN_IN_PER_MINUTE: '10000',
      // And every test user and device is registered from it (the defaults allow 20 sign-ups and 60 devices an hour).
      ZHIBO_API__SIGN_UPS_PER_HOUR: '10000',
      ZHIBO_API__DEVICES_PER_HOUR: '10000',
      ZHIBO_LOG: process.env.ZHIBO_LOG || 'warn',
      ...this.extraEnv,
    });
    this.child = spawn(BIN, ['dev'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.exited = new Promise((ok) => this.child.once('exit', ok));
    const keep = (d) => { this.log = (this.log + d).slice(-20_000); };
    this.child.stdout.on('data', keep);
    this.child.stderr.on('data', keep);
    let gone = false;
    this.exited.then(() => { gone = true; });
    await waitFor(async () => {
      if (gone) throw new Error(`zhibo dev exited:\n${this.log}`);
      return (await reachable(this.apiPort)) && (await reachable(this.wsPort));
    }, 'zhibo dev to listen', 60_000);
  }

  /** SIGTERM (the gateway drains: GoAway to every client) and wait for the exit. */
  async down() {
    if (!this.child) return;
    this.child.kill('SIGTERM');
    await this.exited;
    this.child = null;
  }

  async stop({ keepStore = false } = {}) {
    await this.down();
    if (!keepStore) rmSync(this.dir, { recursive: true, force: true });
  }

  async call(method, path, body, token) {
    const headers = { 'content-type': 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    const res = await fetch(this.api + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
    const json = await res.json().catch(() => null);
    if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${JSON.stringify(json)}`);
    return json;
  }

  /** A new user with one device, signed in: {userId, deviceId, token, username}. */
  async user(name) {
    const { device_id: deviceId } = await this.call('POST', '/v1/devices', {
      type: 'pc', brand: 'zhibo', model: 'ts-test', system_version: '1', sdk_version: '1',
    });
    const username = `${name}${process.pid}${Math.floor(Math.random() * 1e9)}`;
    await this.call('POST', '/v1/users', { username, password: 'correct horse battery', nickname: name });
    const s = await this.call('POST', '/v1/sessions', { username, password: 'correct horse battery', device_id: deviceId });
    return { userId: String(s.user_id), deviceId: String(deviceId), token: s.token, username };
  }

  /** Another device of the same user, signed in: {userId, deviceId, token, username}. */
  async secondDevice(user) {
    const { device_id: deviceId } = await this.call('POST', '/v1/devices', {
      type: 'pc', brand: 'zhibo', model: 'ts-test', system_version: '1', sdk_version: '1',
    });
    const s = await this.call('POST', '/v1/sessions', { username: user.username, password: 'correct horse battery', device_id: deviceId });
    return { userId: user.userId, deviceId: String(deviceId), token: s.token, username: user.username };
  }

  async befriend(a, b) {
    await this.call('POST', '/v1/friends/requests', { to_user_id: Number(b.userId), message: 'hi' }, a.token);
    await this.call('POST', `/v1/friends/requests/${a.userId}/agree`, {}, b.token);
  }
}

/** Records what an app sees from a client. */
export class App {
  constructor(client) {
    this.client = client;
    this.messages = [];
    this.rooms = [];
    this.states = [];
    this.synced = 0;
    this.goAways = 0;
    this.rejoined = 0;
    this.kicked = null;
    client.on('message', (m) => this.messages.push(m));
    client.on('room', (r) => this.rooms.push(r));
    client.on('state', (s) => this.states.push(s));
    client.on('synced', () => this.synced++);
    client.on('goAway', () => this.goAways++);
    client.on('roomRejoined', () => this.rejoined++);
    client.on('kicked', (k) => { this.kicked = k; });
  }

  texts() { return this.messages.map((m) => new TextDecoder().decode(m.content)); }
  has(t) { return this.texts().includes(t); }
  count(state) { return this.states.filter((s) => s.state === state).length; }
}
