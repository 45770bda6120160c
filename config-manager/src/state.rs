//! The durable state of the config manager and its changes, as pure functions.
//!
//! The state is the (current, next) pair of configurations, the history of every configuration
//! ever installed, proposed or amended, a revision that rises with every change of the pair, and
//! the last incarnation handed out (so incarnations keep rising across restarts). Each change
//! returns a new state, which the event loop writes to disk before acknowledging or publishing
//! it; a refused change leaves the state as it was. The configurations themselves are computed by
//! `causeway_core::ClusterConfig`.

use causeway_core::{ClusterConfig, Epoch, NodeId, NodeInfo};
use serde::{Deserialize, Serialize};

use crate::error::{Corruption, Error};

/// The state file format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The (current, next) pair of configurations, as published to watchers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigPair {
    /// Rises by one with every change of the pair, across restarts.
    pub revision: u64,
    /// `None` before bootstrap: epoch 0, the empty configuration.
    pub current: Option<ClusterConfig>,
    /// `None` when no transition runs.
    pub next: Option<ClusterConfig>,
}

impl ConfigPair {
    /// The epoch of the current configuration ([`Epoch::ZERO`] before bootstrap).
    pub fn current_epoch(&self) -> Epoch {
        self.current.as_ref().map_or(Epoch::ZERO, |c| c.epoch)
    }

    /// The epoch of the next configuration, if a transition runs.
    pub fn next_epoch(&self) -> Option<Epoch> {
        self.next.as_ref().map(|c| c.epoch)
    }
}

/// The answer to `CompleteTransition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// True when this call installed the configuration, false for a repeat.
    pub installed: bool,
    pub pair: ConfigPair,
}

/// Why a configuration entered the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The first configuration, installed at once.
    Bootstrapped,
    /// Proposed as next (a new shape or a replacement).
    Proposed,
    /// Installed as current by `CompleteTransition`.
    Installed,
    /// A node marked failed in a configuration (same epoch).
    MarkedFailed,
    /// A proposed next configuration abandoned by `AbortTransition` before routing could switch
    /// to it; the current configuration stays. Its epoch is never proposed again.
    Aborted,
}

/// One configuration of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// The revision of the pair this change produced.
    pub revision: u64,
    pub change: Change,
    pub config: ClusterConfig,
}

/// Everything the config manager keeps on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format_version: u32,
    pub revision: u64,
    /// The last incarnation handed to a registering node; kept so incarnations rise across
    /// restarts even though registrations themselves are not kept.
    pub last_incarnation: u64,
    pub current: Option<ClusterConfig>,
    pub next: Option<ClusterConfig>,
    /// In revision order. Small: a few entries per transition.
    pub history: Vec<HistoryEntry>,
}

impl Default for State {
    fn default() -> Self {
        State {
            format_version: FORMAT_VERSION,
            revision: 0,
            last_incarnation: 0,
            current: None,
            next: None,
            history: Vec::new(),
        }
    }
}

impl State {
    /// The pair to publish.
    pub fn pair(&self) -> ConfigPair {
        ConfigPair {
            revision: self.revision,
            current: self.current.clone(),
            next: self.next.clone(),
        }
    }

    /// The state with one more incarnation handed out, and that incarnation.
    pub fn with_incarnation(&self) -> (State, u64) {
        let mut s = self.clone();
        s.last_incarnation += 1;
        let incarnation = s.last_incarnation;
        (s, incarnation)
    }

    /// The first configuration, `partitions × replicas` over `live` (in the given order).
    pub fn bootstrap(
        &self,
        partitions: u32,
        replicas: u32,
        live: &[NodeInfo],
    ) -> Result<State, Error> {
        if let Some(c) = &self.current {
            return Err(Error::AlreadyBootstrapped(c.epoch));
        }
        let config = ClusterConfig::bootstrap(partitions, replicas, live)?;
        let mut s = self.clone();
        s.current = Some(config.clone());
        s.record(Change::Bootstrapped, config);
        Ok(s)
    }

