// A WebSocket proxy in front of a gateway that understands packets, to cut the network under a client:
// close every connection (a network cut), swallow what the server sends (a reply lost on the way), drop
// the next pushed messages (a gap in pushed seqs), and log what clients sent.
import { once } from 'node:events';
import { WebSocket, WebSocketServer } from 'ws';
import { Wire } from '../dist/index.js';

const wire = new Wire();

export async function startProxy(upstreamBase) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  await once(wss, 'listening');
  const state = { mute: false, dropPushes: 0, sent: [], pairs: new Set() };
  wss.on('connection', (client, req) => {
    const up = new WebSocket(upstreamBase + req.url);
    const pair = { client, up };
    state.pairs.add(pair);
    const queue = [];
    const end = () => {
      client.terminate();
      up.terminate();
      state.pairs.delete(pair);
    };
    up.on('open', () => { for (const m of queue.splice(0)) up.send(m); });
    client.on('message', (data) => {
      state.sent.push(wire.decode(new Uint8Array(data)));
      if (up.readyState === WebSocket.OPEN) up.send(data);
      else queue.push(data);
    });
    up.on('message', (data) => {
      const p = wire.decode(new Uint8Array(data));
      if (state.mute) return;
      if (state.dropPushes > 0 && p.body === 'message') {
        state.dropPushes--;
        return;
      }
      client.send(data);
    });
    for (const s of [client, up]) {
      s.on('close', end);
      s.on('error', end);
    }
  });
  return {
    url: `ws://127.0.0.1:${wss.address().port}`,
    /** Closes every live connection (new ones are accepted) and unmutes. */
    cut() {
      for (const p of [...state.pairs]) {
        p.client.terminate();
        p.up.terminate();
      }
      state.pairs.clear();
      state.mute = false;
    },
    mute() { state.mute = true; },
    dropPushes(n) { state.dropPushes = n; },
    sent(pred) { return state.sent.filter(pred); },
    close() {
      this.cut();
      wss.close();
    },
  };
}
