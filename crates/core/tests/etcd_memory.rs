//! Memory of the replica: RSS of this process before and after a core reads a prefix of
//! 100 000 entries of ~100-byte values. Ignored (it measures, it does not test): run with
//! `cargo test --release -p kvstore-core --features etcd --test etcd_memory -- --ignored --nocapture`.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use etcd_cluster::EtcdCluster;
use kvstore_core::etcd::{ClusterDatabase, ClusterOptions};
use kvstore_core::{envelope, MapOptions};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore]
fn replica_rss_at_100k_entries() {
    const N: usize = 100_000;
    let cluster = EtcdCluster::start_with_args(1, &["--quota-backend-bytes=4294967296"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let value = envelope::encode(&[("path".into(), "/data/x".into())], &[b'v'; 90]);
    let started = Instant::now();
    rt.block_on(async {
        let mut c = Client::connect(cluster.endpoints(), None).await.unwrap();
        for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|i| TxnOp::put(format!("/app/data/m/{i:013}"), value.clone(), None))
                .collect();
            c.txn(Txn::new().and_then(ops)).await.unwrap();
        }
    });
    eprintln!(
        "loaded {N} entries of {} bytes in {:?}",
        value.len(),
        started.elapsed()
    );
    drop(rt);
    let before = rss_kib();
    let started = Instant::now();
    let db = ClusterDatabase::open(
        &cluster.url("app"),
        ClusterOptions {
            request_timeout: Duration::from_secs(30),
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    let opened = started.elapsed();
    let map = db.map_store("m", &MapOptions::default()).unwrap();
    assert_eq!(map.stats().unwrap().entries, N as u64);
    db.sync().unwrap();
    let after = rss_kib();
    eprintln!(
        "open (replica read) took {opened:?}; RSS {before} KiB before, {after} KiB after: \
         the replica of {N} entries costs {} KiB ({} bytes an entry)",
        after - before,
        (after - before) * 1024 / N as u64
    );
    let snapshot = map.snapshot().unwrap();
    assert_eq!(snapshot.len(), N);
    db.close().unwrap();
}
