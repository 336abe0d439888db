//! The connection loop on in-memory streams under tokio's paused clock:
//! each named timeout fires exactly when configured (not a millisecond
//! before), and requests and responses arriving in pieces split at every
//! byte give the same bytes on the other side.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::*;
use crate::config::{Limits, Route, Secret};
use crate::route::RouteTable;
use crate::upstream::{self, tls_connector, Upstream, Wakeup};

const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const IDLE: Duration = Duration::from_secs(20);
const UPSTREAM_WAIT: Duration = Duration::from_secs(60);
const POOL_IDLE: Duration = Duration::from_secs(30);
const GET: &[u8] = b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

impl ClientIo for tokio_test::io::Mock {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// keyhole's connection loop with one route to an in-memory upstream:
/// every upstream connection keyhole opens arrives on `upstream_conns`.
struct Rig {
    shared: Arc<Shared>,
    wakeup: Arc<Wakeup>,
    phase: watch::Sender<Phase>,
    upstream_conns: mpsc::UnboundedReceiver<DuplexStream>,
}

fn limits() -> Limits {
    Limits {
        head_timeout: HEAD_TIMEOUT,
        idle_timeout: IDLE,
        upstream_timeout: UPSTREAM_WAIT,
        pool_idle_timeout: POOL_IDLE,
        ..Limits::default()
    }
}

impl Rig {
    fn new(limits: Limits) -> Rig {
        let (tx, upstream_conns) = mpsc::unbounded_channel();
        let route = Route::new("/", "https://upstream.test")
            .unwrap()
            .header("x-api-key", Secret::new("injected-key"));
        let table = RouteTable::new(vec![route], None, Vec::new());
        let wakeup = Arc::new(Wakeup::default());
        let connector = tls_connector(&[]).unwrap();
        let url = table.routes()[0].upstream.clone();
        let upstream = Upstream::new(&url, connector, wakeup.clone())
            .unwrap()
            .with_memory(Box::new(move || {
                let (ours, theirs) = duplex(1 << 16);
                let _ = tx.send(theirs);
                ours
            }));
        let shared = Arc::new(Shared {
            table,
            upstreams: vec![upstream],
            limits,
        });
        let (phase, _) = watch::channel(Phase::Running);
        Rig {
            shared,
            wakeup,
            phase,
            upstream_conns,
        }
    }

    /// A client connection served by keyhole in its own task.
    fn connect(&self) -> DuplexStream {
        let (client, server) = duplex(1 << 16);
        tokio::spawn(serve(server, self.shared.clone(), self.phase.subscribe()));
        client
    }

    /// The pool's reaper, as `start` runs it.
    fn start_reaper(&self) {
        let (shared, wakeup) = (self.shared.clone(), self.wakeup.clone());
        tokio::spawn(async move { upstream::reap(&shared.upstreams, wakeup, POOL_IDLE).await });
    }

    async fn next_upstream(&mut self) -> DuplexStream {
        self.upstream_conns.recv().await.unwrap()
    }
}

/// Reads until the peer closes.
async fn read_to_end(stream: &mut DuplexStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    out
}

/// Reads one forwarded request: its head and a Content-Length body, or a
/// chunked body through its last chunk.
async fn read_request(stream: &mut DuplexStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte).await.unwrap();
        got.push(byte[0]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            if got.ends_with(b"\r\n0\r\n\r\n") {
                return got;
            }
            continue;
        }
        let length = (head.lines())
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse::<usize>().unwrap());
        if got.len() == end + 4 + length {
            return got;
        }
    }
}

/// Time since `start`, checked to be `limit` to the millisecond (the timer
/// wheel's resolution).
fn assert_fired_at(start: Instant, limit: Duration) {
    let elapsed = start.elapsed();
    assert!(
        elapsed >= limit && elapsed <= limit + Duration::from_millis(2),
        "fired after {elapsed:?}, configured {limit:?}"
    );
}

