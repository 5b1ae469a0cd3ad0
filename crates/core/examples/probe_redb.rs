use redb::{Database, Durability, TableDefinition};
const T: TableDefinition<&str, &[u8]> = TableDefinition::new("t");
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("p.redb")).unwrap();
    let value = vec![7u8; 150];
    for round in 0..3 {
        let n = 20000;
        let t0 = std::time::Instant::now();
        for i in 0..n {
            let mut txn = db.begin_write().unwrap();
            txn.set_durability(Durability::None).unwrap();
            {
                let mut t = txn.open_table(T).unwrap();
                let key = format!("/data/projects/p{}/file-{:08}", i % 100, i + round * n);
                t.insert(key.as_str(), value.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        println!(
            "non-durable single-insert commit: {:.1} us",
            t0.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
