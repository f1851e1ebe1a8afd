// Browser tests of the developer console (/console) and the operator view
// (/console/ops), in Debian's chromium driven by playwright-core.
//
// They start nothing: BASE_URL names a running local stack started with
// --dev-tokens (scripts/console-test.sh starts one, with a private database
// and Redis prefix, and MESSAGE_RETENTION=60). Screenshots go to
// ARTIFACTS_DIR. Run: BASE_URL=http://127.0.0.1:3000 node --test tests/
import {after, before, describe, test} from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import {chromium} from 'playwright-core';

const BASE_URL = process.env.BASE_URL;
if (!BASE_URL) throw new Error('BASE_URL must name a running stack, e.g. http://127.0.0.1:3000');
const ARTIFACTS = path.resolve(process.env.ARTIFACTS_DIR || '../.local/console-artifacts');
const RETENTION = Number(process.env.MESSAGE_RETENTION || 60);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = 15_000;
// User ids unique to this run, so a stack that lives on (a dev stack)
// can be tested again.
const RUN = Math.random().toString(36).slice(2, 7);
const uid = (name) => `${name}-${RUN}`;

let browser;
const contexts = [];

before(async () => {
  fs.mkdirSync(ARTIFACTS, {recursive: true});
  // Playwright launches with a new, empty user-data-dir each time. The
  // flags keep chromium from phoning home (on this machine, background
  // networking floods refused connections) and from needing a GPU.
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
});

async function newContext(viewport = {width: 1180, height: 760}) {
  const context = await browser.newContext({viewport});
  contexts.push(context);
  return context;
}

async function shot(page, name) {
  const file = path.join(ARTIFACTS, `${name}.png`);
  await page.screenshot({path: file});
  console.log(`screenshot: ${file}`);
}

/** Runs a test body; on failure, saves a screenshot of every open page. */
async function withScreenshotsOnFailure(name, body) {
  try {
    await body();
  } catch (err) {
    let i = 0;
    for (const context of contexts) {
      for (const page of context.pages()) {
        await shot(page, `FAILED-${name}-${i++}`).catch(() => {});
      }
    }
    throw err;
  }
}

