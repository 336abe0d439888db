//! For sandbox runners: client identities (a key per sandbox, revoked at
//! once), allowlists, and the `keyhole-error` code on every generated
//! response. Each over real sockets against a real TLS upstream.

mod support;

use std::time::Duration;

use keyhole::{Error, Route, Secret};
use support::*;
use tokio::io::AsyncWriteExt;

fn with_key(key: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn each_client_is_known_by_its_own_key() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let proxy = keyhole(&upstream, |b| {
        b.client("alpha", Secret::new("key-alpha"))
            .client("beta", Secret::new("key-beta"))
    })
    .await;
    for (key, status) in [
        ("key-alpha", 200),
        ("key-beta", 200),
        ("key-gamma", 401),
        ("key-alph", 401),
    ] {
        let res = request(proxy.local_addr(), &with_key(key, "/v1/x"))
            .await
            .unwrap();
        assert_eq!(res.status, status, "{key}");
    }
    assert_eq!(upstream.received().len(), 2);
    // The injected key replaced the client's.
    for req in upstream.received() {
        assert_eq!(req.header_values("x-api-key"), vec![SECRET.to_owned()]);
    }
}

#[tokio::test]
async fn generated_keys_work_at_once_and_revocation_is_immediate_on_open_connections() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
    // Required, none registered: everything is 401.
    let res = request(proxy.local_addr(), &with_key("anything", "/v1/x"))
        .await
        .unwrap();
    assert_eq!(res.status, 401);
    assert_eq!(res.header("keyhole-error").as_deref(), Some("client-key"));
    let alpha = proxy.add_client("alpha").unwrap();
    let beta = proxy.add_client("beta").unwrap();
    let alpha_key = alpha.expose_secret().to_owned();
    let beta_key = beta.expose_secret().to_owned();
    assert!(
        alpha_key.starts_with("kh_") && alpha_key.len() == 46,
        "{alpha_key}"
    );
    assert_ne!(alpha_key, beta_key);
    // Keep-alive connections opened before the revocation.
    let mut a = Client::connect(proxy.local_addr()).await;
    let mut b = Client::connect(proxy.local_addr()).await;
    a.send(&with_key(&alpha_key, "/v1/x")).await;
    assert_eq!(a.response(false).await.unwrap().status, 200);
    b.send(&with_key(&beta_key, "/v1/x")).await;
    assert_eq!(b.response(false).await.unwrap().status, 200);
    assert!(proxy.remove_client("alpha"));
    assert!(!proxy.remove_client("alpha"));
    a.send(&with_key(&alpha_key, "/v1/x")).await;
    let refused = a.response(false).await.unwrap();
    assert_eq!(refused.status, 401);
    b.send(&with_key(&beta_key, "/v1/x")).await;
    assert_eq!(b.response(false).await.unwrap().status, 200);
    assert_eq!(upstream.received().len(), 3);
}

#[tokio::test]
async fn revocation_does_not_cut_a_stream_in_flight_of_another_client() {
    // The upstream holds the response open until told to finish.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let upstream = Upstream::start_raw(move |mut conn| {
        let mut rx = rx.clone();
        async move {
            while conn.read_request().await.is_some() {
                conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                    .await
                    .unwrap();
                let _ = rx.wait_for(|done| *done).await;
                conn.write(b"4\r\nlast\r\n0\r\n\r\n").await.unwrap();
            }
        }
    })
    .await;
    let proxy = keyhole(&upstream, |b| {
        b.client("keep", Secret::new("key-keep"))
            .client("gone", Secret::new("key-gone"))
    })
    .await;
    let mut keep = Client::connect(proxy.local_addr()).await;
    keep.send(&with_key("key-keep", "/v1/stream")).await;
    keep.read_until(b"first").await.unwrap();
    assert!(proxy.remove_client("gone"));
    let res = request(proxy.local_addr(), &with_key("key-gone", "/v1/x"))
        .await
        .unwrap();
    assert_eq!(res.status, 401);
    tx.send_replace(true);
    keep.read_until(b"0\r\n\r\n").await.unwrap();
}

