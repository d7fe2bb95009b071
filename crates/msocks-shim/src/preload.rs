//! The exported C functions that interpose libc's, and the process-wide state behind them.
//!
//! Every export catches panics (none may unwind into C) and, when in doubt, falls back to
//! the real libc function: the program must keep working for everything the shim does not
//! handle.

use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_int, CStr};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock};

use libc::{addrinfo, sockaddr, socklen_t};

use crate::classify::{self, Decision};
use crate::config::{Config, DnsMode};
use crate::fakedns::{self, FakeDns};
use crate::handshake::{self, ConnectFn};

type GetaddrinfoFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const addrinfo,
    *mut *mut addrinfo,
) -> c_int;
type FreeaddrinfoFn = unsafe extern "C" fn(*mut addrinfo);
type GetpeernameFn = unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int;

/// MPTCP sockets are SOCK_STREAM too and connect the same way (not in every libc crate).
const IPPROTO_MPTCP: c_int = 262;

/// The next definitions of the interposed functions (libc's, or another preloaded library's).
struct Real {
    connect: Option<ConnectFn>,
    getaddrinfo: Option<GetaddrinfoFn>,
    freeaddrinfo: Option<FreeaddrinfoFn>,
    getpeername: Option<GetpeernameFn>,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        // SAFETY: dlsym with RTLD_NEXT and NUL-terminated names is always safe to call; the
        // result is null or the address of the named libc function, whose C signature is
        // exactly the fn type it is transmuted to (connect(2), getaddrinfo(3),
        // freeaddrinfo(3), getpeername(2)). A null pointer becomes None (Option<fn> has the same layout).
        unsafe {
            Real {
                connect: std::mem::transmute::<*mut libc::c_void, Option<ConnectFn>>(libc::dlsym(
                    libc::RTLD_NEXT,
                    c"connect".as_ptr(),
                )),
                getaddrinfo: std::mem::transmute::<*mut libc::c_void, Option<GetaddrinfoFn>>(
                    libc::dlsym(libc::RTLD_NEXT, c"getaddrinfo".as_ptr()),
                ),
                freeaddrinfo: std::mem::transmute::<*mut libc::c_void, Option<FreeaddrinfoFn>>(
                    libc::dlsym(libc::RTLD_NEXT, c"freeaddrinfo".as_ptr()),
                ),
                getpeername: std::mem::transmute::<*mut libc::c_void, Option<GetpeernameFn>>(
                    libc::dlsym(libc::RTLD_NEXT, c"getpeername".as_ptr()),
                ),
            }
        }
    })
}

/// Settings and tables, made on first use.
struct State {
    /// `None` when the environment had a bad setting: then proxied connects fail (closed).
    config: Option<Config>,
    hostname: Option<String>,
    hosts: HashSet<String>,
    fake: Mutex<FakeDns>,
    /// Results this library allocated, so `freeaddrinfo` hands libc only libc's own.
    ours: Mutex<HashSet<usize>>,
    /// Sockets connected through the agent: fd → (its local address then, the destination
    /// the program asked for), so `getpeername` can answer with the destination.
    peers: Mutex<HashMap<c_int, (SocketAddr, SocketAddr)>>,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| {
        let config = match Config::from_lookup(|k| std::env::var(k).ok()) {
            Ok(c) => Some(c),
            Err(e) => {
                say(format_args!(
                    "bad setting, TCP connections that would go through the agent will fail: {e}"
                ));
                None
            }
        };
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
        let hostname = (unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0)
            .then(|| {
                let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                String::from_utf8_lossy(&buf[..end]).into_owned()
            })
            .filter(|h| !h.is_empty());
        let hosts = std::fs::read_to_string("/etc/hosts")
            .map(|t| classify::hosts_names(&t))
            .unwrap_or_default();
        State {
            config,
            hostname,
            hosts,
            fake: Mutex::new(FakeDns::new()),
            ours: Mutex::new(HashSet::new()),
            peers: Mutex::new(HashMap::new()),
        }
    })
}

/// A poisoned lock only means a panic elsewhere; the tables stay consistent (each update is
/// one insert), so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One line on standard error. Write errors are ignored: the program may have closed fd 2.
fn say(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(
        std::io::stderr(),
        "msocks-shim[{}]: {args}",
        std::process::id()
    );
}