/** Polls `read` until `check(value)` holds; fails with the last value. */
async function eventually(read, check, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let value;
  for (;;) {
    value = await read();
    if (check(value)) return value;
    if (Date.now() > deadline) assert.fail(`${what}: still ${JSON.stringify(value)} after ${timeout} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Opens /console in a new context and signs in with a dev token. */
async function signIn(userId, displayName) {
  const context = await newContext();
  const page = await context.newPage();
  page.on('pageerror', (err) => console.log(`[${userId}] page error: ${err.message}`));
  await page.goto(`${BASE_URL}/console`);
  await page.getByTestId('signin-user').fill(userId);
  await page.getByTestId('signin-name').fill(displayName);
  await page.getByTestId('signin-submit').click();
  await page.locator('[data-testid=connection-status][data-state=online]').waitFor({timeout: WAIT});
  return {context, page};
}

async function mintToken(userId, displayName) {
  const res = await fetch(`${BASE_URL}/console/dev-token`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({userId, displayName}),
  });
  assert.equal(res.status, 200, 'the stack must run with --dev-tokens');
  return (await res.json()).token;
}

async function startDirect(page, targetUserId) {
  await page.getByTestId('new-direct-user').fill(targetUserId);
  await page.getByTestId('new-direct-submit').click();
  await page.getByTestId('room-view').waitFor({state: 'visible', timeout: WAIT});
  const id = await page.locator('[data-testid=room-item].active').getAttribute('data-room-id');
  assert.ok(id, 'the new room is selected');
  return id;
}

async function openRoom(page, roomId) {
  const item = page.locator(`[data-testid=room-item][data-room-id="${roomId}"]`);
  await item.waitFor({timeout: WAIT});
  await item.click();
  await page.getByTestId('room-view').waitFor({state: 'visible'});
}

async function say(page, text) {
  await page.getByTestId('composer-input').fill(text);
  await page.getByTestId('composer-send').click();
  await page.locator('[data-testid=message]', {hasText: text}).first().waitFor({timeout: WAIT});
}

/** The open room's messages as rendered: [{seq, sender, text}], top to bottom. */
function messages(page) {
  return page.$$eval('[data-testid=message]', (nodes) =>
    nodes.map((n) => ({
      seq: Number(n.dataset.seq),
      sender: n.dataset.sender,
      text: n.querySelector('[data-testid=message-text]').textContent,
    })),
  );
}

function assertOrdered(list) {
  const seqs = list.map((m) => m.seq);
  assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b), 'messages in sequenceId order');
  assert.equal(new Set(seqs).size, seqs.length, 'no message twice');
}

async function memberOnline(page, userId) {
  return page.locator(`[data-testid=member][data-user-id="${userId}"]`).getAttribute('data-online');
}

describe('console', () => {
  test('two users chat: messages both ways in order, typing, read receipts, presence', async () => {
    await withScreenshotsOnFailure('chat', async () => {
      const [alice, bob] = [uid('alice'), uid('bob')];
      const b = await signIn(bob, 'Bob');
      const a = await signIn(alice, 'Alice');
      await shot(a.page, '01-signed-in');

      const room = await startDirect(a.page, bob);
      await say(a.page, 'Hello Bob!');

      // Bob's list picks the new room up, with an unread badge and the
      // last message's text.
      const item = b.page.locator(`[data-testid=room-item][data-room-id="${room}"]`);
      await item.waitFor({timeout: WAIT});
      await eventually(() => item.getByTestId('unread-badge').textContent().catch(() => null), (t) => t === '1', 'unread badge');
      assert.equal(await item.getByTestId('room-last').textContent(), 'Hello Bob!');
      await shot(b.page, '02-room-list-unread');

      // Bob opens it: he reads the message, Alice sees the receipt.
      await openRoom(b.page, room);
      await b.page.locator('[data-testid=message]', {hasText: 'Hello Bob!'}).waitFor();
      assert.equal(await item.getByTestId('unread-badge').count(), 0, 'badge cleared when read');
      const receipt = a.page.locator('[data-testid=message]', {hasText: 'Hello Bob!'}).getByTestId('read-receipt');
      await eventually(() => receipt.getAttribute('data-read-by'), (v) => v === bob, 'readBy on the sender side');
      assert.match(await receipt.textContent(), /Read by Bob/);

      // Typing: Alice sees Bob typing, and it goes away when he sends.
      await b.page.getByTestId('composer-input').pressSequentially('Hi Al', {delay: 30});
      await eventually(() => a.page.getByTestId('typing-indicator').textContent(), (t) => t === 'Bob is typing…', 'typing indicator');
      await shot(a.page, '03-typing-and-receipt');
      await b.page.getByTestId('composer-input').fill('Hi Alice!');
      await b.page.getByTestId('composer-send').click();
      await a.page.locator('[data-testid=message]', {hasText: 'Hi Alice!'}).waitFor({timeout: WAIT});
      await eventually(() => a.page.getByTestId('typing-indicator').textContent(), (t) => t === '', 'typing cleared');

      // Messages both ways, interleaved: both windows show one order.
      for (let i = 1; i <= 3; i += 1) {
        await say(a.page, `a${i}`);
        await say(b.page, `b${i}`);
      }
      const expected = ['Hello Bob!', 'Hi Alice!', 'a1', 'b1', 'a2', 'b2', 'a3', 'b3'];
      for (const page of [a.page, b.page]) {
        const list = await eventually(() => messages(page), (l) => l.length === expected.length, 'all messages');
        assertOrdered(list);
        assert.deepEqual(list.map((m) => m.text), expected);
        assert.deepEqual(list.map((m) => m.seq), [1, 2, 3, 4, 5, 6, 7, 8]);
      }
      // Both read everything they see: the last message of each is read by the other.
      const last = b.page.locator('[data-testid=message][data-seq="8"]').getByTestId('read-receipt');
      await eventually(() => last.getAttribute('data-read-by'), (v) => v === alice, 'receipt of the last message');

      // Presence: each sees the other online; when Bob leaves, Alice sees him go offline.
      assert.equal(await memberOnline(a.page, bob), 'true');
      assert.equal(await memberOnline(b.page, alice), 'true');
      await shot(b.page, '04-conversation');
      await b.context.close();
      await eventually(() => memberOnline(a.page, bob), (v) => v === 'false', 'bob offline');
      await a.page.locator('[data-testid=activity] li', {hasText: 'Bob is offline'}).waitFor({timeout: WAIT});
      await shot(a.page, '05-presence-offline');
      await a.context.close();
    });
  });

  test('a window that goes offline recovers the messages it missed', async () => {
    await withScreenshotsOnFailure('recover', async () => {
      const [carol, dave] = [uid('carol'), uid('dave')];
      const d = await signIn(dave, 'Dave');
      const c = await signIn(carol, 'Carol');
      const room = await startDirect(c.page, dave);
      await say(c.page, 'before the outage');
      await openRoom(d.page, room);

      // Carol's network goes away: the socket drops and reconnects fail.
      await c.page.evaluate(() => window.chatConsole.dropConnection());
      await c.context.setOffline(true);
      await c.page.getByTestId('reconnect-banner').waitFor({state: 'visible', timeout: WAIT});
      await eventually(() => memberOnline(d.page, carol), (v) => v === 'false', 'carol offline for dave');
      for (const text of ['missed 1', 'missed 2', 'missed 3']) await say(d.page, text);
      // Carol writes while offline: the library keeps the send (pending in
      // the UI) and sends it after the rejoin.
      await c.page.getByTestId('composer-input').fill('written offline');
      await c.page.getByTestId('composer-send').click();
      await c.page.locator('[data-testid=pending-message]', {hasText: 'written offline'}).waitFor({timeout: WAIT});
      await shot(c.page, '06-offline-banner');

      // Back online: the banner goes, the missed messages arrive once, in
      // order, and the offline send goes out once, after them.
      await c.context.setOffline(false);
      await c.page.getByTestId('reconnect-banner').waitFor({state: 'hidden', timeout: WAIT});
      const expected = ['before the outage', 'missed 1', 'missed 2', 'missed 3', 'written offline'];
      for (const page of [c.page, d.page]) {
        const list = await eventually(() => messages(page), (l) => l.length === expected.length, 'recovered messages');
        assertOrdered(list);
        assert.deepEqual(list.map((m) => m.text), expected);
      }
      await eventually(() => c.page.getByTestId('pending-message').count(), (n) => n === 0, 'nothing pending');
      await c.page.locator('[data-testid=activity] li[data-kind=recovered]', {hasText: 'Recovered 3 missed messages'}).waitFor();
      await eventually(() => memberOnline(d.page, carol), (v) => v === 'true', 'carol online again');
      // Carol read them after coming back: Dave sees the receipt.
      const receipt = d.page.locator('[data-testid=message][data-seq="4"]').getByTestId('read-receipt');
      await eventually(() => receipt.getAttribute('data-read-by'), (v) => v === carol, 'receipt after recovery');
      await shot(c.page, '07-recovered');

      // Longer than retention: what was missed is partly gone, so the room
      // is reloaded (recovered: false), and older history pages in.
      await c.page.evaluate(() => window.chatConsole.dropConnection());
      await c.context.setOffline(true);
      await c.page.getByTestId('reconnect-banner').waitFor({state: 'visible', timeout: WAIT});
      // (Same display name: each authentication refreshes the profile.)
      const token = await mintToken(dave, 'Dave');
      const total = RETENTION + 10;
      for (let i = 1; i <= total; i += 1) {
        const res = await fetch(`${BASE_URL}/api/v1/chat/rooms/${room}/messages`, {
          method: 'POST',
          headers: {Authorization: `Bearer ${token}`, 'Content-Type': 'application/json'},
          body: JSON.stringify({content: `burst ${i}`}),
        });
        assert.equal(res.status, 201);
      }
      await c.context.setOffline(false);
      await c.page.getByTestId('reconnect-banner').waitFor({state: 'hidden', timeout: WAIT});
      await c.page.locator('[data-testid=activity] li[data-kind=reloaded]').waitFor({timeout: WAIT});
      const newest = expected.length + total;
      const reloaded = await eventually(
        () => messages(c.page),
        (l) => l.length > 0 && l[l.length - 1].seq === newest,
        'the reloaded room ends with the newest message',
      );
      assertOrdered(reloaded);
      assert.equal(reloaded.length, 50, 'a reload shows the newest page');
      assert.equal(reloaded[reloaded.length - 1].text, `burst ${total}`);
      await shot(c.page, '08-reloaded-after-retention');

      // Scrolling back pages through history with beforeSequenceId, down
      // to the oldest message retention kept.
      await c.page.getByTestId('load-older').waitFor({state: 'visible'});
      await c.page.getByTestId('messages').evaluate((box) => {
        box.scrollTop = 0;
      });
      const paged = await eventually(() => messages(c.page), (l) => l.length === RETENTION, 'older pages loaded');
      assertOrdered(paged);
      assert.equal(paged[0].seq, newest - RETENTION + 1, 'the oldest kept message');
      await c.page.getByTestId('history-start').waitFor({state: 'visible'});
      await c.page.getByTestId('messages').evaluate((box) => {
        box.scrollTop = 0;
      });
      await shot(c.page, '09-history-start');
      await c.context.close();
      await d.context.close();
    });
  });

  test('a dev-token session whose token ran out renews it instead of signing out', async () => {
    await withScreenshotsOnFailure('renew', async () => {
      const frank = uid('frank');
      const f = await signIn(frank, 'Frank');
      // The tab's saved session, as after a day away: its token has expired.
      // (Its signature is never checked: the console must not send it.)
      const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
      const now = Math.floor(Date.now() / 1000);
      const expired = `${b64({alg: 'HS256', typ: 'JWT'})}.${b64({sub: frank, displayName: 'Frank', iat: now - 7200, exp: now - 60})}.x`;
      await f.page.evaluate(
        ([token, userId]) =>
          sessionStorage.setItem('chat-console-session', JSON.stringify({token, dev: {userId, displayName: 'Frank'}})),
        [expired, frank],
      );
      await f.page.reload();
      await f.page.locator('[data-testid=connection-status][data-state=online]').waitFor({timeout: WAIT});
      await f.page.locator('[data-testid=activity] li', {hasText: 'Renewed the session token'}).first().waitFor({timeout: WAIT});
      assert.equal(await f.page.getByTestId('me-name').textContent(), 'Frank');
      const saved = await f.page.evaluate(() => JSON.parse(sessionStorage.getItem('chat-console-session')));
      assert.notEqual(saved.token, expired, 'a fresh token is saved');
      const exp = JSON.parse(Buffer.from(saved.token.split('.')[1], 'base64url').toString()).exp;
      assert.ok(exp > now + 3600, 'the fresh token lives on');
      await f.context.close();
    });
  });

  test('the operator view needs an admin token and shows live counts', async () => {
    await withScreenshotsOnFailure('ops', async () => {
      // Some traffic to look at: a user in a group room.
      const erin = uid('erin');
      const e = await signIn(erin, 'Erin');
      await e.page.locator('#new-group-box > summary').click();
      await e.page.getByTestId('new-group-name').fill('ops watchers');
      await e.page.getByTestId('new-group-submit').click();
      await e.page.getByTestId('room-view').waitFor({state: 'visible'});
      const room = await e.page.locator('[data-testid=room-item].active').getAttribute('data-room-id');
      await say(e.page, 'is anyone watching?');

      const context = await newContext({width: 1180, height: 1000});
      const page = await context.newPage();
      await page.goto(`${BASE_URL}/console/ops`);

      // A non-admin token is refused.
      await page.getByTestId('ops-token').fill(await mintToken(uid('mallory')));
      await page.getByTestId('ops-signin-submit').click();
      await eventually(() => page.getByTestId('ops-error').textContent(), (t) => /admin/.test(t), 'refusal shown');

      await page.getByTestId('ops-mint').click();
      await eventually(
        () => page.getByTestId('ops-connections').textContent(),
        (t) => Number(t) >= 1,
        'connections counted',
      );
      await page.locator(`[data-testid=ops-room-row][data-room-id="${room}"]`).waitFor({timeout: WAIT});
      const row = await page.locator(`[data-testid=ops-room-row][data-room-id="${room}"]`).textContent();
      assert.match(row, /GROUP/);
      assert.match(row, /ops watchers/);
      assert.ok((await page.getByTestId('ops-gateway-row').count()) >= 1);
      // A few seconds of samples with traffic in them for the chart.
      for (let i = 0; i < 3; i += 1) {
        await say(e.page, `tick ${i}`);
        await page.waitForTimeout(700);
      }
      await eventually(() => page.getByTestId('ops-throughput').textContent(), (t) => t !== '–' && t !== 'n/a', 'throughput shown');
      await shot(page, '10-ops');
      await context.close();
      await e.context.close();
    });
  });
});
