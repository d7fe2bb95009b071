//! `msocks run -- PROGRAM ARGS`: runs a program that knows nothing about SOCKS with the
//! LD_PRELOAD shim (crates/msocks-shim), so its TCP connections go through the agent.
//!
//! This file only finds the library, checks the program can load it, sets the environment
//! and execs; what the library does is in crates/msocks-shim and docs/SHIM.md.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// File name of the shim library.
pub const SHIM_FILE: &str = "libmsocks_shim.so";

/// Long help of `msocks run`.
pub const RUN_LONG_ABOUT: &str = "Run PROGRAM with its TCP connections sent through the msocks \
agent, without changing it: an LD_PRELOAD library (libmsocks_shim.so) interposes connect(), \
getaddrinfo() and getpeername(). A TCP connect (IPv4 or IPv6, blocking or non-blocking) to \
anything but loopback, link-local addresses, the agent itself or --exclude'd networks becomes a connect to \
the agent plus a SOCKS5 CONNECT on the program's own socket; Unix sockets and UDP are left \
alone. A non-blocking connect completes before connect() returns (it returns 0, so \
poll/select/epoll report the socket writable at once).\n\n\
DNS (--dns): `remote` (default) — getaddrinfo() answers a name with a placeholder address from \
198.18.0.0/15 (IPv4-mapped for AF_INET6 queries) and connect() sends the NAME to the agent, so \
the proxy resolves it and the agent's host rules apply; numeric addresses, localhost, this \
host's name and names in /etc/hosts are resolved by libc as usual. `local` — libc resolves \
everything and the agent is sent addresses. Placeholders are per process (kept across fork, \
not exec); gethostbyname() and hand-made DNS queries are not intercepted.\n\n\
If the agent cannot be reached, proxied connects fail with ECONNREFUSED and a message on \
standard error (fail closed: nothing leaks around the agent).\n\n\
Limits: only dynamically linked programs (static binaries and Go programs, which make raw \
system calls, are not affected; msocks run refuses static ELF files and ones for another architecture); setuid/setgid programs \
ignore LD_PRELOAD; io_uring connects, UDP (QUIC, DNS) and TCP Fast Open are not redirected. \
docs/SHIM.md has the details.\n\n\
The library is looked for in $MSOCKS_SHIM, else in EXE_DIR/deps/ (a cargo target \
directory), next to the msocks executable, and in EXE_DIR/../lib/msocks/. PROGRAM is exec'd (same pid, signals and exit status \
pass through); LD_PRELOAD is prepended to any existing value.";

/// What `--dns` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsArg {
    /// Names go to the agent (placeholder addresses in the program).
    Remote,
    /// libc resolves names; the agent gets addresses.
    Local,
}

/// Options of `msocks run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The agent's SOCKS5 address: an IP address and port (`127.0.0.1:1080`, `[::1]:1080`),
    /// not a name; one of the agent's `listen` addresses.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:1080")]
    pub agent: SocketAddr,
    /// Who resolves host names: the agent's proxy (remote) or this host (local).
    #[arg(long, value_enum, default_value_t = DnsArg::Remote)]
    pub dns: DnsArg,
    /// Networks (ADDR or ADDR/PREFIX) reached directly, not through the agent; comma
    /// separated or repeated. Loopback and link-local are always direct.
    #[arg(long, value_name = "NET", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Log every decision of the library (one line each) to standard error.
    #[arg(long)]
    pub log: bool,
    /// Limit for connecting through the agent, in seconds (the agent may hold a connect while
    /// it waits for a link).
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    pub timeout: f64,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM ARGS"
    )]
    pub command: Vec<OsString>,
}

/// Checks one `--exclude` entry (the library parses it again; a typo should stop here, not
/// silently proxy what was meant to be direct).
fn check_net(item: &str) -> Result<()> {
    let (addr, prefix) = match item.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (item, None),
    };
    let ip: IpAddr = addr
        .parse()
        .with_context(|| format!("--exclude {item:?}: not an IP address or ADDR/PREFIX"))?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match p.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => bail!("--exclude {item:?}: prefix length must be 0 to {max}"),
        }
    }
    Ok(())
}

/// Where the library may be, in search order.
fn shim_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("MSOCKS_SHIM").filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
        // An explicit choice is the only one: falling back would hide a wrong path.
        return out;
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        // In a cargo target directory deps/ comes first: it is rebuilt with every build of
        // msocks, while the copy next to the binary is only refreshed by workspace builds and
        // may be stale.
        out.push(dir.join("deps").join(SHIM_FILE));
        out.push(dir.join(SHIM_FILE));
        out.push(dir.join("..").join("lib").join("msocks").join(SHIM_FILE));
    }
    out
}

