// End-to-end: real redis-server, real switchboard instances, real chromium
// with fake camera/microphone. Run with `npm test` in tests/e2e.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ARTIFACTS_DIR, REPO_ROOT } from './lib/paths.mjs';
import { MIN_GREEN_FRACTION } from './lib/browser.mjs';
import { pairIDs, scenarioTest } from './lib/scenario.mjs';
import { connectedCall, expectCall, twoInstances } from './lib/calls.mjs';

scenarioTest('A via instance 1 and B via instance 2 connect with video both ways', async (sc) => {
  const { a, b } = await connectedCall(sc, 'x');
  // Each page opened exactly one signaling socket: no reconnect churn.
  assert.equal(a.sockets.length, 1);
  assert.equal(b.sockets.length, 1);

  // The screenshot of a connected call in docs/client.md, taken by this test once both
  // remote videos show the peer's camera. It goes to artifacts/call.png (gitignored);
  // UPDATE_DOCS_SCREENSHOT=1 writes docs/img/call.png instead, to refresh the docs.
  const shot = process.env.UPDATE_DOCS_SCREENSHOT === '1'
    ? path.join(REPO_ROOT, 'docs', 'img', 'call.png')
    : path.join(ARTIFACTS_DIR, 'call.png');
  fs.mkdirSync(path.dirname(shot), { recursive: true });
  const green = await a.screenshotRemoteGreen(shot);
  assert.ok(green >= MIN_GREEN_FRACTION, `the screenshot shows B's camera in A's remote video (${(green * 100).toFixed(0)}% green)`);
});

scenarioTest('A waits alone for several seconds, then B joins and the call connects', async (sc) => {
  const [one, two] = await twoInstances(sc);
  const [idA, idB] = pairIDs('w');
  const a = await sc.participant('A');
  await a.join(one, idA, idB);
  await a.waitForState('waiting');
  // The scenario itself: A stays alone for a while (the only fixed wait in this suite).
  await new Promise((resolve) => setTimeout(resolve, 5000));
  assert.equal((await a.status()).state, 'waiting', 'A still waits for B');
  assert.equal(a.sockets.length, 1, 'A kept its one signaling socket while waiting');

  const b = await sc.participant('B');
  await b.join(two, idB, idA);
  await expectCall(a, b);
});

scenarioTest('both pages load at the same moment (glare) and the call connects', async (sc) => {
  const [one, two] = await twoInstances(sc);
  // Several rounds on fresh pages, so that both orders of arrival get a chance.
  for (let round = 1; round <= 3; round += 1) {
    const [idA, idB] = pairIDs(`g${round}`);
    const a = await sc.participant(`A${round}`);
    const b = await sc.participant(`B${round}`);
    await Promise.all([a.join(one, idA, idB), b.join(two, idB, idA)]);
    await expectCall(a, b);
    await Promise.all([a.page.close(), b.page.close()]);
  }
});

scenarioTest('B reloads its page mid-call and the call is re-established', async (sc) => {
  const { a, b } = await connectedCall(sc, 'r');
  const before = await a.remoteStreamId();

  await b.page.reload();
  await b.waitForState('connected');
  const fb = await b.waitForRemoteFrames();
  assert.ok(fb.width > 0);
  // A shows B's new camera stream (a new MediaStream), with frames flowing.
  await a.page.waitForFunction(
    (old) => {
      const v = document.getElementById('remote_video');
      return v.srcObject && v.srcObject.id !== old;
    },
    before,
    { timeout: 45000, polling: 100 },
  );
  await a.waitForState('connected');
  await a.waitForRemoteFrames();
  assert.equal(a.sockets.length, 1, 'A kept its signaling socket through B’s reload');
});

scenarioTest('A hangs up: B shows ended, both release camera and microphone, neither reconnects; Rejoin calls again', async (sc) => {
  const { a, b } = await connectedCall(sc, 'h');
  assert.equal(a.sockets.length, 1);
  assert.equal(b.sockets.length, 1);

  await a.page.click('#hangup');
  await Promise.all([a.waitForState('ended'), b.waitForState('ended')]);
  assert.ok(b.received.includes('bye'), 'B received A’s bye through the relay');
  // Both signaling sockets close...
  await Promise.all(
    [...a.sockets, ...b.sockets].map((ws) => (ws.isClosed() ? null : ws.waitForEvent('close', { timeout: 15000 }))),
  );
  // ...and stay closed. Absence can only be shown over a window: this one is
  // six times the client's longest first reconnect delay (0.5 s).
  await new Promise((resolve) => setTimeout(resolve, 3000));
  assert.equal(a.sockets.length, 1, 'A opened no new signaling socket after hanging up');
  assert.equal(b.sockets.length, 1, 'B opened no new signaling socket after the hang-up');
  assert.equal((await a.status()).state, 'ended');
  assert.equal((await b.status()).state, 'ended');
  assert.equal(await b.remoteStreamId(), null, 'B no longer shows A’s video');

  // Both pages let go of camera and microphone (own hang-up and the peer's), and say so.
  for (const p of [a, b]) {
    const tracks = await p.localTracks();
    assert.equal(tracks.length, 2, `${p.label} had a camera and a microphone track`);
    assert.deepEqual(tracks.filter((t) => !t.endsWith(':ended')), [], `${p.label}'s local tracks all ended: ${tracks}`);
    for (const id of ['#hangup', '#mute', '#camera']) assert.ok(await p.page.isDisabled(id), `${p.label}: ${id} disabled`);
    assert.ok(await p.visible('#rejoin'), `${p.label} offers Rejoin`);
    assert.equal((await p.page.textContent('#remote_placeholder')).trim(), 'The call has ended.');
  }
  assert.equal((await a.status()).text, 'You hung up.');
  assert.match((await b.status()).text, /hung up\.$/);

  // Rejoin asks for camera and microphone again and calls again.
  await Promise.all([a.page.click('#rejoin'), b.page.click('#rejoin')]);
  await expectCall(a, b);
  for (const p of [a, b]) {
    const tracks = await p.localTracks();
    assert.deepEqual(tracks.sort(), ['audio:live', 'video:live'], `${p.label} has live tracks again`);
  }
});

