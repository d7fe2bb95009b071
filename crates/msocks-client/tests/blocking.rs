//! The blocking wrapper: `Read + Write` from a plain thread, on the background runtime and on
//! a borrowed one, including a migration in the middle.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::thread;

use msocks_client::{blocking, Error, ProxyPath};
use support::*;

/// Runs a fake proxy script on its own runtime in its own thread, and hands its address to
/// the caller first.
fn fake_proxy_thread<F, Fut>(script: F) -> (SocketAddr, thread::JoinHandle<()>)
where
    F: FnOnce(FakeProxy) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let proxy = FakeProxy::start().await;
            tx.send(proxy.addr).expect("send addr");
            script(proxy).await;
        });
    });
    let addr = rx.recv().expect("fake proxy address");
    (addr, handle)
}

/// Opens, exchanges data, migrates, exchanges more, and closes.
fn exercise(connect: impl FnOnce(ProxyPath) -> Result<blocking::MobileStream, Error>) {
    let (addr, fake) = fake_proxy_thread(|proxy| async move {
        let id = id_any_home(90, proxy.addr.port());
        let mut old = proxy.accept().await;
        old.accept_no_auth().await;
        old.request().await;
        old.send(&FakeConn::open_reply(
            id,
            "127.0.0.1:8080".parse().expect("addr"),
        ))
        .await;
        old.send(b"hello, mobile").await;
        assert_eq!(old.read_data(5).await, b"hi 1\n");

        let mut new = proxy.accept().await;
        let rc = expect_reconnect(&mut new).await;
        assert_eq!((rc.data_read, rc.data_written), (13, 5));
        new.send(&FakeConn::reconnect_reply(0, 0)).await;
        new.send(b"moved").await;
        assert_eq!(new.read_to_end().await, b"hi 2\n");
        new.finish().await;
    });

    let mut stream = connect(ProxyPath::new(addr)).expect("connect");
    let mut buf = [0u8; 13];
    stream.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hello, mobile");
    stream.write_all(b"hi 1\n").expect("write");
    // Wait until the bytes are in the socket, so the RECONNECT counters are the ones the
    // fake expects.
    while stream.status().data_written != 5 {
        thread::sleep(std::time::Duration::from_millis(2));
    }
    let report = stream.migrate(ProxyPath::new(addr)).expect("migrate");
    assert_eq!(report.new_path, ProxyPath::new(addr));
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"moved");
    stream.write_all(b"hi 2\n").expect("write");
    stream.shutdown_write().expect("shutdown");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("read to end");
    assert!(rest.is_empty());
    fake.join().expect("fake proxy");
}

#[test]
fn blocking_stream_on_the_background_runtime() {
    exercise(|path| {
        blocking::MobileStream::connect(
            "127.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
            config(path),
        )
    });
}

#[test]
fn blocking_stream_on_a_borrowed_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let handle = rt.handle().clone();
    exercise(move |path| {
        blocking::MobileStream::connect_with(
            handle,
            "127.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
            config(path),
        )
    });
}

#[test]
fn blocking_calls_inside_a_runtime_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        blocking::MobileStream::connect(
            "127.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
            config(ProxyPath::new("127.0.0.1:1".parse().expect("addr"))),
        )
    });
    assert!(
        matches!(result, Err(Error::BlockingInRuntime)),
        "{result:?}"
    );
    // A current-thread runtime cannot run the stream's task between blocking calls.
    let result = blocking::MobileStream::connect_with(
        rt.handle().clone(),
        "127.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
        config(ProxyPath::new("127.0.0.1:1".parse().expect("addr"))),
    );
    assert!(matches!(result, Err(Error::Config(_))), "{result:?}");
}
