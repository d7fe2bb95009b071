//! The engine as a service for the proxy: load and attach once, then
//! splice sessions from async code.

use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::loader::{default_interfaces, Datapath};
use crate::splice::{hold, splice, Holding, Refused, SharedDatapath, Spliced};
use crate::Error;

/// The loaded, attached datapath of one proxy process.
#[derive(Debug, Clone)]
pub struct Engine {
    datapath: SharedDatapath,
}

impl Engine {
    /// Loads the datapath and attaches it to `interfaces`, or to every
    /// non-loopback interface when the list is empty. Fails without
    /// privilege (`CAP_BPF` + `CAP_NET_ADMIN`) or without BPF support.
    pub fn start(interfaces: &[String]) -> Result<Engine, Error> {
        let names = if interfaces.is_empty() {
            default_interfaces()?
        } else {
            interfaces.to_vec()
        };
        let mut dp = Datapath::load()?;
        for name in &names {
            dp.attach(name)?;
        }
        Ok(Engine {
            datapath: Arc::new(Mutex::new(dp)),
        })
    }

    /// Splices two connected sockets (blocking; see [`crate::splice()`]).
    pub fn splice(
        &self,
        client: TcpStream,
        server: TcpStream,
        drain_timeout: Duration,
    ) -> Result<Spliced, Box<Refused>> {
        splice(&self.datapath, client, server, drain_timeout)
    }

    /// Checks two connected sockets and puts them in HOLD, without
    /// blocking, for a caller that drives the drain itself (see
    /// [`crate::splice::hold`]).
    pub fn hold(&self, client: TcpStream, server: TcpStream) -> Result<Holding, Box<Refused>> {
        hold(&self.datapath, client, server)
    }

    /// [`crate::splice::hold_when_quiet`] with this engine's datapath: the
    /// drain relays until the sockets are quiet (or `open_for` passed), and
    /// only then holds them.
    pub fn hold_when_quiet(
        &self,
        client: TcpStream,
        server: TcpStream,
        open_for: Duration,
    ) -> Result<Holding, Box<Refused>> {
        crate::splice::hold_when_quiet(&self.datapath, client, server, open_for)
    }

    /// The datapath's counters since it was loaded (names as in
    /// [`crate::maps::STAT_NAMES`]), summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, Error> {
        match self.datapath.lock() {
            Ok(mut dp) => dp.stats(),
            // A panic while holding the lock left nothing half-written that
            // a read of the counters could trip on.
            Err(poisoned) => poisoned.into_inner().stats(),
        }
    }
}
