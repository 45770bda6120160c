//! Crash recovery: a child process (this test binary, re-executed) applies a stream and is
//! killed with SIGKILL at random points. Reopened, its applied position matches its data, and
//! resuming ends with the same versions and digests as a store that never crashed: nothing
//! lost, nothing applied twice.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use causeway_core::{Interval, Timestamp};
use causeway_store_node::storage::parse_version_key;
use causeway_store_node::Store;
use common::*;

const CHILD_ENV: &str = "CAUSEWAY_CRASH_CHILD_DIR";
const SEED: u64 = 42;
const LAST: u64 = 600;
const DOCS: u64 = 25;
const GROUP: u64 = 4;

/// The child: applies the stream from its applied position, printing each committed position.
/// Does nothing unless run by `sigkill_at_random_points_loses_nothing`.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(&dir, small_options()).unwrap();
    let mut ts = store.applied().0 + 1;
    while ts <= LAST {
        let end = (ts + GROUP - 1).min(LAST);
        let records: Vec<_> = (ts..=end).map(|t| stream_record(SEED, t, DOCS)).collect();
        store.apply(&records, &full()).unwrap();
        println!("committed {}", store.committed().0);
        ts = end + 1;
    }
}

#[test]
fn sigkill_at_random_points_loses_nothing() {
    let reference_dir = tempfile::tempdir().unwrap();
    let reference = Store::open(reference_dir.path(), small_options()).unwrap();
    apply_stream(&reference, SEED, 1, LAST, GROUP, DOCS);

    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(0xC0FFEE);
    let mut kills = 0;
    for _round in 0..6 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Let it commit a random number of groups, then kill it mid-way through later work.
        let wait_for = 1 + rng.below(25);
        let mut last_seen = 0;
        let mut seen = 0;
        while seen < wait_for {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(n) = line.strip_prefix("committed ") {
                        last_seen = n.parse().unwrap();
                        seen += 1;
                    }
                }
                _ => break,
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // Reopen: the applied position covers every commit the child reported, and its data is
        // exactly the reference's at that position.
        let store = Store::open(dir.path(), small_options()).unwrap();
        let applied = store.applied();
        assert!(
            applied.0 >= last_seen,
            "lost a committed group: {applied} < {last_seen}"
        );
        assert_eq!(store.committed(), applied);
        let raw = store.raw_versions(&Interval::FULL).unwrap();
        assert!(
            raw.iter()
                .all(|r| parse_version_key(&r.key).unwrap().ts <= applied),
            "versions above the applied position"
        );
        let expected: Vec<_> = reference
            .raw_versions(&Interval::FULL)
            .unwrap()
            .into_iter()
            .filter(|r| parse_version_key(&r.key).unwrap().ts <= applied)
            .collect();
        assert_eq!(raw, expected, "data at applied position {applied}");
        if applied.0 > 0 {
            assert_eq!(
                store.digest(&Interval::FULL, applied).unwrap(),
                reference.digest(&Interval::FULL, applied).unwrap()
            );
        }
        if applied.0 == LAST {
            break;
        }
    }
    assert!(kills >= 1);
    // Resume to the end in this process.
    let store = Store::open(dir.path(), small_options()).unwrap();
    let from = store.applied().0 + 1;
    apply_stream(&store, SEED, from, LAST, GROUP, DOCS);
    assert_eq!(store.applied(), Timestamp(LAST));
    assert_eq!(
        store.raw_versions(&Interval::FULL).unwrap(),
        reference.raw_versions(&Interval::FULL).unwrap()
    );
    for ts in [1, LAST / 2, LAST] {
        assert_eq!(
            store.digest(&Interval::FULL, Timestamp(ts)).unwrap(),
            reference.digest(&Interval::FULL, Timestamp(ts)).unwrap()
        );
    }
}
