//! The markdown report: one table per phase, one row per target, and the ratios.

use std::fmt::Write;
use std::time::SystemTime;

use crate::{Args, Phase, TargetResult};

/// Starts a markdown report table: its title, the run's note (if any), the header row of
/// `columns` and the separator.
pub fn table_head(s: &mut String, title: &str, note: &str, columns: &[&str]) {
    let _ = writeln!(s, "### {title}\n");
    if !note.is_empty() {
        let _ = writeln!(s, "Note: {note}\n");
    }
    let _ = writeln!(s, "| {} |", columns.join(" | "));
    let _ = writeln!(s, "|{}", " --- |".repeat(columns.len()));
}

fn f(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.digits$}")
    }
}

/// A latency figure, or "-" when the phase measured none.
fn lat(count: u64, v: f64) -> String {
    if count == 0 {
        "-".into()
    } else {
        f(v, 2)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| f(v, digits))
}

/// CPU seconds and peak RSS of `who` ("etcd", "proxy", "loadgen") over a phase.
fn cpu(p: &Phase, who: &str) -> Option<f64> {
    p.usage.get(who).map(|u| u.cpu_s)
}

fn rss(p: &Phase, who: &str) -> Option<f64> {
    p.usage.get(who).map(|u| u.peak_rss_mb)
}

/// CPU microseconds of `who` per delivered event over a phase.
fn per_event(p: &Phase, who: &str) -> Option<f64> {
    let c = cpu(p, who)?;
    (p.delivered > 0).then(|| c * 1e6 / p.delivered as f64)
}

fn server_per_event(p: &Phase) -> Option<f64> {
    let c = cpu(p, "etcd")? + cpu(p, "proxy").unwrap_or(0.0);
    (p.delivered > 0).then(|| c * 1e6 / p.delivered as f64)
}

fn unix_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        (s / 60) % 60,
        s % 60
    )
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && !a.is_nan() && !b.is_nan() => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