scenarioTest('single instance with the in-memory broker: the call connects', async (sc) => {
  const inst = await sc.startInstance(); // no Redis: SWITCHBOARD_REDIS_URL unset
  await connectedCall(sc, 'm', { instances: [inst, inst] });
});

scenarioTest('B’s instance drains and restarts mid-call: B reconnects and the call carries on', async (sc) => {
  await sc.startRedis();
  // Instance 2 drains for 1 s on SIGTERM, then closes its sockets with 1012.
  const instances = await Promise.all([sc.startInstance(), sc.startInstance({ env: { SWITCHBOARD_DRAIN_SECS: '1' } })]);
  const { two, a, b } = await connectedCall(sc, 's', { instances });
  const streamSeenByA = await a.remoteStreamId();

  // SIGTERM: instance 2 drains, closes B's socket (1012) and exits; A hears no peer-left.
  const [first] = b.sockets;
  const closed = first.isClosed() ? null : first.waitForEvent('close', { timeout: 15000 });
  await sc.restartInstance(two);
  await closed;
  // B reconnects to the new instance on the same address, by itself.
  // (Attempts made while no instance listens on the address fail and back off.)
  await b.waitForReceived('welcome', 2);
  assert.ok(b.sockets.length >= 2, 'B opened a new signaling socket');
  assert.equal((await b.status()).state, 'connected', 'B stayed in the call while its socket was away');
  await expectCall(a, b);
  // Media went peer to peer all along: the same connection carries on.
  assert.equal(await a.remoteStreamId(), streamSeenByA);
  // A drain is not B leaving: A's page never left `connected` once it got there.
  const log = await a.stateLog();
  const since = log.slice(log.indexOf('connected'));
  assert.ok(since.every((state) => state === 'connected'), `A stayed connected (${log.join(' -> ')})`);
});

scenarioTest('the landing page makes both call links, and they open the call page', async (sc) => {
  const inst = await sc.startInstance();
  const p = await sc.participant('home');
  await p.page.goto(new URL('/?token=t0k', inst.baseUrl).toString());
  await p.page.fill('#name_a', 'ann');
  await p.page.fill('#name_b', 'ann');
  await p.page.waitForSelector('#names_error:not([hidden])');
  await p.page.click('#generate');
  await p.page.waitForSelector('#links:not([hidden])');
  const [a, b] = await Promise.all([p.page.inputValue('#name_a'), p.page.inputValue('#name_b')]);
  const [la, lb] = await Promise.all([p.page.inputValue('#link_a'), p.page.inputValue('#link_b')]);
  const ua = new URL(la);
  const ub = new URL(lb);
  assert.equal(ua.pathname, '/call');
  assert.deepEqual([ua.searchParams.get('userID'), ua.searchParams.get('peerID')], [a, b]);
  assert.deepEqual([ub.searchParams.get('userID'), ub.searchParams.get('peerID')], [b, a]);
  assert.equal(ua.searchParams.get('token'), 't0k', 'a token on the landing page is kept in the links');
  await p.page.goto(la);
  await p.waitForState('waiting');
  assert.match(p.sockets[0].url(), /[?&]token=t0k(&|$)/, 'the call page passes the token on to /ws');
  assert.ok(!(await p.visible('#invite')), 'no invite with a signed link: the page cannot make the peer’s token');
});

scenarioTest('B has no camera or microphone: B reads why, joins anyway and receives A', async (sc) => {
  const [one, two] = await twoInstances(sc);
  const [idA, idB] = pairIDs('n');
  const a = await sc.participant('A');
  const b = await sc.participant('B', { devices: false });
  await a.join(one, idA, idB);
  await b.join(two, idB, idA);
  await b.page.waitForSelector('#media_warning:not([hidden])');
  const notice = await b.page.textContent('#media_warning');
  assert.match(notice, /no camera was found/i);
  assert.match(notice, /connect a camera or microphone, then press Rejoin\./, 'the notice says how to fix it');
  assert.ok(await b.visible('#rejoin'), 'B can Rejoin once a camera is connected');
  assert.ok(await b.page.isDisabled('#mute') && await b.page.isDisabled('#camera'), 'nothing to mute or turn off');
  await Promise.all([a.waitForState('connected'), b.waitForState('connected')]);
  const frames = await b.waitForRemoteFrames();
  assert.ok(frames.width > 0, 'B sees A');
  // B sends nothing, and its media-state says so: A's remote tile shows both.
  await a.waitForVisible('#peer_camera_off');
  await a.waitForVisible('#peer_muted');
});
