//! Holds that outlive their stream: a change feed's hold on the GC timestamp (`HoldSnapshot`
//! with an `owner` and `linger_ms`) stays for `linger_ms` after its client went away, so that
//! a feed whose process died and restarts finds the history after its checkpoint.
//!
//! A hold is kept only when it is its owner's newest on this node: a feed moves its hold by
//! opening the new one before it drops the old, and the old one must go at once, or the GC
//! timestamp would stay at every checkpoint the feed ever had for `linger_ms`. A newer hold of
//! the owner ends a lingering one (the new one is registered first). Lingering holds live in
//! memory: a node that restarts forgets them (the feed's GC hold is then only as good as the
//! other nodes' holds).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::state::ReadGuard;

/// The most owners with a lingering hold on one node; past it a hold that would linger ends.
pub const MAX_LINGERING: usize = 10_000;
/// The longest a hold lingers (a day: a feed's `protect_max_age` default).
pub const MAX_LINGER_MS: u64 = 24 * 3600 * 1000;

/// The named holds of this node: each owner's newest hold and its lingering one.
#[derive(Debug, Default)]
pub struct Owners {
    /// The most lingering holds of one caller (`Tuning::max_holds_per_caller`; 0: no bound).
    per_caller: std::sync::atomic::AtomicUsize,
    next: AtomicU64,
    owners: Mutex<HashMap<String, Owner>>,
}

#[derive(Debug)]
struct Owner {
    /// The generation of the owner's newest hold.
    newest: u64,
    /// A hold kept after its stream ended: its generation and the read holding the GC ts.
    lingering: Option<(u64, ReadGuard)>,
}

fn lock(m: &Mutex<HashMap<String, Owner>>) -> MutexGuard<'_, HashMap<String, Owner>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Owners {
    /// No holds yet; at most `per_caller` lingering holds of one caller.
    pub fn with_per_caller(per_caller: usize) -> Owners {
        Owners {
            per_caller: per_caller.into(),
            ..Owners::default()
        }
    }

    /// A new hold of `owner` (already registered as an active read): it is the owner's newest,
    /// and the owner's lingering hold, if any, ends. The guard, kept by the stream, decides at
    /// its end whether the hold lingers.
    pub fn opened(self: &Arc<Self>, owner: &str, held: ReadGuard, linger: Duration) -> LingerGuard {
        let generation = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        if owner.is_empty() {
            // Nobody in particular: an ordinary hold, over with its stream.
            return LingerGuard {
                owners: Arc::clone(self),
                owner: String::new(),
                generation,
                linger: Duration::ZERO,
                held: Some(held),
            };
        }
        let ended = {
            let mut owners = lock(&self.owners);
            match owners.get_mut(owner) {
                Some(o) => {
                    o.newest = generation;
                    o.lingering.take()
                }
                None => {
                    owners.insert(
                        owner.to_owned(),
                        Owner {
                            newest: generation,
                            lingering: None,
                        },
                    );
                    None
                }
            }
        };
        drop(ended);
        LingerGuard {
            owners: Arc::clone(self),
            owner: owner.to_owned(),
            generation,
            linger,
            held: Some(held),
        }
    }

    /// How many holds linger now.
    pub fn lingering(&self) -> usize {
        lock(&self.owners)
            .values()
            .filter(|o| o.lingering.is_some())
            .count()
    }

    /// The stream of hold `generation` of `owner` ended before its maximum duration.
    fn ended(self: &Arc<Self>, owner: String, generation: u64, held: ReadGuard, linger: Duration) {
        let mut owners = lock(&self.owners);
        let lingering = owners.values().filter(|o| o.lingering.is_some()).count();
        // Owners are named `<caller>|<name>` (see `owner_key`): a caller's lingering holds are
        // bounded too, so that no caller fills the node's room for them.
        let caller = owner.split('|').next().unwrap_or_default();
        let callers = owners
            .iter()
            .filter(|(k, o)| o.lingering.is_some() && k.split('|').next() == Some(caller))
            .count();
        let Some(o) = owners.get_mut(&owner) else {
            return;
        };
        if o.newest != generation {
            return;
        }
        let cap = self.per_caller.load(Ordering::Relaxed);
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(r) if lingering < MAX_LINGERING && (cap == 0 || callers < cap) => r,
            _ => {
                // It cannot linger: the owner is done with.
                owners.remove(&owner);
                return;
            }
        };
        o.lingering = Some((generation, held));
        drop(owners);
        tracing::info!(%owner, linger_ms = linger.as_millis() as u64, "a hold's client went away; keeping the hold");
        let this = Arc::clone(self);
        runtime.spawn(async move {
            tokio::time::sleep(linger).await;
            let mut owners = lock(&this.owners);
            if let Some(o) = owners.get_mut(&owner) {
                if o.lingering.as_ref().is_some_and(|(g, _)| *g == generation) {
                    o.lingering = None;
                }
                if o.lingering.is_none() && o.newest == generation {
                    owners.remove(&owner);
                }
            }
        });
    }
}

/// Kept by a hold's stream: dropped before [`LingerGuard::release`] (the client went away), it
/// keeps the hold for the linger duration when it is still its owner's newest.
#[derive(Debug)]
pub struct LingerGuard {
    owners: Arc<Owners>,
    owner: String,
    generation: u64,
    linger: Duration,
    held: Option<ReadGuard>,
}

impl LingerGuard {
    /// The hold ends now (it reached its maximum duration).
    pub fn release(mut self) {
        self.held = None;
    }
}

