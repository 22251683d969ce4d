//! Who watches what: the channels loadgen writes (sub-prefixes, APISIX resource directories
//! or single keys), the prefixes etcd-fanout is configured with (one per channel, or one
//! covering prefix), and for each watcher its channel, its stream and its watch shape.
//!
//! A *channel* is a unit of writes with its own sequence numbers: every write of a channel
//! carries its seq, and every watcher watches exactly one channel, so it can check that it
//! saw every write of its channel meant for it exactly once and in order.
//!
//! * `prefixes` (default): channel p is `<base>pNN/`, written over `--keys` keys; watcher i
//!   watches channel i % N on stream i % S.
//! * `--apisix-workers W`: the ten resource directories APISIX 2.x watches (`routes/`,
//!   `upstreams/`, ...) under `<base>`; worker w holds one stream carrying one watch per
//!   directory (watchers 10w..10w+9).
//! * `--single-key`: one channel per watcher, each a single key `<base>key/kNNNNNN`; writes
//!   rotate over the keys, so each put concerns exactly one watcher.
//! * `--mixed`: watch shapes rotate over plain, `prev_kv`, `NODELETE` and `NOPUT` with
//!   `prev_kv`; every `--delete-every`-th write of a channel deletes the key written just
//!   before it, so every shape has events to check.

use bytes::Bytes;

/// The resource directories an APISIX 2.x worker watches, one watch each.
pub const APISIX_DIRS: [&str; 10] = [
    "routes",
    "upstreams",
    "services",
    "ssl",
    "plugins",
    "consumers",
    "global_rules",
    "proto",
    "stream_routes",
    "plugin_metadata",
];

/// Writer tasks of a single-key run (each rotates over its share of the keys).
const SINGLE_KEY_WRITERS: usize = 10;

/// Which events a watch asks etcd to leave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    None,
    NoPut,
    NoDelete,
}

/// The shape of one watch: its filter and whether it asks for `prev_kv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub filter: Filter,
    pub prev_kv: bool,
}

impl Shape {
    pub const PLAIN: Shape = Shape {
        filter: Filter::None,
        prev_kv: false,
    };

    /// etcd's `WatchCreateRequest.filters` values (NOPUT = 0, NODELETE = 1).
    pub fn filters(self) -> Vec<i32> {
        match self.filter {
            Filter::None => Vec::new(),
            Filter::NoPut => vec![0],
            Filter::NoDelete => vec![1],
        }
    }
}

/// Which writes of a channel are deletes (every `delete_every`-th, none when 0), and which
/// of them a watch of some shape receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writes {
    pub delete_every: u64,
    /// Distinct keys of the channel (1 for a single-key channel).
    pub keys: u64,
}

impl Writes {
    /// True when write `seq` of a channel is a delete (of the key written at `seq - 1`).
    pub fn is_delete(self, seq: u64) -> bool {
        self.delete_every >= 2 && seq % self.delete_every == self.delete_every - 1
    }

    /// True when a watch with `filter` receives write `seq`.
    pub fn sees(self, filter: Filter, seq: u64) -> bool {
        match filter {
            Filter::None => true,
            Filter::NoPut => self.is_delete(seq),
            Filter::NoDelete => !self.is_delete(seq),
        }
    }

    /// Writes in `[from, to)` a watch with `filter` receives.
    pub fn count_seen(self, filter: Filter, from: u64, to: u64) -> u64 {
        let to = to.max(from);
        let deletes = if self.delete_every >= 2 {
            to / self.delete_every - from / self.delete_every
        } else {
            0
        };
        match filter {
            Filter::None => to - from,
            Filter::NoPut => deletes,
            Filter::NoDelete => to - from - deletes,
        }
    }

    /// The first write at or after `seq` a watch with `filter` receives.
    pub fn next_seen(self, filter: Filter, seq: u64) -> u64 {
        // Bounded: a write is seen at least every `delete_every` writes.
        let mut s = seq;
        for _ in 0..=self.delete_every.max(1) {
            if self.sees(filter, s) {
                return s;
            }
            s += 1;
        }
        s
    }

