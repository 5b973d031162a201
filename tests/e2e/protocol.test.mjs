// docs/protocol.md's example session, replayed against a real server: every
// frame a client sends goes out as written there, and each client receives
// exactly the frames the example shows, byte for byte and in order.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT } from './lib/paths.mjs';
import { scenarioTest } from './lib/scenario.mjs';
import { SocketPage } from './lib/topology.mjs';

/** The steps of the example: `{who, dir: 'send'|'recv'|'close', text}`. */
function exampleSession() {
  const doc = fs.readFileSync(path.join(REPO_ROOT, 'docs', 'protocol.md'), 'utf8');
  const section = doc.split('## An example session')[1];
  assert.ok(section, 'docs/protocol.md has "## An example session"');
  const block = /```\n([\s\S]*?)```/.exec(section)[1];
  const steps = [];
  for (const line of block.split('\n')) {
    const m = /^(\w+)\s+(→|←)\s+(.*)$/.exec(line);
    if (!m) continue;
    const [, who, arrow, text] = m;
    if (text.startsWith('close ')) steps.push({ who, dir: 'close', code: Number(text.slice(6)) });
    else steps.push({ who, dir: arrow === '→' ? 'send' : 'recv', text });
  }
  return steps;
}

scenarioTest('the example session in docs/protocol.md happens as written', async (sc) => {
  const inst = await sc.startInstance();
  const steps = exampleSession();
  assert.ok(steps.length >= 14, `${steps.length} steps`);
  for (const type of ['welcome', 'peer-joined', 'offer', 'answer', 'candidate', 'bye', 'peer-left']) {
    assert.ok(steps.some((s) => s.text?.includes(`"type":"${type}"`)), `the example shows ${type}`);
  }
  const socks = await SocketPage.open(sc, inst.baseUrl);
  const ws = `ws://${inst.addr}/ws`;
  const open = new Set();
  const expected = new Map();
  for (const step of steps) {
    const { who } = step;
    if (!open.has(who)) {
      const peer = who === 'alice' ? 'bob' : 'alice';
      await socks.connect(who, `${ws}?userID=${who}&peerID=${peer}`);
      open.add(who);
    }
    if (step.dir === 'send') {
      JSON.parse(step.text); // the example is valid JSON
      await socks.send(who, step.text);
    } else if (step.dir === 'recv') {
      expected.set(who, [...(expected.get(who) ?? []), step.text]);
      await socks.waitFor(who, step.text);
    } else {
      await socks.page.evaluate(([k, code]) => window.__socks[k].ws.close(code), [who, step.code]);
    }
  }
  for (const [who, frames] of expected) {
    assert.deepEqual(await socks.messages(who), frames, `${who} received exactly the example's frames`);
  }
});

scenarioTest('relayed frames need no `type`; a second `type` key is refused as "duplicate `type` key"', async (sc) => {
  const inst = await sc.startInstance();
  const socks = await SocketPage.open(sc, inst.baseUrl);
  const ws = `ws://${inst.addr}/ws`;
  await socks.connect('alice', `${ws}?userID=alice&peerID=bob`);
  await socks.waitForType('alice', 'welcome');
  await socks.connect('bob', `${ws}?userID=bob&peerID=alice`);
  await socks.waitForType('alice', 'peer-joined');
  for (const frame of ['{}', '{"type":7}', '{"sdp":"no type at all"}']) {
    await socks.send('alice', frame);
    await socks.waitFor('bob', frame);
  }
  await socks.send('alice', '{"type":"offer","type":"welcome"}');
  const error = await socks.waitForType('alice', 'error');
  assert.deepEqual(error, { type: 'error', code: 'invalid_json', message: 'duplicate `type` key' });
  await socks.send('alice', '{"type":"after"}');
  await socks.waitFor('bob', '{"type":"after"}');
  assert.ok(!(await socks.messages('bob')).some((m) => m.includes('welcome"}') && m.includes('"offer"')), 'the refused frame was not relayed');
});
