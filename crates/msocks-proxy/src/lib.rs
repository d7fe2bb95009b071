//! The msocks proxy: a SOCKS5 server (RFC 1928, RFC 1929) on tokio, built around the
//! sans-I/O wire format of [`msocks_proto`].
//!
//! Layout, one concept per module:
//! - [`config`]: the TOML configuration and its defaults;
//! - [`auth`]: the users file and password verification;
//! - [`rules`]: allow/deny access rules, first match wins;
//! - [`server`]: listeners, accept loop, handshake and session limits, graceful shutdown;
//! - `session`: one client from handshake to close (with `bind` and `udp` for those
//!   commands);
//! - [`handshake`]: the bounded buffer in front of the decoders;
//! - [`resolve`] and [`connect`]: reaching the destination, and mapping failures to replies;
//! - [`relay`]: the userspace `relay` engine that copies a plain session's bytes;
//! - `kernel`: the `kernel` engine (Linux TCP Splice, crate `msocks-splice`) for plain
//!   sessions, falling back to `relay`;
//! - `mobile` and `registry`: MSOCKS sessions — retention of unacknowledged bytes, parking,
//!   RECONNECT and the resplice; `standby`: pre-opened connections answering liveness
//!   probes; [`tcp_state`]: what the kernel says about acknowledgments.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
mod bind;
pub mod config;
pub mod connect;
pub mod handshake;
mod kernel;
mod kernel_mobile;
mod mobile;
mod registry;
pub mod relay;
pub mod resolve;
pub mod rules;
pub mod server;
mod session;
mod standby;
pub mod tcp_state;
mod udp;

pub use auth::Credentials;
pub use config::ProxyConfig;
pub use server::Proxy;
