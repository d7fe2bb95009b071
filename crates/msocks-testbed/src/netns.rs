//! Named network namespaces, driven through iproute2.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::IpNet;
use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::{Error, Result};

/// Prefix of every namespace name this crate creates.
///
/// [`Netns::cleanup_stale`] refuses prefixes that do not start with it, so
/// that it can never delete a namespace somebody else made.
pub const NAME_PREFIX: &str = "msocks-";

/// Where `ip netns add` bind-mounts the namespace files (`/run` on every
/// current distribution; `/var/run` is the historical path `ip` uses).
const NETNS_RUN_DIR: &str = "/var/run/netns";
/// Per-namespace files that `ip netns exec` bind-mounts over `/etc`.
const NETNS_ETC_DIR: &str = "/etc/netns";
/// `IFNAMSIZ` from `<net/if.h>`, including the terminating NUL.
const IFNAMSIZ: usize = 16;
/// Longest tag accepted by [`Netns::new`]; keeps names readable in
/// `ip netns list` and far below the file name limit.
const MAX_TAG_LEN: usize = 32;

/// Makes names unique among the namespaces of this process; the pid in the
/// name makes them unique among processes.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Byte counters of one interface, from `/sys/class/net/IF/statistics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes received by the interface.
    pub rx_bytes: u64,
    /// Bytes sent by the interface.
    pub tx_bytes: u64,
}

/// What [`Netns::apply_route`] asks `ip route` to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAction {
    /// `ip route add`: fails if an identical route exists.
    Add,
    /// `ip route replace`: adds, or overwrites the route with the same
    /// destination, metric and table; idempotent.
    Replace,
    /// `ip route del`: removes the first matching route.
    Del,
}

impl RouteAction {
    fn verb(self) -> &'static str {
        match self {
            RouteAction::Add => "add",
            RouteAction::Replace => "replace",
            RouteAction::Del => "del",
        }
    }
}

/// A unicast route, built up with the `via`/`dev`/`metric`/`table` methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix; its family selects IPv4 or IPv6.
    pub dest: IpNet,
    /// Next hop, if the destination is not on-link.
    pub via: Option<IpAddr>,
    /// Outgoing interface.
    pub dev: Option<String>,
    /// Route metric; lower wins among routes to the same prefix.
    pub metric: Option<u32>,
    /// Routing table id; `None` is the main table.
    pub table: Option<u32>,
}

impl Route {
    /// A route to `dest` in the main table, with nothing else set yet.
    pub fn new(dest: IpNet) -> Route {
        Route {
            dest,
            via: None,
            dev: None,
            metric: None,
            table: None,
        }
    }

    /// Sets the next hop.
    pub fn via(mut self, gateway: IpAddr) -> Route {
        self.via = Some(gateway);
        self
    }

    /// Sets the outgoing interface.
    pub fn dev(mut self, ifname: &str) -> Route {
        self.dev = Some(ifname.to_owned());
        self
    }

    /// Sets the metric.
    pub fn metric(mut self, metric: u32) -> Route {
        self.metric = Some(metric);
        self
    }

    /// Puts the route into routing table `table` instead of the main one.
    pub fn table(mut self, table: u32) -> Route {
        self.table = Some(table);
        self
    }

    /// The `ip route` arguments after the verb.
    fn args(&self) -> Result<Vec<String>> {
        let mut args = vec![self.dest.to_string()];
        if let Some(via) = self.via {
            args.extend(["via".to_owned(), via.to_string()]);
        }
        if let Some(dev) = &self.dev {
            check_ifname(dev)?;
            args.extend(["dev".to_owned(), dev.clone()]);
        }
        if let Some(metric) = self.metric {
            args.extend(["metric".to_owned(), metric.to_string()]);
        }
        if let Some(table) = self.table {
            args.extend(["table".to_owned(), table.to_string()]);
        }
        Ok(args)
    }
}

