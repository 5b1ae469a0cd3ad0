//! Several held locks, one atomic commit, on a file: refused inputs keep every lock and write
//! nothing; a group is written whole or not at all (an I/O failure, a lock taken meanwhile);
//! `update_only` and `hold_lock_on_failure` apply to every lock; waiters on any of the keys are
//! granted the new records in order; the blocking form over `EntryGuard`s.

mod common;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use kvstore_core::{
    envelope, Acquire, Change, CommitItem, CommitOptions, Database, DatabaseOptions, ErrorCode,
    LockMode, LockToken, MapOptions, MapStore, Result,
};

fn put(value: &str) -> Change {
    Change::Put(Arc::from(envelope::encode(&[], value.as_bytes())))
}

fn value(map: &MapStore, key: &str) -> Option<String> {
    map.get_record(key)
        .unwrap()
        .map(|r| String::from_utf8(r.value).unwrap())
}

fn open(dir: &tempfile::TempDir, name: &str) -> Database {
    Database::open(dir.path().join(name), DatabaseOptions::default()).unwrap()
}

/// Takes `key`'s lock, which must be free.
fn take(map: &MapStore, key: &str) -> LockToken {
    match map.acquire(key, 0, || unreachable!("free")).unwrap() {
        Acquire::Granted(grant) => grant.token,
        Acquire::Queued => panic!("{key} is held"),
    }
}

/// Commits `items` as one group and waits for the outcome.
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

