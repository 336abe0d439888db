//! One test (or more) per defect of the second audit, named after it; each
//! failed before its fix.

mod support;

use std::time::Duration;

use keyhole::{Error, Limits, Proxy, Route, Secret};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// An upstream that answers each connection's first request, then reports
/// (on the channel) whether keyhole closed that connection within `wait`,
/// after the upstream itself `closes` its side or not.
async fn watching_upstream(closes: bool, wait: Duration) -> (Upstream, mpsc::Receiver<bool>) {
    let (tx, rx) = mpsc::channel(8);
    let upstream = Upstream::start_raw(move |mut conn| {
        let tx = tx.clone();
        async move {
            if conn.read_request().await.is_none() {
                return;
            }
            conn.send(ok("pooled")).await.unwrap();
            if closes {
                // close_notify and FIN: the connection is dead for keyhole.
                let _ = conn.stream.shutdown().await;
            }
            let mut byte = [0u8; 1];
            let eof = matches!(
                timeout(wait, conn.stream.read(&mut byte)).await,
                Ok(Ok(0) | Err(_))
            );
            let _ = tx.send(eof).await;
        }
    })
    .await;
    (upstream, rx)
}

#[tokio::test]
async fn defect1_pool_reaped_when_upstream_closes_idle_connection() {
    let (upstream, mut closed) = watching_upstream(true, Duration::from_secs(3)).await;
    let proxy = keyhole(&upstream, |b| b).await;
    let res = request(proxy.local_addr(), &get("/")).await.unwrap();
    assert_eq!(res.text(), "pooled");
    // No further request: keyhole must notice the close by itself.
    assert_eq!(
        closed.recv().await,
        Some(true),
        "keyhole kept the closed connection open"
    );
}

