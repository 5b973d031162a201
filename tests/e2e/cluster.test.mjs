// End-to-end on a Redis Cluster: a private 3+3 cluster on loopback (lib/cluster.mjs),
// two switchboard replicas in cluster mode, two chromium pages. A real call
// through both replicas; then the same call while the master that owns the
// pair's slot is SIGKILLed: media keeps flowing, both pages hear `resync`,
// renegotiate over the promoted replica, and signaling works on.
import assert from 'node:assert/strict';
import { unwrapped } from './lib/browser.mjs';
import { expectCall } from './lib/calls.mjs';
import { pairChannel } from './lib/cluster.mjs';
import { pairIDs, scenarioTest } from './lib/scenario.mjs';
import { httpGet, until } from './lib/topology.mjs';

/**
 * A cluster, two replicas on it, A on the first and B on the second, the call up
 * with video both ways. Every text frame each page receives is kept with its time.
 */
async function clusterCall(sc, tag, env = {}) {
  const cluster = await sc.startRedisCluster();
  // One after the other: an instance's name is its number.
  const one = await sc.startInstance({ env });
  const two = await sc.startInstance({ env });
  for (const inst of [one, two]) {
    await until(async () => (await httpGet(`${inst.baseUrl}/readyz`).catch(() => ({}))).status === 200, `${inst.name} ready`, 30000);
  }
  const [idA, idB] = pairIDs(tag);
  const { channel, slot } = pairChannel(idA, idB);
  assert.equal(await cluster.keyslot(channel), slot, `the cluster puts ${channel} in slot ${slot} too`);
  const master = await cluster.masterOf(slot);

  const a = await sc.participant('A');
  const b = await sc.participant('B');
  const frames = new Map([[a, []], [b, []]]);
  for (const p of [a, b]) {
    p.page.on('websocket', (ws) => {
      ws.on('framereceived', ({ payload }) => {
        if (typeof payload !== 'string') return;
        frames.get(p).push({ at: Date.now(), ...unwrapped(payload) });
      });
    });
  }
  await a.join(one, idA, idB);
  await b.join(two, idB, idA);
  await expectCall(a, b);
  // The call went through the cluster: each replica holds one sharded
  // subscription to the pair's channel, on the master that owns its slot.
  await until(async () => (await cluster.shardNumsub(master, channel)) === 2,
    () => `2 subscribers of ${channel} on its master :${master}`, 10000);
  return { cluster, one, two, a, b, idA, idB, channel, slot, master, frames };
}

scenarioTest('Redis Cluster: A via replica 1 and B via replica 2 connect with video both ways', async (sc) => {
  const { a, b } = await clusterCall(sc, 'c');
  assert.equal(a.sockets.length, 1);
  assert.equal(b.sockets.length, 1);
  assert.ok(!a.received.includes('resync') && !b.received.includes('resync'), 'no resync on a healthy cluster');
});

/**
 * Samples, every 100 ms, what the page shows and receives: frames the remote video presented
 * (requestVideoFrameCallback) and its decoded-frame count, and the inbound RTP bytes of the
 * page's connection (summed over every inbound-rtp report it has had, since a report can be
 * reset: its counters start again from zero).
 */
const START_SAMPLER = () => {
  const pc = window.switchboardCall._pc;
  const v = document.getElementById('remote_video');
  window.__pcWatched = pc;
  window.__pcLog = [pc.connectionState];
  pc.addEventListener('connectionstatechange', () => window.__pcLog.push(pc.connectionState));
  let presented = 0;
  const tick = () => {
    presented += 1;
    window.__rvfc = v.requestVideoFrameCallback(tick);
  };
  window.__rvfc = v.requestVideoFrameCallback(tick);
  // Per kind: the bytes counted so far, and each report's last reading.
  const bytes = { video: { sum: 0, last: new Map() }, audio: { sum: 0, last: new Map() } };
  window.__rtp = [];
  window.__rtpTimer = setInterval(async () => {
    const t = Date.now();
    for (const r of (await pc.getStats()).values()) {
      const k = r.type === 'inbound-rtp' && bytes[r.kind];
      if (!k) continue;
      const now = r.bytesReceived ?? 0;
      const last = k.last.get(r.id) ?? 0;
      k.sum += now >= last ? now - last : now; // a counter that starts again from zero
      k.last.set(r.id, now);
    }
    window.__rtp.push({
      t,
      presented,
      shown: v.getVideoPlaybackQuality().totalVideoFrames,
      videoBytes: bytes.video.sum,
      audioBytes: bytes.audio.sum,
    });
  }, 100);
};

const STOP_SAMPLER = () => {
  clearInterval(window.__rtpTimer);
  document.getElementById('remote_video').cancelVideoFrameCallback(window.__rvfc);
  return { same: window.switchboardCall._pc === window.__pcWatched, log: window.__pcLog, rtp: window.__rtp };
};

