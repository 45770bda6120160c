//! Change data capture's positions, classification and resume rule.

use causeway_core::cdc::{classify, resume, Kind, Op, Position, Resume, Side};
use causeway_core::Timestamp;
use proptest::prelude::*;

proptest! {
    /// Ids sort as strings exactly as positions sort, and parse back.
    #[test]
    fn ids_sort_like_positions_and_round_trip(
        a in (any::<u64>(), any::<u32>()), b in (any::<u64>(), any::<u32>()),
    ) {
        let (pa, pb) = (Position::new(Timestamp(a.0), a.1), Position::new(Timestamp(b.0), b.1));
        prop_assert_eq!(pa.cmp(&pb), pa.id().cmp(&pb.id()));
        prop_assert_eq!(pa.id().parse::<Position>().unwrap(), pa);
        prop_assert_eq!(pa.id().len(), 31);
    }

    /// A bare ts resumes after every event of that ts and before every later one.
    #[test]
    fn a_ts_cursor_resumes_after_its_whole_transaction(ts in 0u64..u64::MAX, index in any::<u32>()) {
        let cursor: Position = ts.to_string().parse().unwrap();
        prop_assert!(!cursor.emits(Position::new(Timestamp(ts), index)));
        prop_assert!(cursor.emits(Position::new(Timestamp(ts + 1), 0)));
    }
}

#[test]
fn bad_cursors_are_refused() {
    for bad in [
        "",
        ".",
        "1.",
        ".1",
        "-1",
        "1.2.3",
        "x",
        "1 ",
        "123456789012345678901",
        "1.12345678901",
        "1e3",
    ] {
        assert!(bad.parse::<Position>().is_err(), "{bad:?}");
    }
    assert_eq!(
        "7.2".parse::<Position>().unwrap(),
        Position::new(Timestamp(7), 2)
    );
}

#[test]
fn the_classification_table() {
    use Side::*;
    assert_eq!(
        classify(Absent, Matching),
        Some((Kind::Created, Op::Create))
    );
    assert_eq!(
        classify(Matching, Matching),
        Some((Kind::Updated, Op::Update))
    );
    assert_eq!(classify(Other, Matching), Some((Kind::Updated, Op::Update)));
    assert_eq!(
        classify(Matching, Absent),
        Some((Kind::Deleted, Op::Delete))
    );
    assert_eq!(classify(Matching, Other), Some((Kind::Left, Op::Update)));
    for (b, a) in [
        (Absent, Absent),
        (Absent, Other),
        (Other, Other),
        (Other, Absent),
    ] {
        assert_eq!(classify(b, a), None, "{b:?} -> {a:?}");
    }
}

#[test]
fn a_feed_resumes_only_while_its_history_is_held() {
    let mid = Position::new(Timestamp(10), 1);
    let end = Position::end_of(Timestamp(10));
    // Mid-transaction it re-reads ts 10, which needs the version at 9.
    assert_eq!(resume(mid, Timestamp(1), Timestamp(9)), Resume::From(mid));
    assert!(
        matches!(resume(mid, Timestamp(1), Timestamp(10)), Resume::HistoryLost { lost_below, .. } if lost_below == Timestamp(10))
    );
    // After the whole of ts 10, it reads from 11.
    assert_eq!(resume(end, Timestamp(11), Timestamp(10)), Resume::From(end));
    assert!(
        matches!(resume(end, Timestamp(12), Timestamp(0)), Resume::HistoryLost { lost_below, .. } if lost_below == Timestamp(12))
    );
    // A new feed at 0 on a fresh cluster.
    assert_eq!(
        resume(Position::end_of(Timestamp(0)), Timestamp(1), Timestamp(0)),
        Resume::From(Position::end_of(Timestamp(0)))
    );
    // Where a resumed feed reads from and holds: inside ts 10, from 9; after it, from 10.
    assert_eq!(mid.resolved(), Timestamp(9));
    assert_eq!(end.resolved(), Timestamp(10));
    // The largest cursor a client can send does not overflow.
    let last = Position::end_of(Timestamp(u64::MAX));
    assert_eq!(resume(last, Timestamp(1), Timestamp(5)), Resume::From(last));
}
