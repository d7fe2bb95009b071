//! Loading the datapath object and attaching it at tc ingress (clsact,
//! direct action) of the proxy's interfaces.

use aya::maps::{Array, HashMap, MapData};
use aya::programs::tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::Ebpf;

use crate::maps::{SpliceKey, SpliceVal, STAT_NAMES};
use crate::Error;

/// The object `build.rs` compiled from `bpf/splice.bpf.c`, embedded with
/// the alignment the ELF parser needs (plain `include_bytes!` is 1-aligned).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splice.bpf.o"));
const PROGRAM: &str = "splice_ingress";
const TABLE: &str = "splice_table";
const STATS: &str = "splice_stats";
const CTL: &str = "splice_ctl";

/// How the program is hooked into tc ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A TCX link (Linux 6.6+), else a clsact qdisc filter. A TCX link
    /// belongs to this process: it goes away when the process exits or
    /// crashes, so no program is ever left attached behind.
    Auto,
    /// Always a cls_bpf filter (direct action) on a clsact qdisc, through
    /// netlink. Such a filter outlives the process unless dropped first; a
    /// stale one is harmless (its table is empty, and it hands every
    /// segment on with `TC_ACT_UNSPEC`) but stays until `tc filter del`.
    Clsact,
}

/// The loaded datapath: the program, its maps, and where it is attached.
///
/// Dropping it detaches the program from every interface. The detach goes
/// through netlink of the *calling thread's* network namespace, so drop it
/// in the namespace where [`Datapath::attach`] ran.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<(String, SchedClassifierLinkId)>,
    /// Interface indexes of `attached`, to refuse splices whose packets
    /// would arrive where the program does not run.
    ifindexes: Vec<u32>,
    /// How each interface was hooked: `"tcx"` or `"clsact"`.
    hooks: Vec<(String, &'static str)>,
    /// `splice_ctl` words given back by ended splices, and the first never used.
    free_slots: Vec<u32>,
    next_slot: u32,
    /// The local addresses and their interface indexes as last read, and
    /// when: see [`Datapath::ifindexes_of`].
    addresses: Option<(std::time::Instant, Vec<(std::net::IpAddr, u32)>)>,
}

/// How long [`Datapath::ifindexes_of`] trusts the addresses it read.
const ADDRESSES_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

impl Datapath {
    /// Loads the object into the kernel and verifies the program. Needs
    /// `CAP_BPF` and `CAP_NET_ADMIN` (root).
    pub fn load() -> Result<Datapath, Error> {
        // No kernel BTF: the program has no CO-RE relocations, so reading
        // and parsing /sys/kernel/btf/vmlinux (several MiB) would be work
        // for nothing.
        let mut ebpf = aya::EbpfLoader::new()
            .btf(None)
            .load(OBJECT)
            .map_err(|e| Error::Load(boxed(e)))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or(Error::Missing(PROGRAM))?
            .try_into()
            .map_err(|e| Error::Load(boxed(e)))?;
        prog.load().map_err(|e| Error::Load(boxed(e)))?;
        Ok(Datapath {
            ebpf,
            attached: Vec::new(),
            ifindexes: Vec::new(),
            hooks: Vec::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            addresses: None,
        })
    }

    /// Attaches the program at tc ingress of `iface` (in the calling
    /// thread's network namespace) with [`Hook::Auto`].
    pub fn attach(&mut self, iface: &str) -> Result<(), Error> {
        self.attach_with(iface, Hook::Auto)
    }

