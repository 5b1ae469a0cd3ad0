//! Several held locks, one atomic commit, on an etcd cluster (through the store-level API, as
//! the binding uses it): one nested transaction fenced by every lock; a lost lock fails the
//! whole commit with LockLost and nothing is written; refused inputs keep every lock; the locks
//! of a failed commit pass on to other processes.
#![cfg(feature = "etcd")]

#[path = "common/etcd.rs"]
mod etcd_cluster;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use etcd_cluster::{options, raw_client, EtcdCluster};
use kvstore_core::{
    envelope, Change, CommitItem, CommitOptions, Database, ErrorCode, LockMode, MapOptions,
    MapStore, Result,
};

fn open(cluster: &EtcdCluster, prefix: &str) -> Database {
    Database::open_cluster(&cluster.url(prefix), options()).unwrap()
}

fn put(value: &str) -> Change {
    Change::Put(Arc::from(envelope::encode(&[], value.as_bytes())))
}

fn value(map: &MapStore, key: &str) -> Option<String> {
    map.get_record(key)
        .unwrap()
        .map(|r| String::from_utf8(r.value).unwrap())
}

/// Commits `items` as one group and waits: a refusal at once or the callback's outcome.
fn commit(db: &Database, items: Vec<CommitItem>, options: CommitOptions) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    db.commit_group(
        items,
        options,
        Box::new(move |r| {
            tx.send(r).unwrap();
        }),
    )?;
    let outcome = rx.recv().unwrap();
    assert!(rx.try_recv().is_err(), "done hears once");
    outcome
}

/// Waits until `db`'s replica holds everything committed before the call.
fn sync(db: &Database) {
    let (tx, rx) = mpsc::channel();
    db.sync_with(Box::new(move |r| tx.send(r).unwrap()));
    rx.recv().unwrap().unwrap();
}

