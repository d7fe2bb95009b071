//! Shared helpers for the integration tests of the `msocks` binary.
//!
//! Every test file that needs them says `mod support;`. Not every file uses
//! every item, hence the `dead_code` allowance.
//!
//! Stand-in servers: while the real proxy is being written, the harness can be
//! validated against other SOCKS5 servers by setting
//! `MSOCKS_TEST_STANDIN=microsocks` or `MSOCKS_TEST_STANDIN=dante` (see
//! [`standin`]). The committed tests always target msocks; under a stand-in,
//! assertions on msocks' own log lines are skipped (with a note on stderr)
//! and msocks-only features (`msocks passwd`) are left out.
#![allow(dead_code)]

pub mod agent_testbed;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// Path of the binary under test.
pub const MSOCKS_BIN: &str = env!("CARGO_BIN_EXE_msocks");

/// Default limit for one run of an external program (curl, python3, ...).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Tools and skipping
// ---------------------------------------------------------------------------

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

/// True when the CI environment variable is set (to anything but "", "0" or
/// "false").
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false")),
        Err(_) => false,
    }
}

/// Full path of `name` if it is an executable file on PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn skip_or_panic(what: &str) -> bool {
    let test = test_name();
    if in_ci() {
        panic!(
            "{test}: {what} not installed, but CI is set: the test cannot be skipped in CI. \
             Run ./scripts/test.sh (it installs every test tool) instead of plain cargo test."
        );
    }
    eprintln!();
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("SKIPPED {test}: {what} not installed (./scripts/test.sh installs it)");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!();
    false
}

/// Returns true if the program `name` is on PATH. Otherwise: in CI, panics
/// (a missing tool must never turn into a silently green run); outside CI,
/// prints a loud SKIPPED line and returns false so the test can return early.
pub fn require_tool(name: &str) -> bool {
    if find_on_path(name).is_some() {
        return true;
    }
    skip_or_panic(name)
}

/// Like [`require_tool`] for a Python module: true if `python3 -c "import
/// MODULE"` succeeds. `pip_name` is the distribution to name in the message.
pub fn require_python_module(module: &str, pip_name: &str) -> bool {
    if !require_tool("python3") {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    skip_or_panic(&format!("python3 module `{module}` (pip: {pip_name})"))
}

// ---------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------

/// `n` deterministic pseudo-random bytes (xorshift64*) for `seed`.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // splitmix64 of the seed so that small/zero seeds give good states.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut state = (z ^ (z >> 31)) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Lowercase hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    sha256_hex(&data)
}

/// A fresh directory under the system temp dir, removed on Drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "msocks-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Running external programs with a time limit
// ---------------------------------------------------------------------------

fn drain<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` to completion with stdout/stderr captured, killing it (and
/// failing the test) if it takes longer than `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    run_with_input(cmd, None, timeout)
}

/// Like [`run_with_timeout`], feeding `input` on stdin (stdin is /dev/null
/// when `input` is None).
pub fn run_with_input(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let writer = match (input, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                let _ = stdin.write_all(&data);
            }))
        }
        _ => None,
    };
    let out = drain(child.stdout.take().expect("child stdout was piped"));
    let err = drain(child.stderr.take().expect("child stderr was piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = out.join().unwrap_or_default();
                let stderr = err.join().unwrap_or_default();
                panic!(
                    "{shown} did not finish within {timeout:?} and was killed\n\
                     --- stdout (first 4 KiB) ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout[..stdout.len().min(4096)]),
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("waiting for {shown}: {e}"),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    Output {
        status,
        stdout: out.join().expect("stdout reader thread panicked"),
        stderr: err.join().expect("stderr reader thread panicked"),
    }
}

/// Removes the proxy environment variables (http_proxy, ALL_PROXY, ...) of
/// the caller from `cmd`, so only what a test sets up applies.
pub fn clear_proxy_env(cmd: &mut Command) -> &mut Command {
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "socks_proxy",
        "SOCKS_PROXY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// curl's common leading arguments: `-q` (must come first: do not read
/// ~/.curlrc), quiet but showing errors, and a 60 s overall limit.
pub const CURL_BASE_ARGS: [&str; 5] = ["-q", "--silent", "--show-error", "--max-time", "60"];

/// A `curl` command that ignores ~/.curlrc and any proxy environment
/// variables of the caller, so only the flags a test gives apply.
pub fn curl() -> Command {
    let mut c = Command::new("curl");
    clear_proxy_env(&mut c);
    c.args(CURL_BASE_ARGS);
    c
}

/// Panics with both output streams unless the command succeeded.
pub fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(4096)]),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------
// Log parsing
// ---------------------------------------------------------------------------

/// Removes ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in @..~
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses the `key=value` fields of a log line (values may be quoted).
pub fn log_fields(line: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Find a '=' preceded by an identifier-ish key.
        if bytes[i] == b'=' {
            let mut k = i;
            while k > 0 && {
                let b = bytes[k - 1];
                b.is_ascii_alphanumeric() || b == b'_' || b == b'.'
            } {
                k -= 1;
            }
            if k < i && (k == 0 || bytes[k - 1].is_ascii_whitespace()) {
                let key = &line[k..i];
                let rest = &line[i + 1..];
                let (value, used) = if let Some(stripped) = rest.strip_prefix('"') {
                    match stripped.find('"') {
                        Some(end) => (stripped[..end].to_string(), end + 2),
                        None => (stripped.to_string(), rest.len()),
                    }
                } else {
                    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                    (rest[..end].to_string(), end)
                };
                map.insert(key.to_string(), value);
                i += 1 + used;
                continue;
            }
        }
        i += 1;
    }
    map
}

