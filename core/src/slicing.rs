//! Random Slicing with Cut-Shift: the `u64` keyspace split into intervals owned by weighted
//! partitions.
//!
//! Every partition owns a share of the keyspace proportional to its weight, as a set of
//! intervals that need not be contiguous. A change of the partition set or of the weights
//! (adding, removing, reweighting) is one [`Slicing::rebalance`]:
//!
//! 1. **Targets.** Each partition's new share is its exact weight share of `2^64` keys, rounded
//!    by the largest-remainder method, so every share is within one key of the exact value and the
//!    shares add up to the whole keyspace. Arithmetic is in `u128`; no floats anywhere.
//! 2. **Cut.** A partition whose share shrinks cuts its excess off its own intervals, leaving gaps:
//!    whole intervals first, smallest first, then the tail of the smallest interval that covers the
//!    rest. A removed partition leaves all of its intervals as gaps.
//! 3. **Shift.** Each partition whose share grows fills its deficit from the gaps: first a gap next
//!    to one of its own intervals (which then merges with it), else the smallest gap that covers
//!    the rest (one new interval), else the largest gap whole, until the deficit is met.
//! 4. **Merge.** Adjacent intervals of one partition become one.
//!
//! Only keys in gaps change owner, and the gaps hold exactly the shrinking partitions' excess,
//! so an operation moves exactly `Σ max(0, old share − new share)` keys: the minimum any scheme
//! that ends with these shares can move. [`Movement`] reports it and `rebalance` asserts it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::key::KeyHash;
use crate::node::PartitionId;

/// The number of keys in the keyspace, `2^64`.
pub const KEYSPACE: u128 = 1 << 64;

/// A half-open range `[start, end)` of the keyspace; `end` may be `2^64`, one past `u64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Interval {
    pub start: u64,
    pub end: u128,
}

impl Interval {
    /// The whole keyspace.
    pub const FULL: Interval = Interval {
        start: 0,
        end: KEYSPACE,
    };

    /// `[start, end)`. Panics unless `start < end <= 2^64`.
    pub fn new(start: u64, end: u128) -> Interval {
        assert!(
            u128::from(start) < end && end <= KEYSPACE,
            "invalid interval [{start}, {end})"
        );
        Interval { start, end }
    }

    /// The number of keys in the interval (at least one).
    pub fn len(&self) -> u128 {
        self.end - u128::from(self.start)
    }

    /// Always false: an interval holds at least one key. Here for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, hash: KeyHash) -> bool {
        self.start <= hash.0 && u128::from(hash.0) < self.end
    }

    /// The exclusive end as a hash, or `None` when the interval runs to the end of the keyspace.
    /// Storage turns this into a key range bound.
    pub fn end_hash(&self) -> Option<u64> {
        u64::try_from(self.end).ok()
    }

    /// The keys in both intervals, if any.
    pub fn intersect(&self, other: &Interval) -> Option<Interval> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (u128::from(start) < end).then_some(Interval { start, end })
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:016x}, ", self.start)?;
        match self.end_hash() {
            Some(end) => write!(f, "{end:016x})"),
            None => write!(f, "end)"),
        }
    }
}

/// Why a slicing could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlicingError {
    #[error("a slicing needs at least one partition")]
    NoPartitions,
    #[error("partition {0} has weight 0; remove it instead")]
    ZeroWeight(PartitionId),
    #[error("partition {0} is not in the slicing")]
    UnknownPartition(PartitionId),
    #[error("partition {0} is already in the slicing")]
    DuplicatePartition(PartitionId),
    #[error("the intervals do not cover the keyspace exactly once: {0}")]
    BadCover(String),
    #[error("partition {partition} owns {owned} keys but its weight gives it {target}")]
    ShareMismatch {
        partition: PartitionId,
        owned: u128,
        target: u128,
    },
}

/// What one rebalance moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Movement {
    /// Keys whose owner changed.
    pub moved_keys: u128,
    /// The least any assignment with the new shares must move: `Σ max(0, old − new)`.
    pub minimum_keys: u128,
}

