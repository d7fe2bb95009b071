//! Host routes that make the outbound choice stick (paper, section II): one route per
//! interface's proxy address, `PROXY/32 dev IFACE [via GATEWAY]`, so that a connection to
//! that proxy address leaves by that interface whatever the rest of the routing table says.
//!
//! Installed with `ip route replace` (idempotent) when the agent starts and whenever an
//! interface becomes usable again (the kernel deletes routes through an interface that goes
//! down), and removed with `ip route del` when the agent exits.

use crate::config::InterfaceConfig;

/// The `ip route` arguments for an interface's host route, or `None` without a proxy.
fn route_args(iface: &InterfaceConfig) -> Option<Vec<String>> {
    let proxy = iface.proxy?;
    let prefix = if proxy.is_ipv4() { 32 } else { 128 };
    let mut args = vec![
        if proxy.is_ipv4() { "-4" } else { "-6" }.to_owned(),
        "route".into(),
        "replace".into(),
        format!("{}/{prefix}", proxy.ip()),
    ];
    if let Some(gw) = iface.gateway {
        args.extend(["via".into(), gw.to_string()]);
    }
    args.extend(["dev".into(), iface.name.clone()]);
    Some(args)
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
            "-4 route replace 192.0.2.1/32 via 10.0.0.1 dev wlan0"
        );
        iface.proxy = None;
        assert!(route_args(&iface).is_none());
    }
}
