// End-to-end: what people see on the call page and the landing page (issue 15,
// "the first hour"): a second tab taking the call over, the invite link, the
// peer's muted / camera-off state, a server that goes away mid-call, phone
// screens, and blocked or invalid media and links.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { ARTIFACTS_DIR } from './lib/paths.mjs';
import { connectedCall, expectCall } from './lib/calls.mjs';
import { pairIDs, scenarioTest } from './lib/scenario.mjs';

/** Fails unless every local track of `p` has ended (camera and microphone released). */
async function assertReleased(p) {
  const tracks = await p.localTracks();
  assert.equal(tracks.length, 2, `${p.label} had a camera and a microphone track`);
  assert.deepEqual(tracks.filter((t) => !t.endsWith(':ended')), [], `${p.label}'s local tracks all ended: ${tracks}`);
}

/** Waits until `p`'s call has finished for `cause` (`hangup`, `bye`, `replaced`). */
async function waitFinished(p, cause) {
  await p.page.waitForFunction((c) => window.switchboardCall?.finishCause === c, cause, { timeout: 45000, polling: 100 });
}

function artifact(name) {
  fs.mkdirSync(ARTIFACTS_DIR, { recursive: true });
  return path.join(ARTIFACTS_DIR, name);
}

scenarioTest('a second tab takes the call (4001): the first stops with dead controls and no camera, and can take the call back', async (sc) => {
  const inst = await sc.startInstance();
  const { a, b, idA, idB } = await connectedCall(sc, 'tab', { instances: [inst, inst] });

  const a2 = await sc.participant('A2');
  await a2.join(inst, idA, idB);
  await waitFinished(a, 'replaced');
  assert.equal((await a.status()).state, 'failed');
  await a.page.screenshot({ path: artifact('call-4001.png') });
  await assertReleased(a);
  for (const id of ['#hangup', '#mute', '#camera']) assert.ok(await a.page.isDisabled(id), `${id} is disabled after 4001`);
  assert.ok(await a.visible('#take_back'), '"Use this tab instead" is offered');
  assert.equal((await a.page.textContent('#take_back')).trim(), 'Use this tab instead');
  assert.ok(!(await a.visible('#rejoin')), 'no Rejoin: the call goes on elsewhere');
  assert.match(await a.page.textContent('#remote_placeholder'), /another tab/);
  assert.equal(a.sockets.length, 1, 'the replaced tab does not reconnect');
  await expectCall(a2, b);

  // The first tab takes the call back; now the second one is replaced.
  await a.page.click('#take_back');
  await waitFinished(a2, 'replaced');
  await assertReleased(a2);
  assert.ok(await a2.visible('#take_back'));
  await expectCall(a, b);
  assert.deepEqual((await a.localTracks()).sort(), ['audio:live', 'video:live'], 'the tab that took the call back has a live camera again');
});

scenarioTest('waiting alone, A copies the link for B from the call page; B opens it and the call connects', async (sc) => {
  const inst = await sc.startInstance();
  const [idA, idB] = pairIDs('invite');
  const a = await sc.participant('A');
  await a.page.context().grantPermissions(['clipboard-read', 'clipboard-write'], { origin: inst.baseUrl });
  await a.join(inst, idA, idB);
  await a.waitForState('waiting');
  await a.waitForVisible('#copy_invite');
  assert.equal((await a.page.textContent('#copy_invite')).trim(), `Copy link for ${idB}`);
  assert.equal((await a.page.textContent('#remote_placeholder')).trim(), `Waiting for ${idB} to join.`);
  await a.page.click('#copy_invite');
  const copied = await a.page.evaluate(() => navigator.clipboard.readText());
  const url = new URL(copied);
  assert.equal(url.origin, new URL(inst.baseUrl).origin);
  assert.equal(url.pathname, '/call');
  assert.deepEqual([url.searchParams.get('userID'), url.searchParams.get('peerID')], [idB, idA], 'the mirror link');

  const b = await sc.participant('B');
  await b.page.goto(copied);
  await expectCall(a, b);
  assert.ok(!(await a.visible('#invite')), 'the invite goes once B is there');
});

scenarioTest('A mutes and turns the camera off: B’s remote tile says so (also after B reloads), and stops saying so', async (sc) => {
  const { a, b } = await connectedCall(sc, 'media');
  assert.ok(!(await b.visible('#peer_muted')) && !(await b.visible('#peer_camera_off')), 'nothing shown while all is on');

  await a.page.click('#mute');
  await b.waitForVisible('#peer_muted');
  assert.equal((await b.page.textContent('#peer_muted')).trim(), 'muted');
  assert.ok(!(await b.visible('#peer_camera_off')));
  await a.page.click('#camera');
  await b.waitForVisible('#peer_camera_off');
  assert.equal((await b.page.textContent('#peer_camera_off')).trim(), 'camera off');
  assert.ok(b.received.includes('media-state'), 'the state came as a relayed media-state frame');

  // A page that arrives later learns the state too.
  await b.page.reload();
  await b.waitForState('connected');
  await Promise.all([b.waitForVisible('#peer_muted'), b.waitForVisible('#peer_camera_off')]);

  await a.page.click('#camera');
  await b.waitForHidden('#peer_camera_off');
  await a.page.click('#mute');
  await b.waitForHidden('#peer_muted');
});

