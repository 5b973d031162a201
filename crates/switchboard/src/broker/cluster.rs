//! Redis Cluster: which master serves which slot, and the slot of a name.
//!
//! The subscriber asks any node it can reach for `CLUSTER SLOTS` when it
//! starts and after each failure (a lost node, a `MOVED`, a subscription
//! that Redis dropped), and places each channel's sharded subscription on
//! the master of its slot.

use std::time::Duration;

use super::target::{self, Target};
use super::BrokerError;

/// The cluster slot of a channel or key (CRC16, `{hash tags}` honoured).
pub fn slot(name: &str) -> u16 {
    redis_protocol::redis_keyslot(name.as_bytes())
}

/// A master's address.
pub type Address = (String, u16);

/// Which master serves which slots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotMap {
    /// `(first slot, last slot, master)`, sorted by first slot.
    ranges: Vec<(u16, u16, Address)>,
}

impl SlotMap {
    /// The master of `slot`, if the map covers it.
    pub fn master_of(&self, slot: u16) -> Option<&Address> {
        let at = self.ranges.partition_point(|(first, ..)| *first <= slot);
        let (first, last, master) = self.ranges.get(at.checked_sub(1)?)?;
        (*first <= slot && slot <= *last).then_some(master)
    }

    /// Whether the map covers nothing (not known yet).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Every master, once each.
    pub fn masters(&self) -> Vec<Address> {
        let mut masters: Vec<Address> = self.ranges.iter().map(|(_, _, m)| m.clone()).collect();
        masters.sort();
        masters.dedup();
        masters
    }

    /// Reads a `CLUSTER SLOTS` reply; `asked` stands in for a master that
    /// names itself with an empty host.
    pub fn parse(reply: &redis::Value, asked: &str) -> Option<Self> {
        let redis::Value::Array(entries) = reply else { return None };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let redis::Value::Array(parts) = entry else { return None };
            let (Some(redis::Value::Int(first)), Some(redis::Value::Int(last)), Some(redis::Value::Array(master))) =
                (parts.first(), parts.get(1), parts.get(2))
            else {
                return None;
            };
            let host = match master.first()? {
                redis::Value::BulkString(h) => String::from_utf8(h.clone()).ok()?,
                redis::Value::SimpleString(h) => h.clone(),
                _ => return None,
            };
            let host = if host.is_empty() || host == "?" { asked.to_owned() } else { host };
            let redis::Value::Int(port) = master.get(1)? else { return None };
            ranges.push((u16::try_from(*first).ok()?, u16::try_from(*last).ok()?, (host, u16::try_from(*port).ok()?)));
        }
        ranges.sort();
        Some(Self { ranges })
    }
}

/// Asks the nodes in turn (`prefer` first, then the seeds) for the slot map.
pub async fn fetch(target: &Target, prefer: &[Address], timeout: Duration) -> Result<SlotMap, BrokerError> {
    let mut last = BrokerError::Connect("no cluster node answered".into());
    for info in target.cluster_nodes(prefer) {
        let asked = target::host_of(&info);
        let name = target::describe(&info);
        let reply = tokio::time::timeout(timeout, async {
            let mut conn = target.connect_to(info, &target::config(timeout)).await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<redis::Value>(&mut conn.conn)
                .await
                .map_err(|e| BrokerError::Connect(format!("{name}: CLUSTER SLOTS: {e}")))
        })
        .await
        .unwrap_or_else(|_| Err(BrokerError::Connect(format!("{name}: no answer within {timeout:?}"))));
        match reply {
            Ok(reply) => match SlotMap::parse(&reply, &asked) {
                Some(map) if !map.ranges.is_empty() => return Ok(map),
                _ => last = BrokerError::Connect(format!("{name}: no usable CLUSTER SLOTS reply")),
            },
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> redis::Value {
        redis::Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn slots_follow_hash_tags() {
        assert_eq!(slot("{p7}:pair:a:b"), slot("{p7}:presence:a:b:a"));
        assert_eq!(slot("foo"), 12182, "the slot Redis's CLUSTER KEYSLOT gives");
    }

    #[test]
    fn a_slot_map_finds_each_slots_master() {
        let node = |port| redis::Value::Array(vec![bulk("127.0.0.1"), redis::Value::Int(port), bulk("id")]);
        let reply = redis::Value::Array(vec![
            redis::Value::Array(vec![redis::Value::Int(5461), redis::Value::Int(10922), node(7001)]),
            redis::Value::Array(vec![redis::Value::Int(0), redis::Value::Int(5460), node(7000)]),
            redis::Value::Array(vec![
                redis::Value::Int(10923),
                redis::Value::Int(16383),
                redis::Value::Array(vec![bulk(""), redis::Value::Int(7002)]),
            ]),
        ]);
        let map = SlotMap::parse(&reply, "10.0.0.9").unwrap();
        assert_eq!(map.master_of(0), Some(&("127.0.0.1".to_owned(), 7000)));
        assert_eq!(map.master_of(5461), Some(&("127.0.0.1".to_owned(), 7001)));
        assert_eq!(map.master_of(16383), Some(&("10.0.0.9".to_owned(), 7002)), "an empty host is the one asked");
        assert_eq!(map.masters().len(), 3);
        let partial = SlotMap { ranges: vec![(0, 10, ("h".into(), 1))] };
        assert_eq!(partial.master_of(11), None);
    }
}