    /// Attaches the program at tc ingress of `iface` the way `hook` says.
    pub fn attach_with(&mut self, iface: &str, hook: Hook) -> Result<(), Error> {
        let attach_err = |e: aya::programs::ProgramError| Error::Attach {
            iface: iface.to_owned(),
            source: boxed(e),
        };
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROGRAM)
            .ok_or(Error::Missing(PROGRAM))?
            .try_into()
            .map_err(|e| Error::Load(boxed(e)))?;
        let tcx = match hook {
            Hook::Auto => match prog.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            ) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::debug!(iface, error = %e, "no TCX link; using a clsact filter");
                    None
                }
            },
            Hook::Clsact => None,
        };
        let used = if tcx.is_some() { "tcx" } else { "clsact" };
        let id = match tcx {
            Some(id) => id,
            None => {
                if let Err(e) = tc::qdisc_add_clsact(iface) {
                    // EEXIST: a clsact qdisc is already there, which is
                    // what we need.
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(Error::Attach {
                            iface: iface.to_owned(),
                            source: boxed(e),
                        });
                    }
                }
                prog.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(NlOptions::default()),
                )
                .map_err(attach_err)?
            }
        };
        self.attached.push((iface.to_owned(), id));
        self.hooks.push((iface.to_owned(), used));
        if let Ok(i) = nix::net::if_::if_nametoindex(iface) {
            self.ifindexes.push(i);
        }
        Ok(())
    }

    /// How each interface was hooked: `(name, "tcx" | "clsact")`.
    pub fn hooks(&self) -> &[(String, &'static str)] {
        &self.hooks
    }

    /// Whether the program runs at ingress of interface `ifindex`.
    pub fn covers(&self, ifindex: u32) -> bool {
        self.ifindexes.contains(&ifindex)
    }

    /// [`ifindex_of_addr`] of two addresses, from the addresses read at
    /// most [`ADDRESSES_TTL`] ago (re-read at once when one is missing).
    /// Walking the interface list costs a netlink dump of every link and
    /// address, the biggest part of a splice's set-up otherwise. An address
    /// moved to another interface within that second is seen late: a splice
    /// installed meanwhile would send by the old interface, as one
    /// installed before the move does anyway.
    pub fn ifindexes_of(
        &mut self,
        a: std::net::IpAddr,
        b: std::net::IpAddr,
    ) -> Result<(u32, u32), Error> {
        let find = |list: &[(std::net::IpAddr, u32)], ip| {
            list.iter().find(|(addr, _)| *addr == ip).map(|(_, i)| *i)
        };
        if let Some((read, list)) = &self.addresses {
            if read.elapsed() < ADDRESSES_TTL {
                if let (Some(x), Some(y)) = (find(list, a), find(list, b)) {
                    return Ok((x, y));
                }
            }
        }
        let list = local_addresses()?;
        let found = (find(&list, a), find(&list, b));
        self.addresses = Some((std::time::Instant::now(), list));
        match found {
            (Some(x), Some(y)) => Ok((x, y)),
            (None, _) => Err(Error::Incompatible(format!(
                "no interface holds the proxy address {a}"
            ))),
            (_, None) => Err(Error::Incompatible(format!(
                "no interface holds the proxy address {b}"
            ))),
        }
    }

    /// Interfaces the program is attached to.
    pub fn interfaces(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|(i, _)| i.as_str())
    }

    /// Writes one splice table entry (replacing any), as the control plane
    /// does; for tests and tools that drive the datapath directly.
    pub fn set_entry(&mut self, key: &SpliceKey, val: &SpliceVal) -> Result<(), Error> {
        self.table()?
            .insert(key, val, 0)
            .map_err(|e| Error::Map(boxed(e)))
    }

    /// Reads one splice table entry.
    pub fn entry(&mut self, key: &SpliceKey) -> Result<SpliceVal, Error> {
        self.table()?.get(key, 0).map_err(|e| Error::Map(boxed(e)))
    }

    /// Runs the program once on `packet` (an Ethernet frame) with
    /// `BPF_PROG_TEST_RUN`, in the calling thread's network namespace, and
    /// returns its verdict (a `TC_ACT_*` value) and the packet as the
    /// program left it. Nothing is sent: a redirect is only a verdict here.
    pub fn test_run(&mut self, packet: &[u8]) -> Result<(i32, Vec<u8>), Error> {
        use std::os::fd::{AsFd, AsRawFd};
        let prog = self.ebpf.program(PROGRAM).ok_or(Error::Missing(PROGRAM))?;
        let fd = prog.fd().map_err(|e| Error::Load(boxed(e)))?;
        let prog_fd = fd.as_fd().as_raw_fd();
        let len_in = u32::try_from(packet.len())
            .map_err(|_| Error::Incompatible("packet too long".into()))?;
        // Room for the program to grow the packet a little (it does not).
        let mut out = vec![0u8; packet.len() + 256];
        // `union bpf_attr`'s `test` member, laid out by hand (offsets from
        // <linux/bpf.h>): prog_fd 0, retval 4, data_size_in 8,
        // data_size_out 12, data_in 16, data_out 24, repeat 32; the rest
        // zero.
        let mut attr = [0u8; 80];
        attr[0..4].copy_from_slice(&(prog_fd as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&len_in.to_ne_bytes());
        attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(packet.as_ptr() as u64).to_ne_bytes());
        attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&1u32.to_ne_bytes());
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: `attr` is a fully initialised 80-byte `bpf_attr` prefix
        // on our stack and we pass its exact size; the pointers in it name
        // `packet` (readable for `len_in` bytes) and `out` (writable for
        // `data_size_out` bytes), both alive until the call returns; the
        // kernel writes only into `attr` and `out` and keeps no pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                attr.as_mut_ptr(),
                attr.len() as libc::c_uint,
            )
        };
        if rc != 0 {
            return Err(Error::Socket {
                op: "BPF_PROG_TEST_RUN",
                source: std::io::Error::last_os_error(),
            });
        }
        let retval = i32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]);
        let size_out = u32::from_ne_bytes([attr[12], attr[13], attr[14], attr[15]]) as usize;
        out.truncate(size_out.min(out.len()));
        Ok((retval, out))
    }

    /// The splice table.
    pub(crate) fn table(&mut self) -> Result<HashMap<&mut MapData, SpliceKey, SpliceVal>, Error> {
        let map = self.ebpf.map_mut(TABLE).ok_or(Error::Missing(TABLE))?;
        HashMap::try_from(map).map_err(|e| Error::Map(boxed(e)))
    }

    /// A free `splice_ctl` word for a new splice, cleared (no override).
    pub(crate) fn alloc_slot(&mut self) -> Result<u32, Error> {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < crate::maps::CTL_SLOTS => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => {
                return Err(Error::Incompatible(
                    "every splice control slot is in use".into(),
                ))
            }
        };
        if let Err(e) = self.set_ctl(slot, 0) {
            self.free_slots.push(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Gives a splice's `splice_ctl` word back.
    pub(crate) fn free_slot(&mut self, slot: u32) {
        self.free_slots.push(slot);
    }

    /// Writes a splice's `splice_ctl` word in place: 0, or `STATE_DROP` to
    /// make the datapath drop both directions' segments.
    pub(crate) fn set_ctl(&mut self, slot: u32, word: u32) -> Result<(), Error> {
        let map = self.ebpf.map_mut(CTL).ok_or(Error::Missing(CTL))?;
        let mut arr: Array<&mut MapData, u32> =
            Array::try_from(map).map_err(|e| Error::Map(boxed(e)))?;
        arr.set(slot, word, 0).map_err(|e| Error::Map(boxed(e)))
    }

    /// The datapath's global counters, by name.
    pub fn stats(&mut self) -> Result<Vec<(&'static str, u64)>, Error> {
        let map = self.ebpf.map_mut(STATS).ok_or(Error::Missing(STATS))?;
        let arr: Array<&mut MapData, u64> =
            Array::try_from(map).map_err(|e| Error::Map(boxed(e)))?;
        let mut out = Vec::with_capacity(STAT_NAMES.len());
        for (i, name) in STAT_NAMES.iter().enumerate() {
            let idx = u32::try_from(i).unwrap_or(u32::MAX);
            out.push((*name, arr.get(&idx, 0).map_err(|e| Error::Map(boxed(e)))?));
        }
        Ok(out)
    }
}

/// Index of the interface (in the calling thread's network namespace) that
/// holds `ip`. Rewritten segments leave by it: the proxy's socket on that
/// connection would have used the same source address.
pub fn ifindex_of_addr(ip: std::net::IpAddr) -> Result<u32, Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Socket {
        op: "getifaddrs",
        source: e.into(),
    })?;
    for a in addrs {
        let Some(sa) = a.address else { continue };
        let matches = match ip {
            std::net::IpAddr::V4(v4) => sa.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
            std::net::IpAddr::V6(v6) => sa.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
        };
        if matches {
            return nix::net::if_::if_nametoindex(a.interface_name.as_str()).map_err(|e| {
                Error::Socket {
                    op: "if_nametoindex",
                    source: e.into(),
                }
            });
        }
    }
    Err(Error::Incompatible(format!(
        "no interface holds the proxy address {ip}"
    )))
}

