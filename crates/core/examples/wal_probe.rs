//! Probe for issue 11 (a write-ahead log in front of redb): a durable redb commit per batch
//! against a non-durable redb commit plus a log record written into a pre-zeroed log file and
//! fdatasync'ed, per batch of 1 and of 60 random updates on a 20 000-entry table. Set
//! PROBE_DIR to a folder on the disk to measure (default /tmp).
//! `cargo run --release -p kvstore-core --example wal_probe`
use std::io::Write;
use std::os::unix::fs::FileExt;

use redb::{Database, Durability, TableDefinition};
const T: TableDefinition<&str, &[u8]> = TableDefinition::new("t");
fn key(i: u64) -> String {
    format!("/data/projects/p{}/file-{:08}", i % 100, i)
}
fn main() {
    let dir = tempfile::tempdir_in(std::env::var("PROBE_DIR").unwrap_or("/tmp".into())).unwrap();
    let db = Database::create(dir.path().join("p.redb")).unwrap();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.path().join("p.wal"))
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..32 {
        log.write_all(&zeros).unwrap();
    }
    log.sync_all().unwrap();
    let mut at = 0u64;
    let value = vec![7u8; 150];
    let n = 20000u64;
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(T).unwrap();
        for i in 0..n {
            t.insert(key(i).as_str(), value.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
    let mut x = 12345u64;
    for batch in [1usize, 60] {
        for wal in [false, true] {
            let rounds = if batch == 1 { 2000 } else { 400 };
            let t0 = std::time::Instant::now();
            for r in 0..rounds {
                let mut txn = db.begin_write().unwrap();
                if wal {
                    txn.set_durability(Durability::None).unwrap();
                }
                let mut record = Vec::new();
                {
                    let mut t = txn.open_table(T).unwrap();
                    for _ in 0..batch {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let k = key((x >> 33) % n);
                        t.insert(k.as_str(), value.as_slice()).unwrap();
                        record.extend_from_slice(k.as_bytes());
                        record.extend_from_slice(&value);
                    }
                }
                txn.commit().unwrap();
                if wal {
                    log.write_all_at(&record, at).unwrap();
                    at += record.len() as u64;
                    log.sync_data().unwrap();
                    if r % 200 == 199 {
                        // checkpoint
                        let txn = db.begin_write().unwrap();
                        txn.commit().unwrap();
                        at = 0;
                    }
                }
            }
            println!(
                "batch {batch:3} {}: {:.0} us per batch",
                if wal {
                    "non-durable + log fdatasync"
                } else {
                    "durable redb commit        "
                },
                t0.elapsed().as_secs_f64() * 1e6 / rounds as f64
            );
        }
    }
}
