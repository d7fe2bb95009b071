//! Which local program opened a connection to the SOCKS5 endpoint.
//!
//! `SO_PEERCRED` answers only for Unix-domain sockets: on a TCP socket Linux reports pid 0
//! and the overflow uid. For TCP over loopback the kernel still knows: the client's socket
//! is listed in `/proc/net/tcp{,6}` with its owner's uid and inode, and the process is the
//! one holding a descriptor `socket:[INODE]` (the method of identd and `ss -p`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;

use crate::policy::PeerInfo;

/// Identifies the program on the other end of a local connection. `local` is the agent's
/// end, `peer` the program's. `find_process` also scans `/proc/*/fd` for the pid and reads
/// the program name. Best effort: anything unknown is `None`.
pub fn identify(
    sock: &impl AsFd,
    local: SocketAddr,
    peer: SocketAddr,
    find_process: bool,
) -> PeerInfo {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let mut info = PeerInfo::default();
    if let Ok(cred) = getsockopt(sock, PeerCredentials) {
        // pid 0 is the TCP case described above: no answer.
        if cred.pid() > 0 {
            info.uid = Some(cred.uid());
            info.pid = u32::try_from(cred.pid()).ok();
        }
    }
    if info.pid.is_none() && peer.ip().is_loopback() {
        if let Some((uid, inode)) = proc_net_lookup(peer, local) {
            info.uid = Some(uid);
            if find_process && inode != 0 {
                info.pid = pid_of_socket(inode);
            }
        }
    }
    if let Some(pid) = info.pid {
        info.program = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|s| s.trim_end().to_owned());
    }
    info
}

/// The uid and inode of the TCP socket whose local address is `sock_local` and remote
/// address `sock_remote`, from `/proc/thread-self/net/tcp{,6}` (thread-self: the table of
/// this thread's network namespace).
fn proc_net_lookup(sock_local: SocketAddr, sock_remote: SocketAddr) -> Option<(u32, u64)> {
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/thread-self/net/{file}")) else {
            continue;
        };
        if let Some(found) = find_in_table(&text, sock_local, sock_remote) {
            return Some(found);
        }
    }
    None
}

/// Searches one `/proc/net/tcp`-format table.
pub(crate) fn find_in_table(
    text: &str,
    local: SocketAddr,
    remote: SocketAddr,
) -> Option<(u32, u64)> {
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        if parse_hex_addr(f[1]) == Some(local) && parse_hex_addr(f[2]) == Some(remote) {
            return Some((f[7].parse().ok()?, f[9].parse().ok()?));
        }
    }
    None
}

/// Parses `0100007F:0438` or the 32-digit IPv6 form. The kernel prints each 32-bit word of
/// the address in host byte order, so the bytes come back with `to_ne_bytes`. An
/// IPv4-mapped IPv6 address is returned as IPv4, as the agent's accept sees it.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped()
                .map(IpAddr::V4)
                .unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The process holding a descriptor for socket `inode`. Needs permission to read other
/// users' `/proc/PID/fd` (root) to find their programs.
fn pid_of_socket(inode: u64) -> Option<u32> {
    let target = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_lines() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:9C40 0100007F:0438 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "127.0.0.1:1080".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(find_in_table(table, local, remote), Some((1000, 4242)));
        }
        assert_eq!(find_in_table(table, remote, local), None);
    }

    #[test]
    fn identifies_own_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let info = identify(&server, server.local_addr().unwrap(), peer, true);
        assert_eq!(info.uid, Some(nix::unistd::getuid().as_raw()));
        assert_eq!(info.pid, Some(std::process::id()));
        assert!(info.program.is_some());
        drop(client);
    }
}
