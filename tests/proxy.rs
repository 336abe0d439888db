//! End-to-end proxying behaviour against a real TLS upstream.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyhole::{Limits, Proxy, Route, Secret};
use support::*;
use tokio::time::timeout;

#[tokio::test]
async fn injects_key_and_strips_client_credentials() {
    let upstream = Upstream::start(|_| ok("hello")).await;
    let proxy = keyhole(&upstream, |b| b).await;
    let res = request(
        proxy.local_addr(),
        b"GET /v1/models?x=1 HTTP/1.1\r\nHost: localhost\r\nX-API-Key: placeholder\r\nx-api-key: second\r\nAuthorization: Bearer placeholder\r\nX-Other: kept\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "hello");
    let got = upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].target, "/v1/models?x=1");
    assert_eq!(got[0].header_values("x-api-key"), vec![SECRET.to_owned()]);
    assert!(got[0].header("authorization").is_none());
    assert_eq!(
        got[0].header_values("host"),
        vec![format!("127.0.0.1:{}", upstream.addr.port())]
    );
    assert_eq!(got[0].header("x-other").as_deref(), Some("kept"));
}

/// Bound for a whole test body.
const TEST: Duration = Duration::from_secs(60);

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Echoes method, target and body, so a test can tell responses apart.
fn echo(req: &Received) -> Reply {
    ok(&format!(
        "{} {} {}",
        req.method,
        req.target,
        String::from_utf8_lossy(&req.body)
    ))
}

