//! `msocks demo` as a user runs it: it must build its testbed, move the stream softly and
//! hard, end with matching hashes and exit 0, and leave none of its namespaces behind.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn demo_passes_and_cleans_up() {
    if !msocks_testbed::require_root("demo_passes_and_cleans_up") {
        return;
    }
    let mut child = Command::new(support::MSOCKS_BIN)
        .args([
            "demo",
            "--bytes",
            "6MiB",
            "--moves",
            "12",
            "--hard-every",
            "3",
        ])
        .args(["--rate", "4MiB", "--interval", "60ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start msocks demo");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("msocks demo did not finish within 240 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(
        status.success(),
        "demo failed: {status}\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    assert!(
        stdout.contains("server saw 1 TCP connection(s)"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("MATCH").count(), 2, "{stdout}");
    assert!(
        stdout.contains(" hard)") && !stdout.contains("(0 soft") && !stdout.contains(", 0 hard)"),
        "{stdout}"
    );
    // Namespace names carry the creating process's pid: none of the demo's may remain.
    let listing = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let tag = format!("-{pid}-");
    assert!(
        !listing.contains(&tag),
        "the demo left namespaces behind:\n{listing}"
    );
}