impl Movement {
    /// Moved keys as a fraction of the keyspace.
    pub fn moved_fraction(&self) -> f64 {
        self.moved_keys as f64 / KEYSPACE as f64
    }
}

/// The assignment of the keyspace to weighted partitions. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SlicingRepr", into = "SlicingRepr")]
pub struct Slicing {
    weights: BTreeMap<PartitionId, u32>,
    /// Interval starts, ascending; the first is 0. Interval `i` ends where `i + 1` starts.
    starts: Vec<u64>,
    /// The owner of each interval; neighbours always differ (adjacent intervals are merged).
    owners: Vec<PartitionId>,
}

/// A working segment of the keyspace during a rebalance; `owner: None` is a gap.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u128,
    end: u128,
    owner: Option<PartitionId>,
}

impl Segment {
    fn len(&self) -> u128 {
        self.end - self.start
    }
}

impl Slicing {
    /// The first layout of `weights`: one interval per partition, in id order.
    pub fn initial(weights: &BTreeMap<PartitionId, u32>) -> Result<Slicing, SlicingError> {
        let empty = vec![Segment {
            start: 0,
            end: KEYSPACE,
            owner: None,
        }];
        let (slicing, _) = Self::cut_shift(empty, weights)?;
        Ok(slicing)
    }

    /// `count` partitions `0..count` of equal weight.
    pub fn uniform(count: u32) -> Result<Slicing, SlicingError> {
        Self::initial(&(0..count).map(|p| (PartitionId(p), 1)).collect())
    }

    /// The slicing for `weights` that moves the fewest keys from this one. Partitions missing
    /// from `weights` are removed, new ones are added, the rest are reweighted.
    pub fn rebalance(
        &self,
        weights: &BTreeMap<PartitionId, u32>,
    ) -> Result<(Slicing, Movement), SlicingError> {
        let segments = self
            .intervals()
            .map(|(interval, owner)| Segment {
                start: u128::from(interval.start),
                end: interval.end,
                owner: weights.contains_key(&owner).then_some(owner),
            })
            .collect();
        let (next, movement) = Self::cut_shift(segments, weights)?;
        let minimum = self.minimum_movement(&next);
        assert_eq!(
            movement.moved_keys, minimum,
            "cut-shift moved more than the minimum"
        );
        debug_assert_eq!(
            self.diff(&next)
                .iter()
                .map(|d| d.interval.len())
                .sum::<u128>(),
            minimum
        );
        Ok((next, movement))
    }

    /// Adds partitions with the given weights.
    pub fn add(
        &self,
        added: &BTreeMap<PartitionId, u32>,
    ) -> Result<(Slicing, Movement), SlicingError> {
        let mut weights = self.weights.clone();
        for (&p, &w) in added {
            if weights.insert(p, w).is_some() {
                return Err(SlicingError::DuplicatePartition(p));
            }
        }
        self.rebalance(&weights)
    }

    /// Removes partitions; their keys go to the others by weight.
    pub fn remove(&self, removed: &[PartitionId]) -> Result<(Slicing, Movement), SlicingError> {
        let mut weights = self.weights.clone();
        for p in removed {
            weights
                .remove(p)
                .ok_or(SlicingError::UnknownPartition(*p))?;
        }
        self.rebalance(&weights)
    }

    /// Changes the weight of existing partitions.
    pub fn reweight(
        &self,
        changed: &BTreeMap<PartitionId, u32>,
    ) -> Result<(Slicing, Movement), SlicingError> {
        let mut weights = self.weights.clone();
        for (&p, &w) in changed {
            *weights
                .get_mut(&p)
                .ok_or(SlicingError::UnknownPartition(p))? = w;
        }
        self.rebalance(&weights)
    }

    /// The partition owning `hash`: a binary search over interval starts.
    pub fn partition_of(&self, hash: KeyHash) -> PartitionId {
        let i = self.starts.partition_point(|&s| s <= hash.0) - 1;
        self.owners[i]
    }

