// Compile-only check (npm test runs `tsc -p test/types`): the public types
// accept the WebSocket constructors apps pass, and the events are typed.
import WebSocket from "ws";
import { connect, ChatClient, ChatMessage, RoomJoinedPayload, ErrorPayload } from "@chat-backend/client";

declare const provider: () => Promise<string>;
const viaWs: ChatClient = connect("ws://x/ws", provider, { WebSocket });
const viaDom: ChatClient = connect("ws://x/ws", provider, { WebSocket: globalThis.WebSocket });
viaWs.on("message", (m: ChatMessage) => m.sequenceId.toFixed());
viaWs.on("reloaded", (r: { roomId: string; snapshot: RoomJoinedPayload }) => r.snapshot.recovered);
viaWs.on("error", (e: ErrorPayload) => e.retryAfterMs ?? e.code);
viaWs.on("reconnecting", (r: { attempt: number; delayMs: number }) => r.delayMs + r.attempt);
viaWs.dropConnection();
async function use(): Promise<number> {
  const joined = await viaDom.join({ targetUserId: "bob" }, { afterSequenceId: 3 });
  const m = await viaDom.send(joined.room.id, "hi", { type: "text", metadata: { a: 1 } });
  return m.sequenceId;
}
void use;
