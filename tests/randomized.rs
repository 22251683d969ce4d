//! Seeded randomized fault test (issue 4): writers, watchers joining, leaving and reconnecting
//! from past revisions, compactions through the proxy, and faults (relay stall / drop / reset /
//! refuse / black hole, proxy SIGKILL + restart, etcd SIGKILL + restart) at random times. At
//! the end every watch ever opened is checked against etcd's history (recorded by a direct
//! etcd watch from revision 1) with `testkit::checker`: exactly once, in order, no gap, or an
//! etcd-legal compaction cancel; headers never go backwards, not even across a reconnection.
//!
//! The seed comes from `ETCD_FANOUT_SEED` (decimal or 0x-hex), else a fixed default; it is
//! printed so a failure can be replayed (timing still varies between runs, the choices do
//! not). `ETCD_FANOUT_SOAK=1` runs for `ETCD_FANOUT_SOAK_SECS` (default 600) instead of 40 s.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_fanout::proto::etcdserverpb::{kv_client::KvClient, CompactionRequest};
use testkit::checker::{check, etcd_revision, wait_done, Outcome, Recorder};
use testkit::fault::Relay;
use testkit::watchers::{lazy_channel, Log, Spec, Stream, Writer, WriterOpts};
use testkit::{Etcd, Proxy};
use tonic::transport::Channel;

/// splitmix64: small, seedable, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

fn seed() -> u64 {
    const DEFAULT: u64 = 0x5eed_0004;
    match std::env::var("ETCD_FANOUT_SEED") {
        Ok(s) => {
            let s = s.trim();
            s.strip_prefix("0x")
                .map(|h| u64::from_str_radix(h, 16))
                .unwrap_or_else(|| s.parse())
                .unwrap_or_else(|_| panic!("ETCD_FANOUT_SEED={s:?} is not a number"))
        }
        Err(_) => DEFAULT,
    }
}