    pub fn weights(&self) -> &BTreeMap<PartitionId, u32> {
        &self.weights
    }

    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> + '_ {
        self.weights.keys().copied()
    }

    pub fn interval_count(&self) -> usize {
        self.starts.len()
    }

    /// Every interval with its owner, in keyspace order.
    pub fn intervals(&self) -> impl Iterator<Item = (Interval, PartitionId)> + '_ {
        (0..self.starts.len()).map(move |i| {
            let end = self.starts.get(i + 1).map_or(KEYSPACE, |&s| u128::from(s));
            (Interval::new(self.starts[i], end), self.owners[i])
        })
    }

    /// The intervals owned by `partition`, in keyspace order.
    pub fn intervals_of(&self, partition: PartitionId) -> Vec<Interval> {
        self.intervals()
            .filter(|&(_, p)| p == partition)
            .map(|(i, _)| i)
            .collect()
    }

    /// The number of keys `partition` owns.
    pub fn share(&self, partition: PartitionId) -> u128 {
        self.intervals_of(partition).iter().map(Interval::len).sum()
    }

    /// The number of keys every partition owns, in one pass.
    pub fn shares(&self) -> BTreeMap<PartitionId, u128> {
        let mut shares: BTreeMap<PartitionId, u128> =
            self.weights.keys().map(|&p| (p, 0)).collect();
        for (interval, p) in self.intervals() {
            *shares.entry(p).or_default() += interval.len();
        }
        shares
    }

    /// The exact target share of each partition: `2^64 · w / W` by largest remainder.
    pub fn target_shares(
        weights: &BTreeMap<PartitionId, u32>,
    ) -> Result<BTreeMap<PartitionId, u128>, SlicingError> {
        if weights.is_empty() {
            return Err(SlicingError::NoPartitions);
        }
        if let Some((&p, _)) = weights.iter().find(|(_, &w)| w == 0) {
            return Err(SlicingError::ZeroWeight(p));
        }
        let total: u128 = weights.values().map(|&w| u128::from(w)).sum();
        let mut shares: BTreeMap<PartitionId, u128> = BTreeMap::new();
        let mut remainders = Vec::with_capacity(weights.len());
        for (&p, &w) in weights {
            let exact = KEYSPACE * u128::from(w);
            shares.insert(p, exact / total);
            remainders.push((exact % total, p));
        }
        let left = KEYSPACE - shares.values().sum::<u128>();
        // Largest remainder first; ties to the lower partition id. `left < weights.len()`.
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, p) in remainders.iter().take(left as usize) {
            *shares.get_mut(&p).expect("partition has a share") += 1;
        }
        Ok(shares)
    }

    /// Checks every invariant: the intervals cover the keyspace once, neighbours have different
    /// owners, every owner is weighted, and every share equals its target exactly.
    pub fn validate(&self) -> Result<(), SlicingError> {
        let bad = |m: &str| Err(SlicingError::BadCover(m.to_owned()));
        if self.starts.is_empty() || self.starts.len() != self.owners.len() {
            return bad("no intervals");
        }
        if self.starts[0] != 0 {
            return bad("the first interval does not start at 0");
        }
        if self.starts.windows(2).any(|w| w[0] >= w[1]) {
            return bad("interval starts are not strictly ascending");
        }
        if self.owners.windows(2).any(|w| w[0] == w[1]) {
            return bad("adjacent intervals of one partition are not merged");
        }
        if let Some(p) = self.owners.iter().find(|p| !self.weights.contains_key(p)) {
            return Err(SlicingError::UnknownPartition(*p));
        }
        let shares = self.shares();
        for (p, target) in Self::target_shares(&self.weights)? {
            let owned = shares[&p];
            if owned != target {
                return Err(SlicingError::ShareMismatch {
                    partition: p,
                    owned,
                    target,
                });
            }
        }
        Ok(())
    }

    /// The pieces of the keyspace whose owner differs between `self` and `next`, split at the
    /// boundaries of both, in keyspace order. Partitions are compared by id.
    pub fn diff(&self, next: &Slicing) -> Vec<Reassignment> {
        let mut out: Vec<Reassignment> = Vec::new();
        let old: Vec<_> = self.intervals().collect();
        let new: Vec<_> = next.intervals().collect();
        let (mut i, mut j) = (0, 0);
        while i < old.len() && j < new.len() {
            let (a, from) = old[i];
            let (b, to) = new[j];
            let piece = a.intersect(&b).expect("walks overlapping intervals");
            if from != to {
                match out.last_mut() {
                    Some(last)
                        if last.from == from
                            && last.to == to
                            && last.interval.end == u128::from(piece.start) =>
                    {
                        last.interval.end = piece.end;
                    }
                    _ => out.push(Reassignment {
                        interval: piece,
                        from,
                        to,
                    }),
                }
            }
            if a.end <= b.end {
                i += 1;
            }
            if b.end <= a.end {
                j += 1;
            }
        }
        out
    }

    /// `Σ max(0, old share − new share)` over partitions of `self`.
    fn minimum_movement(&self, next: &Slicing) -> u128 {
        let after = next.shares();
        self.shares()
            .iter()
            .map(|(p, &had)| had.saturating_sub(after.get(p).copied().unwrap_or(0)))
            .sum()
    }

    fn cut_shift(
        mut segs: Vec<Segment>,
        weights: &BTreeMap<PartitionId, u32>,
    ) -> Result<(Slicing, Movement), SlicingError> {
        let targets = Self::target_shares(weights)?;
        let mut owned: BTreeMap<PartitionId, u128> = BTreeMap::new();
        for s in &segs {
            if let Some(p) = s.owner {
                *owned.entry(p).or_default() += s.len();
            }
        }
        let removed: u128 = segs
            .iter()
            .filter(|s| s.owner.is_none())
            .map(Segment::len)
            .sum();

        let growing: BTreeMap<PartitionId, u128> = targets
            .iter()
            .filter_map(|(&p, &target)| {
                let have = owned.get(&p).copied().unwrap_or(0);
                (target > have).then(|| (p, target - have))
            })
            .collect();

        // Cut: shrinking partitions release their excess.
        let mut released = removed;
        for (&p, &target) in &targets {
            let have = owned.get(&p).copied().unwrap_or(0);
            if have > target {
                released += have - target;
                cut(&mut segs, p, have - target, &growing);
            }
        }

        // Shift: growing partitions fill their deficit from the gaps.
        let mut filled = 0;
        for (&p, &deficit) in &growing {
            filled += deficit;
            shift(&mut segs, p, deficit);
        }
        assert_eq!(released, filled, "gaps released and filled differ");

        let mut starts: Vec<u64> = Vec::new();
        let mut owners: Vec<PartitionId> = Vec::new();
        for s in &segs {
            let owner = s.owner.expect("every gap is filled");
            if owners.last() != Some(&owner) {
                starts.push(u64::try_from(s.start).expect("segment starts inside the keyspace"));
                owners.push(owner);
            }
        }
        let slicing = Slicing {
            weights: weights.clone(),
            starts,
            owners,
        };
        debug_assert_eq!(slicing.validate(), Ok(()));
        // Every gap key was released by a shrinking or removed partition and filled by a growing
        // one, so each changed owner: the gaps are exactly the keys moved.
        let movement = Movement {
            moved_keys: released,
            minimum_keys: released,
        };
        Ok((slicing, movement))
    }
}