/** The ICE ufrag of the page's current remote description (it changes once an ICE restart is answered). */
const REMOTE_UFRAG = () => {
  const pc = window.switchboardCall._pc;
  return /a=ice-ufrag:(\S+)/.exec(pc.currentRemoteDescription?.sdp ?? '')?.[1] ?? null;
};

/** The longest time in `samples` (after `from`) during which `key` did not grow. */
function longestStall(samples, key, from) {
  let worst = 0;
  let lastGrowth = null;
  for (let i = 1; i < samples.length; i += 1) {
    if (samples[i].t < from) continue;
    if (lastGrowth === null) lastGrowth = samples[i - 1].t;
    if (samples[i][key] > samples[i - 1][key]) lastGrowth = samples[i].t;
    worst = Math.max(worst, samples[i].t - lastGrowth);
  }
  return worst;
}

/** Media counters may pause this long (ms) at most; the failover itself takes seconds. */
const MAX_MEDIA_STALL_MS = 2000;

// `resync` reaches both pages at the same moment. Were both to restart ICE,
// their offers would collide, and after the polite page's rollback Chromium
// leaves its remote <video> frozen (bytes still arrive). switchboard.js lets
// the impolite side restart and the polite one answer; this test fails on a
// client that restarts on both sides.

scenarioTest('Redis Cluster, resume off: the call survives the SIGKILL of the master owning its pair’s slot', async (sc, t) => {
  // Resume off: what the dead master held is gone, so both pages hear resync
  // and renegotiate (with resume on, the history spares them that: next test).
  const { cluster, a, b, channel, slot, master, frames } = await clusterCall(sc, 'k', { SWITCHBOARD_RESUME_SECS: '0' });
  const stateLogs0 = [await a.stateLog(), await b.stateLog()];
  const streams0 = [await a.remoteStreamId(), await b.remoteStreamId()];
  for (const p of [a, b]) await p.page.evaluate(START_SAMPLER);
  const ufrags0 = [await a.page.evaluate(REMOTE_UFRAG), await b.page.evaluate(REMOTE_UFRAG)];
  assert.ok(ufrags0.every(Boolean), 'both pages have a remote description');
  // Some media before the kill, so that the stall check starts from flowing counters.
  await until(async () => (await a.page.evaluate(() => window.__rtp.length)) >= 5, 'RTP samples on A', 5000);
  const seen = (p) => frames.get(p).length;
  const before = new Map([[a, seen(a)], [b, seen(b)]]);

  const t0 = Date.now();
  await cluster.kill(master);

  // Both pages hear resync, once the replicas have resubscribed on the promoted replica.
  const resyncAt = new Map();
  for (const p of [a, b]) {
    const f = await until(() => frames.get(p).slice(before.get(p)).find((x) => x.type === 'resync'),
      `${p.label} receiving resync`, 30000);
    resyncAt.set(p, f.at);
  }
  const newMaster = await cluster.masterOf(slot);
  assert.notEqual(newMaster, master, 'the slot moved to the promoted replica');
  assert.equal(await cluster.shardNumsub(newMaster, channel), 2, 'both replicas resubscribed on the new master');

  // Signaling resumes: the resync makes both pages restart ICE; the offer and the
  // answer cross the cluster, and each side ends on the peer's new ICE credentials.
  for (const [i, p] of [a, b].entries()) {
    await until(async () => {
      const now = await p.page.evaluate(REMOTE_UFRAG);
      const stable = await p.page.evaluate(() => window.switchboardCall._pc.signalingState === 'stable');
      return stable && now && now !== ufrags0[i];
    }, `${p.label} finishing the ICE restart after resync`, 30000);
  }
  const renegotiatedMs = Date.now() - t0;
  const timing = {
    slot,
    killedMaster: master,
    promoted: newMaster,
    resyncMs: { A: resyncAt.get(a) - t0, B: resyncAt.get(b) - t0 },
    renegotiatedMs,
  };
  t.diagnostic(`cluster failover: ${JSON.stringify(timing)}`);
  console.log(`cluster failover (SIGKILL of the pair's master -> resync as seen by each page, -> ICE restart done): ${JSON.stringify(timing)}`);
  const after = (p) => frames.get(p).filter((f) => f.at >= resyncAt.get(p)).map((f) => f.type);
  const exchanged = [...after(a), ...after(b)];
  assert.ok(exchanged.includes('offer') && exchanged.includes('answer'), `an offer and an answer crossed after resync (A: ${after(a)}; B: ${after(b)})`);

  // Arbitrary frames on each page's signaling socket reach the other page.
  for (const [from, to] of [[a, b], [b, a]]) {
    const text = JSON.stringify({ type: 'x-probe', from: from.label, at: Date.now() });
    await from.page.evaluate((x) => window.switchboardCall._send(JSON.parse(x)), text);
    await until(() => frames.get(to).some((f) => f.text === text), `${to.label} receiving ${from.label}'s probe`, 10000);
  }

  // Media kept flowing all along: the same RTCPeerConnection never left
  // `connected`, and neither the remote video nor the inbound RTP counters
  // stalled for long, from before the kill until 3 s past the renegotiation
  // (a picture that freezes with the ICE restart shows within that window).
  for (const p of [a, b]) {
    await until(async () => (await p.page.evaluate(() => window.__rtp.at(-1).t)) >= t0 + renegotiatedMs + 3000,
      `${p.label}: samples until 3 s past the renegotiation`, 10000, 100);
  }
  const media = {};
  for (const p of [a, b]) {
    const { same, log, rtp } = await p.page.evaluate(STOP_SAMPLER);
    assert.ok(same, `${p.label} kept its RTCPeerConnection`);
    assert.deepEqual(log, ['connected'], `${p.label} peer connection states: ${log.join(' -> ')}`);
    const lastSampleAt = rtp.at(-1).t;
    assert.ok(lastSampleAt >= Date.now() - 1000 && rtp.filter((s) => s.t >= t0).length >= 20, `${p.label}: RTP sampled throughout`);
    const stalls = {
      presented: longestStall(rtp, 'presented', t0 - 500),
      shown: longestStall(rtp, 'shown', t0 - 500),
      videoBytes: longestStall(rtp, 'videoBytes', t0 - 500),
      audioBytes: longestStall(rtp, 'audioBytes', t0 - 500),
    };
    const sinceKill = rtp.filter((s) => s.t >= t0);

    media[p.label] = { ...stalls, framesShownSinceKill: sinceKill.at(-1).shown - sinceKill[0].shown };
    console.log(`cluster failover, ${p.label}: longest pause (ms) of the remote video and inbound RTP: ${JSON.stringify(media[p.label])}`);
    for (const [k, ms] of Object.entries(stalls)) {
      assert.ok(ms <= MAX_MEDIA_STALL_MS, `${p.label}: remote ${k} stalled for ${ms} ms around the failover (${JSON.stringify(stalls)})`);
    }
  }
  await Promise.all([a.waitForRemoteFrames(), b.waitForRemoteFrames()]);
  assert.deepEqual([await a.remoteStreamId(), await b.remoteStreamId()], streams0, 'same remote streams');
  for (const [i, p] of [a, b].entries()) {
    const log = await p.stateLog();
    assert.deepEqual(log.slice(stateLogs0[i].length - 1), ['connected'], `${p.label} page states: ${log.join(' -> ')}`);
    assert.equal(p.sockets.length, 1, `${p.label} kept its one signaling socket`);
  }

  // And a hang-up goes through the new master: B hears A's bye.
  await a.page.click('#hangup');
  await Promise.all([a.waitForState('ended'), b.waitForState('ended')]);
  assert.ok(b.received.includes('bye'), 'B received A’s bye through the cluster after the failover');
});

