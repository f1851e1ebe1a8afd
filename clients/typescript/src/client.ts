// The client: one WebSocket to the chat backend, kept alive and kept in sync.
// docs/CLIENTS.md describes the behaviours (and the state machine) so they
// can be ported to other languages.

import {
  AuthenticatedPayload,
  ChatMessage,
  ClientCommands,
  ConnectedPayload,
  ErrorPayload,
  MessageType,
  PongPayload,
  PresenceUpdatePayload,
  ReadReceiptPayload,
  RETRYABLE_CODES,
  Room,
  RoomJoinedPayload,
  RoomLeftPayload,
  ServerEvents,
  ServerFrame,
  TypingPayload,
} from "./protocol.js";
import { backoffMs, randomId, tokenExpiryMs } from "./util.js";

// ---- the WebSocket the library needs ------------------------------------------

/** What the library uses of a WebSocket: the browser / React Native / `ws` API. */
export interface WebSocketLike {
  readonly readyState: number;
  // `any` events: the DOM's, React Native's and `ws`'s event types differ, and
  // each must be assignable here. The client reads only `code`, `reason`, `data`.
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onopen: ((ev: any) => void) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onclose: ((ev: any) => void) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onerror: ((ev: any) => void) | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  onmessage: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

/** Returns a valid JWT for the user; called before every (re)connect and before the token's `exp`. */
export type TokenProvider = () => Promise<string>;

export interface ClientOptions {
  /** The WebSocket constructor; defaults to `globalThis.WebSocket` (browsers, React Native, Node.js >= 22). */
  WebSocket?: WebSocketConstructor;
  /** First reconnect delay (ms, jittered, doubling per failed attempt). Default 500. */
  reconnectInitialDelayMs?: number;
  /** Longest reconnect delay (ms). Default 30000. */
  reconnectMaxDelayMs?: number;
  /** Application `ping` interval (ms). Default 30000 (PROTOCOL.md). */
  pingIntervalMs?: number;
  /** No `pong` within this after a `ping` (ms): the socket is presumed dead and replaced. Default 10000. */
  pongTimeoutMs?: number;
  /** A `joinRoom` unanswered this long (ms) presumes the socket dead. Default 30000. */
  joinTimeoutMs?: number;
  /** Renew the token this long (ms) before its `exp` (at most a fifth of its lifetime). Default 60000. */
  tokenRefreshMarginMs?: number;
  /** Most retries of a request refused with a retryable code (RATE_LIMITED, SERVICE_UNAVAILABLE, CONFLICT). Default 8. */
  maxRetries?: number;
  /** Longest retry delay (ms) for retryable errors. Default 30000 (PROTOCOL.md). */
  retryMaxDelayMs?: number;
  /** How long someone shows as typing after their last `typing: true` (ms); a message from them ends it sooner. Default 6000. */
  typingTimeoutMs?: number;
  /** How long an out-of-order message waits for the ones before it (ms). Default 2000. */
  reorderWindowMs?: number;
  /** Random source for jitter (tests). Default Math.random. */
  random?: () => number;
}

export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/** An `error` event from the server, as a rejection. */
export class ChatError extends Error {
  readonly code: string;
  readonly requestType: string | null;
  readonly clientMessageId: string | null;
  readonly retryAfterMs?: number;
  constructor(payload: ErrorPayload) {
    super(`${payload.code}: ${payload.message}`);
    this.name = "ChatError";
    this.code = payload.code;
    this.requestType = payload.requestType;
    this.clientMessageId = payload.clientMessageId;
    this.retryAfterMs = payload.retryAfterMs;
  }
}

/** The events a client emits, by name. */
export interface ClientEvents {
  /** The connection state changed. */
  state: ConnectionState;
  /** A socket was established (the server's `connected` event). */
  connected: ConnectedPayload;
  /** The socket closed; the client reconnects unless `close()` was called. */
  disconnected: { code: number; reason: string };
  /** The next connection attempt (1 for the first after a working socket) starts in `delayMs`. */
  reconnecting: { attempt: number; delayMs: number };
  /**
   * A message, delivered once per `sequenceId` and in order per joined room:
   * live messages, messages recovered by a rejoin, and the echoes of your
   * own sends. (The messages of the snapshot that `join()` returns are not
   * repeated here.)
   */
  message: ChatMessage;
  /** Every `roomJoined` answer: your joins, and the automatic rejoins after a reconnect. */
  roomJoined: RoomJoinedPayload & { rejoin: boolean };
  /** A rejoin could not recover every missed message (`recovered: false`): reload the room from `snapshot` / REST. */
  reloaded: { roomId: string; snapshot: RoomJoinedPayload };
  /** Messages were missing for longer than `reorderWindowMs`; delivery went on after the gap. */
  gap: { roomId: string; afterSequenceId: number; nextSequenceId: number };
  /** You left a room, or were removed from it (the server's `roomLeft`), or a rejoin was refused. */
  roomLeft: RoomLeftPayload;
  /** The room's online members changed. */
  presence: { roomId: string; onlineUsers: string[] };
  /** The room's typing users changed (never includes you). */
  typingUsers: { roomId: string; userIds: string[] };
  /** Raw server events, as received. */
  typing: TypingPayload;
  presenceUpdate: PresenceUpdatePayload;
  readReceipt: ReadReceiptPayload;
  pong: PongPayload;
  authenticated: AuthenticatedPayload;
  /** Every server `error` event (requests that failed also reject their promise). */
  error: ErrorPayload;
  /** Something the library handled but the app may want to log (token provider failures...). */
  warning: { message: string; cause?: unknown };
}

export type Listener<T> = (payload: T) => void;

export interface SendOptions {
  type?: MessageType;
  metadata?: Record<string, unknown> | null;
  /** Your own idempotency key (1-64 chars); generated when absent. */
  clientMessageId?: string;
}

export interface JoinOptions {
  /** Only the messages after this one (recovery of a room the app already has). */
  afterSequenceId?: number;
}

export interface RoomSnapshot {
  roomId: string;
  room: Room | null;
  /** Highest `sequenceId` delivered to the app (null until the join's answer). */
  lastSequenceId: number | null;
  onlineUsers: string[];
  typingUsers: string[];
}

// ---- internal state -----------------------------------------------------------

interface RoomState {
  id: string;
  joined: boolean;
  room: Room | null;
  lastSeq: number | null;
  buffer: Map<number, ChatMessage>;
  gapTimer: unknown;
  online: Set<string>;
  typing: Map<string, unknown>;
}

interface JoinRequest {
  roomId?: string;
  targetUserId?: string;
  afterSequenceId?: number;
  rejoin: boolean;
  attempts: number;
  /** Refused with a retryable code and waiting to go again (not in flight). */
  retrying?: boolean;
  resolve?: (p: RoomJoinedPayload) => void;
  reject?: (e: Error) => void;
}

interface PendingSend {
  payload: ClientCommands["sendMessage"] & { clientMessageId: string };
  resolve: (m: ChatMessage) => void;
  reject: (e: Error) => void;
  attempts: number;
  retryTimer: unknown;
}

const OPEN = 1;

/**
 * API Gateway's own error frame (a throttled or timed-out invocation): an
 * object with a `message` and no `type`, unlike every event of the server.
 */
function isGatewayError(frame: unknown): frame is { message: string } {
  return (
    typeof frame === "object" &&
    frame !== null &&
    !("type" in frame) &&
    typeof (frame as { message?: unknown }).message === "string"
  );
}

export class ChatClient {
  private readonly url: string;
  private readonly tokenProvider: TokenProvider;
  private readonly WS: WebSocketConstructor;
  private readonly opt: Required<Omit<ClientOptions, "WebSocket">>;

