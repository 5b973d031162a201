// The opening most call tests share: instances, two participants, a call that is up.
import assert from 'node:assert/strict';
import { pairIDs } from './scenario.mjs';

/**
 * Waits until both sides are `connected` and each remote video shows the other's camera:
 * advancing frames, painted, and not black (see `Participant.waitForRemoteFrames`).
 */
export async function expectCall(a, b) {
  await Promise.all([a.waitForState('connected'), b.waitForState('connected')]);
  const [fa, fb] = await Promise.all([a.waitForRemoteFrames(), b.waitForRemoteFrames()]);
  assert.ok(fa.width > 0 && fb.width > 0, 'both remote videos have a size');
  return [fa, fb];
}

/** One Redis, two switchboard instances. */
export async function twoInstances(sc) {
  await sc.startRedis();
  return Promise.all([sc.startInstance(), sc.startInstance()]);
}

/**
 * Two instances on one Redis (or `instances` given), A joined through the first and B through
 * the second, and the call up with video both ways.
 * @param {import('./scenario.mjs').Scenario} sc
 * @param {string} tag  part of the pair's IDs (see pairIDs)
 * @param {object} [opts]
 * @param {object[]} [opts.instances]  use these instead of starting two (e.g. `[inst, inst]`)
 * @returns {Promise<{one: object, two: object, a: import('./browser.mjs').Participant,
 *   b: import('./browser.mjs').Participant, idA: string, idB: string}>}
 */
export async function connectedCall(sc, tag, { instances } = {}) {
  const [one, two] = instances ?? (await twoInstances(sc));
  const [idA, idB] = pairIDs(tag);
  const a = await sc.participant('A');
  const b = await sc.participant('B');
  await a.join(one, idA, idB);
  await b.join(two, idB, idA);
  await expectCall(a, b);
  return { one, two, a, b, idA, idB };
}