/// Releases `excess` keys of `p` as gaps: whole intervals smallest first while they fit, then a
/// piece of one interval that covers what is left, cut on the side where the gap can join a
/// neighbour that is growing or already a gap, so the gap merges instead of adding an interval.
fn cut(
    segs: &mut Vec<Segment>,
    p: PartitionId,
    mut excess: u128,
    growing: &BTreeMap<PartitionId, u128>,
) {
    let mut mine: Vec<usize> = (0..segs.len())
        .filter(|&i| segs[i].owner == Some(p))
        .collect();
    mine.sort_by_key(|&i| (segs[i].len(), segs[i].start));
    for &i in &mine {
        if segs[i].len() <= excess {
            excess -= segs[i].len();
            segs[i].owner = None;
        }
    }
    if excess == 0 {
        return;
    }
    // 0: next to a growing partition, 1: next to a gap, 2: anywhere.
    let rank = |owner: Option<PartitionId>| match owner {
        Some(q) if growing.contains_key(&q) => 0,
        None => 1,
        Some(_) => 2,
    };
    let (i, tail) = mine
        .iter()
        .filter(|&&i| segs[i].owner == Some(p) && segs[i].len() > excess)
        .flat_map(|&i| {
            let before = if i > 0 { rank(segs[i - 1].owner) } else { 2 };
            let after = segs.get(i + 1).map_or(2, |s| rank(s.owner));
            [(before, i, false), (after, i, true)]
        })
        .min_by_key(|&(r, i, tail)| (r, segs[i].len(), segs[i].start, !tail))
        .map(|(_, i, tail)| (i, tail))
        .expect("a partition owns at least its excess");
    if tail {
        let at = segs[i].end - excess;
        split_at(segs, i, at);
        segs[i + 1].owner = None;
    } else {
        let at = segs[i].start + excess;
        split_at(segs, i, at);
        segs[i].owner = None;
    }
}

