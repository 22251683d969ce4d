//! HTTP/1.x wire behaviour of the gateway against etcd's (Go's `net/http`): keep-alive,
//! pipelining, chunked request bodies, `Expect: 100-continue`, HTTP/1.0, and malformed requests.
//! The same raw bytes go to a real etcd and to the proxy in front of its own fresh etcd; every
//! answer on the connection is parsed and compared (status, the headers that matter, body),
//! with `Date` and cluster identity masked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testkit::gateway::{b64, mask, IDENTITY};
use testkit::{Etcd, Proxy};

/// Sends `raw` in the given pieces (with a pause between them) and reads until the server
/// closes the connection or `quiet` passes without a byte.
fn exchange(port: u16, pieces: &[&[u8]], quiet: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_millis(100))).ok();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    for p in pieces {
        s.write_all(p).expect("write");
        // Read what is answered before the next piece (100 Continue, earlier answers).
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            match s.read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
    }
    let mut last = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while last.elapsed() < quiet && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                last = Instant::now();
            }
            Err(_) => {}
        }
    }
    out.extend_from_slice(b"<connection left open>");
    out
}

/// The answers in `raw`, one comparable text each: status line, sorted headers that matter,
/// framing, de-chunked body with identity masked.
fn answers(raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        if rest == b"<connection left open>" {
            out.push("<connection left open>".into());
            break;
        }
        let Some(end) = find(rest, b"\r\n\r\n") else {
            out.push(format!("<unparsed {:?}>", String::from_utf8_lossy(rest)));
            break;
        };
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or_default().to_string();
        let mut headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .filter(|(k, _)| k != "date")
            .collect();
        headers.sort();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let mut text = format!("{status}\n");
        for (k, v) in &headers {
            // The length depends on the masked ids' digits.
            let v = if k == "content-length" { "<n>" } else { v };
            text.push_str(&format!("{k}: {v}\n"));
        }
        let body: Vec<u8>;
        if status.contains(" 100 ") || status.contains(" 204 ") || status.contains(" 304 ") {
            body = Vec::new();
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            let n = n.min(rest.len());
            body = rest[..n].to_vec();
            rest = &rest[n..];
        } else if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut b = Vec::new();
            loop {
                let Some(le) = find(rest, b"\r\n") else {
                    rest = &[];
                    break;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&rest[..le])
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .unwrap_or(0);
                rest = &rest[le + 2..];
                if size == 0 {
                    // Trailers up to an empty line.
                    let te = find(rest, b"\r\n").unwrap_or(0);
                    let trailer_end = if te == 0 {
                        2
                    } else {
                        find(rest, b"\r\n\r\n").map(|i| i + 4).unwrap_or(rest.len())
                    };
                    let trailers = String::from_utf8_lossy(&rest[..trailer_end.min(rest.len())]);
                    text.push_str(&format!(
                        "trailers: {:?}\n",
                        trailers.trim().to_ascii_lowercase()
                    ));
                    rest = &rest[trailer_end.min(rest.len())..];
                    break;
                }
                let n = size.min(rest.len());
                b.extend_from_slice(&rest[..n]);
                rest = &rest[(n + 2).min(rest.len())..];
            }
            body = b;
        } else {
            // Delimited by the connection's end.
            let cut = find(rest, b"<connection left open>").unwrap_or(rest.len());
            body = rest[..cut].to_vec();
            rest = &rest[cut..];
        }
        text.push_str(&mask(&String::from_utf8_lossy(&body), IDENTITY));
        out.push(text);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn post(path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn http1_wire_matches_etcd() {
    let a = Etcd::start_with(&[]);
    let b = Etcd::start_with(&[]);
    let proxy = Proxy::start(&b.url, &["/apisix/"]);
    let put = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        b64("/apisix/routes/1"),
        b64("v1")
    );
    let range = format!(r#"{{"key":"{}"}}"#, b64("/apisix/routes/1"));
    let chunked_range = {
        let (x, y) = range.split_at(5);
        format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{x}\r\n{:x};ext=1\r\n{y}\r\n0\r\nX-Trailer: 1\r\n\r\n",
            x.len(),
            y.len()
        )
    };
    let quiet = Duration::from_millis(1500);
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("put", vec![post("/v3/kv/put", &put, "Connection: close\r\n")]),
        (
            "keep-alive: two requests, one after the other",
            vec![
                post("/v3/kv/range", &range, ""),
                post("/v3/kv/range", &range, "Connection: close\r\n"),
            ],
        ),
        ("pipelined: two requests in one write", {
            let mut both = post("/v3/kv/range", &range, "");
            both.extend(post("/v3/kv/range", &range, "Connection: close\r\n"));
            vec![both]
        }),
        ("chunked request body with a trailer", vec![chunked_range.into_bytes()]),
        ("request split in small pieces", {
            let whole = post("/v3/kv/range", &range, "Connection: close\r\n");
            whole.chunks(7).map(|c| c.to_vec()).collect()
        }),
        ("expect 100-continue", {
            let head = format!(
                "POST /v3/kv/range HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                range.len()
            );
            vec![head.into_bytes(), range.clone().into_bytes()]
        }),
        ("HTTP/1.0", vec![format!(
            "POST /v3/kv/range HTTP/1.0\r\nContent-Length: {}\r\n\r\n{range}",
            range.len()
        )
        .into_bytes()]),
        ("HTTP/1.0 keep-alive", vec![format!(
            "POST /v3/kv/range HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{range}",
            range.len()
        )
        .into_bytes()]),
        ("garbage request line", vec![b"HELLO\r\n\r\n".to_vec()]),
        ("no Host header", vec![b"GET /version HTTP/1.1\r\n\r\n".to_vec()]),
        ("two Host headers", vec![b"GET /version HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()]),
        ("bad header name", vec![
            b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        ]),
        // Found by fuzzing (`http1_body`): Go answers a malformed header line as soon as it
        // is complete, not when the head ends (here it never does: the client waits).
        ("bad header line, head not ended", vec![
            b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\n{}\r\nX-More: 1\r\n".to_vec(),
        ]),
        ("bad content-length", vec![
            b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}".to_vec(),
        ]),
        ("unknown transfer-encoding", vec![
            b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
        ]),
        ("malformed chunk size", vec![
            b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        ]),
        ("chunked body with bare LF after the data", vec![format!(
            "POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\n{range}\n0\n\n",
            range.len()
        )
        .into_bytes()]),
        ("head with bare-LF lines", vec![format!(
            "POST /v3/kv/range HTTP/1.1\nHost: x\nConnection: close\nContent-Length: {}\n\n{range}",
            range.len()
        )
        .into_bytes()]),
        ("HEAD", vec![b"HEAD /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()]),
        ("client closes without a request", vec![]),
    ];
    let mut failures = Vec::new();
    for (name, pieces) in &cases {
        let pieces: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
        let want = answers(&exchange(a.port, &pieces, quiet));
        let got = answers(&exchange(proxy.port, &pieces, quiet));
        if want != got {
            failures.push(format!("{name}:\n  etcd:  {want:?}\n  proxy: {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A declared body over the proxy's 32 MiB limit is refused without being read (etcd would
/// read it whole, then refuse it with the same error), and the connection is closed.
#[test]
fn oversized_declared_body_is_refused_unread() {
    let b = Etcd::start_with(&[]);
    let proxy = Proxy::start(&b.url, &["/apisix/"]);
    let head = b"POST /v3/kv/put HTTP/1.1\r\nHost: x\r\nContent-Length: 40000000\r\n\r\n{\"key\":";
    let raw = exchange(proxy.port, &[head], Duration::from_secs(5));
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
    assert!(
        text.contains("grpc: received message larger than max"),
        "{text}"
    );
    assert!(text.contains("Connection: close"), "{text}");
    assert!(!text.contains("<connection left open>"), "{text}");
}
