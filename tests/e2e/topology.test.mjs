// The production topology on loopback: a private redis-server, three
// switchboard replicas and Debian's nginx running deploy/nginx/nginx.conf (see
// lib/topology.mjs). Everything goes through the load balancer, as in
// docker-compose.yml.
import assert from 'node:assert/strict';
import { unwrapped } from './lib/browser.mjs';
import { pairIDs, scenarioTest } from './lib/scenario.mjs';
import {
  SocketPage, currentReplica, dashboardSeries, httpGet, replicaOf, sumOf, topology, until,
} from './lib/topology.mjs';

scenarioTest('through nginx, pairs land on different replicas and relay both ways', async (sc) => {
  const { replicas, lb } = await topology(sc);

  // The balancer serves the pages and probes, and keeps per-replica metrics private.
  const page = await httpGet(`${lb.baseUrl}/call?userID=a&peerID=b`);
  assert.equal(page.status, 200);
  assert.match(page.type, /text\/html/);
  assert.equal((await httpGet(`${lb.baseUrl}/healthz`)).status, 200);
  assert.equal((await httpGet(`${lb.baseUrl}/metrics`)).status, 404);

  const socks = await SocketPage.open(sc, lb.baseUrl);
  const wsUrl = (user, peer) => `ws://127.0.0.1:${lb.port}/ws?userID=${user}&peerID=${peer}`;
  const placed = new Map(); // user -> replica name

  /** Opens one socket through nginx and finds the replica that took it. */
  const open = async (user, peer) => {
    await socks.connect(user, wsUrl(user, peer));
    const welcome = await socks.waitForType(user, 'welcome');
    assert.equal(welcome.userID, user);
    const [r] = await until(() => replicaOf(replicas, user), () => `a replica logging session open for ${user}`);
    placed.set(user, r.name);
    return welcome;
  };

  // Three pairs, plus one lone user after each, so that every pair starts on a
  // balanced fleet: least_conn must then put the pair's second socket on
  // another replica than its first.
  const pairs = [];
  for (let i = 0; i < 3; i += 1) {
    const [a, b] = pairIDs(`t${i}`);
    const wa = await open(a, b);
    assert.equal(wa.peerOnline, false);
    const wb = await open(b, a);
    assert.equal(wb.peerOnline, true, 'the peer on another replica is seen as online (Redis presence)');
    await socks.waitForType(a, 'peer-joined');
    const [lone, nobody] = pairIDs(`lone${i}`);
    await open(lone, nobody);
    pairs.push([a, b]);
  }

  // Proof of placement from the replicas' own logs: every pair spans two
  // replicas, and the sockets are spread evenly (3 per replica).
  for (const [a, b] of pairs) {
    assert.notEqual(placed.get(a), placed.get(b), `${a} and ${b} share ${placed.get(a)}`);
  }
  const perReplica = Object.fromEntries(replicas.map((r) => [r.name, 0]));
  for (const name of placed.values()) perReplica[name] += 1;
  assert.deepEqual(Object.values(perReplica), [3, 3, 3], JSON.stringify(perReplica));

  // ...and from each replica's /metrics: its open-sockets gauge and its pair
  // subscriptions match the placement (a pair split over two replicas is
  // subscribed on both).
  const pairOf = new Map();
  for (const [a, b] of pairs) for (const u of [a, b]) pairOf.set(u, `${a}|${b}`);
  for (const r of replicas) {
    const m = await r.metrics();
    const mine = [...placed].filter(([, name]) => name === r.name).map(([u]) => u);
    assert.equal(sumOf(m, 'switchboard_open_sockets'), mine.length, `${r.name} open sockets`);
    assert.equal(sumOf(m, 'switchboard_sessions_opened_total'), mine.length, `${r.name} sessions opened`);
    const channels = new Set(mine.map((u) => pairOf.get(u) ?? u));
    assert.equal(sumOf(m, 'switchboard_pair_subscriptions'), channels.size, `${r.name} pair subscriptions`);
  }

  // Relay both ways, across replicas, byte for byte, never echoed.
  for (const [i, [a, b]] of pairs.entries()) {
    const offer = JSON.stringify({ type: 'offer', sdp: `v=0 pair ${i} from ${a}` });
    const answer = JSON.stringify({ type: 'answer', sdp: `v=0 pair ${i} from ${b}` });
    const cand = JSON.stringify({ type: 'candidate', candidate: { candidate: `candidate:${i} 1 udp 1 127.0.0.1 9 typ host`, sdpMid: '0' } });
    await socks.send(a, offer);
    await socks.waitFor(b, offer);
    await socks.send(b, answer);
    await socks.send(b, cand);
    await socks.waitFor(a, answer);
    await socks.waitFor(a, cand);
    const [ma, mb] = [await socks.messages(a), await socks.messages(b)];
    assert.ok(!ma.includes(offer) && !mb.includes(answer), 'no frame is echoed to its sender');
    assert.ok(ma.indexOf(answer) < ma.indexOf(cand), 'frames keep their order');
  }

  // /metrics counts what happened. Per pair: offer in on A's replica, out on
  // B's; answer + candidate the other way; one call setup (offer -> answer),
  // timed on B's replica; plus one invalid upgrade rejected through nginx.
  const bad = await httpGet(`${lb.baseUrl}/ws?userID=same&peerID=same`);
  assert.equal(bad.status, 400);
  const all = async () => (await Promise.all(replicas.map((r) => r.metrics()))).flat();
  let m = await all();
  assert.equal(sumOf(m, 'switchboard_messages_in_total'), 9, 'client frames received');
  assert.ok(sumOf(m, 'switchboard_messages_out_total') >= 9 + 3, 'relayed frames + peer-joined events');
  assert.ok(sumOf(m, 'switchboard_bytes_in_total') > 0 && sumOf(m, 'switchboard_bytes_out_total') > sumOf(m, 'switchboard_bytes_in_total'));
  assert.equal(sumOf(m, 'switchboard_call_setup_seconds_count'), 3, 'one call setup per pair');
  for (const [, b] of pairs) {
    const r = replicas.find((x) => x.name === placed.get(b));
    assert.ok(sumOf(await r.metrics(), 'switchboard_call_setup_seconds_count') >= 1, `call setup timed on ${b}'s replica`);
  }
  assert.ok(sumOf(m, 'switchboard_broker_publish_seconds_count') >= 9, 'every relayed frame was published to Redis');
  assert.equal(sumOf(m, 'switchboard_rejects_total', { reason: 'bad_param' }), 1, 'the bad upgrade was counted');
  assert.equal(sumOf(m, 'switchboard_sessions_replaced_total'), 0);

  // The balancer's own access log agrees (written when the sockets close).
  await socks.closeAll();
  await until(async () => sumOf(await all(), 'switchboard_open_sockets') === 0, 'every replica back to 0 open sockets');
  m = await all();
  assert.equal(sumOf(m, 'switchboard_sessions_closed_total', { reason: 'client_close' }), 9);
  assert.equal(sumOf(m, 'switchboard_pair_subscriptions'), 0);
  // Every series the Grafana dashboard queries is exposed by the replicas,
  // except counters that appear only once they count something that did not
  // happen here (no session was replaced, Redis never dropped).
  const exposed = new Set(m.map((x) => x.name.replace(/_(bucket|sum|count)$/, '')));
  const notHere = new Set(['switchboard_sessions_replaced_total', 'switchboard_broker_reconnects_total']);
  const missing = [...dashboardSeries()].filter((n) => !exposed.has(n) && !notHere.has(n));
  assert.deepEqual(missing, [], 'dashboard series missing from /metrics');

  const byAddr = Object.fromEntries(replicas.map((r) => [r.addr, r.name]));
  const upstreamOf = (user) => {
    const line = lb.accessLines().find((l) => l.includes(`/ws?userID=${user}&`) && / 101 /.test(l));
    return line && byAddr[/upstream=(\S+)/.exec(line)[1]];
  };
  for (const user of placed.keys()) {
    const fromNginx = await until(() => upstreamOf(user), () => `nginx access log line for ${user}\n${lb.accessLines().join('\n')}`);
    assert.equal(fromNginx, placed.get(user), `nginx and the replica logs agree on ${user}`);
  }
});

