//! Round-trip time of a testbed link, measured as TCP connect times from the mobile node to a
//! listener on the proxy host over that link (one SYN/SYN-ACK exchange each).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use msocks_testbed::{Link, Netns, Testbed};

/// Port of the RTT probe listeners on the proxy host.
pub const PROBE_PORT: u16 = 7;

/// A listener in `ns` that accepts and closes connections until the process ends.
pub fn start_probe_listener(ns: &Netns, addr: SocketAddr) -> Result<()> {
    let listener = ns
        .run_in(|| TcpListener::bind(addr))?
        .with_context(|| format!("binding the RTT probe listener on {addr}"))?;
    std::thread::Builder::new()
        .name("rtt probe".into())
        .spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        })
        .context("starting the RTT probe listener")?;
    Ok(())
}

/// TCP connect times from the mobile node over `link` to the proxy host: one SYN/SYN-ACK
/// round trip of the link each. The proxy's address on the link is on a subnet directly
/// connected to the mobile node's interface there, so routing picks that link.
pub fn measure_rtt(tb: &Testbed, link: Link, samples: u32) -> Result<Vec<Duration>> {
    let to = SocketAddr::new(tb.px_ip(link).into(), PROBE_PORT);
    tb.mn.run_in(|| -> Result<Vec<Duration>> {
        let mut times = Vec::new();
        for _ in 0..samples {
            let start = Instant::now();
            let conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .with_context(|| format!("RTT probe to {to}"))?;
            times.push(start.elapsed());
            drop(conn);
            std::thread::sleep(Duration::from_millis(5));
        }
        times.sort();
        Ok(times)
    })?
}
