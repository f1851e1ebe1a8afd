// The developer console: a chat UI built on the project's TypeScript client
// library (clients/typescript), an example of its use in a browser.
//
// The library (./lib/, the ES modules of `npm run build`, copied into
// local/console/vendor/chat-client by scripts/build-console-lib.sh) does
// the protocol work: one WebSocket, reconnects with jittered backoff,
// rejoining every room with afterSequenceId after each reconnect (and the
// `reloaded` signal when retention deleted what was missed), messages once
// each in sequenceId order, sends that settle on the server's echo and go
// again with the same clientMessageId after a reconnect, read cursors kept
// while offline, presence and typing per room, ping/pong and token renewal.
//
// This file is the UI: sign-in (a token from POST /console/dev-token on a
// stack with --dev-tokens, or one pasted by hand, kept in sessionStorage so
// two windows can be two users), rendering, DOM events, and the REST calls
// the library does not cover: the room list, new rooms, history pages
// (beforeSequenceId) and reloading a room.
//
// window.chatConsole exposes the state, the client and dropConnection() for tests.
import {connect, randomId, tokenExpiryMs} from './lib/index.js';

const API = '/api/v1/chat';
const STORAGE_KEY = 'chat-console-session';
const TYPING_RESEND_MS = 3_000; // isTyping:true again at most this often
const TYPING_IDLE_MS = 4_000; // isTyping:false after this long without input
const ROOMS_POLL_MS = 4_000; // no event announces new rooms: poll the list
const HISTORY_PAGE = 30;
const RELOAD_PAGE = 50;
const TOKEN_RENEW_MS = 5 * 60_000; // a dev token this close to exp is re-minted
// Reconnect backoff: the first attempt 0.5–1 s after a drop, doubling up to 4–8 s.
const CLIENT_OPTIONS = {reconnectInitialDelayMs: 1_000, reconnectMaxDelayMs: 8_000};

const $ = (id) => document.getElementById(id);

/** Creates an element: el('li', {class: 'x', dataset: {a: 1}}, child, 'text'). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const state = {
  token: null,
  dev: null, // {userId, displayName} when signed in with a dev token (renewable)
  renewing: null, // the dev-token renewal in flight
  me: null, // {id, displayName}
  client: null, // the library's ChatClient
  connected: false,
  wasDisconnected: false,
  pollTimer: null,
  rooms: new Map(), // roomId -> room (REST shape, kept current)
  messages: new Map(), // roomId -> Map(messageId -> message)
  meta: new Map(), // roomId -> {highest, lastMarked, hasMore, loadingOlder, recovered}
  pending: new Map(), // clientMessageId -> {roomId, content}: sends awaiting their echo
  status: new Map(), // userId -> 'online' | 'offline', last known (for the activity list)
  current: null,
  profiles: new Map(), // userId -> {id, username, displayName}
  typingOut: {room: null, sentAt: 0, idleTimer: null},
};

// ---------------------------------------------------------------- helpers

function decodeClaims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const json = decodeURIComponent(
      atob(part)
        .split('')
        .map((c) => '%' + c.charCodeAt(0).toString(16).padStart(2, '0'))
        .join(''),
    );
    return JSON.parse(json);
  } catch {
    return null;
  }
}

function nameOf(userId) {
  const p = state.profiles.get(userId);
  return (p && (p.displayName || p.username)) || userId;
}

function initials(text) {
  return (text || '?').trim().slice(0, 2).toUpperCase();
}

function clock(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
}

function roomName(room) {
  if (!room) return '';
  if (room.type === 'DIRECT') {
    const other = (room.members || []).find((m) => m.id !== state.me.id);
    return other ? other.displayName || other.username || other.id : 'Direct chat';
  }
  return room.name || room.callId || 'Untitled room';
}

function metaOf(roomId) {
  let meta = state.meta.get(roomId);
  if (!meta) {
    meta = {highest: 0, lastMarked: 0, hasMore: false, loadingOlder: false, recovered: 0};
    state.meta.set(roomId, meta);
  }
  return meta;
}

function messagesOf(roomId) {
  let map = state.messages.get(roomId);
  if (!map) {
    map = new Map();
    state.messages.set(roomId, map);
  }
  return map;
}

function sortedMessages(roomId) {
  return [...messagesOf(roomId).values()].sort((a, b) => a.sequenceId - b.sequenceId);
}

function activity(kind, text) {
  const list = $('activity');
  const now = new Date().toISOString();
  list.prepend(el('li', {dataset: {kind}}, el('time', {text: clock(now)}), text));
  while (list.children.length > 30) list.lastElementChild.remove();
}

// ---------------------------------------------------------------- REST

async function api(method, path, body) {
  const headers = {Authorization: `Bearer ${await tokenProvider()}`};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(API + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error((data && data.error && data.error.message) || res.statusText);
    err.status = res.status;
    err.code = data && data.error && data.error.code;
    if (res.status === 401) signOut('Your token was refused; sign in again.');
    throw err;
  }
  return data;
}

/** POST /console/dev-token: a token for any user, on a stack with --dev-tokens. */
async function mintDevToken(userId, displayName) {
  const res = await fetch('/console/dev-token', {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({userId, displayName: displayName || null}),
  });
  const data = await res.json().catch(() => null);
  if (!res.ok || !data) {
    const err = new Error((data && data.error && data.error.message) || 'Sign-in failed.');
    err.status = res.status;
    throw err;
  }
  return data.token;
}

