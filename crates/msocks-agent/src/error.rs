//! The agent's typed errors.

use std::path::PathBuf;

use thiserror::Error;

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, ...), or a value
    /// in it is well-formed but unusable (a rule naming an interface that is not configured).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// A value is well-formed but unusable.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Why the agent could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A local SOCKS5 listener could not be opened.
    #[error("cannot listen on {addr}: {source}{}", listen_hint(.source))]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}{}", control_hint(.source))]
    Control {
        /// The socket's path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The link watcher failed.
    #[error("watching the network interfaces: {0}")]
    Links(#[from] crate::links::LinkError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

/// What to do about a listener that cannot be opened, for the error message.
fn listen_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another agent, or `msocks proxy`, already listens there: stop it or give \
             --listen another ADDR:PORT)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (that address is not on this host)",
        _ => "",
    }
}

/// What to do about a control socket that cannot be created, for the error message.
fn control_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            " (run the agent as root, or give --control PATH (or `control` in the config) in \
             a directory you can write; msocks status/move then need the same path)"
        }
        _ => "",
    }
}

/// Why a control request failed on the client side.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The agent's socket could not be reached.
    #[error(
        "cannot reach the agent at {path}: {source} (is `msocks agent` running, with this \
         `control` socket? If its config sets another path, pass --control PATH or set \
         MSOCKS_CONTROL; the socket is mode 0600, so run as the agent's user)"
    )]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    /// The agent's answer was not valid JSON for the protocol.
    #[error("the agent sent an invalid answer: {0}")]
    Json(#[from] serde_json::Error),
    /// The agent closed the socket without answering.
    #[error("the agent closed the control connection without answering")]
    NoAnswer,
    /// The agent refused or could not carry out the request.
    #[error("{0}")]
    Refused(String),
}