/// A named network namespace that is deleted again when dropped.
///
/// The name is `msocks-<tag>-<pid>-<counter>`: the pid lets
/// [`Netns::cleanup_stale`] recognise namespaces whose creator died without
/// running `Drop` (SIGKILL, abort, power loss), the counter keeps names
/// unique within one process.
///
/// Processes started with [`Netns::exec`] or [`Netns::command`], and threads
/// still running from [`Netns::run_in`], keep the namespace alive in the
/// kernel after `Drop` removed its name: stop them first.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace named `msocks-<tag>-<pid>-<counter>` with
    /// `lo` up, IPv6 duplicate address detection off, and a resolver
    /// configuration confined to the namespace.
    ///
    /// `tag` may contain ASCII letters, digits, `_` and `-`. Before creating
    /// anything it calls [`Netns::cleanup_stale`] with [`NAME_PREFIX`] so that
    /// killed runs do not accumulate; failures of that clean-up are logged,
    /// not returned, because they must not stop a new test from running.
    pub fn new(tag: &str) -> Result<Netns> {
        check_tag(tag)?;
        if let Err(e) = Netns::cleanup_stale(NAME_PREFIX) {
            eprintln!("msocks-testbed: cleaning up stale namespaces failed: {e}");
        }
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{tag}-{}-{n}", std::process::id());
        run(ip_command(&["netns", "add", &name]))?;
        // From here on `Drop` deletes the namespace if a later step fails.
        let ns = Netns { name };
        ns.write_etc_files()?;
        ns.ip(&["link", "set", "lo", "up"])?;
        // Duplicate address detection is pointless on links that only join
        // our own namespaces, and harmful: while an interface's link-local
        // address is tentative (about a second after every `link up`), the
        // first IPv6 packets through it are lost and a TCP connect waits
        // for its one-second SYN retransmission. `default` covers
        // interfaces created (or moved) here later; the kernel uses the
        // maximum of `all` and the interface's value, so set both.
        ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ])?;
        Ok(ns)
    }

    /// The namespace's name, as shown by `ip netns list`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file `ip netns add` bind-mounted the namespace on; opening it
    /// gives a descriptor for `setns(2)`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `ip netns exec NAME args...` to completion and returns its
    /// output; a non-zero exit status is an [`Error::Command`] carrying the
    /// program's standard error.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        let Some((program, rest)) = args.split_first() else {
            return Err(invalid("command", "", "empty argument list"));
        };
        let mut cmd = self.command(program);
        cmd.args(rest);
        run(cmd)
    }

    /// A [`Command`] that runs `program` inside the namespace, as
    /// `ip netns exec NAME program`; add arguments and spawn it as usual.
    ///
    /// The child also gets a private mount namespace in which `/sys` shows
    /// this namespace's interfaces and `/etc/netns/NAME/*` is bind-mounted
    /// over `/etc`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `ip -n NAME args...`, i.e. an iproute2 command applied to this
    /// namespace rather than to the host.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = ip_command(&["-n", &self.name]);
        cmd.args(args);
        run(cmd)
    }

    /// Runs `f` on a new thread that has first joined this namespace with
    /// `setns(2)`, and returns what `f` returned.
    ///
    /// Only that thread is moved: the calling thread and the rest of the
    /// process stay where they are. A socket belongs for its whole life to
    /// the namespace it was created in, so sockets created inside `f` (a
    /// listener, a connected stream, a tokio runtime's sockets) keep working
    /// in this namespace when returned to and used from other threads.
    /// Threads that `f` spawns inherit the namespace. A panic in `f` is
    /// propagated to the caller.
    ///
    /// Note that `/sys` seen by the thread is still the host's (it depends
    /// on mounts, not on the thread's namespace): use [`Netns::exec`] for
    /// it. Likewise the thread reads the host's `/etc/resolv.conf`; a name
    /// lookup then fails because the namespace has no route to that server,
    /// so use IP addresses.
    pub fn run_in<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        // Opened on the calling thread so that a missing namespace is
        // reported before a thread is spawned.
        let file = fs::File::open(&path).map_err(|source| Error::Io {
            op: "open",
            path,
            source,
        })?;
        let name = self.name.clone();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, move || -> Result<T> {
                    // CLONE_NEWNET makes the kernel check that the
                    // descriptor really is a network namespace.
                    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                        .map_err(|source| Error::Setns { name, source })?;
                    drop(file);
                    Ok(f())
                })
                .map_err(|source| Error::Thread {
                    name: self.name.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }

    /// Adds an address in CIDR notation (`"10.77.1.1/24"`, `"fd77::1/64"`)
    /// to interface `ifname`. IPv6 addresses get `nodad`, so they are usable
    /// at once instead of staying tentative for about a second.
    pub fn addr_add(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.addr("add", ifname, cidr)
    }

    /// Like [`Netns::addr_add`] but succeeds if the address is already
    /// there, which makes re-configuring a link idempotent.
    pub fn addr_replace(&self, ifname: &str, cidr: &str) -> Result<()> {
        self.addr("replace", ifname, cidr)
    }

    fn addr(&self, verb: &str, ifname: &str, cidr: &str) -> Result<()> {
        check_ifname(ifname)?;
        let net = parse_net(cidr)?;
        let mut args = vec!["addr", verb, cidr, "dev", ifname];
        if matches!(net, IpNet::V6(_)) {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// Sets interface `ifname` administratively up or down.
    ///
    /// Setting a link down makes the kernel delete every route through it,
    /// and its IPv6 addresses too (`keep_addr_on_down` is 0 by default);
    /// setting it up again restores neither.
    pub fn link_set(&self, ifname: &str, up: bool) -> Result<()> {
        check_ifname(ifname)?;
        let state = if up { "up" } else { "down" };
        self.ip(&["link", "set", "dev", ifname, state]).map(drop)
    }

    /// `ip route add DEST [via VIA] [dev DEV]` in the main table.
    pub fn route_add(&self, dest: &str, via: Option<IpAddr>, dev: Option<&str>) -> Result<()> {
        self.apply_route(RouteAction::Add, &simple_route(dest, via, dev)?)
    }

    /// `ip route replace DEST [via VIA] [dev DEV]` in the main table.
    pub fn route_replace(&self, dest: &str, via: Option<IpAddr>, dev: Option<&str>) -> Result<()> {
        self.apply_route(RouteAction::Replace, &simple_route(dest, via, dev)?)
    }

    /// `ip route del DEST [via VIA] [dev DEV]` in the main table.
    pub fn route_del(&self, dest: &str, via: Option<IpAddr>, dev: Option<&str>) -> Result<()> {
        self.apply_route(RouteAction::Del, &simple_route(dest, via, dev)?)
    }

    /// Adds, replaces or deletes `route`, which may also carry a metric and a
    /// routing table.
    pub fn apply_route(&self, action: RouteAction, route: &Route) -> Result<()> {
        let rest = route.args()?;
        let mut args = vec!["route", action.verb()];
        args.extend(rest.iter().map(String::as_str));
        self.ip(&args).map(drop)
    }

    /// Turns IP forwarding on or off for both IPv4 (`net.ipv4.ip_forward`)
    /// and IPv6 (`net.ipv6.conf.all.forwarding`) inside the namespace.
    pub fn set_forwarding(&self, enabled: bool) -> Result<()> {
        let v = if enabled { "1" } else { "0" };
        let v4 = format!("net.ipv4.ip_forward={v}");
        let v6 = format!("net.ipv6.conf.all.forwarding={v}");
        self.exec(&["sysctl", "-q", "-w", &v4, &v6]).map(drop)
    }

    /// Byte counters of interface `ifname`.
    ///
    /// Read with `cat` under `ip netns exec`, because only there is `/sys`
    /// remounted to show this namespace's interfaces.
    pub fn link_stats(&self, ifname: &str) -> Result<LinkStats> {
        check_ifname(ifname)?;
        let rx = format!("/sys/class/net/{ifname}/statistics/rx_bytes");
        let tx = format!("/sys/class/net/{ifname}/statistics/tx_bytes");
        let out = self.exec(&["cat", &rx, &tx])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut numbers = text.split_whitespace().map(u64::from_str);
        match (numbers.next(), numbers.next(), numbers.next()) {
            (Some(Ok(rx_bytes)), Some(Ok(tx_bytes)), None) => Ok(LinkStats { rx_bytes, tx_bytes }),
            _ => Err(Error::Parse {
                cmd: format!("ip netns exec {} cat {rx} {tx}", self.name),
                detail: format!("expected two byte counts, got {text:?}"),
            }),
        }
    }

    /// Deletes the namespaces (and their `/etc/netns` directories) whose
    /// name starts with `prefix` and encodes the pid of a process that no
    /// longer exists, i.e. leftovers of runs that were killed before `Drop`
    /// could run. Returns the names it removed.
    ///
    /// `prefix` must start with [`NAME_PREFIX`]; names that do not follow
    /// the `msocks-<tag>-<pid>-<counter>` pattern are never touched, and
    /// neither are those of live processes (so concurrent test runs are
    /// safe). A recycled pid only delays the clean-up, it never deletes a
    /// live namespace. Pids are those of this pid namespace: do not share
    /// `/run/netns` with containers that have their own. Failures to delete
    /// a single namespace are logged and skipped.
    pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
        if !prefix.starts_with(NAME_PREFIX) {
            return Err(invalid(
                "prefix",
                prefix,
                &format!("must start with {NAME_PREFIX:?}"),
            ));
        }
        let in_run = list_dir(Path::new(NETNS_RUN_DIR))?;
        let in_etc = list_dir(Path::new(NETNS_ETC_DIR))?;
        let mut removed = Vec::new();
        for name in in_run.union(&in_etc) {
            if !name.starts_with(prefix) {
                continue;
            }
            let Some(pid) = owner_pid(name) else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            match remove_namespace(name) {
                Ok(()) => removed.push(name.clone()),
                Err(e) => eprintln!("msocks-testbed: could not remove stale namespace {name}: {e}"),
            }
        }
        Ok(removed)
    }

    /// Writes `/etc/netns/NAME/`, whose files `ip netns exec` bind-mounts
    /// over their `/etc` counterparts in the child's private mount namespace
    /// (the host's files are untouched).
    fn write_etc_files(&self) -> Result<()> {
        let dir = etc_dir(&self.name);
        create_dir_all_retrying(&dir)?;
        // The host's resolv.conf points at a nameserver outside the
        // namespace, which is unreachable from in here at best and a leak of
        // test traffic at worst. Pointing programs started with `exec` at
        // 127.0.0.1 means a name lookup stays inside the namespace and fails
        // fast (nothing listens there) instead of querying the host's DNS.
        write_file(&dir.join("resolv.conf"), "nameserver 127.0.0.1\n")?;
        // glibc only reads resolv.conf if nsswitch.conf says `dns`; other
        // host sources (mdns via avahi, systemd-resolved) are reached over
        // Unix sockets that lead out of the namespace. So pin host lookups
        // to `files dns` and keep everything else as the host has it.
        match fs::read_to_string("/etc/nsswitch.conf") {
            Ok(host) => write_file(&dir.join("nsswitch.conf"), &confine_nsswitch(&host))?,
            // No nsswitch.conf means glibc's built-in default (files dns),
            // and `ip netns exec` can only bind over files that exist.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    op: "read",
                    path: PathBuf::from("/etc/nsswitch.conf"),
                    source,
                })
            }
        }
        Ok(())
    }
}

