'use strict';
// Shared by both baselines: the same environment variables and log line as switchboard, so
// bench/run and switchboard-loadgen drive all three servers the same way.

const ID_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const RESERVED = new Set(['welcome', 'peer-joined', 'peer-left', 'error', 'resync', 'ice-servers']);

function config() {
  const listen = process.env.SWITCHBOARD_LISTEN || '127.0.0.1:8080';
  const i = listen.lastIndexOf(':');
  return {
    host: listen.slice(0, i),
    port: Number(listen.slice(i + 1)),
    redisUrl: process.env.SWITCHBOARD_REDIS_URL || null,
    prefix: process.env.SWITCHBOARD_CHANNEL_PREFIX || 'switchboard',
    maxMessageBytes: Number(process.env.SWITCHBOARD_MAX_MESSAGE_BYTES || 65536),
    iceServers: JSON.parse(process.env.SWITCHBOARD_ICE_SERVERS || '[]'),
  };
}

/** Returns [userID, peerID] or null when the IDs break switchboard's rules. */
function pairIds(userID, peerID) {
  if (typeof userID !== 'string' || typeof peerID !== 'string') return null;
  if (!ID_RE.test(userID) || !ID_RE.test(peerID) || userID === peerID) return null;
  return [userID, peerID];
}

/** The pair key, lower ID first (byte-wise, like switchboard). */
function pairKey(a, b) {
  return Buffer.compare(Buffer.from(a), Buffer.from(b)) < 0 ? `${a}:${b}` : `${b}:${a}`;
}

function welcome(userID, peerID, peerOnline, iceServers) {
  return {
    type: 'welcome',
    userID,
    peerID,
    polite: Buffer.compare(Buffer.from(userID), Buffer.from(peerID)) > 0,
    peerOnline,
    iceServers,
  };
}

/** Checks a client frame: a JSON object whose type is not a server event type. */
function checkFrame(text) {
  let v;
  try {
    v = JSON.parse(text);
  } catch {
    return 'invalid_json';
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return 'invalid_json';
  if (typeof v.type === 'string' && RESERVED.has(v.type)) return 'reserved_type';
  return null;
}

function logListening(addr) {
  const line = { timestamp: new Date().toISOString(), level: 'INFO', fields: { message: 'listening', addr } };
  console.log(JSON.stringify(line));
}

module.exports = { config, pairIds, pairKey, welcome, checkFrame, logListening };
