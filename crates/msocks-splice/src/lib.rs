//! The `kernel` splice engine of msocks: the paper's TCP Splice (section
//! III-B) done at packet level.
//!
//! After the SOCKS exchange the proxy holds two TCP connections, one from
//! the client and one to the server. This crate freezes both sockets and
//! installs the pair in an eBPF datapath at tc ingress, which from then on
//! rewrites each segment of one connection into the other and redirects it,
//! so the proxy never acknowledges data on its own. See
//! `docs/KERNEL-SPLICE.md`.
//!
//! Modules: [`mapping`] (the arithmetic, sans I/O), [`maps`] (the table
//! layout shared with the C datapath), and on Linux [`repair`] (socket
//! freezing), [`loader`] (loading and attaching), [`splice`] (the
//! control plane) and [`engine`] (all of it as one service for the proxy).

#![warn(missing_docs)]

pub mod mapping;
pub mod maps;

#[cfg(target_os = "linux")]
pub mod engine;
#[cfg(target_os = "linux")]
pub mod loader;
#[cfg(target_os = "linux")]
pub mod repair;
#[cfg(target_os = "linux")]
pub mod splice;

#[cfg(target_os = "linux")]
pub use engine::Engine;
#[cfg(target_os = "linux")]
pub use loader::{Datapath, Hook};
#[cfg(target_os = "linux")]
pub use splice::{
    hold, splice, splice_with, Drain, Holding, MoveFailed, Options, Refused, Resume,
    SharedDatapath, Spliced, Status,
};

/// Boxed source error from the loader library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not Linux: there is no kernel engine.
    #[error("the kernel splice engine needs Linux")]
    Unsupported,
    /// The engine could not be loaded in this process (the reason was
    /// reported when loading failed).
    #[error("the kernel splice engine is not loaded")]
    Unavailable,
    /// The object did not load or verify (no privilege, no BPF, old kernel).
    #[error("loading the splice datapath: {0}")]
    Load(#[source] BoxError),
    /// The object lacks a program or map this crate expects.
    #[error("the splice object has no {0}")]
    Missing(&'static str),
    /// Attaching to an interface failed.
    #[error("attaching the splice datapath to {iface}: {source}")]
    Attach {
        /// The interface.
        iface: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// A map operation failed.
    #[error("splice table: {0}")]
    Map(#[source] BoxError),
    /// A socket call failed.
    #[error("{op}: {source}")]
    Socket {
        /// The call.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The two connections cannot be spliced as negotiated.
    #[error("connections cannot be spliced: {0}")]
    Incompatible(String),
    /// The sockets' queues did not drain in time.
    #[error("the proxy's sockets did not drain in time")]
    DrainTimeout,
    /// A peer had already closed its side.
    #[error("a peer already sent FIN")]
    PeerClosed,
}