impl Drop for Netns {
    /// Deletes the namespace and its `/etc/netns` directory. Failures are
    /// logged, not raised: panicking here during a panic's unwinding would
    /// abort the process and skip every other clean-up.
    fn drop(&mut self) {
        if let Err(e) = remove_namespace(&self.name) {
            eprintln!(
                "msocks-testbed: could not remove namespace {}: {e}",
                self.name
            );
        }
    }
}

/// Creates a veth pair with end `a_if` in namespace `a` and end `b_if` in
/// namespace `b`, both down.
///
/// The pair is created inside `a` (`ip -n A link add ...`) with the peer
/// moved into `b` in the same request, so neither end ever exists in the
/// host namespace. Deleting either namespace destroys the whole pair.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    check_ifname(a_if)?;
    check_ifname(b_if)?;
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ])
    .map(drop)
}

/// Deletes namespace `name` (if its file still exists) and its `/etc/netns`
/// directory, attempting both even if the first fails.
fn remove_namespace(name: &str) -> Result<()> {
    let mut first_error = None;
    let ns_file = Path::new(NETNS_RUN_DIR).join(name);
    if ns_file.exists() {
        if let Err(e) = run(ip_command(&["netns", "del", name])) {
            // A concurrent clean-up may have won the race; that is success.
            if ns_file.exists() {
                first_error = Some(e);
            }
        }
    }
    let dir = etc_dir(name);
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            first_error.get_or_insert(Error::Io {
                op: "remove",
                path: dir,
                source,
            });
        }
    }
    // /etc/netns has no meaning of its own (iproute2 only looks at its
    // subdirectories), so remove it when the last one is gone to leave /etc
    // as it was. Fails harmlessly while other namespaces still use it.
    let _ = fs::remove_dir(NETNS_ETC_DIR);
    first_error.map_or(Ok(()), Err)
}

