//! Certificate files re-read when they change on disk.
//!
//! etcd re-reads its certificate and key on every handshake. Here each use first compares the
//! files' identity (device, inode, size, modification and change times, following symlinks:
//! a Kubernetes Secret update swaps a `..data` symlink, cert-manager rewrites files) with the
//! one loaded, and loads them again only when it changed: a `stat` per file per handshake
//! instead of a read and a parse. A change that cannot be loaded (a certificate written before
//! its key, a half-written file) keeps the last good value and is logged once; the next change
//! is tried again.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::TlsError;

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    /// Device and inode (a symlink swap or a rename changes them).
    dev: u64,
    /// Inode.
    ino: u64,
    /// Size in bytes.
    len: u64,
    /// Modification time, nanoseconds.
    mtime: i128,
    /// Status change time, nanoseconds.
    ctime: i128,
}

fn stamp(path: &PathBuf) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// The loaded value and the file versions it came from.
struct Current<T> {
    /// The value in use.
    value: Arc<T>,
    /// Versions of the files `value` was loaded from.
    loaded: Vec<Option<Stamp>>,
    /// Versions that failed to load (not retried until the files change again).
    failed: Option<Vec<Option<Stamp>>>,
}

/// A value loaded from files and loaded again when they change.
pub struct Reloading<T> {
    /// What is loaded (for logs).
    what: &'static str,
    /// The files, in the order `load` reads them.
    paths: Vec<PathBuf>,
    /// Loads the value from the files.
    load: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    /// The value in use and the file versions it came from.
    current: Mutex<Current<T>>,
}

impl<T> fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish()
    }
}

impl<T> Reloading<T> {
    /// Loads the value now (an error stops startup) and remembers the files' versions.
    pub fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Reloading<T>, TlsError> {
        let loaded = paths.iter().map(stamp).collect();
        let value = Arc::new(load()?);
        Ok(Reloading {
            what,
            paths,
            load: Box::new(load),
            current: Mutex::new(Current {
                value,
                loaded,
                failed: None,
            }),
        })
    }

    /// The current value, loaded again first if a file changed since it was loaded.
    pub fn get(&self) -> Arc<T> {
        let now: Vec<Option<Stamp>> = self.paths.iter().map(stamp).collect();
        let Ok(mut cur) = self.current.lock() else {
            // A panic while loading: nothing to reload from safely. Keep serving.
            return self.poisoned();
        };
        if cur.loaded == now || cur.failed.as_ref() == Some(&now) {
            return cur.value.clone();
        }
        match (self.load)() {
            Ok(v) => {
                tracing::info!(what = self.what, files = ?self.paths, "reloaded");
                cur.value = Arc::new(v);
                cur.loaded = now;
                cur.failed = None;
            }
            Err(e) => {
                tracing::warn!(what = self.what, error = %e, "changed files not usable; keeping the previous ones");
                cur.failed = Some(now);
            }
        }
        cur.value.clone()
    }

    fn poisoned(&self) -> Arc<T> {
        match self.current.lock() {
            Ok(c) => c.value.clone(),
            Err(p) => p.into_inner().value.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn reloads_only_when_a_file_changes_and_keeps_the_last_good_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v");
        std::fs::write(&path, "1").unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let (p, l) = (path.clone(), loads.clone());
        let r = Reloading::new("test", vec![path.clone()], move || {
            l.fetch_add(1, Ordering::SeqCst);
            let s = std::fs::read_to_string(&p).map_err(|e| TlsError::Config(e.to_string()))?;
            s.trim()
                .parse::<u32>()
                .map_err(|e| TlsError::Config(e.to_string()))
        })
        .unwrap();
        assert_eq!(*r.get(), 1);
        assert_eq!(*r.get(), 1);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        // Replaced by a rename (as a Secret update does): a new inode.
        let tmp = dir.path().join("v.tmp");
        std::fs::write(&tmp, "22").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(*r.get(), 22);
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        // Unusable content: the last good value stays, and is not re-tried until it changes.
        std::fs::write(&tmp, "x").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(*r.get(), 22);
        assert_eq!(*r.get(), 22);
        assert_eq!(loads.load(Ordering::SeqCst), 3);
        std::fs::write(&tmp, "333").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(*r.get(), 333);
    }
}
