//! The Lua scripts the Redis broker runs, each with its SHA1: commands go
//! by `EVALSHA`, and a `NOSCRIPT` reply (Redis does not know the script, so
//! it did not run) is answered by sending the body ([`body_of`]).

use std::sync::LazyLock;

/// A Lua script and its SHA1, by which Redis knows it once it has run it.
pub struct Lua {
    /// The script.
    pub body: &'static str,
    /// Its SHA1, hex.
    pub sha1: String,
}

impl Lua {
    fn new(body: &'static str) -> Self {
        use sha1::{Digest, Sha1};
        Self { body, sha1: format!("{:x}", Sha1::digest(body.as_bytes())) }
    }
}

/// [`CLAIM_LUA`].
pub static CLAIM: LazyLock<Lua> = LazyLock::new(|| Lua::new(CLAIM_LUA));
/// [`REFRESH_MANY_LUA`].
pub static REFRESH_MANY: LazyLock<Lua> = LazyLock::new(|| Lua::new(REFRESH_MANY_LUA));
/// [`RELEASE_LUA`].
pub static RELEASE: LazyLock<Lua> = LazyLock::new(|| Lua::new(RELEASE_LUA));
/// [`CLAIM_KEPT_LUA`].
pub static CLAIM_KEPT: LazyLock<Lua> = LazyLock::new(|| Lua::new(CLAIM_KEPT_LUA));
/// [`REPLAY_LUA`].
pub static REPLAY: LazyLock<Lua> = LazyLock::new(|| Lua::new(REPLAY_LUA));
/// [`APPEND_LUA`].
pub static APPEND: LazyLock<Lua> = LazyLock::new(|| Lua::new(APPEND_LUA));
/// [`APPEND_MANY_LUA`].
pub static APPEND_MANY: LazyLock<Lua> = LazyLock::new(|| Lua::new(APPEND_MANY_LUA));

/// The body of the script whose SHA1 is `sha1` (hex), for a command that
/// Redis answered with `NOSCRIPT`.
pub fn body_of(sha1: &[u8]) -> Option<&'static str> {
    [&APPEND, &APPEND_MANY, &CLAIM, &CLAIM_KEPT, &REFRESH_MANY, &RELEASE, &REPLAY]
        .into_iter()
        .find(|lua| lua.sha1.as_bytes() == sha1)
        .map(|lua| lua.body)
}

/// With history on: appends the envelope (header `ARGV[1]`, body `ARGV[2]`)
/// to the pair's stream `KEYS[1]` (about `ARGV[5]` entries kept), publishes
/// it with the entry's ID in its header on `KEYS[2]` with `ARGV[4]`, and
/// returns the ID, whether or not a subscriber heard it: a session whose
/// subscriber was cut off gets it from the history once it is back (or
/// `resync`), so it is not refused as a bare `PUBLISH` that reached nobody
/// is (see [`super::lanes`]). The stream's TTL becomes `ARGV[3]` seconds when
/// `ARGV[6]` is `1` (see [`super::renewals`]: not every relay renews it),
/// and whenever the relay had to create the stream (gone since its last
/// entry, or a new Redis), so a stream never lives without one. A numbered
/// message (confirmed sends) also names its sender's counter `KEYS[3]` and
/// its number `ARGV[7]`: a number the counter already reached is a resend,
/// dropped (`false`); otherwise the counter moves to it, kept `ARGV[3]`
/// seconds. Flagged `allow-oom` (Redis 7.0+): a Redis out of memory under
/// `noeviction` refuses new presence keys, but relaying goes on, and a
/// history is bounded by its length and TTL. Run by its SHA1 (`EVALSHA`): a `NOSCRIPT` reply means it did
/// not run, and the lane sends it once more with its body (see
/// [`super::lanes`]).
pub const APPEND_LUA: &str = r"#!lua flags=allow-oom
if KEYS[3] then
  local n = tonumber(ARGV[7])
  if n <= tonumber(redis.call('GET', KEYS[3]) or '0') then return false end
  redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[3])
