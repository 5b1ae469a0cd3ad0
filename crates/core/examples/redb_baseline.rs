//! The floor under kvstore's sequential non-durable commits: redb alone, one random update per
//! non-durable transaction on a 20 000-entry table, with the benchmark's keys and 150-byte
//! values. `cargo run --release -p kvstore-core --example redb_baseline`
use redb::{Database, Durability, TableDefinition};
const T: TableDefinition<&str, &[u8]> = TableDefinition::new("t");
fn key(i: u64) -> String {
    format!("/data/projects/p{}/file-{:08}", i % 100, i)
}
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("p.redb")).unwrap();
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
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        for _ in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut txn = db.begin_write().unwrap();
            txn.set_durability(Durability::None).unwrap();
            {
                let mut t = txn.open_table(T).unwrap();
                t.insert(key((x >> 33) % n).as_str(), value.as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        println!(
            "non-durable random update commit: {:.1} us",
            t0.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