scenarioTest('the server goes away mid-call: both show a reconnecting hint; A hangs up meanwhile, and B is told once the server is back', async (sc) => {
  const inst = await sc.startInstance();
  const { a, b, idA } = await connectedCall(sc, 'away', { instances: [inst, inst] });
  assert.ok(!(await a.visible('#signal_hint')) && !(await b.visible('#signal_hint')));

  await inst.stop(); // closes both sockets (1001) and exits; media goes on peer to peer
  await Promise.all([a.waitForVisible('#signal_hint'), b.waitForVisible('#signal_hint')]);
  assert.equal((await a.page.textContent('#signal_hint')).trim(), 'Reconnecting to the server…');
  assert.equal((await a.status()).state, 'connected', 'A is still in the call');

  await a.page.click('#hangup');
  await waitFinished(a, 'hangup');
  await assertReleased(a);
  assert.match((await a.status()).text, /will be told once the connection to the server is back/);
  assert.ok(!(await a.visible('#signal_hint')), 'no hint once the call is over');

  await sc.restartInstance(inst);
  await waitFinished(b, 'bye');
  assert.equal((await b.status()).text, `${idA} hung up.`);
  await assertReleased(b);
  await a.page.waitForFunction(() => document.getElementById('status').textContent === 'You hung up.', null, { timeout: 15000 });
  assert.equal(await a.page.evaluate(() => window.switchboardCall.byePending), false);
});

scenarioTest('on a 390×844 phone screen each landing-page link gets its own line, 200 px or wider; the call page fits the dynamic viewport', async (sc) => {
  const inst = await sc.startInstance();
  const p = await sc.participant('phone');
  await p.page.setViewportSize({ width: 390, height: 844 });
  await p.page.goto(new URL('/', inst.baseUrl).toString());
  await p.page.click('#generate');
  await p.page.waitForSelector('#links:not([hidden])');
  const png = await p.page.screenshot({ path: artifact('landing-390.png'), fullPage: true });
  // The PNG's IHDR width: the page does not overflow sideways.
  assert.equal(png.readUInt32BE(16), 390, 'the full-page screenshot is 390 px wide');
  const rows = await p.page.evaluate(() =>
    ['a', 'b'].map((x) => {
      const box = (el) => el.getBoundingClientRect().toJSON();
      const row = document.getElementById(`link_${x}`).closest('.link-row');
      return { input: box(row.querySelector('input')), copy: box(row.querySelector('button.copy')), open: box(row.querySelector('a')) };
    }));
  for (const [i, { input, copy, open }] of rows.entries()) {
    assert.ok(input.width >= 200, `link field ${i + 1} is ${input.width} px wide`);
    assert.ok(input.right <= 390, `link field ${i + 1} fits the screen`);
    assert.ok(copy.top >= input.bottom && open.top >= input.bottom, `Copy and Open of row ${i + 1} are under the link`);
  }

  await p.page.goto(new URL('/call?userID=phone-a&peerID=phone-b', inst.baseUrl).toString());
  await p.waitForState('waiting');
  const height = await p.page.evaluate(() => {
    const rule = [...document.styleSheets].flatMap((s) => [...s.cssRules]).find((r) => r.selectorText === '.call-page');
    return { declared: rule?.style.height, page: document.body.getBoundingClientRect().height, viewport: window.innerHeight };
  });
  assert.equal(height.declared, '100dvh', 'the call page is as tall as the dynamic viewport');
  assert.equal(height.page, height.viewport);
});

scenarioTest('an invalid call link links back to the home page', async (sc) => {
  const inst = await sc.startInstance();
  const p = await sc.participant('bad-link');
  await p.page.goto(new URL('/call?userID=same&peerID=same', inst.baseUrl).toString());
  await p.waitForState('failed');
  const link = await p.page.waitForSelector('#status a');
  assert.equal(await link.getAttribute('href'), '/');
  assert.equal((await link.textContent()).trim(), 'Start again from the home page');
  assert.ok(await p.page.isDisabled('#hangup'));
  await link.click();
  await p.page.waitForSelector('#generate');
  assert.equal(new URL(p.page.url()).pathname, '/');
  assert.equal(p.sockets.length, 0, 'no signaling for an invalid link');
});

scenarioTest('camera and microphone blocked for the site: the notice says how to allow them, and Rejoin is offered', async (sc) => {
  const inst = await sc.startInstance();
  const [idA, idB] = pairIDs('deny');
  const p = await sc.participant('B', { denied: true });
  await p.join(inst, idB, idA);
  await p.waitForVisible('#media_warning');
  const notice = await p.page.textContent('#media_warning');
  assert.match(notice, /access to the (microphone|camera) was denied/i);
  assert.match(notice, /allow the camera and microphone for this site in the browser's site settings/);
  assert.match(notice, /then press Rejoin\./);
  assert.ok(await p.visible('#rejoin'), 'Rejoin is offered for after the fix');
  await p.waitForState('waiting'); // joins anyway, to see and hear the other side
});