  private listeners = new Map<string, Set<Listener<never>>>();
  private socket: WebSocketLike | null = null;
  /** The `seq` of the last numbered frame sent on this socket. */
  private frameSeq = 0;
  private stateValue: ConnectionState = "connecting";
  private closedByUser = false;
  private reconnectAttempt = 0;
  private reconnectTimer: unknown = null;
  private pingTimer: unknown = null;
  private pongTimer: unknown = null;
  private refreshTimer: unknown = null;
  private authTimer: unknown = null;
  private joinTimer: unknown = null;
  /** false once the server answered `authenticate` as an unknown type. */
  private authenticateSupported = true;
  private userIdValue: string | null = null;

  private rooms = new Map<string, RoomState>();
  private joinQueue: JoinRequest[] = [];
  private joinInFlight: JoinRequest | null = null;
  private rejoinsOutstanding = 0;
  /** Messages of not-yet-known rooms that arrived while a `{targetUserId}` join was in flight. */
  private orphanMessages: ChatMessage[] = [];
  private pendingSends = new Map<string, PendingSend>();
  /** The newest `markRead` per room asked for while a socket could not take it. */
  private pendingReads = new Map<string, number>();
  /** True between a socket's open and the end of its rejoins: sends wait. */
  private resyncing = false;
  private firstConnect: { resolve: () => void; reject: (e: Error) => void; promise: Promise<void> };

  constructor(url: string, tokenProvider: TokenProvider, options: ClientOptions = {}) {
    this.url = url;
    this.tokenProvider = tokenProvider;
    const WS =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new Error(
        "no WebSocket implementation: pass options.WebSocket (in Node.js < 22, the `ws` package's WebSocket)",
      );
    }
    this.WS = WS;
    this.opt = {
      reconnectInitialDelayMs: options.reconnectInitialDelayMs ?? 500,
      reconnectMaxDelayMs: options.reconnectMaxDelayMs ?? 30000,
      pingIntervalMs: options.pingIntervalMs ?? 30000,
      pongTimeoutMs: options.pongTimeoutMs ?? 10000,
      joinTimeoutMs: options.joinTimeoutMs ?? 30000,
      tokenRefreshMarginMs: options.tokenRefreshMarginMs ?? 60000,
      maxRetries: options.maxRetries ?? 8,
      retryMaxDelayMs: options.retryMaxDelayMs ?? 30000,
      typingTimeoutMs: options.typingTimeoutMs ?? 6000,
      reorderWindowMs: options.reorderWindowMs ?? 2000,
      random: options.random ?? Math.random,
    };
    let resolve!: () => void;
    let reject!: (e: Error) => void;
    const promise = new Promise<void>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    promise.catch(() => undefined);
    this.firstConnect = { resolve, reject, promise };
    void this.openSocket();
  }

  // ---- public API -------------------------------------------------------------

  /** The connection state. */
  get state(): ConnectionState {
    return this.stateValue;
  }

  /** Your user id (from the server's `connected` event), once known. */
  get userId(): string | null {
    return this.userIdValue;
  }