    /// Proposes the next configuration for a new shape; `spare` are candidates for new places.
    pub fn propose_shape(
        &self,
        partitions: u32,
        replicas: u32,
        spare: &[NodeInfo],
    ) -> Result<State, Error> {
        let current = self.idle_current()?;
        let next = current.next_for_shape(partitions, replicas, spare)?;
        Ok(self.proposing(next))
    }

    /// Proposes the next configuration with `failed` replaced by `with`.
    pub fn replace_node(&self, failed: NodeId, with: NodeInfo) -> Result<State, Error> {
        let current = self.idle_current()?;
        let next = current.next_replacing(failed, with)?;
        // The replaced node counts as failed from now on: the UST, the GC timestamp and the
        // install no longer wait for it, and its partition's other replicas are the sources.
        let mut s = self.clone();
        if !current.failed.contains(&failed) {
            let marked = current.with_failed(failed)?;
            s.current = Some(marked.clone());
            s.record(Change::MarkedFailed, marked);
        }
        Ok(s.proposing(next))
    }

    /// Marks `node` failed in the current configuration and in the next one, where it is.
    /// `None` when it is already marked everywhere it is.
    pub fn mark_failed(&self, node: NodeId) -> Result<Option<State>, Error> {
        let mut s = self.clone();
        let mut found = false;
        for slot in [&mut s.current, &mut s.next] {
            let Some(config) = slot.as_ref() else {
                continue;
            };
            if !config.contains(node) {
                continue;
            }
            found = true;
            if config.failed.contains(&node) {
                continue;
            }
            *slot = Some(config.with_failed(node)?);
        }
        if !found {
            return Err(match &self.current {
                None => Error::NotBootstrapped,
                Some(_) => Error::UnknownNode(node),
            });
        }
        let changed: Vec<ClusterConfig> = [(&self.current, &s.current), (&self.next, &s.next)]
            .into_iter()
            .filter(|(before, after)| before != after)
            .filter_map(|(_, after)| after.clone())
            .collect();
        if changed.is_empty() {
            return Ok(None);
        }
        s.revision += 1;
        for config in changed {
            s.history.push(HistoryEntry {
                revision: s.revision,
                change: Change::MarkedFailed,
                config,
            });
        }
        Ok(Some(s))
    }

    /// Compare-and-set: installs next as current iff next.epoch == `epoch`. `None` when `epoch`
    /// is already installed (a repeat), an error for any other epoch.
    pub fn complete_transition(&self, epoch: Epoch) -> Result<Option<State>, Error> {
        let current_epoch = self.current.as_ref().map_or(Epoch::ZERO, |c| c.epoch);
        match &self.next {
            Some(next) if next.epoch == epoch => {
                let mut s = self.clone();
                s.current = s.next.take();
                s.record(Change::Installed, next.clone());
                Ok(Some(s))
            }
            _ if epoch != Epoch::ZERO && epoch <= current_epoch => Ok(None),
            _ => Err(Error::EpochMismatch {
                requested: epoch,
                current: current_epoch,
                next: self.next.as_ref().map(|c| c.epoch),
            }),
        }
    }

    /// Abandons the transition to `epoch` ([`Epoch::ZERO`]: whatever next is): next is dropped
    /// and the current configuration stays. Pure: the caller has made sure, before calling this,
    /// that a node of next vetoed it, so no node can switch routing to it.
    pub fn abort(&self, epoch: Epoch) -> Result<State, Error> {
        let next = self.next.as_ref().ok_or(Error::NoTransition {
            current: self.pair().current_epoch(),
        })?;
        if epoch != Epoch::ZERO && epoch != next.epoch {
            return Err(Error::AbortMismatch {
                requested: epoch,
                next: next.epoch,
            });
        }
        let aborted = next.clone();
        let mut s = self.clone();
        s.next = None;
        s.record(Change::Aborted, aborted);
        Ok(s)
    }

    /// Whether a transition to `epoch` runs.
    pub fn next_epoch_is(&self, epoch: Epoch) -> bool {
        self.next.as_ref().is_some_and(|n| n.epoch == epoch)
    }

