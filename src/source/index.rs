//! The dispatch index of one feed: which watch shapes (by key range) want a revision, and
//! which sessions hold watches of each shape.
//!
//! Sessions register a shape's key range under the shape's id (a *tag*, opaque here) with
//! their [`Inbox`]. After the feed applies a revision it asks the index which tags have a
//! range holding one of the revision's keys and leaves one [`Note`] per (tag, revision) in the
//! inbox of every session registered under those tags, then wakes it. A session whose watches
//! match nothing is never woken and none of its watches is touched.
//! A session whose client fell behind parks its registrations ([`Index::park`]): dispatch
//! skips it entirely (no note, no lock of its inbox, no wake-up) until it resumes
//! ([`Index::unpark`]) and its watches read what they missed from the shared history, so a
//! parked watcher costs its cursor, not work per revision.
//!
//! Lookup per event key, with `n` registered ranges:
//! - single keys: a hash lookup;
//! - prefixes (`[p, prefix_end(p))`, etcd's `--prefix`): a hash lookup per distinct prefix
//!   length in use that is not longer than the key (a handful: APISIX's resource directories
//!   have a few lengths);
//! - any other range (`[a, b)` that is not a prefix, from-key): sorted by start and scanned
//!   up to the key; such watches are rare (no client we serve makes them in numbers).
//!
//! Work per revision is therefore O(events x prefix lengths + matching registrations), not
//! O(watches). The matching shapes are also the ones whose encodings of the batch get a
//! lock-free slot ([`crate::source::cache::Encodings::prepare`]). The index is a plain structure under one short mutex, taken by the feed task
//! per applied group of revisions and by sessions when they register or release a shape.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::keys::{prefix_end, End, KeyRange};
use crate::source::cache::RevBatch;

/// What a session is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Revision `revision` holds at least one key of the range registered under `tag`.
    Events {
        /// The shape's id.
        tag: u64,
        /// The revision.
        revision: i64,
    },
    /// The feed was reloaded at `to` (after a compaction): the revisions `[from, to]` are not
    /// in its history and every watch of `tag` still expecting them must get them elsewhere.
    Reset {
        /// The shape's id.
        tag: u64,
        /// First revision lost.
        from: i64,
        /// The revision the cache was reloaded at.
        to: i64,
    },
}

/// Most notes an inbox keeps; later ones are dropped and only the lowest revision dropped is
/// kept, so a session that does not take its notes costs a bounded amount however long it
/// waits. A parked session (its client fell behind) keeps none at all: see [`Inbox::hold`].
pub const MAX_NOTES: usize = 256;

impl Note {
    /// The first revision the note is about.
    pub fn revision(&self) -> i64 {
        match self {
            Note::Events { revision, .. } => *revision,
            Note::Reset { from, .. } => *from,
        }
    }
}

/// An inbox's content.
#[derive(Debug, Default)]
struct Notes {
    /// Notes kept, in the order left.
    list: Vec<Note>,
    /// Lowest revision of a note dropped because the inbox was full: every note after the
    /// first drop is dropped, so the kept notes are exactly those left before it.
    overflow_from: Option<i64>,
    /// The session is parked ([`Inbox::hold`]): every note is dropped as after an overflow,
    /// until the session takes its notes again.
    held: bool,
}

/// What a session takes from its inbox.
#[derive(Debug, Default)]
pub struct Taken {
    /// The notes kept, in order.
    pub notes: Vec<Note>,
    /// Set when notes were dropped: the lowest revision they were about. Every watch must
    /// then look at the history from there (after the kept notes are served).
    pub overflow_from: Option<i64>,
}

/// A session's mailbox: notes left by the feeds' dispatch, and the wake-up.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Notes not yet taken, in the order the feeds left them (revision order per feed).
    notes: Mutex<Notes>,
    /// Wakes the session when notes arrive.
    wake: tokio::sync::Notify,
}

impl Inbox {
    /// Leaves a note without waking the session (see [`Inbox::wake`]).
    fn push(&self, note: Note) -> bool {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = notes.list.is_empty() && notes.overflow_from.is_none();
        if notes.held || notes.overflow_from.is_some() || notes.list.len() >= MAX_NOTES {
            let rev = note.revision();
            notes.overflow_from = Some(notes.overflow_from.map_or(rev, |r| r.min(rev)));
        } else {
            notes.list.push(note);
        }
        was_empty
    }