/// Names of the interfaces (in the calling thread's network namespace)
/// the engine attaches to by default: every one but loopback. Loopback is
/// left out because the datapath rewrites Ethernet headers; sessions
/// arriving over it are refused by [`crate::splice()`] and relayed.
pub fn default_interfaces() -> Result<Vec<String>, Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Socket {
        op: "getifaddrs",
        source: e.into(),
    })?;
    let mut names: Vec<String> = Vec::new();
    for a in addrs {
        if a.flags
            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        {
            continue;
        }
        if !names.contains(&a.interface_name) {
            names.push(a.interface_name);
        }
    }
    Ok(names)
}

/// MTU of the interface `name` (in the calling thread's network
/// namespace: read with `SIOCGIFMTU` on a socket, not from `/sys`, which
/// shows the namespace sysfs was mounted in).
pub fn interface_mtu(name: &str) -> Result<u32, Error> {
    let sock_err = |op: &'static str| move |source: std::io::Error| Error::Socket { op, source };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(Error::Incompatible(format!(
            "{name:?} is not an interface name"
        )));
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")
        .or_else(|_| std::net::UdpSocket::bind("[::]:0"))
        .map_err(sock_err("socket"))?;
    // SAFETY: `ifreq` is plain old data (a name array and a union of
    // integers and addresses), so all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the NUL-terminated name (zeroed above past
    // its length, which is below IFNAMSIZ) and writes one c_int into the
    // union of `req`, which lives on our stack for the call; the socket is
    // open for the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCGIFMTU as _,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc != 0 {
        return Err(sock_err("SIOCGIFMTU")(std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFMTU succeeded, so the kernel filled `ifru_mtu`.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| Error::Incompatible(format!("{name}: MTU {mtu}")))
}