/// Gives `deficit` keys of gaps to `p`, preferring gaps next to its own intervals.
fn shift(segs: &mut Vec<Segment>, p: PartitionId, mut deficit: u128) {
    while deficit > 0 {
        let gaps = || (0..segs.len()).filter(|&i| segs[i].owner.is_none());
        let adjacent = gaps().find_map(|i| {
            if i > 0 && segs[i - 1].owner == Some(p) {
                Some((i, true))
            } else if i + 1 < segs.len() && segs[i + 1].owner == Some(p) {
                Some((i, false))
            } else {
                None
            }
        });
        let (i, from_front) = match adjacent {
            Some(found) => found,
            None => {
                let covering = gaps()
                    .filter(|&i| segs[i].len() >= deficit)
                    .min_by_key(|&i| (segs[i].len(), segs[i].start));
                let largest = || gaps().max_by_key(|&i| (segs[i].len(), u128::MAX - segs[i].start));
                (
                    covering.or_else(largest).expect("gaps cover every deficit"),
                    true,
                )
            }
        };
        let take = segs[i].len().min(deficit);
        deficit -= take;
        if take == segs[i].len() {
            segs[i].owner = Some(p);
        } else if from_front {
            let split = segs[i].start + take;
            split_at(segs, i, split);
            segs[i].owner = Some(p);
        } else {
            let split = segs[i].end - take;
            split_at(segs, i, split);
            segs[i + 1].owner = Some(p);
        }
    }
}

/// Splits segment `i` at `at` into `[start, at)` (index `i`) and `[at, end)` (index `i + 1`).
fn split_at(segs: &mut Vec<Segment>, i: usize, at: u128) {
    let s = segs[i];
    assert!(s.start < at && at < s.end, "split inside the segment");
    segs[i].end = at;
    segs.insert(
        i + 1,
        Segment {
            start: at,
            end: s.end,
            owner: s.owner,
        },
    );
}

/// A piece of the keyspace that changes owner between two slicings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reassignment {
    pub interval: Interval,
    pub from: PartitionId,
    pub to: PartitionId,
}

/// The JSON form: weights and the intervals with their owners, checked on the way in.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlicingRepr {
    weights: BTreeMap<PartitionId, u32>,
    intervals: Vec<OwnedInterval>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnedInterval {
    start: u64,
    end: u128,
    partition: PartitionId,
}

impl From<Slicing> for SlicingRepr {
    fn from(s: Slicing) -> SlicingRepr {
        let intervals = s
            .intervals()
            .map(|(i, partition)| OwnedInterval {
                start: i.start,
                end: i.end,
                partition,
            })
            .collect();
        SlicingRepr {
            weights: s.weights,
            intervals,
        }
    }
}

impl TryFrom<SlicingRepr> for Slicing {
    type Error = SlicingError;