fn log(args: std::fmt::Arguments<'_>) {
    if state().config.as_ref().is_some_and(|c| c.log) {
        say(args);
    }
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

fn sockopt_int(fd: c_int, opt: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: the option writes one int into `v`, whose size is in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(v)
}

/// Interposed `connect(2)`.
///
/// # Safety
/// Called by C code with connect's contract: `addr` points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: the caller's contract is passed on unchanged.
    match catch_unwind(AssertUnwindSafe(|| unsafe { connect_impl(fd, addr, len) })) {
        Ok(rc) => rc,
        Err(_) => {
            say(format_args!(
                "internal error in connect (fd {fd}); failing it"
            ));
            set_errno(libc::ECONNREFUSED);
            -1
        }
    }
}

/// # Safety
/// As [`connect`].
unsafe fn connect_impl(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(real_connect) = real().connect else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: the caller guarantees `len` readable bytes at `addr`.
    let Some(dest) = (unsafe { handshake::from_raw(addr, len) }) else {
        // Unix sockets, AF_UNSPEC (dissolving an association) and anything else.
        // SAFETY: the program's own arguments, passed on.
        return unsafe { real_connect(fd, addr, len) };
    };
    let is_tcp = sockopt_int(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && matches!(
            sockopt_int(fd, libc::SO_PROTOCOL),
            Some(0 | libc::IPPROTO_TCP | IPPROTO_MPTCP)
        );
    let domain = sockopt_int(fd, libc::SO_DOMAIN);
    let (true, Some(domain)) = (is_tcp, domain) else {
        // UDP "connects", SCTP, or not a socket at all (libc reports that).
        // SAFETY: as above.
        return unsafe { real_connect(fd, addr, len) };
    };
    let st = state();
    let Some(config) = st.config.as_ref() else {
        if matches!(
            classify::decide(dest, &Config::default(), |_| None),
            Decision::Direct(_)
        ) {
            // SAFETY: as above.
            return unsafe { real_connect(fd, addr, len) };
        }
        set_errno(libc::ECONNREFUSED);
        return -1;
    };
    let decision = classify::decide(dest, config, |ip: Ipv4Addr| {
        if config.dns == DnsMode::Remote && fakedns::in_range(ip) {
            lock(&st.fake).name_for(ip).map(str::to_owned)
        } else {
            None
        }
    });
    let target = match decision {
        Decision::Direct(why) => {
            log(format_args!("fd {fd}: {dest} direct ({why:?})"));
            // SAFETY: as above.
            return unsafe { real_connect(fd, addr, len) };
        }
        Decision::Proxy(target) => target,
    };
    // SAFETY: `real_connect` is libc's connect (found with RTLD_NEXT).
    let r = unsafe {
        handshake::via_agent(
            fd,
            domain,
            real_connect,
            config.agent,
            &target,
            config.timeout,
        )
    };
    match r {
        Ok(()) => {
            if let Some(local) = handshake::local_addr(fd) {
                lock(&st.peers).insert(fd, (local, dest));
            }
            log(format_args!(
                "fd {fd}: {dest} via agent {} as {target}",
                config.agent
            ));
            0
        }
        Err(e) => {
            let errno = e.errno();
            if matches!(e, crate::socks::HandshakeError::Refused(_)) {
                log(format_args!(
                    "fd {fd}: {dest} ({target}) refused by the agent: {e} (errno {errno})"
                ));
            } else {
                // The agent is missing or broken: say so even without logging, because the
                // program will only report a refused connection.
                say(format_args!(
                    "fd {fd}: {dest} ({target}): no stream through the agent at {}: {e}; \
                     failing connect with errno {errno}",
                    config.agent
                ));
            }
            set_errno(errno);
            -1
        }
    }
}

/// What one placeholder `getaddrinfo` result is made of, in one allocation: `freeaddrinfo`
/// frees it with one `free`.
#[repr(C)]
struct Block {
    ai: addrinfo,
    addr: libc::sockaddr_storage,
    name: [u8; 256],
}

/// Interposed `getaddrinfo(3)`.
///
/// # Safety
/// Called by C code with getaddrinfo's contract (valid strings or null, `res` writable).
#[no_mangle]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    // SAFETY: the caller's contract is passed on unchanged.
    match catch_unwind(AssertUnwindSafe(|| unsafe {
        getaddrinfo_impl(node, service, hints, res)
    })) {
        Ok(rc) => rc,
        Err(_) => {
            say(format_args!("internal error in getaddrinfo"));
            libc::EAI_FAIL
        }
    }
}