// ---------------------------------------------------------------- sign-in

async function signIn(event) {
  event.preventDefault();
  $('signin-error').textContent = '';
  let token = $('signin-token').value.trim();
  let dev = null;
  if (!token) {
    const userId = $('signin-user').value.trim();
    if (!userId) {
      $('signin-error').textContent = 'Pick a user id.';
      return;
    }
    dev = {userId, displayName: $('signin-name').value.trim() || null};
    try {
      token = await mintDevToken(dev.userId, dev.displayName);
    } catch (err) {
      if (err.status === 404) {
        $('signin-error').textContent =
          'Dev tokens are off on this stack. Start it with scripts/dev.sh (or chat-local serve --dev-tokens), or paste a token.';
        $('signin-token-box').open = true;
      } else {
        $('signin-error').textContent = err.message;
      }
      return;
    }
  }
  const claims = decodeClaims(token);
  if (!claims || !claims.sub) {
    $('signin-error').textContent = 'That is not a JWT.';
    return;
  }
  start(token, claims, dev);
}

function saveSession() {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify({token: state.token, dev: state.dev}));
}

function signOut(message) {
  sessionStorage.removeItem(STORAGE_KEY);
  const client = state.client;
  state.client = null;
  if (client) client.close();
  state.token = null;
  state.dev = null;
  state.connected = false;
  state.wasDisconnected = false;
  clearInterval(state.pollTimer);
  clearTimeout(state.typingOut.idleTimer);
  state.typingOut = {room: null, sentAt: 0, idleTimer: null};
  for (const key of ['rooms', 'messages', 'meta', 'pending', 'status', 'profiles']) state[key].clear();
  state.current = null;
  $('rooms').replaceChildren();
  $('activity').replaceChildren();
  $('banner').hidden = true;
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
}

function start(token, claims, dev) {
  state.token = token;
  state.dev = dev;
  saveSession();
  state.me = {id: claims.sub, displayName: claims.displayName || claims.username || claims.sub};
  state.profiles.set(claims.sub, {id: claims.sub, username: claims.username, displayName: claims.displayName});
  $('signin').hidden = true;
  $('app').hidden = false;
  $('me-name').textContent = state.me.displayName;
  $('me-id').textContent = state.me.id;
  $('me-avatar').textContent = initials(state.me.displayName);
  document.title = `${state.me.displayName} · Chat console`;
  setStatus('connecting', 'connecting');
  showRoom();
  updateComposer();
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  state.client = connect(`${scheme}//${location.host}/ws`, tokenProvider, CLIENT_OPTIONS);
  listen(state.client);
  refreshRooms();
  state.pollTimer = setInterval(() => state.connected && refreshRooms(), ROOMS_POLL_MS);
}

/**
 * The session's token, for REST calls and for the library, which asks
 * before every (re)connect and before the current one's exp: a dev-token
 * session gets a fresh one near its end, a pasted token is used until it
 * runs out.
 */