pub fn render(a: &Args, rs: &[TargetResult], started: SystemTime) -> String {
    let mut o = String::new();
    // Shell-quoted, so the line can be pasted back.
    let argv: Vec<String> = std::env::args()
        .map(|x| {
            if x.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
            {
                x
            } else {
                format!("'{}'", x.replace('\'', "'\\''"))
            }
        })
        .collect();
    let _ = writeln!(o, "## loadgen, {}", unix_date(started));
    let _ = writeln!(o);
    let _ = writeln!(o, "Command: `{}`", argv.join(" "));
    let _ = writeln!(o);
    let streams = rs.iter().map(|r| r.grpc_streams).max().unwrap_or(0);
    let _ = writeln!(
        o,
        "Workload: {} gRPC watchers on {} streams over {} connections, {} HTTP/JSON watchers \
         (reconnect every {} s, resume from {:?}), {} prefix(es), {} puts/s for {} s, values of {} B, \
         history {} writes/prefix{}{}.",
        a.watchers,
        streams,
        a.connections,
        a.http_watchers,
        a.http_reconnect,
        a.http_resume,
        a.prefixes,
        a.rate,
        a.duration,
        a.value_size,
        a.history,
        if a.storm {
            format!(
                ", reconnect storm at {:.0}% replaying {} events",
                a.storm_at * 100.0,
                a.storm_back
            )
        } else {
            String::new()
        },
        if a.cold > 0 {
            format!(
                ", cold start: {} {} ranges of {} keys x {} B ({} concurrent{}, {} client decode)",
                a.cold,
                if a.cold_http { "HTTP/JSON" } else { "gRPC" },
                a.cold_keys,
                a.cold_value_size,
                a.cold_concurrency,
                if a.cold_serializable { ", serializable" } else { ", linearizable" },
                if a.cold_full_decode { "full" } else { "lean" }
            )
        } else {
            String::new()
        }
    );
    let mut shape = Vec::new();
    if let Some(w) = a.apisix_workers {
        shape.push(format!(
            "APISIX 2.x-style: {w} workers, one stream each with one watch per resource directory"
        ));
    }
    if a.single_key {
        shape.push("single-key watchers, each put concerns one watcher".to_string());
    }
    if a.mixed {
        shape.push(format!(
            "mixed shapes (plain, prev_kv, NODELETE, NOPUT+prev_kv), every {}th write a delete",
            a.delete_every
        ));
    }
    shape.push(if a.covering_prefix || a.single_key {
        format!(
            "etcd-fanout configured with the covering prefix {}",
            a.prefix_base
        )
    } else {
        "etcd-fanout configured with each watched prefix".to_string()
    });
    if a.auth {
        shape.push("etcd with auth on, watchers with a reader's token".to_string());
    }
    if a.tls {
        shape.push(
            "TLS everywhere: etcd https with --client-cert-auth, both proxies TLS toward etcd and \
             toward clients, every client with a certificate without CN"
                .to_string(),
        );
    }
    shape.push(if a.stagger_writes {
        "puts evenly spaced (--stagger-writes)".to_string()
    } else {
        "the writers' puts in phase (one put per writer at the same moments)".to_string()
    });
    if a.go_client && a.go_raw {
        shape.push(
            "gRPC watchers run by the Go watcher in raw mode (etcd's etcdserverpb Watch stubs, \
             no clientv3: one grpc.ClientConn and one stream per connection, one receiving \
             goroutine per stream)"
                .to_string(),
        );
    } else if a.go_client {
        shape.push(
            "gRPC watchers run by the Go watcher (etcd clientv3, one client per connection)"
                .to_string(),
        );
    }
    let _ = writeln!(o, "Layout: {}.", shape.join("; "));
    if !a.note.is_empty() {
        let _ = writeln!(o, "Note: {}", a.note);
    }
    let _ = writeln!(o);

    // ---- live fan-out ------------------------------------------------------------------
    let _ = writeln!(
        o,
        "### Watch fan-out ({})",
        if a.storm {
            "live phase, before the storm"
        } else {
            "live phase"
        }
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "| target | watchers created in (s) | writes | events delivered | events/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | etcd watchers | etcd watch streams | proxy CPU s | proxy CPU µs/event | proxy peak RSS MB | etcd CPU s | etcd CPU µs/event | etcd peak RSS MB | loadgen CPU s | correct |"
    );
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rs {
        let l = &r.live;
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            opt(r.create_s, 2),
            r.writes,
            l.delivered,
            f(r.live_events_per_s, 0),
            lat(l.latency.count, l.latency.p50_ms),
            lat(l.latency.count, l.latency.p90_ms),
            lat(l.latency.count, l.latency.p99_ms),
            lat(l.latency.count, l.latency.p999_ms),
            lat(l.latency.count, l.latency.max_ms),
            f(r.etcd_during.watchers, 0),
            f(r.etcd_during.watch_streams, 0),
            opt(cpu(l, "proxy"), 2),
            opt(per_event(l, "proxy"), 2),
            opt(rss(l, "proxy"), 1),
            opt(cpu(l, "etcd"), 2),
            opt(per_event(l, "etcd"), 2),
            opt(rss(l, "etcd"), 1),
            opt(cpu(l, "loadgen"), 2),
            if r.ok { "yes" } else { "**NO**" },
        );
    }
    let _ = writeln!(o);

    // ---- ratios -------------------------------------------------------------------------
    let find = |n: &str| rs.iter().find(|r| r.target == n);
    if let Some(fo) = find("etcd-fanout") {
        let gp = find("grpc-proxy");
        let et = find("etcd");
        type Getter = fn(&TargetResult) -> Option<f64>;
        let rows: Vec<(&str, Getter)> = vec![
            ("p99 fan-out latency (ms)", |r| {
                (r.live.latency.count > 0).then_some(r.live.latency.p99_ms)
            }),
            ("p99.9 fan-out latency (ms)", |r| {
                (r.live.latency.count > 0).then_some(r.live.latency.p999_ms)
            }),
            ("max fan-out latency (ms)", |r| {
                (r.live.latency.count > 0).then_some(r.live.latency.max_ms)
            }),
            ("Go client: p50 at grpc-go's receipt (ms)", |r| {
                r.go_receipt.as_ref().map(|l| l.p50_ms)
            }),
            ("Go client: p99 at grpc-go's receipt (ms)", |r| {
                r.go_receipt.as_ref().map(|l| l.p99_ms)
            }),
            ("Go client: p99.9 at grpc-go's receipt (ms)", |r| {
                r.go_receipt.as_ref().map(|l| l.p999_ms)
            }),
            ("watchers created in (s)", |r| r.create_s),
            ("proxy CPU µs per event", |r| per_event(&r.live, "proxy")),
            ("proxy CPU µs per put", |r| {
                let c = cpu(&r.live, "proxy")?;
                (r.writes > 0).then(|| c * 1e6 / r.writes as f64)
            }),
            ("client CPU s (Go watcher)", |r| cpu(&r.live, "client")),
            ("Go watcher's GOMAXPROCS", |r| r.go_procs.map(|p| p as f64)),
            ("etcd CPU µs per event", |r| per_event(&r.live, "etcd")),
            ("etcd + proxy CPU µs per event", |r| {
                server_per_event(&r.live)
            }),
            ("proxy peak RSS MB (live)", |r| rss(&r.live, "proxy")),
            ("proxy peak RSS MB (create)", |r| rss(&r.create, "proxy")),
            ("etcd watchers with all watchers open", |r| {
                Some(r.etcd_during.watchers)
            }),
            ("events/s delivered", |r| {
                (r.live.delivered > 0).then_some(r.live_events_per_s)
            }),
        ];
        let _ = writeln!(o, "### Ratios");
        let _ = writeln!(o);
        let _ = writeln!(o, "| metric | etcd | grpc-proxy | etcd-fanout | etcd-fanout / grpc-proxy | etcd-fanout / etcd |");
        let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
        for (name, g) in rows {
            let v = |r: Option<&TargetResult>| r.and_then(g);
            let _ = writeln!(
                o,
                "| {name} | {} | {} | {} | {} | {} |",
                opt(v(et), 2),
                opt(v(gp), 2),
                opt(v(Some(fo)), 2),
                ratio(v(Some(fo)), v(gp)),
                ratio(v(Some(fo)), v(et)),
            );
        }
        let _ = writeln!(o);
    }

    // ---- creation -----------------------------------------------------------------------
    let _ = writeln!(o, "### Watcher creation phase");
    let _ = writeln!(o);
    let _ = writeln!(o, "| target | created in (s) | history replayed in (s) | proxy CPU s | proxy peak RSS MB | etcd CPU s | etcd peak RSS MB | etcd Watch streams started | etcd Range requests | etcd requests (all) |");
    let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rs {
        let c = &r.create;
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            opt(r.create_s, 2),
            opt(r.replay_s, 2),
            opt(cpu(c, "proxy"), 2),
            opt(rss(c, "proxy"), 1),
            opt(cpu(c, "etcd"), 2),
            opt(rss(c, "etcd"), 1),
            f(c.etcd_requests.watch, 0),
            f(c.etcd_requests.range, 0),
            f(c.etcd_requests.all, 0),
        );
    }
    let _ = writeln!(o);
    // Memory each open watcher costs the proxy (RSS growth over the creation phase).
    let idle: Vec<String> = rs
        .iter()
        .filter_map(|r| {
            let p = r.create.usage.get("proxy")?;
            let n = r.grpc_watchers + r.http_watchers;
            (n > 0 && r.create_s.is_some()).then(|| {
                format!(
                    "{} {:.0} B ({:.1} -> {:.1} MB)",
                    r.target,
                    (p.end_rss_mb - p.start_rss_mb) * 1024.0 * 1024.0 / n as f64,
                    p.start_rss_mb,
                    p.end_rss_mb
                )
            })
        })
        .collect();
    if !idle.is_empty() {
        let _ = writeln!(
            o,
            "Proxy RSS growth per open watcher over the creation phase: {}",
            idle.join(", ")
        );
        let _ = writeln!(o);
    }
    if a.http_watchers > 0 {
        let _ = writeln!(
            o,
            "HTTP watch reconnections completed: {}",
            rs.iter()
                .map(|r| format!("{} {}", r.target, r.http_reconnects))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(o);
    }

    // ---- storm ----------------------------------------------------------------------------
    if rs.iter().any(|r| r.storm.is_some()) {
        let _ = writeln!(o, "### Reconnect storm");
        let _ = writeln!(o);
        let _ = writeln!(o, "| target | watchers re-created | re-created in (s) | events replayed | new events delivered | p99 ms | max ms | etcd Watch streams started | etcd Range requests | etcd watchers after | proxy CPU s | proxy peak RSS MB | etcd CPU s |");
        let _ = writeln!(
            o,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in rs {
            let Some(s) = &r.storm else { continue };
            let p = &s.phase;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.target,
                s.recreated,
                opt(s.recreate_s, 2),
                s.replayed,
                p.delivered,
                lat(p.latency.count, p.latency.p99_ms),
                lat(p.latency.count, p.latency.max_ms),
                f(p.etcd_requests.watch, 0),
                f(p.etcd_requests.range, 0),
                f(s.etcd_after.watchers, 0),
                opt(cpu(p, "proxy"), 2),
                opt(rss(p, "proxy"), 1),
                opt(cpu(p, "etcd"), 2),
            );
        }
        let _ = writeln!(o);
    }

    // ---- cold start -------------------------------------------------------------------------
    if rs.iter().any(|r| r.cold.is_some()) {
        let etcd_rate = rs
            .iter()
            .find(|r| r.target == "etcd")
            .and_then(|r| r.cold.as_ref())
            .map(|c| c.ranges_per_s);
        let _ = writeln!(o, "### Cold start (full ranges)");
        let _ = writeln!(o);
        let _ = writeln!(o, "| target | ranges | seconds | ranges/s | speed vs etcd | p50 ms | p99 ms | max ms | etcd Range requests | proxy CPU s | proxy peak RSS MB | etcd CPU s | loadgen CPU s | errors |");
        let _ = writeln!(
            o,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in rs {
            let Some(c) = &r.cold else { continue };
            let p = &c.phase;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.target,
                c.ranges,
                f(c.seconds, 2),
                f(c.ranges_per_s, 0),
                ratio(Some(c.ranges_per_s), etcd_rate),
                lat(p.latency.count, p.latency.p50_ms),
                lat(p.latency.count, p.latency.p99_ms),
                lat(p.latency.count, p.latency.max_ms),
                f(p.etcd_requests.range, 0),
                opt(cpu(p, "proxy"), 2),
                opt(rss(p, "proxy"), 1),
                opt(cpu(p, "etcd"), 2),
                opt(cpu(p, "loadgen"), 2),
                c.errors.len(),
            );
        }
        let _ = writeln!(o);
    }

    // ---- correctness --------------------------------------------------------------------------
    let _ = writeln!(o, "### Correctness (every watcher, every event)");
    let _ = writeln!(o);
    let _ = writeln!(o, "| target | watchers checked | not created | expected | delivered | missing | duplicated | out of order | malformed | stream errors | header.revision went down (not an error) | result |");
    let _ = writeln!(
        o,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in rs {
        let c = &r.correctness;
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target,
            c.watchers_checked,
            c.not_created,
            c.expected,
            c.delivered,
            c.missing,
            c.duplicated,
            c.out_of_order,
            c.bad,
            c.stream_errors,
            c.header_regressions,
            if r.ok { "ok" } else { "**FAILED**" },
        );
    }
    for r in rs {
        if let Some(fail) = &r.failure {
            let _ = writeln!(o, "\n{}: failure: {fail}", r.target);
        }
        for e in &r.correctness.error_samples {
            let _ = writeln!(o, "\n{}: {e}", r.target);
        }
        if let Some(c) = &r.cold {
            for e in c.errors.iter().take(5) {
                let _ = writeln!(o, "\n{}: cold start: {e}", r.target);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_heads() {
        let mut s = String::new();
        table_head(&mut s, "T", "load 3", &["a", "b c"]);
        assert_eq!(s, "### T\n\nNote: load 3\n\n| a | b c |\n| --- | --- |\n");
        let mut s = String::new();
        table_head(&mut s, "T", "", &["a"]);
        assert_eq!(s, "### T\n\n| a |\n| --- |\n");
    }

    #[test]
    fn dates() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(unix_date(t), "2023-11-14 22:13:20 UTC");
    }
}
