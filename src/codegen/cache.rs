//! A disk cache of emitted PTX. The key is the SHA-256 of everything that determines the text:
//! the kernels' description, the target, its features and this compiler's version, so a new
//! compiler or a changed kernel never sees a stale entry. Entries are written to a temporary file
//! and renamed into place, so a reader sees a whole entry or none; an entry that does not carry
//! its own key and a well-formed PTX body (e.g. truncated by a full disk) counts as a miss.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::{TARGET_CPU, TARGET_FEATURES};

/// First line of every entry: ties the file to its key and marks where the PTX starts.
const HEADER_PREFIX: &str = "// ccc-cache ";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    /// The cache under an explicit directory (created on first store).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// `$CCC_CACHE_DIR`, else `$XDG_CACHE_HOME/ccc`, else `~/.cache/ccc`; `None` if none is set.
    pub fn from_env() -> Option<Self> {
        let env_dir = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty()).map(PathBuf::from);
        env_dir("CCC_CACHE_DIR")
            .or_else(|| env_dir("XDG_CACHE_HOME").map(|dir| dir.join("ccc")))
            .or_else(|| env_dir("HOME").map(|dir| dir.join(".cache/ccc")))
            .map(PtxCache::at)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a set of kernels described by `description` (their configuration, printed).
    pub fn key(description: &str) -> String {
        let mut hasher = Sha256::new();
        for part in [description, TARGET_CPU, TARGET_FEATURES, env!("CARGO_PKG_VERSION")] {
            // Length-prefixed so that moving text between parts changes the key.
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.ptx"))
    }

    /// The cached PTX for `key`, or `None` on a miss (absent, unreadable or corrupted entry).
    pub fn load(&self, key: &str) -> Option<String> {
        let text = fs::read_to_string(self.path(key)).ok()?;
        let (header, ptx) = text.split_once('\n')?;
        let well_formed = header.strip_prefix(HEADER_PREFIX) == Some(key)
            && ptx.contains(".target")
            && ptx.ends_with('\n');
        well_formed.then(|| ptx.to_string())
    }

    /// Stores `ptx` under `key` atomically (temporary file in the same directory, then rename).
    pub fn store(&self, key: &str, ptx: &str) -> std::io::Result<()> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(&self.dir)?;
        let temporary = self
            .dir
            .join(format!(".{key}.{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let written = (|| {
            let mut file = fs::File::create(&temporary)?;
            file.write_all(format!("{HEADER_PREFIX}{key}\n").as_bytes())?;
            file.write_all(ptx.as_bytes())?;
            if !ptx.ends_with('\n') {
                file.write_all(b"\n")?;
            }
            file.sync_all()?;
            fs::rename(&temporary, self.path(key))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written
    }

    /// The cached PTX for `description`, or `emit()`'s, which is then stored. A failed store
    /// is not an error: the cache only saves time.
    pub fn get_or_emit<E>(&self, description: &str, emit: impl FnOnce() -> Result<String, E>) -> Result<String, E> {
        let key = Self::key(description);
        if let Some(ptx) = self.load(&key) {
            return Ok(ptx);
        }
        let ptx = emit()?;
        let _ = self.store(&key, &ptx);
        Ok(ptx)
    }
}
