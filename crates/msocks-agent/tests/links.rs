//! The link watcher against a real kernel: each test builds its own network
//! namespace with a veth pair (`ml0` <-> `ml1`, both ends inside it), runs a
//! current-thread tokio runtime on a thread inside the namespace, and changes
//! links and addresses with `ip -n`.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use msocks_agent::links::{self, Interface, LinkError, LinkEvent};
use msocks_testbed::Netns;
use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;

const V4: &str = "10.77.9.1";
const V6: &str = "fd77:9::1";
/// How long a test waits for an event the kernel change should cause.
const WITHIN: Duration = Duration::from_secs(1);
/// No event for this long means the watcher has reported everything.
const QUIET: Duration = Duration::from_millis(300);

fn ip(addr: &str) -> IpAddr {
    addr.parse().expect("test address")
}

/// A fresh namespace with the veth pair up and `ml0` carrying [`V4`]/24
/// and [`V6`]/64.
fn lab(tag: &str) -> Netns {
    let ns = Netns::new(tag).expect("create namespace");
    ns.ip(&["link", "add", "ml0", "type", "veth", "peer", "name", "ml1"])
        .expect("create veth pair");
    ns.link_set("ml0", true).expect("ml0 up");
    ns.link_set("ml1", true).expect("ml1 up");
    ns.addr_add("ml0", &format!("{V4}/24"))
        .expect("IPv4 address");
    ns.addr_add("ml0", &format!("{V6}/64"))
        .expect("IPv6 address");
    ns
}

/// Runs `f` on a current-thread runtime on a thread inside `ns`, so that the
/// netlink sockets `links` opens belong to that namespace.
fn in_netns<F, Fut>(ns: &Netns, f: F) -> Fut::Output
where
    F: FnOnce() -> Fut + Send,
    Fut: Future,
    Fut::Output: Send,
{
    ns.run_in(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f())
    })
    .expect("thread in the namespace")
}

async fn find(name: &str) -> Interface {
    let all = links::snapshot().await.expect("snapshot");
    all.iter()
        .find(|i| i.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {all:?}"))
}

/// Waits until `ml0` and `ml1` are operationally up with `ml0`'s addresses
/// (the kernel's link watch settles the operational state asynchronously).
async fn settled() -> Interface {
    let deadline = Instant::now() + WITHIN;
    loop {
        let ml0 = find("ml0").await;
        let ml1 = find("ml1").await;
        if ml0.up && ml1.up && ml0.addrs.contains(&ip(V4)) && ml0.addrs.contains(&ip(V6)) {
            return ml0;
        }
        assert!(
            Instant::now() < deadline,
            "veth pair did not settle: {ml0:?} {ml1:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The next event satisfying `pred` within `within`; other events are
/// skipped (and shown if it never comes).
async fn expect_event(
    rx: &mut Receiver<LinkEvent>,
    within: Duration,
    what: &str,
    mut pred: impl FnMut(&LinkEvent) -> bool,
) -> LinkEvent {
    let deadline = Instant::now() + within;
    let mut skipped = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(event)) => skipped.push(event),
            Ok(None) => panic!("watcher stopped while waiting for {what}; saw {skipped:?}"),
            Err(_) => panic!("no {what} within {within:?}; saw {skipped:?}"),
        }
    }
}

/// Every event until none arrived for [`QUIET`].
async fn drain(rx: &mut Receiver<LinkEvent>) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    loop {
        match tokio::time::timeout(QUIET, rx.recv()).await {
            Ok(Some(event)) => events.push(event),
            Ok(None) => panic!("watcher stopped; saw {events:?}"),
            Err(_) => return events,
        }
    }
}

fn changed<'a>(event: &'a LinkEvent, name: &str) -> Option<&'a Interface> {
    match event {
        LinkEvent::Changed(iface) if iface.name == name => Some(iface),
        _ => None,
    }
}

#[test]
fn snapshot_lists_lo_and_the_veth_with_addresses() {
    if !msocks_testbed::require_root("snapshot_lists_lo_and_the_veth_with_addresses") {
        return;
    }
    let ns = lab("links-snap");
    in_netns(&ns, || async {
        let ml0 = settled().await;
        let all = links::snapshot().await.expect("snapshot");
        assert_eq!(all.len(), 3, "lo and the veth pair only: {all:?}");
        assert!(
            all.windows(2).all(|w| w[0].index < w[1].index),
            "sorted by index"
        );

        let lo = all.iter().find(|i| i.name == "lo").expect("lo");
        assert!(lo.up, "{lo:?}");
        assert!(lo.addrs.contains(&ip("127.0.0.1")), "{lo:?}");
        assert!(lo.addrs.contains(&ip("::1")), "{lo:?}");
        assert!(!lo.usable(), "loopback is no way out: {lo:?}");

        assert!(ml0.usable(), "{ml0:?}");
        assert_eq!(ml0.preferred_addr(), Some(ip(V4)));
        assert_eq!(ml0.addrs.first(), Some(&ip(V4)), "IPv4 first: {ml0:?}");

        let ml1 = all.iter().find(|i| i.name == "ml1").expect("ml1");
        assert!(ml1.up);
        assert_ne!(ml1.index, ml0.index);
        assert!(!ml1.usable(), "at most a link-local address: {ml1:?}");
    });
}