#[test]
fn a_group_is_written_whole_refusals_keep_every_lock_and_update_only_keeps_them() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let j = jobs.lock("j", LockMode::New, None).unwrap();
    let p = paths.lock("/data/a", LockMode::New, None).unwrap();
    let before = jobs.stats().unwrap();
    commit(
        &db,
        vec![
            (jobs.clone(), "j".into(), j.token(), put("queued")),
            (paths.clone(), "/data/a".into(), p.token(), put("j")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    // Read-your-writes: both are in the replica once the commit is acknowledged.
    assert_eq!(value(&jobs, "j").as_deref(), Some("queued"));
    assert_eq!(value(&paths, "/data/a").as_deref(), Some("j"));
    assert!(!jobs.holds("j", j.token()) && !paths.holds("/data/a", p.token()));
    assert_eq!(jobs.stats().unwrap().commits - before.commits, 1);
    drop((j, p));

    // Refused: nothing written, every lock still held.
    let other = open(&cluster, "other");
    let foreign_map = other.map_store("jobs", MapOptions::default()).unwrap();
    let foreign = foreign_map.lock("f", LockMode::New, None).unwrap();
    let j = jobs.lock("j", LockMode::Existing, None).unwrap();
    let p = paths.lock("/data/a", LockMode::Existing, None).unwrap();
    let released = jobs.lock("gone", LockMode::New, None).unwrap();
    let gone = released.token();
    released.release();
    let cases: Vec<(&str, Vec<CommitItem>, CommitOptions)> = vec![
        (
            "a released lock",
            vec![
                (jobs.clone(), "j".into(), j.token(), put("x")),
                (jobs.clone(), "gone".into(), gone, put("x")),
            ],
            CommitOptions::default(),
        ),
        (
            "a lock of another store",
            vec![
                (jobs.clone(), "j".into(), j.token(), put("x")),
                (foreign_map.clone(), "f".into(), foreign.token(), put("x")),
            ],
            CommitOptions::default(),
        ),
        (
            "the same lock twice",
            vec![
                (jobs.clone(), "j".into(), j.token(), put("x")),
                (jobs.clone(), "j".into(), j.token(), put("y")),
            ],
            CommitOptions::default(),
        ),
        (
            "a delete with update_only",
            vec![
                (jobs.clone(), "j".into(), j.token(), put("x")),
                (paths.clone(), "/data/a".into(), p.token(), Change::Delete),
            ],
            CommitOptions {
                update_only: true,
                ..CommitOptions::default()
            },
        ),
    ];
    for (what, items, options) in cases {
        let err = commit(&db, items, options).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{what}: {err}");
        assert!(jobs.holds("j", j.token()), "{what}");
        assert!(paths.holds("/data/a", p.token()), "{what}");
        assert!(foreign_map.holds("f", foreign.token()), "{what}");
    }
    // Only another store's locks, through this store: refused when submitted, locks kept.
    let err = commit(
        &db,
        vec![(foreign_map.clone(), "f".into(), foreign.token(), put("x"))],
        CommitOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(foreign_map.holds("f", foreign.token()));
    // More entries than one etcd transaction takes.
    let many: Vec<_> = (0..65)
        .map(|i| jobs.lock(&format!("m{i:02}"), LockMode::New, None).unwrap())
        .collect();
    let items = many
        .iter()
        .map(|g| (jobs.clone(), g.key().to_string(), g.token(), put("m")))
        .collect();
    let err = commit(&db, items, CommitOptions::default()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument, "{err}");
    assert!(many.iter().all(|g| jobs.holds(g.key(), g.token())));
    drop(many);
    sync(&db);
    assert_eq!(value(&jobs, "j").as_deref(), Some("queued"));
    assert_eq!(value(&jobs, "gone"), None);
    assert_eq!(value(&jobs, "m00"), None);
    assert_eq!(foreign_map.get_record("f").unwrap(), None);

    // update_only keeps both locks for the next commit.
    let keep = CommitOptions {
        update_only: true,
        ..CommitOptions::default()
    };
    for round in 0..3 {
        commit(
            &db,
            vec![
                (
                    jobs.clone(),
                    "j".into(),
                    j.token(),
                    put(&format!("run {round}")),
                ),
                (paths.clone(), "/data/a".into(), p.token(), put("j")),
            ],
            keep,
        )
        .unwrap();
        assert!(jobs.holds("j", j.token()) && paths.holds("/data/a", p.token()));
    }
    commit(
        &db,
        vec![
            (jobs.clone(), "j".into(), j.token(), put("done")),
            (paths.clone(), "/data/a".into(), p.token(), Change::Delete),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    assert_eq!(value(&jobs, "j").as_deref(), Some("done"));
    assert_eq!(value(&paths, "/data/a"), None);
    // Another core (another process) sees the same.
    let elsewhere = Database::open_cluster(&cluster.url("app"), options()).unwrap();
    sync(&elsewhere);
    let far = elsewhere.map_store("jobs", MapOptions::default()).unwrap();
    assert_eq!(value(&far, "j").as_deref(), Some("done"));
}

#[test]
fn a_lost_lock_fails_the_whole_group_with_lock_lost_and_its_locks_pass_on() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    kvstore_core::MapStore::lock(&jobs, "j", LockMode::New, None)
        .unwrap()
        .commit(envelope::encode(&[], b"old"))
        .unwrap();
    paths
        .lock("p", LockMode::New, None)
        .unwrap()
        .commit(envelope::encode(&[], b"old"))
        .unwrap();
    let (rt, mut client) = raw_client(&cluster);
    // The loss found when the commit is checked, or only by its transaction's fences.
    for (hold, prepared_first) in [(true, false), (false, false), (true, true), (false, true)] {
        let what = format!("hold {hold}, prepared first {prepared_first}");
        let j = jobs.lock("j", LockMode::Existing, None).unwrap();
        let p = paths.lock("p", LockMode::Existing, None).unwrap();
        let items = || {
            vec![
                (jobs.clone(), "j".to_string(), j.token(), put("new")),
                (paths.clone(), "p".to_string(), p.token(), put("new")),
            ]
        };
        let options = CommitOptions {
            hold_lock_on_failure: hold,
            ..CommitOptions::default()
        };
        let (tx, rx) = mpsc::channel();
        let done: kvstore_core::CommitCallback = Box::new(move |r| tx.send(r).unwrap());
        let prepared = if prepared_first {
            Some(db.prepare_group(items(), options, done).unwrap())
        } else {
            None
        };
        // Break one of the two fences behind the store's back: delete the lock key of 'p'.
        rt.block_on(client.delete(
            "/app/lock/paths/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ))
        .unwrap();
        let err = match prepared {
            Some(prepared) => {
                db.submit(vec![prepared]);
                rx.recv().unwrap().unwrap_err()
            }
            None => commit(&db, items(), options).unwrap_err(),
        };
        assert_eq!(err.code(), ErrorCode::LockLost, "{what}: {err}");
        sync(&db);
        assert_eq!(value(&jobs, "j").as_deref(), Some("old"), "{what}");
        assert_eq!(value(&paths, "p").as_deref(), Some("old"), "{what}");
        drop((j, p));
    }
    let (_, raw) = (
        (),
        rt.block_on(client.get(
            "/app/data/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        ))
        .unwrap(),
    );
    assert!(
        raw.kvs().iter().all(|kv| !kv.value().ends_with(b"new")),
        "nothing of the failed commits reached the cluster"
    );
    // Both keys pass on: to another process, then back to this one.
    let other =
        kvstore_core::etcd::ClusterDatabase::open_unshared(&cluster.url("app"), options()).unwrap();
    let other_jobs = other.map_store("jobs", &MapOptions::default()).unwrap();
    let other_paths = other.map_store("paths", &MapOptions::default()).unwrap();
    let wait = Some(Duration::from_secs(10));
    let oj = other_jobs.lock("j", LockMode::Existing, wait).unwrap();
    let op = other_paths.lock("p", LockMode::Existing, wait).unwrap();
    oj.commit(envelope::encode(&[], b"other")).unwrap();
    op.commit(envelope::encode(&[], b"other")).unwrap();
    let j = jobs.lock("j", LockMode::Existing, wait).unwrap();
    let p = paths.lock("p", LockMode::Existing, wait).unwrap();
    assert_eq!(j.decoded().unwrap().unwrap().value, b"other");
    commit(
        &db,
        vec![
            (jobs.clone(), "j".into(), j.token(), put("again")),
            (paths.clone(), "p".into(), p.token(), put("again")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    assert_eq!(value(&paths, "p").as_deref(), Some("again"));
}

#[test]
fn entry_guards_commit_together_and_end_as_their_own_commit_would() {
    let cluster = EtcdCluster::start(1);
    let db = open(&cluster, "app");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let mut job = jobs.lock("j", LockMode::New, None).unwrap();
    let mut claim = paths.lock("p", LockMode::New, None).unwrap();
    let keep = CommitOptions {
        update_only: true,
        ..CommitOptions::default()
    };
    db.commit_guards(vec![(&mut job, put("j1")), (&mut claim, put("p1"))], keep)
        .unwrap();
    assert_eq!(job.decoded().unwrap().unwrap().value, b"j1");
    assert!(job.existed() && jobs.holds("j", job.token()));
    db.commit_guards(
        vec![(&mut job, put("j2")), (&mut claim, Change::Delete)],
        CommitOptions::default(),
    )
    .unwrap();
    assert!(!jobs.holds("j", job.token()) && !paths.holds("p", claim.token()));
    assert_eq!(value(&jobs, "j").as_deref(), Some("j2"));
    assert_eq!(value(&paths, "p"), None);
    let err = db
        .commit_guards(vec![(&mut job, put("j3"))], CommitOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    let err = job
        .commit_with(envelope::encode(&[], b"x"), keep)
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::LockReleased);
    let next = jobs
        .lock("j", LockMode::Existing, Some(Duration::from_secs(10)))
        .unwrap();
    drop((job, claim));
    assert!(
        jobs.holds("j", next.token()),
        "a spent guard frees nobody's lock"
    );
    // A guard of another store is refused, every lock kept.
    let other = open(&cluster, "other");
    let mut foreign = other
        .map_store("jobs", MapOptions::default())
        .unwrap()
        .lock("f", LockMode::New, None)
        .unwrap();
    let mut next = next;
    let err = db
        .commit_guards(
            vec![(&mut next, put("x")), (&mut foreign, put("y"))],
            CommitOptions::default(),
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(jobs.holds("j", next.token()));
    db.commit_guards(vec![(&mut next, put("j4"))], CommitOptions::default())
        .unwrap();
    assert_eq!(value(&jobs, "j").as_deref(), Some("j4"));
}
