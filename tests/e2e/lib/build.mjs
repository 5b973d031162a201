// `npm test` runs this first: builds the switchboard binary the tests start,
// unless SWITCHBOARD_BIN points at one already built (e.g. a release build).
import { spawnSync } from 'node:child_process';
import { REPO_ROOT } from './paths.mjs';

if (process.env.SWITCHBOARD_BIN) {
  console.log(`using SWITCHBOARD_BIN=${process.env.SWITCHBOARD_BIN}`);
} else {
  const r = spawnSync('cargo', ['build', '-p', 'switchboard'], { cwd: REPO_ROOT, stdio: 'inherit' });
  if (r.error) throw r.error;
  process.exit(r.status ?? 1);
}