end
local id = redis.call('XADD', KEYS[1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[5], '*', 'h', ARGV[1], 'b', ARGV[2])
if not id then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'h', ARGV[1], 'b', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
elseif ARGV[6] == '1' then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call(ARGV[4], KEYS[2], ARGV[1] .. ' ' .. id .. '\n' .. ARGV[2])
return id";

/// [`APPEND_LUA`] for several messages in one call, in order: what a lane
/// sends in place of consecutive appends of one pipeline (see
/// [`super::lanes`]), as each call of a script costs Redis about as much as
/// a `PUBLISH` before it does anything. `ARGV[1]` is the TTL, `ARGV[2]` the
/// publish command and `ARGV[3]` the length kept; message `i` has the keys
/// `KEYS[3i-2]` (stream), `KEYS[3i-1]` (channel) and `KEYS[3i]` (its
/// sender's counter, or the stream again when it is not numbered) and the
/// arguments `ARGV[4i]` (header), `ARGV[4i+1]` (body), `ARGV[4i+2]` (renew
/// flag) and `ARGV[4i+3]` (its number, or `''`). Returns each message's
/// reply as [`APPEND_LUA`] would.
pub const APPEND_MANY_LUA: &str = r"#!lua flags=allow-oom
local ttl, verb, keep = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 1, #KEYS / 3 do
  local stream, channel, counter = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local header, body, renew, n = ARGV[4 * i], ARGV[4 * i + 1], ARGV[4 * i + 2], ARGV[4 * i + 3]
  local fresh = true
  if n ~= '' then
    if tonumber(n) <= tonumber(redis.call('GET', counter) or '0') then
      fresh = false
    else
      redis.call('SET', counter, n, 'EX', ttl)
    end
  end
  if fresh then
    local id = redis.call('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', keep, '*', 'h', header, 'b', body)
    if not id then
      id = redis.call('XADD', stream, 'MAXLEN', '~', keep, '*', 'h', header, 'b', body)
      redis.call('EXPIRE', stream, ttl)
    elseif renew == '1' then
      redis.call('EXPIRE', stream, ttl)
    end
    redis.call(verb, channel, header .. ' ' .. id .. '\n' .. body)
    out[i] = id
  else
    out[i] = false
  end
end
return out";

/// [`CLAIM_LUA`] with history on: the join envelope (header `ARGV[3]`) goes
/// to the stream `KEYS[4]` first, as [`APPEND_LUA`] does (`ARGV[5]` seconds,
/// `ARGV[6]` entries). Returns the peer's session and the join's ID.
pub const CLAIM_KEPT_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local id = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'h', ARGV[3], 'b', '')
redis.call('EXPIRE', KEYS[4], ARGV[5])
redis.call(ARGV[4], KEYS[3], ARGV[3] .. ' ' .. id .. '\n')
return {redis.call('GET', KEYS[2]) or '', id}";

/// The newest ID of the stream `KEYS[1]` and the entries after `ARGV[1]`
/// when that entry is still there (`{last ID, entries}`); else the newest ID
/// alone (`{last ID}`), or nil for no stream. One script, so the check and
/// the read see the same stream.
pub const REPLAY_LUA: &str = r"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return false end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return {last[1][1]} end
return {last[1][1], redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+')}";

/// Sets `KEYS[1]` to `ARGV[1]` for `ARGV[2]` seconds, publishes the join
/// envelope `ARGV[3]` on the channel `KEYS[3]` with `ARGV[4]` (`PUBLISH`, or
/// `SPUBLISH` in a cluster: the channel shares the keys' slot), and returns `KEYS[2]`. One
/// script, so Redis orders one user's claims and joins alike (see
/// [`super::Broker::claim_presence`]).
pub const CLAIM_LUA: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call(ARGV[4], KEYS[3], ARGV[3])
return redis.call('GET', KEYS[2])";

/// For each i: keeps `KEYS[2i-1]` as `ARGV[i+1]` for `ARGV[1]` seconds (unless
/// another session owns it) and returns `KEYS[2i]`, or `''` when it is gone.
pub const REFRESH_MANY_LUA: &str = r"
local out = {}
for i = 1, #KEYS / 2 do
  local me = ARGV[i + 1]
  local mine = redis.call('GET', KEYS[2 * i - 1])
  if mine == false or mine == me then
    redis.call('SET', KEYS[2 * i - 1], me, 'EX', ARGV[1])
  end
  out[i] = redis.call('GET', KEYS[2 * i]) or ''
end
return out";

/// Deletes `KEYS[1]` only while it still holds `ARGV[1]`.
pub const RELEASE_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";