/// The library's absolute path, checked to be usable in LD_PRELOAD.
fn find_shim() -> Result<PathBuf> {
    let candidates = shim_candidates();
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        let list: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "the LD_PRELOAD library {SHIM_FILE} was not found (looked at: {}); build it with \
             `cargo build -p msocks-shim` (a workspace build makes it next to msocks) or set \
             MSOCKS_SHIM to its path",
            list.join(", ")
        );
    };
    let path = found
        .canonicalize()
        .with_context(|| format!("resolving {}", found.display()))?;
    // The dynamic loader splits LD_PRELOAD at spaces and colons.
    if path
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| *b == b' ' || *b == b':')
    {
        bail!(
            "the library's path {} contains a space or ':', which LD_PRELOAD cannot carry; \
             copy it elsewhere and set MSOCKS_SHIM",
            path.display()
        );
    }
    Ok(path)
}

/// The file `program` names, as execvp would find it.
fn resolve_program(program: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What the program file is, as far as preloading goes.
#[derive(Debug, PartialEq, Eq)]
pub enum ExecKind {
    /// An ELF file with a program interpreter: the dynamic loader honours LD_PRELOAD.
    Dynamic,
    /// An ELF file without PT_INTERP: nothing is preloaded into it.
    Static,
    /// Not ELF (a script: its interpreter is what gets the library), or unreadable.
    Other,
}

/// Reads the ELF header and program headers of `bytes` looking for PT_INTERP.
pub fn elf_kind(bytes: &[u8]) -> ExecKind {
    const PT_INTERP: u32 = 3;
    if bytes.get(..4) != Some(b"\x7fELF") {
        return ExecKind::Other;
    }
    let (Some(&class), Some(&data)) = (bytes.get(4), bytes.get(5)) else {
        return ExecKind::Other;
    };
    let le = data == 1;
    let rd = |off: usize, n: usize| -> Option<u64> {
        let b = bytes.get(off..off.checked_add(n)?)?;
        let mut v = 0u64;
        for i in 0..n {
            let byte = if le { b[n - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Some(v)
    };
    // (e_phoff, e_phentsize, e_phnum) offsets for ELF32 and ELF64.
    let fields = match class {
        1 => (rd(28, 4), rd(42, 2), rd(44, 2)),
        2 => (rd(32, 8), rd(54, 2), rd(56, 2)),
        _ => return ExecKind::Other,
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = fields else {
        return ExecKind::Other;
    };
    for i in 0..phnum {
        let Some(off) = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .and_then(|o| usize::try_from(o).ok())
        else {
            return ExecKind::Other;
        };
        match rd(off, 4) {
            Some(t) if t == u64::from(PT_INTERP) => return ExecKind::Dynamic,
            Some(_) => {}
            None => return ExecKind::Other,
        }
    }
    ExecKind::Static
}

/// ELF class (32/64-bit), byte order and machine of an ELF header: a library can only be
/// preloaded into a program with the same three.
pub fn elf_abi(bytes: &[u8]) -> Option<(u8, u8, u16)> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return None;
    }
    let (class, data) = (*bytes.get(4)?, *bytes.get(5)?);
    let m = [*bytes.get(18)?, *bytes.get(19)?];
    let machine = if data == 2 {
        u16::from_be_bytes(m)
    } else {
        u16::from_le_bytes(m)
    };
    Some((class, data, machine))
}

/// The first 64 KiB of a file: enough for the ELF and program headers of any ordinary binary.
fn head_of(path: &Path) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = Vec::with_capacity(64 * 1024);
    f.by_ref().take(64 * 1024).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// `msocks run`: checks, sets the environment, execs. Returns only on failure.
pub fn run(args: RunArgs) -> Result<()> {
    for item in &args.exclude {
        check_net(item)?;
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0 && args.timeout < 1e9) {
        bail!("--timeout must be a positive number of seconds");
    }
    let shim = find_shim()?;
    let Some((program, rest)) = args.command.split_first() else {
        bail!("no program given: msocks run [OPTIONS] -- PROGRAM [ARGS...]");
    };
    match resolve_program(program) {
        None => {
            eprintln!(
                "msocks: error: {}: command not found",
                program.to_string_lossy()
            );
            std::process::exit(127);
        }
        Some(path) => {
            if let Some(head) = head_of(&path) {
                let lib_abi = head_of(&shim).and_then(|h| elf_abi(&h));
                if let (Some(prog), Some(lib)) = (elf_abi(&head), lib_abi) {
                    if prog != lib {
                        bail!(
                            "{} is built for another architecture or word size than {} \
                             (ELF class/data/machine {prog:?} vs {lib:?}): the loader would \
                             skip the library and the connections would bypass the agent",
                            path.display(),
                            shim.display()
                        );
                    }
                }
                if elf_kind(&head) == ExecKind::Static {
                    bail!(
                        "{} is a statically linked program: it cannot load the LD_PRELOAD \
                         library, so its connections would bypass the agent. Point the \
                         program's own SOCKS5 setting at the agent ({}) instead; see \
                         docs/SHIM.md",
                        path.display(),
                        args.agent
                    );
                }
            }
            if let Ok(meta) = path.metadata() {
                if meta.permissions().mode() & 0o6000 != 0 {
                    eprintln!(
                        "msocks: warning: {} is setuid/setgid: the loader ignores LD_PRELOAD \
                         for it unless you already are its owner, so its connections may \
                         bypass the agent",
                        path.display()
                    );
                }
            }
        }
    }
    if TcpStream::connect_timeout(&args.agent, Duration::from_secs(1)).is_err() {
        eprintln!(
            "msocks: warning: nothing answers at {} (the agent): the program's connections \
             through it will fail with ECONNREFUSED (start `msocks agent`, or give --agent \
             one of its `listen` addresses)",
            args.agent
        );
    }
    if args.agent.is_ipv6() && !args.agent.ip().to_canonical().is_ipv4() {
        // The shim connects the program's own socket to the agent: an AF_INET socket
        // (most programs' for an IPv4 or placeholder destination) cannot reach it.
        eprintln!(
            "msocks: warning: the agent's address {} is IPv6: the program's IPv4 sockets \
             cannot reach it and those connections will fail with EAFNOSUPPORT; use an IPv4 \
             agent address such as 127.0.0.1:1080",
            args.agent
        );
    }

    let mut preload = OsString::from(shim.as_os_str());
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest)
        .env("LD_PRELOAD", preload)
        .env("MSOCKS_AGENT", args.agent.to_string())
        .env(
            "MSOCKS_DNS",
            match args.dns {
                DnsArg::Remote => "remote",
                DnsArg::Local => "local",
            },
        )
        .env("MSOCKS_SHIM_TIMEOUT", args.timeout.to_string());
    if !args.exclude.is_empty() {
        cmd.env("MSOCKS_SHIM_EXCLUDE", args.exclude.join(","));
    }
    if args.log {
        cmd.env("MSOCKS_SHIM_LOG", "1");
    }
    let err = cmd.exec();
    let code = if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    eprintln!(
        "msocks: error: cannot run {}: {err}",
        program.to_string_lossy()
    );
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_entries_are_checked() {
        for ok in ["10.0.0.0/8", "192.0.2.1", "fd00::/8", "::1", "0.0.0.0/0"] {
            assert!(check_net(ok).is_ok(), "{ok}");
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "example.org", "10.0.0.0/x", ""] {
            assert!(check_net(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn elf_interpreter_is_found() {
        // The test binary itself is dynamically linked (the default on Linux).
        let me = std::env::current_exe().unwrap();
        assert_eq!(elf_kind(&head_of(&me).unwrap()), ExecKind::Dynamic);
        assert_eq!(elf_kind(b"#!/bin/sh\necho hi\n"), ExecKind::Other);
        assert_eq!(elf_kind(b"\x7fELF"), ExecKind::Other);
        // A minimal ELF64 little-endian header with one PT_LOAD program header: static.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[32] = 64; // e_phoff
        elf[54] = 56; // e_phentsize
        elf[56] = 1; // e_phnum
        elf[64] = 1; // p_type PT_LOAD
        assert_eq!(elf_kind(&elf), ExecKind::Static);
        elf[64] = 3; // PT_INTERP
        assert_eq!(elf_kind(&elf), ExecKind::Dynamic);
        assert_eq!(elf_abi(&elf), Some((2, 1, 0)));
        #[cfg(target_arch = "x86_64")]
        assert_eq!(elf_abi(&head_of(&me).unwrap()), Some((2, 1, 62)));
        assert_eq!(elf_abi(b"#!/bin/sh"), None);
        // A header pointing past the end is not trusted.
        elf[64] = 1;
        elf[56] = 9;
        assert_eq!(elf_kind(&elf), ExecKind::Other);
    }
}