#[test]
fn down_and_up_are_reported_with_the_full_state() {
    if !msocks_testbed::require_root("down_and_up_are_reported_with_the_full_state") {
        return;
    }
    let ns = lab("links-updown");
    in_netns(&ns, || async {
        let before = settled().await;
        let mut rx = links::watch().await.expect("watch");

        ns.link_set("ml0", false).expect("ml0 down");
        let down = expect_event(&mut rx, WITHIN, "Changed(ml0 down)", |e| {
            changed(e, "ml0").is_some_and(|i| !i.up)
        })
        .await;
        let LinkEvent::Changed(down) = down else {
            unreachable!()
        };
        assert_eq!(down.index, before.index);
        // A full state, not a delta: the IPv4 address stays on a down link,
        // the IPv6 ones go (keep_addr_on_down=0).
        assert!(down.addrs.contains(&ip(V4)), "{down:?}");
        assert!(!down.addrs.iter().any(IpAddr::is_ipv6), "{down:?}");
        assert!(!down.usable());
        // Setting a link down deletes the routes through it.
        expect_event(&mut rx, WITHIN, "RoutesChanged", |e| {
            *e == LinkEvent::RoutesChanged
        })
        .await;
        drain(&mut rx).await;

        ns.link_set("ml0", true).expect("ml0 up");
        ns.addr_add("ml0", &format!("{V6}/64"))
            .expect("IPv6 address back");
        let up = expect_event(
            &mut rx,
            WITHIN,
            "Changed(ml0 up with both addresses)",
            |e| {
                changed(e, "ml0")
                    .is_some_and(|i| i.up && i.addrs.contains(&ip(V4)) && i.addrs.contains(&ip(V6)))
            },
        )
        .await;
        let LinkEvent::Changed(up) = up else {
            unreachable!()
        };
        assert!(up.usable());
        assert_eq!(up.preferred_addr(), Some(ip(V4)));

        // Nothing contradicts it afterwards, and it is what the kernel says.
        let rest = drain(&mut rx).await;
        let last = rest
            .iter()
            .filter_map(|e| changed(e, "ml0"))
            .next_back()
            .unwrap_or(&up);
        assert_eq!(*last, find("ml0").await);
    });
}

#[test]
fn address_removal_is_reported() {
    if !msocks_testbed::require_root("address_removal_is_reported") {
        return;
    }
    let ns = lab("links-addrdel");
    in_netns(&ns, || async {
        settled().await;
        let mut rx = links::watch().await.expect("watch");
        ns.ip(&["address", "del", &format!("{V4}/24"), "dev", "ml0"])
            .expect("delete IPv4 address");
        let event = expect_event(
            &mut rx,
            WITHIN,
            "Changed(ml0) without the IPv4 address",
            |e| changed(e, "ml0").is_some_and(|i| !i.addrs.contains(&ip(V4))),
        )
        .await;
        let LinkEvent::Changed(ml0) = event else {
            unreachable!()
        };
        assert!(ml0.up);
        assert_eq!(ml0.preferred_addr(), Some(ip(V6)), "{ml0:?}");
        assert!(ml0.usable());
    });
}

#[test]
fn deleting_the_veth_reports_removed() {
    if !msocks_testbed::require_root("deleting_the_veth_reports_removed") {
        return;
    }
    let ns = lab("links-del");
    in_netns(&ns, || async {
        let ml0 = settled().await;
        let ml1 = find("ml1").await;
        let mut rx = links::watch().await.expect("watch");
        ns.ip(&["link", "del", "ml0"]).expect("delete veth");
        let mut expected: Vec<LinkEvent> = [&ml0, &ml1]
            .iter()
            .map(|iface| LinkEvent::Removed {
                name: iface.name.clone(),
                index: iface.index,
            })
            .collect();
        while !expected.is_empty() {
            let event = expect_event(&mut rx, WITHIN, &format!("{expected:?}"), |e| {
                expected.contains(e)
            })
            .await;
            expected.retain(|e| *e != event);
        }
        let rest = drain(&mut rx).await;
        assert!(
            !rest
                .iter()
                .any(|e| matches!(e, LinkEvent::Changed(i) if i.name.starts_with("ml"))),
            "no state for a removed interface: {rest:?}"
        );
    });
}

