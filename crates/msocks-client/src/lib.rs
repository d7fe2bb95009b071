//! The MSOCKS library (Maltz & Bhagwat, "MSOCKS: An Architecture for Transport Layer
//! Mobility", section III-C) for mobility-aware programs: TCP streams through an msocks proxy
//! that survive moves between addresses, interfaces and proxy addresses, with no byte lost
//! or duplicated.
//!
//! * [`MobileStream::connect`] opens a stream with MSOCKS CONNECT (`0x81`) and returns an
//!   `AsyncRead + AsyncWrite` stream; [`MobileStream::bind`] does MSOCKS BIND (`0x82`).
//!   [`blocking::MobileStream`] offers `Read + Write` for programs without a runtime.
//! * Each stream chooses its [`ProxyPath`]: the proxy address (which, with host routes,
//!   picks the outgoing interface), the local address (which picks the interface data
//!   arrives on) and optionally an interface to bind to.
//! * [`MobileControl::migrate`] moves a stream to another path (make-before-break); when
//!   the connection to the proxy fails, the stream reconnects on its own over the configured
//!   paths, until [`MobileConfig::reconnect_deadline`].
//! * [`Standby`] opens an authenticated connection ahead of need on a path: its
//!   [`ping`](Standby::ping) probes the path's liveness, [`MobileControl::migrate_via`]
//!   moves a stream onto it with one RECONNECT round trip, and
//!   [`MobileStream::connect_via`] opens a new stream on it.
//! * Moves use early resend ([`MobileConfig::early_resend`], PROTOCOL.md 3.7.1): the
//!   bytes the proxy may lack follow the RECONNECT at once and new bytes flow before its
//!   reply, so the direction to the server resumes half a round trip after the RECONNECT
//!   leaves.
//!
//! How the byte counters work (PROTOCOL.md 3.2 and 3.7): `data_read` counts every byte taken
//! out of the stream's sockets, including bytes still in the library's buffers, because
//! those survive a move; `data_written` counts every byte written into the sockets. A ring
//! buffer keeps the last bytes written, sized by the socket's `SO_SNDBUF`, and the library
//! never lets more bytes than the ring holds be unacknowledged by the proxy's TCP, so every
//! RECONNECT can be honoured. After a successful RECONNECT the library reads `data_salvage`
//! bytes out of the old socket before anything from the new one, and writes the last
//! `data_write` bytes again into the new connection before new data.
//!
//! ```no_run
//! use msocks_client::{MobileConfig, MobileStream, ProxyPath};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let wired = ProxyPath::new("192.0.2.1:1080".parse()?).with_local_addr("198.51.100.7".parse()?);
//! let radio = ProxyPath::new("192.0.2.2:1080".parse()?).with_interface("wlan0");
//! let mut config = MobileConfig::new(wired);
//! config.paths.push(radio.clone());
//!
//! let mut stream = MobileStream::connect("203.0.113.5:80".parse::<std::net::SocketAddr>()?, config).await?;
//! stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
//! let report = stream.migrate(radio).await?; // the wired link is about to go away
//! println!("moved in {:?}, salvaged {} bytes", report.duration, report.data_salvage);
//! let mut page = Vec::new();
//! stream.read_to_end(&mut page).await?;
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod actor;
pub mod blocking;
mod config;
mod error;
mod handshake;
mod ring;
mod standby;
mod stream;
mod sys;

pub use config::{
    Credentials, MobileConfig, ProxyPath, DEFAULT_RECONNECT_DEADLINE, DEFAULT_SEND_BUFFER,
};
pub use error::Error;
pub use msocks_proto::{ConnectionId, SessionToken, TargetAddr};
pub use standby::Standby;
pub use stream::{MobileBind, MobileControl, MobileStream, MoveReport, StreamState, StreamStatus};
