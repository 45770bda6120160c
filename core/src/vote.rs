//! The decision on a transaction from its participants' votes (Calvin-style; ARCHITECTURE.md,
//! "Transaction outcomes").
//!
//! Every document a transaction names votes once, on its state just before the transaction:
//! yes, no (with the reasons), or "duplicate" (it holds the transaction's idempotency key from
//! an earlier commit). A vote is a pure function of the document and the transaction, so every
//! replica of the document's partition casts the same one, and any replica's vote may stand for
//! it. The decision waits for every vote it needs, so that every node that decides lists the
//! same reasons, in the same order:
//! - a duplicate changes nothing and answers the original ts;
//! - otherwise one "no" aborts the whole transaction;
//! - otherwise it commits.
//!
//! [`Ballot`] collects the votes and says when the decision is known; it refuses a second,
//! different vote for a document (replicas diverged: a bug to stop on, never to paper over).

use std::collections::BTreeMap;

use crate::Timestamp;

/// One document's vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote<F> {
    /// Why the transaction cannot commit on this document; empty: yes.
    pub failures: Vec<F>,
    /// The ts of the earlier commit of the transaction's idempotency key, if this document
    /// holds it.
    pub duplicate_of: Option<Timestamp>,
}

impl<F> Vote<F> {
    pub fn yes() -> Vote<F> {
        Vote {
            failures: Vec::new(),
            duplicate_of: None,
        }
    }
}

/// The outcome of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<F> {
    Committed,
    /// Every failure of every vote, in the order of the documents' keys.
    Aborted(Vec<F>),
    /// The transaction repeats the one committed at this ts: it changes nothing.
    Duplicate(Timestamp),
}

impl<F> Decision<F> {
    /// Whether the transaction's mutations apply.
    pub fn applies(&self) -> bool {
        matches!(self, Decision::Committed)
    }
}

/// Two votes for one document that differ.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("two different votes for document {document}: replicas diverged")]
pub struct Conflict {
    pub document: String,
}

/// The votes on one transaction, keyed by document `D`.
#[derive(Debug, Clone)]
pub struct Ballot<D, F> {
    votes: BTreeMap<D, Option<Vote<F>>>,
}

impl<D: Ord + Clone + std::fmt::Debug, F: Clone + PartialEq> Ballot<D, F> {
    /// A ballot that needs a vote from each of `documents`.
    pub fn new(documents: impl IntoIterator<Item = D>) -> Ballot<D, F> {
        Ballot {
            votes: documents.into_iter().map(|d| (d, None)).collect(),
        }
    }

    /// The documents that have not voted, in key order.
    pub fn missing(&self) -> impl Iterator<Item = &D> {
        self.votes
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(d, _)| d)
    }

    /// Records `document`'s vote. A vote from a document the ballot does not need is ignored; a
    /// second vote equal to the first changes nothing; a different one is a [`Conflict`].
    pub fn record(&mut self, document: &D, vote: Vote<F>) -> Result<(), Conflict> {
        match self.votes.get_mut(document) {
            None => Ok(()),
            Some(slot @ None) => {
                *slot = Some(vote);
                Ok(())
            }
            Some(Some(seen)) if *seen == vote => Ok(()),
            Some(Some(_)) => Err(Conflict {
                document: format!("{document:?}"),
            }),
        }
    }

    /// The decision, once every needed document has voted.
    pub fn decision(&self) -> Option<Decision<F>> {
        let mut failures = Vec::new();
        let mut duplicate_of: Option<Timestamp> = None;
        for vote in self.votes.values() {
            let vote = vote.as_ref()?;
            failures.extend(vote.failures.iter().cloned());
            if let Some(ts) = vote.duplicate_of {
                duplicate_of = Some(duplicate_of.map_or(ts, |d| d.min(ts)));
            }
        }
        Some(match duplicate_of {
            Some(ts) => Decision::Duplicate(ts),
            None if failures.is_empty() => Decision::Committed,
            None => Decision::Aborted(failures),
        })
    }

    /// Whether `decision` (reached elsewhere) agrees with every vote recorded here: a "no" vote
    /// here cannot be part of a commit, and a duplicate here must be the decision.
    pub fn agrees_with(&self, decision: &Decision<F>) -> bool {
        self.votes.values().flatten().all(|vote| match decision {
            Decision::Duplicate(ts) => vote.duplicate_of.is_none_or(|d| d >= *ts),
            Decision::Committed => vote.failures.is_empty() && vote.duplicate_of.is_none(),
            Decision::Aborted(all) => {
                vote.duplicate_of.is_none() && vote.failures.iter().all(|f| all.contains(f))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no(reason: &'static str) -> Vote<&'static str> {
        Vote {
            failures: vec![reason],
            duplicate_of: None,
        }
    }

    #[test]
    fn waits_for_every_vote() {
        let mut ballot = Ballot::new(["a", "b"]);
        assert_eq!(ballot.decision(), None);
        ballot.record(&"b", no("b is too large")).unwrap();
        assert_eq!(ballot.decision(), None, "one no does not decide early");
        assert_eq!(ballot.missing().collect::<Vec<_>>(), [&"a"]);
        ballot.record(&"a", Vote::yes()).unwrap();
        assert_eq!(
            ballot.decision(),
            Some(Decision::Aborted(vec!["b is too large"]))
        );
    }

    #[test]
    fn failures_come_in_document_order_whatever_the_arrival() {
        let mut one = Ballot::new(["a", "b"]);
        one.record(&"a", no("a")).unwrap();
        one.record(&"b", no("b")).unwrap();
        let mut two = Ballot::new(["b", "a"]);
        two.record(&"b", no("b")).unwrap();
        two.record(&"a", no("a")).unwrap();
        assert_eq!(one.decision(), two.decision());
        assert_eq!(one.decision(), Some(Decision::Aborted(vec!["a", "b"])));
    }

    #[test]
    fn a_duplicate_wins_over_failures() {
        let mut ballot = Ballot::new(["a", "b"]);
        ballot.record(&"a", no("a")).unwrap();
        ballot
            .record(
                &"b",
                Vote {
                    failures: vec![],
                    duplicate_of: Some(Timestamp(7)),
                },
            )
            .unwrap();
        assert_eq!(ballot.decision(), Some(Decision::Duplicate(Timestamp(7))));
    }

    #[test]
    fn votes_are_checked_not_overwritten() {
        let mut ballot: Ballot<&str, &str> = Ballot::new(["a"]);
        ballot.record(&"a", Vote::yes()).unwrap();
        ballot.record(&"a", Vote::yes()).unwrap();
        assert!(ballot.record(&"a", no("x")).is_err());
        ballot.record(&"z", no("not a participant")).unwrap();
        assert_eq!(ballot.decision(), Some(Decision::Committed));
        assert!(ballot.agrees_with(&Decision::Committed));
        assert!(
            ballot.agrees_with(&Decision::Duplicate(Timestamp(3))),
            "another document may hold the key"
        );
        let mut refused: Ballot<&str, &str> = Ballot::new(["a", "b"]);
        refused.record(&"a", no("a")).unwrap();
        assert!(!refused.agrees_with(&Decision::Committed));
        assert!(refused.agrees_with(&Decision::Aborted(vec!["a", "b"])));
    }
}
