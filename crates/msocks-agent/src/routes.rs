//! Host routes that make the outbound choice stick (paper, section II): one route per
//! interface's proxy address, `PROXY/32 dev IFACE [via GATEWAY]`, so that a connection to
//! that proxy address leaves by that interface whatever the rest of the routing table says.
//!
//! Installed with `ip route replace` (idempotent) when the agent starts and whenever an
//! interface becomes usable again (the kernel deletes routes through an interface that goes
//! down), and removed with `ip route del` when the agent exits.
//!
//! The routes also carry a larger initial congestion and receive window ([`INIT_WINDOW`]):
//! right after a move, the connection to the proxy is fresh (or, for a standby connection,
//! idle, which restarts its window), and with TCP_NODELAY every small write is a segment of
//! its own. With Linux's default of 10 segments, an interactive stream that writes more
//! often than 10 times per round trip stalls for about one round trip of the new link after
//! its first 10 writes (`msocks bench`, hand-off scenario).

use std::net::IpAddr;

use crate::config::InterfaceConfig;

/// `initcwnd` and `initrwnd` of the host routes to the proxy, in segments: enough for an
/// interactive stream writing every millisecond across a 60 ms round trip (the `msocks
/// bench` radio link) to keep sending through the first round trip after a move. A bulk
/// stream may start with a burst this large (about 90 KiB of full-size segments) into the
/// new link, which a radio link's queue absorbs.
pub const INIT_WINDOW: u32 = 64;

/// The `ip route` arguments (after `ip`) of a host route to `proxy` through `dev`, via
/// `gateway` if the proxy is not on the link, with the initial windows of [`INIT_WINDOW`].
pub fn host_route_args(proxy: IpAddr, gateway: Option<IpAddr>, dev: &str) -> Vec<String> {
    let prefix = if proxy.is_ipv4() { 32 } else { 128 };
    let mut args = vec![
        if proxy.is_ipv4() { "-4" } else { "-6" }.to_owned(),
        "route".into(),
        "replace".into(),
        format!("{proxy}/{prefix}"),
    ];
    if let Some(gw) = gateway {
        args.extend(["via".into(), gw.to_string()]);
    }
    args.extend(["dev".into(), dev.to_owned()]);
    let window = INIT_WINDOW.to_string();
    args.extend(["initcwnd".into(), window.clone(), "initrwnd".into(), window]);
    args
}

/// The `ip route` arguments for an interface's host route, or `None` without a proxy.
fn route_args(iface: &InterfaceConfig) -> Option<Vec<String>> {
    let proxy = iface.proxy?;
    Some(host_route_args(proxy.ip(), iface.gateway, &iface.name))
}

async fn ip(args: &[String]) -> Result<(), String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Installs (or refreshes) the host route of `iface`; failures are logged, not fatal (the
/// stream still works, only the outbound choice falls back to the routing table).
pub async fn install(iface: &InterfaceConfig) {
    let Some(args) = route_args(iface) else {
        return;
    };
    match ip(&args).await {
        Ok(()) => {
            tracing::info!(interface = %iface.name, "host route installed: ip {}", args.join(" "))
        }
        // A configured interface that does not exist yet (a USB modem not plugged in) is
        // normal: its route is installed when it appears ("became usable").
        Err(_)
            if !std::path::Path::new("/sys/class/net")
                .join(&iface.name)
                .exists() =>
        {
            tracing::info!(interface = %iface.name, "not present now: its host route will be installed when it appears")
        }
        Err(e) => {
            tracing::warn!(interface = %iface.name, "cannot install host route (ip {}): {e}", args.join(" "))
        }
    }
}

/// Removes the host route of `iface` (quietly when it is already gone).
pub async fn remove(iface: &InterfaceConfig) {
    let Some(mut args) = route_args(iface) else {
        return;
    };
    args[2] = "del".into();
    if let Err(e) = ip(&args).await {
        tracing::debug!(interface = %iface.name, "host route not removed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_route_arguments() {
        let mut iface: InterfaceConfig =
            toml::from_str("name = \"wlan0\"\nproxy = \"192.0.2.1:1080\"\ngateway = \"10.0.0.1\"")
                .unwrap();
        assert_eq!(
            route_args(&iface).unwrap().join(" "),
            "-4 route replace 192.0.2.1/32 via 10.0.0.1 dev wlan0 initcwnd 64 initrwnd 64"
        );
        iface.gateway = None;
        iface.proxy = Some("[2001:db8::1]:1080".parse().unwrap());
        assert_eq!(
            route_args(&iface).unwrap().join(" "),
            "-6 route replace 2001:db8::1/128 dev wlan0 initcwnd 64 initrwnd 64"
        );
        iface.proxy = None;
        assert!(route_args(&iface).is_none());
    }
}