/// # Safety
/// As [`getaddrinfo`].
unsafe fn getaddrinfo_impl(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    let Some(real_gai) = real().getaddrinfo else {
        return libc::EAI_SYSTEM;
    };
    // SAFETY (for every `real_gai` call below with the program's arguments): passed on as
    // the program gave them.
    let pass = || unsafe { real_gai(node, service, hints, res) };
    let st = state();
    if node.is_null() || res.is_null() || st.config.as_ref().map(|c| c.dns) != Some(DnsMode::Remote)
    {
        return pass();
    }
    // SAFETY: `hints` is null or points to an addrinfo (getaddrinfo's contract); copied.
    let h: addrinfo = if hints.is_null() {
        // SAFETY: addrinfo is plain old data (integers and nullable pointers).
        unsafe { std::mem::zeroed() }
    } else {
        unsafe { std::ptr::read(hints) }
    };
    let family_ok = matches!(
        h.ai_family,
        libc::AF_UNSPEC | libc::AF_INET | libc::AF_INET6
    );
    let stream_ok = matches!(h.ai_socktype, 0 | libc::SOCK_STREAM)
        && matches!(h.ai_protocol, 0 | libc::IPPROTO_TCP);
    if !family_ok || !stream_ok || h.ai_flags & libc::AI_NUMERICHOST != 0 {
        return pass();
    }
    // SAFETY: `node` is a NUL-terminated string (checked non-null above).
    let Ok(name) = unsafe { CStr::from_ptr(node) }.to_str() else {
        return pass();
    };
    // Numeric forms (including inet_aton's, like "10.1"): libc answers exactly as usual.
    let mut numeric = h;
    numeric.ai_flags |= libc::AI_NUMERICHOST;
    // SAFETY: `numeric` is a valid addrinfo on our stack; the rest is the program's.
    let rc = unsafe { real_gai(node, service, &numeric, res) };
    if rc != libc::EAI_NONAME {
        return rc;
    }
    if classify::is_local_name(name, st.hostname.as_deref(), &st.hosts) {
        log(format_args!(
            "getaddrinfo {name:?}: local name, resolved by libc"
        ));
        return pass();
    }
    let port = match service_port(real_gai, service, &h) {
        Ok(p) => p,
        Err(rc) => return rc,
    };
    let normalized = classify::normalize_name(name);
    let Some(ip) = lock(&st.fake).address_for(&normalized) else {
        return pass();
    };
    let addr = if h.ai_family == libc::AF_INET6 {
        SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    };
    let want_canon = h.ai_flags & libc::AI_CANONNAME != 0;
    // SAFETY: calloc of one Block; null is checked. A zeroed Block is valid (plain data).
    let block = unsafe { libc::calloc(1, std::mem::size_of::<Block>()) }.cast::<Block>();
    if block.is_null() {
        return libc::EAI_MEMORY;
    }
    let (raw, raw_len) = handshake::to_raw(addr);
    // SAFETY: `block` is a fresh, zeroed, exclusively owned Block; the pointers stored in the
    // addrinfo point into the same allocation, which lives until our freeaddrinfo frees it.
    unsafe {
        let b = &mut *block;
        b.addr = raw;
        let n = normalized.len().min(b.name.len() - 1);
        b.name[..n].copy_from_slice(&normalized.as_bytes()[..n]);
        b.ai.ai_flags = h.ai_flags;
        b.ai.ai_family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        b.ai.ai_socktype = libc::SOCK_STREAM;
        b.ai.ai_protocol = libc::IPPROTO_TCP;
        b.ai.ai_addrlen = raw_len;
        b.ai.ai_addr = std::ptr::addr_of_mut!(b.addr).cast();
        b.ai.ai_canonname = if want_canon {
            b.name.as_mut_ptr().cast()
        } else {
            std::ptr::null_mut()
        };
        b.ai.ai_next = std::ptr::null_mut();
        lock(&st.ours).insert(block as usize);
        *res = std::ptr::addr_of_mut!(b.ai);
    }
    log(format_args!(
        "getaddrinfo {name:?}: placeholder {} (the agent resolves the name)",
        IpAddr::from(ip)
    ));
    0
}

