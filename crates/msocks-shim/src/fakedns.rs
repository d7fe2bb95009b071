//! Remote DNS: placeholder addresses standing for names, so the name reaches the agent.
//!
//! `getaddrinfo("example.org")` answers with an address from 198.18.0.0/15 (reserved for
//! benchmarking by RFC 2544, so it names nothing real a program would otherwise reach) and
//! remembers which name it stands for; `connect` to that address sends the agent a SOCKS5
//! DOMAINNAME request. The table lives in the process: a fork inherits it, an exec starts
//! empty (a placeholder passed to a newly exec'd program is just an address to it).

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// First placeholder address (198.18.0.0 itself is skipped: a network address looks odd).
const FIRST: u32 = u32::from_be_bytes([198, 18, 0, 1]);
/// Last placeholder address (198.19.255.255).
const LAST: u32 = u32::from_be_bytes([198, 19, 255, 255]);

/// True if `ip` lies in the placeholder range.
pub fn in_range(ip: Ipv4Addr) -> bool {
    (FIRST - 1..=LAST).contains(&u32::from(ip))
}

/// The name ⇄ placeholder table of one process.
#[derive(Debug, Default)]
pub struct FakeDns {
    by_name: HashMap<String, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, String>,
    next: u32,
}

impl FakeDns {
    /// An empty table.
    pub fn new() -> FakeDns {
        FakeDns::default()
    }

    /// The placeholder for `name` (already normalized), the same one every time; `None` when
    /// the name cannot travel in SOCKS5 (empty, over 255 bytes) or all 131071 placeholders are
    /// taken (then the caller resolves locally rather than reuse an address another name owns).
    pub fn address_for(&mut self, name: &str) -> Option<Ipv4Addr> {
        if name.is_empty() || name.len() > 255 {
            return None;
        }
        if let Some(ip) = self.by_name.get(name) {
            return Some(*ip);
        }
        let n = FIRST.checked_add(self.next)?;
        if n > LAST {
            return None;
        }
        self.next += 1;
        let ip = Ipv4Addr::from(n);
        self.by_name.insert(name.to_owned(), ip);
        self.by_addr.insert(ip, name.to_owned());
        Some(ip)
    }

    /// The name `ip` stands for, if this table handed it out.
    pub fn name_for(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_addr.get(&ip).map(String::as_str)
    }

    /// Number of names in the table.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True if no name was looked up yet.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_address_and_back() {
        let mut t = FakeDns::new();
        let a = t.address_for("example.org").unwrap();
        let b = t.address_for("example.net").unwrap();
        assert_eq!(a, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(b, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(t.address_for("example.org"), Some(a));
        assert_eq!(t.name_for(a), Some("example.org"));
        assert_eq!(t.name_for(b), Some("example.net"));
        assert_eq!(t.name_for(Ipv4Addr::new(198, 18, 0, 3)), None);
        assert_eq!(t.len(), 2);
        assert!(in_range(a) && in_range(Ipv4Addr::new(198, 19, 255, 255)));
        assert!(!in_range(Ipv4Addr::new(198, 20, 0, 0)));
        assert!(!in_range(Ipv4Addr::new(198, 17, 255, 255)));
    }

    #[test]
    fn names_that_cannot_travel_get_none() {
        let mut t = FakeDns::new();
        assert_eq!(t.address_for(""), None);
        assert_eq!(t.address_for(&"a".repeat(256)), None);
        assert!(t.address_for(&"a".repeat(255)).is_some());
    }

    #[test]
    fn the_range_runs_out_without_reuse() {
        let mut t = FakeDns::new();
        t.next = LAST - FIRST;
        assert_eq!(
            t.address_for("last.example"),
            Some(Ipv4Addr::new(198, 19, 255, 255))
        );
        assert_eq!(t.address_for("one-too-many.example"), None);
        assert_eq!(
            t.address_for("last.example"),
            Some(Ipv4Addr::new(198, 19, 255, 255))
        );
    }
}