#[tokio::test]
async fn client_names_and_keys_are_validated() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let proxy = keyhole(&upstream, |b| b.client("alpha", Secret::new("key-alpha"))).await;
    assert!(matches!(
        proxy.add_client("alpha"),
        Err(Error::DuplicateClient(_))
    ));
    assert!(proxy.add_client("bad name").is_err());
    assert!(proxy
        .add_client_key("beta", &Secret::new("key-alpha"))
        .is_err());
    assert!(proxy.add_client_key("beta", &Secret::new("")).is_err());
    proxy
        .add_client_key("beta", &Secret::new("key-beta"))
        .unwrap();
    let res = request(proxy.local_addr(), &with_key("key-beta", "/"))
        .await
        .unwrap();
    assert_eq!(res.status, 200);
    let err = keyhole::Proxy::builder()
        .route(Route::new("/", &upstream.url("")).unwrap())
        .client("a", Secret::new("same"))
        .client("b", Secret::new("same"))
        .start()
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("same"), "{err}");
}

#[tokio::test]
async fn allowlist_matches_the_upstream_path_after_rewrite() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let route = Route::new("/anthropic", &upstream.url("/base"))
        .unwrap()
        .header("x-api-key", Secret::new(SECRET))
        .allow("POST", "/base/v1/messages")
        .allow("POST", "/base/v1/messages/count_tokens")
        .allow("GET", "/base/v1/models/*");
    let proxy = keyhole::Proxy::builder()
        .ca_pem(upstream.ca_pem.clone())
        .route(route)
        .start()
        .await
        .unwrap();
    let cases = [
        ("POST", "/anthropic/v1/messages", 200),
        ("POST", "/anthropic/v1/messages?beta=true", 200),
        ("POST", "/anthropic/v1/messages/count_tokens", 200),
        ("GET", "/anthropic/v1/models", 200),
        ("GET", "/anthropic/v1/models/claude-x", 200),
        ("GET", "/anthropic/v1/modelsX", 403),
        ("POST", "/anthropic/v1/messages/batches", 403),
        ("DELETE", "/anthropic/v1/messages/batches/b1", 403),
        ("GET", "/anthropic/v1/messages", 403),
        ("POST", "/anthropic/v1/messages/", 403),
    ];
    for (method, path, status) in cases {
        let bytes =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
        let res = request(proxy.local_addr(), bytes.as_bytes()).await.unwrap();
        assert_eq!(res.status, status, "{method} {path}");
        if status == 403 {
            assert_eq!(res.header("keyhole-error").as_deref(), Some("not-allowed"));
        }
    }
    assert_eq!(
        upstream.received().len(),
        5,
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn allow_patterns_are_validated_at_start() {
    let upstream = Upstream::start(|_| ok("in")).await;
    for (method, pattern) in [
        ("POST", "v1"),
        ("PO ST", "/v1"),
        ("GET", "/v1/*/x"),
        ("GET", "/v1*"),
    ] {
        let route = Route::new("/", &upstream.url(""))
            .unwrap()
            .allow(method, pattern);
        let result = keyhole::Proxy::builder().route(route).start().await;
        assert!(result.is_err(), "{method} {pattern}");
    }
}

#[tokio::test]
async fn every_generated_response_carries_its_code() {
    let upstream = Upstream::start(|_| {
        Reply::Bytes(
            b"HTTP/1.1 200 OK\r\nkeyhole-error: forged\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        )
    })
    .await;
    let proxy = keyhole(&upstream, |b| b.client("a", Secret::new("key-a"))).await;
    let long_name = "x".repeat(200);
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\nx-api-key: key-a\r\n\r\n".to_vec(), 400, "bad-request"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(), 401, "client-key"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil\r\nx-api-key: key-a\r\n\r\n".to_vec(), 403, "browser"),
        (b"GET / HTTP/1.1\r\nHost: evil.example\r\nx-api-key: key-a\r\n\r\n".to_vec(), 403, "host"),
        (b"TRACE / HTTP/1.1\r\nHost: localhost\r\nx-api-key: key-a\r\n\r\n".to_vec(), 405, "method"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nExpect: magic\r\nx-api-key: key-a\r\n\r\n".to_vec(), 417, "expectation"),
        (format!("GET / HTTP/1.1\r\nHost: localhost\r\n{long_name}: {}\r\n\r\n", "v".repeat(70_000)).into_bytes(), 431, "head-too-large"),
        (b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n".to_vec(), 505, "version"),
    ];
    for (bytes, status, code) in cases {
        let res = request(proxy.local_addr(), &bytes).await.unwrap();
        assert_eq!(res.status, status, "{code}");
        assert_eq!(
            res.header("keyhole-error").as_deref(),
            Some(code),
            "{status}"
        );
    }
    // An upstream's own keyhole-error is dropped.
    let res = request(proxy.local_addr(), &with_key("key-a", "/"))
        .await
        .unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.header("keyhole-error"), None);
    // 408, 404, 413 and the 5xx codes.
    let mut slow = Client::connect(proxy.local_addr()).await;
    slow.stream.write_all(b"GET / HT").await.unwrap();
    drop(slow);
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn rotated_key_is_used_by_the_next_request_while_a_slow_one_keeps_the_old() {
    // The first request's response waits until released; the upstream
    // records what each request carried.
    let (tx, rx) = tokio::sync::watch::channel(false);
    let upstream = Upstream::start_raw(move |mut conn| {
        let mut rx = rx.clone();
        async move {
            while let Some(req) = conn.read_request().await {
                if req.target.ends_with("/slow") {
                    let _ = rx.wait_for(|go| *go).await;
                }
                if conn.send(ok("done")).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let route = Route::new("/", &upstream.url(""))
        .unwrap()
        .header("x-api-key", Secret::new("old-key"));
    let proxy = keyhole::Proxy::builder()
        .ca_pem(upstream.ca_pem.clone())
        .route(route)
        .start()
        .await
        .unwrap();
    let mut slow = Client::connect(proxy.local_addr()).await;
    slow.send(&get("/v1/slow")).await;
    // Wait until the slow request has reached the upstream.
    let deadline = std::time::Instant::now() + STEP;
    while upstream.received().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow request did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy
        .set_header("/", "x-api-key", Secret::new("new-key"))
        .unwrap();
    let res = request(proxy.local_addr(), &get("/v1/fast")).await.unwrap();
    assert_eq!(res.status, 200);
    tx.send_replace(true);
    assert_eq!(slow.response(false).await.unwrap().status, 200);
    let carried: Vec<(String, Vec<String>)> = (upstream.received().iter())
        .map(|r| (r.target.clone(), r.header_values("x-api-key")))
        .collect();
    assert_eq!(
        carried,
        [
            ("/v1/slow".to_owned(), vec!["old-key".to_owned()]),
            ("/v1/fast".to_owned(), vec!["new-key".to_owned()]),
        ]
    );
    assert!(proxy
        .set_header("/nope", "x-api-key", Secret::new("k"))
        .is_err());
    assert!(proxy.set_header("/", "x-other", Secret::new("k")).is_err());
    assert!(proxy.set_header("/", "x-api-key", Secret::new("")).is_err());
}

#[tokio::test]
async fn reload_reads_file_secrets_again_all_or_nothing() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let dir = std::env::temp_dir().join(format!("keyhole-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::write(&a, "key-a1\n").unwrap();
    std::fs::write(&b, "key-b1").unwrap();
    let route = Route::new("/", &upstream.url(""))
        .unwrap()
        .header("x-api-key", Secret::from_file(a.to_str().unwrap()).unwrap())
        .header(
            "authorization",
            Secret::from_template(&format!("Bearer ${{file:{}}}", b.display())).unwrap(),
        );
    let proxy = keyhole::Proxy::builder()
        .ca_pem(upstream.ca_pem.clone())
        .route(route)
        .start()
        .await
        .unwrap();
    let carried = |i: usize| {
        let r = &upstream.received()[i];
        (
            r.header("x-api-key").unwrap(),
            r.header("authorization").unwrap(),
        )
    };
    request(proxy.local_addr(), &get("/")).await.unwrap();
    assert_eq!(carried(0), ("key-a1".into(), "Bearer key-b1".into()));
    std::fs::write(&a, "key-a2 \r\n").unwrap();
    std::fs::write(&b, "key-b2").unwrap();
    proxy.reload().unwrap();
    request(proxy.local_addr(), &get("/")).await.unwrap();
    assert_eq!(carried(1), ("key-a2".into(), "Bearer key-b2".into()));
    // One unreadable file: nothing changes, and the error names the file.
    std::fs::write(&a, "key-a3").unwrap();
    std::fs::remove_file(&b).unwrap();
    let err = proxy.reload().unwrap_err().to_string();
    assert!(
        err.contains(b.to_str().unwrap()) && !err.contains("key-"),
        "{err}"
    );
    request(proxy.local_addr(), &get("/")).await.unwrap();
    assert_eq!(carried(2), ("key-a2".into(), "Bearer key-b2".into()));
    // A control byte in a file is refused the same way.
    std::fs::write(&b, "key\u{7}b").unwrap();
    assert!(proxy.reload().is_err());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(Secret::from_file("/nonexistent/keyhole-secret").is_err());
}

#[tokio::test]
async fn clients_file_is_read_at_start_and_on_reload_revoking_removed_clients() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let path = std::env::temp_dir().join(format!("keyhole-clients-{}", std::process::id()));
    std::fs::write(&path, "# sandboxes\n\nbox-1 key-one\nbox-2\t key two \n").unwrap();
    let file = path.to_str().unwrap().to_owned();
    let proxy = keyhole(&upstream, |b| {
        b.clients_file(&file).client("lib", Secret::new("key-lib"))
    })
    .await;
    let addr = proxy.local_addr();
    let check =
        |key: &'static str| async move { request(addr, &with_key(key, "/")).await.unwrap().status };
    assert_eq!(check("key-one").await, 200);
    assert_eq!(check("key two").await, 200);
    assert_eq!(check("key-lib").await, 200);
    std::fs::write(&path, "box-2 key two\nbox-3 key-three\n").unwrap();
    proxy.reload().unwrap();
    assert_eq!(check("key-one").await, 401);
    assert_eq!(check("key two").await, 200);
    assert_eq!(check("key-three").await, 200);
    assert_eq!(check("key-lib").await, 200);
    // Malformed: nothing changes, the error names file and line, never a key.
    std::fs::write(&path, "box-4 key-four\nbox-5\n").unwrap();
    let err = proxy.reload().unwrap_err().to_string();
    assert!(
        err.contains(&file) && err.contains("line 2") && !err.contains("key-"),
        "{err}"
    );
    assert_eq!(check("key-three").await, 200);
    assert_eq!(check("key-four").await, 401);
    // A key that another client already has is refused too.
    std::fs::write(&path, "box-6 key-lib\n").unwrap();
    assert!(proxy.reload().is_err());
    assert_eq!(check("key-three").await, 200);
    std::fs::write(&path, "box-1 same\nbox-2 same\n").unwrap();
    let err = keyhole::Proxy::builder()
        .route(Route::new("/", &upstream.url("")).unwrap())
        .clients_file(&file)
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 2") && !err.contains("same"), "{err}");
    let _ = std::fs::remove_file(&path);
}