#[tokio::test]
async fn strips_credentials_and_hop_by_hop_and_keeps_other_headers_in_order() {
    timeout(TEST, async {
        let upstream = Upstream::start(|_| ok("fine")).await;
        let route =
            route_to(&upstream, "/", "").header("X-Custom-Auth", Secret::new("custom-secret-77"));
        let proxy = builder_for(&upstream).route(route).start().await.unwrap();
        let mut req = Vec::new();
        req.extend_from_slice(b"GET /v1/messages HTTP/1.1\r\n");
        req.extend_from_slice(b"Host: localhost:4242\r\n");
        req.extend_from_slice(b"X-First: 1\r\n");
        req.extend_from_slice(b"X-API-KEY: client-a\r\n");
        req.extend_from_slice(b"Authorization: Bearer client-b\r\n");
        req.extend_from_slice(b"content-type: application/json\r\n");
        req.extend_from_slice(b"x-Api-Key: client-c\r\n");
        req.extend_from_slice(b"Proxy-Authorization: Basic Y2xpZW50LWQ=\r\n");
        req.extend_from_slice(b"Connection: keep-alive, X-Hop-Nominated\r\n");
        req.extend_from_slice(b"X-Hop-Nominated: nominated-value\r\n");
        req.extend_from_slice(b"Keep-Alive: timeout=5\r\n");
        req.extend_from_slice(b"Proxy-Connection: keep-alive\r\n");
        req.extend_from_slice(b"TE: trailers\r\n");
        req.extend_from_slice(b"Trailer: X-Checksum\r\n");
        req.extend_from_slice(b"x-custom-AUTH: client-e\r\n");
        req.extend_from_slice(b"authorization: Bearer client-f\r\n");
        req.extend_from_slice(b"X-Spaces: \t a  b\tc \t\r\n");
        req.extend_from_slice(b"Accept: */*\r\n");
        req.extend_from_slice(b"X-Obs: caf\xe9 \xff!\r\n");
        req.extend_from_slice(b"X-Dup: 1\r\n");
        req.extend_from_slice(b"x-dup: 2\r\n");
        req.extend_from_slice(b"User-Agent: Anthropic/Python 0.40.0\r\n");
        req.extend_from_slice(b"\r\n");
        let res = request(proxy.local_addr(), &req).await.expect("a response");
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "fine");

        let raw = upstream.raw();
        let (line, fields) = head_fields(&raw);
        assert_eq!(line, "GET /v1/messages HTTP/1.1");
        let values = |name: &str| -> Vec<Vec<u8>> {
            fields
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .collect()
        };
        assert_eq!(
            values("host"),
            vec![format!("127.0.0.1:{}", upstream.addr.port()).into_bytes()]
        );
        assert_eq!(values("x-api-key"), vec![SECRET.as_bytes().to_vec()]);
        assert_eq!(values("x-custom-auth"), vec![b"custom-secret-77".to_vec()]);
        for v in values("connection") {
            let v = String::from_utf8(v).unwrap().to_ascii_lowercase();
            assert!(
                v == "keep-alive" || v == "close",
                "keyhole's own Connection only, got {v:?}"
            );
        }
        let passed: Vec<(String, Vec<u8>)> = fields
            .iter()
            .filter(|(n, _)| {
                !["host", "x-api-key", "x-custom-auth", "connection"].contains(&lower(n).as_str())
            })
            .cloned()
            .collect();
        let expected: Vec<(String, Vec<u8>)> = vec![
            ("X-First".into(), b"1".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            ("X-Spaces".into(), b"a  b\tc".to_vec()),
            ("Accept".into(), b"*/*".to_vec()),
            ("X-Obs".into(), b"caf\xe9 \xff!".to_vec()),
            ("X-Dup".into(), b"1".to_vec()),
            ("x-dup".into(), b"2".to_vec()),
            ("User-Agent".into(), b"Anthropic/Python 0.40.0".to_vec()),
        ];
        assert_eq!(passed, expected);
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        for leaked in [
            "client-",
            "y2xpzw50lwq",
            "nominated-value",
            "timeout=5",
            "trailers",
            "x-checksum",
        ] {
            assert!(
                !text.contains(leaked),
                "{leaked} reached the upstream: {text}"
            );
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn upgrade_h2c_is_stripped_and_served_as_http11() {
    timeout(TEST, async {
        let upstream = Upstream::start(|_| ok("plain")).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client
            .send(
                b"GET /up HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nX-Keep: yes\r\n\r\n",
            )
            .await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "plain");
        let got = upstream.received();
        assert_eq!(got.len(), 1);
        assert!(got[0].header("upgrade").is_none());
        assert!(got[0].header("http2-settings").is_none());
        assert!(got[0].header_values("connection").iter().all(|v| !lower(v).contains("upgrade")));
        assert_eq!(got[0].header("x-keep").as_deref(), Some("yes"));
        // Served as a plain HTTP/1.1 exchange: no 101, the connection is still usable.
        client.send(&get("/again")).await;
        assert_eq!(client.response(false).await.expect("second response").status, 200);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn upstream_101_is_bad_gateway() {
    timeout(TEST, async {
        let upstream = Upstream::start(|_| {
            Reply::Bytes(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                    .to_vec(),
            )
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let res = request(
            proxy.local_addr(),
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        )
        .await
        .expect("a response");
        assert_eq!(res.status, 502);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn routing_table_prefix_boundary_longest_match_base_path_and_query() {
    timeout(TEST, async {
        let upstream = Upstream::start(echo).await;
        let proxy = builder_for(&upstream)
            .route(
                Route::new("/", &upstream.url("/root"))
                    .unwrap()
                    .header("x-api-key", Secret::new("root-key")),
            )
            .route(
                Route::new("/openai", &upstream.url("/v1"))
                    .unwrap()
                    .header("authorization", Secret::new("Bearer oai-key")),
            )
            .route(
                Route::new("/openai/files", &upstream.url("/files/"))
                    .unwrap()
                    .header("x-api-key", Secret::new("files-key")),
            )
            .route(
                Route::new("/anthropic", &upstream.url(""))
                    .unwrap()
                    .header("x-api-key", Secret::new("ant-key")),
            )
            .start()
            .await
            .unwrap();
        // (client target, upstream target, which key)
        let cases = [
            (
                "/openai/chat/completions?q=a%20b&x=/../&y=%2F",
                "/v1/chat/completions?q=a%20b&x=/../&y=%2F",
                "oai",
            ),
            ("/openai", "/v1", "oai"),
            ("/openai?stream=true", "/v1?stream=true", "oai"),
            ("/openai/", "/v1/", "oai"),
            ("/openaiX/models", "/root/openaiX/models", "root"),
            (
                "/openai/files/abc?purpose=x",
                "/files/abc?purpose=x",
                "files",
            ),
            ("/openai/files", "/files", "files"),
            ("/openai/filesX", "/v1/filesX", "oai"),
            ("/anthropic", "/", "ant"),
            ("/anthropic?beta=true", "/?beta=true", "ant"),
            (
                "/anthropic/v1/messages?beta=true",
                "/v1/messages?beta=true",
                "ant",
            ),
            ("/Anthropic/v1", "/root/Anthropic/v1", "root"),
            ("/a%41b/c;p=1?%zz=%", "/root/a%41b/c;p=1?%zz=%", "root"),
            ("/", "/root/", "root"),
        ];
        let mut client = Client::connect(proxy.local_addr()).await;
        for (i, (target, _, _)) in cases.iter().enumerate() {
            client.send(&get(target)).await;
            let res = client
                .response(false)
                .await
                .unwrap_or_else(|| panic!("no response to {target}"));
            assert_eq!(res.status, 200, "{target}");
            let got = upstream.received();
            assert_eq!(got.len(), i + 1);
        }
        let got = upstream.received();
        let host = format!("127.0.0.1:{}", upstream.addr.port());
        for ((target, want, key), req) in cases.iter().zip(&got) {
            assert_eq!(req.target, *want, "client target {target}");
            assert_eq!(req.header_values("host"), vec![host.clone()], "{target}");
            let (api_key, auth) = (
                req.header_values("x-api-key"),
                req.header_values("authorization"),
            );
            match *key {
                "oai" => assert_eq!(
                    (api_key, auth),
                    (vec![], vec!["Bearer oai-key".to_owned()]),
                    "{target}"
                ),
                k => assert_eq!(
                    (api_key, auth),
                    (vec![format!("{k}-key")], vec![]),
                    "{target}"
                ),
            }
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn not_found_when_no_route_matches() {
    timeout(TEST, async {
        let upstream = Upstream::start(echo).await;
        let proxy = builder_for(&upstream)
            .route(route_to(&upstream, "/a", ""))
            .start()
            .await
            .unwrap();
        for target in ["/b", "/ab", "/", "/A", "/b/a", "/?a"] {
            let mut client = Client::connect(proxy.local_addr()).await;
            client.send(&get(target)).await;
            let res = client
                .response(false)
                .await
                .unwrap_or_else(|| panic!("no response to {target}"));
            assert_eq!(res.status, 404, "{target}");
            assert_eq!(
                res.header("content-type")
                    .map(|v| lower(&v))
                    .as_deref()
                    .map(|v| v.starts_with("text/plain")),
                Some(true)
            );
            assert!(!res.body.is_empty(), "a reason is given");
            assert_eq!(
                res.header("connection").map(|v| lower(&v)).as_deref(),
                Some("close"),
                "{target}"
            );
            assert!(
                client.closed().await,
                "closed after a generated response ({target})"
            );
        }
        assert!(upstream.received().is_empty(), "nothing went upstream");
        for (target, want) in [("/a", "/"), ("/a/x?y", "/x?y")] {
            let res = request(proxy.local_addr(), &get(target))
                .await
                .expect("a response");
            assert_eq!(res.status, 200, "{target}");
            assert_eq!(res.text(), format!("GET {want} "));
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_length_upload_of_32_mib_arrives_intact() {
    const LEN: usize = 32 * 1024 * 1024 + 7;
    timeout(Duration::from_secs(240), async {
        // The reply is cheap so that it is not delayed by hashing 32 MiB (the
        // client's read has a bounded wait); the hash is compared below.
        let upstream = Upstream::start(|req| ok(&req.body.len().to_string())).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let body = pattern(LEN);
        let want = sha256(&body);
        let mut client = Client::connect(proxy.local_addr()).await;
        client
            .send(
                format!(
                    "POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {LEN}\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        client.send(&body).await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), LEN.to_string());
        let got = upstream.received();
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].header_values("content-length"),
            vec![LEN.to_string()]
        );
        assert!(got[0].header("transfer-encoding").is_none());
        assert_eq!(got[0].body.len(), LEN);
        assert_eq!(sha256(&got[0].body), want);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_length_download_of_32_mib_arrives_intact() {
    const LEN: usize = 32 * 1024 * 1024 + 3;
    timeout(Duration::from_secs(240), async {
        let upstream = Upstream::start(|_| Reply::Generated {
            len: LEN,
            chunked: false,
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(&get("/download")).await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 200);
        assert_eq!(res.header("content-length"), Some(LEN.to_string()));
        assert!(res.header("transfer-encoding").is_none());
        assert_eq!(res.body.len(), LEN);
        assert_eq!(sha256(&res.body), sha256(&pattern(LEN)));
        // The connection is still usable after a large body.
        client.send(&get("/small")).await;
        let res = client.response(false).await.expect("a second response");
        assert_eq!(res.body.len(), LEN);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn chunked_request_keeps_chunk_sizes_and_payload_with_canonical_framing() {
    timeout(TEST, async {
        let upstream = Upstream::start(|req| ok(&format!("{:?}", req.chunk_sizes))).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let big = pattern(100_000);
        let mut client = Client::connect(proxy.local_addr()).await;
        client
            .send(b"POST /v1/chunks HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n")
            .await;
        client.send(b"5;name=value\r\nhello\r\n").await;
        client.send(b"0A;quoted=\"a;b\"\r\n0123456789\r\n").await;
        // One large chunk, written in pieces with pauses: still one chunk upstream.
        client.send(format!("{:X}\r\n", big.len()).as_bytes()).await;
        for piece in big.chunks(30_000) {
            client.send(piece).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        client.send(b"\r\n1\r\nX\r\n").await;
        client.send(b"000;last\r\nX-Trailer: dropped\r\nX-Other-Trailer: too\r\n\r\n").await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 200);
        let got = upstream.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header_values("transfer-encoding"), vec!["chunked".to_owned()]);
        assert!(got[0].header("content-length").is_none());
        assert!(got[0].header("trailer").is_none());
        assert_eq!(got[0].chunk_sizes, vec![5, 10, 100_000, 1]);
        let want = canonical_chunked(&[b"hello", b"0123456789", &big, b"X"]);
        assert!(got[0].raw_body == want, "upstream chunked framing is not canonical");
        // Nothing after the final chunk (trailers dropped).
        assert!(!String::from_utf8_lossy(&upstream.raw()).contains("X-Trailer"));
        // Same connection still usable.
        client.send(&get("/after")).await;
        assert_eq!(client.response(false).await.expect("second response").status, 200);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn chunked_response_reaches_client_with_same_chunk_sizes() {
    timeout(TEST, async {
        let big = pattern(70_000);
        let big2 = big.clone();
        let upstream = Upstream::start(move |_| {
            let ms = Duration::from_millis(20);
            let mut big_chunk = format!("{:x}\r\n", big2.len()).into_bytes();
            big_chunk.extend_from_slice(&big2);
            big_chunk.extend_from_slice(b"\r\n");
            Reply::Pieces(vec![
                (Duration::ZERO, b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n".to_vec()),
                (ms, b"3;ext=1\r\nabc\r\n".to_vec()),
                (ms, b"1\r\nd\r\n".to_vec()),
                (ms, big_chunk),
                (ms, b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n".to_vec()),
                (ms, b"0\r\nX-Sum: 42\r\n\r\n".to_vec()),
            ])
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(&get("/stream")).await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 200);
        assert_eq!(res.header("transfer-encoding").map(|v| lower(&v)).as_deref(), Some("chunked"));
        assert_eq!(chunk_sizes(&res.raw_body), vec![3, 1, 70_000, 26]);
        let want = canonical_chunked(&[b"abc", b"d", &big, b"abcdefghijklmnopqrstuvwxyz"]);
        assert!(res.raw_body == want, "client chunked framing is not canonical");
        // No trailer bytes after the terminator: the next response parses cleanly.
        client.send(&get("/again")).await;
        let res = client.response(false).await.expect("second response");
        assert_eq!(chunk_sizes(&res.raw_body), vec![3, 1, 70_000, 26]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn sse_first_event_reaches_client_before_upstream_sends_last() {
    timeout(TEST, async {
        let first_seen = Arc::new(tokio::sync::Notify::new());
        let ordered = Arc::new(AtomicBool::new(false));
        let (seen, ord) = (first_seen.clone(), ordered.clone());
        let upstream = Upstream::start_raw(move |mut conn| {
            let (seen, ord) = (seen.clone(), ord.clone());
            async move {
                if conn.read_request().await.is_none() {
                    return;
                }
                let first = b"event: message_start\ndata: {\"n\":1}\n\n";
                let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                out.extend_from_slice(format!("{:x}\r\n", first.len()).as_bytes());
                out.extend_from_slice(first);
                out.extend_from_slice(b"\r\n");
                if conn.write(&out).await.is_err() {
                    return;
                }
                // Only once the client has the first event does the last one leave.
                let signalled = timeout(Duration::from_secs(5), seen.notified()).await.is_ok();
                ord.store(signalled, Ordering::SeqCst);
                let last = b"event: message_stop\ndata: {}\n\n";
                let mut out = format!("{:x}\r\n", last.len()).into_bytes();
                out.extend_from_slice(last);
                out.extend_from_slice(b"\r\n0\r\n\r\n");
                let _ = conn.write(&out).await;
            }
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client
            .send(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nContent-Length: 2\r\n\r\n{}")
            .await;
        let head_and_first = client.read_until(b"message_start\ndata: {\"n\":1}\n\n").await.expect("first event");
        first_seen.notify_one();
        assert!(String::from_utf8_lossy(&head_and_first).starts_with("HTTP/1.1 200"));
        let rest = client.read_until(b"0\r\n\r\n").await.expect("the rest of the stream");
        assert!(String::from_utf8_lossy(&rest).contains("message_stop"));
        assert!(ordered.load(Ordering::SeqCst), "the first event only arrived after the upstream sent the last one");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn one_hundred_requests_on_one_kept_alive_connection() {
    timeout(TEST, async {
        let upstream = Upstream::start(echo).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        for i in 0..100 {
            if i % 2 == 0 {
                client.send(&get(&format!("/r/{i}"))).await;
            } else {
                let body = format!("body-{i}");
                client
                    .send(format!("POST /r/{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            }
            let res = client.response(false).await.unwrap_or_else(|| panic!("no response to request {i}"));
            assert_eq!(res.status, 200, "request {i}");
            let want = if i % 2 == 0 { format!("GET /r/{i} ") } else { format!("POST /r/{i} body-{i}") };
            assert_eq!(res.text(), want);
            assert!(res.header("connection").is_none_or(|v| !lower(&v).contains("close")), "request {i}");
        }
        assert_eq!(upstream.received().len(), 100);
        assert_eq!(upstream.connections(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order() {
    timeout(TEST, async {
        let upstream = Upstream::start(echo).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        let mut wire = Vec::new();
        wire.extend_from_slice(&get("/one"));
        wire.extend_from_slice(&get("/two?x=2"));
        wire.extend_from_slice(b"POST /three HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 11\r\n\r\nhello world");
        wire.extend_from_slice(b"POST /four HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfour\r\n0\r\n\r\n");
        wire.extend_from_slice(&get("/five"));
        client.send(&wire).await;
        for want in ["GET /one ", "GET /two?x=2 ", "POST /three hello world", "POST /four four", "GET /five "] {
            let res = client.response(false).await.unwrap_or_else(|| panic!("no response for {want}"));
            assert_eq!(res.status, 200);
            assert_eq!(res.text(), want);
        }
        let targets: Vec<String> = upstream.received().iter().map(|r| r.target.clone()).collect();
        assert_eq!(targets, ["/one", "/two?x=2", "/three", "/four", "/five"]);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn upstream_connection_is_reused_across_requests_and_client_connections() {
    timeout(TEST, async {
        let upstream = Upstream::start(echo).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        for i in 0..5 {
            client.send(&get(&format!("/same/{i}"))).await;
            assert_eq!(
                client.response(false).await.expect("a response").status,
                200
            );
        }
        drop(client);
        for i in 0..5 {
            let res = request(proxy.local_addr(), &get(&format!("/new/{i}")))
                .await
                .expect("a response");
            assert_eq!(res.status, 200);
        }
        let got = upstream.received();
        assert_eq!(got.len(), 10);
        assert_eq!(
            upstream.connections(),
            1,
            "one upstream TLS connection for all"
        );
        assert!(got.iter().all(|r| r.conn_id == 0));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn pooled_connection_closed_by_upstream_does_not_fail_next_request() {
    timeout(TEST, async {
        // Answers one request per connection, then closes without saying so.
        let upstream = Upstream::start_raw(|mut conn| async move {
            if let Some(req) = conn.read_request().await {
                let _ = conn
                    .send(ok(&format!("conn {} {}", conn.id, req.target)))
                    .await;
            }
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        for i in 0..3 {
            client.send(&get(&format!("/k/{i}"))).await;
            let res = client
                .response(false)
                .await
                .unwrap_or_else(|| panic!("no response to request {i}"));
            assert_eq!(res.status, 200, "request {i}");
            assert_eq!(res.text(), format!("conn {i} /k/{i}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // And from a new client connection.
        let res = request(proxy.local_addr(), &get("/k/3"))
            .await
            .expect("a response");
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "conn 3 /k/3");
        assert_eq!(upstream.connections(), 4);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_gateway_when_upstream_port_is_closed() {
    timeout(TEST, async {
        let port = closed_port().await;
        let route = Route::new("/", &format!("https://127.0.0.1:{port}"))
            .unwrap()
            .header("x-api-key", Secret::new(SECRET));
        let proxy = Proxy::builder().route(route).start().await.unwrap();
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(&get("/v1/models")).await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 502);
        assert!(!res.body.is_empty());
        assert!(!res.text().contains(SECRET));
        assert_eq!(
            res.header("connection").map(|v| lower(&v)).as_deref(),
            Some("close")
        );
        assert!(client.closed().await);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_gateway_when_upstream_certificate_is_untrusted() {
    timeout(TEST, async {
        let upstream = Upstream::start(|_| ok("must not be reached")).await;
        // No .ca_pem: the upstream's CA is unknown to keyhole.
        let proxy = Proxy::builder()
            .route(route_to(&upstream, "/", ""))
            .start()
            .await
            .unwrap();
        let res = request(proxy.local_addr(), &get("/v1/models"))
            .await
            .expect("a response");
        assert_eq!(res.status, 502);
        assert!(!res.text().contains(SECRET));
        assert!(
            upstream.raw().is_empty(),
            "no request byte may cross an unverified TLS session"
        );
        assert!(upstream.received().is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_gateway_when_upstream_certificate_is_expired() {
    timeout(TEST, async {
        let upstream = Upstream::start_with(Pki::expired(), |mut conn| async move {
            while let Some(_req) = conn.read_request().await {
                if conn.send(ok("must not be reached")).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let res = request(proxy.local_addr(), &get("/v1/models"))
            .await
            .expect("a response");
        assert_eq!(res.status, 502);
        assert!(upstream.raw().is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn head_keeps_content_length_sends_no_body_and_connection_stays_usable() {
    timeout(TEST, async {
        let upstream = Upstream::start(|req| {
            if req.method == "HEAD" {
                Reply::Bytes(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1234\r\n\r\n".to_vec())
            } else {
                ok("after head")
            }
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(b"HEAD /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        let res = client.response(true).await.expect("a HEAD response");
        assert_eq!(res.status, 200);
        assert_eq!(res.header("content-length").as_deref(), Some("1234"));
        assert!(res.header("transfer-encoding").is_none());
        client.send(&get("/next")).await;
        let res = client.response(false).await.expect("the next response");
        // Had keyhole sent any body after the HEAD response, this would not parse as a 200.
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "after head");
        assert!(client.pending().is_empty());
        assert_eq!(upstream.connections(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    timeout(TEST, async {
        let upstream = Upstream::start(|req| match req.target.as_str() {
            "/204" => Reply::Bytes(b"HTTP/1.1 204 No Content\r\nx-request-id: a\r\n\r\n".to_vec()),
            "/304" => Reply::Bytes(
                b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 50\r\n\r\n".to_vec(),
            ),
            _ => ok("after"),
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        for (target, status) in [("/204", 204), ("/304", 304)] {
            client.send(&get(target)).await;
            let res = client.response(false).await.expect("a response");
            assert_eq!(res.status, status);
            assert!(res.header("transfer-encoding").is_none(), "{target}");
            client.send(&get("/after")).await;
            let res = client.response(false).await.expect("the next response");
            assert_eq!(res.status, 200, "after {target}");
            assert_eq!(res.text(), "after");
        }
        assert!(client.pending().is_empty());
        assert_eq!(upstream.connections(), 1);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn close_delimited_response_is_relayed_then_client_connection_closes() {
    timeout(TEST, async {
        let upstream = Upstream::start_raw(|mut conn| async move {
            if conn.read_request().await.is_some() {
                let _ = conn
                    .write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst part, ")
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = conn.write(b"second part").await;
                // A clean TLS close (close_notify) ends the body.
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut conn.stream).await;
            }
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(&get("/legacy")).await;
        let res = client.response(false).await.expect("a response");
        assert_eq!(res.status, 200);
        // Re-framed as chunked, so that a cut-off body could not look complete.
        assert_eq!(res.header("transfer-encoding").as_deref(), Some("chunked"));
        assert_eq!(res.header("connection").as_deref(), Some("close"));
        assert_eq!(res.text(), "first part, second part");
        assert!(client.closed().await);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn close_delimited_response_cut_without_tls_close_has_no_terminator() {
    timeout(TEST, async {
        let upstream = Upstream::start_raw(|mut conn| async move {
            if conn.read_request().await.is_some() {
                let _ = conn
                    .write(b"HTTP/1.1 200 OK\r\n\r\nhello until close")
                    .await;
            }
            // Dropped without close_notify: a truncation, not an end.
        })
        .await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(&get("/truncated")).await;
        assert!(
            client.response(false).await.is_none(),
            "a truncated body must not look complete"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn expect_100_continue_gets_interim_then_final_response() {
    timeout(TEST, async {
        let upstream = Upstream::start(|req| ok(&format!("got {}", String::from_utf8_lossy(&req.body)))).await;
        let proxy = keyhole(&upstream, |b| b).await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client
            .send(b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 16\r\nExpect: 100-continue\r\n\r\n")
            .await;
        let interim = client.response(false).await.expect("100 Continue before the body");
        assert_eq!(interim.status, 100);
        client.send(b"the body, intact").await;
        let res = client.response(false).await.expect("the final response");
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "got the body, intact");
        let got = upstream.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, b"the body, intact");
        // Still a keep-alive connection.
        client.send(&get("/after")).await;
        assert_eq!(client.response(false).await.expect("next response").status, 200);
    })
    .await
    .unwrap();
}

/// An SSE upstream sending `events` chunked events, one every `every`.
async fn slow_sse(events: usize, every: Duration) -> Upstream {
    Upstream::start_raw(move |mut conn| async move {
        if conn.read_request().await.is_none() {
            return;
        }
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        if conn.write(head).await.is_err() {
            return;
        }
        for i in 0..events {
            if i > 0 {
                tokio::time::sleep(every).await;
            }
            let event = format!("data: event {i}\n\n");
            if conn.write(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = conn.write(b"0\r\n\r\n").await;
    })
    .await
}

fn drain_limits(drain: Duration) -> Limits {
    Limits {
        drain_timeout: drain,
        ..Limits::default()
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_stream_finish_and_refuses_new_connections() {
    timeout(TEST, async {
        let upstream = slow_sse(6, Duration::from_millis(200)).await;
        let proxy = keyhole(&upstream, |b| {
            b.limits(drain_limits(Duration::from_secs(3)))
        })
        .await;
        let addr = proxy.local_addr();
        let mut client = Client::connect(addr).await;
        client.send(&get("/v1/stream")).await;
        let mut seen = client
            .read_until(b"data: event 0\n\n")
            .await
            .expect("first event");
        let shutdown = tokio::spawn(proxy.shutdown());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "a new connection was accepted during shutdown"
        );
        let rest = client
            .read_to_close(Duration::from_secs(5))
            .await
            .expect("closed after the stream");
        seen.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&seen);
        for i in 0..6 {
            assert!(
                text.contains(&format!("data: event {i}\n\n")),
                "event {i} missing: {text}"
            );
        }
        assert!(
            seen.ends_with(b"\r\n0\r\n\r\n"),
            "the stream must end with its terminator: {text}"
        );
        timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown returns")
            .unwrap();
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn shutdown_cuts_stream_that_outlasts_drain_time_without_terminator() {
    timeout(TEST, async {
        let upstream = slow_sse(100, Duration::from_millis(200)).await;
        let proxy = keyhole(&upstream, |b| {
            b.limits(drain_limits(Duration::from_secs(1)))
        })
        .await;
        let mut client = Client::connect(proxy.local_addr()).await;
        client.send(&get("/v1/stream")).await;
        let mut seen = client
            .read_until(b"data: event 0\n\n")
            .await
            .expect("first event");
        let started = Instant::now();
        let shutdown = tokio::spawn(proxy.shutdown());
        let rest = client
            .read_to_close(Duration::from_secs(6))
            .await
            .expect("the connection is closed after the drain time");
        let elapsed = started.elapsed();
        seen.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&seen);
        assert!(
            elapsed >= Duration::from_millis(800),
            "cut before the drain time: {elapsed:?}"
        );
        assert!(
            text.contains("data: event 2\n\n"),
            "the stream kept flowing while draining: {text}"
        );
        assert!(!text.contains("event 99"));
        assert!(
            !seen.ends_with(b"0\r\n\r\n"),
            "a cut-off stream must not look complete: {text}"
        );
        timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown returns")
            .unwrap();
    })
    .await
    .unwrap();
}
