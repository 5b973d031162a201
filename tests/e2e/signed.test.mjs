// End-to-end: signed links (SWITCHBOARD_AUTH_SECRET) in real chromium. The links
// that `switchboard link` prints open the call page, the page passes its token on
// to /ws, and the call connects across two replicas; a tampered link never gets a
// welcome. Neither token reaches the servers' debug logs.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { waitUntil } from './lib/browser.mjs';
import { SWITCHBOARD_BIN } from './lib/paths.mjs';
import { pairIDs, scenarioTest } from './lib/scenario.mjs';

const SECRET = 'e2e signed-link secret, 32 bytes or more';
const ENV = { SWITCHBOARD_AUTH_SECRET: SECRET, RUST_LOG: 'debug' };

/** Runs `switchboard link` for a pair on `inst`; returns the two links by user. */
function signedLinks(inst, user, peer) {
  const r = spawnSync(SWITCHBOARD_BIN, ['link', '--user', user, '--peer', peer, '--ttl', '10m', '--base-url', inst.baseUrl], {
    env: { ...process.env, SWITCHBOARD_AUTH_SECRET: SECRET },
    encoding: 'utf8',
  });
  assert.equal(r.status, 0, `switchboard link failed: ${r.stderr}`);
  const links = Object.fromEntries(r.stdout.trim().split('\n').map((line) => line.split(': ')));
  assert.deepEqual(Object.keys(links), [user, peer]);
  return links;
}

const tokenOf = (link) => new URL(link).searchParams.get('token');

/** Fails if any server log line holds one of `tokens`. */
function assertNotLogged(instances, tokens) {
  for (const inst of instances) {
    for (const line of inst.child.lines) {
      for (const token of tokens) assert.ok(!line.includes(token), `${inst.name} logged a token: ${line}`);
    }
  }
}

scenarioTest('signed links from `switchboard link` connect a call across replicas; pages pass their tokens on', async (sc) => {
  await sc.startRedis();
  const [one, two] = await Promise.all([sc.startInstance({ env: ENV }), sc.startInstance({ env: ENV })]);
  const [idA, idB] = pairIDs('signed');
  const forA = signedLinks(one, idA, idB)[idA];
  const forB = signedLinks(two, idA, idB)[idB];
  const a = await sc.participant('A');
  const b = await sc.participant('B');
  await a.page.goto(forA);
  await b.page.goto(forB);
  await Promise.all([a.waitForState('connected'), b.waitForState('connected')]);
  await Promise.all([a.waitForRemoteFrames(), b.waitForRemoteFrames()]);
  // Each page opened /ws with its own token, and once: no 401-and-retry churn.
  assert.equal(new URL(a.sockets[0].url()).searchParams.get('token'), tokenOf(forA));
  assert.equal(new URL(b.sockets[0].url()).searchParams.get('token'), tokenOf(forB));
  assert.equal(a.sockets.length, 1);
  assert.equal(b.sockets.length, 1);
  assert.ok(one.child.lines.some((l) => l.includes('session open')), 'debug lines are on');
  assertNotLogged([one, two], [tokenOf(forA), tokenOf(forB)]);
});

scenarioTest('a tampered signed link never gets a welcome', async (sc) => {
  const inst = await sc.startInstance({ env: ENV });
  const [idA, idB] = pairIDs('tampered');
  const good = signedLinks(inst, idA, idB)[idA];
  const token = tokenOf(good);
  const url = new URL(good);
  url.searchParams.set('token', `${token.slice(0, -4)}${token.endsWith('AAAA') ? 'BBBB' : 'AAAA'}`);
  const p = await sc.participant('A');
  await p.page.goto(url.toString());
  // The page tries /ws; the server answers 401 before the upgrade, so the socket closes unopened.
  await waitUntil(() => p.sockets.length >= 1 && p.sockets[0].isClosed(), 30000, () => 'the first /ws attempt did not end');
  assert.ok(!p.received.includes('welcome'), `no welcome on a tampered link (got: ${p.received.join(', ')})`);
  await waitUntil(() => inst.child.lines.some((l) => l.includes('signature is not valid')), 10000, () => 'no refusal in the log');
  assertNotLogged([inst], [token, url.searchParams.get('token')]);
});
