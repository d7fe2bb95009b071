//! A scripted fake MSOCKS proxy for the library's tests: each test drives it step by step
//! (accept, read the handshake, reply with chosen counters, send and receive stream bytes)
//! and checks what the library sent. It speaks just enough of docs/PROTOCOL.md to do that.
#![allow(dead_code)]

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use msocks_client::{MobileConfig, MobileStream, ProxyPath, StreamStatus};
use msocks_proto::{
    ConnectionId, Decoded, Greeting, Method, MethodSelection, Reply, ReplyCode, ReplyExtension,
    Request, ResumeCounters, SessionToken, TargetAddr, UserPassReply, UserPassRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bound for any single step of a test, so that a bug hangs nothing for long.
pub const STEP: Duration = Duration::from_secs(10);

/// Runs `fut`, failing the test if it takes longer than [`STEP`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Test data: a byte for every stream offset, so that a gap or a duplicate of any length
/// shows up as a mismatch.
pub fn pattern(seed: u8, start: u64, len: usize) -> Vec<u8> {
    (start..start + len as u64)
        .map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57) as u8) ^ seed ^ (i as u8))
        .collect()
}

/// A recognisable token.
pub fn token(tag: u8) -> SessionToken {
    let mut t = [0u8; 16];
    for (i, b) in t.iter_mut().enumerate() {
        *b = tag.wrapping_mul(31).wrapping_add(i as u8);
    }
    SessionToken(t)
}

/// An identifier whose home is "any proxy address you use, at `port`".
pub fn id_any_home(tag: u8, port: u16) -> ConnectionId {
    ConnectionId {
        token: token(tag),
        home: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
    }
}

/// A fake proxy listening on a loopback address.
pub struct FakeProxy {
    listener: TcpListener,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl FakeProxy {
    /// Listens on 127.0.0.1 at a free port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake proxy");
        let addr = listener.local_addr().expect("local_addr");
        FakeProxy { listener, addr }
    }

    /// The path straight to this proxy.
    pub fn path(&self) -> ProxyPath {
        ProxyPath::new(self.addr)
    }

    /// Accepts the next connection from the library.
    pub async fn accept(&self) -> FakeConn {
        let (stream, peer) = within("fake proxy accept", self.listener.accept())
            .await
            .expect("accept");
        FakeConn {
            stream,
            peer,
            received: Vec::new(),
            buf: Vec::new(),
        }
    }
}

/// One connection from the library, seen from the proxy.
pub struct FakeConn {
    /// The socket.
    pub stream: TcpStream,
    /// The library's address on this connection.
    pub peer: SocketAddr,
    /// Every handshake byte decoded so far, in order.
    pub received: Vec<u8>,
    /// Bytes read but not decoded yet (the start of stream data after the handshake).
    buf: Vec<u8>,
}

impl FakeConn {
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = within("fake proxy read", self.stream.read(&mut chunk))
            .await
            .expect("fake proxy read");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one message with `decode`, recording its bytes in `received`.
    pub async fn decode<T>(&mut self, decode: impl Fn(&[u8]) -> Decoded<T>) -> T {
        loop {
            if let Some((msg, used)) = decode(&self.buf).expect("library sent a malformed message")
            {
                self.received.extend(self.buf.drain(..used));
                return msg;
            }
            assert!(self.fill().await > 0, "library closed mid-handshake");
        }
    }

    /// Expects a greeting offering exactly NO AUTHENTICATION, and selects it.
    pub async fn accept_no_auth(&mut self) {
        let greeting = self.decode(Greeting::decode).await;
        assert_eq!(greeting.methods, vec![Method::NO_AUTH]);
        self.send(&[0x05, 0x00]).await;
    }

    /// Expects a greeting offering exactly USERNAME/PASSWORD and these credentials.
    pub async fn accept_user_pass(&mut self, user: &str, pass: &str) {
        let greeting = self.decode(Greeting::decode).await;
        assert_eq!(greeting.methods, vec![Method::USER_PASS]);
        let mut sel = Vec::new();
        MethodSelection {
            method: Method::USER_PASS,
        }
        .encode(&mut sel);
        self.send(&sel).await;
        let creds = self.decode(UserPassRequest::decode).await;
        assert_eq!(
            (creds.username.as_str(), creds.password.as_str()),
            (user, pass)
        );
        let mut ok = Vec::new();
        UserPassReply::SUCCESS.encode(&mut ok);
        self.send(&ok).await;
    }

    /// Reads the request after authentication.
    pub async fn request(&mut self) -> Request {
        self.decode(Request::decode).await
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        within("fake proxy write", self.stream.write_all(bytes))
            .await
            .expect("fake proxy write");
    }

