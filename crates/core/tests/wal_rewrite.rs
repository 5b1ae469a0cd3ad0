//! The rewrite after a reopen (the changes acknowledged since the last durable redb commit,
//! written again) may be split into small transactions only when the write-ahead log holds them
//! all, synced: a crash midway then replays the log. Here the log cannot be created and a
//! non-durable handle's group commit is rewritten after a full disk; the child is killed at
//! every sync of the rewrite in turn: the group is whole or absent, never half there.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kvstore_core::{
    envelope, Change, CommitOptions, Database, DatabaseOptions, LockMode, MapOptions,
};

const TEST: &str = "a_group_rewritten_after_a_full_disk_is_whole_or_absent_after_a_kill";
const GROUP: usize = 10;

fn record(value: &[u8]) -> Change {
    Change::Put(Arc::from(envelope::encode(&[], value)))
}

/// The child: a durable handle (whose log cannot be created) and a non-durable one; a group of
/// GROUP entries acknowledged, then a commit that finds the disk full, retried after a reopen
/// that rewrites the group; the disk fills for good after `syncs` syncs; then a crash.
fn child(path: &Path, syncs: usize) {
    let space = Arc::new(common::DiskSpace::default());
    let disk = space.clone();
    let backend = kvstore_core::Backend(Arc::new(move |at: &Path| {
        if at.as_os_str().to_string_lossy().ends_with("-wal") {
            // The log cannot be created (as for a name too long).
            return Err(std::io::Error::from_raw_os_error(36));
        }
        let file = redb::backends::FileBackend::new(common::open_file(at)?)
            .map_err(std::io::Error::other)?;
        Ok(Box::new(common::FillingDisk {
            file,
            space: disk.clone(),
        }) as Box<dyn redb::StorageBackend>)
    }));
    let options = DatabaseOptions {
        backend: Some(backend),
        page_cache_bytes: 256 << 10,
        sync_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let durable = Database::open(path, options.clone()).unwrap();
    let first = durable.map_store("m", MapOptions::default()).unwrap();
    let mut guard = first.lock("first", LockMode::Any, None).unwrap();
    durable
        .commit_guards(vec![(&mut guard, record(b"x"))], CommitOptions::default())
        .unwrap();
    let relaxed = Database::open(
        path,
        DatabaseOptions {
            durable: false,
            ..options
        },
    )
    .unwrap();
    let map = relaxed.map_store("m", MapOptions::default()).unwrap();
    let mut guards: Vec<_> = (0..GROUP)
        .map(|i| map.lock(&format!("g{i}"), LockMode::Any, None).unwrap())
        .collect();
    let items = guards
        .iter_mut()
        .map(|g| (g, record(&vec![b'v'; 40 << 10])))
        .collect();
    relaxed
        .commit_guards(items, CommitOptions::default())
        .unwrap();
    space.syncs_left.store(syncs, Ordering::SeqCst);
    space.full_once.store(true, Ordering::SeqCst);
    let mut next = map.lock("next", LockMode::Any, None).unwrap();
    let _ = relaxed.commit_guards(
        vec![(&mut next, record(&vec![b'n'; 300 << 10]))],
        CommitOptions::default(),
    );
    std::process::abort();
}

#[test]
fn a_group_rewritten_after_a_full_disk_is_whole_or_absent_after_a_kill() {
    if let (Ok(path), Ok(syncs)) = (std::env::var("KV_REWRITE_STORE"), std::env::var("KV_SYNCS")) {
        child(Path::new(&path), syncs.parse().unwrap());
        return;
    }
    let mut split = Vec::new();
    for syncs in 1..=12 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let status = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
            .env("KV_REWRITE_STORE", &path)
            .env("KV_SYNCS", syncs.to_string())
            .output()
            .unwrap()
            .status;
        assert!(!status.success(), "the child crashes");
        let db = Database::open(&path, DatabaseOptions::default()).unwrap();
        let map = db.map_store("m", MapOptions::default()).unwrap();
        let present = (0..GROUP)
            .filter(|i| map.get_record(&format!("g{i}")).unwrap().is_some())
            .count();
        if present != 0 && present != GROUP {
            split.push((syncs, present));
        }
        db.close();
    }
    assert!(
        split.is_empty(),
        "a group half there after a kill (syncs, entries): {split:?}"
    );
}