    /// Index (among the channel's keys) of the key write `seq` touches: a put writes key
    /// `seq % keys`, a delete removes the key the write before it put.
    pub fn key_index(self, seq: u64) -> u64 {
        let s = if self.is_delete(seq) {
            seq.saturating_sub(1)
        } else {
            seq
        };
        s % self.keys.max(1)
    }

    /// The write whose value a put at `seq` replaces (its `prev_kv`), `None` when the key
    /// did not exist (never written, or deleted since).
    pub fn prev_put(self, seq: u64) -> Option<u64> {
        let k = self.key_index(seq);
        let mut w = seq;
        // Bounded: of the last two writes whose seq is `k` modulo `keys`, one is a put.
        for _ in 0..(2 * self.keys.max(1) + 2) {
            if w == 0 {
                return None;
            }
            w -= 1;
            if self.key_index(w) == k {
                return (!self.is_delete(w)).then_some(w);
            }
        }
        None
    }
}

/// The workload's layout, fixed for a run.
#[derive(Clone, Debug)]
pub struct Layout {
    /// What each channel is: a prefix (ends in `/`) or a single key.
    pub channels: Vec<Bytes>,
    pub single_key: bool,
    pub apisix: bool,
    pub mixed: bool,
    pub writes: Writes,
    /// The prefixes etcd-fanout is started with.
    pub proxy_prefixes: Vec<String>,
}

/// What the layout is made from (the relevant command-line flags).
pub struct LayoutArgs<'a> {
    pub base: &'a str,
    pub prefixes: usize,
    pub watchers: usize,
    pub keys: u64,
    pub apisix: bool,
    pub single_key: bool,
    pub covering: bool,
    pub mixed: bool,
    pub delete_every: u64,
}

impl Layout {
    pub fn new(a: &LayoutArgs) -> Layout {
        let channels: Vec<String> = if a.single_key {
            (0..a.watchers.max(1))
                .map(|i| format!("{}key/k{i:06}", a.base))
                .collect()
        } else if a.apisix {
            APISIX_DIRS
                .iter()
                .map(|d| format!("{}{d}/", a.base))
                .collect()
        } else {
            (0..a.prefixes)
                .map(|i| format!("{}p{i:02}/", a.base))
                .collect()
        };
        // A single-key run always has one covering prefix: one per key would be one
        // upstream watch per watcher.
        let proxy_prefixes = if a.covering || a.single_key {
            vec![a.base.to_string()]
        } else {
            channels.clone()
        };
        Layout {
            channels: channels
                .into_iter()
                .map(|c| Bytes::from(c.into_bytes()))
                .collect(),
            single_key: a.single_key,
            apisix: a.apisix,
            mixed: a.mixed,
            writes: Writes {
                delete_every: if a.mixed { a.delete_every } else { 0 },
                keys: if a.single_key { 1 } else { a.keys.max(1) },
            },
            proxy_prefixes,
        }
    }

    /// The channel watcher `i` watches.
    pub fn channel_of(&self, i: usize) -> usize {
        if self.single_key {
            i % self.channels.len()
        } else if self.apisix {
            i % APISIX_DIRS.len()
        } else {
            i % self.channels.len()
        }
    }

    /// The stream (of `streams`) watcher `i` is on.
    pub fn stream_of(&self, i: usize, streams: usize) -> usize {
        if self.apisix {
            (i / APISIX_DIRS.len()) % streams.max(1)
        } else {
            i % streams.max(1)
        }
    }

    /// The watch shape of watcher `i`.
    pub fn shape_of(&self, i: usize) -> Shape {
        if !self.mixed {
            return Shape::PLAIN;
        }
        match i % 4 {
            0 => Shape::PLAIN,
            1 => Shape {
                filter: Filter::None,
                prev_kv: true,
            },
            2 => Shape {
                filter: Filter::NoDelete,
                prev_kv: false,
            },
            _ => Shape {
                filter: Filter::NoPut,
                prev_kv: true,
            },
        }
    }

    /// The key write `seq` of channel `c` touches.
    pub fn key_of(&self, c: usize, seq: u64) -> Bytes {
        if self.single_key {
            return self.channels[c].clone();
        }
        let mut k = self.channels[c].to_vec();
        k.extend_from_slice(format!("k{:05}", self.writes.key_index(seq)).as_bytes());
        Bytes::from(k)
    }