fn run_length() -> Duration {
    if std::env::var("ETCD_FANOUT_SOAK").is_ok_and(|v| v == "1") {
        let secs = std::env::var("ETCD_FANOUT_SOAK_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(600);
        Duration::from_secs(secs)
    } else {
        Duration::from_secs(40)
    }
}

/// The kinds of watch a client opens.
fn random_spec(rng: &mut Rng, name: String, start: i64) -> Spec {
    match rng.below(6) {
        0 | 1 => Spec::prefix(name, "/r/a/", start),
        2 => Spec::prefix(name, "/r/b/", start),
        3 => Spec::range(name, &format!("/r/a/k{:03}", rng.below(20)), "", start),
        4 => Spec::range(name, "/r/b/k000", "/r/b/k010", start),
        // Outside every cached prefix (relayed to etcd), or spanning both prefixes.
        _ => {
            if rng.chance(50) {
                Spec::prefix(name, "/r/x/", start)
            } else {
                Spec::prefix(name, "/r/", start)
            }
        }
    }
}

struct Active {
    stream: Stream,
    specs: Vec<Spec>,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Stall(Duration),
    BlackHole,
    Drop,
    Reset,
    Refuse(Duration),
    ProxyRestart,
    EtcdRestart,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults() {
    let seed = seed();
    let length = run_length();
    eprintln!("randomized: ETCD_FANOUT_SEED={seed:#x}, run length {length:?}");
    let bound = length + Duration::from_secs(80);
    tokio::time::timeout(bound, run(seed, length))
        .await
        .unwrap_or_else(|_| panic!("randomized (seed {seed:#x}): exceeded its {bound:?} bound"));
}

async fn run(seed: u64, length: Duration) {
    let mut rng = Rng(seed);
    let etcd = tokio::task::spawn_blocking(Etcd::start).await.unwrap();
    let etcd_url = etcd.url.clone();
    let recorder = Recorder::spawn(vec![etcd_url.clone()]);
    let relay = Arc::new(Relay::start(etcd.port));
    let relay_url = relay.url.clone();
    let proxy = tokio::task::spawn_blocking(move || {
        Proxy::start_with(
            &relay_url,
            &["/r/a/", "/r/b/"],
            // A small window so that watchers from past revisions are caught up from etcd.
            &["--history-revisions", "200"],
        )
    })
    .await
    .unwrap();
    let proxy_url = proxy.url.clone();
    let etcd = Arc::new(Mutex::new(etcd));
    let proxy = Arc::new(Mutex::new(proxy));

    let mut writers = vec![
        Writer::spawn(
            vec![etcd_url.clone()],
            WriterOpts::new("/r/a/", 20, Duration::from_millis(10)),
        ),
        Writer::spawn(
            vec![proxy_url.clone()],
            WriterOpts {
                id: 1,
                ..WriterOpts::new("/r/b/", 20, Duration::from_millis(15))
            },
        ),
        Writer::spawn(
            vec![etcd_url.clone()],
            WriterOpts {
                id: 2,
                ..WriterOpts::new("/r/x/", 5, Duration::from_millis(60))
            },
        ),
    ];
    let channels: Vec<Channel> = (0..4).map(|_| lazy_channel(&proxy_url)).collect();
    let mut proxy_kv = KvClient::new(lazy_channel(&proxy_url));
    let mut active: Vec<Active> = Vec::new();
    let mut done: Vec<Log> = Vec::new();
    let mut fault: Option<tokio::task::JoinHandle<()>> = None;
    let mut faults_run: Vec<String> = Vec::new();
    let mut last_compact = 0i64;
    let mut n = 0usize;
    let (mut joins, mut leaves, mut reconnects, mut compactions) = (0, 0, 0, 0);
    let t0 = Instant::now();
    while t0.elapsed() < length {
        tokio::time::sleep(rng.millis(50, 300)).await;
        let head = recorder.last_rev();
        // Streams whose every watch was cancelled are over: keep their logs, free the slot.
        let (over, still): (Vec<Active>, Vec<Active>) =
            active.into_iter().partition(|a| a.stream.finished());
        active = still;
        for a in over {
            done.extend(a.stream.logs.iter().cloned());
        }
        let roll = rng.below(100);
        if roll < 30 && active.len() < 40 {
            // Join: from now, or from a past revision (maybe compacted, maybe outside the window).
            let start = match rng.below(100) {
                0..=39 => 0,
                // Recent: in the window or just before it.
                40..=74 => (head - rng.below(400) as i64).max(1),
                // Far back: caught up from etcd, more than etcd's 1,000 revisions per response.
                _ => (head - 900 - rng.below(600) as i64).max(1),
            };
            // Mostly from a revision etcd still has; sometimes from a compacted one.
            let start = if start > 0 && rng.chance(70) {
                start.max(last_compact)
            } else {
                start
            };
            let watches = 1 + rng.below(2) as usize;
            let specs: Vec<Spec> = (0..watches)
                .map(|_| {
                    n += 1;
                    random_spec(&mut rng, format!("w{n}"), start)
                })
                .collect();
            let ch = channels[rng.below(channels.len() as u64) as usize].clone();
            active.push(Active {
                stream: Stream::spawn(ch, specs.clone(), true),
                specs,
            });
            joins += 1;
        } else if roll < 38 && !active.is_empty() {
            // Leave.
            let i = rng.below(active.len() as u64) as usize;
            let a = active.swap_remove(i);
            done.extend(a.stream.close().await);
            leaves += 1;
        } else if roll < 53 && !active.is_empty() {
            // Reconnect, APISIX style: close, open a new stream from last seen + 1.
            let i = rng.below(active.len() as u64) as usize;
            let a = active.swap_remove(i);
            let old = a.stream.close().await;
            let mut specs = Vec::new();
            let mut logs = Vec::new();
            for (spec, log) in a.specs.iter().zip(&old) {
                let l = log.lock().unwrap();
                if l.is_canceled() || l.start <= 0 {
                    continue;
                }
                let mut spec = spec.clone();
                spec.name = format!("{}+", spec.name);
                spec.start_revision = l.next();
                let new = spec.log();
                new.lock().unwrap().max_header = l.max_header;
                specs.push(spec);
                logs.push(new);
            }
            done.extend(old);
            if !specs.is_empty() {
                let ch = channels[rng.below(channels.len() as u64) as usize].clone();
                active.push(Active {
                    stream: Stream::spawn_logs(ch, specs.clone(), logs, true),
                    specs,
                });
            }
            reconnects += 1;
        } else if roll < 57 && head > last_compact + 50 {
            // Compact through the proxy, never past what the recorder has.
            let rev = last_compact + 1 + rng.below((head - last_compact - 10) as u64) as i64;
            recorder.compacted(rev);
            let r = tokio::time::timeout(
                Duration::from_secs(3),
                proxy_kv.compact(CompactionRequest {
                    revision: rev,
                    physical: rng.chance(50),
                }),
            )
            .await;
            // Counted even when the answer was lost: etcd may have compacted anyway.
            last_compact = rev;
            compactions += 1;
            eprintln!(
                "[{:>5.1}s] compact {rev} (head {head}): {}",
                t0.elapsed().as_secs_f64(),
                match r {
                    Ok(Ok(_)) => "ok".to_string(),
                    Ok(Err(e)) => format!("{:?} {}", e.code(), e.message()),
                    Err(_) => "timeout".into(),
                }
            );
        } else if roll < 67 && fault.as_ref().is_none_or(|f| f.is_finished()) {
            let f = match rng.below(100) {
                0..=19 => Fault::Stall(rng.millis(500, 12_000)),
                20..=27 => Fault::BlackHole,
                28..=42 => Fault::Drop,
                43..=57 => Fault::Reset,
                58..=71 => Fault::Refuse(rng.millis(300, 3000)),
                72..=87 => Fault::ProxyRestart,
                _ => Fault::EtcdRestart,
            };
            eprintln!(
                "[{:>5.1}s] fault {f:?} (head {head}, {} active streams)",
                t0.elapsed().as_secs_f64(),
                active.len()
            );
            faults_run.push(format!("{f:?}"));
            let (relay, proxy, etcd) = (relay.clone(), proxy.clone(), etcd.clone());
            fault = Some(tokio::spawn(async move {
                match f {
                    Fault::Stall(d) => {
                        relay.stall();
                        tokio::time::sleep(d).await;
                        relay.pass();
                    }
                    Fault::BlackHole => {
                        relay.stall_existing();
                        // Long enough for the proxy's keepalive to give up on them.
                        tokio::time::sleep(Duration::from_secs(12)).await;
                        relay.pass();
                    }
                    Fault::Drop => relay.drop_all(),
                    Fault::Reset => relay.reset_all(),
                    Fault::Refuse(d) => {
                        relay.refuse();
                        relay.reset_all();
                        tokio::time::sleep(d).await;
                        relay.pass();
                    }
                    Fault::ProxyRestart => {
                        tokio::task::spawn_blocking(move || {
                            let mut p = proxy.lock().unwrap();
                            p.kill();
                            std::thread::sleep(Duration::from_millis(300));
                            p.restart();
                        })
                        .await
                        .unwrap();
                    }
                    Fault::EtcdRestart => {
                        tokio::task::spawn_blocking(move || {
                            let mut e = etcd.lock().unwrap();
                            e.kill();
                            std::thread::sleep(Duration::from_millis(500));
                            e.restart();
                        })
                        .await
                        .unwrap();
                    }
                }
            }));
        }
    }
    // Settle: the last fault ends, writers stop, every watcher catches up.
    if let Some(f) = fault.take() {
        let _ = f.await;
    }
    relay.pass();
    for w in writers.drain(..) {
        w.stop().await;
    }
    let until = etcd_revision(&etcd_url).await.expect("etcd revision");
    recorder
        .wait_for(until, Duration::from_secs(20))
        .await
        .expect("recorder");
    let hist = recorder.history();
    let live: Vec<Log> = active
        .iter()
        .flat_map(|a| a.stream.logs.iter().cloned())
        .collect();
    let waited = wait_done(&live, &hist, until, Duration::from_secs(40)).await;
    let mut all = done;
    all.extend(live.iter().cloned());
    let mut errs = Vec::new();
    if let Err(e) = &waited {
        errs.push(e.clone());
    }
    let (mut complete, mut canceled, mut left, mut events) = (0, 0, 0, 0);
    for l in &all {
        let l = l.lock().unwrap();
        events += l.events.len();
        match check(&l, &hist, until) {
            Ok(Outcome::Canceled { .. }) => canceled += 1,
            Ok(Outcome::Complete) if l.left => left += 1,
            Ok(Outcome::Complete) => complete += 1,
            Err(e) => errs.push(e),
        }
    }
    eprintln!(
        "randomized (seed {seed:#x}): {:?}, revision {until}, {} watches ({joins} joins, \
         {leaves} leaves, {reconnects} reconnects): {complete} complete, {left} left early \
         (exact prefixes), {canceled} legally cancelled, {} failed; {events} events checked; \
         {compactions} compactions; faults {faults_run:?}",
        t0.elapsed(),
        all.len(),
        errs.len()
    );
    for a in active {
        a.stream.close().await;
    }
    if !errs.is_empty() {
        let log = proxy.lock().unwrap().log();
        let tail: Vec<&str> = log.lines().collect();
        panic!(
            "randomized (replay with ETCD_FANOUT_SEED={seed:#x}): {} of {} watches failed:\n  {}\n--- proxy log (tail) ---\n{}",
            errs.len(),
            all.len(),
            errs.iter().take(15).cloned().collect::<Vec<_>>().join("\n  "),
            tail[tail.len().saturating_sub(40)..].join("\n")
        );
    }
}