    /// Checks the state as a whole; called before every write and after every read.
    pub fn check(&self) -> Result<(), Corruption> {
        if self.format_version != FORMAT_VERSION {
            return Err(Corruption::UnknownFormat(self.format_version));
        }
        if let Some(c) = &self.current {
            c.validate().map_err(Corruption::InvalidCurrent)?;
        }
        if let Some(n) = &self.next {
            let c = self
                .current
                .as_ref()
                .ok_or(Corruption::NextWithoutCurrent)?;
            c.validate_successor(n).map_err(Corruption::InvalidNext)?;
        }
        let mut last = 0;
        for e in &self.history {
            if e.revision < last || e.revision > self.revision {
                return Err(Corruption::RevisionOrder);
            }
            last = e.revision;
        }
        // The latest history entry of each epoch of the pair is the configuration held.
        for config in self.current.iter().chain(&self.next) {
            let latest = self
                .history
                .iter()
                .rev()
                .find(|e| e.config.epoch == config.epoch);
            if latest.map(|e| &e.config) != Some(config) {
                return Err(Corruption::HistoryMismatch(config.epoch));
            }
        }
        let top = self
            .next
            .as_ref()
            .or(self.current.as_ref())
            .map_or(Epoch::ZERO, |c| c.epoch);
        // Beyond the pair, only aborted proposals: the latest entry of such an epoch says so.
        for e in self.history.iter().filter(|e| e.config.epoch > top) {
            let latest = self
                .history
                .iter()
                .rev()
                .find(|l| l.config.epoch == e.config.epoch)
                .expect("e itself is one");
            if latest.change != Change::Aborted {
                return Err(Corruption::HistoryMismatch(e.config.epoch));
            }
        }
        Ok(())
    }

    /// The current configuration, when no transition runs.
    pub fn idle_current(&self) -> Result<&ClusterConfig, Error> {
        let current = self.current.as_ref().ok_or(Error::NotBootstrapped)?;
        if let Some(next) = &self.next {
            return Err(Error::TransitionRunning(next.epoch));
        }
        Ok(current)
    }

    /// Makes `next` the proposal, under an epoch above every epoch ever proposed: the epoch of
    /// an aborted proposal is never used again (a node of it may hold a veto for it).
    fn proposing(&self, mut next: ClusterConfig) -> State {
        let highest = self
            .history
            .iter()
            .map(|e| e.config.epoch)
            .chain(self.current.as_ref().map(|c| c.epoch))
            .max()
            .unwrap_or(Epoch::ZERO);
        next.epoch = next.epoch.max(highest.next());
        let mut s = self.clone();
        s.next = Some(next.clone());
        s.record(Change::Proposed, next);
        s
    }

