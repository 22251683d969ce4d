//! Key ranges with etcd's conventions, in one place.
//!
//! etcd encodes a range as `(key, range_end)`: an empty `range_end` means the single key `key`,
//! `range_end == "\0"` means every key `>= key`, anything else is the half-open `[key, range_end)`.
//! [`KeyRange`] is that rule made explicit, so containment and membership are computed once.

use bytes::Bytes;

/// Where a key range stops.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum End {
    /// Only the start key itself (`range_end` empty).
    Single,
    /// Every key from the start on (`range_end == "\0"`).
    Unbounded,
    /// Keys strictly before this one.
    Before(Bytes),
}

/// A range of keys as etcd understands it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRange {
    /// First key in the range.
    pub start: Bytes,
    /// Where the range stops.
    pub end: End,
}

impl KeyRange {
    /// From etcd's `(key, range_end)` pair.
    pub fn new(key: &Bytes, range_end: &Bytes) -> KeyRange {
        let end = match range_end.as_ref() {
            [] => End::Single,
            [0] => End::Unbounded,
            _ => End::Before(range_end.clone()),
        };
        KeyRange {
            start: key.clone(),
            end,
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        let start = Bytes::copy_from_slice(prefix);
        let end = match prefix_end(prefix) {
            Some(e) => End::Before(e),
            None => End::Unbounded,
        };
        KeyRange { start, end }
    }

    /// The `range_end` etcd would be sent for this range.
    pub fn range_end(&self) -> Bytes {
        match &self.end {
            End::Single => Bytes::new(),
            End::Unbounded => Bytes::from_static(b"\0"),
            End::Before(e) => e.clone(),
        }
    }

    /// True when `key` is in the range.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        match &self.end {
            End::Single => key == self.start.as_ref(),
            End::Unbounded => key >= self.start.as_ref(),
            End::Before(e) => key >= self.start.as_ref() && key < e.as_ref(),
        }
    }

    /// True when no key can be in the range (`range_end <= key`).
    pub fn is_empty(&self) -> bool {
        matches!(&self.end, End::Before(e) if e.as_ref() <= self.start.as_ref())
    }

    /// True when every key of `other` is also in `self` (an empty `other` counts as
    /// contained only when its start is inside, so it is answered by the same cache).
    pub fn covers(&self, other: &KeyRange) -> bool {
        if !self.contains_key(&other.start) {
            return false;
        }
        match (&self.end, &other.end) {
            (_, End::Single) => true,
            (End::Unbounded, _) => true,
            (_, End::Before(oe)) if other.is_empty() => {
                let _ = oe;
                true
            }
            (End::Before(se), End::Before(oe)) => oe <= se,
            (End::Before(_), End::Unbounded) => false,
            (End::Single, _) => false,
        }
    }

    /// Keys of a sorted map within this range, as bounds for `BTreeMap::range`.
    pub fn bounds(&self) -> (std::ops::Bound<&[u8]>, std::ops::Bound<&[u8]>) {
        use std::ops::Bound::*;
        let start = Included(self.start.as_ref());
        match &self.end {
            End::Single => (start, Included(self.start.as_ref())),
            End::Unbounded => (start, Unbounded),
            // Empty (`range_end <= key`): `[start, start)` selects nothing and, unlike two
            // equal excluded bounds, is a range `BTreeMap::range` accepts.
            End::Before(e) if e.as_ref() <= self.start.as_ref() => {
                (start, Excluded(self.start.as_ref()))
            }
            End::Before(e) => (start, Excluded(e.as_ref())),
        }
    }
}

/// The smallest key greater than every key starting with `prefix`, or `None` when there is
/// none (empty prefix or all `0xff`), meaning "to the end of the keyspace".
pub fn prefix_end(prefix: &[u8]) -> Option<Bytes> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(Bytes::from(end));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(k: &str, e: &str) -> KeyRange {
        KeyRange::new(&Bytes::from(k.to_string()), &Bytes::from(e.to_string()))
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(
            prefix_end(b"/apisix/"),
            Some(Bytes::from_static(b"/apisix0"))
        );
        assert_eq!(prefix_end(b"a\xff"), Some(Bytes::from_static(b"b")));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn coverage() {
        let p = KeyRange::prefix(b"/apisix/");
        assert!(p.covers(&r("/apisix/routes/1", "")));
        assert!(p.covers(&r("/apisix/routes/", "/apisix/routes0")));
        assert!(p.covers(&r("/apisix/", "/apisix0")));
        assert!(!p.covers(&r("/apisix", "/apisiy")));
        assert!(!p.covers(&r("/apisix/", "\0")));
        assert!(!p.covers(&r("/apisix/a", "/apisix1")));
        assert!(p.covers(&r("/apisix/b", "/apisix/a")), "empty range inside");
        assert!(!p.covers(&r("/other", "")));
        let all = KeyRange::prefix(b"");
        assert!(all.covers(&r("a", "\0")));
    }

    #[test]
    fn membership() {
        let x = r("b", "d");
        assert!(x.contains_key(b"b") && x.contains_key(b"c") && !x.contains_key(b"d"));
        assert!(r("b", "").contains_key(b"b") && !r("b", "").contains_key(b"ba"));
        assert!(r("b", "\0").contains_key(b"zzz") && !r("b", "\0").contains_key(b"a"));
        assert!(r("d", "b").is_empty());
    }

    #[test]
    fn empty_ranges_select_nothing() {
        let mut m = std::collections::BTreeMap::new();
        for k in ["a", "b", "c"] {
            m.insert(k.as_bytes().to_vec(), ());
        }
        for (k, e) in [("b", "b"), ("c", "a")] {
            let range = r(k, e);
            assert_eq!(m.range::<[u8], _>(range.bounds()).count(), 0, "{k}..{e}");
        }
        assert_eq!(m.range::<[u8], _>(r("a", "c").bounds()).count(), 2);
    }
}