fn etc_dir(name: &str) -> PathBuf {
    Path::new(NETNS_ETC_DIR).join(name)
}

/// `create_dir_all`, retried because a concurrent [`remove_namespace`] may
/// remove the empty `/etc/netns` between creating it and creating `dir`.
fn create_dir_all_retrying(dir: &Path) -> Result<()> {
    let mut attempt = 0;
    loop {
        match fs::create_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 5 => attempt += 1,
            Err(source) => {
                return Err(Error::Io {
                    op: "create",
                    path: dir.to_owned(),
                    source,
                })
            }
        }
    }
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).map_err(|source| Error::Io {
        op: "write",
        path: path.to_owned(),
        source,
    })
}

/// The host's nsswitch.conf with its `hosts:` line replaced by
/// `hosts: files dns` (or that line appended if there was none).
fn confine_nsswitch(host: &str) -> String {
    const HOSTS: &str = "hosts: files dns";
    let mut out = String::with_capacity(host.len() + HOSTS.len() + 1);
    let mut replaced = false;
    for line in host.lines() {
        if line.trim_start().starts_with("hosts:") {
            out.push_str(HOSTS);
            replaced = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(HOSTS);
        out.push('\n');
    }
    out
}

/// Names of the entries of `dir`; empty if it does not exist.
fn list_dir(dir: &Path) -> Result<BTreeSet<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => {
            return Err(Error::Io {
                op: "list",
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut names = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io {
            op: "list",
            path: dir.to_owned(),
            source,
        })?;
        // Non-UTF-8 names cannot be ours.
        if let Ok(name) = entry.file_name().into_string() {
            names.insert(name);
        }
    }
    Ok(names)
}

/// The creator's pid encoded in `msocks-<tag>-<pid>-<counter>`, or `None`
/// if `name` does not follow that pattern. Parsed from the right because
/// tags may contain `-`.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    let counter = parts.next()?;
    let pid = parts.next()?;
    let tag = parts.next()?;
    if tag.is_empty() || counter.parse::<u64>().is_err() {
        return None;
    }
    pid.parse::<i32>().ok().filter(|&pid| pid > 0)
}