    /// The bytes of a successful reply carrying `id`.
    pub fn open_reply(id: ConnectionId, bound: SocketAddr) -> Vec<u8> {
        let mut out = Vec::new();
        Reply {
            code: ReplyCode::Succeeded,
            bound: TargetAddr::Ip(bound),
            extension: ReplyExtension::Connection(id),
        }
        .encode(&mut out);
        out
    }

    /// The bytes of a successful RECONNECT reply.
    pub fn reconnect_reply(data_write: u64, data_salvage: u64) -> Vec<u8> {
        let mut out = Vec::new();
        Reply {
            code: ReplyCode::Succeeded,
            bound: TargetAddr::Ip("127.0.0.1:50344".parse().expect("addr")),
            extension: ReplyExtension::Resume(ResumeCounters {
                data_write,
                data_salvage,
            }),
        }
        .encode(&mut out);
        out
    }

    /// Sends a failure reply (`05 REP 00 01 00 00 00 00 00 00`); the proxy closes after it.
    pub async fn fail(&mut self, code: u8) {
        let mut out = Vec::new();
        Reply::failure(ReplyCode::from_u8(code)).encode(&mut out);
        assert_eq!(out.len(), 10);
        self.send(&out).await;
    }

    /// Reads exactly `n` stream bytes.
    pub async fn read_data(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(
                self.fill().await > 0,
                "library closed early: wanted {n} bytes, have {}",
                self.buf.len()
            );
        }
        self.buf.drain(..n).collect()
    }

    /// Reads stream bytes until the library's FIN.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await > 0 {}
        std::mem::take(&mut self.buf)
    }

    /// Reads the stream bytes that are in the receive buffer right now, and no more: what a
    /// proxy takes out of an old connection whose bytes its TCP acknowledged. Peeking first
    /// fixes the amount without opening the receive window, which would let the library's
    /// kernel send more while the buffer is being emptied.
    pub async fn drain_queued(&mut self) -> Vec<u8> {
        let mut peek = vec![0u8; 8 * 1024 * 1024];
        let queued = match tokio::time::timeout(
            Duration::from_millis(50),
            self.stream.peek(&mut peek),
        )
        .await
        {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("peek: {e}"),
            Err(_) => 0,
        };
        let already = self.buf.len();
        self.read_data(already + queued).await
    }

    /// Ends the proxy-to-library direction (FIN).
    pub async fn finish(&mut self) {
        self.stream.shutdown().await.expect("shutdown");
    }

    /// Closes the connection with RST.
    pub fn reset(self) {
        let sock = socket2::SockRef::from(&self.stream);
        sock.set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
        drop(self);
    }
}

/// Opens a session: the library connects to `proxy` with `cfg` while the fake accepts it,
/// answers the handshake and replies with `id`. Returns the stream and the fake's side.
pub async fn open(
    proxy: &FakeProxy,
    cfg: MobileConfig,
    id: ConnectionId,
) -> (MobileStream, FakeConn) {
    let target: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
    let (stream, conn) = tokio::join!(
        within("connect", MobileStream::connect(target, cfg)),
        async {
            let mut conn = proxy.accept().await;
            conn.accept_no_auth().await;
            let req = conn.request().await;
            assert!(
                matches!(req, Request::Open(_)),
                "expected an open request: {req:?}"
            );
            conn.send(&FakeConn::open_reply(
                id,
                "127.0.0.1:50344".parse().expect("addr"),
            ))
            .await;
            conn
        }
    );
    (stream.expect("connect"), conn)
}

/// Expects the greeting and RECONNECT on a new connection and returns its fields.
pub async fn expect_reconnect(conn: &mut FakeConn) -> msocks_proto::ReconnectRequest {
    conn.accept_no_auth().await;
    match conn.request().await {
        Request::Reconnect(r) => r,
        other => panic!("expected RECONNECT, got {other:?}"),
    }
}

/// Waits until the stream's status satisfies `cond`.
pub async fn wait_status(
    control: &msocks_client::MobileControl,
    what: &str,
    cond: impl Fn(&StreamStatus) -> bool,
) -> StreamStatus {
    within(what, async {
        loop {
            let s = control.status();
            if cond(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// A configuration for tests: one path, fast backoff, short limits, and the plain RECONNECT
/// of PROTOCOL.md 3.5–3.7 (the scripted proxy checks its exact bytes and counters; early
/// resend is tested against the real proxy, on loopback and on the testbed).
pub fn config(path: ProxyPath) -> MobileConfig {
    let mut cfg = MobileConfig::new(path);
    cfg.early_resend = false;
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    cfg.reconnect_deadline = Duration::from_secs(5);
    cfg.handshake_timeout = Duration::from_secs(5);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg
}