  /** Resolves when the first socket is open; rejects if `close()` comes first. */
  ready(): Promise<void> {
    return this.firstConnect.promise;
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(event: K, listener: Listener<ClientEvents[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    return () => this.off(event, listener);
  }

  off<K extends keyof ClientEvents>(event: K, listener: Listener<ClientEvents[K]>): void {
    this.listeners.get(event)?.delete(listener as Listener<never>);
  }

  /**
   * Joins a room (by id, or the direct room with `{targetUserId}`) and
   * resolves with the server's `roomJoined` payload. From then on the client
   * rejoins it after every reconnect with `afterSequenceId` = the last
   * message it delivered, until `leave()`.
   */
  join(room: string | { roomId: string } | { targetUserId: string }, options: JoinOptions = {}): Promise<RoomJoinedPayload> {
    if (this.closedByUser) return Promise.reject(new Error("client closed"));
    const target = typeof room === "string" ? { roomId: room } : room;
    return new Promise<RoomJoinedPayload>((resolve, reject) => {
      const req: JoinRequest = { rejoin: false, attempts: 0, resolve, reject, afterSequenceId: options.afterSequenceId };
      if ("roomId" in target) {
        req.roomId = target.roomId;
        const st = this.roomState(target.roomId);
        st.joined = true;
        st.lastSeq = null; // buffer its messages until the snapshot is in
      } else {
        req.targetUserId = target.targetUserId;
      }
      this.joinQueue.push(req);
      this.pumpJoins();
    });
  }

  /** Leaves a room: no more events for it, no rejoin. Resolves on `roomLeft` (at once when offline). */
  leave(roomId: string): Promise<void> {
    const st = this.rooms.get(roomId);
    if (st) this.forgetRoom(st);
    if (!this.canSend()) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const off = this.on("roomLeft", (p) => {
        if (p.roomId === roomId) {
          off();
          resolve();
        }
      });
      const offState = this.on("disconnected", () => {
        offState();
        off();
        resolve();
      });
      this.transmit("leaveRoom", { roomId });
    });
  }

  /**
   * Sends a message; resolves with the server's own `message` event for it
   * (its `sequenceId`, `createdAt`...). Survives reconnects: the same
   * `clientMessageId` is sent again after a reconnect, which the server
   * treats as a repeat. Retries RATE_LIMITED / SERVICE_UNAVAILABLE / CONFLICT with
   * backoff; rejects with a ChatError for any other error, or on `close()`.
   */
  send(roomId: string, content: string, options: SendOptions = {}): Promise<ChatMessage> {
    if (this.closedByUser) return Promise.reject(new Error("client closed"));
    const clientMessageId = options.clientMessageId ?? randomId();
    const existing = this.pendingSends.get(clientMessageId);
    if (existing) return new Promise((resolve, reject) => this.chainPending(existing, resolve, reject));
    return new Promise<ChatMessage>((resolve, reject) => {
      const payload: PendingSend["payload"] = { roomId, content, clientMessageId };
      if (options.type !== undefined) payload.type = options.type;
      if (options.metadata !== undefined) payload.metadata = options.metadata;
      const p: PendingSend = { payload, resolve, reject, attempts: 0, retryTimer: null };
      this.pendingSends.set(clientMessageId, p);
      if (this.canSend()) this.transmit("sendMessage", payload);
    });
  }

  /** Tells the room's other members you are (not) typing. Dropped while offline. */
  typing(roomId: string, isTyping: boolean): void {
    if (this.canSend()) this.transmit("typing", { roomId, isTyping });
  }

  /**
   * Moves your read cursor. While offline (or rejoining) the newest one per
   * room is kept and sent once the rooms are rejoined.
   */
  markRead(roomId: string, sequenceId: number): void {
    if (this.canSend() && this.transmit("markRead", { roomId, sequenceId })) return;
    this.pendingReads.set(roomId, Math.max(sequenceId, this.pendingReads.get(roomId) ?? 0));
  }

  /** The client's view of a room: online members, who is typing, last delivered sequenceId. */
  getRoom(roomId: string): RoomSnapshot | null {
    const st = this.rooms.get(roomId);
    if (!st || !st.joined) return null;
    return {
      roomId,
      room: st.room,
      lastSequenceId: st.lastSeq,
      onlineUsers: [...st.online].sort(),
      typingUsers: [...st.typing.keys()].sort(),
    };
  }

  /** The ids of the rooms the client keeps joined. */
  joinedRooms(): string[] {
    return [...this.rooms.values()].filter((r) => r.joined).map((r) => r.id);
  }

  /** Drops the socket and reconnects now (e.g. when a mobile app returns to the foreground on another network). */
  reconnect(): void {
    if (this.closedByUser) return;
    if (!this.socket && this.reconnectTimer) {
      // Waiting for the next attempt: make it now.
      this.clearTimer("reconnectTimer");
      this.reconnectAttempt = 0;
      this.scheduleReconnect(0);
      return;
    }
    this.reconnectAttempt = 0;
    this.dropSocket(1000, "client reconnect", 0);
  }

  /**
   * Drops the socket as a failed network would: no close handshake is
   * awaited, `disconnected` (code 1006) and `reconnecting` are emitted before
   * this returns, and the client reconnects after the usual backoff, then
   * rejoins and recovers. For tests and demos of the recovery path.
   */
  dropConnection(): void {
    if (this.closedByUser || !this.socket) return;
    this.dropSocket(1000, "connection dropped", null, 1006);
  }