async function tokenProvider() {
  if (!state.token) throw new Error('signed out');
  const expMs = tokenExpiryMs(state.token);
  if (expMs === null || expMs - Date.now() >= TOKEN_RENEW_MS) return state.token;
  if (!state.dev) {
    if (expMs > Date.now()) return state.token;
    signOut('Your token expired; sign in again.');
    throw new Error('the token expired');
  }
  if (!state.renewing) {
    const dev = state.dev;
    state.renewing = mintDevToken(dev.userId, dev.displayName)
      .then((token) => {
        if (state.dev !== dev) throw new Error('signed out');
        state.token = token;
        saveSession();
        activity('info', 'Renewed the session token.');
        return token;
      })
      .finally(() => {
        state.renewing = null;
      });
  }
  return state.renewing;
}

// ---------------------------------------------------------------- the library's events

/** Subscribes the UI to a client's events; a signed-out client's late events are ignored. */
function listen(client) {
  const on = (name, handler) =>
    client.on(name, (payload) => {
      if (client === state.client) handler(payload);
    });
  on('connected', onConnected);
  on('disconnected', onDisconnected);
  on('reconnecting', ({attempt, delayMs}) => {
    const seconds = Math.max(1, Math.round(delayMs / 1000));
    $('banner-text').textContent = `Connection lost. Reconnecting in ${seconds} s (attempt ${attempt})…`;
    $('banner').hidden = false;
  });
  on('roomJoined', onRoomJoined);
  on('reloaded', ({roomId}) => {
    activity('reloaded', `Missed messages in ${roomName(state.rooms.get(roomId))} are gone (retention); reloaded the room.`);
    reloadRoom(roomId).catch((err) => activity('error', `Could not reload the room: ${err.message}`));
  });
  on('message', onMessage);
  on('readReceipt', onReadReceipt);
  on('presence', ({roomId}) => {
    if (roomId === state.current) renderOnline();
  });
  on('presenceUpdate', ({userId, status}) => noteStatus(userId, status, true));
  on('typingUsers', ({roomId}) => {
    if (roomId === state.current) renderTyping();
  });
  on('roomLeft', () => refreshRooms());
  on('gap', ({roomId, afterSequenceId, nextSequenceId}) =>
    activity('info', `Messages ${afterSequenceId + 1}–${nextSequenceId - 1} of ${roomName(state.rooms.get(roomId))} never came; went on without them.`),
  );
  on('error', (p) => activity('error', `${p.requestType || 'request'}: ${p.code} ${p.message}`));
  on('warning', ({message}) => activity('info', `Connection: ${message}.`));
}

function setStatus(kind, text) {
  const node = $('conn-status');
  node.dataset.state = kind;
  node.textContent = text;
}

function onConnected() {
  state.connected = true;
  $('banner').hidden = true;
  setStatus('online', 'online');
  updateComposer();
  if (state.wasDisconnected) activity('info', 'Reconnected.');
  state.wasDisconnected = false;
  if (state.current) renderRoom();
  refreshRooms();
}

function onDisconnected() {
  state.connected = false;
  state.wasDisconnected = true;
  setStatus('offline', 'offline');
  updateComposer();
  if (state.current) renderRoom();
}

/** Joins a room through the library, which keeps it joined across reconnects. */
function join(roomId) {
  const client = state.client;
  client.join(roomId).catch((err) => {
    if (client === state.client) activity('error', `Could not join ${roomName(state.rooms.get(roomId))}: ${err.message}`);
  });
}

/** Remembers who is online (a room's snapshot, or a presenceUpdate); presence lines in the activity list. */
function noteStatus(userId, status, announce) {
  const was = state.status.get(userId) || 'offline';
  state.status.set(userId, status);
  if (announce && userId !== state.me.id && was !== status) activity('presence', `${nameOf(userId)} is ${status}.`);
}

function onRoomJoined(p) {
  const room = upsertRoom(p.room);
  const meta = metaOf(room.id);
  for (const member of room.members || []) {
    if (member.id !== state.me.id) noteStatus(member.id, p.onlineUsers.includes(member.id) ? 'online' : 'offline', false);
  }
  if (p.rejoin) {
    // After a reconnect: the library delivered what was missed as `message`
    // events (paging while hasMore), or said `reloaded` (recovered: false).
    if (p.recovered !== false) {
      meta.recovered += p.messages.length;
      const morePages = p.hasMore && p.messages.length > 0;
      if (!morePages && meta.recovered > 0) {
        const n = meta.recovered;
        activity('recovered', `Recovered ${n} missed message${n === 1 ? '' : 's'} in ${roomName(room)}.`);
      }
      if (!morePages) meta.recovered = 0;
    }
  } else {
    const hadNone = messagesOf(room.id).size === 0;
    addMessages(room.id, p.messages);
    if (hadNone) meta.hasMore = p.hasMore;
  }
  room.unreadCount = room.id === state.current && isViewing() ? 0 : p.unreadCount;
  renderRooms();
  if (room.id === state.current) {
    renderRoom();
    markRead();
  }
}