/// Extracts the address from a line containing `listening on <addr>`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let idx = line.find("listening on ")?;
    let rest = line[idx + "listening on ".len()..].trim_start();
    let rest = rest.strip_prefix("addr=").unwrap_or(rest);
    let token: String = rest
        .trim_start_matches(['"', '`', '\''])
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']' | '%'))
        .collect();
    token.parse().ok()
}

// ---------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------

/// Which server [`ProxyProcess`] runs: `None` for msocks (always, unless a
/// developer sets `MSOCKS_TEST_STANDIN=microsocks|dante` to validate the
/// harness against another SOCKS5 server).
pub fn standin() -> Option<String> {
    match std::env::var("MSOCKS_TEST_STANDIN") {
        Ok(s) if !s.is_empty() && s != "msocks" => {
            assert!(
                s == "microsocks" || s == "dante",
                "MSOCKS_TEST_STANDIN must be microsocks or dante, not {s:?}"
            );
            Some(s)
        }
        _ => None,
    }
}

/// A running proxy process whose stdout+stderr are collected into a shared
/// string. The process (group) is killed on Drop; if the test is failing,
/// the collected logs are printed then.
pub struct ProxyProcess {
    child: Child,
    addrs: Vec<SocketAddr>,
    logs: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    standin: Option<String>,
    _scratch: Option<TempDir>,
}

fn spawn_log_reader<R: Read + Send + 'static>(r: R, logs: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = strip_ansi(&String::from_utf8_lossy(&buf));
                    let mut l = logs.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    if !line.ends_with('\n') {
                        l.push('\n');
                    }
                }
            }
        }
    })
}

impl ProxyProcess {
    /// Spawns `msocks proxy --listen 127.0.0.1:0 EXTRA_ARGS...` and waits up to
    /// 10 s for its `listening on` line.
    pub fn start(extra_args: &[&str]) -> ProxyProcess {
        let mut args = vec!["proxy", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra_args);
        Self::start_args(&args)
    }

