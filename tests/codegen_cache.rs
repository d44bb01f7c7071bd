#![cfg(feature = "llvm")]
//! The PTX disk cache: keys, hits, misses, corrupted entries, atomic replacement.

use ccc::codegen::cache::PtxCache;

const PTX: &str = "//\n.version 8.0\n.target sm_90a\n.address_size 64\n";

fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ccc-cache-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn codegen_cache_key_is_sha256_hex_and_depends_on_the_description() {
    let key = PtxCache::key("gemm 128x128");
    assert_eq!(key.len(), 64);
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(key, PtxCache::key("gemm 128x128"));
    assert_ne!(key, PtxCache::key("gemm 128x64"));
}

#[test]
fn codegen_cache_miss_then_hit() {
    let cache = PtxCache::at(fresh_dir("hit"));
    let key = PtxCache::key("kernel a");
    assert_eq!(cache.load(&key), None);
    cache.store(&key, PTX).expect("store");
    assert_eq!(cache.load(&key).as_deref(), Some(PTX));
    assert_eq!(cache.load(&PtxCache::key("kernel b")), None);
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from(format!("{key}.ptx"))]);
    std::fs::remove_dir_all(cache.dir()).unwrap();
}

#[test]
fn codegen_cache_corrupted_entries_are_misses() {
    let cache = PtxCache::at(fresh_dir("corrupt"));
    let key = PtxCache::key("kernel");
    cache.store(&key, PTX).expect("store");
    let path = cache.dir().join(format!("{key}.ptx"));
    let whole = std::fs::read_to_string(&path).unwrap();
    // Truncated mid-line.
    std::fs::write(&path, &whole[..whole.len() - 5]).unwrap();
    assert_eq!(cache.load(&key), None);
    // Another key's entry copied under this name.
    let other = PtxCache::key("other");
    std::fs::write(&path, whole.replace(&key, &other)).unwrap();
    assert_eq!(cache.load(&key), None);
    // Not PTX at all.
    std::fs::write(&path, b"\xff\xfe garbage").unwrap();
    assert_eq!(cache.load(&key), None);
    // A store repairs it.
    cache.store(&key, PTX).expect("store");
    assert_eq!(cache.load(&key).as_deref(), Some(PTX));
    std::fs::remove_dir_all(cache.dir()).unwrap();
}

#[test]
fn codegen_cache_get_or_emit_emits_once() {
    let cache = PtxCache::at(fresh_dir("emit"));
    let mut emitted = 0;
    for _ in 0..3 {
        let ptx = cache
            .get_or_emit("attention d128", || {
                emitted += 1;
                Ok::<_, String>(PTX.to_string())
            })
            .expect("emit");
        assert_eq!(ptx, PTX);
    }
    assert_eq!(emitted, 1);
    let failed = cache.get_or_emit("other kernel", || Err::<String, _>("LLVM failed".to_string()));
    assert_eq!(failed, Err("LLVM failed".to_string()));
    std::fs::remove_dir_all(cache.dir()).unwrap();
}
