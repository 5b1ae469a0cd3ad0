//! Criterion benchmarks of the core engine alone (no Node), against real redb files in a temp dir.
//!
//! Run with `cargo bench -p kvstore-core` (a subset: `cargo bench -p kvstore-core -- reads`).
//! Every record is a ~150-byte envelope built with [`envelope::encode`].
//!
//! - `commit/nondurable/{1,2,4}` and `commit/durable/{1,2,4}`: records created or updated via
//!   `lock(key, LockMode::Any) + commit` from 1, 2 or 4 threads at once, each thread cycling over
//!   its own keys; reported as commits (elements) per second over all threads. Thread start-up
//!   is outside the timing (`iter_custom` + barriers). `durable` fsyncs before acknowledging, so
//!   the group-commit writer's batching shows up as throughput growing with the thread count.
//! - `get/hit`: `MapStore::get` on a 10 000-entry map, cycling over 1 000 keys that all stay in
//!   the entry cache (default capacity 10 000).
//! - `get/miss_no_cache`: the same gets with `cache_capacity: 0`, so every get reads the B-tree
//!   through the kept read snapshot.
//! - `get/miss_evicting`: `cache_capacity: 1 000` while the gets cycle over all 10 000 keys, so
//!   every get misses, reads the file and evicts an entry to fill the cache.
//! - `range/full_scan_10k`: one `MapStore::range` walk over all 10 000 entries, touching every
//!   key and record.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use kvstore_core::{
    envelope, Database, DatabaseOptions, LockMode, MapOptions, MapStore, RangeOptions,
};
use tempfile::TempDir;

/// Entries in the maps that the read benchmarks use.
const ENTRIES: usize = 10_000;
/// Keys each committing thread cycles over: the first pass creates them, later passes update.
const KEYS_PER_THREAD: u64 = 1_000;
/// Size of every record envelope.
const RECORD_BYTES: usize = 150;
const THREADS: [usize; 3] = [1, 2, 4];

/// A record envelope of exactly [`RECORD_BYTES`]: two metadata fields, then filler bytes.
fn record(seed: u64) -> Vec<u8> {
    let metadata = [
        ("path".to_string(), format!("/data/jobs/{seed:08}")),
        ("state".to_string(), "QUEUED".to_string()),
    ];
    let head = envelope::encode(&metadata, &[]).len();
    let value = vec![b'v'; RECORD_BYTES - head];
    envelope::encode(&metadata, &value)
}

fn key(i: usize) -> String {
    format!("job-{i:06}")
}

fn open(dir: &TempDir, durable: bool, cache_capacity: usize) -> (Database, MapStore) {
    let db = Database::open(
        dir.path().join("bench.redb"),
        DatabaseOptions {
            durable,
            ..DatabaseOptions::default()
        },
    )
    .expect("open database");
    let map = db
        .map_store(
            "jobs",
            MapOptions {
                cache_capacity,
                ..MapOptions::default()
            },
        )
        .expect("open map");
    (db, map)
}

fn put(map: &MapStore, key: &str, record: Vec<u8>) {
    map.lock(key, LockMode::Any, None)
        .expect("lock")
        .commit(record)
        .expect("commit");
}

/// A fresh non-durable store holding [`ENTRIES`] records, with the given cache capacity.
fn filled(cache_capacity: usize) -> (TempDir, Database, MapStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, map) = open(&dir, false, cache_capacity);
    for i in 0..ENTRIES {
        put(&map, &key(i), record(i as u64));
    }
    (dir, db, map)
}

/// Runs `iters` commits on each of `threads` threads and returns the wall time from the moment
/// all threads are ready until the last commit is acknowledged.
fn timed_commits(map: &MapStore, threads: usize, iters: u64) -> Duration {
    let start = Arc::new(Barrier::new(threads + 1));
    let end = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let map = map.clone();
            let (start, end) = (start.clone(), end.clone());
            let keys: Vec<String> = (0..KEYS_PER_THREAD)
                .map(|i| format!("t{t}-{i:05}"))
                .collect();
            let body = record(t as u64);
            thread::spawn(move || {
                start.wait();
                for i in 0..iters {
                    put(&map, &keys[(i % KEYS_PER_THREAD) as usize], body.clone());
                }
                end.wait();
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    end.wait();
    let elapsed = began.elapsed();
    for worker in workers {
        worker.join().expect("commit thread panicked");
    }
    elapsed
}

fn commits(c: &mut Criterion) {
    for durable in [false, true] {
        let mode = if durable { "durable" } else { "nondurable" };
        let mut group = c.benchmark_group(format!("commit/{mode}"));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(500));
        if durable {
            // Each commit waits for an fsync: few, equal-sized samples.
            group.sampling_mode(SamplingMode::Flat);
            group.measurement_time(Duration::from_secs(4));
        } else {
            group.measurement_time(Duration::from_secs(3));
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let (db, map) = open(&dir, durable, MapOptions::default().cache_capacity);
        for threads in THREADS {
            // One iteration = one commit on every thread.
            group.throughput(Throughput::Elements(threads as u64));
            group.bench_function(BenchmarkId::from_parameter(threads), |b| {
                b.iter_custom(|iters| timed_commits(&map, threads, iters))
            });
        }
        group.finish();
        db.close();
    }
}

fn reads(c: &mut Criterion) {
    let mut group = c.benchmark_group("get");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(1));
    // A stride coprime with ENTRIES visits every key once per cycle, out of key order.
    let spread = |i: usize| (i * 7_919) % ENTRIES;
    let keys: Vec<String> = (0..ENTRIES).map(|i| key(spread(i))).collect();

    let cases: [(&str, usize, usize); 3] = [
        ("hit", MapOptions::default().cache_capacity, 1_000),
        ("miss_no_cache", 0, ENTRIES),
        ("miss_evicting", 1_000, ENTRIES),
    ];
    for (name, cache_capacity, cycle) in cases {
        let (_dir, db, map) = filled(cache_capacity);
        for k in &keys[..cycle] {
            map.get(k).expect("get").expect("present");
        }
        let before = map.stats().expect("stats");
        let mut i = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let found = map.get(&keys[i % cycle]).expect("get");
                i += 1;
                black_box(found)
            })
        });
        // Check that each case measured what its name says.
        let after = map.stats().expect("stats");
        let (hits, misses) = (
            after.cache_hits - before.cache_hits,
            after.cache_misses - before.cache_misses,
        );
        if name == "hit" {
            assert_eq!(misses, 0, "{name}: {hits} hits, {misses} misses");
        } else {
            assert_eq!(hits, 0, "{name}: {hits} hits, {misses} misses");
        }
        db.close();
    }
    group.finish();
}

fn ranges(c: &mut Criterion) {
    let mut group = c.benchmark_group("range");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Elements(ENTRIES as u64));
    let (_dir, db, map) = filled(MapOptions::default().cache_capacity);
    group.bench_function("full_scan_10k", |b| {
        b.iter(|| {
            let mut count = 0usize;
            let mut bytes = 0usize;
            for entry in map.range(&RangeOptions::default()).expect("range") {
                let entry = entry.expect("entry");
                count += 1;
                bytes += entry.key().len() + entry.record().len();
            }
            assert_eq!(count, ENTRIES);
            black_box(bytes)
        })
    });
    group.finish();
    db.close();
}

criterion_group!(benches, commits, reads, ranges);
criterion_main!(benches);
