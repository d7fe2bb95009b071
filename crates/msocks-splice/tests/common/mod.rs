//! Shared by the splice crate's testbed tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use msocks_splice::{splice, Datapath, Hook, Status};
use msocks_testbed::{Link, Testbed, SV_IF_ON_PX};

/// The datapath loaded in the proxy host's namespace and attached (the way `hook` says) at
/// tc ingress of its three interfaces: both mobile-side links and the server side.
pub fn datapath_on_px(tb: &Testbed, hook: Hook) -> Arc<Mutex<Datapath>> {
    let dp = tb
        .px
        .run_in(|| -> Result<Datapath, msocks_splice::Error> {
            let mut dp = Datapath::load()?;
            for iface in [Link::Wired.px_if(), Link::Radio.px_if(), SV_IF_ON_PX] {
                dp.attach_with(iface, hook)?;
            }
            Ok(dp)
        })
        .expect("setns")
        .expect("loading and attaching the datapath");
    Arc::new(Mutex::new(dp))
}

/// A one-session splicing proxy in the proxy host's namespace: accepts one client on
/// `listen`, connects to `server`, splices the two, waits until both ends are done (or
/// `limit` passed, when one is given), and tears the splice down.
#[allow(dead_code)] // not every test file that includes this module runs one
pub fn splicing_proxy(
    tb: &Testbed,
    dp: &Arc<Mutex<Datapath>>,
    listen: SocketAddr,
    server: SocketAddr,
    limit: Option<Duration>,
) -> thread::JoinHandle<()> {
    let dp = Arc::clone(dp);
    tb.px
        .run_in(move || {
            let l = TcpListener::bind(listen).expect("bind");
            thread::spawn(move || {
                let (c, _) = l.accept().expect("accept");
                let s = TcpStream::connect(server).expect("connect");
                let sp = splice(&dp, c, s, Duration::from_secs(5))
                    .unwrap_or_else(|r| panic!("splice refused: {}", r.error));
                let start = Instant::now();
                while sp.status().expect("status") != Status::Finished
                    && limit.map_or(true, |l| start.elapsed() < l)
                {
                    thread::sleep(Duration::from_millis(20));
                }
                sp.teardown();
            })
        })
        .expect("setns px")
}
