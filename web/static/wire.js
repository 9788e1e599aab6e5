// The wire protocol in the browser: protobuf.js parses the gateway's own client.proto (served by user-api
// from proto/proto/zhibo/v1/client.proto, the file the Rust code is generated from), so there is no second
// description of the format to keep in step. One binary WebSocket message = one zhibo.v1.Packet.
//
// 64-bit integers: long.js is loaded before protobuf.js, so int64/uint64 decode exactly and are handed to
// the app as decimal strings (message ids are u64 and can exceed 2^53). The app passes ids back as strings.

const protobuf = globalThis.protobuf;

/** Fetches and parses client.proto. */
export async function loadWire() {
  if (!protobuf || !protobuf.util.Long) throw new Error('protobuf.js or long.js did not load');
  const res = await fetch('/proto/zhibo/v1/client.proto');
  if (!res.ok) throw new Error(`client.proto: HTTP ${res.status}`);
  const { root } = protobuf.parse(await res.text());
  return new Wire(root);
}

const TO_OBJECT = { longs: String, enums: String, defaults: true, oneofs: true };

export class Wire {
  constructor(root) {
    this.Packet = root.lookupType('zhibo.v1.Packet');
    this.ErrorCode = root.lookupEnum('zhibo.v1.ErrorCode');
  }

  /** `{requestId, <oneof field>: {...}}` (camelCase names, ids as strings) → bytes. */
  encode(packet) {
    const message = this.Packet.fromObject(packet);
    return this.Packet.encode(message).finish();
  }

  /** bytes → plain object; `body` names the oneof field that is set (e.g. 'message', 'syncOutput'). */
  decode(bytes) {
    return this.Packet.toObject(this.Packet.decode(bytes), TO_OBJECT);
  }
}