/// Whether a process with this pid exists and has not exited.
///
/// `kill(pid, 0)` alone is not enough: it succeeds for a zombie, and a
/// killed test binary whose parent died too (`timeout -s KILL`) stays a
/// zombie until the init process reaps it, which some container inits do
/// lazily. So a process whose `/proc/PID/stat` state is `Z` (zombie) or `X`
/// (dead) counts as gone.
fn process_alive(pid: i32) -> bool {
    if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
        if matches!(proc_stat_state(&stat), Some('Z' | 'X')) {
            return false;
        }
    }
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        // EPERM means it exists but belongs to someone else; anything
        // unexpected is treated as alive so that nothing live is deleted.
        Err(_) => true,
    }
}

/// The state letter of a `/proc/PID/stat` line: the first field after the
/// command name, which is in parentheses and may itself contain `)`.
fn proc_stat_state(stat: &str) -> Option<char> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.trim_start().chars().next()
}

fn check_tag(tag: &str) -> Result<()> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(invalid(
            "tag",
            tag,
            &format!("must be 1 to {MAX_TAG_LEN} characters"),
        ));
    }
    if !tag
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(invalid(
            "tag",
            tag,
            "may only contain ASCII letters, digits, '_' and '-'",
        ));
    }
    Ok(())
}

/// Rejects names the kernel would refuse, and anything that could escape
/// the `/sys/class/net/IF` path in [`Netns::link_stats`].
pub(crate) fn check_ifname(ifname: &str) -> Result<()> {
    if ifname.is_empty() || ifname.len() >= IFNAMSIZ {
        return Err(invalid(
            "interface name",
            ifname,
            &format!("must be 1 to {} bytes", IFNAMSIZ - 1),
        ));
    }
    if ifname == "." || ifname == ".." || !ifname.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(invalid(
            "interface name",
            ifname,
            "must be printable ASCII without '/' or spaces",
        ));
    }
    Ok(())
}