    fn try_from(r: SlicingRepr) -> Result<Slicing, SlicingError> {
        let mut expected_start: u128 = 0;
        for i in &r.intervals {
            if u128::from(i.start) != expected_start || i.end <= u128::from(i.start) {
                return Err(SlicingError::BadCover(format!(
                    "interval [{}, {}) does not follow {expected_start}",
                    i.start, i.end
                )));
            }
            expected_start = i.end;
        }
        if expected_start != KEYSPACE {
            return Err(SlicingError::BadCover(
                "the intervals stop short of the end".into(),
            ));
        }
        let slicing = Slicing {
            weights: r.weights,
            starts: r.intervals.iter().map(|i| i.start).collect(),
            owners: r.intervals.iter().map(|i| i.partition).collect(),
        };
        slicing.validate()?;
        Ok(slicing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pairs: &[(u32, u32)]) -> BTreeMap<PartitionId, u32> {
        pairs.iter().map(|&(p, w)| (PartitionId(p), w)).collect()
    }

    #[test]
    fn one_partition_owns_everything() {
        let s = Slicing::uniform(1).unwrap();
        assert_eq!(
            s.intervals().collect::<Vec<_>>(),
            vec![(Interval::FULL, PartitionId(0))]
        );
        assert_eq!(s.partition_of(KeyHash(u64::MAX)), PartitionId(0));
    }

    #[test]
    fn doubling_moves_half_and_splits_in_two() {
        let s = Slicing::uniform(1).unwrap();
        let (t, m) = s.add(&w(&[(1, 1)])).unwrap();
        assert_eq!(m.moved_keys, KEYSPACE / 2);
        assert_eq!(t.interval_count(), 2);
        assert_eq!(t.share(PartitionId(0)), KEYSPACE / 2);
        // And back: removing partition 1 moves its half back, one interval again.
        let (u, m) = t.remove(&[PartitionId(1)]).unwrap();
        assert_eq!(m.moved_keys, KEYSPACE / 2);
        assert_eq!(u, s);
    }

    #[test]
    fn thirds_are_exact_to_one_key() {
        let s = Slicing::uniform(3).unwrap();
        let shares: Vec<u128> = s.partitions().map(|p| s.share(p)).collect();
        assert_eq!(shares.iter().sum::<u128>(), KEYSPACE);
        let exact = KEYSPACE / 3;
        assert!(
            shares.iter().all(|&x| x == exact || x == exact + 1),
            "{shares:?}"
        );
    }

    #[test]
    fn diff_lists_exactly_the_moved_keys() {
        let s = Slicing::uniform(2).unwrap();
        let (t, m) = s.add(&w(&[(2, 1)])).unwrap();
        let moved: u128 = s.diff(&t).iter().map(|d| d.interval.len()).sum();
        assert_eq!(moved, m.moved_keys);
        for d in s.diff(&t) {
            assert_eq!(d.to, PartitionId(2));
            assert_eq!(s.partition_of(KeyHash(d.interval.start)), d.from);
            assert_eq!(t.partition_of(KeyHash(d.interval.start)), d.to);
        }
    }

    #[test]
    fn json_round_trip_and_corrupt_input_refused() {
        let s = Slicing::uniform(5).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Slicing>(&text).unwrap(), s);
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["intervals"][1]["start"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Slicing>(v).is_err());
    }

    #[test]
    fn bad_weights_are_errors() {
        assert_eq!(Slicing::initial(&w(&[])), Err(SlicingError::NoPartitions));
        assert_eq!(
            Slicing::initial(&w(&[(0, 0)])),
            Err(SlicingError::ZeroWeight(PartitionId(0)))
        );
        let s = Slicing::uniform(2).unwrap();
        assert!(matches!(
            s.remove(&[PartitionId(9)]),
            Err(SlicingError::UnknownPartition(_))
        ));
        assert!(matches!(
            s.add(&w(&[(1, 3)])),
            Err(SlicingError::DuplicatePartition(_))
        ));
    }
}
