//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`)
//! through the same invariant checks the fuzz targets run, so a regression
//! seed fails the ordinary `cargo test` on stable even where no fuzzer runs.

#[allow(unreachable_pub, dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;
#[allow(unreachable_pub, dead_code)]
#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// The files of one target's corpus, sorted; the directory must exist and
/// hold seeds, so a renamed target cannot silently replay nothing.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no seeds", dir.display());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read seed");
            (p, bytes)
        })
        .collect()
}

/// Runs `check` on every seed, naming the seed that fails.
fn replay(target: &str, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let mut failed = Vec::new();
    let files = corpus(target);
    for (path, bytes) in &files {
        if std::panic::catch_unwind(|| check(bytes)).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} seeds fail: {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn every_corpus_dir_is_replayed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fuzz/corpus")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names, REPLAYED,
        "a corpus dir without a replay test (or the reverse)"
    );
}

const REPLAYED: [&str; 8] = [
    "chunked_body",
    "connect_response",
    "connection",
    "json_escape",
    "request_head",
    "response_head",
    "route_rewrite",
    "usage_scan",
];

#[test]
fn request_head_corpus() {
    replay("request_head", checks::request_head);
}

#[test]
fn chunked_body_corpus() {
    replay("chunked_body", |data| {
        for splits in checks::replay_splits(data) {
            checks::chunked_body(data, &splits);
        }
    });
}

#[test]
fn connect_response_corpus() {
    replay("connect_response", |data| {
        for splits in checks::replay_splits(data) {
            checks::connect_response(data, &splits);
        }
    });
}

#[test]
fn response_head_corpus() {
    replay("response_head", checks::response_head);
}

#[test]
fn route_rewrite_corpus() {
    replay("route_rewrite", checks::route_rewrite);
}

#[test]
fn json_escape_corpus() {
    replay("json_escape", checks::json_escape);
}

#[test]
fn usage_scan_corpus() {
    replay("usage_scan", |data| {
        for splits in checks::replay_splits(data.get(1..).unwrap_or_default()) {
            checks::usage_scan(data, &splits);
        }
    });
}

/// `usage_scan` seed names end in `-in{N}-out{M}`: the tokens in and out
/// the body reports, so each real-shaped response states its answer.
#[test]
fn usage_seed_names_match_counts() {
    let mut wrong = Vec::new();
    for (path, bytes) in corpus("usage_scan") {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some((rest, out)) = name.rsplit_once("-out") else {
            wrong.push(format!("{name}: no -out"));
            continue;
        };
        let Some((_, tokens_in)) = rest.rsplit_once("-in") else {
            wrong.push(format!("{name}: no -in"));
            continue;
        };
        let content_type: &[u8] = if bytes[0] & 1 == 1 {
            b"text/event-stream"
        } else {
            b"application/json"
        };
        let got = keyhole::fuzzing::scan_usage(content_type, &[&bytes[1..]]).expect("scanned");
        let (got_in, got_out) = (got.tokens_in(), got.tokens_out());
        if (got_in.to_string(), got_out.to_string()) != (tokens_in.into(), out.into()) {
            wrong.push(format!("{name}: in {got_in} out {got_out}"));
        }
    }
    assert!(wrong.is_empty(), "seeds whose name lies: {wrong:#?}");
}

#[test]
fn connection_corpus() {
    replay("connection", |data| {
        checks::connection(data, &[]);
        checks::connection(data, &checks::derived_splits(data));
        checks::connection(data, &(0..=data.len()).collect::<Vec<_>>());
    });
}

/// Seed names say what keyhole must do with them: `valid-*` is accepted,
/// `reject-*` and `smuggle-*` are refused. This keeps the corpus honest and
/// proves the replay reaches both the accepting and the refusing paths.
#[test]
fn seed_names_match_verdicts() {
    use keyhole::fuzzing;
    type Accepts = fn(&[u8]) -> bool;
    let verdicts: [(&str, Accepts); 5] = [
        (
            "request_head",
            |d| matches!(fuzzing::scan_head(d), Ok(Some(n)) if fuzzing::forward_request(&d[..n]).is_ok()),
        ),
        ("chunked_body", |d| fuzzing::decode_chunked(&[d]).is_ok()),
        ("response_head", |d| {
            fuzzing::relay_response(d, false).is_ok()
        }),
        ("route_rewrite", |d| {
            std::str::from_utf8(d).is_ok_and(|t| checks::route_target(t).is_ok())
        }),
        ("connect_response", |d| {
            matches!(fuzzing::connect_answer(d), Ok(Some(_)))
        }),
    ];
    let mut wrong = Vec::new();
    for (target, accepted) in verdicts {
        for (path, bytes) in corpus(target) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let want = if name.starts_with("valid-") {
                true
            } else if name.starts_with("reject-") || name.starts_with("smuggle-") {
                false
            } else {
                continue;
            };
            if accepted(&bytes) != want {
                wrong.push(format!("{target}/{name}"));
            }
        }
    }
    for (path, bytes) in corpus("connection") {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("valid-") && harness::run_connection(&[&bytes]).upstream_requests == 0 {
            wrong.push(format!("connection/{name}"));
        }
    }
    assert!(wrong.is_empty(), "seeds whose name lies: {wrong:#?}");
}

/// The harness itself: pipelined requests reach the in-memory upstream, a
/// smuggling attempt stops the connection.
#[test]
fn connection_runs_pipelined_requests_and_stops_at_rejection() {
    let stream = b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /openai/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nGET /c HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let report = harness::run_connection(&[&stream[..10], &stream[10..]]);
    assert!(!report.hung);
    assert_eq!(report.upstream_requests, 2);
    let out = String::from_utf8_lossy(&report.client_output);
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(
        out.ends_with("both Content-Length and Transfer-Encoding\n"),
        "{out}"
    );
    let all: Vec<u8> = report.upstream_streams.concat();
    let all = String::from_utf8_lossy(&all);
    assert!(all.contains("GET /base/a HTTP/1.1\r\nhost: upstream.example\r\nx-api-key: FUZZ-INJECTED-KEY\r\n\r\n"), "{all}");
    assert!(all.contains("POST /v1/x HTTP/1.1\r\nhost: api.example\r\nauthorization: Bearer FUZZ-INJECTED-KEY\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{all}");
    assert!(!all.contains("/c"));
}
