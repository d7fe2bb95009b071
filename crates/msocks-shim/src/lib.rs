//! The LD_PRELOAD library behind `msocks run`: an unmodified, dynamically linked program's
//! TCP connections go through the msocks agent's local SOCKS5 endpoint, so they become MSOCKS
//! streams that follow the mobile node's links.
//!
//! Loaded with `LD_PRELOAD`, it interposes four libc functions (found for the real
//! implementations with `dlsym(RTLD_NEXT, …)`):
//!
//! * `connect`: a TCP connect (AF_INET or AF_INET6, IPv4-mapped treated as IPv4) to a
//!   destination that is not loopback, link-local, the agent itself or excluded by
//!   `MSOCKS_SHIM_EXCLUDE` is turned into a connect to the agent plus a SOCKS5 CONNECT on the
//!   program's own socket. Everything else goes to libc unchanged.
//! * `getaddrinfo` / `freeaddrinfo`: in remote DNS mode (the default) a name that is not
//!   numeric, not local (`localhost`, this host's name, `/etc/hosts`) gets a placeholder
//!   address from 198.18.0.0/15, and `connect` sends the name itself to the agent.
//! * `getpeername`: a socket connected through the agent shows the destination the program
//!   connected to, not the agent.
//!
//! Settings come from the environment (`MSOCKS_AGENT`, `MSOCKS_DNS`, `MSOCKS_SHIM_EXCLUDE`,
//! `MSOCKS_SHIM_LOG`, `MSOCKS_SHIM_TIMEOUT`; see [`config`]). docs/SHIM.md has the whole
//! story and the limits (static binaries, raw syscalls, io_uring, setuid programs, UDP).
//!
//! The pure parts — classification, the placeholder table, the SOCKS5 messages and errno
//! mapping, the handshake over a socket — are ordinary modules tested without preloading.
//! The exported C symbols live in a private module that unit-test builds leave out (a test
//! binary defining `connect` would interpose its own calls).

pub mod classify;
pub mod config;
pub mod fakedns;
pub mod handshake;
pub mod socks;

#[cfg(not(test))]
mod preload;