    /// The session parked (its client fell behind): keep no more notes, only the lowest
    /// revision of those dropped, from which its watches look at the history when it takes
    /// them again (as after an overflow). A parked watcher then costs its cursor, not a list
    /// of notes per revision it missed (3,000 parked sessions x 256 notes were 25 MB).
    pub fn hold(&self) {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).held = true;
    }

    /// Holds the inbox (as [`Inbox::hold`]) and records that notes from `from` on may be
    /// missing: what [`Index::unpark`] leaves in the inbox of a session whose registrations
    /// were not told of revisions while it was parked.
    fn hold_from(&self, from: i64) {
        let mut notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.held = true;
        notes.overflow_from = Some(notes.overflow_from.map_or(from, |r| r.min(from)));
    }

    /// Takes every note left so far, in order, and whether some were dropped; ends a
    /// [`Inbox::hold`].
    pub fn take(&self) -> Taken {
        let notes = std::mem::take(&mut *self.notes.lock().unwrap_or_else(|e| e.into_inner()));
        Taken {
            notes: notes.list,
            overflow_from: notes.overflow_from,
        }
    }

    /// Waits until notes may be there (a permit is kept if a wake-up came first).
    pub async fn wait(&self) {
        self.wake.notified().await;
    }

    /// Wakes the session (a permit is kept if it is not waiting).
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// One registered shape: its range and the sessions holding watches of it.
#[derive(Debug)]
struct Registration {
    /// The shape's key range.
    range: KeyRange,
    /// Sessions told of this shape's revisions (by inbox address), with how many times each
    /// registered.
    sessions: HashMap<usize, (Arc<Inbox>, usize)>,
    /// Parked sessions ([`Index::park`]), not told anything: how many times each registered,
    /// and the revision dispatched when it parked (its watches read the history from the
    /// next one when it resumes).
    parked: HashMap<usize, (Arc<Inbox>, usize, i64)>,
}

impl Registration {
    fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.parked.is_empty()
    }
}

/// Where a range is filed for lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Exact(Bytes),
    Prefix(Bytes),
    Other,
}

fn kind(range: &KeyRange) -> Kind {
    match &range.end {
        End::Single => Kind::Exact(range.start.clone()),
        End::Before(e) if prefix_end(&range.start).as_ref() == Some(e) => {
            Kind::Prefix(range.start.clone())
        }
        End::Unbounded if prefix_end(&range.start).is_none() => Kind::Prefix(range.start.clone()),
        _ => Kind::Other,
    }
}

/// The index proper (see the module docs).
#[derive(Debug, Default)]
struct Inner {
    /// Every registered tag.
    tags: HashMap<u64, Registration>,
    /// Single-key ranges: key -> tags.
    exact: HashMap<Bytes, Vec<u64>>,
    /// Prefix ranges: prefix -> tags.
    prefixes: HashMap<Bytes, Vec<u64>>,
    /// Distinct prefix lengths in `prefixes`, with how many prefixes have each.
    prefix_lens: BTreeMap<usize, usize>,
    /// Other ranges by start key: start -> tags.
    others: BTreeMap<Bytes, Vec<u64>>,
}

impl Inner {
    fn file(&mut self, tag: u64, range: &KeyRange) {
        match kind(range) {
            Kind::Exact(k) => self.exact.entry(k).or_default().push(tag),
            Kind::Prefix(p) => {
                let len = p.len();
                let tags = self.prefixes.entry(p).or_default();
                if tags.is_empty() {
                    *self.prefix_lens.entry(len).or_default() += 1;
                }
                tags.push(tag);
            }
            Kind::Other => self
                .others
                .entry(range.start.clone())
                .or_default()
                .push(tag),
        }
    }

    fn unfile(&mut self, tag: u64, range: &KeyRange) {
        fn remove(map_tags: &mut Vec<u64>, tag: u64) -> bool {
            if let Some(i) = map_tags.iter().position(|t| *t == tag) {
                map_tags.swap_remove(i);
            }
            map_tags.is_empty()
        }
        match kind(range) {
            Kind::Exact(k) => {
                if self.exact.get_mut(&k).is_some_and(|t| remove(t, tag)) {
                    self.exact.remove(&k);
                }
            }
            Kind::Prefix(p) => {
                if self.prefixes.get_mut(&p).is_some_and(|t| remove(t, tag)) {
                    self.prefixes.remove(&p);
                    if let Some(n) = self.prefix_lens.get_mut(&p.len()) {
                        *n -= 1;
                        if *n == 0 {
                            self.prefix_lens.remove(&p.len());
                        }
                    }
                }
            }
            Kind::Other => {
                let start = range.start.clone();
                if self.others.get_mut(&start).is_some_and(|t| remove(t, tag)) {
                    self.others.remove(&start);
                }
            }
        }
    }

