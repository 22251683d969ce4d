//! The transcript of one scenario run ([`Rec`]): every answer each side gave, as text, with
//! the fields that legitimately differ between two etcd clusters normalised away.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

/// A shared, append-only transcript of one scenario run. Clone freely (one Arc inside).
#[derive(Clone, Default)]
pub struct Rec {
    entries: Arc<Mutex<Vec<String>>>,
}

impl Rec {
    pub fn new() -> Rec {
        Rec::default()
    }

    /// Records a value (pretty Debug, normalised).
    pub fn push<T: Debug + ?Sized>(&self, label: &str, v: &T) {
        let s = normalize(&format!("{label}: {v:#?}"));
        self.entries.lock().unwrap().push(s);
    }

    /// Records a free-form note.
    pub fn note(&self, s: impl Into<String>) {
        self.entries.lock().unwrap().push(s.into());
    }

    /// Records a gRPC unary result (the message, or the status code and message).
    pub fn res<T: Debug>(
        &self,
        label: &str,
        r: Result<tonic::Response<T>, tonic::Status>,
    ) -> Option<T> {
        match r {
            Ok(resp) => {
                let m = resp.into_inner();
                self.push(label, &m);
                Some(m)
            }
            Err(s) => {
                self.note(format!("{label}: {}", status_str(&s)));
                None
            }
        }
    }

    /// A snapshot of the entries so far.
    pub fn lines(&self) -> Vec<String> {
        self.entries.lock().unwrap().clone()
    }

    /// The whole transcript as one string.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    /// Number of occurrences of `needle` in the transcript.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.text().contains(needle)
    }
}

/// `ERR code=... message="..."` for a status.
pub fn status_str(s: &tonic::Status) -> String {
    format!("ERR code={:?} message={:?}", s.code(), s.message())
}

/// Replaces the values that differ between two fresh single-member clusters, and folds the
/// pretty-printed `header: Some(ResponseHeader {..})` block into one line
/// (`header: Some(ResponseHeader { revision: N, <ids normalised> })`).
pub fn normalize(s: &str) -> String {
    let lines: Vec<String> = s.split('\n').map(normalize_line).collect();
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        if l.trim() == "header: Some(" && i + 7 < lines.len() {
            let t: Vec<&str> = lines[i + 1..i + 8].iter().map(|x| x.trim()).collect();
            if t[0] == "ResponseHeader {"
                && t[1] == "cluster_id: <n>,"
                && t[2] == "member_id: <n>,"
                && t[3].starts_with("revision: ")
                && t[4] == "raft_term: <n>,"
                && t[5] == "},"
                && t[6] == "),"
            {
                let indent = &l[..l.len() - l.trim_start().len()];
                let rev = t[3].trim_start_matches("revision: ").trim_end_matches(',');
                out.push(format!(
                    "{indent}header: Some(ResponseHeader {{ revision: {rev}, .. }}),"
                ));
                i += 8;
                continue;
            }
        }
        out.push(l.clone());
        i += 1;
    }
    out.join("\n")
}

fn normalize_line(line: &str) -> String {
    let mut l = line.to_string();
    for field in ["cluster_id: ", "member_id: ", "raft_term: "] {
        let mut from = 0;
        while let Some(pos) = l[from..].find(field) {
            let start = from + pos + field.len();
            let end = l[start..]
                .find(|c: char| !c.is_ascii_digit())
                .map(|e| start + e)
                .unwrap_or(l.len());
            if end > start {
                l.replace_range(start..end, "<n>");
            }
            from = start;
        }
    }
    l
}
