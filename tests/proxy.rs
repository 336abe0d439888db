//! End-to-end proxying behaviour against a real TLS upstream.

mod support;

use support::*;

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
    assert_eq!(got[0].header_values("host"), vec![format!("127.0.0.1:{}", upstream.addr.port())]);
    assert_eq!(got[0].header("x-other").as_deref(), Some("kept"));
}
