//! Throughput of the etcd engine on a 1-member loopback cluster (ignored: it measures). Run with
//! `cargo test --release -p kvstore-core --features etcd --test etcd_throughput -- --ignored --nocapture --test-threads 1`.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::time::{Duration, Instant};

use etcd_cluster::EtcdCluster;
use kvstore_core::etcd::{ClusterDatabase, ClusterOptions};
use kvstore_core::{envelope, LockMode, MapOptions};

const TASKS: usize = 64;
const EACH: usize = 50;

fn run(name: &str, work: impl Fn(usize, usize) + Sync) {
    let started = Instant::now();
    let slowest = std::sync::Mutex::new(Duration::ZERO);
    std::thread::scope(|s| {
        for t in 0..TASKS {
            let (work, slowest) = (&work, &slowest);
            s.spawn(move || {
                for i in 0..EACH {
                    let op = Instant::now();
                    work(t, i);
                    let took = op.elapsed();
                    let mut slowest = slowest.lock().unwrap();
                    *slowest = (*slowest).max(took);
                }
            });
        }
    });
    let elapsed = started.elapsed();
    eprintln!(
        "{name}: {} ops in {elapsed:?} = {:.0}/s (slowest op {:?})",
        TASKS * EACH,
        (TASKS * EACH) as f64 / elapsed.as_secs_f64(),
        slowest.into_inner().unwrap()
    );
}

#[test]
#[ignore]
fn throughput() {
    let cluster = EtcdCluster::start(1);
    let db = ClusterDatabase::open(
        &cluster.url("bench"),
        ClusterOptions {
            request_timeout: Duration::from_secs(10),
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    let value = envelope::encode(&[], &[b'v'; 100]);
    let before = map.stats().unwrap();
    run("create-conc", |t, i| {
        map.lock(&format!("c-{t}-{i}"), LockMode::New, None)
            .unwrap()
            .commit(value.clone())
            .unwrap()
    });
    let after = map.stats().unwrap();
    eprintln!(
        "  {} commits in {} batches (largest {})",
        after.commits - before.commits,
        after.batches - before.batches,
        after.largest_batch
    );
    let before = after;
    run("rmw-conc-hot (10 keys)", |t, i| {
        let guard = map
            .lock(&format!("hot-{}", (t + i) % 10), LockMode::Any, None)
            .unwrap();
        let n = guard.decoded().unwrap().map_or(0, |r| r.value.len());
        guard
            .commit(envelope::encode(&[], &vec![b'x'; n % 100 + 1]))
            .unwrap()
    });
    let after = map.stats().unwrap();
    eprintln!(
        "  {} commits in {} batches",
        after.commits - before.commits,
        after.batches - before.batches,
    );
    let keys: Vec<String> = map.snapshot().unwrap().keys().cloned().collect();
    let started = Instant::now();
    let mut found = 0;
    for round in 0..20 {
        for k in &keys {
            found += map.get(k).unwrap().is_some() as usize;
        }
        let _ = round;
    }
    eprintln!(
        "get-random: {found} gets in {:?} = {:.0}/s",
        started.elapsed(),
        found as f64 / started.elapsed().as_secs_f64()
    );
}