function onMessage(m) {
  const isNew = !messagesOf(m.roomId).has(m.id);
  addMessages(m.roomId, [m]);
  if (m.clientMessageId) state.pending.delete(m.clientMessageId);
  const room = state.rooms.get(m.roomId);
  if (!room) {
    refreshRooms();
    return;
  }
  if (isNew && m.senderId !== state.me.id && !(m.roomId === state.current && isViewing())) {
    room.unreadCount = (room.unreadCount || 0) + 1;
  }
  renderRooms();
  if (m.roomId === state.current) {
    renderMessages({stick: m.senderId === state.me.id});
    renderTyping();
    markRead();
  }
}

function onReadReceipt({roomId, userId, sequenceId}) {
  let changed = false;
  for (const m of messagesOf(roomId).values()) {
    if (m.sequenceId <= sequenceId && m.senderId !== userId && !m.readBy.includes(userId)) {
      m.readBy.push(userId);
      changed = true;
    }
  }
  if (userId === state.me.id) {
    const meta = metaOf(roomId);
    meta.lastMarked = Math.max(meta.lastMarked, sequenceId);
  }
  if (changed && roomId === state.current) renderMessages();
}

// ---------------------------------------------------------------- rooms (REST)

function upsertRoom(room) {
  const known = state.rooms.get(room.id) || {};
  const merged = Object.assign(known, room);
  state.rooms.set(room.id, merged);
  for (const member of room.members || []) state.profiles.set(member.id, member);
  return merged;
}

/** GET /rooms; every room in the list is joined, so its badge and last message stay live. */
async function refreshRooms() {
  let data;
  try {
    data = await api('GET', '/rooms');
  } catch (err) {
    if (err.status !== 401) activity('error', `Could not load rooms: ${err.message}`);
    return;
  }
  if (!state.client) return;
  const seen = new Set();
  for (const room of data.rooms) {
    seen.add(room.id);
    upsertRoom(room).unreadCount = room.id === state.current && isViewing() ? 0 : room.unreadCount;
    if (!state.client.getRoom(room.id)) join(room.id);
  }
  for (const roomId of [...state.rooms.keys()]) {
    if (!seen.has(roomId)) state.rooms.delete(roomId);
  }
  renderRooms();
  if (state.current) renderRoomHead();
}

/**
 * After `reloaded`: the room's newest page from REST replaces what is shown
 * (messages that arrived live since that page are kept).
 */
async function reloadRoom(roomId) {
  const data = await api('GET', `/rooms/${encodeURIComponent(roomId)}/messages?limit=${RELOAD_PAGE}`);
  const map = messagesOf(roomId);
  const newest = data.messages.length ? data.messages[data.messages.length - 1].sequenceId : 0;
  for (const [id, m] of map) {
    if (m.sequenceId <= newest) map.delete(id);
  }
  addMessages(roomId, data.messages);
  metaOf(roomId).hasMore = data.hasMore;
  renderRooms();
  if (roomId === state.current) {
    renderMessages({stick: true});
    markRead();
  }
}

/** Adds messages (deduplicated by id); returns how many were new. */
function addMessages(roomId, list) {
  const map = messagesOf(roomId);
  const meta = metaOf(roomId);
  const room = state.rooms.get(roomId);
  let added = 0;
  for (const m of list) {
    if (!map.has(m.id)) added += 1;
    map.set(m.id, m);
    if (m.sender) state.profiles.set(m.senderId, m.sender);
    if (m.sequenceId > meta.highest) {
      meta.highest = m.sequenceId;
      if (room) {
        room.lastMessageText = m.content;
        room.lastMessageAt = m.createdAt;
      }
    }
  }
  return added;
}

