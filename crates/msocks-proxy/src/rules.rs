//! Access rules in the spirit of dante's: each `[[rule]]` allows or denies requests by
//! client network, destination network, destination name, port, user and command. Rules are
//! tried in order and the first that matches decides.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use msocks_proto::Command;
use serde::{Deserialize, Deserializer};

/// What a rule does with the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Serve the request.
    Allow,
    /// Refuse it with reply 0x02.
    Deny,
}

/// A command name as written in rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandName {
    /// CONNECT (plain or MSOCKS).
    Connect,
    /// BIND (plain or MSOCKS).
    Bind,
    /// UDP ASSOCIATE.
    #[serde(alias = "udp")]
    UdpAssociate,
}

impl CommandName {
    fn matches(self, c: Command) -> bool {
        matches!(
            (self, c),
            (CommandName::Connect, Command::Connect)
                | (CommandName::Bind, Command::Bind)
                | (CommandName::UdpAssociate, Command::UdpAssociate)
        )
    }
}

/// An inclusive port range, written as `80` or `"8000-8100"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(i64),
            Text(String),
        }
        let port = |v: i64| u16::try_from(v).map_err(|_| format!("port {v} is out of range"));
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("bad port {s:?}"))
        };
        let range = match Raw::deserialize(d)? {
            Raw::Num(n) => port(n).map(|p| PortRange { first: p, last: p }),
            Raw::Text(s) => match s.split_once('-') {
                Some((a, b)) => {
                    parse(a).and_then(|a| parse(b).map(|b| PortRange { first: a, last: b }))
                }
                None => parse(&s).map(|p| PortRange { first: p, last: p }),
            },
        }
        .map_err(serde::de::Error::custom)?;
        if range.first > range.last {
            return Err(serde::de::Error::custom(format!(
                "port range {}-{} is empty",
                range.first, range.last
            )));
        }
        Ok(range)
    }
}

/// One `[[rule]]` of the config. Every condition left out matches anything; a rule matches
/// a request when all its conditions do.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A name shown in log lines (the rule's number is shown either way).
    #[serde(default)]
    pub name: Option<String>,
    /// Allow or deny.
    pub action: Action,
    /// Client networks (`"10.0.0.0/8"`, `"::1/128"`).
    #[serde(default)]
    pub from: Vec<IpNet>,
    /// Destination networks, matched against the destination's IP address (after name
    /// resolution when the client sent a name).
    #[serde(default)]
    pub to: Vec<IpNet>,
    /// Destination names as the client sent them: `"example.com"` exactly, `"*.example.com"`
    /// for any name below it, `"*"` for any name. Requests by IP address never match `hosts`.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Destination ports.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Authenticated user names; a rule with users never matches an unauthenticated client.
    #[serde(default)]
    pub users: Vec<String>,
    /// Commands.
    #[serde(default)]
    pub commands: Vec<CommandName>,
}

impl RuleConfig {
    /// Checks the host patterns.
    pub fn validate(&self) -> Result<(), String> {
        for h in &self.hosts {
            let rest = h.strip_prefix("*.").unwrap_or(h);
            if rest.is_empty() || rest.contains('*') && h != "*" {
                return Err(format!(
                    "host pattern {h:?}: `*` may only stand alone or as `*.` at the start"
                ));
            }
        }
        Ok(())
    }

    fn host_matches(&self, host: Option<&str>) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some(host) = host else { return false };
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|p| {
            let p = p.trim_end_matches('.');
            if p == "*" {
                true
            } else if let Some(suffix) = p.strip_prefix("*.") {
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            } else {
                host.eq_ignore_ascii_case(p)
            }
        })
    }
}

/// What is known about a request when the rules are asked.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// The authenticated user, if any.
    pub user: Option<&'a str>,
    /// The command.
    pub command: Command,
    /// The destination name, when the client sent one.
    pub host: Option<&'a str>,
    /// The destination port.
    pub port: u16,
    /// The destination address; `None` while a name is not yet resolved.
    pub ip: Option<IpAddr>,
}