    /// Spawns `msocks ARGS...` (no implicit `proxy --listen`), e.g. for a
    /// config file that names its own listeners, and waits up to 10 s until
    /// it has logged one `listening on` line per expected listener (at least
    /// one).
    pub fn start_args(args: &[&str]) -> ProxyProcess {
        if let Some(which) = standin() {
            return Self::start_standin(&which, args);
        }
        let expected = args.iter().filter(|a| **a == "--listen").count().max(1);
        let mut cmd = Command::new(MSOCKS_BIN);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so Drop can kill anything it forks.
            .process_group(0);
        let shown = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
        let mut p = Self::from_child(child, None, None);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let addrs: Vec<SocketAddr> = p.logs().lines().filter_map(parse_listening).collect();
            if addrs.len() >= expected {
                p.addrs = addrs;
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                p.join_readers();
                // Drop prints the collected output.
                panic!("{shown} exited with {status} before logging `listening on`");
            }
            if Instant::now() >= deadline {
                panic!("{shown} did not log {expected} `listening on` line(s) within 10 s");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn from_child(mut child: Child, standin: Option<String>, scratch: Option<TempDir>) -> Self {
        let logs = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_log_reader(out, logs.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_log_reader(err, logs.clone()));
        }
        ProxyProcess {
            child,
            addrs: Vec::new(),
            logs,
            readers,
            standin,
            _scratch: scratch,
        }
    }

    /// Harness validation only: runs microsocks or danted instead of msocks.
    /// `--users FILE` is mapped to microsocks' single `-u/-P` user (first
    /// plaintext line); other msocks arguments are ignored.
    fn start_standin(which: &str, args: &[&str]) -> ProxyProcess {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("picking a free port for the stand-in server")
            .port();
        let scratch = TempDir::new("standin");
        let mut cmd = match which {
            "microsocks" => {
                let mut c = Command::new("microsocks");
                c.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
                if let Some(i) = args.iter().position(|a| *a == "--users") {
                    let file = args.get(i + 1).expect("--users needs a file");
                    let text = std::fs::read_to_string(file).expect("reading users file");
                    let (user, pass) = text
                        .lines()
                        .filter(|l| !l.trim_start().starts_with('#') && !l.contains("$argon2"))
                        .find_map(|l| l.split_once(':'))
                        .expect("a plaintext user in the users file");
                    c.args(["-u", user, "-P", pass]);
                }
                c
            }
            "dante" => {
                let conf = scratch.write(
                    "danted.conf",
                    format!(
                        "logoutput: stderr\n\
                         internal: 127.0.0.1 port = {port}\n\
                         external: 127.0.0.1\n\
                         clientmethod: none\n\
                         socksmethod: none\n\
                         user.privileged: root\n\
                         user.unprivileged: nobody\n\
                         client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 log: connect disconnect error }}\n\
                         socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect disconnect error }}\n"
                    ),
                );
                let mut c = Command::new("danted");
                c.arg("-f").arg(conf).args(["-N", "1"]);
                c
            }
            other => unreachable!("stand-in {other}"),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let shown = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning stand-in {shown}: {e}"));
        let mut p = Self::from_child(child, Some(which.to_string()), Some(scratch));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let up = wait_until(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        assert!(up, "stand-in {shown} not accepting on {addr}");
        p.addrs = vec![addr];
        eprintln!("NOTE: MSOCKS_TEST_STANDIN={which}: testing {shown}, not msocks");
        p
    }

    /// The first listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every listening address, in the order they were logged.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// `host:port` of the first listener, for curl's `--socks5 HOST:PORT`.
    pub fn socks_arg(&self) -> String {
        self.addr().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True when this is msocks (not a stand-in), i.e. msocks' log lines can
    /// be asserted on.
    pub fn is_msocks(&self) -> bool {
        self.standin.is_none()
    }

    /// Everything the process wrote so far (stdout and stderr, ANSI colours
    /// removed).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits up to `timeout` for a log line containing `needle`; returns
    /// whether it appeared.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle))
    }

    /// Asserts that a log line containing `needle` appears within `timeout`.
    /// Skipped (with a note) under a stand-in server.
    pub fn expect_log(&self, needle: &str, timeout: Duration) {
        if !self.is_msocks() {
            eprintln!("stand-in server: not checking for log line {needle:?}");
            return;
        }
        assert!(
            self.wait_for_log(needle, timeout),
            "proxy did not log {needle:?} within {timeout:?} (its logs follow)"
        );
    }

    /// The fields of every `session closed` line logged so far.
    pub fn session_closes(&self) -> Vec<HashMap<String, String>> {
        self.logs()
            .lines()
            .filter(|l| l.contains("session closed"))
            .map(log_fields)
            .collect()
    }

    /// Waits up to `timeout` until at least `count` `session closed` lines
    /// satisfy `pred`, asserting they do; returns all matching lines' fields.
    /// Skipped (returns empty) under a stand-in server.
    pub fn expect_session_closes(
        &self,
        count: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&HashMap<String, String>) -> bool,
    ) -> Vec<HashMap<String, String>> {
        if !self.is_msocks() {
            eprintln!("stand-in server: not checking for {count} `session closed` ({what})");
            return Vec::new();
        }
        let mut found = Vec::new();
        let ok = wait_until(timeout, || {
            found = self
                .session_closes()
                .into_iter()
                .filter(|f| pred(f))
                .collect();
            found.len() >= count
        });
        assert!(
            ok,
            "expected {count} `session closed` log line(s) with {what} within {timeout:?}, \
             found {} (the proxy logs follow)",
            found.len()
        );
        found
    }

    /// Sends SIGTERM without waiting for the exit.
    pub fn send_sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: plain kill(2) on our own child's pid, which has not been
        // reaped yet (so the pid cannot have been reused).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) of the proxy failed");
    }

    /// Sends SIGTERM and waits (up to 30 s) for the process to exit,
    /// returning its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit()
    }