#[test]
fn both_are_written_in_one_transaction_and_both_locks_released() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a.redb");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let job = take(&jobs, "j1");
    let claim = take(&paths, "/data/a");
    let before = jobs.stats().unwrap();
    commit(
        &db,
        vec![
            (jobs.clone(), "j1".into(), job, put("queued")),
            (paths.clone(), "/data/a".into(), claim, put("j1")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    assert_eq!(value(&jobs, "j1").as_deref(), Some("queued"));
    assert_eq!(value(&paths, "/data/a").as_deref(), Some("j1"));
    assert!(!jobs.holds("j1", job) && !paths.holds("/data/a", claim));
    let after = jobs.stats().unwrap();
    assert_eq!(after.batches - before.batches, 1, "one transaction");
    assert_eq!(after.commits - before.commits, 1, "counted as one commit");
    assert_eq!(after.locks_held + paths.stats().unwrap().locks_held, 0);

    // A delete and a put together; an empty group is nothing to do.
    let job = take(&jobs, "j1");
    let claim = take(&paths, "/data/a");
    commit(
        &db,
        vec![
            (jobs.clone(), "j1".into(), job, put("done")),
            (paths.clone(), "/data/a".into(), claim, Change::Delete),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    assert_eq!(value(&jobs, "j1").as_deref(), Some("done"));
    assert_eq!(value(&paths, "/data/a"), None);
    commit(&db, Vec::new(), CommitOptions::default()).unwrap();

    // Durable: the group is there after a reopen.
    db.close();
    let db = open(&dir, "a.redb");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    assert_eq!(value(&jobs, "j1").as_deref(), Some("done"));
}

#[test]
fn refused_inputs_write_nothing_and_keep_every_lock() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a.redb");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let elsewhere = open(&dir, "other.redb");
    let foreign = elsewhere.map_store("jobs", MapOptions::default()).unwrap();
    let job = take(&jobs, "j");
    let claim = take(&paths, "p");
    let other = take(&foreign, "f");
    let released = take(&jobs, "gone");
    jobs.release("gone", released).unwrap();

    let cases: Vec<(&str, Vec<CommitItem>, CommitOptions)> = vec![
        (
            "a released lock",
            vec![
                (jobs.clone(), "j".into(), job, put("x")),
                (jobs.clone(), "gone".into(), released, put("x")),
            ],
            CommitOptions::default(),
        ),
        (
            "a lock of another file",
            vec![
                (jobs.clone(), "j".into(), job, put("x")),
                (foreign.clone(), "f".into(), other, put("x")),
            ],
            CommitOptions::default(),
        ),
        (
            "the same lock twice",
            vec![
                (jobs.clone(), "j".into(), job, put("x")),
                (paths.clone(), "p".into(), claim, put("x")),
                (jobs.clone(), "j".into(), job, put("y")),
            ],
            CommitOptions::default(),
        ),
        (
            "a wrong token",
            vec![
                (jobs.clone(), "j".into(), job, put("x")),
                (paths.clone(), "p".into(), claim + 1000, put("x")),
            ],
            CommitOptions::default(),
        ),
        (
            "a delete with update_only",
            vec![
                (jobs.clone(), "j".into(), job, put("x")),
                (paths.clone(), "p".into(), claim, Change::Delete),
            ],
            CommitOptions {
                update_only: true,
                ..CommitOptions::default()
            },
        ),
    ];
    for (what, items, options) in cases {
        let err = db
            .commit_group(items, options, Box::new(|_| panic!("refused at once")))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{what}: {err}");
        assert!(
            err.to_string().contains("nothing was written"),
            "{what}: {err}"
        );
        assert!(jobs.holds("j", job), "{what}");
        assert!(paths.holds("p", claim), "{what}");
        assert!(foreign.holds("f", other), "{what}");
    }
    // The other file's lock through the other file's handle, ours through ours: refused too.
    let err = elsewhere
        .commit_group(
            vec![(jobs.clone(), "j".into(), job, put("x"))],
            CommitOptions::default(),
            Box::new(|_| panic!("refused at once")),
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert_eq!(value(&jobs, "j"), None);
    assert_eq!(value(&paths, "p"), None);
    assert_eq!(value(&foreign, "f"), None);
    // Still usable: the same locks commit fine afterwards.
    commit(
        &db,
        vec![
            (jobs.clone(), "j".into(), job, put("x")),
            (paths.clone(), "p".into(), claim, put("y")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    assert_eq!(value(&paths, "p").as_deref(), Some("y"));
}

#[test]
fn locks_of_another_handle_on_the_same_file_join_the_commit() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb");
    let b = open(&dir, "a.redb");
    let ma = a.map_store("jobs", MapOptions::default()).unwrap();
    let mb = b.map_store("paths", MapOptions::default()).unwrap();
    let ta = take(&ma, "j");
    let tb = take(&mb, "p");
    commit(
        &a,
        vec![
            (ma.clone(), "j".into(), ta, put("1")),
            (mb.clone(), "p".into(), tb, put("2")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    assert_eq!(value(&ma, "j").as_deref(), Some("1"));
    assert_eq!(value(&mb, "p").as_deref(), Some("2"));

    // A lock whose handle closed is no longer held: refused, the other lock kept.
    let ta = take(&ma, "j");
    let tb = take(&mb, "p");
    b.close();
    let err = a
        .commit_group(
            vec![
                (ma.clone(), "j".into(), ta, put("3")),
                (mb.clone(), "p".into(), tb, put("4")),
            ],
            CommitOptions::default(),
            Box::new(|_| panic!("refused at once")),
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(ma.holds("j", ta));
    assert_eq!(value(&ma, "j").as_deref(), Some("1"));
}

#[test]
fn update_only_keeps_every_lock_and_hold_lock_on_failure_keeps_them_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a.redb");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let job = take(&jobs, "j");
    let claim = take(&paths, "p");
    let keep = CommitOptions {
        update_only: true,
        ..CommitOptions::default()
    };
    for round in 0..3 {
        commit(
            &db,
            vec![
                (jobs.clone(), "j".into(), job, put(&format!("j{round}"))),
                (paths.clone(), "p".into(), claim, put(&format!("p{round}"))),
            ],
            keep,
        )
        .unwrap();
        assert!(jobs.holds("j", job) && paths.holds("p", claim));
        assert_eq!(value(&jobs, "j"), Some(format!("j{round}")));
    }

    // An oversize record fails the whole commit before it is queued.
    let big = Change::Put(Arc::from(vec![1u8; kvstore_core::MAX_RECORD_BYTES + 1]));
    let hold = CommitOptions {
        hold_lock_on_failure: true,
        ..CommitOptions::default()
    };
    let err = db
        .commit_group(
            vec![
                (jobs.clone(), "j".into(), job, put("never")),
                (paths.clone(), "p".into(), claim, big),
            ],
            hold,
            Box::new(|_| panic!("refused at once")),
        )
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(jobs.holds("j", job) && paths.holds("p", claim), "held");
    assert_eq!(value(&jobs, "j").as_deref(), Some("j2"), "nothing written");
    let big = Change::Put(Arc::from(vec![1u8; kvstore_core::MAX_RECORD_BYTES + 1]));
    db.commit_group(
        vec![
            (jobs.clone(), "j".into(), job, put("never")),
            (paths.clone(), "p".into(), claim, big),
        ],
        CommitOptions::default(),
        Box::new(|_| panic!("refused at once")),
    )
    .unwrap_err();
    assert!(
        !jobs.holds("j", job) && !paths.holds("p", claim),
        "released"
    );
    assert_eq!(value(&jobs, "j").as_deref(), Some("j2"));
    assert_eq!(jobs.stats().unwrap().locks_held, 0);
}

#[test]
fn a_failed_write_fails_the_whole_group_and_leaves_both_entries_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(common::Faults::default());
    let db = common::open_faulty(&dir.path().join("f.redb"), &faults);
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let (j, p) = (take(&jobs, "j"), take(&paths, "p"));
    commit(
        &db,
        vec![
            (jobs.clone(), "j".into(), j, put("old-j")),
            (paths.clone(), "p".into(), p, put("old-p")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    for (hold, what) in [(true, "held"), (false, "released")] {
        let (j, p) = (take(&jobs, "j"), take(&paths, "p"));
        faults.write.set(common::EIO);
        let err = commit(
            &db,
            vec![
                (jobs.clone(), "j".into(), j, put("new-j")),
                (paths.clone(), "p".into(), p, put("new-p")),
            ],
            CommitOptions {
                hold_lock_on_failure: hold,
                ..CommitOptions::default()
            },
        )
        .unwrap_err();
        faults.write.clear();
        assert_eq!(err.code(), ErrorCode::Io, "{what}");
        assert_eq!(jobs.holds("j", j), hold, "{what}");
        assert_eq!(paths.holds("p", p), hold, "{what}");
        assert_eq!(value(&jobs, "j").as_deref(), Some("old-j"), "{what}");
        assert_eq!(value(&paths, "p").as_deref(), Some("old-p"), "{what}");
        if hold {
            // Retry with the locks kept: now both land.
            commit(
                &db,
                vec![
                    (jobs.clone(), "j".into(), j, put("old-j")),
                    (paths.clone(), "p".into(), p, put("old-p")),
                ],
                CommitOptions::default(),
            )
            .unwrap();
        }
    }
    db.close();
    let db = Database::open(dir.path().join("f.redb"), DatabaseOptions::default()).unwrap();
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    assert_eq!(value(&jobs, "j").as_deref(), Some("old-j"));
    assert_eq!(value(&paths, "p").as_deref(), Some("old-p"));
}

#[test]
fn waiters_queued_on_either_key_are_granted_the_new_records_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a.redb");
    let jobs = db.map_store("jobs", MapOptions::default()).unwrap();
    let paths = db.map_store("paths", MapOptions::default()).unwrap();
    let (j, p) = (take(&jobs, "j"), take(&paths, "p"));
    // Three waiters on each key, queued before the commit; each grant records what it read
    // of both keys, then releases.
    let (tx, rx) = mpsc::channel::<(String, usize, Option<String>, Option<String>)>();
    let mut ticket = 1;
    for i in 0..3 {
        for (map, key) in [(&jobs, "j"), (&paths, "p")] {
            let (map2, jobs2, paths2, tx) = (map.clone(), jobs.clone(), paths.clone(), tx.clone());
            let queued = map
                .acquire(key, ticket, move || {
                    Ok(Box::new(move |grant: Result<kvstore_core::Grant>| {
                        let grant = grant.unwrap();
                        let locked = map2.finish_acquire(key, grant, LockMode::Existing).unwrap();
                        let mine = locked.record.map(|r| {
                            String::from_utf8(envelope::decode(&r).unwrap().value).unwrap()
                        });
                        let (other_map, other) = if key == "j" {
                            (&paths2, "p")
                        } else {
                            (&jobs2, "j")
                        };
                        tx.send((key.to_string(), i, mine, value(other_map, other)))
                            .unwrap();
                        map2.release(key, locked.token).unwrap();
                    }))
                })
                .unwrap();
            assert!(matches!(queued, Acquire::Queued));
            ticket += 1;
        }
    }
    assert_eq!(jobs.stats().unwrap().locks_waiting, 3);
    commit(
        &db,
        vec![
            (jobs.clone(), "j".into(), j, put("J")),
            (paths.clone(), "p".into(), p, put("P")),
        ],
        CommitOptions::default(),
    )
    .unwrap();
    let mut order = std::collections::HashMap::<String, Vec<usize>>::new();
    for _ in 0..6 {
        let (key, i, mine, other) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        let (want_mine, want_other) = if key == "j" { ("J", "P") } else { ("P", "J") };
        assert_eq!(mine.as_deref(), Some(want_mine), "waiter {i} on {key}");
        assert_eq!(
            other.as_deref(),
            Some(want_other),
            "waiter {i} on {key} sees the other key"
        );
        order.entry(key).or_default().push(i);
    }
    assert_eq!(order["j"], vec![0, 1, 2], "first come, first served");
    assert_eq!(order["p"], vec![0, 1, 2]);
}

#[test]
fn entry_guards_commit_together_and_end_as_their_own_commit_would() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir, "a.redb");
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
    assert_eq!(
        job.decoded().unwrap().unwrap().value,
        b"j1",
        "the guard has the new record"
    );
    assert!(job.existed());
    assert!(jobs.holds("j", job.token()));
    db.commit_guards(
        vec![(&mut job, put("j2")), (&mut claim, Change::Delete)],
        CommitOptions::default(),
    )
    .unwrap();
    assert!(!jobs.holds("j", job.token()) && !paths.holds("p", claim.token()));
    assert_eq!(value(&jobs, "j").as_deref(), Some("j2"));
    assert_eq!(value(&paths, "p"), None);
    // Spent guards: committing them again is refused, and dropping them does nothing.
    let err = db
        .commit_guards(vec![(&mut job, put("j3"))], CommitOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    let err = job
        .commit_with(envelope::encode(&[], b"x"), keep)
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::LockReleased);
    let next = jobs
        .lock("j", LockMode::Existing, Some(Duration::from_secs(5)))
        .unwrap();
    drop(job);
    drop(claim);
    assert!(
        jobs.holds("j", next.token()),
        "dropping a spent guard frees nobody's lock"
    );
}
