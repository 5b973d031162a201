// Paths used by the end-to-end tests, computed relative to this file.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));

/** Root of the repository (two levels above tests/e2e). */
export const REPO_ROOT = path.resolve(here, '..', '..', '..');
/** The package folder tests/e2e. */
export const E2E_DIR = path.resolve(here, '..');
/** Screenshots and logs of failed tests go here (gitignored). */
export const ARTIFACTS_DIR = path.join(E2E_DIR, 'artifacts');
/** The switchboard binary under test: $SWITCHBOARD_BIN or the debug build. */
export const SWITCHBOARD_BIN = process.env.SWITCHBOARD_BIN || path.join(REPO_ROOT, 'target', 'debug', 'switchboard');
/** Debian's chromium. */
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