    /// Appends to `out` the tags whose range holds `key` (may repeat across keys).
    fn matching(&self, key: &[u8], out: &mut Vec<u64>) {
        if let Some(t) = self.exact.get(key) {
            out.extend_from_slice(t);
        }
        for &len in self.prefix_lens.keys() {
            if len > key.len() {
                break;
            }
            if let Some(t) = self.prefixes.get(&key[..len]) {
                out.extend_from_slice(t);
            }
        }
        for (_, tags) in self
            .others
            .range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
        {
            for t in tags {
                if self.tags.get(t).is_some_and(|r| r.range.contains_key(key)) {
                    out.push(*t);
                }
            }
        }
    }
}

/// A feed's dispatch index.
#[derive(Debug, Default)]
pub struct Index {
    /// Registrations and lookup tables.
    inner: Mutex<Inner>,
    /// The feed's head as far as dispatched: every note for a revision up to it has been left
    /// in its inboxes (stored under `inner`'s lock, after the notes).
    dispatched: AtomicI64,
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `inbox` for the revisions holding keys of `range`, under `tag` (one range
    /// per tag). Registering again counts; each registration is undone by one
    /// [`Index::release`].
    pub fn register(&self, tag: u64, range: &KeyRange, inbox: &Arc<Inbox>) {
        let mut inner = self.lock();
        if !inner.tags.contains_key(&tag) {
            inner.file(tag, range);
            inner.tags.insert(
                tag,
                Registration {
                    range: range.clone(),
                    sessions: HashMap::new(),
                    parked: HashMap::new(),
                },
            );
        }
        if let Some(reg) = inner.tags.get_mut(&tag) {
            let key = Arc::as_ptr(inbox) as usize;
            if let Some((_, n, _)) = reg.parked.get_mut(&key) {
                *n += 1;
                return;
            }
            reg.sessions
                .entry(key)
                .or_insert_with(|| (inbox.clone(), 0))
                .1 += 1;
        }
    }

    /// Stops telling `inbox` of the revisions of `tag` (its session parked: its client fell
    /// behind), so that a parked session costs dispatch nothing per revision, only its
    /// registration. The inbox is held and records that its notes from the next revision to
    /// dispatch on are missing: its watches read them from the history when it resumes
    /// ([`Index::unpark`]). Nothing when it is already parked or not registered under `tag`.
    pub fn park(&self, tag: u64, inbox: &Arc<Inbox>) {
        let mut inner = self.lock();
        // Under the index lock: every note up to `at` was left, none after it will be.
        let at = self.dispatched();
        let Some(reg) = inner.tags.get_mut(&tag) else {
            return;
        };
        let key = Arc::as_ptr(inbox) as usize;
        if let Some((inbox, n)) = reg.sessions.remove(&key) {
            inbox.hold();
            reg.parked.insert(key, (inbox, n, at));
        }
    }

    /// Tells `inbox` of the revisions of `tag` again (its session resumes). When revisions
    /// were dispatched since it parked, the inbox is held until the session takes its notes,
    /// with every one of them marked missing, so its watches read them from the history first
    /// and every later note comes after them; when none was, nothing was missed.
    pub fn unpark(&self, tag: u64, inbox: &Arc<Inbox>) {
        let mut inner = self.lock();
        let now = self.dispatched();
        let Some(reg) = inner.tags.get_mut(&tag) else {
            return;
        };
        let key = Arc::as_ptr(inbox) as usize;
        if let Some((inbox, n, at)) = reg.parked.remove(&key) {
            if now > at {
                inbox.hold_from(at + 1);
            }
            reg.sessions.insert(key, (inbox, n));
        }
    }

    /// Undoes one [`Index::register`] of `inbox` under `tag`.
    pub fn release(&self, tag: u64, inbox: &Arc<Inbox>) {
        let mut inner = self.lock();
        let Some(reg) = inner.tags.get_mut(&tag) else {
            return;
        };
        let key = Arc::as_ptr(inbox) as usize;
        if let Some((_, n)) = reg.sessions.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                reg.sessions.remove(&key);
            }
        } else if let Some((_, n, _)) = reg.parked.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                reg.parked.remove(&key);
            }
        }
        if reg.is_empty() {
            let range = reg.range.clone();
            inner.tags.remove(&tag);
            inner.unfile(tag, &range);
        }
    }

    /// The head as far as dispatched: read it *before* [`Inbox::take`], and every note up to
    /// it is in what was taken (or taken earlier).
    pub fn dispatched(&self) -> i64 {
        self.dispatched.load(Ordering::Acquire)
    }

    /// Tells every session registered for a range holding one of the keys of `batches`, one
    /// note per (tag, revision), and wakes each once; then records `head` as dispatched.
    pub fn dispatch(&self, batches: &[Arc<RevBatch>], head: i64) {
        let inner = self.lock();
        if inner.tags.is_empty() {
            self.dispatched.fetch_max(head, Ordering::AcqRel);
            return;
        }
        let mut tags = Vec::new();
        let mut woken: Vec<&Arc<Inbox>> = Vec::new();
        for batch in batches {
            tags.clear();
            for ev in &batch.events {
                if let Some(kv) = &ev.kv {
                    inner.matching(&kv.key, &mut tags);
                }
            }
            tags.sort_unstable();
            tags.dedup();
            batch.encoded.prepare(&tags);
            for tag in &tags {
                let Some(reg) = inner.tags.get(tag) else {
                    continue;
                };
                let note = Note::Events {
                    tag: *tag,
                    revision: batch.revision,
                };
                for (inbox, _) in reg.sessions.values() {
                    if inbox.push(note) {
                        woken.push(inbox);
                    }
                }
            }
        }
        self.dispatched.fetch_max(head, Ordering::AcqRel);
        for inbox in woken {
            inbox.wake();
        }
    }

    /// Appends to `out` the notes dispatch left for `batches` under the tags `holds` accepts:
    /// what a session whose inbox overflowed was not told, rebuilt from the history (work per
    /// revision as at dispatch, whatever the number of the session's watches).
    pub fn notes_for(
        &self,
        batches: &[Arc<RevBatch>],
        holds: impl Fn(u64) -> bool,
        out: &mut Vec<Note>,
    ) {
        let inner = self.lock();
        let mut tags = Vec::new();
        for batch in batches {
            tags.clear();
            for ev in &batch.events {
                if let Some(kv) = &ev.kv {
                    inner.matching(&kv.key, &mut tags);
                }
            }
            tags.sort_unstable();
            tags.dedup();
            out.extend(tags.iter().filter(|t| holds(**t)).map(|&tag| Note::Events {
                tag,
                revision: batch.revision,
            }));
        }
    }

    /// Tells every registered session that revisions `[from, to]` are missing from the
    /// history (the cache was reloaded at `to`).
    pub fn reset(&self, from: i64, to: i64) {
        let inner = self.lock();
        for (tag, reg) in &inner.tags {
            let parked = reg.parked.values().map(|(inbox, _, _)| inbox);
            for inbox in reg.sessions.values().map(|(inbox, _)| inbox).chain(parked) {
                inbox.push(Note::Reset {
                    tag: *tag,
                    from,
                    to,
                });
                inbox.wake();
            }
        }
        self.dispatched.store(to, Ordering::Release);
    }

    /// Number of registered tags.
    #[cfg(test)]
    fn registered(&self) -> usize {
        self.lock().tags.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mvccpb::Event;
    use crate::proto::testing::kv;

    fn batch(rev: i64, keys: &[&str]) -> Arc<RevBatch> {
        Arc::new(RevBatch::new(
            rev,
            keys.iter()
                .map(|k| Event {
                    kv: Some(kv(k, "v", rev, rev, 1)),
                    ..Default::default()
                })
                .collect(),
        ))
    }

    #[test]
    fn only_matching_sessions_are_told() {
        let index = Index::default();
        let (a, b, c) = (
            Arc::new(Inbox::default()),
            Arc::new(Inbox::default()),
            Arc::new(Inbox::default()),
        );
        index.register(1, &KeyRange::prefix(b"/apisix/routes/"), &a);
        index.register(2, &KeyRange::prefix(b"/apisix/upstreams/"), &b);
        let one = KeyRange::new(&Bytes::from_static(b"/apisix/routes/7"), &Bytes::new());
        index.register(3, &one, &c);
        let other = KeyRange::new(
            &Bytes::from_static(b"/apisix/r"),
            &Bytes::from_static(b"/apisix/s"),
        );
        index.register(4, &other, &c);

        index.dispatch(
            &[batch(10, &["/apisix/routes/7"]), batch(11, &["/apisix/x"])],
            11,
        );
        assert_eq!(index.dispatched(), 11);
        assert_eq!(
            a.take().notes,
            [Note::Events {
                tag: 1,
                revision: 10
            }]
        );
        assert!(b.take().notes.is_empty());
        let mut got = c.take().notes;
        got.sort_by_key(|n| match n {
            Note::Events { tag, .. } => *tag,
            _ => 0,
        });
        assert_eq!(
            got,
            [
                Note::Events {
                    tag: 3,
                    revision: 10
                },
                Note::Events {
                    tag: 4,
                    revision: 10
                }
            ]
        );

        index.release(1, &a);
        index.dispatch(
            &[batch(12, &["/apisix/routes/1", "/apisix/upstreams/1"])],
            12,
        );
        assert!(a.take().notes.is_empty());
        assert_eq!(
            b.take().notes,
            [Note::Events {
                tag: 2,
                revision: 12
            }]
        );
        assert_eq!(
            c.take().notes,
            [Note::Events {
                tag: 4,
                revision: 12
            }]
        );
        assert_eq!(index.registered(), 3);

        // A full inbox keeps the oldest notes and the lowest revision it dropped.
        for r in 0..MAX_NOTES as i64 + 5 {
            index.dispatch(&[batch(100 + r, &["/apisix/upstreams/1"])], 100 + r);
        }
        let t = b.take();
        assert_eq!(t.notes.len(), MAX_NOTES);
        assert_eq!(t.overflow_from, Some(100 + MAX_NOTES as i64));

        // A held inbox (parked session) keeps notes left before the hold, then only the
        // lowest revision; taking ends the hold.
        index.dispatch(&[batch(1000, &["/apisix/upstreams/1"])], 1000);
        b.hold();
        for r in 1001..1010 {
            index.dispatch(&[batch(r, &["/apisix/upstreams/1"])], r);
        }
        let t = b.take();
        assert_eq!(t.notes.len(), 1);
        assert_eq!(t.notes[0].revision(), 1000);
        assert_eq!(t.overflow_from, Some(1001));
        index.dispatch(&[batch(1010, &["/apisix/upstreams/1"])], 1010);
        let t = b.take();
        assert_eq!(t.notes.len(), 1);
        assert_eq!(t.overflow_from, None);
    }

    /// A parked session is not told anything (its inbox is not even locked by dispatch), and
    /// when it resumes every revision since it parked is marked missing, ahead of any later
    /// note; registering and releasing work on a parked registration.
    #[test]
    fn parked_sessions_are_skipped_and_resume_from_the_history() {
        let index = Index::default();
        let (a, b) = (Arc::new(Inbox::default()), Arc::new(Inbox::default()));
        let routes = KeyRange::prefix(b"/apisix/routes/");
        index.register(1, &routes, &a);
        index.register(1, &routes, &b);
        index.dispatch(&[batch(10, &["/apisix/routes/1"])], 10);
        a.hold();
        index.park(1, &a);
        index.park(1, &a);
        // While parked: a lock of the inbox by dispatch would show as a kept note or a lower
        // overflow revision; neither happens.
        index.dispatch(&[batch(11, &["/apisix/routes/1"])], 11);
        index.dispatch(&[batch(12, &["/apisix/routes/2"])], 12);
        let t = a.take();
        assert_eq!(
            t.notes,
            [Note::Events {
                tag: 1,
                revision: 10
            }]
        );
        // What it missed is marked when it resumes, not while it is parked.
        assert_eq!(t.overflow_from, None);
        assert_eq!(b.take().notes.len(), 3);
        // Still parked after a take: nothing.
        index.dispatch(&[batch(13, &["/apisix/routes/1"])], 13);
        assert!(a.take().notes.is_empty());
        // Registered twice while parked: both count, one release keeps it.
        index.register(1, &routes, &a);
        index.release(1, &a);
        index.unpark(1, &a);
        index.dispatch(&[batch(14, &["/apisix/routes/1"])], 14);
        let t = a.take();
        // Every revision since the park comes from the history, so a note after the resume
        // is not kept ahead of them.
        assert!(t.notes.is_empty());
        assert_eq!(t.overflow_from, Some(11));
        index.dispatch(&[batch(15, &["/apisix/routes/1"])], 15);
        assert_eq!(
            a.take().notes,
            [Note::Events {
                tag: 1,
                revision: 15
            }]
        );
        // Parked and resumed with nothing dispatched meanwhile: nothing marked missing.
        a.hold();
        index.park(1, &a);
        index.unpark(1, &a);
        let t = a.take();
        assert!(t.notes.is_empty());
        assert_eq!(t.overflow_from, None);
        // Released while parked: the registration goes with its last session.
        index.park(1, &a);
        index.release(1, &a);
        index.release(1, &b);
        assert_eq!(index.registered(), 0);
    }
}
