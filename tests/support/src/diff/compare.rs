//! Comparing two transcripts: equal, or a panic with a readable diff (entry by entry, and line
//! by line inside a changed entry) computed with the `similar` crate, the transcripts written
//! to files and the target's log tail.

use std::time::{Duration, Instant};

use similar::{capture_diff_slices_deadline, group_diff_ops, Algorithm, ChangeTag, DiffOp};

use super::selfcheck;

/// How long one diff may search for a minimal edit script before settling for a longer one
/// (transcripts can be long; a failure message must come quickly).
const DIFF_DEADLINE: Duration = Duration::from_secs(5);

/// A unified-style diff of two line sequences, with `ctx` lines of context around each hunk.
/// Returns None when equal.
fn line_diff(a: &[String], b: &[String], ctx: usize) -> Option<String> {
    if a == b {
        return None;
    }
    let deadline = Instant::now() + DIFF_DEADLINE;
    let ops = capture_diff_slices_deadline(Algorithm::Myers, a, b, Some(deadline));
    let mut out = String::new();
    for hunk in group_diff_ops(ops, ctx) {
        let Some(first) = hunk.first() else {
            continue;
        };
        out.push_str(&format!(
            "@@ reference line {}, target line {} @@\n",
            first.old_range().start + 1,
            first.new_range().start + 1
        ));
        for op in &hunk {
            for change in op.iter_changes(a, b) {
                out.push(match change.tag() {
                    ChangeTag::Equal => ' ',
                    ChangeTag::Delete => '-',
                    ChangeTag::Insert => '+',
                });
                out.push(' ');
                out.push_str(&change.value());
                out.push('\n');
            }
        }
    }
    Some(out)
}

/// Diff at entry granularity (whole entries compared); replaced entries are shown as a line
/// diff of the pair, extra entries in full; one entry label of context around each hunk.
fn entry_diff(a: &[String], b: &[String]) -> String {
    let deadline = Instant::now() + DIFF_DEADLINE;
    let ops = capture_diff_slices_deadline(Algorithm::Myers, a, b, Some(deadline));
    let is_equal = |op: &DiffOp| matches!(op, DiffOp::Equal { .. });
    let first_line = |s: &str| s.lines().next().unwrap_or("").to_string();
    let mut out = String::new();
    let mut k = 0;
    let mut hunks = 0;
    while k < ops.len() {
        if is_equal(&ops[k]) {
            k += 1;
            continue;
        }
        hunks += 1;
        if hunks > 30 {
            out.push_str("... (more differences, see the transcript files)\n");
            break;
        }
        let start = k;
        while k < ops.len() && !is_equal(&ops[k]) {
            k += 1;
        }
        let (ai, bi) = (ops[start].old_range().start, ops[start].new_range().start);
        out.push_str(&format!(
            "@@ entry #{ai} of reference, #{bi} of target @@\n"
        ));
        if let Some(before) = ai.checked_sub(1) {
            out.push_str(&format!("  {}  [...]\n", first_line(&a[before])));
        }
        let dels: Vec<usize> = ops[start..k].iter().flat_map(|o| o.old_range()).collect();
        let adds: Vec<usize> = ops[start..k].iter().flat_map(|o| o.new_range()).collect();
        let pairs = dels.len().min(adds.len());
        for p in 0..pairs {
            let al: Vec<String> = a[dels[p]].split('\n').map(str::to_string).collect();
            let bl: Vec<String> = b[adds[p]].split('\n').map(str::to_string).collect();
            out.push_str(&format!("~ entry changed: {}\n", first_line(&a[dels[p]])));
            if let Some(d) = line_diff(&al, &bl, 4) {
                out.push_str(&d);
            }
        }
        for &d in &dels[pairs..] {
            out.push_str("- (entry only in reference)\n");
            for l in a[d].split('\n') {
                out.push_str(&format!("- {l}\n"));
            }
        }
        for &d in &adds[pairs..] {
            out.push_str("+ (entry only in target)\n");
            for l in b[d].split('\n') {
                out.push_str(&format!("+ {l}\n"));
            }
        }
        if let Some(next) = ops.get(k) {
            out.push_str(&format!(
                "  {}  [...]\n",
                first_line(&a[next.old_range().start])
            ));
        }
    }
    out
}

fn flatten(entries: &[String]) -> Vec<String> {
    entries
        .iter()
        .flat_map(|e| e.split('\n').map(str::to_string))
        .collect()
}

/// Panics with a readable diff when the two transcripts differ.
pub fn assert_same(name: &str, reference: &[String], target: &[String], target_log: &str) {
    assert!(
        !reference.is_empty(),
        "{name}: empty reference transcript (the test asserts nothing)"
    );
    let a = flatten(reference);
    let bl = flatten(target);
    let dir = std::env::temp_dir().join("etcd-fanout-diff");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.reference.txt")), a.join("\n"));
    let _ = std::fs::write(dir.join(format!("{name}.target.txt")), bl.join("\n"));
    if a != bl {
        let d = entry_diff(reference, target);
        let first = reference
            .iter()
            .zip(target.iter())
            .position(|(x, y)| x != y)
            .unwrap_or(reference.len().min(target.len()));
        // the log tail without backtrace frames, panics first
        let is_frame = |l: &str| {
            let t = l.trim_start();
            t.starts_with("at ")
                || (l.starts_with(' ')
                    && t.split(':')
                        .next()
                        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())))
        };
        let useful: Vec<&str> = target_log.lines().filter(|l| !is_frame(l)).collect();
        let panics: Vec<&str> = useful
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked at"))
            .take(3)
            .flat_map(|(i, _)| useful[i..(i + 2).min(useful.len())].iter().copied())
            .collect();
        let mut tail: Vec<&str> = panics;
        tail.push("...");
        tail.extend(
            useful
                .iter()
                .rev()
                .take(25)
                .collect::<Vec<_>>()
                .into_iter()
                .rev(),
        );
        panic!(
            "\n===== {name}: target differs from reference etcd =====\n\
             (- reference etcd, + target{}) first differing entry #{first}: {:?}\n\
             full transcripts: {}/{name}.{{reference,target}}.txt\n\n{d}\n\
             ----- target log tail -----\n{}\n",
            if selfcheck() {
                " = plain etcd (self-check)"
            } else {
                " = etcd-fanout"
            },
            target
                .get(first)
                .or(reference.get(first))
                .map(|s| s.lines().next().unwrap_or("")),
            dir.display(),
            tail.join("\n"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &str) -> Vec<String> {
        s.split('\n').map(str::to_string).collect()
    }

    #[test]
    fn line_diff_shows_changed_lines_with_context() {
        assert_eq!(line_diff(&lines("a\nb"), &lines("a\nb"), 1), None);
        let d = line_diff(&lines("a\nb\nc\nd\ne"), &lines("a\nb\nX\nd\ne"), 1).expect("differs");
        assert_eq!(
            d,
            "@@ reference line 2, target line 2 @@\n  b\n- c\n+ X\n  d\n"
        );
    }

    #[test]
    fn entry_diff_pairs_replaced_entries_and_lists_extra_ones() {
        let a = lines("e0\ne1 x\ne2");
        let b = lines("e0\ne1 y\ne2\ne3");
        let d = entry_diff(&a, &b);
        assert!(
            d.contains("@@ entry #1 of reference, #1 of target @@"),
            "{d}"
        );
        assert!(d.contains("~ entry changed: e1 x\n"), "{d}");
        assert!(d.contains("- e1 x\n+ e1 y\n"), "{d}");
        assert!(d.contains("+ (entry only in target)\n+ e3\n"), "{d}");
    }
}
