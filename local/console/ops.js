// The operator view: polls GET /console/api/ops (admin token) once a
// second and draws what changed: connections per gateway, rooms with
// subscribers, relay pushes per second and mean push latency (a canvas
// chart, no library), and errors by code over the last minute.
'use strict';

(() => {
  const STORAGE_KEY = 'chat-console-admin';
  const POLL_MS = 1_000;
  const HISTORY = 120; // samples kept for the chart (2 minutes)

  const $ = (id) => document.getElementById(id);
  const state = {token: null, timer: null, last: null, samples: [], errorHistory: []};

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null) continue;
      if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key === 'text') node.textContent = value;
      else node.setAttribute(key, String(value));
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function row(cells, attrs = {}) {
    return el('tr', attrs, ...cells.map(([text, cls]) => el('td', {class: cls, text: String(text)})));
  }

  function emptyRow(columns, text) {
    return el('tr', {class: 'empty-row'}, el('td', {colspan: columns, text}));
  }

  // ------------------------------------------------------------ sign-in

  function showSignIn(message) {
    clearInterval(state.timer);
    state.token = null;
    sessionStorage.removeItem(STORAGE_KEY);
    $('ops').hidden = true;
    $('ops-signin').hidden = false;
    $('ops-error').textContent = message || '';
  }

  function open(token) {
    state.token = token;
    state.last = null;
    state.samples = [];
    state.errorHistory = [];
    sessionStorage.setItem(STORAGE_KEY, token);
    $('ops-signin').hidden = true;
    $('ops').hidden = false;
    poll();
    clearInterval(state.timer);
    state.timer = setInterval(poll, POLL_MS);
  }

  async function mint() {
    $('ops-error').textContent = '';
    const res = await fetch('/console/dev-token', {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({userId: 'ops', displayName: 'Operator', admin: true}),
    });
    const data = await res.json().catch(() => null);
    if (res.status === 404) {
      $('ops-error').textContent = 'Dev tokens are off on this stack; paste an admin token.';
      return;
    }
    if (!res.ok || !data) {
      $('ops-error').textContent = (data && data.error && data.error.message) || 'Could not mint a token.';
      return;
    }
    open(data.token);
  }

  // ------------------------------------------------------------ polling

  async function poll() {
    let res;
    try {
      res = await fetch('/console/api/ops', {headers: {Authorization: `Bearer ${state.token}`}});
    } catch {
      $('ops-status').textContent = 'stack unreachable';
      return;
    }
    if (res.status === 401 || res.status === 403) {
      const data = await res.json().catch(() => null);
      showSignIn((data && data.error && data.error.message) || `Refused (${res.status}).`);
      return;
    }
    if (!res.ok) {
      $('ops-status').textContent = `error ${res.status}`;
      return;
    }
    const data = await res.json();
    const now = Date.now();
    record(now, data);
    render(data);
    $('ops-status').textContent = `updated ${new Date(now).toLocaleTimeString()}`;
  }

  /** Turns counter snapshots into per-second rates for the chart. */
  function record(now, data) {
    const relay = data.relay;
    const last = state.last;
    if (relay && last && last.relay) {
      const seconds = Math.max(0.001, (now - last.at) / 1000);
      const pushes = (relay.postsOk - last.relay.postsOk) / seconds;
      const envelopes = (relay.envelopes - last.relay.envelopes) / seconds;
      const count = relay.pushLatencyCount - last.relay.pushLatencyCount;
      const latency = count > 0 ? (relay.pushLatencyUsSum - last.relay.pushLatencyUsSum) / count / 1000 : null;
      state.samples.push({at: now, pushes, envelopes, latency});
      if (state.samples.length > HISTORY) state.samples.shift();
    }
    const totalErrors = Object.values(data.errors).reduce((a, b) => a + b, 0);
    state.errorHistory.push({at: now, errors: {...data.errors}, total: totalErrors});
    while (state.errorHistory.length > 1 && now - state.errorHistory[0].at > 60_000) state.errorHistory.shift();
    state.last = {at: now, relay};
  }

  // ------------------------------------------------------------ rendering

  function render(data) {
    $('ops-instance').textContent = data.instance;
    const connections = data.gateways.reduce((sum, g) => sum + g.connections, 0);
    $('tile-connections').textContent = data.gatewaysTruncated ? `${connections}+` : String(connections);
    $('tile-rooms').textContent = data.roomsTruncated ? `${data.rooms.length}+` : String(data.rooms.length);
    const sample = state.samples[state.samples.length - 1];
    $('tile-throughput').textContent = data.relay ? (sample ? sample.pushes.toFixed(1) : '0.0') : 'n/a';
    $('tile-latency').textContent =
      data.relay && sample && sample.latency !== null ? `${sample.latency.toFixed(1)} ms` : data.relay ? '–' : 'n/a';
    $('relay-note').hidden = Boolean(data.relay);

    $('gateways').replaceChildren(
      ...(data.gateways.length
        ? data.gateways.map((g) =>
            row([[g.endpoint, 'id'], [g.connections, 'num']], {'data-testid': 'ops-gateway-row'}),
          )
        : [emptyRow(2, 'No live connections')]),
    );
    const gw = data.gateway;
    $('this-gateway').textContent = gw
      ? `This process (${gw.instance}): ${gw.connectionsOpen} open sockets, ${gw.messagesIn} messages in, ${gw.postsOut} events out.`
      : 'This process runs no gateway.';

    $('rooms').replaceChildren(
      ...(data.rooms.length
        ? data.rooms.map((r) =>
            row(
              [
                [r.roomId, 'id'],
                [r.type || '', ''],
                [r.name || '', ''],
                [r.lastSequenceId ?? '', 'num'],
                [r.subscribers, 'num'],
              ],
              {'data-testid': 'ops-room-row', 'data-room-id': r.roomId},
            ),
          )
        : [emptyRow(5, 'No room has a joined connection')]),
    );
    $('rooms-truncated').hidden = !data.roomsTruncated;

    const first = state.errorHistory[0];
    const codes = Object.keys(data.errors).sort();
    let minute = 0;
    const rows = [];
    for (const code of codes) {
      const recent = data.errors[code] - ((first && first.errors[code]) || 0);
      minute += recent;
      if (data.errors[code] > 0) {
        rows.push(row([[code, ''], [recent, 'num'], [data.errors[code], 'num']], {'data-testid': 'ops-error-row', 'data-code': code}));
      }
    }
    $('errors').replaceChildren(...(rows.length ? rows : [emptyRow(3, 'No errors since start')]));
    $('tile-errors').textContent = String(minute);
    drawChart();
  }

  function drawChart() {
    const canvas = $('chart');
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 1000;
    const height = canvas.clientHeight || 220;
    if (canvas.width !== Math.round(width * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const pad = {left: 44, right: 52, top: 10, bottom: 22};
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const samples = state.samples;
    const niceMax = (v) => {
      if (v <= 0) return 1;
      const p = 10 ** Math.floor(Math.log10(v));
      return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
    };
    const rateMax = niceMax(Math.max(0, ...samples.map((s) => Math.max(s.pushes, s.envelopes))));
    const latMax = niceMax(Math.max(0, ...samples.map((s) => s.latency || 0)));

    ctx.font = '11px system-ui, sans-serif';
    ctx.strokeStyle = '#e3e5e8';
    ctx.fillStyle = '#6b7280';
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i += 1) {
      const y = pad.top + plotH - (plotH * i) / 4;
      ctx.beginPath();
      ctx.moveTo(pad.left, y + 0.5);
      ctx.lineTo(pad.left + plotW, y + 0.5);
      ctx.stroke();
      ctx.textAlign = 'right';
      ctx.fillText(String(+((rateMax * i) / 4).toFixed(2)), pad.left - 6, y + 4);
      ctx.textAlign = 'left';
      ctx.fillText(`${+((latMax * i) / 4).toFixed(2)}`, pad.left + plotW + 6, y + 4);
    }
    // The time axis grows with the samples up to HISTORY, so a fresh
    // page does not squeeze its first seconds against the right edge.
    const span = Math.min(HISTORY, Math.max(30, samples.length));
    ctx.textAlign = 'left';
    ctx.fillText(`-${span} s`, pad.left, height - 6);
    ctx.textAlign = 'right';
    ctx.fillText('now', pad.left + plotW, height - 6);
    if (samples.length === 0) {
      ctx.textAlign = 'center';
      ctx.fillText('collecting…', pad.left + plotW / 2, pad.top + plotH / 2);
      return;
    }
    const x = (i) => pad.left + plotW - ((samples.length - 1 - i) * plotW) / (span - 1);
    const line = (color, value, max) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let drawing = false;
      samples.forEach((s, i) => {
        const v = value(s);
        if (v === null) {
          drawing = false;
          return;
        }
        const y = pad.top + plotH - (Math.min(v, max) / max) * plotH;
        if (drawing) ctx.lineTo(x(i), y);
        else ctx.moveTo(x(i), y);
        drawing = true;
      });
      ctx.stroke();
    };
    line('#9ca3af', (s) => s.envelopes, rateMax);
    line('#2563eb', (s) => s.pushes, rateMax);
    line('#d97706', (s) => s.latency, latMax);
  }

  // ------------------------------------------------------------ wiring

  $('ops-signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('ops-token').value.trim();
    if (token) open(token);
    else $('ops-error').textContent = 'Paste an admin token, or mint one.';
  });
  $('ops-mint').addEventListener('click', () => {
    mint().catch((err) => {
      $('ops-error').textContent = err.message;
    });
  });
  $('ops-signout').addEventListener('click', () => showSignIn());
  window.addEventListener('resize', drawChart);

  const saved = sessionStorage.getItem(STORAGE_KEY);
  if (saved) open(saved);
  else $('ops-signin').hidden = false;
})();