    fn record(&mut self, change: Change, config: ClusterConfig) {
        self.revision += 1;
        self.history.push(HistoryEntry {
            revision: self.revision,
            change,
            config,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(ids: std::ops::Range<u64>) -> Vec<NodeInfo> {
        ids.map(|i| NodeInfo {
            id: NodeId(i),
            addr: format!("127.0.0.1:{}", 7000 + i),
        })
        .collect()
    }

    #[test]
    fn a_full_cycle_keeps_the_state_consistent() {
        let s = State::default();
        s.check().unwrap();
        let s = s.bootstrap(1, 2, &nodes(1..3)).unwrap();
        s.check().unwrap();
        assert!(matches!(
            s.bootstrap(1, 2, &nodes(1..3)),
            Err(Error::AlreadyBootstrapped(_))
        ));
        let s = s.propose_shape(2, 2, &nodes(3..5)).unwrap();
        s.check().unwrap();
        assert!(matches!(
            s.propose_shape(2, 2, &nodes(3..5)),
            Err(Error::TransitionRunning(Epoch(2)))
        ));
        let s = s.mark_failed(NodeId(3)).unwrap().unwrap();
        s.check().unwrap();
        assert!(
            s.mark_failed(NodeId(3)).unwrap().is_none(),
            "marking twice changes nothing"
        );
        assert!(matches!(
            s.complete_transition(Epoch(3)),
            Err(Error::EpochMismatch { .. })
        ));
        let s = s.complete_transition(Epoch(2)).unwrap().unwrap();
        s.check().unwrap();
        assert!(s.next.is_none());
        assert!(s.current.as_ref().unwrap().failed.contains(&NodeId(3)));
        assert!(s.complete_transition(Epoch(2)).unwrap().is_none());
        assert!(s.complete_transition(Epoch(1)).unwrap().is_none());
        assert_eq!(s.revision, 4);
        assert_eq!(
            s.history.iter().map(|e| e.change).collect::<Vec<_>>(),
            [
                Change::Bootstrapped,
                Change::Proposed,
                Change::MarkedFailed,
                Change::Installed
            ]
        );
    }

    #[test]
    fn an_abort_drops_next_and_keeps_current() {
        let s = State::default().bootstrap(1, 2, &nodes(1..3)).unwrap();
        assert!(matches!(
            s.abort(Epoch::ZERO),
            Err(Error::NoTransition { current: Epoch(1) })
        ));
        let proposed = s.propose_shape(2, 2, &nodes(3..5)).unwrap();
        assert!(matches!(
            proposed.abort(Epoch(3)),
            Err(Error::AbortMismatch {
                requested: Epoch(3),
                next: Epoch(2)
            })
        ));
        assert!(matches!(
            proposed.abort(Epoch(1)),
            Err(Error::AbortMismatch { .. })
        ));

        for epoch in [Epoch::ZERO, Epoch(2)] {
            let aborted = proposed.abort(epoch).unwrap();
            aborted.check().unwrap();
            assert_eq!(aborted.next, None);
            assert_eq!(aborted.current, s.current);
            assert_eq!(aborted.revision, proposed.revision + 1);
            let last = aborted.history.last().unwrap();
            assert_eq!(last.change, Change::Aborted);
            assert_eq!(Some(&last.config), proposed.next.as_ref());
            assert_eq!(last.revision, aborted.revision);
            assert!(matches!(
                aborted.abort(Epoch::ZERO),
                Err(Error::NoTransition { .. })
            ));
            assert!(matches!(
                aborted.complete_transition(Epoch(2)),
                Err(Error::EpochMismatch { .. })
            ));
        }

        // The next proposal gets a new epoch: the aborted one is never used again.
        let again = proposed
            .abort(Epoch::ZERO)
            .unwrap()
            .propose_shape(3, 1, &nodes(3..5))
            .unwrap();
        again.check().unwrap();
        assert_eq!(again.next.as_ref().unwrap().epoch, Epoch(3));
        assert!(matches!(
            again.complete_transition(Epoch(2)),
            Err(Error::EpochMismatch { .. })
        ));
        let installed = again.complete_transition(Epoch(3)).unwrap().unwrap();
        installed.check().unwrap();
        assert_eq!(installed.current.as_ref().unwrap().replicas.len(), 3);
    }

    #[test]
    fn check_refuses_a_proposal_beyond_the_pair_unless_it_was_aborted() {
        let proposed = State::default()
            .bootstrap(1, 1, &nodes(1..2))
            .unwrap()
            .propose_shape(2, 1, &nodes(2..3))
            .unwrap();
        let aborted = proposed.abort(Epoch::ZERO).unwrap();
        aborted.check().unwrap();
        let mut dropped = proposed.clone();
        dropped.next = None;
        assert!(matches!(
            dropped.check(),
            Err(Corruption::HistoryMismatch(Epoch(2)))
        ));
    }

    #[test]
    fn check_finds_a_history_that_disagrees() {
        let mut s = State::default().bootstrap(1, 1, &nodes(1..2)).unwrap();
        s.history.clear();
        assert!(matches!(
            s.check(),
            Err(Corruption::HistoryMismatch(Epoch(1)))
        ));
    }
}