/// The port a service string means for TCP: a number, or a name from the services database
/// (looked up by libc through a numeric query, so its answer and errors are libc's).
fn service_port(
    real_gai: GetaddrinfoFn,
    service: *const c_char,
    h: &addrinfo,
) -> Result<u16, c_int> {
    if service.is_null() {
        return Ok(0);
    }
    // SAFETY: addrinfo is plain old data; all-zero is valid.
    let mut q: addrinfo = unsafe { std::mem::zeroed() };
    q.ai_family = libc::AF_INET;
    q.ai_socktype = libc::SOCK_STREAM;
    q.ai_flags = libc::AI_NUMERICHOST | (h.ai_flags & libc::AI_NUMERICSERV);
    let mut out: *mut addrinfo = std::ptr::null_mut();
    // SAFETY: a NUL-terminated literal, the program's service string, our hints and out.
    let rc = unsafe { real_gai(c"127.0.0.1".as_ptr(), service, &q, &mut out) };
    if rc != 0 {
        return Err(rc);
    }
    // SAFETY: on success `out` is libc's list; its first entry's address is a sockaddr of
    // `ai_addrlen` bytes, read by from_raw with that length; then the list goes back to libc.
    unsafe {
        let port = out
            .as_ref()
            .and_then(|ai| handshake::from_raw(ai.ai_addr, ai.ai_addrlen))
            .map(|a| a.port())
            .unwrap_or(0);
        if let Some(free) = real().freeaddrinfo {
            free(out);
        }
        Ok(port)
    }
}

/// Interposed `freeaddrinfo(3)`: frees our placeholder results, hands anything else to libc.
///
/// # Safety
/// `res` is null or a list returned by `getaddrinfo` and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn freeaddrinfo(res: *mut addrinfo) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if res.is_null() {
            return;
        }
        if lock(&state().ours).remove(&(res as usize)) {
            // SAFETY: `res` is the start of a Block we calloc'ed (recorded in `ours`, removed
            // now so it cannot be freed twice through us).
            unsafe { libc::free(res.cast()) };
        } else if let Some(free) = real().freeaddrinfo {
            // SAFETY: not ours, so libc's own list; the caller guarantees it is live.
            unsafe { free(res) };
        }
    }));
}

/// Interposed `getpeername(2)`: for a socket connected through the agent, the destination the
/// program connected to (what a direct connection would show) instead of the agent.
///
/// The table is keyed by descriptor and `close` is not interposed, so an entry can outlive
/// its socket; it is used only while the socket is still the same connection — its peer is
/// the agent and its local address is the one recorded — so a reused descriptor number
/// gets the real answer.
///
/// # Safety
/// Called by C code with getpeername's contract (`addr` has `*len` writable bytes).
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    let Some(real_getpeername) = real().getpeername else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    if addr.is_null() || len.is_null() {
        // SAFETY: the program's own arguments, passed on (libc reports EFAULT).
        return unsafe { real_getpeername(fd, addr, len) };
    }
    // SAFETY: `len` is non-null and, by getpeername's contract, valid.
    let room = unsafe { *len };
    // SAFETY: the program's own arguments, passed on.
    let rc = unsafe { real_getpeername(fd, addr, len) };
    if rc != 0 {
        return rc;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let st = state();
        let Some(config) = st.config.as_ref() else {
            return;
        };
        let Some((local, dest)) = lock(&st.peers).get(&fd).copied() else {
            return;
        };
        // SAFETY: the kernel wrote min(room, *len) valid bytes of the peer's address.
        let written = unsafe { (*len).min(room) };
        // SAFETY: `addr` holds `written` valid bytes (just above).
        let peer = unsafe { handshake::from_raw(addr, written) };
        let same = peer.map(classify::unmap) == Some(classify::unmap(config.agent))
            && handshake::local_addr(fd) == Some(local);
        if same {
            // SAFETY: by getpeername's contract `addr` has `room` writable bytes; `len` is
            // valid. write_raw writes at most `room` bytes and sets the full length.
            unsafe {
                *len = room;
                handshake::write_raw(dest, addr, len);
            }
        } else {
            lock(&st.peers).remove(&fd);
        }
    }));
    0
}