scenarioTest('Redis Cluster, resume on (the default): after the SIGKILL of the pair’s master, signaling goes on with no resync', async (sc) => {
  const { cluster, one, two, a, b, channel, slot, master, frames } = await clusterCall(sc, 'r');
  const before = new Map([[a, frames.get(a).length], [b, frames.get(b).length]]);
  await cluster.kill(master);
  let promoted = master;
  await until(async () => {
    promoted = await cluster.masterOf(slot).catch(() => master);
    return promoted !== master && (await cluster.shardNumsub(promoted, channel).catch(() => 0)) === 2;
  }, 'both replicas resubscribed on the promoted replica', 30000, 200);
  for (const inst of [one, two]) {
    await until(async () => (await httpGet(`${inst.baseUrl}/readyz`).catch(() => ({}))).status === 200, `${inst.name} ready again`, 30000);
  }
  // A frame each way on each page's one socket. A send while a lane still
  // reconnects may be refused (an error event): then the next probe goes.
  for (const [from, to] of [[a, b], [b, a]]) {
    await until(async () => {
      const text = JSON.stringify({ type: 'x-probe', from: from.label, at: Date.now() });
      await from.page.evaluate((x) => window.switchboardCall._send(JSON.parse(x)), text);
      return until(() => frames.get(to).some((f) => f.text === text), `${to.label} receiving ${from.label}'s probe`, 3000)
        .then(() => true, () => false);
    }, `${to.label} receiving a probe from ${from.label}`, 20000, 0);
  }
  for (const p of [a, b]) {
    const since = frames.get(p).slice(before.get(p)).map((f) => f.type);
    assert.ok(!since.includes('resync'), `${p.label}: no resync after the failover (got: ${since.join(', ')})`);
    assert.equal(p.sockets.length, 1, `${p.label} kept its one signaling socket`);
    assert.equal(await p.page.evaluate(() => window.switchboardCall._pc.connectionState), 'connected', `${p.label}'s call`);
  }
  await a.page.click('#hangup');
  await Promise.all([a.waitForState('ended'), b.waitForState('ended')]);
  assert.ok(b.received.includes('bye'), 'B received A’s bye through the cluster after the failover');
});
