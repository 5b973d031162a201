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

    /// Parses a channel name made by [`PairId::channel`] with the same prefix.
    pub fn from_channel(prefix: &str, channel: &str) -> Option<Self> {
        let rest = channel.strip_prefix(prefix)?.strip_prefix(":pair:")?;
        let (a, b) = rest.split_once(':')?;
        let pair = Self::new(&UserId::parse(a).ok()?, &UserId::parse(b).ok()?).ok()?;
        (pair.lower.as_str() == a).then_some(pair)
    }
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
        fn distinct_pairs_never_share_a_channel(a in ID, b in ID, c in ID, d in ID) {
            prop_assume!(a != b && c != d);
            let p = PairId::new(&UserId::parse(&a).unwrap(), &UserId::parse(&b).unwrap()).unwrap();
            let q = PairId::new(&UserId::parse(&c).unwrap(), &UserId::parse(&d).unwrap()).unwrap();
            prop_assert_eq!(p == q, p.channel("sb") == q.channel("sb"));
        }
    }
}