#[tokio::test]
async fn defect1_pool_reaped_after_its_idle_time() {
    let (upstream, mut closed) = watching_upstream(false, Duration::from_secs(3)).await;
    let limits = Limits {
        pool_idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let proxy = keyhole(&upstream, |b| b.limits(limits)).await;
    let started = tokio::time::Instant::now();
    let res = request(proxy.local_addr(), &get("/")).await.unwrap();
    assert_eq!(res.text(), "pooled");
    assert_eq!(
        closed.recv().await,
        Some(true),
        "idle connection outlived the pool's idle time"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before its idle time"
    );
}

#[tokio::test]
async fn defect2_zero_pool_size_does_not_panic() {
    let upstream = Upstream::start(|_| ok("fine")).await;
    let limits = Limits {
        pool_max_idle: 0,
        ..Limits::default()
    };
    let proxy = keyhole(&upstream, |b| b.limits(limits)).await;
    for _ in 0..3 {
        let res = request(proxy.local_addr(), &get("/")).await.unwrap();
        assert_eq!(res.text(), "fine");
    }
    // Nothing is pooled: each request opened its own connection.
    assert_eq!(upstream.connections(), 3);
}

/// A change that puts one `Limits` field out of range.
type Change = fn(&mut Limits);

#[tokio::test]
async fn defect2_out_of_range_limits_are_refused_naming_the_field() {
    let upstream = Upstream::start(|_| ok("x")).await;
    let cases: [(&str, Change); 6] = [
        ("max_head_bytes", |l| l.max_head_bytes = usize::MAX),
        ("max_head_bytes", |l| l.max_head_bytes = 0),
        ("max_headers", |l| l.max_headers = 0),
        ("max_headers", |l| l.max_headers = 10_000),
        ("max_connections", |l| l.max_connections = 0),
        ("idle_timeout", |l| l.idle_timeout = Duration::MAX),
    ];
    for (field, change) in cases {
        let mut limits = Limits::default();
        change(&mut limits);
        let err = builder_for(&upstream)
            .route(route_to(&upstream, "/", ""))
            .limits(limits)
            .start()
            .await
            .unwrap_err();
        assert!(matches!(err, Error::BadLimit(f, _) if f == field), "{err}");
        assert!(err.to_string().contains(field), "{err}");
    }
}

#[tokio::test]
async fn defect5_early_answer_is_not_destroyed_by_a_reset() {
    // The upstream answers as soon as it has the head, never reading the body.
    let answer = pattern(1024 * 1024);
    let upstream = Upstream::start_raw(|mut conn| async move {
        if conn.read_head().await.is_some() {
            let len = 1024 * 1024;
            let _ = conn
                .send(Reply::Generated {
                    len,
                    chunked: false,
                })
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let proxy = keyhole(&upstream, |b| b).await;
    // A small receive buffer, so the answer is still in keyhole's send
    // buffer when it closes: a reset would discard it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(proxy.local_addr()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let total = 16 * 1024 * 1024;
    let head =
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {total}\r\n\r\n");
    // The client keeps sending its body while the answer comes back, so
    // keyhole has unread bytes when it is done with the answer.
    let sending = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![b'a'; 64 * 1024];
        for _ in 0..total / piece.len() {
            if writer.write_all(&piece).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    let read = timeout(Duration::from_secs(10), reader.read_to_end(&mut got)).await;
    sending.abort();
    assert!(
        matches!(read, Ok(Ok(_))),
        "the early answer was cut by a reset: {read:?}"
    );
    let body_at = find(&got, b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 200 "));
    assert_eq!(
        got.len() - body_at,
        answer.len(),
        "the early answer was truncated"
    );
    assert!(got[body_at..] == answer[..]);
}

#[tokio::test]
async fn defect6_connections_over_the_limit_are_answered_or_closed() {
    let upstream = Upstream::start(|_| ok("served")).await;
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let proxy = keyhole(&upstream, |b| b.limits(limits)).await;
    let mut held = Client::connect(proxy.local_addr()).await;
    held.send(&get("/")).await;
    assert_eq!(held.response(false).await.unwrap().text(), "served");
    let mut flood = Vec::new();
    for _ in 0..300 {
        flood.push(
            tokio::net::TcpStream::connect(proxy.local_addr())
                .await
                .unwrap(),
        );
    }
    for mut stream in flood {
        let mut answer = Vec::new();
        let read = timeout(Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "a connection over the limit was left hanging");
        assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 503 "));
    }
    // The connection that holds the permit still works.
    held.send(&get("/")).await;
    assert_eq!(held.response(false).await.unwrap().text(), "served");
}

#[tokio::test]
async fn defect8_every_client_credential_must_carry_the_key() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let proxy = keyhole(&upstream, |b| b.client_key(Secret::new("sandbox-key"))).await;
    let cases = [
        ("x-api-key: sandbox-key\r\n", 200),
        ("x-api-key: sandbox-key\r\nx-api-key: sandbox-key\r\n", 200),
        (
            "x-api-key: sandbox-key\r\nauthorization: Bearer sandbox-key\r\n",
            200,
        ),
        (
            "x-api-key: sandbox-key\r\nauthorization: Bearer other\r\n",
            401,
        ),
        (
            "authorization: Bearer other\r\nx-api-key: sandbox-key\r\n",
            401,
        ),
        ("x-api-key: sandbox-key\r\nx-api-key: other\r\n", 401),
        (
            "x-api-key: sandbox-key\r\nauthorization: Basic c2FuZGJveA==\r\n",
            401,
        ),
        ("", 401),
    ];
    for (fields, status) in cases {
        let bytes = format!("GET / HTTP/1.1\r\nHost: localhost\r\n{fields}\r\n");
        let res = request(proxy.local_addr(), bytes.as_bytes()).await.unwrap();
        assert_eq!(res.status, status, "{fields:?}");
    }
    assert_eq!(
        upstream.received().len(),
        3,
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn defect10_empty_or_twice_injected_headers_stop_the_start() {
    let upstream = Upstream::start(|_| ok("x")).await;
    let start = |route: Route| builder_for(&upstream).route(route).start();
    let empty = route_to(&upstream, "/a", "").header("x-extra", Secret::new(""));
    let err = start(empty).await.unwrap_err();
    assert!(
        matches!(err, Error::EmptyValue(ref n) if n == "x-extra"),
        "{err}"
    );
    let twice = route_to(&upstream, "/b", "").header("X-API-KEY", Secret::new("again"));
    let err = start(twice).await.unwrap_err();
    assert!(matches!(err, Error::DuplicateHeader(..)), "{err}");
    assert!(err.to_string().contains("x-api-key") && !err.to_string().contains("again"));
    let err = builder_for(&upstream)
        .route(route_to(&upstream, "/", ""))
        .client_key(Secret::new(""))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::EmptyValue(_)), "{err}");
}

#[tokio::test]
async fn defect10_library_errors_read_as_library_errors() {
    let err = Proxy::builder().start().await.unwrap_err();
    assert!(!err.to_string().contains("--route"), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let upstream = Upstream::start(|_| ok("x")).await;
    let err = builder_for(&upstream)
        .route(route_to(&upstream, "/", ""))
        .listen(addr)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    let err = Proxy::builder()
        .route(route_to(&upstream, "/", ""))
        .ca_pem("not a certificate")
        .start()
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("file"), "{err}");
}

#[tokio::test]
async fn defect10_configuration_is_clone_for_many_proxies() {
    let upstream = Upstream::start(|_| ok("twin")).await;
    let route = route_to(&upstream, "/", "");
    let builder = builder_for(&upstream)
        .route(route.clone())
        .limits(Limits::default().clone());
    let (a, b) = (
        builder.clone().start().await.unwrap(),
        builder.start().await.unwrap(),
    );
    assert_ne!(a.local_addr(), b.local_addr());
    for proxy in [&a, &b] {
        assert_eq!(
            request(proxy.local_addr(), &get("/")).await.unwrap().text(),
            "twin"
        );
    }
}

/// keyhole's resident memory in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Memory per exchange in flight: with `EXCHANGES` downloads stalled on
/// clients that do not read (so that every relay buffer is full), keyhole's
/// memory grows by under 36 KiB per exchange (27 KiB measured with 16 KiB
/// buffers; 47 KiB with the 64 KiB buffers it had before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defect9_memory_per_exchange_in_flight_stays_small() {
    const EXCHANGES: usize = 300;
    const BODY: usize = 1 << 20;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_port = upstream.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = upstream.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n");
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.write_all(&vec![b'x'; BODY]).await;
            });
        }
    });
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keyhole"))
        .args(["--listen", "127.0.0.1:0", "--route"])
        .arg(format!("/=http://127.0.0.1:{upstream_port}"))
        .args(["--header", "x-api-key=k", "--log-level", "warn"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap()
        .to_owned();
    // Warm up: the first exchanges fill the allocator's and the runtime's
    // fixed structures.
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut sink = vec![0; BODY + 4096];
        let mut got = 0;
        while got < BODY {
            got += c.read(&mut sink).await.unwrap();
        }
    }
    let before = rss_kib(child.id());
    let mut clients = Vec::new();
    for _ in 0..EXCHANGES {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        clients.push(c);
    }
    // Every download stalls once the sockets' buffers are full.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let per_exchange = during.saturating_sub(before) / EXCHANGES as u64;
    assert!(
        per_exchange < 36,
        "{per_exchange} KiB per exchange in flight ({before} → {during} KiB)"
    );
}
