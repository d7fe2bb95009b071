//! Shared by the splice crate's testbed tests.

use std::sync::{Arc, Mutex};

use msocks_splice::{Datapath, Hook};
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
