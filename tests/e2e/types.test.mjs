// static/switchboard.d.ts: tsc accepts a page's use of the API (types/usage.ts),
// the declarations name exactly what switchboard.js exports, and the server
// serves the file beside switchboard.js.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import ts from 'typescript';
import { E2E_DIR, REPO_ROOT } from './lib/paths.mjs';
import { scenarioTest } from './lib/scenario.mjs';

const DTS = path.join(REPO_ROOT, 'static', 'switchboard.d.ts');
const JS = path.join(REPO_ROOT, 'static', 'switchboard.js');
const TSC = createRequire(import.meta.url).resolve('typescript/bin/tsc');

test('tsc --noEmit accepts types/usage.ts against switchboard.d.ts (and its @ts-expect-error lines are errors)', () => {
  const r = spawnSync(process.execPath, [TSC, '--noEmit', '-p', path.join(E2E_DIR, 'types', 'tsconfig.json')], { encoding: 'utf8' });
  assert.equal(r.status, 0, `tsc failed:\n${r.stdout}${r.stderr}`);
});

/** The exported value names, the union members of `CallState`, and the members of class SwitchboardCall. */
function declared() {
  const file = ts.createSourceFile(DTS, fs.readFileSync(DTS, 'utf8'), ts.ScriptTarget.ES2022, true);
  const values = new Set();
  const members = new Set();
  let states = [];
  const exported = (node) => node.modifiers?.some((m) => m.kind === ts.SyntaxKind.ExportKeyword);
  for (const node of file.statements) {
    if (!exported(node)) continue;
    if (ts.isVariableStatement(node)) for (const d of node.declarationList.declarations) values.add(d.name.getText());
    else if (ts.isFunctionDeclaration(node)) values.add(node.name.getText());
    else if (ts.isClassDeclaration(node)) {
      values.add(node.name.getText());
      for (const m of node.members) {
        if (m.name && !ts.isConstructorDeclaration(m)) members.add(m.name.getText());
      }
    } else if (ts.isTypeAliasDeclaration(node) && node.name.getText() === 'CallState') {
      states = node.type.types.map((t) => t.literal.text);
    }
  }
  return { values, members, states };
}

test('switchboard.d.ts declares exactly what switchboard.js exports', async () => {
  const mod = await import(pathToFileURL(JS).href);
  const { values, members, states } = declared();
  assert.deepEqual([...values].sort(), Object.keys(mod).sort(), 'exported names');
  assert.deepEqual(states, [...mod.STATES], 'CallState lists STATES');

  // Public members of a SwitchboardCall: its own fields and its prototype's methods and getters.
  const call = new mod.SwitchboardCall({ userID: 'alice', peerID: 'bob', url: 'ws://127.0.0.1:9/ws' });
  const runtime = new Set([
    ...Object.keys(call),
    ...Object.getOwnPropertyNames(mod.SwitchboardCall.prototype).filter((k) => k !== 'constructor'),
  ].filter((k) => !k.startsWith('_')));
  // addEventListener/removeEventListener are EventTarget's, typed again for the event map.
  const typed = [...members].filter((m) => m !== 'addEventListener' && m !== 'removeEventListener');
  assert.deepEqual(typed.sort(), [...runtime].sort(), 'SwitchboardCall members');
});

scenarioTest('the server serves switchboard.d.ts beside switchboard.js', async (sc) => {
  const inst = await sc.startInstance();
  const res = await fetch(new URL('/switchboard.d.ts', inst.baseUrl));
  assert.equal(res.status, 200);
  assert.equal(await res.text(), fs.readFileSync(DTS, 'utf8'));
});

scenarioTest('switchboard.d.ts is served as text', async (sc) => {
  const inst = await sc.startInstance();
  const res = await fetch(new URL('/switchboard.d.ts', inst.baseUrl));
  assert.match(res.headers.get('content-type') ?? '', /^(text\/|application\/typescript)/);
});
