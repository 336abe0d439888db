//! Spend controls per client: concurrency, request rate and model-token
//! budgets, over real sockets against a TLS upstream that reports usage the
//! way the Anthropic and `OpenAI` APIs do, split across writes and chunks.

mod support;

use std::time::Duration;

use keyhole::{ClientLimits, ProxyHandle};
use support::*;

fn with_key(key: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /v1/messages HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n{extra}content-length: 2\r\n\r\n{{}}"
    )
    .into_bytes()
}

fn tokens(per_hour: u64) -> ClientLimits {
    ClientLimits {
        max_tokens_per_hour: Some(per_hour),
        ..ClientLimits::default()
    }
}

/// A JSON response of the Messages API reporting these tokens, with a
/// decoy `usage` inside a string that must not count.
fn anthropic_json(input: u64, output: u64) -> Reply {
    let body = format!(
        r#"{{"id":"msg_1","type":"message","content":[{{"type":"text","text":"\"usage\":{{\"input_tokens\":999}}"}}],"usage":{{"input_tokens":{input},"cache_read_input_tokens":0,"output_tokens":{output}}}}}"#
    );
    Reply::Bytes(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// An Anthropic stream (chunked SSE) reporting 25 tokens in and, across
/// `message_start` (1) and `message_delta` (15), 15 out; the pieces split
/// a field name, a number and an event, in writes and in chunks.
fn anthropic_stream() -> Reply {
    let events = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let cuts = [
        events.find("input_tok").unwrap() + 5,
        events.find(":25").unwrap() + 2,
        events.find("\n\nevent: content").unwrap() + 1,
        events.find("output_tokens\":15").unwrap() + 16,
    ];
    let mut chunks = Vec::new();
    let mut at = 0;
    for cut in cuts {
        chunks.push(&events.as_bytes()[at..cut]);
        at = cut;
    }
    chunks.push(&events.as_bytes()[at..]);
    let mut pieces = vec![(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
    )];
    for chunk in chunks {
        // Each chunk's framing in one write, its data split in two writes.
        let (a, b) = chunk.split_at(chunk.len() / 2);
        pieces.push((
            Duration::from_millis(5),
            format!("{:x}\r\n", chunk.len()).into_bytes(),
        ));
        pieces.push((Duration::from_millis(5), a.to_vec()));
        pieces.push((Duration::from_millis(5), [b, b"\r\n"].concat()));
    }
    pieces.push((Duration::from_millis(5), b"0\r\n\r\n".to_vec()));
    Reply::Pieces(pieces)
}

/// `OpenAI` shapes: a chat completion, or a stream whose last chunk carries
/// the usage (`stream_options.include_usage`).
fn openai(stream: bool) -> Reply {
    if !stream {
        let body = r#"{"id":"c","object":"chat.completion","usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":4}}}"#;
        return Reply::Bytes(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
    }
    let body = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\ndata: [DONE]\n\n";
    let (a, b) = body.split_at(body.find("tion_tokens").unwrap());
    Reply::Pieces(vec![
        (
            Duration::ZERO,
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{a}",
                body.len()
            )
            .into_bytes(),
        ),
        (Duration::from_millis(20), b.as_bytes().to_vec()),
    ])
}

async fn send(proxy: &ProxyHandle, key: &str) -> Response {
    request(proxy.local_addr(), &with_key(key, ""))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_request_after_the_one_that_crossed_the_token_budget_is_refused() {
    let upstream = Upstream::start(|_| anthropic_json(50, 10)).await;
    let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
    let a = proxy.add_client_with("a", tokens(100)).unwrap();
    let b = proxy.add_client_with("b", tokens(100)).unwrap();
    let a = a.expose_secret().to_owned();
    // 100 → 40 → -20: the second crosses the line and still completes.
    for _ in 0..2 {
        let res = send(&proxy, &a).await;
        assert_eq!(res.status, 200);
        assert!(res.text().ends_with("}}"), "the whole body arrived");
    }
    let refused = send(&proxy, &a).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("keyhole-error").as_deref(), Some("tokens"));
    // -20 tokens at 100 an hour: back above zero in 721 s.
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((720..=721).contains(&retry), "retry-after {retry}");
    assert_eq!(upstream.received().len(), 2, "nothing of it went upstream");
    // Another client's budget is its own.
    assert_eq!(send(&proxy, b.expose_secret()).await.status, 200);
    let usage = proxy.usage("a").unwrap();
    assert_eq!((usage.tokens_in, usage.tokens_out), (100, 20));
    assert_eq!((usage.requests, usage.in_flight), (2, 0));
    assert_eq!(usage.bytes_in, 4);
    assert!(proxy.usage("nobody").is_none());
}

#[tokio::test]
async fn streamed_usage_split_across_writes_and_chunks_counts_the_largest_value() {
    let upstream = Upstream::start(|_| anthropic_stream()).await;
    let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
    let a = proxy.add_client_with("a", tokens(39)).unwrap();
    let res = send(&proxy, a.expose_secret()).await;
    assert_eq!(res.status, 200);
    assert!(res.text().contains("message_stop"));
    // 25 in; out is the largest of 1 and 15, not their sum.
    let usage = proxy.usage("a").unwrap();
    assert_eq!((usage.tokens_in, usage.tokens_out), (25, 15));
    // 39 - 40 = -1: below zero, so the next request is refused.
    let refused = send(&proxy, a.expose_secret()).await;
    assert_eq!(refused.header("keyhole-error").as_deref(), Some("tokens"));
    assert_eq!(upstream.received().len(), 1);
}

#[tokio::test]
async fn openai_completions_and_streams_are_counted() {
    for (stream, expected) in [(false, (9, 12)), (true, (7, 2))] {
        let upstream = Upstream::start(move |_| openai(stream)).await;
        let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
        let a = proxy.add_client_with("a", tokens(1000)).unwrap();
        for _ in 0..2 {
            assert_eq!(send(&proxy, a.expose_secret()).await.status, 200);
        }
        let usage = proxy.usage("a").unwrap();
        let doubled = (expected.0 * 2, expected.1 * 2);
        assert_eq!(
            (usage.tokens_in, usage.tokens_out),
            doubled,
            "stream {stream}"
        );
    }
}

#[tokio::test]
async fn accept_encoding_is_identity_only_while_token_budgets_are_on() {
    let upstream = Upstream::start(|_| anthropic_json(1, 1)).await;
    let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
    let counted = proxy.add_client_with("counted", tokens(1000)).unwrap();
    let plain = proxy.add_client("plain").unwrap();
    let gzip = "accept-encoding: gzip, br\r\n";
    for (key, extra) in [
        (&counted, gzip),
        (&counted, ""),
        (&plain, gzip),
        (&plain, ""),
    ] {
        let res = request(proxy.local_addr(), &with_key(key.expose_secret(), extra)).await;
        assert_eq!(res.unwrap().status, 200);
    }
    let seen: Vec<Vec<String>> = (upstream.received().iter())
        .map(|r| r.header_values("accept-encoding"))
        .collect();
    assert_eq!(
        seen,
        vec![
            vec!["identity".to_owned()],
            vec!["identity".to_owned()],
            vec!["gzip, br".to_owned()],
            vec![],
        ]
    );
}

#[tokio::test]
async fn concurrency_is_limited_per_client_and_freed_however_a_request_ends() {
    // The first request on each upstream connection is answered slowly.
    let upstream = Upstream::start(|req| {
        if req.target.contains("slow") {
            Reply::Pieces(vec![
                (
                    Duration::from_millis(800),
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n".to_vec(),
                ),
                (Duration::ZERO, b"slow".to_vec()),
            ])
        } else {
            ok("fast")
        }
    })
    .await;
    let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
    let one = ClientLimits {
        max_concurrent: Some(1),
        ..ClientLimits::default()
    };
    let a = proxy
        .add_client_with("a", one)
        .unwrap()
        .expose_secret()
        .to_owned();
    let b = proxy
        .add_client_with("b", one)
        .unwrap()
        .expose_secret()
        .to_owned();
    let slow = |key: &str| {
        format!("GET /slow HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\n\r\n").into_bytes()
    };
    let mut held = Client::connect(proxy.local_addr()).await;
    held.send(&slow(&a)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.usage("a").unwrap().in_flight, 1);
    let refused = send(&proxy, &a).await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.header("keyhole-error").as_deref(),
        Some("concurrency")
    );
    assert_eq!(refused.header("retry-after").as_deref(), Some("1"));
    // b has its own slot.
    assert_eq!(send(&proxy, &b).await.status, 200);
    assert_eq!(held.response(false).await.unwrap().text(), "slow");
    assert_eq!(send(&proxy, &a).await.status, 200);
    // A client that hangs up mid-request frees its slot too.
    let mut gone = Client::connect(proxy.local_addr()).await;
    gone.send(&slow(&a)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(gone);
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if proxy.usage("a").unwrap().in_flight == 0 {
            freed = true;
            break;
        }
    }
    assert!(freed, "the slot of a client that went away was freed");
    assert_eq!(send(&proxy, &a).await.status, 200);
}

#[tokio::test]
async fn request_rate_is_limited_per_client_and_refusals_cost_nothing() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let proxy = keyhole(&upstream, keyhole::Builder::require_client_key).await;
    let two = ClientLimits {
        max_requests_per_minute: Some(2),
        ..ClientLimits::default()
    };
    let a = proxy
        .add_client_with("a", two)
        .unwrap()
        .expose_secret()
        .to_owned();
    let b = proxy
        .add_client_with("b", two)
        .unwrap()
        .expose_secret()
        .to_owned();
    assert_eq!(send(&proxy, &a).await.status, 200);
    assert_eq!(send(&proxy, &a).await.status, 200);
    for _ in 0..3 {
        let refused = send(&proxy, &a).await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.header("keyhole-error").as_deref(), Some("rate"));
        // One request comes back every 30 s.
        let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!((29..=30).contains(&retry), "retry-after {retry}");
    }
    assert_eq!(send(&proxy, &b).await.status, 200);
    assert_eq!(upstream.received().len(), 3);
    assert_eq!(proxy.usage("a").unwrap().requests, 2);
}

#[tokio::test]
async fn without_client_keys_all_requests_share_one_budget() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let proxy = keyhole(&upstream, |b| {
        b.client_limits(ClientLimits {
            max_requests_per_minute: Some(1),
            ..ClientLimits::default()
        })
    })
    .await;
    assert_eq!(send(&proxy, "anything").await.status, 200);
    let refused = send(&proxy, "something-else").await;
    assert_eq!(refused.header("keyhole-error").as_deref(), Some("rate"));
    assert_eq!(proxy.usage("-").unwrap().requests, 1);
}

#[tokio::test]
async fn zero_limits_are_refused_at_start() {
    let upstream = Upstream::start(|_| ok("in")).await;
    let zero = ClientLimits {
        max_concurrent: Some(0),
        ..ClientLimits::default()
    };
    let started = builder_for(&upstream)
        .route(route_to(&upstream, "/", ""))
        .client_limits(zero)
        .start()
        .await;
    assert!(started.is_err());
    let proxy = keyhole(&upstream, |b| b).await;
    assert!(proxy.add_client_with("a", zero).is_err());
}
