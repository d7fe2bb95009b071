//! The mobile node / proxy / server topology of the MSOCKS paper.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::netns::{veth_pair, Netns, Route, RouteAction};
use crate::Result;

/// Interface of the proxy host on the proxy–server link.
pub const SV_IF_ON_PX: &str = "sv0";
/// Interface of the server on the proxy–server link.
pub const SV_IF_ON_SV: &str = "px0";

/// Second octet of every IPv4 address (10.77.0.0/16) and second group of
/// every IPv6 address (fd77::/48): a block unlikely to collide with anything
/// a developer has configured, and never routed outside the namespaces.
const V4_BASE: [u8; 2] = [10, 77];
const V6_BASE: u16 = 0xfd77;
/// Subnet number (third IPv4 octet, fourth IPv6 group) of the server link.
const SV_SUBNET: u8 = 3;
/// Host numbers: the proxy is the router (.1) on every link.
const PX_HOST: u8 = 1;
const OTHER_HOST: u8 = 2;
/// Metric of the policy tables' catch-all `unreachable` routes: above any
/// real route, so they only match once the link's routes are gone.
const UNREACHABLE_METRIC: u32 = 1_000_000;

/// One of the two links between the mobile node and the proxy host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// The preferred link (lower route metric), like a LAN cable.
    Wired,
    /// The fallback link, like a wireless WAN.
    Radio,
}

impl Link {
    /// Both links, wired first.
    pub const ALL: [Link; 2] = [Link::Wired, Link::Radio];

    /// The mobile node's interface on this link.
    pub fn mn_if(self) -> &'static str {
        match self {
            Link::Wired => "wired0",
            Link::Radio => "radio0",
        }
    }

    /// The proxy host's interface on this link.
    pub fn px_if(self) -> &'static str {
        match self {
            Link::Wired => "mnw0",
            Link::Radio => "mnr0",
        }
    }

    /// Subnet number: 10.77.N.0/24 and fd77:0:0:N::/64.
    fn subnet(self) -> u8 {
        match self {
            Link::Wired => 1,
            Link::Radio => 2,
        }
    }

    /// Metric of the mobile node's main-table route through this link;
    /// wired is preferred.
    fn metric(self) -> u32 {
        match self {
            Link::Wired => 100,
            Link::Radio => 200,
        }
    }

    /// The mobile node's policy routing table (and rule priority) for
    /// packets whose source address belongs to this link.
    fn table(self) -> u32 {
        match self {
            Link::Wired => 101,
            Link::Radio => 102,
        }
    }
}

fn v4(subnet: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(V4_BASE[0], V4_BASE[1], subnet, host)
}

fn v6(subnet: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(V6_BASE, 0, 0, subnet.into(), 0, 0, 0, host.into())
}

fn net4(subnet: u8) -> Ipv4Net {
    // A /24 is always a valid prefix length, so this cannot fail.
    Ipv4Net::new_assert(v4(subnet, 0), 24)
}

fn net6(subnet: u8) -> Ipv6Net {
    Ipv6Net::new_assert(v6(subnet, 0), 64)
}

/// Three namespaces wired like the MSOCKS paper's set-up: a mobile node
/// (`mn`) with two links to a proxy host (`px`), which routes to a server
/// (`sv`).
///
/// ```text
///             wired0 ── 10.77.1.0/24, fd77:0:0:1::/64 ── mnw0
///   mn                                                        px  sv0 ── 10.77.3.0/24 ── px0  sv
///             radio0 ── 10.77.2.0/24, fd77:0:0:2::/64 ── mnr0          fd77:0:0:3::/64
/// ```
///
/// The proxy is `.1` / `::1` on every link; mobile node and server are `.2`
/// / `::2`. Use the address fields instead of these literals.
///
/// Routing, for both IP families:
/// * `px` forwards.
/// * `mn` reaches the server subnet through both links, wired preferred by
///   metric. Source-address policy rules send packets from a link's address
///   out through that link, so a client picks its path by binding to
///   [`Testbed::mn_ip`] of that link. While the link is down, IPv4 packets
///   from its address hit an `unreachable` route ("No route to host")
///   instead of leaking onto the other link, and its IPv6 address is gone.
/// * `sv` routes both mobile subnets back through `px`.
///
/// Dropping the testbed deletes all three namespaces and with them every
/// interface in them.
#[derive(Debug)]
pub struct Testbed {
    /// The mobile node.
    pub mn: Netns,
    /// The proxy host (runs the MSOCKS proxy; routes between the others).
    pub px: Netns,
    /// The server the mobile node talks to.
    pub sv: Netns,
    /// Mobile node's IPv4 address on the wired link.
    pub mn_wired_ip: Ipv4Addr,
    /// Mobile node's IPv4 address on the radio link.
    pub mn_radio_ip: Ipv4Addr,
    /// Proxy's IPv4 address on the wired link.
    pub px_wired_ip: Ipv4Addr,
    /// Proxy's IPv4 address on the radio link.
    pub px_radio_ip: Ipv4Addr,
    /// Proxy's IPv4 address on the server link.
    pub px_sv_ip: Ipv4Addr,
    /// Server's IPv4 address.
    pub sv_ip: Ipv4Addr,
    /// Mobile node's IPv6 address on the wired link.
    pub mn_wired_ip6: Ipv6Addr,
    /// Mobile node's IPv6 address on the radio link.
    pub mn_radio_ip6: Ipv6Addr,
    /// Proxy's IPv6 address on the wired link.
    pub px_wired_ip6: Ipv6Addr,
    /// Proxy's IPv6 address on the radio link.
    pub px_radio_ip6: Ipv6Addr,
    /// Proxy's IPv6 address on the server link.
    pub px_sv_ip6: Ipv6Addr,
    /// Server's IPv6 address.
    pub sv_ip6: Ipv6Addr,
    /// The server link's IPv4 subnet.
    pub sv_net: Ipv4Net,
    /// The server link's IPv6 subnet.
    pub sv_net6: Ipv6Net,
}

