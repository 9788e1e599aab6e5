// The wire protocol: protobuf.js parses client.proto (embedded at build time from the repository's
// proto/proto/zhibo/v1/client.proto). One binary WebSocket message = one zhibo.v1.Packet.
//
// 64-bit integers decode exactly (long.js) and are handed to the app as decimal strings: message ids are
// u64 and can exceed 2^53. Enums are their names ('RECEIVER_TYPE_USER'), bytes are Uint8Array.
import protobuf from 'protobufjs';
import Long from 'long';
import { CLIENT_PROTO } from './generated/client-proto.js';

protobuf.util.Long = Long as unknown as typeof protobuf.util.Long;
protobuf.configure();

const TO_OBJECT = { longs: String, enums: String, bytes: Uint8Array, defaults: true, oneofs: true };

/** A decoded packet: `body` names the oneof field that is set (e.g. 'message', 'syncOutput'). */
export interface Packet {
  requestId: string;
  body?: string;
  [field: string]: unknown;
}

export class Wire {
  readonly #Packet: protobuf.Type;

  constructor(protoText: string = CLIENT_PROTO) {
    const { root } = protobuf.parse(protoText);
    this.#Packet = root.lookupType('zhibo.v1.Packet');
  }

  /** `{requestId, <oneof field>: {...}}` (camelCase names, 64-bit values as strings) → bytes. */
  encode(packet: Record<string, unknown>): Uint8Array {
    return this.#Packet.encode(this.#Packet.fromObject(packet)).finish();
  }

  /** bytes → plain object. */
  decode(bytes: Uint8Array): Packet {
    return this.#Packet.toObject(this.#Packet.decode(bytes), TO_OBJECT) as Packet;
  }
}
