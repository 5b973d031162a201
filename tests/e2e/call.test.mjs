// End-to-end: real redis-server, real switchboard instances, real chromium
// with fake camera/microphone. Run with `npm test` in tests/e2e.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT } from './lib/paths.mjs';
import { pairIDs, scenarioTest } from './lib/scenario.mjs';

/** Waits until both sides are `connected` and each remote video shows advancing frames. */
async function expectCall(a, b) {
  await Promise.all([a.waitForState('connected'), b.waitForState('connected')]);
  const [fa, fb] = await Promise.all([a.waitForRemoteFrames(), b.waitForRemoteFrames()]);
  assert.ok(fa.width > 0 && fb.width > 0, 'both remote videos have a size');
  return [fa, fb];
}

/** One Redis, two switchboard instances. */
async function twoInstances(sc) {
  await sc.startRedis();
  return Promise.all([sc.startInstance(), sc.startInstance()]);
}

scenarioTest('A via instance 1 and B via instance 2 connect with video both ways', async (sc) => {
  const [one, two] = await twoInstances(sc);
  const [idA, idB] = pairIDs('x');
  const a = await sc.participant('A');
  const b = await sc.participant('B');
  await a.join(one, idA, idB);
  await b.join(two, idB, idA);
  await expectCall(a, b);
  // Each page opened exactly one signaling socket: no reconnect churn.
  assert.equal(a.sockets.length, 1);
  assert.equal(b.sockets.length, 1);

  // The README screenshot: a connected call, taken by this test.
  const shot = path.join(REPO_ROOT, 'docs', 'img', 'call.png');
  fs.mkdirSync(path.dirname(shot), { recursive: true });
  await a.page.screenshot({ path: shot });
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
  const [one, two] = await twoInstances(sc);
  const [idA, idB] = pairIDs('r');
  const a = await sc.participant('A');
  const b = await sc.participant('B');
  await a.join(one, idA, idB);
  await b.join(two, idB, idA);
  await expectCall(a, b);
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

scenarioTest('A hangs up: B shows ended and neither side reconnects', async (sc) => {
  const [one, two] = await twoInstances(sc);
  const [idA, idB] = pairIDs('h');
  const a = await sc.participant('A');
  const b = await sc.participant('B');
  await a.join(one, idA, idB);
  await b.join(two, idB, idA);
  await expectCall(a, b);
  assert.equal(a.sockets.length, 1);
  assert.equal(b.sockets.length, 1);

  await a.page.click('#hangup');
  await Promise.all([a.waitForState('ended'), b.waitForState('ended')]);
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
});

scenarioTest('single instance with the in-memory broker: the call connects', async (sc) => {
  const inst = await sc.startInstance(); // no Redis: SWITCHBOARD_REDIS_URL unset
  const [idA, idB] = pairIDs('m');
  const a = await sc.participant('A');
  const b = await sc.participant('B');
  await a.join(inst, idA, idB);
  await b.join(inst, idB, idA);
  await expectCall(a, b);
});