impl Testbed {
    /// Builds the three namespaces, their links, addresses and routes.
    ///
    /// If any step fails, the namespaces created so far are deleted again
    /// (they are dropped with the error).
    pub fn mobile_proxy_server() -> Result<Testbed> {
        let tb = Testbed {
            mn: Netns::new("mn")?,
            px: Netns::new("px")?,
            sv: Netns::new("sv")?,
            mn_wired_ip: v4(Link::Wired.subnet(), OTHER_HOST),
            mn_radio_ip: v4(Link::Radio.subnet(), OTHER_HOST),
            px_wired_ip: v4(Link::Wired.subnet(), PX_HOST),
            px_radio_ip: v4(Link::Radio.subnet(), PX_HOST),
            px_sv_ip: v4(SV_SUBNET, PX_HOST),
            sv_ip: v4(SV_SUBNET, OTHER_HOST),
            mn_wired_ip6: v6(Link::Wired.subnet(), OTHER_HOST),
            mn_radio_ip6: v6(Link::Radio.subnet(), OTHER_HOST),
            px_wired_ip6: v6(Link::Wired.subnet(), PX_HOST),
            px_radio_ip6: v6(Link::Radio.subnet(), PX_HOST),
            px_sv_ip6: v6(SV_SUBNET, PX_HOST),
            sv_ip6: v6(SV_SUBNET, OTHER_HOST),
            sv_net: net4(SV_SUBNET),
            sv_net6: net6(SV_SUBNET),
        };

        for link in Link::ALL {
            veth_pair(&tb.mn, link.mn_if(), &tb.px, link.px_if())?;
        }
        veth_pair(&tb.px, SV_IF_ON_PX, &tb.sv, SV_IF_ON_SV)?;
        tb.px.set_forwarding(true)?;

        // Proxy–server link.
        tb.px.link_set(SV_IF_ON_PX, true)?;
        tb.sv.link_set(SV_IF_ON_SV, true)?;
        tb.px.addr_add(SV_IF_ON_PX, &cidr(tb.px_sv_ip.into(), 24))?;
        tb.px
            .addr_add(SV_IF_ON_PX, &cidr(tb.px_sv_ip6.into(), 64))?;
        tb.sv.addr_add(SV_IF_ON_SV, &cidr(tb.sv_ip.into(), 24))?;
        tb.sv.addr_add(SV_IF_ON_SV, &cidr(tb.sv_ip6.into(), 64))?;

        for link in Link::ALL {
            tb.configure_link(link)?;
            tb.install_policy(link)?;
            // The server's way back to this mobile subnet.
            let back4 = Route::new(IpNet::V4(net4(link.subnet())))
                .via(tb.px_sv_ip.into())
                .dev(SV_IF_ON_SV);
            let back6 = Route::new(IpNet::V6(net6(link.subnet())))
                .via(tb.px_sv_ip6.into())
                .dev(SV_IF_ON_SV);
            tb.sv.apply_route(RouteAction::Add, &back4)?;
            tb.sv.apply_route(RouteAction::Add, &back6)?;
        }
        Ok(tb)
    }

    /// The mobile node's IPv4 address on `link`.
    pub fn mn_ip(&self, link: Link) -> Ipv4Addr {
        match link {
            Link::Wired => self.mn_wired_ip,
            Link::Radio => self.mn_radio_ip,
        }
    }

    /// The mobile node's IPv6 address on `link`.
    pub fn mn_ip6(&self, link: Link) -> Ipv6Addr {
        match link {
            Link::Wired => self.mn_wired_ip6,
            Link::Radio => self.mn_radio_ip6,
        }
    }

    /// The proxy's IPv4 address on `link`.
    pub fn px_ip(&self, link: Link) -> Ipv4Addr {
        match link {
            Link::Wired => self.px_wired_ip,
            Link::Radio => self.px_radio_ip,
        }
    }

