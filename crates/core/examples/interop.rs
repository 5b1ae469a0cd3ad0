//! The Rust half of the Node↔Rust file test (__test__/interop.spec.mjs).
//! `interop read <file>`: prints table `interop` as JSON lines { key, value, metadata }.
//! `interop write <file>`: writes the entries that the Node half expects to read.

use kvstore_core::typed::{Entry, MSGPACK};
use kvstore_core::{envelope, Database, DatabaseOptions, LockMode, MapOptions, RangeOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    id: u64,
    path: String,
    tags: Vec<String>,
    done: bool,
    ratio: f64,
}

fn main() -> kvstore_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (mode, path) = match (args.get(1), args.get(2)) {
        (Some(mode), Some(path)) => (mode.as_str(), path.as_str()),
        _ => {
            eprintln!("usage: interop read|write <file>");
            std::process::exit(2);
        }
    };
    let db = Database::open(path, DatabaseOptions::default())?;
    let map = db.map_store(
        "interop",
        MapOptions {
            codec: MSGPACK.into(),
            ..MapOptions::default()
        },
    )?;
    match mode {
        "read" => {
            for item in map.range(&RangeOptions::default())? {
                let item = item?;
                let record = envelope::decode(item.record())?;
                let value: serde_json::Value = kvstore_core::typed::from_msgpack(&record.value)?;
                let metadata: serde_json::Map<String, serde_json::Value> = record
                    .metadata
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "key": item.key(), "value": value, "metadata": metadata })
                );
            }
        }
        "write" => {
            for id in 0..3u64 {
                let guard = map.lock(&format!("rust-{id}"), LockMode::Any, None)?;
                let job = Job {
                    id,
                    path: format!("/data/r{id}"),
                    tags: vec!["rust".into(), format!("n{id}")],
                    done: id % 2 == 0,
                    ratio: id as f64 / 4.0,
                };
                guard.commit_value(&job, &[("writer".into(), "rust".into())])?;
            }
            let back: Option<Entry<Job>> = map.get_value("rust-1")?;
            assert_eq!(back.map(|e| e.value.path), Some("/data/r1".to_string()));
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
    db.close();
    Ok(())
}