/// The MSS both of a spliced session's connections should announce so
/// that no segment either peer sends is too big for any of `interfaces`:
/// the smallest MTU less the IP and TCP headers (40 bytes for IPv4, 60
/// for IPv6). `None` when `interfaces` is empty.
pub fn mss_for_interfaces(interfaces: &[String], ipv6: bool) -> Result<Option<u32>, Error> {
    let headers = if ipv6 { 60 } else { 40 };
    let mut smallest: Option<u32> = None;
    for name in interfaces {
        let mtu = interface_mtu(name)?;
        smallest = Some(smallest.map_or(mtu, |m| m.min(mtu)));
    }
    Ok(smallest.map(|m| m.saturating_sub(headers)))
}

/// Every IPv4 and IPv6 address of the calling thread's network namespace,
/// with the index of the interface holding it.
fn local_addresses() -> Result<Vec<(std::net::IpAddr, u32)>, Error> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::Socket {
        op: "getifaddrs",
        source: e.into(),
    })?;
    let mut indexes: Vec<(String, u32)> = Vec::new();
    let mut out = Vec::new();
    for ifa in addrs {
        let Some(sa) = ifa.address else { continue };
        let ip = if let Some(v4) = sa.as_sockaddr_in() {
            std::net::IpAddr::V4(v4.ip())
        } else if let Some(v6) = sa.as_sockaddr_in6() {
            std::net::IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let index = match indexes.iter().find(|(n, _)| *n == ifa.interface_name) {
            Some((_, i)) => *i,
            None => {
                let i =
                    nix::net::if_::if_nametoindex(ifa.interface_name.as_str()).map_err(|e| {
                        Error::Socket {
                            op: "if_nametoindex",
                            source: e.into(),
                        }
                    })?;
                indexes.push((ifa.interface_name, i));
                i
            }
        };
        out.push((ip, index));
    }
    Ok(out)
}
