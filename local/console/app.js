// The developer console: a chat client written against PROTOCOL.md only.
//
// - Sign-in: a token from POST /console/dev-token (local stack with
//   --dev-tokens), or one pasted by hand. Kept in sessionStorage, so two
//   windows can be two users.
// - One WebSocket (/ws?token=…). Every room in the list is joined, so the
//   list's unread badges and last-message text stay live; the open room
//   shows messages in sequenceId order (deduplicated by id), typing,
//   read receipts (readBy) and who is online.
// - REST for the room list, new rooms, history pages (beforeSequenceId),
//   who is online, and reloading a room.
// - Reconnects with exponential backoff behind a banner; rejoins each room
//   with afterSequenceId = the highest sequenceId seen, and reloads a room
//   from REST when the answer says recovered: false.
//
// window.chatConsole exposes the state and dropConnection() for tests.
'use strict';

(() => {
  const API = '/api/v1/chat';
  const STORAGE_KEY = 'chat-console-session';
  const PING_MS = 30_000; // PROTOCOL: a ping every 30 s keeps the presence lease
  const TYPING_RESEND_MS = 3_000; // isTyping:true again at most this often
  const TYPING_IDLE_MS = 4_000; // isTyping:false after this long without input
  const TYPING_SHOW_MS = 6_000; // others' indicator fades without news
  const ROOMS_POLL_MS = 4_000; // no event announces new rooms: poll the list
  const HISTORY_PAGE = 30;
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 8_000;

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
    me: null, // {id, displayName}
    ws: null,
    connected: false,
    attempts: 0,
    reconnectTimer: null,
    pingTimer: null,
    pollTimer: null,
    pingSentAt: 0,
    rooms: new Map(), // roomId -> room (REST shape, kept current)
    messages: new Map(), // roomId -> Map(messageId -> message)
    meta: new Map(), // roomId -> {joined, highest, lastMarked, hasMore, loadingOlder}
    // Presence events counted as they arrive, and the count at each user's
    // last one: a snapshot of who is online (roomJoined, GET .../online)
    // asked for before an event that arrived first must not undo it.
    presenceClock: 0,
    presenceAt: new Map(), // userId -> presenceClock at their last presenceUpdate
    current: null,
    online: new Set(),
    profiles: new Map(), // userId -> {id, username, displayName}
    typing: new Map(), // roomId -> Map(userId -> timer)
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
      meta = {joined: false, highest: 0, lastMarked: 0, hasMore: false, loadingOlder: false};
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
    const headers = {Authorization: `Bearer ${state.token}`};
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

  // ---------------------------------------------------------------- sign-in

  async function signIn(event) {
    event.preventDefault();
    $('signin-error').textContent = '';
    let token = $('signin-token').value.trim();
    if (!token) {
      const userId = $('signin-user').value.trim();
      if (!userId) {
        $('signin-error').textContent = 'Pick a user id.';
        return;
      }
      const res = await fetch('/console/dev-token', {
        method: 'POST',
        headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({userId, displayName: $('signin-name').value.trim() || null}),
      });
      const data = await res.json().catch(() => null);
      if (res.status === 404) {
        $('signin-error').textContent =
          'Dev tokens are off on this stack. Start it with scripts/dev.sh (or chat-local serve --dev-tokens), or paste a token.';
        $('signin-token-box').open = true;
        return;
      }
      if (!res.ok || !data) {
        $('signin-error').textContent = (data && data.error && data.error.message) || 'Sign-in failed.';
        return;
      }
      token = data.token;
    }
    const claims = decodeClaims(token);
    if (!claims || !claims.sub) {
      $('signin-error').textContent = 'That is not a JWT.';
      return;
    }
    sessionStorage.setItem(STORAGE_KEY, token);
    start(token, claims);
  }

  function signOut(message) {
    sessionStorage.removeItem(STORAGE_KEY);
    state.token = null;
    clearTimeout(state.reconnectTimer);
    clearInterval(state.pingTimer);
    clearInterval(state.pollTimer);
    if (state.ws) state.ws.close(1000, 'signed out');
    state.ws = null;
    state.connected = false;
    for (const key of ['rooms', 'messages', 'meta', 'profiles', 'typing']) state[key].clear();
    state.online.clear();
    state.presenceAt.clear();
    state.current = null;
    $('rooms').replaceChildren();
    $('activity').replaceChildren();
    $('banner').hidden = true;
    $('app').hidden = true;
    $('signin').hidden = false;
    $('signin-error').textContent = message || '';
  }

  function start(token, claims) {
    state.token = token;
    state.me = {id: claims.sub, displayName: claims.displayName || claims.username || claims.sub};
    state.profiles.set(claims.sub, {id: claims.sub, username: claims.username, displayName: claims.displayName});
    $('signin').hidden = true;
    $('app').hidden = false;
    $('me-name').textContent = state.me.displayName;
    $('me-id').textContent = state.me.id;
    $('me-avatar').textContent = initials(state.me.displayName);
    document.title = `${state.me.displayName} · Chat console`;
    showRoom();
    refreshRooms();
    connect();
    state.pollTimer = setInterval(() => state.connected && refreshRooms(), ROOMS_POLL_MS);
  }

  // ---------------------------------------------------------------- WebSocket

  function connect() {
    clearTimeout(state.reconnectTimer);
    if (!state.token) return;
    const claims = decodeClaims(state.token);
    if (claims && claims.exp && claims.exp * 1000 < Date.now()) {
      signOut('Your token expired; sign in again.');
      return;
    }
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}/ws?token=${encodeURIComponent(state.token)}`);
    state.ws = ws;
    setStatus('connecting', 'connecting');
    ws.onmessage = (e) => {
      if (ws !== state.ws) return;
      let event;
      try {
        event = JSON.parse(e.data);
      } catch {
        return;
      }
      handle(event);
    };
    ws.onclose = () => {
      if (ws === state.ws) disconnected();
    };
  }

  function send(type, payload) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
    state.ws.send(JSON.stringify({type, payload}));
    return true;
  }

  function disconnected() {
    state.connected = false;
    state.ws = null;
    clearInterval(state.pingTimer);
    for (const meta of state.meta.values()) meta.joined = false;
    for (const roomTyping of state.typing.values()) {
      for (const timer of roomTyping.values()) clearTimeout(timer);
    }
    state.typing.clear();
    renderTyping();
    if (!state.token) return;
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempts) * (0.8 + Math.random() * 0.4);
    state.attempts += 1;
    const seconds = Math.max(1, Math.round(delay / 1000));
    $('banner-text').textContent = `Connection lost. Reconnecting in ${seconds} s (attempt ${state.attempts})…`;
    $('banner').hidden = false;
    setStatus('offline', 'offline');
    updateComposer();
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function setStatus(kind, text) {
    const node = $('conn-status');
    node.dataset.state = kind;
    node.textContent = text;
  }

  function handle({type, payload}) {
    switch (type) {
      case 'connected':
        return onConnected(payload);
      case 'roomJoined':
        return onRoomJoined(payload);
      case 'message':
        return onMessage(payload);
      case 'typing':
        return onTyping(payload);
      case 'readReceipt':
        return onReadReceipt(payload);
      case 'presenceUpdate':
        return onPresence(payload);
      case 'roomLeft':
        metaOf(payload.roomId).joined = false;
        return;
      case 'pong':
        setStatus('online', `online · ${Date.now() - state.pingSentAt} ms`);
        return;
      case 'error':
        return onError(payload);
      default:
        return;
    }
  }

  function onConnected() {
    const wasRetrying = state.attempts > 0;
    state.connected = true;
    state.attempts = 0;
    $('banner').hidden = true;
    setStatus('online', 'online');
    updateComposer();
    clearInterval(state.pingTimer);
    state.pingTimer = setInterval(ping, PING_MS);
    if (wasRetrying) activity('info', 'Reconnected.');
    for (const roomId of state.rooms.keys()) join(roomId);
    refreshRooms();
  }

  function ping() {
    state.pingSentAt = Date.now();
    send('ping', {});
  }

  /** joinRoom; after a reconnect, asks only for what was missed. */
  function join(roomId) {
    const meta = metaOf(roomId);
    const payload = {roomId};
    if (meta.highest > 0) payload.afterSequenceId = meta.highest;
    meta.joinClock = state.presenceClock;
    if (send('joinRoom', payload)) meta.joined = true;
  }

  /** Applies a snapshot of who is online among `members`, taken after
   * `since` on the presence clock: users with a newer presence event keep
   * what that event said. */
  function applyOnline(members, onlineUsers, since) {
    for (const member of members || []) {
      if ((state.presenceAt.get(member.id) || 0) > since) continue;
      if (onlineUsers.includes(member.id)) state.online.add(member.id);
      else if (member.id !== state.me.id) state.online.delete(member.id);
    }
  }

  function onRoomJoined(p) {
    const room = upsertRoom(p.room);
    const meta = metaOf(room.id);
    meta.joined = true;
    applyOnline(room.members, p.onlineUsers, meta.joinClock || 0);
    state.online.add(state.me.id);
    if ('recovered' in p) {
      // A rejoin with afterSequenceId: the answer holds what was missed.
      if (p.recovered === false || p.hasMore) {
        activity('reloaded', `Missed messages in ${roomName(room)} are gone (retention); reloaded the room.`);
        reloadRoom(room.id);
      } else {
        const added = addMessages(room.id, p.messages);
        if (added > 0) {
          activity('recovered', `Recovered ${added} missed message${added === 1 ? '' : 's'} in ${roomName(room)}.`);
        }
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
    const map = messagesOf(m.roomId);
    const isNew = !map.has(m.id);
    addMessages(m.roomId, [m]);
    stopShowingTyping(m.roomId, m.senderId);
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
      markRead();
    }
  }

  function onTyping({roomId, userId, username, isTyping}) {
    if (userId === state.me.id) return;
    if (!state.profiles.has(userId)) state.profiles.set(userId, {id: userId, username});
    let roomTyping = state.typing.get(roomId);
    if (!roomTyping) {
      roomTyping = new Map();
      state.typing.set(roomId, roomTyping);
    }
    clearTimeout(roomTyping.get(userId));
    if (isTyping) {
      roomTyping.set(userId, setTimeout(() => stopShowingTyping(roomId, userId), TYPING_SHOW_MS));
    } else {
      roomTyping.delete(userId);
    }
    if (roomId === state.current) renderTyping();
  }

  function stopShowingTyping(roomId, userId) {
    const roomTyping = state.typing.get(roomId);
    if (!roomTyping || !roomTyping.has(userId)) return;
    clearTimeout(roomTyping.get(userId));
    roomTyping.delete(userId);
    if (roomId === state.current) renderTyping();
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

  function onPresence({userId, status}) {
    state.presenceClock += 1;
    state.presenceAt.set(userId, state.presenceClock);
    const wasOnline = state.online.has(userId);
    if (status === 'online') state.online.add(userId);
    else state.online.delete(userId);
    if (userId !== state.me.id && wasOnline !== (status === 'online')) {
      activity('presence', `${nameOf(userId)} is ${status}.`);
    }
    renderOnline();
  }

  function onError(p) {
    activity('error', `${p.requestType || 'request'}: ${p.code} ${p.message}`);
    if (p.code === 'UNAUTHORIZED' && state.ws) state.ws.close(4000, 'reconnect'); // lease gone
  }

  // ---------------------------------------------------------------- rooms

  function upsertRoom(room) {
    const known = state.rooms.get(room.id) || {};
    const merged = Object.assign(known, room);
    state.rooms.set(room.id, merged);
    for (const member of room.members || []) state.profiles.set(member.id, member);
    return merged;
  }

  async function refreshRooms() {
    let data;
    try {
      data = await api('GET', '/rooms');
    } catch (err) {
      if (err.status !== 401) activity('error', `Could not load rooms: ${err.message}`);
      return;
    }
    const seen = new Set();
    for (const room of data.rooms) {
      seen.add(room.id);
      const isNew = !state.rooms.has(room.id);
      upsertRoom(room).unreadCount = room.id === state.current && isViewing() ? 0 : room.unreadCount;
      if (isNew && state.connected) join(room.id);
    }
    for (const roomId of [...state.rooms.keys()]) {
      if (!seen.has(roomId)) state.rooms.delete(roomId);
    }
    renderRooms();
    if (state.current) renderRoomHead();
  }

  /** Replaces a room's messages with its newest page from REST. */
  async function reloadRoom(roomId) {
    const data = await api('GET', `/rooms/${encodeURIComponent(roomId)}/messages?limit=50`);
    const map = messagesOf(roomId);
    map.clear();
    const meta = metaOf(roomId);
    meta.highest = 0;
    addMessages(roomId, data.messages);
    meta.hasMore = data.hasMore;
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

  async function selectRoom(roomId) {
    if (state.current === roomId) return;
    stopTyping();
    state.current = roomId;
    const room = state.rooms.get(roomId);
    if (room) room.unreadCount = 0;
    renderRooms();
    showRoom();
    renderRoom({stick: true});
    $('composer-input').focus();
    if (!metaOf(roomId).joined && state.connected) join(roomId);
    else markRead();
    try {
      const since = state.presenceClock;
      const data = await api('GET', `/rooms/${encodeURIComponent(roomId)}/online`);
      applyOnline(room && room.members, data.onlineUsers, since);
      renderOnline();
    } catch {
      // Offline: the next roomJoined brings the list.
    }
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
    const isNew = !state.rooms.has(room.id);
    upsertRoom(room);
    if (isNew && state.connected) join(room.id);
    selectRoom(room.id);
  }

  // ---------------------------------------------------------------- reading, typing, sending

  function isViewing() {
    return document.visibilityState === 'visible';
  }

  /** markRead up to the newest message of the open room, once per new message. */
  function markRead() {
    const roomId = state.current;
    if (!roomId || !isViewing() || !state.connected) return;
    const meta = metaOf(roomId);
    if (meta.highest > meta.lastMarked && send('markRead', {roomId, sequenceId: meta.highest})) {
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
      send('typing', {roomId, isTyping: true});
      out.room = roomId;
      out.sentAt = now;
    }
    clearTimeout(out.idleTimer);
    out.idleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    const out = state.typingOut;
    clearTimeout(out.idleTimer);
    if (out.room) send('typing', {roomId: out.room, isTyping: false});
    out.room = null;
    out.sentAt = 0;
  }

  function sendMessage(event) {
    event.preventDefault();
    const input = $('composer-input');
    const content = input.value;
    if (!state.current || !content.trim()) return;
    const clientMessageId = `c-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    if (send('sendMessage', {roomId: state.current, content, clientMessageId})) {
      input.value = '';
      stopTyping();
    }
  }

  function updateComposer() {
    $('composer-send').disabled = !state.connected;
    $('composer-input').placeholder = state.connected ? 'Write a message' : 'Offline: reconnecting…';
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

  function renderOnline() {
    const room = state.rooms.get(state.current);
    if (!room) return;
    const members = [...(room.members || [])].sort(
      (a, b) => Number(state.online.has(b.id)) - Number(state.online.has(a.id)) || a.id.localeCompare(b.id),
    );
    $('online').replaceChildren(
      ...members.map((m) =>
        el('li', {
          dataset: {testid: 'member', userId: m.id, online: String(state.online.has(m.id))},
          title: `${m.id} · ${state.online.has(m.id) ? 'online' : 'offline'}`,
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
    $('message-list').replaceChildren(...list.map((m, i) => renderMessage(m, others, list[i - 1])));
    const meta = metaOf(roomId);
    $('load-older').hidden = !meta.hasMore;
    $('history-start').hidden = meta.hasMore || messagesOf(roomId).size === 0;
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

  function renderTyping() {
    const roomTyping = state.typing.get(state.current);
    const names = roomTyping ? [...roomTyping.keys()].map(nameOf) : [];
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
  $('banner-retry').addEventListener('click', () => {
    state.attempts = Math.max(0, state.attempts - 1);
    connect();
  });
  window.addEventListener('online', () => {
    if (state.token && !state.connected) connect();
  });
  document.addEventListener('visibilitychange', () => {
    if (isViewing()) markRead();
  });

  window.chatConsole = {
    state,
    /** Closes the socket as a network failure would (for tests). */
    // As a client that has noticed its network is gone: the socket is
    // given up at once (its close handshake may never complete), and the
    // reconnect loop starts.
    dropConnection() {
      const ws = state.ws;
      if (!ws) return;
      ws.onclose = null;
      ws.onmessage = null;
      ws.close(4001, 'dropped');
      disconnected();
    },
  };

  const saved = sessionStorage.getItem(STORAGE_KEY);
  const claims = saved && decodeClaims(saved);
  if (claims && claims.sub && (!claims.exp || claims.exp * 1000 > Date.now())) start(saved, claims);
  else $('signin').hidden = false;
})();
