export { connect, Client, ZhiboError, text, conversationRef, conversationKey, RECALLED, DELETED } from './client.js';
export type {
  Ack,
  ConnectOptions,
  ConnectionState,
  Conversation,
  ConversationList,
  ConversationListOptions,
  ConversationRef,
  ConversationTarget,
  ConversationUpdate,
  GroupReaders,
  History,
  HistoryOptions,
  ReadReceipt,
  Recalled,
  Typing,
  Events,
  Message,
  RoomJoined,
  RoomMessages,
  WebSocketFactory,
  WebSocketLike,
} from './client.js';
export { MemorySeqStore, LocalStorageSeqStore, SeqTracker } from './seq.js';
export type { SeqStore, StorageLike } from './seq.js';
export { Wire } from './wire.js';
export type { Packet } from './wire.js';