async function loadOlder() {
  const roomId = state.current;
  const meta = metaOf(roomId);
  if (!roomId || meta.loadingOlder || !meta.hasMore) return;
  const oldest = sortedMessages(roomId)[0];
  if (!oldest) return;
  meta.loadingOlder = true;
  try {
    const data = await api(
      'GET',
      `/rooms/${encodeURIComponent(roomId)}/messages?beforeSequenceId=${oldest.sequenceId}&limit=${HISTORY_PAGE}`,
    );
    addMessages(roomId, data.messages);
    meta.hasMore = data.hasMore;
    if (roomId === state.current) renderMessages({keepOffset: true});
  } catch (err) {
    activity('error', `Could not load history: ${err.message}`);
  } finally {
    meta.loadingOlder = false;
  }
}

function selectRoom(roomId) {
  if (state.current === roomId) return;
  stopTyping();
  state.current = roomId;
  const room = state.rooms.get(roomId);
  if (room) room.unreadCount = 0;
  renderRooms();
  showRoom();
  renderRoom({stick: true});
  $('composer-input').focus();
  if (!state.client.getRoom(roomId)) join(roomId);
  markRead();
}

async function createDirect(event) {
  event.preventDefault();
  $('room-error').textContent = '';
  const target = $('direct-user').value.trim();
  try {
    const data = await api('POST', '/direct', {targetUserId: target});
    afterCreate(data.room);
    $('direct-user').value = '';
  } catch (err) {
    $('room-error').textContent =
      err.status === 404 ? `No user "${target}" yet: they must sign in once first.` : err.message;
  }
}

async function createGroup(event) {
  event.preventDefault();
  $('room-error').textContent = '';
  const memberIds = $('group-members')
    .value.split(/[\s,]+/)
    .filter(Boolean);
  try {
    const data = await api('POST', '/rooms', {type: 'GROUP', name: $('group-name').value.trim(), memberIds});
    afterCreate(data.room);
    $('group-name').value = '';
    $('group-members').value = '';
    $('new-group-box').open = false;
  } catch (err) {
    $('room-error').textContent = err.message;
  }
}

function afterCreate(room) {
  upsertRoom(room);
  if (!state.client.getRoom(room.id)) join(room.id);
  selectRoom(room.id);
}

// ---------------------------------------------------------------- reading, typing, sending

function isViewing() {
  return document.visibilityState === 'visible';
}

/** markRead up to the newest message of the open room, once per new message (the library keeps it while offline). */
function markRead() {
  const roomId = state.current;
  if (!roomId || !isViewing() || !state.client) return;
  const meta = metaOf(roomId);
  if (meta.highest > meta.lastMarked) {
    state.client.markRead(roomId, meta.highest);
    meta.lastMarked = meta.highest;
  }
  const room = state.rooms.get(roomId);
  if (room && room.unreadCount) {
    room.unreadCount = 0;
    renderRooms();
  }
}

function onInput() {
  const roomId = state.current;
  if (!roomId || !state.connected) return;
  const out = state.typingOut;
  if ($('composer-input').value === '') {
    stopTyping();
    return;
  }
  const now = Date.now();
  if (out.room !== roomId || now - out.sentAt > TYPING_RESEND_MS) {
    if (out.room && out.room !== roomId) stopTyping();
    state.client.typing(roomId, true);
    out.room = roomId;
    out.sentAt = now;
  }
  clearTimeout(out.idleTimer);
  out.idleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
}

function stopTyping() {
  const out = state.typingOut;
  clearTimeout(out.idleTimer);
  if (out.room && state.client) state.client.typing(out.room, false);
  out.room = null;
  out.sentAt = 0;
}

/** Sends through the library: shown as pending until the server's echo, sent again after a reconnect. */
function sendMessage(event) {
  event.preventDefault();
  const input = $('composer-input');
  const content = input.value;
  const roomId = state.current;
  if (!roomId || !content.trim()) return;
  input.value = '';
  stopTyping();
  const clientMessageId = randomId();
  state.pending.set(clientMessageId, {roomId, content});
  renderMessages({stick: true});
  const client = state.client;
  client.send(roomId, content, {clientMessageId}).then(
    () => {
      if (state.pending.delete(clientMessageId) && roomId === state.current) renderMessages();
    },
    (err) => {
      if (client !== state.client) return;
      state.pending.delete(clientMessageId);
      activity('error', `Not sent ("${content.slice(0, 40)}"): ${err.message}`);
      if (roomId === state.current) renderMessages();
    },
  );
}

