// A private Redis Cluster for the end-to-end tests: three masters and three
// replicas, each a `redis-server --cluster-enabled yes` on free loopback ports
// (the JavaScript twin of tests/support/redis_cluster.rs), joined by
// `redis-cli --cluster create`, every node stopped by PID at the end.
// Also the slot arithmetic that tells which master carries a pair's channel.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Child, freePort } from './processes.mjs';

const run = promisify(execFile);

/** The cluster bus listens on the client port + 10000. */
const BUS_OFFSET = 10000;
/** How long a master may be silent before its replica takes over. */
export const NODE_TIMEOUT_MS = 2000;
/** Hash-tag partitions of the server's cluster names (crates/switchboard/src/pair.rs, PARTITIONS). */
const PARTITIONS = 1024;
const SLOTS = 16384;

/** CRC16/XMODEM, the checksum of Redis Cluster key slots. */
export function crc16(bytes) {
  let crc = 0;
  for (const byte of bytes) {
    crc ^= byte << 8;
    for (let i = 0; i < 8; i += 1) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
  }
  return crc;
}

/** The cluster key slot of `key`, hash tags (`{...}`) included. */
export function keyslot(key) {
  let bytes = Buffer.from(key, 'utf8');
  const open = bytes.indexOf('{');
  if (open >= 0) {
    const close = bytes.indexOf('}', open + 1);
    if (close > open + 1) bytes = bytes.subarray(open + 1, close);
  }
  return crc16(bytes) % SLOTS;
}

/**
 * Where the server puts the pair of `a` and `b` in a cluster: its partition, its
 * channel `switchboard:{p<partition>}:pair:<lower>:<higher>`, and that channel's slot.
 */
export function pairChannel(a, b, prefix = 'switchboard') {
  const [lower, higher] = [a, b].sort();
  const partition = keyslot(`${lower}:${higher}`) % PARTITIONS;
  const channel = `${prefix}:{p${partition}}:pair:${lower}:${higher}`;
  return { partition, channel, slot: keyslot(channel) };
}

/** Whether something on 127.0.0.1 listens on `port` (the bus port must be free). */
function portFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen(port, '127.0.0.1', () => server.close(() => resolve(true)));
  });
}

/** A free port whose bus port (+10000) is free too. */
async function freePair(taken) {
  for (;;) {
    const port = await freePort();
    if (port + BUS_OFFSET < 65536 && !taken.has(port) && !taken.has(port + BUS_OFFSET) && (await portFree(port + BUS_OFFSET))) {
      return port;
    }
  }
}

