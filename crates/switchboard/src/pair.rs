//! User and pair identifiers: validation, ordering and Redis names.
//!
//! An ID is 1 to 64 bytes from `A-Z a-z 0-9 _ . -`. Because `:` is not in that
//! alphabet, `{prefix}:pair:{lower}:{higher}` can be split back into exactly one
//! pair, so two different pairs never share a channel.

use std::fmt;
use std::sync::Arc;

/// Longest accepted ID, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The ID is empty.
    #[error("must not be empty")]
    Empty,
    /// The ID is longer than [`MAX_ID_LEN`].
    #[error("must be at most 64 characters")]
    TooLong,
    /// The ID contains a character outside `A-Z a-z 0-9 _ . -`.
    #[error("may only contain A-Z a-z 0-9 _ . -")]
    BadChar,
}

/// A validated user ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    /// Validates `raw` and wraps it.
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        if raw.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        if !raw.bytes().all(is_id_byte) {
            return Err(IdError::BadChar);
        }
        Ok(Self(Arc::from(raw)))
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// True for the bytes allowed in an ID.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The unordered pair of two distinct users, stored sorted.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct PairId {
    lower: UserId,
    higher: UserId,
}

/// The two IDs of a pair are the same user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("userID and peerID must differ")]
pub struct SameUser;

impl PairId {
    /// Builds the pair of `a` and `b`, in either order.
    pub fn new(a: &UserId, b: &UserId) -> Result<Self, SameUser> {
        match a.cmp(b) {
            std::cmp::Ordering::Less => Ok(Self { lower: a.clone(), higher: b.clone() }),
            std::cmp::Ordering::Greater => Ok(Self { lower: b.clone(), higher: a.clone() }),
            std::cmp::Ordering::Equal => Err(SameUser),
        }
    }

    /// The member of the pair that is not `user`.
    pub fn other(&self, user: &UserId) -> &UserId {
        if *user == self.lower {
            &self.higher
        } else {
            &self.lower
        }
    }

    /// Whether `user` is the polite side in perfect negotiation: the higher ID is.
    pub fn is_polite(&self, user: &UserId) -> bool {
        *user == self.higher
    }

    /// The pub/sub channel of this pair: `{prefix}:pair:{lower}:{higher}`.
    pub fn channel(&self, prefix: &str) -> String {
        format!("{prefix}:pair:{}:{}", self.lower, self.higher)
    }

    /// The presence key of `user` in this pair: `{prefix}:presence:{lower}:{higher}:{user}`.
    pub fn presence_key(&self, prefix: &str, user: &UserId) -> String {
        format!("{prefix}:presence:{}:{}:{user}", self.lower, self.higher)
    }

    /// This pair's partition: which of [`PARTITIONS`] hash tags its names
    /// carry in a Redis Cluster.
    pub fn partition(&self) -> u16 {
        let mut name = Vec::with_capacity(self.lower.as_str().len() + self.higher.as_str().len() + 1);
        name.extend_from_slice(self.lower.as_str().as_bytes());
        name.push(b':');
        name.extend_from_slice(self.higher.as_str().as_bytes());
        redis_protocol::redis_keyslot(&name) % PARTITIONS
    }

    /// Parses a channel name made by [`PairId::channel`] or [`Names::channel`]
    /// with the same prefix.
    pub fn from_channel(prefix: &str, channel: &str) -> Option<Self> {
        let rest = channel.strip_prefix(prefix)?;
        // A cluster name's hash tag, `:{p<partition>}`.
        let rest = match rest.strip_prefix(":{p") {
            Some(tagged) => {
                let (digits, rest) = tagged.split_once('}')?;
                digits.parse::<u16>().ok().filter(|p| *p < PARTITIONS)?;
                rest
            }
            None => rest,
        };
        let rest = rest.strip_prefix(":pair:")?;
        let (a, b) = rest.split_once(':')?;
        let pair = Self::new(&UserId::parse(a).ok()?, &UserId::parse(b).ok()?).ok()?;
        (pair.lower.as_str() == a).then_some(pair)
    }
}