    /// Waits (up to 30 s) for the process to exit, returning its exit status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.join_readers();
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    self.kill_group();
                    panic!("proxy did not exit within 30 s of SIGTERM");
                }
                Err(e) => panic!("waiting for the proxy: {e}"),
            }
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// SIGKILLs the child's process group (the child and anything it
    /// forked), then reaps the child. Only call while the child is unreaped.
    fn kill_group(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group we created for our child;
            // the child is not reaped yet, so the group id is still ours.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Once the leader has been reaped its pid (= group id) may be reused,
        // so the group is only signalled while the leader is unreaped.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group();
        }
        if thread::panicking() {
            let logs = self.logs();
            eprintln!(
                "----- proxy logs ({} bytes) -----\n{logs}\n----- end of proxy logs -----",
                logs.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP server
// ---------------------------------------------------------------------------

/// A tiny static HTTP/1.0–1.1 server on 127.0.0.1: serves the same body at
/// every path (`Connection: close`, with Content-Length), each connection on
/// its own thread. Stopped on Drop.
pub struct HttpServer {
    addr: SocketAddr,
    body: Arc<Vec<u8>>,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(body: Vec<u8>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the HTTP test server");
        let addr = listener.local_addr().expect("HTTP server local_addr");
        let body = Arc::new(body);
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (body, stop, requests) = (body.clone(), stop.clone(), requests.clone());
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (body, requests) = (body.clone(), requests.clone());
                    thread::spawn(move || {
                        let _ = serve_http(conn, &body, &requests);
                    });
                }
            })
        };
        HttpServer {
            addr,
            body,
            stop,
            requests,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// `http://HOST:PORT/PATH` for this server (`host` e.g. "127.0.0.1" or
    /// "localhost"; `path` without the leading slash).
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}/{path}", self.addr.port())
    }

    /// Number of requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn serve_http(mut conn: TcpStream, body: &[u8], requests: &AtomicUsize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 64 * 1024 {
            conn.write_all(b"HTTP/1.0 431 Request Header Fields Too Large\r\n\r\n")?;
            return Ok(());
        }
    }
    let head = String::from_utf8_lossy(&head);
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let version = parts.nth(1).unwrap_or("HTTP/1.0");
    let version = if version == "HTTP/1.1" {
        "HTTP/1.1"
    } else {
        "HTTP/1.0"
    };
    requests.fetch_add(1, Ordering::SeqCst);
    if method != "GET" && method != "HEAD" {
        conn.write_all(
            format!("{version} 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )?;
        return Ok(());
    }
    conn.write_all(
        format!(
            "{version} 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )?;
    if method == "GET" {
        conn.write_all(body)?;
    }
    conn.flush()?;
    let _ = conn.shutdown(Shutdown::Write);
    // Drain until the client closes, so the close is orderly (no RST that
    // could discard unread data on the client side).
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    Ok(())
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// UDP echo server
// ---------------------------------------------------------------------------

/// A UDP echo server on 127.0.0.1: every datagram is sent back to its
/// sender unchanged. Stopped on Drop.
pub struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start() -> UdpEcho {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("binding the UDP echo server");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("setting the UDP echo read timeout");
        let addr = sock.local_addr().expect("UDP echo local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, received) = (stop.clone(), received.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::SeqCst);
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        };
        UdpEcho {
            addr,
            stop,
            received,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Number of datagrams received (and echoed) so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// msocks passwd
// ---------------------------------------------------------------------------

/// Runs `msocks passwd USER` with `password` on stdin and returns the users
/// file line it printed (`USER:$argon2id$...`), checked for shape.
pub fn msocks_passwd(user: &str, password: &str) -> String {
    let out = run_with_input(
        Command::new(MSOCKS_BIN).args(["passwd", user]),
        Some(format!("{password}\n").as_bytes()),
        TOOL_TIMEOUT,
    );
    assert_success("msocks passwd", &out);
    let stdout = String::from_utf8(out.stdout).expect("msocks passwd printed UTF-8");
    let line = stdout
        .lines()
        .find(|l| !l.trim().is_empty())
        .expect("msocks passwd printed a line")
        .trim()
        .to_string();
    assert!(
        line.starts_with(&format!("{user}:$argon2id$")),
        "msocks passwd printed {line:?}, expected `{user}:$argon2id$...`"
    );
    assert!(
        password.len() < 8 || !line.contains(password),
        "msocks passwd output contains the plaintext password: {line:?}"
    );
    line
}