/// Which rule decided, for log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// 1-based position in the config; `None` for the implicit final rule.
    pub number: Option<usize>,
    /// The rule's name, if it has one.
    pub name: Option<String>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.number, &self.name) {
            (None, _) => f.write_str("no rule matched (default)"),
            (Some(n), None) => write!(f, "rule #{n}"),
            (Some(n), Some(name)) => write!(f, "rule #{n} ({name})"),
        }
    }
}

/// The answer of the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Allow(RuleRef),
    /// Refuse it (reply 0x02).
    Deny(RuleRef),
    /// A rule that may decide tests the destination address, which is not known yet:
    /// resolve the name and ask again with `ip` set.
    NeedsAddress,
}

/// The ordered rule list.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Vec<RuleConfig>,
}

impl RuleSet {
    /// Wraps validated rules.
    pub fn new(rules: Vec<RuleConfig>) -> Self {
        RuleSet { rules }
    }

    fn reference(&self, i: usize) -> RuleRef {
        RuleRef {
            number: Some(i + 1),
            name: self.rules[i].name.clone(),
        }
    }

    fn default_verdict(&self) -> Verdict {
        let r = RuleRef {
            number: None,
            name: None,
        };
        // No rules: an open proxy (the zero-config default). Rules: deny what none allows.
        if self.rules.is_empty() {
            Verdict::Allow(r)
        } else {
            Verdict::Deny(r)
        }
    }

    /// Everything but the destination address and the port.
    fn matches_without_destination(rule: &RuleConfig, q: &Query<'_>) -> bool {
        (rule.from.is_empty() || rule.from.iter().any(|n| n.contains(&q.client)))
            && (rule.users.is_empty() || q.user.is_some_and(|u| rule.users.iter().any(|x| x == u)))
            && (rule.commands.is_empty() || rule.commands.iter().any(|c| c.matches(q.command)))
    }

    /// The first matching rule's verdict, or [`Verdict::NeedsAddress`].
    pub fn evaluate(&self, q: &Query<'_>) -> Verdict {
        for (i, rule) in self.rules.iter().enumerate() {
            if !Self::matches_without_destination(rule, q)
                || !rule.host_matches(q.host)
                || !(rule.ports.is_empty()
                    || rule
                        .ports
                        .iter()
                        .any(|r| (r.first..=r.last).contains(&q.port)))
            {
                continue;
            }
            if !rule.to.is_empty() {
                match q.ip {
                    None => return Verdict::NeedsAddress,
                    Some(ip) if !rule.to.iter().any(|n| n.contains(&ip)) => continue,
                    Some(_) => {}
                }
            }
            return match rule.action {
                Action::Allow => Verdict::Allow(self.reference(i)),
                Action::Deny => Verdict::Deny(self.reference(i)),
            };
        }
        self.default_verdict()
    }

    /// May this client open a UDP association at all? Datagrams are checked one by one
    /// later; here a rule that tests the destination cannot refuse the association, since
    /// datagrams to other destinations may still be allowed.
    pub fn evaluate_association(&self, client: IpAddr, user: Option<&str>) -> Verdict {
        let q = Query {
            client,
            user,
            command: Command::UdpAssociate,
            host: None,
            port: 0,
            ip: None,
        };
        for (i, rule) in self.rules.iter().enumerate() {
            if !Self::matches_without_destination(rule, &q) {
                continue;
            }
            let tests_destination =
                !rule.to.is_empty() || !rule.hosts.is_empty() || !rule.ports.is_empty();
            match rule.action {
                Action::Allow => return Verdict::Allow(self.reference(i)),
                Action::Deny if !tests_destination => return Verdict::Deny(self.reference(i)),
                Action::Deny => continue,
            }
        }
        self.default_verdict()
    }
}
