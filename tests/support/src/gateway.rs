//! The JSON gateway comparisons: the same request to etcd's grpc-gateway and to the proxy,
//! answers rendered comparably (status, the headers that matter, framing, body with the
//! cluster identity masked) and diffed; base64 for the keys and values of the JSON API.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::http::{request, Resp};

/// Standard base64 (with padding) of a string, as the JSON API carries keys and values.
pub fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

/// Decodes standard base64 (test data only: panics on malformed input).
pub fn unb64(s: &str) -> Vec<u8> {
    STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {s:?}"))
}

/// Replaces the string value of every `"name":"..."` in a JSON text with `"<name>"`
/// (identity fields that differ between two clusters).
pub fn mask(text: &str, names: &[&str]) -> String {
    let mut out = text.to_string();
    for name in names {
        let pat = format!("\"{name}\":");
        let mut res = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(&pat) {
            res.push_str(&rest[..i + pat.len()]);
            rest = &rest[i + pat.len()..];
            if let Some(r) = rest.strip_prefix('"') {
                let end = r.find('"').unwrap_or(r.len());
                res.push_str(&format!("\"<{name}>\""));
                rest = &r[(end + 1).min(r.len())..];
            } else if rest.starts_with('[') {
                let end = rest.find(']').unwrap_or(rest.len());
                res.push_str(&format!("[\"<{name}>\"]"));
                rest = &rest[(end + 1).min(rest.len())..];
            } else {
                let end = rest.find([',', '}']).unwrap_or(rest.len());
                res.push_str(&format!("\"<{name}>\""));
                rest = &rest[end..];
            }
        }
        res.push_str(rest);
        out = res;
    }
    out
}

/// Fields that legitimately differ between two etcd clusters.
pub const IDENTITY: &[&str] = &["cluster_id", "member_id", "raft_term"];

/// Headers whose presence and value must match etcd's.
pub const COMPARED_HEADERS: &[&str] = &[
    "content-type",
    "grpc-metadata-content-type",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "x-content-type-options",
    "allow",
    "location",
    "trailer",
];

/// A comparable rendering of an answer: status, compared headers, framing, masked body.
pub fn render(r: &Resp, masked: &[&str]) -> String {
    let mut s = format!("status {}\n", r.status);
    for h in COMPARED_HEADERS {
        if let Some(v) = r.header(h) {
            s.push_str(&format!("{h}: {v}\n"));
        }
    }
    s.push_str(if r.chunked {
        "framing: chunked\n"
    } else {
        "framing: length\n"
    });
    s.push_str(&mask(&r.text(), masked));
    s
}

/// Sends the same request to etcd (`a`) and to the proxy (`b`) and asserts equal answers.
pub fn same(a: u16, b: u16, method: &str, path: &str, body: &str) -> (Resp, Resp) {
    same_with(a, b, method, path, &[], body, IDENTITY)
}

/// [`same`] with extra headers and masked fields.
pub fn same_with(
    a: u16,
    b: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    masked: &[&str],
) -> (Resp, Resp) {
    let ra = request(a, method, path, headers, body.as_bytes())
        .unwrap_or_else(|e| panic!("etcd {method} {path}: {e}"));
    let rb = request(b, method, path, headers, body.as_bytes())
        .unwrap_or_else(|e| panic!("proxy {method} {path}: {e}"));
    let (sa, sb) = (render(&ra, masked), render(&rb, masked));
    if sa != sb {
        let short: String = body.chars().take(300).collect();
        panic!("\n{method} {path} {short}\n{}", first_difference(&sa, &sb));
    }
    (ra, rb)
}

/// Both texts around their first difference (bounded, for readable failures).
pub fn first_difference(a: &str, b: &str) -> String {
    let i = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let cut = |s: &str| -> String {
        let mut from = i.saturating_sub(300).min(s.len());
        while !s.is_char_boundary(from) {
            from -= 1;
        }
        let mut to = (i + 300).min(s.len());
        while !s.is_char_boundary(to) {
            to += 1;
        }
        format!("[{} bytes, from {from}] {}", s.len(), &s[from..to])
    };
    format!("--- etcd ---\n{}\n--- proxy ---\n{}\n", cut(a), cut(b))
}
