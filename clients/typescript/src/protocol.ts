// The wire contract of docs/PROTOCOL.md §2, as TypeScript types. Every frame,
// both ways, is one JSON text message {"type": "...", "payload": {...}}.

/** A user's profile as the server shows it. */
export interface UserProfile {
  id: string;
  username: string;
  displayName: string | null;
  avatar: string | null;
}

export type MessageType = "text" | "image" | "gift" | "system";

/** The message object (PROTOCOL.md §2, "Message object"). */
export interface ChatMessage {
  id: string;
  roomId: string;
  senderId: string;
  content: string;
  type: MessageType;
  metadata: Record<string, unknown> | null;
  sequenceId: number;
  clientMessageId: string | null;
  sender: UserProfile;
  readBy: string[];
  createdAt: string;
}

export type RoomType = "DIRECT" | "GROUP" | "CALL";

/** A room as `roomJoined` carries it (fields beyond these may appear). */
export interface Room {
  id: string;
  type: RoomType;
  name: string | null;
  user1?: UserProfile | null;
  user2?: UserProfile | null;
  members?: UserProfile[];
  callId?: string | null;
  lastSequenceId?: number;
  createdAt?: string;
  [extra: string]: unknown;
}

// ---- server -> client -------------------------------------------------------

export interface ConnectedPayload {
  userId: string;
  connectionId: string;
  timestamp: string;
}

export interface RoomJoinedPayload {
  room: Room;
  /** Ascending `sequenceId`: the last 50, or (with `afterSequenceId`) those after it, at most 100. */
  messages: ChatMessage[];
  unreadCount: number;
  onlineUsers: string[];
  /** More messages follow the snapshot (with `afterSequenceId`) or precede it. */
  hasMore?: boolean;
  /** Only with `afterSequenceId`: false when retention already deleted some missed messages. */
  recovered?: boolean;
}

export interface TypingPayload {
  roomId: string;
  userId: string;
  username: string;
  isTyping: boolean;
}

export interface PresenceUpdatePayload {
  userId: string;
  status: "online" | "offline";
  timestamp: string;
}

export interface ReadReceiptPayload {
  roomId: string;
  userId: string;
  sequenceId: number;
  timestamp: string;
}

export interface RoomLeftPayload {
  roomId: string;
}

export interface PongPayload {
  timestamp: string;
}

export interface AuthenticatedPayload {
  /** The accepted token's `exp`, seconds since the epoch. */
  exp: number;
}

export type ErrorCode =
  | "BAD_REQUEST"
  | "FORBIDDEN"
  | "NOT_FOUND"
  | "PAYLOAD_TOO_LARGE"
  | "RATE_LIMITED"
  | "INTERNAL"
  | "SERVICE_UNAVAILABLE"
  | "UNAUTHORIZED"
  /** Only for a frame with `seq`: it came after a later frame; nothing was done. */
  | "CONFLICT";

export interface ErrorPayload {
  code: ErrorCode | (string & {});
  message: string;
  /** The failing frame's `type`, or null. */
  requestType: string | null;
  /** The failing frame's `clientMessageId`, or null. */
  clientMessageId: string | null;
  /** For RATE_LIMITED and SERVICE_UNAVAILABLE: the least time to wait before retrying. */
  retryAfterMs?: number;
}

/** Every server -> client event, by `type`. */
export interface ServerEvents {
  connected: ConnectedPayload;
  roomJoined: RoomJoinedPayload;
  message: ChatMessage;
  typing: TypingPayload;
  presenceUpdate: PresenceUpdatePayload;
  readReceipt: ReadReceiptPayload;
  roomLeft: RoomLeftPayload;
  pong: PongPayload;
  authenticated: AuthenticatedPayload;
  error: ErrorPayload;
}

export type ServerFrame = {
  [K in keyof ServerEvents]: { type: K; payload: ServerEvents[K] };
}[keyof ServerEvents];

// ---- client -> server -------------------------------------------------------

export type JoinRoomCommand =
  | { roomId: string; afterSequenceId?: number }
  | { targetUserId: string; afterSequenceId?: number };

export interface SendMessageCommand {
  roomId: string;
  content: string;
  type?: MessageType;
  metadata?: Record<string, unknown> | null;
  clientMessageId?: string;
}

/** Every client -> server command, by `type`. */
export interface ClientCommands {
  joinRoom: JoinRoomCommand;
  leaveRoom: { roomId: string };
  sendMessage: SendMessageCommand;
  typing: { roomId: string; isTyping: boolean };
  markRead: { roomId: string; sequenceId: number };
  ping: Record<string, never>;
  authenticate: { token: string };
}

export type ClientFrame = {
  /**
   * `seq` (optional): the frame's number on its connection (1, 2, 3 ...); the
   * server handles numbered frames in this order (PROTOCOL.md, "Order of a
   * sender's frames").
   */
  [K in keyof ClientCommands]: { type: K; seq?: number; payload: ClientCommands[K] };
}[keyof ClientCommands];

/**
 * Codes worth retrying (PROTOCOL.md "Retrying"); every other code fails the same
 * way again. CONFLICT: a numbered frame that came after a later one, sent again
 * with a new number.
 */
export const RETRYABLE_CODES: ReadonlySet<string> = new Set(["RATE_LIMITED", "SERVICE_UNAVAILABLE", "CONFLICT"]);
