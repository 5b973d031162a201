//! Kernel memory held by sockets: TCP buffer memory from `/proc/net/sockstat` and the slab caches
//! a TCP socket lives in, from `/proc/slabinfo` (readable by root only; left out otherwise).
//!
//! Both are machine-wide (the network namespace, the whole kernel), so a reading taken before
//! and after opening N connections on loopback holds both ends of every connection, the load
//! generator's client sockets as well as the server's, and whatever else the machine did.

use std::collections::BTreeMap;

/// Slab caches that grow with each open TCP socket: the socket itself (`TCP`, `TCPv6`), its
/// inode (`sock_inode_cache`), its file and dentry, its epoll registration, and the bind bucket
/// of an explicitly bound client port.
pub const SOCKET_CACHES: &[&str] = &[
    "TCP",
    "TCPv6",
    "sock_inode_cache",
    "filp",
    "dentry",
    "eventpoll_epi",
    "eventpoll_pwq",
    "tcp_bind_bucket",
    "tcp_bind2_bucket",
];

/// The `TCP:` line of `/proc/net/sockstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStat {
    /// Sockets in use (not counting TIME_WAIT).
    pub inuse: u64,
    /// Sockets allocated.
    pub alloc: u64,
    /// Pages charged to TCP buffers (`tcp_memory_allocated`).
    pub mem_pages: u64,
}

/// Parses the `TCP:` line of `/proc/net/sockstat`.
pub fn parse_sockstat(text: &str) -> Option<TcpStat> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| -> Option<u64> {
        let i = words.iter().position(|w| *w == name)?;
        words.get(i + 1)?.parse().ok()
    };
    Some(TcpStat { inuse: field("inuse")?, alloc: field("alloc")?, mem_pages: field("mem")? })
}

/// Bytes held by each named slab cache (slabs × pages per slab × page size), from
/// `/proc/slabinfo` (version 2.1). Only caches named in `wanted` are kept; a cache listed
/// twice (several kmem caches may share a name) is summed.
pub fn parse_slabinfo(text: &str, wanted: &[&str], page_size: u64) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("slabinfo") || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = words.first() else { continue };
        if !wanted.contains(name) {
            continue;
        }
        // name active_objs num_objs objsize objperslab pagesperslab : tunables l b s
        //   : slabdata active_slabs num_slabs sharedavail
        let pages_per_slab = words.get(5).and_then(|w| w.parse::<u64>().ok());
        let num_slabs = words
            .iter()
            .position(|w| *w == "slabdata")
            .and_then(|i| words.get(i + 2))
            .and_then(|w| w.parse::<u64>().ok());
        if let (Some(pps), Some(slabs)) = (pages_per_slab, num_slabs) {
            *out.entry((*name).to_string()).or_insert(0) += slabs * pps * page_size;
        }
    }
    out
}

/// One reading of the kernel's socket memory.
#[derive(Clone, Debug, Default)]
pub struct KernelSnap {
    /// `/proc/net/sockstat`, if readable.
    pub tcp: Option<TcpStat>,
    /// Bytes per socket-related slab cache, if `/proc/slabinfo` is readable.
    pub slabs: Option<BTreeMap<String, u64>>,
}

/// The kernel's page size (the unit of sockstat's `mem`).
pub fn page_size() -> u64 {
    procfs::page_size()
}

impl KernelSnap {
    /// Reads both files now.
    pub fn take() -> Self {
        let tcp = std::fs::read_to_string("/proc/net/sockstat").ok().and_then(|t| parse_sockstat(&t));
        let slabs = std::fs::read_to_string("/proc/slabinfo")
            .ok()
            .map(|t| parse_slabinfo(&t, SOCKET_CACHES, page_size()))
            .filter(|m| !m.is_empty());
        Self { tcp, slabs }
    }
}

/// What `after - before` says per connection, both ends of each connection included.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelDelta {
    /// Growth of TCP `inuse` (both ends: about 2 per connection).
    pub tcp_inuse: i64,
    /// Growth of TCP buffer memory in bytes.
    pub tcp_mem_bytes: i64,
    /// Growth of the socket slab caches in bytes, if readable, with each cache's share.
    pub slab_bytes: Option<(i64, BTreeMap<String, i64>)>,
}

/// The difference between two readings.
pub fn delta(before: &KernelSnap, after: &KernelSnap, page_size: u64) -> Option<KernelDelta> {
    let (b, a) = (before.tcp?, after.tcp?);
    let slab_bytes = match (&before.slabs, &after.slabs) {
        (Some(b), Some(a)) => {
            let per: BTreeMap<String, i64> =
                a.iter().map(|(k, v)| (k.clone(), *v as i64 - b.get(k).copied().unwrap_or(0) as i64)).collect();
            Some((per.values().sum(), per))
        }
        _ => None,
    };
    Some(KernelDelta {
        tcp_inuse: a.inuse as i64 - b.inuse as i64,
        tcp_mem_bytes: (a.mem_pages as i64 - b.mem_pages as i64) * page_size as i64,
        slab_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKSTAT: &str = "sockets: used 41\nTCP: inuse 15 orphan 0 tw 2 alloc 18 mem 252\n\
                            UDP: inuse 0 mem 0\nUDPLITE: inuse 0\n";

    const SLABINFO: &str = "slabinfo - version: 2.1\n\
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n\
TCP                  200    224   2432   13    8 : tunables    0    0    0 : slabdata     17     17      0\n\
sock_inode_cache     400    420    768   21    4 : tunables    0    0    0 : slabdata     20     20      0\n\
kmalloc-64          9000   9024     64   64    1 : tunables    0    0    0 : slabdata    141    141      0\n";

    #[test]
    fn parses_the_tcp_line_of_sockstat() {
        assert_eq!(parse_sockstat(SOCKSTAT), Some(TcpStat { inuse: 15, alloc: 18, mem_pages: 252 }));
        assert_eq!(parse_sockstat("sockets: used 1\nUDP: inuse 0 mem 0\n"), None);
    }

    #[test]
    fn parses_slab_pages_of_wanted_caches_only() {
        let m = parse_slabinfo(SLABINFO, SOCKET_CACHES, 4096);
        assert_eq!(m.get("TCP"), Some(&(17 * 8 * 4096)));
        assert_eq!(m.get("sock_inode_cache"), Some(&(20 * 4 * 4096)));
        assert!(!m.contains_key("kmalloc-64"));
    }

    #[test]
    fn delta_counts_pages_and_caches() {
        let before = KernelSnap {
            tcp: Some(TcpStat { inuse: 10, alloc: 12, mem_pages: 100 }),
            slabs: Some(parse_slabinfo(SLABINFO, SOCKET_CACHES, 4096)),
        };
        let grown = SLABINFO.replace("slabdata     17     17", "slabdata     27     27");
        let after = KernelSnap {
            tcp: Some(TcpStat { inuse: 2010, alloc: 2012, mem_pages: 150 }),
            slabs: Some(parse_slabinfo(&grown, SOCKET_CACHES, 4096)),
        };
        let d = delta(&before, &after, 4096).unwrap();
        assert_eq!(d.tcp_inuse, 2000);
        assert_eq!(d.tcp_mem_bytes, 50 * 4096);
        let (total, per) = d.slab_bytes.unwrap();
        assert_eq!(total, 10 * 8 * 4096);
        assert_eq!(per["TCP"], 10 * 8 * 4096);
        assert_eq!(per["sock_inode_cache"], 0);
        assert!(delta(&KernelSnap::default(), &after, 4096).is_none());
    }
}