/// Asserts that nothing arrives on `stream` before `limit` (minus a
/// millisecond) has passed.
async fn assert_quiet_until(stream: &mut DuplexStream, start: Instant, limit: Duration) {
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout_at(start + limit - Duration::from_millis(1), async {
        stream.read(&mut byte).await
    });
    assert!(
        early.await.is_err(),
        "the connection moved before {limit:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn head_timeout_answers_408_when_the_head_stalls() {
    let rig = Rig::new(limits());
    let mut client = rig.connect();
    let start = Instant::now();
    client
        .write_all(b"GET /x HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    assert_quiet_until(&mut client, start, HEAD_TIMEOUT).await;
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 408 "), "{answer:?}");
    assert_fired_at(start, HEAD_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn head_timeout_is_not_reset_by_trickling() {
    let rig = Rig::new(limits());
    let mut client = rig.connect();
    let start = Instant::now();
    for byte in b"GET /x HTTP/1.1\r\nHost: localhost\r\n" {
        client.write_all(&[*byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 408 "), "{answer:?}");
    assert_fired_at(start, HEAD_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_a_silent_new_connection() {
    let rig = Rig::new(limits());
    let mut client = rig.connect();
    let start = Instant::now();
    assert_quiet_until(&mut client, start, IDLE).await;
    assert_eq!(read_to_end(&mut client).await, b"");
    assert_fired_at(start, IDLE);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_a_keep_alive_connection_after_its_last_exchange() {
    let mut rig = Rig::new(limits());
    let mut client = rig.connect();
    client.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    // The exchange takes a while; the idle time counts from its end.
    tokio::time::sleep(Duration::from_secs(5)).await;
    upstream.write_all(OK).await.unwrap();
    let mut answer = vec![0; OK.len()];
    client.read_exact(&mut answer).await.unwrap();
    let ended = Instant::now();
    assert_quiet_until(&mut client, ended, IDLE).await;
    assert_eq!(read_to_end(&mut client).await, b"");
    assert_fired_at(ended, IDLE);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_in_a_request_body_answers_408() {
    let mut rig = Rig::new(limits());
    let mut client = rig.connect();
    client
        .write_all(b"POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let _upstream = rig.next_upstream().await;
    let start = Instant::now();
    assert_quiet_until(&mut client, start, IDLE).await;
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 408 "), "{answer:?}");
    assert_fired_at(start, IDLE);
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_in_a_response_body_cuts_the_connection() {
    let mut rig = Rig::new(limits());
    let mut client = rig.connect();
    client.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let start = Instant::now();
    let answer = read_to_end(&mut client).await;
    assert_fired_at(start, IDLE);
    // The head and the three bytes, then a close: the body never looks complete.
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.ends_with(b"\r\n\r\nabc"), "{answer:?}");
}

#[tokio::test(start_paused = true)]
async fn upstream_timeout_answers_504_and_outlasts_the_idle_timeout() {
    assert!(UPSTREAM_WAIT > IDLE);
    let mut rig = Rig::new(limits());
    let mut client = rig.connect();
    client.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    let start = Instant::now();
    assert_quiet_until(&mut client, start, UPSTREAM_WAIT).await;
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 504 "), "{answer:?}");
    assert_fired_at(start, UPSTREAM_WAIT);
}

#[tokio::test(start_paused = true)]
async fn upstream_timeout_shorter_than_idle_answers_504() {
    let wait = Duration::from_secs(3);
    let mut rig = Rig::new(Limits {
        upstream_timeout: wait,
        ..limits()
    });
    let mut client = rig.connect();
    client.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    let start = Instant::now();
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 504 "), "{answer:?}");
    assert_fired_at(start, wait);
}

#[tokio::test(start_paused = true)]
async fn draining_closes_idle_connections_and_finishes_requests_in_flight() {
    let mut rig = Rig::new(limits());
    let mut idle = rig.connect();
    let mut busy = rig.connect();
    busy.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    let start = Instant::now();
    rig.phase.send_replace(Phase::Draining);
    assert_eq!(read_to_end(&mut idle).await, b"");
    assert_eq!(start.elapsed(), Duration::ZERO);
    upstream.write_all(OK).await.unwrap();
    let answer = read_to_end(&mut busy).await;
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(
        answer.ends_with(b"connection: close\r\n\r\nok"),
        "{answer:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn closing_cuts_a_request_still_in_flight() {
    let mut rig = Rig::new(limits());
    let mut busy = rig.connect();
    busy.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    rig.phase.send_replace(Phase::Draining);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.phase.send_replace(Phase::Closing);
    assert_eq!(read_to_end(&mut busy).await, b"");
}

#[tokio::test(start_paused = true)]
async fn pool_idle_timeout_closes_a_pooled_connection_without_a_request() {
    // The client connection outlives the pool's idle time.
    let mut rig = Rig::new(Limits {
        idle_timeout: POOL_IDLE * 2,
        ..limits()
    });
    rig.start_reaper();
    let mut client = rig.connect();
    client.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    upstream.write_all(OK).await.unwrap();
    let mut answer = vec![0; OK.len()];
    client.read_exact(&mut answer).await.unwrap();
    let pooled = Instant::now();
    assert_quiet_until(&mut upstream, pooled, POOL_IDLE).await;
    assert_eq!(read_to_end(&mut upstream).await, b"");
    assert_fired_at(pooled, POOL_IDLE);
}

#[tokio::test(start_paused = true)]
async fn pooled_connection_closed_by_the_upstream_is_dropped_at_once() {
    let mut rig = Rig::new(limits());
    rig.start_reaper();
    let mut client = rig.connect();
    client.write_all(GET).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    upstream.write_all(OK).await.unwrap();
    let mut answer = vec![0; OK.len()];
    client.read_exact(&mut answer).await.unwrap();
    // Let the reaper start watching it, then close it from the upstream.
    tokio::time::sleep(Duration::from_secs(1)).await;
    upstream.shutdown().await.unwrap();
    let start = Instant::now();
    assert_eq!(read_to_end(&mut upstream).await, b"");
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
}

/// Sends `request` to keyhole split at `at`, answers with `response` split
/// at `split_response`; returns what the upstream received and what the
/// client received.
async fn exchange_in_pieces(
    request: &[u8],
    at: usize,
    response: &[u8],
    split_response: usize,
) -> (Vec<u8>, Vec<u8>) {
    let mut rig = Rig::new(limits());
    let mut client = rig.connect();
    let pause = Duration::from_millis(1);
    let (first, second) = request.split_at(at);
    client.write_all(first).await.unwrap();
    tokio::time::sleep(pause).await;
    client.write_all(second).await.unwrap();
    let mut upstream = rig.next_upstream().await;
    let forwarded = read_request(&mut upstream).await;
    let (first, second) = response.split_at(split_response);
    upstream.write_all(first).await.unwrap();
    tokio::time::sleep(pause).await;
    upstream.write_all(second).await.unwrap();
    drop(upstream);
    client.shutdown().await.unwrap();
    (forwarded, read_to_end(&mut client).await)
}

#[tokio::test(start_paused = true)]
async fn requests_split_at_every_byte_forward_the_same_bytes() {
    let length = b"POST /x HTTP/1.1\r\nHost: localhost\r\nx-api-key: client\r\nContent-Length: 11\r\n\r\nhello world";
    let chunked = b"POST /x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\ntrailer: x\r\n\r\n";
    for request in [&length[..], &chunked[..]] {
        let (whole, answer) = exchange_in_pieces(request, request.len(), OK, OK.len()).await;
        let text = String::from_utf8_lossy(&whole);
        assert!(text.contains("x-api-key: injected-key\r\n"), "{text}");
        assert!(!text.contains("client"), "{text}");
        assert!(answer.ends_with(b"\r\n\r\nok"), "{answer:?}");
        for at in 0..request.len() {
            let (forwarded, got) = exchange_in_pieces(request, at, OK, OK.len()).await;
            assert_eq!(forwarded, whole, "request split at {at}");
            assert_eq!(got, answer, "request split at {at}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn responses_split_at_every_byte_relay_the_same_bytes() {
    let length =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 11\r\n\r\nhello world";
    let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    for (response, body) in [
        (&length[..], &b"\r\n\r\nhello world"[..]),
        (
            &chunked[..],
            &b"\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..],
        ),
    ] {
        let (_, whole) = exchange_in_pieces(GET, GET.len(), response, response.len()).await;
        assert!(whole.starts_with(b"HTTP/1.1 200 OK\r\n"), "{whole:?}");
        assert!(whole.ends_with(body), "{whole:?}");
        for at in 0..response.len() {
            let (_, got) = exchange_in_pieces(GET, GET.len(), response, at).await;
            assert_eq!(got, whole, "response split at {at}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn scripted_client_gets_its_answer_and_a_pipelined_refusal() {
    // tokio-test's scripted stream checks every byte keyhole writes.
    let mut rig = Rig::new(limits());
    let refusal = Refusal::VersionNotSupported.response();
    let client = tokio_test::io::Builder::new()
        .read(&GET[..10])
        .wait(Duration::from_millis(5))
        .read(&GET[10..])
        .write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .read(b"GET /y HTTP/1.0\r\n\r\n")
        .write(&refusal)
        .build();
    let (_phase, phase) = watch::channel(Phase::Running);
    let shared = rig.shared.clone();
    let served = tokio::spawn(serve(client, shared, phase));
    let mut upstream = rig.next_upstream().await;
    read_request(&mut upstream).await;
    upstream.write_all(OK).await.unwrap();
    // A panic in the scripted stream (an unexpected byte) fails this.
    served.await.unwrap();
}