/// Hash-tag partitions of a Redis Cluster deployment's names.
///
/// In a cluster, a pair's channel and its two presence keys must share a slot
/// (one Lua script touches them and `SPUBLISH`es on the channel), and an
/// instance refreshes many sessions' keys in one script call, which may only
/// touch keys of one slot. A hash tag per pair would give the first but put
/// every pair in a slot of its own, so the refresh would need one call per
/// session. A fixed set of tags gives both: pairs are spread over 1,024
/// partitions (so over the masters as evenly as slots are, within a few per
/// cent), and one refresh call covers all of an instance's sessions in one
/// partition. It also bounds the `SSUBSCRIBE` commands a resubscribe needs
/// (one per slot) to 1,024.
pub const PARTITIONS: u16 = 1024;

/// How channel and key names are made: today's plain names (one Redis, or
/// Sentinel), or with a partition hash tag after the prefix (Redis Cluster):
/// `{prefix}:{p<partition>}:pair:{lower}:{higher}`. Either way the channel
/// is named from the two sorted user IDs.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    prefix: &'a str,
    tagged: bool,
}

impl<'a> Names<'a> {
    /// Names under `prefix`; `tagged` for a Redis Cluster.
    pub fn new(prefix: &'a str, tagged: bool) -> Self {
        Self { prefix, tagged }
    }

    fn head(&self, pair: &PairId) -> std::borrow::Cow<'a, str> {
        if self.tagged {
            format!("{}:{{p{}}}", self.prefix, pair.partition()).into()
        } else {
            self.prefix.into()
        }
    }

    /// The pair's pub/sub channel.
    pub fn channel(&self, pair: &PairId) -> String {
        pair.channel(&self.head(pair))
    }

    /// `user`'s presence key in the pair.
    pub fn presence_key(&self, pair: &PairId, user: &UserId) -> String {
        pair.presence_key(&self.head(pair), user)
    }

    /// The pair's history stream (with resume on): `{prefix}:history:{lower}:{higher}`,
    /// in the channel's slot.
    pub fn history_key(&self, pair: &PairId) -> String {
        history_key(&self.channel(pair))
    }
}

/// The history stream's key of a pair's `channel` (see [`Names::history_key`]):
/// the channel's name with `:history:` for its last `:pair:` (IDs hold no `:`).
pub fn history_key(channel: &str) -> String {
    match channel.rfind(":pair:") {
        Some(at) => format!("{}:history:{}", &channel[..at], &channel[at + ":pair:".len()..]),
        None => format!("{channel}:history"),
    }
}

/// The counter of a sender's numbered messages (confirmed sends) beside the
/// pair's history `stream` (so in its slot): `{stream}:sent:{lineage:x}`.
pub fn sent_key(stream: &str, lineage: u64) -> String {
    format!("{stream}:sent:{lineage:x}")
}

