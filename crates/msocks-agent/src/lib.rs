//! The msocks mobile-node agent: the MSOCKS paper's promise (Maltz & Bhagwat, sections I–III)
//! for programs that know nothing about it.
//!
//! * A local SOCKS5 endpoint (default `127.0.0.1:1080`; no authentication, CONNECT) that
//!   curl, browsers and ssh use as they are; every local connection becomes an MSOCKS
//!   [`MobileStream`](msocks_client::MobileStream) to the proxy.
//! * A policy ([`config`], [`policy`]): interfaces with the proxy address routed out of
//!   each, and first-match rules by destination and local program that choose, separately,
//!   the interface data leaves by (the proxy address) and the one it arrives on (the local
//!   address), with `wait` or `fail` when none is usable.
//! * Link following ([`links`]): when an interface stops being usable its streams move at
//!   once to their next allowed path, and back when a preferred one returns; optional host
//!   routes ([`routes`]) make the outbound choice stick.
//! * Liveness probes and warm standby connections ([`probe`]): a path that stops answering
//!   for `probe_timeout` (default 1 s) is left although its link is up, and a move onto an
//!   interface with a ready standby connection costs one RECONNECT round trip.
//! * SIGHUP reloads the policy and re-places every stream; a control socket ([`control`])
//!   serves `msocks status` and `msocks move`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod agent;
pub mod config;
pub mod control;
pub mod error;
pub mod links;
pub mod peer;
pub mod policy;
pub mod probe;
pub mod routes;
pub mod socks;
mod udp;

pub use agent::Agent;
pub use config::AgentConfig;
pub use error::{AgentError, ConfigError, ControlError};
