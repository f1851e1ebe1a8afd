export * from "./protocol.js";
export {
  ChatClient,
  ChatError,
  connect,
  type ClientEvents,
  type ClientOptions,
  type ConnectionState,
  type JoinOptions,
  type Listener,
  type RoomSnapshot,
  type SendOptions,
  type TokenProvider,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export { tokenExpiryMs, randomId } from "./util.js";