function updateComposer() {
  $('composer-input').placeholder = state.connected
    ? 'Write a message'
    : 'Offline: messages go out when the connection is back';
}

// ---------------------------------------------------------------- rendering

function showRoom() {
  $('empty').hidden = Boolean(state.current);
  $('room').hidden = !state.current;
}

function renderRooms() {
  const rooms = [...state.rooms.values()].sort((a, b) =>
    (b.lastMessageAt || b.createdAt || '').localeCompare(a.lastMessageAt || a.createdAt || ''),
  );
  $('rooms-empty').hidden = rooms.length > 0;
  $('rooms').replaceChildren(
    ...rooms.map((room) =>
      el(
        'li',
        {
          class: room.id === state.current ? 'active' : '',
          dataset: {testid: 'room-item', roomId: room.id, roomName: roomName(room)},
        },
        el('span', {class: 'room-name', text: roomName(room)}),
        el('span', {class: 'room-time', text: clock(room.lastMessageAt)}),
        el('span', {class: 'room-last', dataset: {testid: 'room-last'}, text: room.lastMessageText || (room.type === 'GROUP' ? `${(room.members || []).length} members` : 'No messages yet')}),
        room.unreadCount > 0 ? el('span', {class: 'badge', dataset: {testid: 'unread-badge'}, text: String(room.unreadCount)}) : null,
      ),
    ),
  );
}

function renderRoom(options) {
  renderRoomHead();
  renderMessages(options);
  renderTyping();
}

function renderRoomHead() {
  const room = state.rooms.get(state.current);
  if (!room) return;
  $('room-title').textContent = roomName(room);
  const kind = room.type === 'DIRECT' ? 'Direct chat' : room.type === 'GROUP' ? 'Group' : 'Call';
  $('room-sub').textContent = `${kind} · ${(room.members || []).length} members · ${room.id}`;
  renderOnline();
}

/** Who is online in the open room: the library's presence state for it. */
function renderOnline() {
  const room = state.rooms.get(state.current);
  if (!room) return;
  const snapshot = state.client && state.client.getRoom(room.id);
  const online = new Set(snapshot ? snapshot.onlineUsers : []);
  if (state.connected) online.add(state.me.id);
  else online.delete(state.me.id);
  const members = [...(room.members || [])].sort(
    (a, b) => Number(online.has(b.id)) - Number(online.has(a.id)) || a.id.localeCompare(b.id),
  );
  $('online').replaceChildren(
    ...members.map((m) =>
      el('li', {
        dataset: {testid: 'member', userId: m.id, online: String(online.has(m.id))},
        title: `${m.id} · ${online.has(m.id) ? 'online' : 'offline'}`,
        text: m.id === state.me.id ? `${nameOf(m.id)} (you)` : nameOf(m.id),
      }),
    ),
  );
}

function renderMessages({stick = false, keepOffset = false} = {}) {
  const box = $('messages');
  const roomId = state.current;
  if (!roomId) return;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const fromBottom = box.scrollHeight - box.scrollTop;
  const room = state.rooms.get(roomId);
  const others = ((room && room.members) || []).filter((m) => m.id !== state.me.id);
  const list = sortedMessages(roomId);
  const pending = [...state.pending.values()].filter((p) => p.roomId === roomId);
  $('message-list').replaceChildren(
    ...list.map((m, i) => renderMessage(m, others, list[i - 1])),
    ...pending.map(renderPending),
  );
  const meta = metaOf(roomId);
  $('load-older').hidden = !meta.hasMore;
  $('history-start').hidden = meta.hasMore || list.length === 0;
  if (keepOffset) box.scrollTop = box.scrollHeight - fromBottom;
  else if (stick || atBottom) box.scrollTop = box.scrollHeight;
}