impl Drop for LingerGuard {
    fn drop(&mut self) {
        match self.held.take() {
            Some(held) if !self.linger.is_zero() => self.owners.ended(
                std::mem::take(&mut self.owner),
                self.generation,
                held,
                self.linger,
            ),
            // Released, or not to linger: the hold ends now, and with it the owner's entry
            // when this was its newest hold.
            _ => {
                let mut owners = lock(&self.owners.owners);
                if owners
                    .get(&self.owner)
                    .is_some_and(|o| o.newest == self.generation && o.lingering.is_none())
                {
                    owners.remove(&self.owner);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ActiveReads;
    use causeway_core::{Epoch, ReadTimestamp, Timestamp};

    fn at(ts: u64) -> ReadTimestamp {
        ReadTimestamp::new(Epoch(1), Timestamp(ts))
    }

    #[tokio::test]
    async fn a_caller_can_neither_end_anothers_hold_nor_linger_past_its_bound() {
        let reads = Arc::new(ActiveReads::default());
        let owners = Arc::new(Owners::with_per_caller(2));
        let linger = Duration::from_secs(60);
        // The cdc's feed holds at 10, and goes away: its hold lingers.
        drop(owners.opened(&owner_key("cdc", "feed"), reads.register(at(10)), linger));
        assert_eq!(owners.lingering(), 1);
        // Another caller opening a hold under the feed's name ends nothing.
        drop(owners.opened(
            &owner_key("intruder", "feed"),
            reads.register(at(50)),
            Duration::ZERO,
        ));
        assert_eq!(
            reads.lowest(Epoch(1)),
            Some(at(10)),
            "another caller ended the feed's hold"
        );
        // One caller's holds linger up to its bound; others' still do.
        for name in ["a", "b", "c"] {
            drop(owners.opened(&owner_key("intruder", name), reads.register(at(60)), linger));
        }
        drop(owners.opened(&owner_key("other", "d"), reads.register(at(70)), linger));
        assert_eq!(owners.lingering(), 1 + 2 + 1);
    }

    #[tokio::test]
    async fn a_vanished_clients_newest_hold_lingers_and_a_moved_one_does_not() {
        let reads = Arc::new(ActiveReads::default());
        let owners = Arc::new(Owners::default());
        let linger = Duration::from_secs(60);
        let first = owners.opened("feed", reads.register(at(10)), linger);
        // The feed moves its hold: the new one first, then the old one goes, at once.
        let second = owners.opened("feed", reads.register(at(20)), linger);
        drop(first);
        assert_eq!(reads.lowest(Epoch(1)), Some(at(20)));
        // The feed's process dies: its newest hold stays.
        drop(second);
        assert_eq!(reads.lowest(Epoch(1)), Some(at(20)));
        assert_eq!(owners.lingering(), 1);
        // The feed, restarted, holds again: the lingering hold ends.
        let third = owners.opened("feed", reads.register(at(20)), linger);
        assert_eq!(owners.lingering(), 0);
        assert_eq!(reads.count(), 1);
        // A hold that reaches its maximum duration does not linger, and its owner is forgotten.
        third.release();
        assert_eq!(reads.count(), 0);
        assert!(lock(&owners.owners).is_empty());
        // Nor one that is not to linger.
        drop(owners.opened("brief", reads.register(at(40)), Duration::ZERO));
        assert_eq!(reads.count(), 0);
        assert!(lock(&owners.owners).is_empty());
        // A lingering hold ends after its linger duration.
        let short = Duration::from_millis(20);
        drop(owners.opened("other", reads.register(at(30)), short));
        assert_eq!(reads.lowest(Epoch(1)), Some(at(30)));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reads.lowest(Epoch(1)).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the hold still lingers"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(owners.lingering(), 0);
    }
}

/// The name of `owner`'s holds for `caller`: owners of different callers never meet, so no
/// caller can end another's lingering hold by opening one under its name.
pub fn owner_key(caller: &str, owner: &str) -> String {
    if owner.is_empty() {
        String::new()
    } else {
        format!("{caller}|{owner}")
    }
}

/// The `HoldSnapshot` streams each caller has open, bounded per caller
/// (`Tuning::max_holds_per_caller`), so that one client cannot pin the GC timestamp with
/// holds without end.
#[derive(Debug, Default)]
pub struct PerCaller {
    open: Mutex<HashMap<String, usize>>,
}

impl PerCaller {
    /// A slot for one more stream of `caller`, or `None` if it has `max` open already.
    pub fn enter(self: &Arc<Self>, caller: String, max: usize) -> Option<CallerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(caller.clone()).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(CallerSlot {
            owner: Arc::clone(self),
            caller,
        })
    }

    /// The streams `caller` has open.
    pub fn open(&self, caller: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(caller).copied().unwrap_or(0)
    }
}

/// One open stream of a caller: dropping it frees the slot.
#[derive(Debug)]
pub struct CallerSlot {
    owner: Arc<PerCaller>,
    caller: String,
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

#[cfg(test)]
mod per_caller_tests {
    use super::*;

    #[test]
    fn a_caller_gets_at_most_max_slots_and_a_dropped_slot_frees_one() {
        let holds = Arc::new(PerCaller::default());
        let mut a: Vec<_> = (0..3)
            .map(|_| holds.enter("a".into(), 3).expect("a slot"))
            .collect();
        assert!(holds.enter("a".into(), 3).is_none());
        let b = holds.enter("b".into(), 3);
        assert!(b.is_some(), "another caller is not limited by a");
        drop(a.pop());
        assert_eq!(holds.open("a"), 2);
        assert!(holds.enter("a".into(), 3).is_some());
        drop(b);
        assert_eq!(holds.open("b"), 0);
    }
}