#[test]
fn a_burst_ends_with_the_final_state() {
    if !msocks_testbed::require_root("a_burst_ends_with_the_final_state") {
        return;
    }
    let ns = lab("links-burst");
    // One `ip -batch` run, so the changes reach the kernel within a few
    // milliseconds of each other.
    let commands = [
        "link set ml0 down",
        "link set ml0 up",
        // Another subnet: a secondary address of 10.77.9.0/24 would go
        // with the primary 10.77.9.1 (promote_secondaries is off).
        "address add 10.78.9.2/24 dev ml0",
        "address del 10.77.9.1/24 dev ml0",
        "link set ml0 down",
        "link set ml0 up",
        "address add 10.77.9.3/24 dev ml0",
        "address add fd77:9::3/64 dev ml0 nodad",
        "address del 10.78.9.2/24 dev ml0",
        "address add fd77:9::4/64 dev ml0 nodad",
        "address del fd77:9::4/64 dev ml0",
    ];
    let batch = std::env::temp_dir().join(format!("{}.batch", ns.name()));
    std::fs::write(&batch, commands.join("\n") + "\n").expect("write batch file");
    let batch_path = batch.to_str().expect("UTF-8 temp path").to_owned();
    in_netns(&ns, || async {
        settled().await;
        let mut rx = links::watch().await.expect("watch");
        let result = ns.ip(&["-batch", &batch_path]);
        let _ = std::fs::remove_file(&batch);
        result.expect("ip -batch");

        let events = drain(&mut rx).await;
        let states: Vec<&Interface> = events.iter().filter_map(|e| changed(e, "ml0")).collect();
        let now = find("ml0").await;
        assert!(now.up, "{now:?}");
        for (addr, present) in [
            ("10.77.9.1", false),
            ("10.78.9.2", false),
            ("10.77.9.3", true),
            ("fd77:9::3", true),
            ("fd77:9::4", false),
        ] {
            assert_eq!(now.addrs.contains(&ip(addr)), present, "{addr} in {now:?}");
        }
        assert_eq!(
            states.last().copied(),
            Some(&now),
            "final state; events: {events:?}"
        );
        assert!(
            states.len() < commands.len(),
            "the burst was coalesced: {events:?}"
        );
        assert!(events.contains(&LinkEvent::RoutesChanged), "{events:?}");
    });
}

#[test]
fn more_changes_than_the_socket_buffer_holds_end_with_the_final_state() {
    if !msocks_testbed::require_root(
        "more_changes_than_the_socket_buffer_holds_end_with_the_final_state",
    ) {
        return;
    }
    let ns = lab("links-overrun");
    // Thousands of address and route messages while the test's runtime is
    // blocked in `ip` and the watcher cannot read: more than the event
    // socket's buffer holds, so the kernel drops some and the watcher has to
    // re-read everything.
    const COUNT: usize = 2000;
    let mut commands = String::new();
    for i in 0..COUNT {
        commands += &format!("address add 10.80.{}.{}/32 dev ml0\n", i / 250, i % 250 + 1);
    }
    let batch = std::env::temp_dir().join(format!("{}.batch", ns.name()));
    std::fs::write(&batch, commands).expect("write batch file");
    let batch_path = batch.to_str().expect("UTF-8 temp path").to_owned();
    in_netns(&ns, || async {
        settled().await;
        let mut rx = links::watch().await.expect("watch");
        let result = ns.ip(&["-batch", &batch_path]);
        let _ = std::fs::remove_file(&batch);
        result.expect("ip -batch");

        let events = drain(&mut rx).await;
        let now = find("ml0").await;
        assert_eq!(now.addrs.iter().filter(|a| a.is_ipv4()).count(), COUNT + 1);
        let last = events.iter().filter_map(|e| changed(e, "ml0")).next_back();
        assert_eq!(last, Some(&now), "final state");
        assert!(events.contains(&LinkEvent::RoutesChanged));
    });
}

#[test]
fn dropping_the_receiver_ends_the_watcher() {
    if !msocks_testbed::require_root("dropping_the_receiver_ends_the_watcher") {
        return;
    }
    let ns = lab("links-drop");
    in_netns(&ns, || async {
        settled().await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let alive = || metrics.num_alive_tasks();
        // snapshot() leaves nothing behind (settled() called it too, and
        // its aborted connection task may not have been reaped yet).
        wait_for_no_tasks(&alive).await;
        links::snapshot().await.expect("snapshot");
        wait_for_no_tasks(&alive).await;

        // Idle: nothing but the dropped receiver wakes the watcher.
        let rx = links::watch().await.expect("watch");
        assert!(alive() >= 3, "watcher and its two netlink connections");
        drop(rx);
        wait_for_no_tasks(&alive).await;

        // Busy: the receiver goes while events are pending and unread.
        let rx = links::watch().await.expect("watch");
        ns.link_set("ml0", false).expect("ml0 down");
        tokio::time::sleep(Duration::from_millis(100)).await;
        ns.link_set("ml0", true).expect("ml0 up");
        drop(rx);
        wait_for_no_tasks(&alive).await;
    });
}

async fn wait_for_no_tasks(alive: &impl Fn() -> usize) {
    let deadline = Instant::now() + WITHIN;
    while alive() != 0 {
        assert!(Instant::now() < deadline, "{} tasks still alive", alive());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn outside_a_tokio_runtime_is_an_error() {
    assert!(matches!(
        futures::executor::block_on(links::snapshot()),
        Err(LinkError::NoRuntime)
    ));
    assert!(matches!(
        futures::executor::block_on(links::watch()),
        Err(LinkError::NoRuntime)
    ));
}
