//! Regression tests for defects of the etcd engine found in review: lost lock wake-ups, the
//! lock after a commit of unknown outcome, a replaced cluster, nested prefixes, backups racing
//! compaction.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use etcd_cluster::EtcdCluster;
use kvstore_core::etcd::{ClusterDatabase, ClusterOptions};
use kvstore_core::{envelope, LockMode, MapOptions};

fn options() -> ClusterOptions {
    ClusterOptions {
        request_timeout: Duration::from_secs(5),
        ..ClusterOptions::default()
    }
}

fn open_other(cluster: &EtcdCluster, prefix: &str) -> ClusterDatabase {
    ClusterDatabase::open_unshared(&cluster.url(prefix), options()).unwrap()
}

fn rec(value: &str) -> Vec<u8> {
    envelope::encode(&[], value.as_bytes())
}

/// Watches the cluster's keys under `prefix` from now on; `next_put` waits for the next put.
struct KeyWatch {
    rt: tokio::runtime::Runtime,
    stream: etcd_client::WatchStream,
    _client: etcd_client::Client,
}

impl KeyWatch {
    fn new(cluster: &EtcdCluster, prefix: &str) -> KeyWatch {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (client, stream) = rt.block_on(async {
            let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
                .await
                .unwrap();
            let stream = client
                .watch(prefix, Some(WatchOptions::new().with_prefix()))
                .await
                .unwrap();
            (client, stream)
        });
        KeyWatch {
            rt,
            stream,
            _client: client,
        }
    }

    /// The key of the next put event (in 30 s at most).
    fn next_put(&mut self) -> Vec<u8> {
        let stream = &mut self.stream;
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    let resp = stream.message().await.unwrap().unwrap();
                    for event in resp.events() {
                        if event.event_type() == EventType::Put {
                            return event.kv().unwrap().key().to_vec();
                        }
                    }
                }
            })
            .await
            .expect("no put in time")
        })
    }
}

/// The waiter's replica misses the predecessor's release and re-lock (the same lock key name,
/// deleted and put again): it must still wake, by the create revision.
#[test]
fn a_waiter_wakes_when_the_predecessor_key_is_deleted_and_put_again_while_it_is_behind() {
    let cluster = EtcdCluster::start(1);
    let a = open_other(&cluster, "app");
    let b = open_other(&cluster, "app");
    let map_a = a.map_store("m", &MapOptions::default()).unwrap();
    let map_b = b.map_store("m", &MapOptions::default()).unwrap();
    let mut locks = KeyWatch::new(&cluster, "/app/lock/");
    let held = map_a.lock("k", LockMode::Any, None).unwrap();
    let a_key = locks.next_put();

    b.pause_replica(true);
    let (b_done, b_got) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let g = map_b.lock("k", LockMode::Any, None).unwrap();
        b_done.send(()).unwrap();
        g.commit(rec("b")).unwrap();
    });
    let b_key = locks.next_put();
    assert_ne!(a_key, b_key);
    // B waits for A's key (registered while its replica is paused).
    assert!(b.wait_lock_waits(1, Duration::from_secs(20)));

    // A releases and queues again at once (same key name, new create revision, behind B).
    held.commit(rec("a1")).unwrap();
    let (a_done, a_got) = mpsc::channel();
    let relock = std::thread::spawn(move || {
        let g = map_a.lock("k", LockMode::Any, None).unwrap();
        a_done.send(()).unwrap();
        g.commit(rec("a2")).unwrap();
    });
    assert_eq!(locks.next_put(), a_key);
    b.pause_replica(false);

    b_got
        .recv_timeout(Duration::from_secs(20))
        .expect("the waiter never woke (lost wake-up)");
    a_got.recv_timeout(Duration::from_secs(20)).unwrap();
    waiter.join().unwrap();
    relock.join().unwrap();
}
