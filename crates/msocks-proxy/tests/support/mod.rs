//! Shared by the kernel-engine tests: the proxy's log captured in memory (its lines say
//! which engine each session used), and an in-process proxy running inside a testbed
//! namespace until stopped.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;

use msocks_proxy::config::{EngineConfig, EngineKind};
use msocks_proxy::{Proxy, ProxyConfig};
use msocks_testbed::Netns;

/// A proxy's configuration with the kernel engine, listening on `listen` only, defaults
/// otherwise.
#[allow(dead_code)] // not every test file that includes this module starts such a proxy
pub fn kernel_config(listen: SocketAddr) -> ProxyConfig {
    ProxyConfig {
        listen: vec![listen],
        engine: EngineConfig {
            kind: EngineKind::Kernel,
            ..EngineConfig::default()
        },
        ..ProxyConfig::default()
    }
}

/// The process's `tracing` output, kept in memory.
#[derive(Clone)]
#[allow(dead_code)] // not every test file that includes this module reads the log
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[allow(dead_code)] // as above
impl LogBuffer {
    /// Installs the global subscriber (info level, no colours) writing into a new buffer.
    /// Once per test binary.
    pub fn capture() -> LogBuffer {
        use tracing_subscriber::util::SubscriberInitExt as _;
        let logs = LogBuffer(Arc::new(Mutex::new(Vec::new())));
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || writer.clone())
            .finish()
            .try_init()
            .expect("no other global subscriber in this test binary");
        logs
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// `msocks_proxy::Proxy` on its own two-worker runtime, on a thread inside a namespace.
pub struct ProxyInNamespace {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl ProxyInNamespace {
    /// Starts the proxy in `ns` and returns once it is bound.
    pub fn start(ns: &Netns, config: ProxyConfig) -> ProxyInNamespace {
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = mpsc::channel::<()>();
        let thread = ns
            .run_in(move || {
                thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async move {
                        let proxy = Proxy::bind(config, None).await.expect("proxy bind");
                        let _ = bound_tx.send(());
                        proxy
                            .run(async move {
                                let _ = stop_rx.await;
                            })
                            .await;
                    });
                })
            })
            .expect("setns");
        bound_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy started");
        ProxyInNamespace { stop, thread }
    }

    /// Stops the proxy and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("proxy thread");
    }
}

/// A plain SOCKS5 CONNECT without authentication through the proxy at `proxy` to the IPv4
/// `target`, waiting for each answer; panics on anything unexpected. The stream's reads time
/// out after `timeout`.
#[allow(dead_code)] // not every test file that includes this module opens sessions this way
pub fn socks5_connect(proxy: SocketAddr, target: SocketAddr, timeout: Duration) -> TcpStream {
    let s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(timeout)).ok();
    (&s).write_all(&[5, 1, 0]).expect("greeting");
    let mut sel = [0u8; 2];
    (&s).read_exact(&mut sel).expect("selection");
    assert_eq!(sel, [5, 0]);
    let IpAddr::V4(ip) = target.ip() else {
        unreachable!("IPv4 target")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&ip.octets());
    req.extend_from_slice(&target.port().to_be_bytes());
    (&s).write_all(&req).expect("request");
    let mut rep = [0u8; 10];
    (&s).read_exact(&mut rep).expect("reply");
    assert_eq!(&rep[..2], &[5, 0], "CONNECT succeeded");
    s
}