    /// The proxy's IPv6 address on `link`.
    pub fn px_ip6(&self, link: Link) -> Ipv6Addr {
        match link {
            Link::Wired => self.px_wired_ip6,
            Link::Radio => self.px_radio_ip6,
        }
    }

    /// Takes `link` down at both ends, as when a cable is pulled or radio
    /// coverage is lost: a hard hand-off.
    ///
    /// The kernel then deletes the routes through the link and its IPv6
    /// addresses. Connections bound to the link's addresses stall; new ones
    /// fail at once: over IPv4 with "No route to host" (`EHOSTUNREACH`),
    /// over IPv6 already at `bind` with "Cannot assign requested address"
    /// (`EADDRNOTAVAIL`). Unbound sockets use the other link.
    pub fn link_down(&self, link: Link) -> Result<()> {
        self.mn.link_set(link.mn_if(), false)?;
        self.px.link_set(link.px_if(), false)
    }

    /// A silent failure of `link` (`on`), or its end (`!on`): the link stays up with its
    /// addresses and routes, so no link event tells anyone, but the proxy host drops every
    /// packet arriving or leaving on it (iptables in `px`), as a stalled radio bearer would.
    /// Only a probe or a TCP timeout can find it.
    pub fn link_blackhole(&self, link: Link, on: bool) -> Result<()> {
        let action = if on { "-I" } else { "-D" };
        let px_if = link.px_if();
        self.px
            .exec(&["iptables", "-w", action, "INPUT", "-i", px_if, "-j", "DROP"])?;
        self.px.exec(&[
            "iptables", "-w", action, "OUTPUT", "-o", px_if, "-j", "DROP",
        ])?;
        Ok(())
    }

    /// Brings `link` back up at both ends and restores the addresses and
    /// routes the testbed manages on it, which the kernel does not do by
    /// itself (`ip link set up` restores neither routes through the link nor
    /// IPv6 addresses). Routes added by the caller are not restored.
    /// Idempotent: calling it on a link that is up changes nothing.
    pub fn link_up(&self, link: Link) -> Result<()> {
        self.configure_link(link)
    }

    /// Brings both ends of `link` up with their addresses and the mobile
    /// node's routes through it, replacing whatever is already there.
    fn configure_link(&self, link: Link) -> Result<()> {
        let (mn_if, px_if) = (link.mn_if(), link.px_if());
        self.mn.link_set(mn_if, true)?;
        self.px.link_set(px_if, true)?;
        // The proxy's side needs only its addresses: the kernel derives the
        // connected routes to the mobile subnet from them.
        self.mn
            .addr_replace(mn_if, &cidr(self.mn_ip(link).into(), 24))?;
        self.mn
            .addr_replace(mn_if, &cidr(self.mn_ip6(link).into(), 64))?;
        self.px
            .addr_replace(px_if, &cidr(self.px_ip(link).into(), 24))?;
        self.px
            .addr_replace(px_if, &cidr(self.px_ip6(link).into(), 64))?;

        let gateways: [(IpNet, IpAddr); 2] = [
            (IpNet::V4(self.sv_net), self.px_ip(link).into()),
            (IpNet::V6(self.sv_net6), self.px_ip6(link).into()),
        ];
        for (dest, gateway) in gateways {
            let route = Route::new(dest).via(gateway).dev(mn_if);
            // Main table: for sockets that let the kernel pick the source.
            let main = route.clone().metric(link.metric());
            self.mn.apply_route(RouteAction::Replace, &main)?;
            // Policy table: for sockets bound to this link's address.
            let policy = route.table(link.table());
            self.mn.apply_route(RouteAction::Replace, &policy)?;
        }
        Ok(())
    }

    /// Installs the mobile node's source-address rules for `link`, and the
    /// `unreachable` fallbacks in its table. Neither is tied to a device, so
    /// both survive [`Testbed::link_down`].
    fn install_policy(&self, link: Link) -> Result<()> {
        let table = link.table().to_string();
        let sources: [(&str, IpAddr, IpNet); 2] = [
            ("-4", self.mn_ip(link).into(), IpNet::V4(self.sv_net)),
            ("-6", self.mn_ip6(link).into(), IpNet::V6(self.sv_net6)),
        ];
        for (family, source, dest) in sources {
            let source = source.to_string();
            // Without these rules Linux routes by destination only, and a
            // socket bound to the radio address would still leave through
            // the wired link.
            self.mn.ip(&[
                family, "rule", "add", "from", &source, "lookup", &table, "pref", &table,
            ])?;
            let dest = dest.to_string();
            let metric = UNREACHABLE_METRIC.to_string();
            self.mn.ip(&[
                family,
                "route",
                "add",
                "unreachable",
                &dest,
                "table",
                &table,
                "metric",
                &metric,
            ])?;
        }
        Ok(())
    }
}

fn cidr(addr: IpAddr, prefix_len: u8) -> String {
    format!("{addr}/{prefix_len}")
}