const DRAIN_SECS = 2;

scenarioTest('the call page through nginx: restarting each replica in turn keeps the call up', async (sc, t) => {
  const { replicas, lb } = await topology(sc, { SWITCHBOARD_DRAIN_SECS: String(DRAIN_SECS) });
  const [idA, idB] = pairIDs('roll');
  const a = await sc.participant('A');
  const b = await sc.participant('B');

  // Every text frame each page receives, with its time (signaling proof and timing).
  const frames = new Map([[a, []], [b, []]]);
  const closes = new Map([[a, []], [b, []]]);
  for (const p of [a, b]) {
    p.page.on('websocket', (ws) => {
      ws.on('framereceived', (f) => {
        if (typeof f.payload === 'string') frames.get(p).push({ at: Date.now(), text: unwrapped(f.payload).text });
      });
      ws.on('close', () => closes.get(p).push(Date.now()));
    });
  }
  const welcomes = (p) => frames.get(p).filter((f) => f.text.startsWith('{"type":"welcome"'));

  await a.join(lb, idA, idB);
  await b.join(lb, idB, idA);
  await Promise.all([a.waitForState('connected'), b.waitForState('connected')]);
  await Promise.all([a.waitForRemoteFrames(), b.waitForRemoteFrames()]);
  const [logA0, logB0] = [await a.stateLog(), await b.stateLog()];
  // Watch each page's RTCPeerConnection: the media path, apart from signaling.
  const streams0 = [await a.remoteStreamId(), await b.remoteStreamId()];
  for (const p of [a, b]) {
    await p.page.evaluate(() => {
      const pc = window.switchboardCall._pc;
      window.__pcWatched = pc;
      window.__pcLog = [pc.connectionState];
      pc.addEventListener('connectionstatechange', () => window.__pcLog.push(pc.connectionState));
    });
  }
  const pcReport = (p) =>
    p.page.evaluate(() => ({ same: window.switchboardCall._pc === window.__pcWatched, log: window.__pcLog }));

  /** A frame sent on each page's live signaling socket reaches the other page. */
  const probe = async (n) => {
    for (const [from, to] of [[a, b], [b, a]]) {
      const text = JSON.stringify({ type: 'x-probe', n, from: from.label });
      await until(() => from.page.evaluate((t) => window.switchboardCall._send(JSON.parse(t)), text), `${from.label} able to send`, 20000, 100);
      await until(() => frames.get(to).some((f) => f.text === text), `${to.label} receiving probe ${n}`, 20000);
    }
  };
  await probe(0);

  const measured = [];
  for (const r of replicas) {
    const holders = [idA, idB].filter((u) => currentReplica(replicas, u) === r);
    const before = new Map([[a, welcomes(a).length], [b, welcomes(b).length]]);
    const closedBefore = new Map([[a, closes.get(a).length], [b, closes.get(b).length]]);
    const t0 = Date.now();
    r.proc.proc.kill('SIGTERM');
    // /readyz turns 503 at once while the replica keeps serving.
    const { ms: readyzMs } = await until(
      async () => (await httpGet(`${r.baseUrl}/readyz`).catch(() => ({}))).status === 503 && { ms: Date.now() - t0 },
      `${r.name} /readyz 503 after SIGTERM`,
      5000,
      20,
    );
    assert.equal((await httpGet(`${r.baseUrl}/healthz`)).status, 200, `${r.name} still serves while draining`);
    const exit = await r.proc.exited;
    const exitMs = Date.now() - t0;
    assert.equal(exit.code, 0, `${r.name} exits 0 on SIGTERM\n${r.proc.tail()}`);
    assert.ok(exitMs >= DRAIN_SECS * 1000, `${r.name} served on for the drain (${exitMs} ms)`);

    // Every page whose socket was on r: closed with 1012, then a welcome from
    // another replica. Signaling was unavailable from that close to that welcome.
    const gaps = {};
    for (const p of [a, b]) {
      const user = p === a ? idA : idB;
      if (!holders.includes(user)) continue;
      const closedAt = await until(() => closes.get(p)[closedBefore.get(p)], `${p.label}'s socket closing`, 10000);
      const w = await until(() => welcomes(p)[before.get(p)], `${p.label} reconnected`, 30000);
      // The replica's own `session closed` (reason drain) for this user: from
      // then on it relayed nothing for the page.
      const closedLog = r.sessionLog('session closed').filter((x) => x.user === user).at(-1);
      assert.equal(closedLog?.fields.reason, 'drain', `${user}'s session on ${r.name} ended by the drain`);
      const serverClosedAt = Date.parse(closedLog.at);
      gaps[p.label] = {
        serverClosedAfterSigtermMs: serverClosedAt - t0,
        browserSawCloseAfterMs: closedAt - serverClosedAt,
        unavailableMs: w.at - serverClosedAt,
      };
      assert.ok(p.console.some((l) => l.includes('websocket closed 1012')), `${p.label} saw close 1012`);
      // The replica logs `session open` just after it sends the welcome: wait for it.
      const now = await until(() => {
        const holder = currentReplica(replicas, user);
        return holder && holder !== r ? holder : undefined;
      }, `${user} to show up on another replica`, 10000);
      assert.ok(now && now !== r, `${user} moved to another replica`);
    }
    await r.start(); // same port: nginx's upstream comes back
    await probe(r.runs);
    for (const p of [a, b]) assert.equal((await p.status()).state, 'connected', `${p.label} connected after restarting ${r.name}`);
    measured.push({ replica: r.name, readyz503Ms: readyzMs, exitMs, moved: gaps });
  }

  // What each restart cost: SIGTERM -> /readyz 503, SIGTERM -> exit, and per
  // page whose socket was on the replica: SIGTERM -> the replica closing its
  // session (1012), how much later the browser saw the close, and the
  // signaling gap: replica's close -> welcome from another replica.
  t.diagnostic(`rolling restart: ${JSON.stringify(measured)}`);
  console.log(`rolling restart through nginx: ${JSON.stringify(measured)}`);
  // Every replica was restarted, so each user's socket moved at least once;
  // none moving would mean the replicas' logs no longer name the user.
  const movedPages = new Set(measured.flatMap((m) => Object.keys(m.moved)));
  assert.deepEqual([...movedPages].sort(), [a.label, b.label].sort(), 'each page moved off a restarted replica');

  // Media: the same RTCPeerConnection stayed `connected` the whole time, and
  // each side still shows the same remote stream with advancing frames.
  for (const p of [a, b]) {
    const pc = await pcReport(p);
    assert.ok(pc.same, `${p.label} kept its RTCPeerConnection`);
    assert.deepEqual(pc.log, ['connected'], `${p.label} peer connection states: ${pc.log.join(' -> ')}`);
  }
  await Promise.all([a.waitForRemoteFrames(), b.waitForRemoteFrames()]);
  assert.deepEqual([await a.remoteStreamId(), await b.remoteStreamId()], streams0, 'same remote streams');

  // The call page never left `connected`: no state after the first connect is anything else.
  for (const [p, log0] of [[a, logA0], [b, logB0]]) {
    const log = await p.stateLog();
    assert.equal(log0.at(-1), 'connected');
    assert.deepEqual(log.slice(log0.length - 1), ['connected'], `${p.label} page states: ${log.join(' -> ')}`);
  }
});