/** One message; `previous` decides whether its name and time repeat. */
function renderMessage(m, others, previous) {
  const mine = m.senderId === state.me.id;
  const kind = m.type === 'system' ? 'system' : mine ? 'mine' : 'theirs';
  const continued =
    previous &&
    previous.senderId === m.senderId &&
    previous.sequenceId === m.sequenceId - 1 &&
    new Date(m.createdAt) - new Date(previous.createdAt) < 120_000;
  let body = m.content;
  if (m.type === 'image' || m.type === 'gift') {
    body = `[${m.type}] ${m.content || ''} ${m.metadata ? JSON.stringify(m.metadata) : ''}`.trim();
  }
  let receipt = null;
  if (mine) {
    const readers = m.readBy.filter((id) => id !== state.me.id);
    const everyone = others.length > 0 && others.every((o) => readers.includes(o.id));
    const text = readers.length === 0 ? '✓ Sent' : `✓✓ Read by ${readers.map(nameOf).join(', ')}`;
    receipt = el('div', {
      class: 'receipt',
      dataset: {testid: 'read-receipt', readBy: readers.join(','), read: String(everyone)},
      text,
    });
  }
  return el(
    'li',
    {
      class: `msg ${kind}${continued ? ' cont' : ''}`,
      dataset: {testid: 'message', id: m.id, seq: String(m.sequenceId), sender: m.senderId},
    },
    el(
      'div',
      {class: 'meta'},
      el('span', {class: 'sender', text: nameOf(m.senderId)}),
      el('time', {datetime: m.createdAt, title: `#${m.sequenceId} · ${m.createdAt}`, text: clock(m.createdAt)}),
    ),
    el('div', {class: 'bubble', dataset: {testid: 'message-text'}, text: body}),
    receipt,
  );
}

/** A send still waiting for the server's echo. */
function renderPending(p) {
  return el(
    'li',
    {class: 'msg mine pending', dataset: {testid: 'pending-message'}},
    el('div', {class: 'bubble', text: p.content}),
    el('div', {class: 'receipt', text: state.connected ? 'Sending…' : 'Waiting for the connection…'}),
  );
}

function renderTyping() {
  const snapshot = state.client && state.current && state.client.getRoom(state.current);
  const names = snapshot ? snapshot.typingUsers.map(nameOf) : [];
  $('typing').textContent =
    names.length === 0 ? '' : names.length === 1 ? `${names[0]} is typing…` : `${names.join(', ')} are typing…`;
}

// ---------------------------------------------------------------- wiring

$('signin-form').addEventListener('submit', (e) => {
  signIn(e).catch((err) => {
    $('signin-error').textContent = `Sign-in failed: ${err.message}`;
  });
});
$('signout').addEventListener('click', () => signOut());
$('new-direct').addEventListener('submit', createDirect);
$('new-group').addEventListener('submit', createGroup);
$('rooms').addEventListener('click', (e) => {
  const item = e.target.closest('li[data-room-id]');
  if (item) selectRoom(item.dataset.roomId);
});
$('composer').addEventListener('submit', sendMessage);
$('composer-input').addEventListener('input', onInput);
$('load-older').addEventListener('click', loadOlder);
$('messages').addEventListener('scroll', () => {
  if ($('messages').scrollTop < 60) loadOlder();
});
$('banner-retry').addEventListener('click', () => state.client && state.client.reconnect());
window.addEventListener('online', () => {
  if (state.client && !state.connected) state.client.reconnect();
});
document.addEventListener('visibilitychange', () => {
  if (isViewing()) markRead();
});

window.chatConsole = {
  state,
  /** The library's ChatClient of the signed-in session. */
  get client() {
    return state.client;
  },
  /**
   * Drops the socket as a network failure would (for tests): the library
   * gives it up at once and enters its reconnect loop before this returns,
   * so the banner is already up.
   */
  dropConnection() {
    if (state.client) state.client.dropConnection();
  },
};

/** The saved session of this tab: {token, dev} (or, from an older console, the bare token). */
function savedSession() {
  const raw = sessionStorage.getItem(STORAGE_KEY);
  if (!raw) return null;
  try {
    const parsed = JSON.parse(raw);
    if (parsed && typeof parsed.token === 'string') return parsed;
  } catch {
    // a bare token
  }
  return {token: raw, dev: null};
}

const saved = savedSession();
const claims = saved && decodeClaims(saved.token);
const usable = claims && claims.sub && (saved.dev || !claims.exp || claims.exp * 1000 > Date.now());
if (usable) start(saved.token, claims, saved.dev);
else $('signin').hidden = false;