/** `redis-cli -p port args...`, its stdout. */
export async function redisCli(port, ...args) {
  const { stdout } = await run('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], { timeout: 10000 });
  return stdout;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function eventually(fn, what, timeoutMs = 30000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await sleep(100);
  }
}

/** A running 3+3 cluster. */
export class RedisCluster {
  constructor(dir) {
    this.dir = dir;
    /** @type {{port: number, child: Child}[]} */
    this.nodes = [];
  }

  /** Starts six nodes and makes them a cluster with one replica per master. */
  static async start() {
    const cluster = new RedisCluster(fs.mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-cluster-')));
    try {
      const taken = new Set();
      for (let i = 0; i < 6; i += 1) {
        const port = await freePair(taken);
        taken.add(port).add(port + BUS_OFFSET);
        const dir = path.join(cluster.dir, String(port));
        fs.mkdirSync(dir);
        const child = new Child(`redis-cluster :${port}`, 'redis-server', [
          '--port', String(port),
          '--bind', '127.0.0.1',
          '--save', '',
          '--appendonly', 'no',
          '--cluster-enabled', 'yes',
          '--cluster-config-file', 'nodes.conf',
          '--cluster-node-timeout', String(NODE_TIMEOUT_MS),
          // A replica syncs at once (the default waits 5 s for more replicas to share the transfer).
          '--repl-diskless-sync-delay', '0',
          '--dir', dir,
        ]);
        cluster.nodes.push({ port, child });
      }
      await Promise.all(cluster.nodes.map(({ child }) =>
        child.waitForLine((l) => (/Ready to accept connections/.test(l) ? true : undefined), 'ready line', 20000)));
      await run('redis-cli', [
        '--cluster', 'create', ...cluster.nodes.map((n) => `127.0.0.1:${n.port}`),
        '--cluster-replicas', '1', '--cluster-yes',
      ], { timeout: 60000 });
      await cluster.waitHealthy();
      return cluster;
    } catch (err) {
      await cluster.stop();
      throw err;
    }
  }

  /** The seed URLs, comma-separated (all six nodes), for SWITCHBOARD_REDIS_URL. */
  get urls() {
    return this.nodes.map((n) => `redis://127.0.0.1:${n.port}`).join(',');
  }

  live() {
    return this.nodes.filter((n) => n.child.running);
  }

  /**
   * Waits until every live node says `cluster_state:ok`, three masters each have slots and
   * a replica, and every replica has finished its sync with its master (a replica that never
   * synced refuses to fail over: its data is older than cluster-replica-validity-factor allows).
   */
  async waitHealthy(timeoutMs = 30000) {
    for (const { port } of this.live()) {
      await eventually(async () => (await redisCli(port, 'CLUSTER', 'INFO')).includes('cluster_state:ok'), `cluster_state:ok on :${port}`, timeoutMs);
    }
    await eventually(async () => {
      const shards = await this.shards();
      return shards.length === 3 && shards.every((s) => s.replicas.length > 0);
    }, 'three masters with slots, each with a replica', timeoutMs);
    for (const shard of await this.shards()) {
      for (const port of shard.replicas) {
        await eventually(async () => (await redisCli(port, 'INFO', 'replication')).includes('master_link_status:up'),
          `replica :${port} in sync with its master :${shard.port}`, timeoutMs);
      }
    }
  }

  /**
   * The masters that serve slots, from `CLUSTER NODES` on a live node:
   * `{port, ranges: [[first, last]...], replicas: [port...]}` (failed nodes left out).
   */
  async shards() {
    let lastError;
    for (const { port } of this.live()) {
      try {
        const rows = (await redisCli(port, 'CLUSTER', 'NODES')).trim().split('\n').map((l) => l.trim().split(' '));
        const ok = (r) => !/fail|handshake|noaddr/.test(r[2]);
        const portOf = (r) => Number(/:(\d+)@/.exec(r[1])[1]);
        const masters = rows.filter((r) => ok(r) && r[2].includes('master') && r.length > 8);
        return masters.map((m) => ({
          port: portOf(m),
          ranges: m.slice(8).filter((s) => !s.startsWith('[')).map((s) => s.split('-').map(Number)).map(([a, b = a]) => [a, b]),
          replicas: rows.filter((r) => ok(r) && r[2].includes('slave') && r[3] === m[0]).map(portOf),
        }));
      } catch (err) {
        lastError = err;
      }
    }
    throw lastError ?? new Error('no live cluster node');
  }

  /** The port of the master serving `slot`. */
  async masterOf(slot) {
    const shard = (await this.shards()).find((s) => s.ranges.some(([a, b]) => a <= slot && slot <= b));
    if (!shard) throw new Error(`no master serves slot ${slot}`);
    return shard.port;
  }

  /** `CLUSTER KEYSLOT name`, as the cluster computes it. */
  async keyslot(name) {
    return Number((await redisCli(this.live()[0].port, 'CLUSTER', 'KEYSLOT', name)).trim());
  }

  /** `PUBSUB SHARDNUMSUB channel` on the node on `port`: its sharded subscribers there. */
  async shardNumsub(port, channel) {
    const out = (await redisCli(port, 'PUBSUB', 'SHARDNUMSUB', channel)).trim().split('\n');
    return Number(out[1]);
  }

  /** SIGKILLs the node on `port` and waits until it is gone. */
  async kill(port) {
    const node = this.nodes.find((n) => n.port === port);
    if (!node) throw new Error(`no cluster node on :${port}`);
    await node.child.stop(0, 'SIGKILL');
  }

  /** Every node's log, for a failure's artifacts. */
  logs() {
    return this.nodes.map((n) => `=== :${n.port} ===\n${n.child.lines.join('\n')}`).join('\n');
  }

  /** Stops every node by PID and removes the nodes' directories. */
  async stop() {
    await Promise.all(this.nodes.map((n) => n.child.stop(2000)));
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
