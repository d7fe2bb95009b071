//! Destination name resolution: names are checked for being possible DNS names first (so a
//! hopeless name costs no query), then resolved asynchronously with a deadline.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use msocks_proto::TargetAddr;
use thiserror::Error;

/// Why a destination has no address.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ResolveError {
    /// The name can never resolve (too long, empty label, control characters).
    #[error("{0:?} is not a valid host name")]
    InvalidName(String),
    /// The resolver answered with no address or an error.
    #[error("{name:?} did not resolve: {reason}")]
    NotFound {
        /// The name.
        name: String,
        /// What the resolver said.
        reason: String,
    },
    /// The resolver did not answer in time.
    #[error("resolving {0:?} timed out")]
    Timeout(String),
}

/// Whether `name` can be a DNS host name: 1 to 253 characters (without a trailing dot),
/// labels of 1 to 63, no whitespace or control characters.
pub fn is_valid_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The addresses of a destination: the address itself for an IP, the resolver's answers for
/// a name (an IP literal sent as a name is taken as is, with no query).
pub async fn resolve(
    target: &TargetAddr,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let (name, port) = match target {
        TargetAddr::Ip(sa) => return Ok(vec![*sa]),
        TargetAddr::Domain(name, port) => (name, *port),
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if !is_valid_host_name(name) {
        return Err(ResolveError::InvalidName(name.clone()));
    }
    match tokio::time::timeout(timeout, tokio::net::lookup_host((name.as_str(), port))).await {
        Err(_) => Err(ResolveError::Timeout(name.clone())),
        Ok(Err(e)) => Err(ResolveError::NotFound {
            name: name.clone(),
            reason: e.to_string(),
        }),
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                Err(ResolveError::NotFound {
                    name: name.clone(),
                    reason: "no addresses".into(),
                })
            } else {
                Ok(addrs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_limits() {
        assert!(is_valid_host_name("localhost"));
        assert!(is_valid_host_name("a.b.example."));
        assert!(!is_valid_host_name(""));
        assert!(!is_valid_host_name("a..b"));
        assert!(!is_valid_host_name(&"a".repeat(64)));
        assert!(is_valid_host_name(&"a".repeat(63)));
        let long = vec!["abcdefghi"; 26].join("."); // 259 characters
        assert!(!is_valid_host_name(&long));
        assert!(!is_valid_host_name("bad name"));
    }

    #[tokio::test]
    async fn literals_and_localhost() {
        let t = TargetAddr::Domain("127.0.0.1".into(), 80);
        assert_eq!(
            resolve(&t, Duration::from_secs(1)).await.unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], 80))]
        );
        let t = TargetAddr::Domain("localhost".into(), 80);
        let addrs = resolve(&t, Duration::from_secs(5)).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
        let t = TargetAddr::Domain("x".repeat(255), 80);
        assert!(matches!(
            resolve(&t, Duration::from_secs(1)).await,
            Err(ResolveError::InvalidName(_))
        ));
    }
}