  /** Closes the connection for good: pending sends and joins reject. */
  close(): void {
    if (this.closedByUser) return;
    this.closedByUser = true;
    this.clearTimer("reconnectTimer");
    this.stopSocketTimers();
    this.clearTimer("refreshTimer");
    const ws = this.socket;
    this.socket = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        /* already closing */
      }
    }
    const err = new Error("client closed");
    for (const p of this.pendingSends.values()) {
      if (p.retryTimer) clearTimeout(p.retryTimer);
      p.reject(err);
    }
    this.pendingSends.clear();
    this.pendingReads.clear();
    const joins = this.joinInFlight ? [this.joinInFlight, ...this.joinQueue] : this.joinQueue;
    for (const j of joins) j.reject?.(err);
    this.joinQueue = [];
    this.joinInFlight = null;
    for (const st of this.rooms.values()) this.clearRoomTimers(st);
    this.firstConnect.reject(err);
    this.setState("closed");
  }

  // ---- events -----------------------------------------------------------------

  private emit<K extends keyof ClientEvents>(event: K, payload: ClientEvents[K]): void {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const l of [...set]) {
      try {
        (l as Listener<ClientEvents[K]>)(payload);
      } catch (e) {
        console.warn("chat client: a listener threw", e);
      }
    }
  }

  private setState(s: ConnectionState): void {
    if (this.stateValue === s) return;
    this.stateValue = s;
    this.emit("state", s);
  }

  // ---- the socket -------------------------------------------------------------

  private async openSocket(): Promise<void> {
    this.reconnectTimer = null;
    if (this.closedByUser) return;
    this.setState(this.stateValue === "connecting" ? "connecting" : "reconnecting");
    let token: string;
    try {
      token = await this.tokenProvider();
    } catch (cause) {
      this.emit("warning", { message: "the token provider failed", cause });
      this.scheduleReconnect();
      return;
    }
    if (this.closedByUser) return;
    const sep = this.url.includes("?") ? "&" : "?";
    let ws: WebSocketLike;
    try {
      ws = new this.WS(`${this.url}${sep}token=${encodeURIComponent(token)}`);
    } catch (cause) {
      this.emit("warning", { message: "could not create the WebSocket", cause });
      this.scheduleReconnect();
      return;
    }
    this.socket = ws;
    this.frameSeq = 0; // numbering starts again on every socket
    ws.onopen = () => this.onOpen(ws, token);
    ws.onmessage = (ev) => this.onFrame(ev.data);
    ws.onerror = () => undefined; // a close follows
    ws.onclose = (ev) => this.onClose(ws, ev?.code ?? 1006, ev?.reason ?? "");
  }

  private onOpen(ws: WebSocketLike, token: string): void {
    if (ws !== this.socket) return;
    this.setState("open");
    this.firstConnect.resolve();
    this.pingTimer = setInterval(() => this.ping(), this.opt.pingIntervalMs);
    this.scheduleRefresh(tokenExpiryMs(token));
    // Rejoin every joined room first (in front of any join the app queued),
    // then resend the sends whose echo never came.
    const rejoins: JoinRequest[] = [];
    for (const st of this.rooms.values()) {
      if (!st.joined || st.lastSeq === null) continue;
      rejoins.push({ roomId: st.id, afterSequenceId: st.lastSeq, rejoin: true, attempts: 0 });
    }
    this.rejoinsOutstanding = rejoins.length;
    this.resyncing = rejoins.length > 0;
    this.joinQueue = [...rejoins, ...this.joinQueue];
    this.pumpJoins();
    if (!this.resyncing) this.flushSends();
  }

  private onClose(ws: WebSocketLike, code: number, reason: string): void {
    if (ws !== this.socket) return;
    detach(ws);
    this.socket = null;
    // 4001 "token expired" (a server that says so in the close code; PROTOCOL.md
    // servers send `error` UNAUTHORIZED first): reconnect at once with a fresh
    // token, as after UNAUTHORIZED.
    if (code === 4001) this.reconnectAttempt = 0;
    this.afterSocketGone(code, reason, code === 4001 ? 0 : null);
  }

  /**
   * Replaces the socket (dead, or its token is being renewed by reconnecting).
   * `code` goes to the server; `reported` (default `code`) to `disconnected`.
   */
  private dropSocket(code: number, reason: string, delayMs: number | null, reported = code): void {
    const ws = this.socket;
    if (!ws) return;
    detach(ws);
    this.socket = null;
    try {
      const t = (ws as { terminate?: () => void }).terminate;
      if (typeof t === "function") t.call(ws);
      else ws.close(code, reason);
    } catch {
      /* already closed */
    }
    this.afterSocketGone(reported, reason, delayMs);
  }

  private afterSocketGone(code: number, reason: string, delayMs: number | null): void {
    this.stopSocketTimers();
    this.clearTimer("refreshTimer");
    this.resyncing = false;
    this.rejoinsOutstanding = 0;
    // An app join in flight goes again on the next socket; rejoins are rebuilt there.
    if (this.joinInFlight && !this.joinInFlight.rejoin) this.joinQueue.unshift(this.joinInFlight);
    this.joinInFlight = null;
    this.joinQueue = this.joinQueue.filter((j) => !j.rejoin);
    for (const st of this.rooms.values()) {
      for (const uid of st.typing.keys()) clearTimeout(st.typing.get(uid));
      if (st.typing.size) {
        st.typing.clear();
        this.emit("typingUsers", { roomId: st.id, userIds: [] });
      }
    }
    if (this.closedByUser) return;
    this.emit("disconnected", { code, reason });
    this.setState("reconnecting");
    this.scheduleReconnect(delayMs);
  }

  private scheduleReconnect(delayMs: number | null = null): void {
    if (this.closedByUser || this.reconnectTimer) return;
    const delay =
      delayMs ?? backoffMs(this.reconnectAttempt, this.opt.reconnectInitialDelayMs, this.opt.reconnectMaxDelayMs, this.opt.random);
    this.reconnectAttempt++;
    this.reconnectTimer = setTimeout(() => void this.openSocket(), delay);
    this.emit("reconnecting", { attempt: this.reconnectAttempt, delayMs: delay });
  }

  private stopSocketTimers(): void {
    this.clearTimer("pingTimer", true);
    this.clearTimer("pongTimer");
    this.clearTimer("authTimer");
    this.clearTimer("joinTimer");
  }

  private clearTimer(
    name: "reconnectTimer" | "pingTimer" | "pongTimer" | "refreshTimer" | "authTimer" | "joinTimer",
    interval = false,
  ): void {
    const t = this[name];
    if (t) {
      if (interval) clearInterval(t);
      else clearTimeout(t);
    }
    this[name] = null;
  }

  private canSend(): boolean {
    return !!this.socket && this.socket.readyState === OPEN && !this.resyncing;
  }

  /**
   * Sends one frame. Every frame but `ping` is numbered (`seq`: 1, 2, 3 ... on
   * each socket), so the server handles them in the order sent even when API
   * Gateway invokes it for several at once (PROTOCOL.md, "Order of a sender's
   * frames"); a retry is a new frame with a new number. Pings are not numbered:
   * they need no order, and one the gateway refuses never reaches the server.
   */
  private transmit<K extends keyof ClientCommands>(type: K, payload: ClientCommands[K]): boolean {
    const ws = this.socket;
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      if (type === "ping") {
        ws.send(JSON.stringify({ type, payload }));
      } else {
        const seq = this.frameSeq + 1;
        ws.send(JSON.stringify({ type, seq, payload }));
        this.frameSeq = seq;
      }
      return true;
    } catch {
      return false;
    }
  }

  private ping(): void {
    if (!this.transmit("ping", {})) return;
    if (!this.pongTimer) {
      this.pongTimer = setTimeout(() => {
        this.pongTimer = null;
        this.emit("warning", { message: "no pong in time: reconnecting" });
        this.dropSocket(1000, "pong timeout", null);
      }, this.opt.pongTimeoutMs);
    }
  }

  // ---- tokens -----------------------------------------------------------------

  private scheduleRefresh(expMs: number | null): void {
    this.clearTimer("refreshTimer");
    if (expMs === null) return;
    const left = expMs - Date.now();
    const margin = Math.min(this.opt.tokenRefreshMarginMs, Math.max(0, left) / 5);
    const delay = Math.max(0, left - margin);
    this.refreshTimer = setTimeout(() => void this.refreshToken(), delay);
  }

  /**
   * Renews the session before the token runs out: `authenticate {token}` on
   * the open socket when the server supports it, else a reconnect (which
   * fetches a fresh token and rejoins with recovery, so nothing is lost).
   */
  private async refreshToken(): Promise<void> {
    this.refreshTimer = null;
    const ws = this.socket;
    if (!ws || this.closedByUser) return;
    if (!this.authenticateSupported) {
      this.reconnectAttempt = 0;
      this.dropSocket(1000, "token refresh", 0);
      return;
    }
    let token: string;
    try {
      token = await this.tokenProvider();
    } catch (cause) {
      this.emit("warning", { message: "the token provider failed; retrying in 5 s", cause });
      if (ws === this.socket) this.refreshTimer = setTimeout(() => void this.refreshToken(), 5000);
      return;
    }
    if (ws !== this.socket) return;
    this.transmit("authenticate", { token });
    // No answer at all: renew by reconnecting.
    this.clearTimer("authTimer");
    this.authTimer = setTimeout(() => {
      this.authTimer = null;
      this.reconnectAttempt = 0;
      this.dropSocket(1000, "token refresh", 0);
    }, 10000);
  }

  // ---- frames -----------------------------------------------------------------

  private onFrame(data: unknown): void {
    let frame: ServerFrame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : String(data)) as ServerFrame;
    } catch {
      this.emit("warning", { message: "a frame that is not JSON" });
      return;
    }
    if (isGatewayError(frame)) {
      this.onGatewayError(frame.message);
      return;
    }
    if (!frame || typeof frame.type !== "string") return;
    if (!Object.prototype.hasOwnProperty.call(this.onEvent, frame.type)) return;
    // `frame.type` and `frame.payload` match (ServerFrame), which the
    // compiler cannot follow through the lookup.
    (this.onEvent[frame.type] as (payload: ServerFrame["payload"]) => void)(frame.payload);
  }

  /**
   * What each server event does, by `type`. Listing every type of
   * `ServerEvents` is checked by the compiler; a type not listed here (a newer
   * server's event) is ignored.
   */
  private readonly onEvent: { [K in keyof ServerEvents]: (payload: ServerEvents[K]) => void } = {
    connected: (p) => {
      this.userIdValue = p.userId;
      this.reconnectAttempt = 0;
      this.emit("connected", p);
    },
    roomJoined: (p) => {
      this.reconnectAttempt = 0;
      this.onRoomJoined(p);
    },
    message: (p) => this.onMessage(p),
    typing: (p) => this.onTyping(p),
    presenceUpdate: (p) => this.onPresence(p),
    readReceipt: (p) => this.emit("readReceipt", p),
    roomLeft: (p) => {
      const st = this.rooms.get(p.roomId);
      if (st && st.joined) this.forgetRoom(st);
      this.emit("roomLeft", p);
    },
    pong: (p) => {
      this.clearTimer("pongTimer");
      this.emit("pong", p);
    },
    authenticated: (p) => {
      this.clearTimer("authTimer");
      this.scheduleRefresh(p.exp * 1000);
      this.emit("authenticated", p);
    },
    error: (p) => this.onError(p),
  };

  /**
   * API Gateway's own `{"message": "Internal server error", ...}`: the function
   * was throttled or timed out on some frame of this socket, which one is not
   * said, and it may or may not have been handled. Every request still
   * unanswered is treated as refused with SERVICE_UNAVAILABLE (PROTOCOL.md,
   * "Retrying"): sent again after 1 s, then with backoff, within maxRetries.
   * Both are safe to repeat: a send carries its clientMessageId, and a join
   * answers the same way twice.
   */
  private onGatewayError(message: string): void {
    this.emit("warning", { message: `API Gateway: ${message}; retrying what is unanswered` });
    const refused = (requestType: string, clientMessageId: string | null): ErrorPayload => ({
      code: "SERVICE_UNAVAILABLE",
      message: `API Gateway: ${message}`,
      requestType,
      clientMessageId,
      retryAfterMs: 1000,
    });
    for (const p of [...this.pendingSends.values()]) {
      if (!p.retryTimer) this.retryOrFail(refused("sendMessage", p.payload.clientMessageId));
    }
    if (this.joinInFlight && !this.joinInFlight.retrying) this.retryOrFail(refused("joinRoom", null));
  }

  private onError(e: ErrorPayload): void {
    this.emit("error", e);
    this.retryOrFail(e);
  }

  /** What a refused request does next: retried, or failed (see onError). */
  private retryOrFail(e: ErrorPayload): void {
    const retryable = RETRYABLE_CODES.has(e.code);
    if (e.code === "UNAUTHORIZED") {
      // The server closes right after it: reconnect at once with a fresh token.
      // Pending sends and joins go again on the new socket.
      this.clearTimer("authTimer");
      this.reconnectAttempt = 0;
      this.dropSocket(1000, "unauthorized", 0);
      return;
    }
    if (e.requestType === "authenticate") {
      this.clearTimer("authTimer");
      if (e.code === "BAD_REQUEST") {
        // A server without `authenticate`: renew by reconnecting from now on.
        this.authenticateSupported = false;
        this.reconnectAttempt = 0;
        this.dropSocket(1000, "token refresh", 0);
      }
      return;
    }
    if (e.requestType === "sendMessage" && e.clientMessageId) {
      const p = this.pendingSends.get(e.clientMessageId);
      if (!p) return;
      if (retryable && p.attempts < this.opt.maxRetries) {
        const delay = this.retryDelay(p.attempts++, e.retryAfterMs);
        p.retryTimer = setTimeout(() => {
          p.retryTimer = null;
          if (this.pendingSends.get(p.payload.clientMessageId) === p && this.canSend()) {
            this.transmit("sendMessage", p.payload);
          }
        }, delay);
      } else {
        this.pendingSends.delete(e.clientMessageId);
        p.reject(new ChatError(e));
      }
      return;
    }
    if (e.requestType === "joinRoom" && this.joinInFlight) {
      const j = this.joinInFlight;
      this.joinInFlight = null;
      this.clearTimer("joinTimer");
      if (retryable && j.attempts < this.opt.maxRetries) {
        const delay = this.retryDelay(j.attempts++, e.retryAfterMs);
        const sock = this.socket;
        this.joinInFlight = j; // hold the queue (order of joins) while waiting
        j.retrying = true;
        this.joinTimer = setTimeout(() => {
          this.joinTimer = null;
          j.retrying = false;
          if (this.socket !== sock || this.joinInFlight !== j) return;
          this.joinInFlight = null;
          this.joinQueue.unshift(j);
          this.pumpJoins();
        }, delay);
        return;
      }
      if (j.rejoin) {
        // Refused for good (no longer a member, room gone): stop tracking it.
        const st = j.roomId ? this.rooms.get(j.roomId) : undefined;
        if (st) this.forgetRoom(st);
        if (j.roomId) this.emit("roomLeft", { roomId: j.roomId });
        this.rejoinDone();
      } else {
        if (j.roomId) {
          const st = this.rooms.get(j.roomId);
          if (st && st.lastSeq === null) this.forgetRoom(st);
        }
        j.reject?.(new ChatError(e));
      }
      this.replayOrphans();
      this.pumpJoins();
    }
  }

  private retryDelay(attempt: number, retryAfterMs: number | undefined): number {
    const base = Math.max(retryAfterMs ?? 0, 250);
    const jittered = backoffMs(attempt, base, this.opt.retryMaxDelayMs, this.opt.random);
    return Math.max(retryAfterMs ?? 0, jittered);
  }

  private chainPending(p: PendingSend, resolve: (m: ChatMessage) => void, reject: (e: Error) => void): void {
    const prevResolve = p.resolve;
    const prevReject = p.reject;
    p.resolve = (m) => {
      prevResolve(m);
      resolve(m);
    };
    p.reject = (e) => {
      prevReject(e);
      reject(e);
    };
  }

  /**
   * After the rejoins: the read cursors kept while offline, then the sends
   * whose echo never came. Reads first: a send moves the sender's own cursor
   * past what they read, and the server sends a `readReceipt` only when a
   * cursor moves, so a read sent after it would never reach the others.
   */
  private flushSends(): void {
    const reads = [...this.pendingReads];
    this.pendingReads.clear();
    for (const [roomId, sequenceId] of reads) {
      if (!this.transmit("markRead", { roomId, sequenceId })) this.pendingReads.set(roomId, sequenceId);
    }
    for (const p of this.pendingSends.values()) {
      if (!p.retryTimer) this.transmit("sendMessage", p.payload);
    }
  }

  // ---- joins ------------------------------------------------------------------

  /** Sends the next join when none is in flight: one at a time, so each answer matches its request. */
  private pumpJoins(): void {
    if (this.joinInFlight || !this.socket || this.socket.readyState !== OPEN) return;
    const j = this.joinQueue.shift();
    if (!j) return;
    this.joinInFlight = j;
    j.retrying = false;
    const payload: ClientCommands["joinRoom"] = j.roomId !== undefined ? { roomId: j.roomId } : { targetUserId: j.targetUserId! };
    if (j.afterSequenceId !== undefined) payload.afterSequenceId = j.afterSequenceId;
    this.transmit("joinRoom", payload);
    this.clearTimer("joinTimer");
    this.joinTimer = setTimeout(() => {
      this.joinTimer = null;
      this.emit("warning", { message: "joinRoom unanswered: reconnecting" });
      this.dropSocket(1000, "join timeout", null);
    }, this.opt.joinTimeoutMs);
  }

  private rejoinDone(): void {
    if (this.rejoinsOutstanding > 0 && --this.rejoinsOutstanding === 0 && this.resyncing) {
      this.resyncing = false;
      this.flushSends();
    }
  }

  private onRoomJoined(p: RoomJoinedPayload): void {
    const roomId = p.room.id;
    let j = this.joinInFlight;
    if (j && !(j.roomId === roomId || (j.targetUserId !== undefined && p.room.type === "DIRECT"))) j = null;
    if (j) {
      this.joinInFlight = null;
      this.clearTimer("joinTimer");
    }
    const st = this.roomState(roomId);
    st.joined = true;
    st.room = p.room;
    this.setOnline(st, new Set(p.onlineUsers));
    const msgs = [...p.messages].sort((a, b) => a.sequenceId - b.sequenceId);
    const newest = msgs.length ? msgs[msgs.length - 1].sequenceId : null;
    let continueAfter: number | null = null;

    if (j?.rejoin || (!j && st.lastSeq !== null)) {
      if (p.recovered === false) {
        st.lastSeq = Math.max(newest ?? 0, j?.afterSequenceId ?? 0);
        for (const seq of [...st.buffer.keys()]) if (seq <= st.lastSeq) st.buffer.delete(seq);
        this.emit("reloaded", { roomId, snapshot: p });
        this.drain(st);
      } else {
        if (st.lastSeq === null) st.lastSeq = j?.afterSequenceId ?? 0;
        for (const m of msgs) this.accept(st, m);
        if (p.hasMore && newest !== null) continueAfter = st.lastSeq;
      }
      this.emit("roomJoined", { ...p, rejoin: true });
    } else {
      let base = Math.max(newest ?? 0, j?.afterSequenceId ?? 0);
      if (newest === null && j?.afterSequenceId === undefined) {
        base = typeof p.room.lastSequenceId === "number" ? p.room.lastSequenceId : 0;
      }
      st.lastSeq = base;
      for (const seq of [...st.buffer.keys()]) if (seq <= base) st.buffer.delete(seq);
      this.drain(st);
      j?.resolve?.(p);
      this.emit("roomJoined", { ...p, rejoin: false });
    }

    if (continueAfter !== null) {
      // More than 100 missed: fetch the next page before anything else.
      this.joinQueue.unshift({ roomId, afterSequenceId: continueAfter, rejoin: true, attempts: 0 });
      if (j?.rejoin) this.rejoinsOutstanding++;
    }
    if (j?.rejoin) this.rejoinDone();
    this.replayOrphans();
    this.pumpJoins();
  }

  private replayOrphans(): void {
    if (!this.orphanMessages.length || (this.joinInFlight && this.joinInFlight.targetUserId !== undefined)) return;
    const msgs = this.orphanMessages;
    this.orphanMessages = [];
    for (const m of msgs) this.onMessage(m);
  }

  // ---- messages: once each, in order --------------------------------------------

  private onMessage(m: ChatMessage): void {
    if (m.clientMessageId) {
      const p = this.pendingSends.get(m.clientMessageId);
      if (p && p.payload.roomId === m.roomId) {
        this.pendingSends.delete(m.clientMessageId);
        if (p.retryTimer) clearTimeout(p.retryTimer);
        p.resolve(m);
      }
    }
    let st = this.rooms.get(m.roomId);
    if (!st || !st.joined) {
      if (this.joinInFlight && this.joinInFlight.targetUserId !== undefined) {
        this.orphanMessages.push(m); // maybe the room being joined: decide after its roomJoined
        return;
      }
      // A room not joined (the echo of a send to it): once each, no reordering.
      st = this.roomState(m.roomId);
      if (st.lastSeq !== null && m.sequenceId <= st.lastSeq) return;
      st.lastSeq = m.sequenceId;
      this.emit("message", m);
      return;
    }
    this.stopTyping(st, m.senderId); // a message ends its sender's typing
    if (st.lastSeq === null) {
      st.buffer.set(m.sequenceId, m); // its join is in flight
      return;
    }
    this.accept(st, m);
  }

  private accept(st: RoomState, m: ChatMessage): void {
    const last = st.lastSeq ?? 0;
    if (m.sequenceId <= last) return; // already delivered
    st.buffer.set(m.sequenceId, m);
    this.drain(st);
  }

  /** Delivers buffered messages that follow the last delivered one; waits briefly for a missing one. */
  private drain(st: RoomState): void {
    if (st.lastSeq === null) return;
    let next = st.buffer.get(st.lastSeq + 1);
    while (next) {
      st.buffer.delete(next.sequenceId);
      st.lastSeq = next.sequenceId;
      this.emit("message", next);
      next = st.buffer.get(st.lastSeq + 1);
    }
    if (st.buffer.size === 0) {
      if (st.gapTimer) clearTimeout(st.gapTimer);
      st.gapTimer = null;
    } else if (!st.gapTimer) {
      st.gapTimer = setTimeout(() => {
        st.gapTimer = null;
        if (st.lastSeq === null || st.buffer.size === 0) return;
        const first = Math.min(...st.buffer.keys());
        this.emit("gap", { roomId: st.id, afterSequenceId: st.lastSeq, nextSequenceId: first });
        st.lastSeq = first - 1;
        this.drain(st);
      }, this.opt.reorderWindowMs);
    }
  }

  // ---- presence and typing ------------------------------------------------------

  private roomState(roomId: string): RoomState {
    let st = this.rooms.get(roomId);
    if (!st) {
      st = { id: roomId, joined: false, room: null, lastSeq: null, buffer: new Map(), gapTimer: null, online: new Set(), typing: new Map() };
      this.rooms.set(roomId, st);
    }
    return st;
  }

  private forgetRoom(st: RoomState): void {
    this.clearRoomTimers(st);
    this.rooms.delete(st.id);
    this.pendingReads.delete(st.id);
  }

  private clearRoomTimers(st: RoomState): void {
    if (st.gapTimer) clearTimeout(st.gapTimer);
    st.gapTimer = null;
    for (const t of st.typing.values()) clearTimeout(t);
    st.typing.clear();
  }

  private setOnline(st: RoomState, online: Set<string>): void {
    const same = online.size === st.online.size && [...online].every((u) => st.online.has(u));
    st.online = online;
    if (!same) this.emit("presence", { roomId: st.id, onlineUsers: [...online].sort() });
  }

  private onPresence(p: PresenceUpdatePayload): void {
    for (const st of this.rooms.values()) {
      if (!st.joined) continue;
      const members = memberIds(st.room);
      const isMember = members ? members.has(p.userId) : st.online.has(p.userId) || p.status === "online";
      if (!isMember) continue;
      const next = new Set(st.online);
      if (p.status === "online") next.add(p.userId);
      else next.delete(p.userId);
      this.setOnline(st, next);
    }
    this.emit("presenceUpdate", p);
  }

  private onTyping(p: TypingPayload): void {
    this.emit("typing", p);
    const st = this.rooms.get(p.roomId);
    if (!st || !st.joined || p.userId === this.userIdValue) return;
    if (p.isTyping) {
      const had = st.typing.get(p.userId);
      if (had !== undefined) clearTimeout(had);
      st.typing.set(
        p.userId,
        setTimeout(() => {
          st.typing.delete(p.userId);
          this.emit("typingUsers", { roomId: st.id, userIds: [...st.typing.keys()].sort() });
        }, this.opt.typingTimeoutMs),
      );
      if (had === undefined) this.emit("typingUsers", { roomId: st.id, userIds: [...st.typing.keys()].sort() });
    } else {
      this.stopTyping(st, p.userId);
    }
  }

  private stopTyping(st: RoomState, userId: string): void {
    const timer = st.typing.get(userId);
    if (timer === undefined) return;
    clearTimeout(timer);
    st.typing.delete(userId);
    this.emit("typingUsers", { roomId: st.id, userIds: [...st.typing.keys()].sort() });
  }
}

function detach(ws: WebSocketLike): void {
  ws.onopen = null;
  ws.onmessage = null;
  ws.onclose = null;
  ws.onerror = () => undefined; // `ws` throws on an unhandled error event
}

function memberIds(room: Room | null): Set<string> | null {
  if (!room) return null;
  const ids = new Set<string>();
  for (const m of room.members ?? []) if (m && typeof m.id === "string") ids.add(m.id);
  if (room.user1?.id) ids.add(room.user1.id);
  if (room.user2?.id) ids.add(room.user2.id);
  return ids.size ? ids : null;
}

/**
 * Connects to the chat backend's WebSocket (`ws://HOST:PORT/ws` locally,
 * `wss://<api-id>.execute-api.<region>.amazonaws.com/<stage>` on AWS) and
 * keeps it connected until `close()`.
 */
export function connect(url: string, tokenProvider: TokenProvider, options?: ClientOptions): ChatClient {
  return new ChatClient(url, tokenProvider, options);
}
