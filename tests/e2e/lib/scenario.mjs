// A test scenario: owns every process and browser it starts, stops them all at
// the end (also on failure), and on failure writes screenshots and logs to
// tests/e2e/artifacts/.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { ARTIFACTS_DIR } from './paths.mjs';
import { launchChromium, Participant } from './browser.mjs';
import { startRedis, startSwitchboard } from './processes.mjs';
import { RedisCluster } from './cluster.mjs';

export class Scenario {
  constructor(name) {
    this.name = name;
    this.redis = null;
    this.redisCluster = null;
    this.instances = [];
    this.participants = [];
    this.browsers = new Map(); // 'fake' | 'none' | 'denied' -> launched chromium
    this.cleanups = [];
  }

  /** Starts a private redis-server. */
  async startRedis() {
    this.redis = await startRedis();
    this.cleanups.push(() => this.redis.stop());
    return this.redis;
  }

  /**
   * Starts a private 3+3 Redis Cluster (see lib/cluster.mjs); instances started
   * afterwards join it (SWITCHBOARD_REDIS_MODE=cluster, every node a seed).
   */
  async startRedisCluster() {
    this.redisCluster = await RedisCluster.start();
    this.cleanups.push(() => this.redisCluster.stop());
    return this.redisCluster;
  }

  /** Starts a switchboard instance (joined to this scenario's Redis if one was started). */
  async startInstance(opts = {}) {
    const cluster = this.redisCluster && !this.redis;
    const env = cluster ? { SWITCHBOARD_REDIS_MODE: 'cluster', ...opts.env } : opts.env;
    const inst = await startSwitchboard({
      name: `switchboard#${this.instances.length + 1}`,
      redisUrl: cluster ? this.redisCluster.urls : this.redis?.url,
      ...opts,
      env,
    });
    inst.env = env;
    this.instances.push(inst);
    this.cleanups.push(() => inst.stop());
    return inst;
  }

  /**
   * Stops `inst` (SIGTERM: the server closes its sockets with 1001) and starts
   * a new instance on the same address, as a replica restart would.
   * @returns {Promise<object>} the new instance (also replaces `inst` in `instances`)
   */
  async restartInstance(inst, { redisUrl = this.redis?.url ?? this.redisCluster?.urls, env = inst.env } = {}) {
    await inst.stop();
    const index = this.instances.indexOf(inst);
    const fresh = await startSwitchboard({ name: `${inst.name}'`, redisUrl, listen: inst.addr, env });
    this.instances[index] = fresh;
    this.cleanups.push(() => fresh.stop());
    return fresh;
  }

  /**
   * A new participant (tab) in this scenario's chromium, launched on first use.
   * `devices: false` puts it in a second chromium that has no camera or microphone;
   * `denied: true` in one whose camera and microphone exist but are blocked for every site.
   */
  async participant(label, { devices = true, denied = false } = {}) {
    const kind = denied ? 'denied' : devices ? 'fake' : 'none';
    if (!this.browsers.has(kind)) {
      const browser = await launchChromium({ fakeDevices: devices, denyMedia: denied });
      this.browsers.set(kind, browser);
      this.cleanups.push(() => browser.close());
    }
    const p = await Participant.open(this.browsers.get(kind).context, label);
    this.participants.push(p);
    return p;
  }

  /** Screenshots of every page, their console and state logs, and every server log. */
  async writeArtifacts(error) {
    const dir = path.join(ARTIFACTS_DIR, this.name.replace(/[^A-Za-z0-9_.-]+/g, '_'));
    fs.rmSync(dir, { recursive: true, force: true });
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'error.txt'), `${error?.stack ?? error}\n${error?.cause?.stack ?? ''}\n`);
    for (const p of this.participants) {
      const base = path.join(dir, p.label);
      await p.page.screenshot({ path: `${base}.png`, timeout: 10000 }).catch((e) => fs.writeFileSync(`${base}.png.error.txt`, String(e)));
      const states = await p.stateLog().catch(() => []);
      fs.writeFileSync(`${base}.console.txt`, [`states: ${states.join(' -> ')}`, `websockets opened: ${p.sockets.length}`, ...p.console].join('\n'));
    }
    for (const inst of this.instances) fs.writeFileSync(path.join(dir, `${inst.name}.log`), inst.child.lines.join('\n'));
    if (this.redis) fs.writeFileSync(path.join(dir, 'redis.log'), this.redis.child.lines.join('\n'));
    if (this.redisCluster) fs.writeFileSync(path.join(dir, 'redis-cluster.log'), this.redisCluster.logs());
    return dir;
  }

  /** Stops everything, newest first; never throws. */
  async stop() {
    while (this.cleanups.length) {
      const fn = this.cleanups.pop();
      try {
        await fn();
      } catch (err) {
        console.error(`cleanup in "${this.name}" failed:`, err);
      }
    }
  }
}

/**
 * Declares a `node:test` test that receives a fresh Scenario. Whatever the
 * body starts is stopped afterwards; if the body throws, screenshots and logs
 * are written first and the path is added to the error. `todo` (a reason)
 * marks a known gap: the test runs and reports, but its failure does not fail the run.
 */
export function scenarioTest(name, body, { timeout = 180000, todo } = {}) {
  return test(name, { timeout, todo }, async (t) => {
    const scenario = new Scenario(name);
    try {
      await body(scenario, t);
      for (const p of scenario.participants) {
        // The pages' Content-Security-Policy must never block what they do.
        const blocked = p.console.filter((l) => l.includes('Content Security Policy'));
        assert.deepEqual(blocked, [], `${p.label}: the Content-Security-Policy blocked something`);
      }
      for (const p of scenario.participants) {
        const n = p.console.filter((l) => l.includes('(watchdog)')).length;
        if (n) t.diagnostic(`${p.label}: the client's stall watchdog had to act ${n} time(s)`);
      }
    } catch (err) {
      const dir = await scenario.writeArtifacts(err).catch((e) => `(could not write artifacts: ${e})`);
      t.diagnostic(`artifacts: ${dir}`);
      throw err;
    } finally {
      await scenario.stop();
    }
  });
}

/** A pair of IDs unique to one test run, so runs never share a channel. */
export function pairIDs(tag) {
  const n = Math.random().toString(36).slice(2, 8);
  return [`alice-${tag}-${n}`, `bob-${tag}-${n}`];
}