fn parse_net(cidr: &str) -> Result<IpNet> {
    IpNet::from_str(cidr).map_err(|e| invalid("CIDR", cidr, &e.to_string()))
}

fn simple_route(dest: &str, via: Option<IpAddr>, dev: Option<&str>) -> Result<Route> {
    let mut route = Route::new(parse_net(dest)?);
    route.via = via;
    route.dev = dev.map(str::to_owned);
    Ok(route)
}

fn invalid(what: &'static str, value: &str, reason: &str) -> Error {
    Error::Invalid {
        what,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn ip_command(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// Runs `cmd` to completion with stdin closed, turning a non-zero exit into
/// [`Error::Command`] with the program's stderr.
fn run(mut cmd: Command) -> Result<Output> {
    let display = describe(&cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            cmd: display.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Command {
            cmd: display,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_from_the_right() {
        assert_eq!(owner_pid("msocks-mn-1234-0"), Some(1234));
        assert_eq!(owner_pid("msocks-a-b-c-77-12"), Some(77));
        assert_eq!(owner_pid("msocks--77-12"), None, "empty tag");
        assert_eq!(owner_pid("msocks-mn-x-0"), None);
        assert_eq!(owner_pid("msocks-mn-0-0"), None, "pid 0 is no process");
        assert_eq!(owner_pid("msocks-mn-12-x"), None);
        assert_eq!(owner_pid("msocks-12-3"), None, "no tag");
        assert_eq!(owner_pid("other-mn-12-3"), None);
    }

    #[test]
    fn zombies_are_not_alive() {
        assert_eq!(proc_stat_state("23150 (testbed-6e4) Z 1 23150"), Some('Z'));
        assert_eq!(proc_stat_state("7 (a) b) S 1 7"), Some('S'));
        assert_eq!(proc_stat_state("garbage"), None);
        assert!(process_alive(std::process::id() as i32));
    }

    #[test]
    fn tags_and_ifnames_are_checked() {
        assert!(check_tag("mn").is_ok());
        assert!(check_tag("demo-run_2").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag("a b").is_err());
        assert!(check_tag("../x").is_err());
        assert!(check_ifname("wired0").is_ok());
        assert!(check_ifname("abcdefghijklmno").is_ok());
        assert!(check_ifname("abcdefghijklmnop").is_err());
        assert!(check_ifname("..").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("").is_err());
    }

    #[test]
    fn nsswitch_hosts_line_is_confined() {
        let host = "passwd: files\nhosts:  files mdns4_minimal [NOTFOUND=return] dns resolve\nnetworks: files\n";
        assert_eq!(
            confine_nsswitch(host),
            "passwd: files\nhosts: files dns\nnetworks: files\n"
        );
        assert_eq!(
            confine_nsswitch("passwd: files"),
            "passwd: files\nhosts: files dns\n"
        );
    }

    #[test]
    fn route_arguments() {
        let route = Route::new(parse_net("10.77.3.0/24").unwrap())
            .via("10.77.1.1".parse().unwrap())
            .dev("wired0")
            .metric(100)
            .table(101);
        assert_eq!(
            route.args().unwrap(),
            [
                "10.77.3.0/24",
                "via",
                "10.77.1.1",
                "dev",
                "wired0",
                "metric",
                "100",
                "table",
                "101"
            ]
        );
        assert!(simple_route("not a net", None, None).is_err());
    }

    #[test]
    fn cleanup_refuses_foreign_prefixes() {
        assert!(matches!(
            Netns::cleanup_stale("docker-"),
            Err(Error::Invalid { .. })
        ));
    }

    #[test]
    fn exec_needs_a_program() {
        // No namespace is created: the check happens before anything runs.
        let ns = std::mem::ManuallyDrop::new(Netns {
            name: "msocks-never-0-0".to_owned(),
        });
        assert!(matches!(ns.exec(&[]), Err(Error::Invalid { .. })));
    }
}
