//! The Rust side of kvstore: open a store, create, lock, update, read, iterate.
//! Run with `cargo run -p kvstore-core --example quickstart`.

use kvstore_core::typed::MSGPACK;
use kvstore_core::{Database, DatabaseOptions, LockMode, MapOptions, RangeOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    state: String,
    attempts: u32,
}

fn main() -> kvstore_core::Result<()> {
    let dir = std::env::temp_dir().join(format!("kvstore-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = Database::open(dir.join("state.redb"), DatabaseOptions::default())?;
    let jobs = db.map_store(
        "jobs",
        MapOptions {
            codec: MSGPACK.into(),
            ..MapOptions::default()
        },
    )?;

    // Create: the entry comes back locked; committing persists it and releases the lock.
    let created = jobs.lock("job-1", LockMode::New, None)?;
    let job = Job {
        state: "NEW".into(),
        attempts: 0,
    };
    created.commit_value(&job, &[("path".into(), "/data/x".into())])?;

    // Get for update: exclusive per key across threads, until commit or drop.
    let lock = jobs.lock("job-1", LockMode::Existing, None)?;
    let mut entry = lock.value::<Job>()?.expect("created above");
    entry.value.state = "DONE".into();
    entry.value.attempts += 1;
    lock.commit_value(&entry.value, &entry.metadata)?;

    // An auto key, in creation order.
    let auto = jobs.lock_new_auto()?;
    println!("auto key {}", auto.key());
    auto.commit_value(
        &Job {
            state: "QUEUED".into(),
            attempts: 0,
        },
        &[],
    )?;

    // Read committed data without locks, over one snapshot.
    for item in jobs.range(&RangeOptions::default())? {
        let item = item?;
        let record = kvstore_core::envelope::decode(item.record())?;
        let job: Job = kvstore_core::typed::from_msgpack(&record.value)?;
        println!("{} {:?} {:?}", item.key(), job, record.metadata);
    }
    db.close();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
