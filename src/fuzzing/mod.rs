//! Entry points for the fuzz targets in `fuzz/` (and the corpus replay test below): each
//! takes arbitrary bytes and drives one of the parsers that read what clients send, checking
//! the properties that must hold for any input. Hidden from the documentation: not an API.
//!
//! | entry | drives |
//! |---|---|
//! | [`http1_head`] | the HTTP/1.x head parser, whole and in pieces; chunk-size lines |
//! | [`gateway_json`] | the gateway's JSON reader and its decoding into etcd's request types |
//! | [`go_base64`] | the Go-compatible base64 decoder, against the `base64` crate |
//! | [`grpc_requests`] | the gRPC request decoders, the Txn depth walk and the shield checks |
//! | [`http1_body`] | the HTTP/1.x connection loop with request bodies (`Content-Length`, chunked) over an in-memory transport, read whole and in pieces ([`body`]) |
//! | [`watch_session`] | a real watch session over an in-memory feed, driven by arbitrary create / cancel / progress / write / compact sequences and checked against a model of etcd's rules ([`watch`]) |

// Both run on tokio's paused clock (`test-util`): built for the tests and the fuzz targets.
#[cfg(any(test, feature = "fuzzing"))]
mod body;
#[cfg(any(test, feature = "fuzzing"))]
mod watch;

#[cfg(any(test, feature = "fuzzing"))]
pub use body::http1_body;
#[cfg(any(test, feature = "fuzzing"))]
pub use watch::watch_session;

use base64::Engine;
use prost::Message;

use crate::proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, TxnRequest, WatchRequest,
};
use crate::serve::shield;
use crate::wire::gateway::{gobase64, json, jsonpb};
use crate::wire::grpc::codec::{go_error, txn_depth, MAX_TXN_DEPTH};

/// The HTTP/1.x head parser: the first byte picks the piece size of the incremental read.
pub fn http1_head(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    crate::wire::http1::fuzz_head(rest, usize::from(first % 64) + 1);
}

/// The gateway's JSON reader, then etcd's request types decoded from the value.
pub fn gateway_json(data: &[u8]) {
    let Ok(value) = json::check_valid(data) else {
        return;
    };
    let _ = jsonpb::decode::<RangeRequest>("etcdserverpb.RangeRequest", &value);
    let _ = jsonpb::decode::<PutRequest>("etcdserverpb.PutRequest", &value);
    let _ = jsonpb::decode::<WatchRequest>("etcdserverpb.WatchRequest", &value);
    if let Ok(txn) = jsonpb::decode::<TxnRequest>("etcdserverpb.TxnRequest", &value) {
        let _ = shield::check_txn(&txn);
    }
}

/// Go's `base64.StdEncoding` as the gateway decodes bytes fields: whatever it accepts, the
/// `base64` crate (allowing trailing bits, as Go's non-strict mode) decodes to the same bytes
/// once Go's ignored `\r` and `\n` are removed.
pub fn go_base64(data: &[u8]) {
    let ours = gobase64::decode(data);
    let stripped: Vec<u8> = data
        .iter()
        .copied()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    if let Ok(bytes) = ours {
        // Go's default (non-strict) decoder ignores non-zero bits after the last byte, which
        // the crate's STANDARD engine refuses (found by this target: `Zm2/FFy=`).
        let go_like = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
        );
        let theirs = go_like.decode(&stripped);
        assert_eq!(theirs.ok(), Some(bytes), "Go-compatible base64 disagrees");
    }
}

/// The gRPC request decoders as the codec runs them, the Txn depth walk, and the shield.
pub fn grpc_requests(data: &[u8]) {
    if let Err(e) = RangeRequest::decode(data).map(|r| shield::check_range(&r)) {
        let _ = go_error(&e);
    }
    let _ = PutRequest::decode(data);
    let _ = DeleteRangeRequest::decode(data);
    let _ = WatchRequest::decode(data);
    let _ = LeaseGrantRequest::decode(data);
    if txn_depth(data) <= MAX_TXN_DEPTH {
        match TxnRequest::decode(data) {
            Ok(txn) => {
                let _ = shield::check_txn(&txn);
                // What decodes re-encodes to something that decodes the same.
                let again = TxnRequest::decode(txn.encode_to_vec().as_slice());
                assert_eq!(again.ok().as_ref(), Some(&txn));
            }
            Err(e) => {
                let _ = go_error(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fuzz entry point.
    type Entry = fn(&[u8]);

    /// The watch session target with a client that stops reading while large values are
    /// written: its session parks (the queue holds more than its byte budget) and, once the
    /// client reads again, every watch gets every event once, in order (the target's model
    /// checks them).
    #[test]
    fn a_paused_client_parks_its_session_and_catches_up() {
        // Auth off; a watch of the whole prefix and one of a single key with `prev_kv`;
        // reading paused; four transactions of three 96 KiB values each; reading resumed
        // (by the end of the input).
        let mut input = vec![0u8, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 9];
        for _ in 0..4 {
            input.extend_from_slice(&[8, 2, 3, 7, 11]);
        }
        let parks = crate::metrics::SESSION_PARKS.get();
        watch_session(&input);
        assert!(
            crate::metrics::SESSION_PARKS.get() > parks,
            "the session never parked"
        );
    }

    /// Every input kept in `fuzz/corpus/<target>/` replays through its entry point.
    #[test]
    fn corpus_replays() {
        let targets: [(&str, Entry); 6] = [
            ("http1_head", http1_head),
            ("http1_body", http1_body),
            ("watch_session", watch_session),
            ("gateway_json", gateway_json),
            ("go_base64", go_base64),
            ("grpc_requests", grpc_requests),
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, run) in targets {
            let dir = root.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
            let entries: Vec<_> = entries.flatten().collect();
            assert!(!entries.is_empty(), "empty corpus {}", dir.display());
            // `ETCD_FANOUT_FUZZ_ONLY=<part of a file name>`: replay only the inputs it names.
            let only = std::env::var("ETCD_FANOUT_FUZZ_ONLY").unwrap_or_default();
            for entry in entries {
                if !entry.file_name().to_string_lossy().contains(only.as_str()) {
                    continue;
                }
                if let Ok(data) = std::fs::read(entry.path()) {
                    // Names the input of a failure (the last line printed).
                    eprintln!("replaying {}", entry.path().display());
                    run(&data);
                }
            }
        }
    }
}