    /// True when `key` belongs to channel `c`.
    pub fn holds(&self, c: usize, key: &[u8]) -> bool {
        if self.single_key {
            key == &self.channels[c][..]
        } else {
            key.starts_with(&self.channels[c])
        }
    }

    /// The channels each writer task writes, in rotation.
    pub fn writer_groups(&self) -> Vec<Vec<usize>> {
        let n = self.channels.len();
        if self.single_key {
            let w = SINGLE_KEY_WRITERS.min(n).max(1);
            (0..w).map(|g| (g..n).step_by(w).collect()).collect()
        } else {
            (0..n).map(|c| vec![c]).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(single_key: bool, apisix: bool, mixed: bool, covering: bool) -> Layout {
        Layout::new(&LayoutArgs {
            base: "/apisix/",
            prefixes: 10,
            watchers: 40,
            keys: 100,
            apisix,
            single_key,
            covering,
            mixed,
            delete_every: 5,
        })
    }

    #[test]
    fn deletes_and_filters() {
        let w = Writes {
            delete_every: 5,
            keys: 100,
        };
        let deletes: Vec<u64> = (0..12).filter(|s| w.is_delete(*s)).collect();
        assert_eq!(deletes, vec![4, 9]);
        assert_eq!(w.next_seen(Filter::NoPut, 0), 4);
        for (from, to) in [(0, 0), (0, 12), (3, 10), (4, 5), (5, 9)] {
            for f in [Filter::None, Filter::NoPut, Filter::NoDelete] {
                let slow = (from..to).filter(|s| w.sees(f, *s)).count() as u64;
                assert_eq!(w.count_seen(f, from, to), slow, "{f:?} {from}..{to}");
            }
        }
        assert_eq!(w.next_seen(Filter::NoDelete, 4), 5);
        assert_eq!(w.next_seen(Filter::None, 4), 4);
        // The delete at 4 removes the key the put at 3 wrote.
        assert_eq!(w.key_index(4), 3);
        // First round: no key exists yet.
        assert_eq!(w.prev_put(3), None);
        // Key 5 was put at 5 and not deleted since: the put at 105 replaces it.
        assert_eq!(w.prev_put(105), Some(5));
        // Key 3 was deleted at 4: the put at 103 finds nothing to replace.
        assert_eq!(w.prev_put(103), None);
        // A delete's prev is the put just before it.
        assert_eq!(w.prev_put(9), Some(8));
        // One key, deletes every other write.
        let one = Writes {
            delete_every: 2,
            keys: 1,
        };
        assert_eq!(one.prev_put(1), Some(0));
        assert_eq!(one.prev_put(2), None);
        let plain = Writes {
            delete_every: 0,
            keys: 1,
        };
        assert_eq!(plain.prev_put(7), Some(6));
        assert_eq!(plain.prev_put(0), None);
    }

    #[test]
    fn layouts() {
        let l = layout(false, true, false, true);
        assert_eq!(l.proxy_prefixes, vec!["/apisix/".to_string()]);
        assert_eq!(&l.channels[1][..], b"/apisix/upstreams/");
        // Worker 3 holds watchers 30..39, one per directory, on its one stream.
        assert!((30..40).all(|i| l.stream_of(i, 4) == 3));
        assert_eq!(
            (30..40).map(|i| l.channel_of(i)).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        let exact = layout(false, false, true, false);
        assert_eq!(exact.proxy_prefixes.len(), 10);
        assert_eq!(exact.shape_of(3).filter, Filter::NoPut);
        assert_eq!(&exact.key_of(2, 104)[..], b"/apisix/p02/k00003");
        let single = layout(true, false, false, false);
        assert_eq!(single.channels.len(), 40);
        assert_eq!(single.proxy_prefixes, vec!["/apisix/".to_string()]);
        assert!(single.holds(7, b"/apisix/key/k000007"));
        assert!(!single.holds(7, b"/apisix/key/k0000070"));
        let groups = single.writer_groups();
        assert_eq!(groups.len(), 10);
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 40);
    }
}