/// Who a new session is: the connecting user and their pair, validated.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The connecting user.
    pub user: UserId,
    /// The pair of the user and the peer.
    pub pair: PairId,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn accepts_the_alphabet_and_bounds() {
        assert!(UserId::parse("A-z_0.9").is_ok());
        assert!(UserId::parse(&"a".repeat(64)).is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::Empty));
        assert_eq!(UserId::parse(&"a".repeat(65)), Err(IdError::TooLong));
        for bad in ["a b", "a:b", "a/b", "é", "a\n", "a%20", "<script>"] {
            assert_eq!(UserId::parse(bad), Err(IdError::BadChar), "{bad:?}");
        }
    }

    #[test]
    fn pair_is_order_free_and_rejects_self() {
        let (a, b) = (id("alice"), id("bob"));
        assert_eq!(PairId::new(&a, &b), PairId::new(&b, &a));
        assert_eq!(PairId::new(&a, &a), Err(SameUser));
        let p = PairId::new(&b, &a).unwrap();
        assert_eq!(p.channel("sb"), "sb:pair:alice:bob");
        assert!(p.is_polite(&b) && !p.is_polite(&a));
        assert_eq!(Names::new("sb", false).history_key(&p), "sb:history:alice:bob");
        let tagged = Names::new("sb:pair:x", true);
        let (channel, history) = (tagged.channel(&p), tagged.history_key(&p));
        assert_eq!(history, channel.replace(":pair:alice", ":history:alice"), "only the pair's own `:pair:`");
        assert_eq!(
            redis_protocol::redis_keyslot(history.as_bytes()),
            redis_protocol::redis_keyslot(channel.as_bytes())
        );
    }

    #[test]
    fn punctuated_ids_do_not_collide() {
        let pairs = [("a-b", "c"), ("a", "b-c"), ("a.b", "c"), ("a", "b.c"), ("a_b", "c"), ("a", "b_c")];
        let mut seen = std::collections::HashSet::new();
        for (x, y) in pairs {
            let p = PairId::new(&id(x), &id(y)).unwrap();
            assert!(seen.insert(p.channel("switchboard")), "{x},{y}");
            assert_eq!(PairId::from_channel("switchboard", &p.channel("switchboard")), Some(p));
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const ID: &str = "[A-Za-z0-9_.-]{1,64}";

    proptest! {
        #[test]
        fn valid_ids_parse_and_round_trip(raw in ID) {
            let id = UserId::parse(&raw).unwrap();
            prop_assert_eq!(id.as_str(), raw.as_str());
        }

        #[test]
        fn anything_else_is_refused(raw in ".*") {
            let ok = !raw.is_empty() && raw.len() <= MAX_ID_LEN && raw.bytes().all(is_id_byte);
            prop_assert_eq!(UserId::parse(&raw).is_ok(), ok);
        }

        #[test]
        fn channel_is_symmetric_and_parses_back(a in ID, b in ID) {
            prop_assume!(a != b);
            let (a, b) = (UserId::parse(&a).unwrap(), UserId::parse(&b).unwrap());
            let ab = PairId::new(&a, &b).unwrap();
            prop_assert_eq!(ab.channel("sb"), PairId::new(&b, &a).unwrap().channel("sb"));
            prop_assert_eq!(PairId::from_channel("sb", &ab.channel("sb")), Some(ab.clone()));
            prop_assert!(ab.is_polite(&a) != ab.is_polite(&b), "exactly one side is polite");
        }

        #[test]
        fn a_cluster_pair_keeps_its_names_in_one_slot(a in ID, b in ID) {
            prop_assume!(a != b);
            let (a, b) = (UserId::parse(&a).unwrap(), UserId::parse(&b).unwrap());
            let pair = PairId::new(&a, &b).unwrap();
            let names = Names::new("sb", true);
            let channel = names.channel(&pair);
            let slot = redis_protocol::redis_keyslot(channel.as_bytes());
            prop_assert_eq!(slot, redis_protocol::redis_keyslot(names.presence_key(&pair, &a).as_bytes()));
            prop_assert_eq!(slot, redis_protocol::redis_keyslot(names.presence_key(&pair, &b).as_bytes()));
            prop_assert_eq!(slot, redis_protocol::redis_keyslot(format!("{{p{}}}", pair.partition()).as_bytes()));
            prop_assert_eq!(PairId::from_channel("sb", &channel), Some(pair.clone()));
            let sorted = pair.channel("");
            prop_assert!(channel.ends_with(&sorted), "{} is named from the sorted IDs", channel);
            // Plain names are today's.
            prop_assert_eq!(Names::new("sb", false).channel(&pair), pair.channel("sb"));
        }

        #[test]
        fn distinct_pairs_never_share_a_channel(a in ID, b in ID, c in ID, d in ID) {
            prop_assume!(a != b && c != d);
            let p = PairId::new(&UserId::parse(&a).unwrap(), &UserId::parse(&b).unwrap()).unwrap();
            let q = PairId::new(&UserId::parse(&c).unwrap(), &UserId::parse(&d).unwrap()).unwrap();
            prop_assert_eq!(p == q, p.channel("sb") == q.channel("sb"));
        }
    }
}
