//! The two sides of a lease, and the span a record may bill: pure, no I/O.
//!
//! A node says when it granted a lease and when it ended; the lease's holder (the job's
//! process that asked for it, or the head for the leases it holds itself) says when it
//! was granted the lease and when it gave it back. Each word is stamped on arrival with
//! the control store's clock, less the age the reporter claims for it, capped at
//! [`MAX_AGE_MS`] (reports wait in queues and batches; nobody may move a word further
//! back than that).
//!
//! Invariants (property-tested in `tests`):
//! - A record runs from the later of the two starts to the earliest end either side (or
//!   the control store, for a dead node or a finished job) gave. Without both starts there
//!   is no record; so a node alone cannot bill a job, and a job alone cannot end another
//!   party's lease early by more than its own word.
//! - The billed span never exceeds the span both sides agreed on: it lies within
//!   `[node start, node end]` and within `[holder start, holder end]`.
//! - A side says each thing once: a second start or end from the same side is ignored.

/// The most a reporter may say its word is older than its arrival.
pub const MAX_AGE_MS: u64 = 2_000;

/// Who closed a lease's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndedBy {
    /// The holder gave it back (or abandoned it) first.
    Holder,
    /// The node ended it first.
    Node,
    /// The node was declared dead: its last heartbeat.
    NodeDead,
    /// The job finished while the lease was still open.
    JobFinished,
    /// Its payer's credit ran out.
    Unfunded,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Holder => "holder",
            EndedBy::Node => "node",
            EndedBy::NodeDead => "node dead",
            EndedBy::JobFinished => "job finished",
            EndedBy::Unfunded => "unfunded",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [EndedBy::Holder, EndedBy::Node, EndedBy::NodeDead, EndedBy::JobFinished, EndedBy::Unfunded]
            .into_iter()
            .find(|by| by.as_str() == text)
    }
}

/// When a word said `age_ms` ago, arriving at `now_ms`, took effect.
pub fn stamp(now_ms: u64, age_ms: u64) -> u64 {
    now_ms.saturating_sub(age_ms.min(MAX_AGE_MS))
}

/// What each side has said of one lease, control-store clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sides {
    pub node_started: Option<u64>,
    pub holder_started: Option<u64>,
    pub node_ended: Option<u64>,
    pub holder_ended: Option<u64>,
    /// An end the control store imposed (a dead node, a finished job), with its cause.
    pub forced_end: Option<(u64, EndedBy)>,
}

impl Sides {
    /// When the record starts: both sides have said so.
    pub fn start(&self) -> Option<u64> {
        Some(self.node_started?.max(self.holder_started?))
    }

    /// The earliest end anyone gave, and who gave it.
    pub fn end(&self) -> Option<(u64, EndedBy)> {
        let ends = [
            self.holder_ended.map(|at| (at, EndedBy::Holder)),
            self.node_ended.map(|at| (at, EndedBy::Node)),
            self.forced_end,
        ];
        ends.into_iter().flatten().min_by_key(|(at, _)| *at)
    }

    /// Whether the lease is over for good: some end was given.
    pub fn is_over(&self) -> bool {
        self.end().is_some()
    }

    /// The span to bill once the lease is over: `(start, end, who ended it)`, never
    /// ending before it starts. `None`: the two sides never both said it started.
    pub fn billed_span(&self) -> Option<(u64, u64, EndedBy)> {
        let start = self.start()?;
        let (end, by) = self.end()?;
        Some((start, end.max(start), by))
    }

    /// Whether the holder has given the lease back while the node still says it runs:
    /// the node must be told to end it.
    pub fn node_must_stop(&self) -> bool {
        self.node_started.is_some() && self.node_ended.is_none() && self.is_over()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Word {
        NodeStart,
        HolderStart,
        NodeEnd,
        HolderEnd,
        Forced,
    }

    fn word() -> impl Strategy<Value = Word> {
        prop_oneof![
            Just(Word::NodeStart),
            Just(Word::HolderStart),
            Just(Word::NodeEnd),
            Just(Word::HolderEnd),
            Just(Word::Forced),
        ]
    }

    /// Applies a word as the book does: each side says each thing once.
    fn apply(sides: &mut Sides, word: &Word, at: u64) {
        let slot = match word {
            Word::NodeStart => &mut sides.node_started,
            Word::HolderStart => &mut sides.holder_started,
            Word::NodeEnd => &mut sides.node_ended,
            Word::HolderEnd => &mut sides.holder_ended,
            Word::Forced => {
                sides.forced_end.get_or_insert((at, EndedBy::NodeDead));
                return;
            }
        };
        slot.get_or_insert(at);
    }

    proptest! {
        /// Over random words with arbitrary delays (ages) and losses (words never sent),
        /// the billed span lies inside what each side said.
        #[test]
        fn billed_seconds_never_exceed_what_both_sides_agreed(
            events in proptest::collection::vec((word(), 0u64..10_000, 0u64..5_000, any::<bool>()), 0..12)
        ) {
            let mut sides = Sides::default();
            let mut now = 1_000_000u64;
            for (word, delay, age, lost) in &events {
                now += delay;
                if !lost {
                    apply(&mut sides, word, stamp(now, *age));
                }
            }
            if let Some((start, end, _)) = sides.billed_span() {
                let node_start = sides.node_started.unwrap();
                let holder_start = sides.holder_started.unwrap();
                prop_assert!(start >= node_start && start >= holder_start);
                prop_assert!(end >= start);
                for limit in [sides.node_ended, sides.holder_ended, sides.forced_end.map(|(at, _)| at)].into_iter().flatten() {
                    // Within every end given (or empty when an end came before the start).
                    prop_assert!(end == start || end <= limit);
                }
                prop_assert!(end - start <= now - node_start.max(holder_start));
            } else {
                prop_assert!(sides.node_started.is_none() || sides.holder_started.is_none() || !sides.is_over());
            }
        }

        /// Records made from such streams, settled by the ledger with any credit (short
        /// or not): balances always sum to zero.
        #[test]
        fn records_of_two_party_spans_settle_to_balances_summing_to_zero(
            leases in proptest::collection::vec(
                proptest::collection::vec((word(), 0u64..600_000, 0u64..5_000, any::<bool>()), 0..10), 1..8),
            credits in proptest::collection::vec(0u64..3_000_000, 2),
        ) {
            use crate::{Account, EpochSpec, Ledger, LedgerConfig, MemoryStore, RecordId, UsageRecord};
            use ionet_common::resources::GPU;
            use ionet_common::{JobId, NodeId, Quantity, ResourceSet};
            let mut ledger = Ledger::new(MemoryStore::new(), LedgerConfig::default()).unwrap();
            for (payer, credit) in ["alice", "bob"].iter().zip(&credits) {
                if *credit > 0 {
                    ledger.add_credits(payer, *credit).unwrap();
                }
            }
            let mut records = Vec::new();
            for (index, events) in leases.iter().enumerate() {
                let mut sides = Sides::default();
                let mut now = 1_000_000u64;
                for (word, delay, age, lost) in events {
                    now += delay;
                    if !lost {
                        apply(&mut sides, word, stamp(now, *age));
                    }
                }
                if let Some((start, end, _)) = sides.billed_span() {
                    records.push(UsageRecord {
                        record_id: RecordId(index as u128 + 1),
                        job_id: JobId::from_sequence(index as u32),
                        payer_account: ["alice", "bob"][index % 2].into(),
                        node_id: NodeId::from_array([index as u8; 28]),
                        provider_wallet: format!("wallet-{}", index % 3),
                        resources: ResourceSet::new().with(GPU, Quantity::whole(1)),
                        start_ms: start,
                        end_ms: end,
                        price_per_gpu_hour: 3_600_000,
                        price_per_cpu_hour: 0,
                    });
                }
            }
            ledger.accept_records(&records).unwrap();
            ledger.settle_epoch(&EpochSpec::new(0, u64::MAX / 2)).unwrap();
            let balances = ledger.balances().unwrap();
            prop_assert_eq!(balances.values().map(|b| *b as i128).sum::<i128>(), 0);
            // Providers are credited at most what was funded.
            let credited: i128 = balances
                .iter()
                .filter(|(account, _)| matches!(account, Account::Provider(_)))
                .map(|(_, b)| *b as i128)
                .sum();
            prop_assert!(credited <= credits.iter().map(|c| *c as i128).sum::<i128>());
        }
    }

    #[test]
    fn an_age_moves_a_word_back_at_most_the_cap() {
        assert_eq!(stamp(10_000, 300), 9_700);
        assert_eq!(stamp(10_000, 60_000), 10_000 - MAX_AGE_MS);
        assert_eq!(stamp(100, 60_000), 0);
    }

    #[test]
    fn a_node_that_withholds_its_end_is_paid_to_the_holders_return() {
        let sides = Sides {
            node_started: Some(1_000),
            holder_started: Some(1_050),
            holder_ended: Some(11_050),
            node_ended: Some(41_050),
            forced_end: None,
        };
        assert_eq!(sides.billed_span(), Some((1_050, 11_050, EndedBy::Holder)));
    }

    #[test]
    fn no_record_without_both_starts() {
        let node_alone = Sides { node_started: Some(1), node_ended: Some(9), ..Sides::default() };
        assert_eq!(node_alone.billed_span(), None);
        let holder_alone = Sides { holder_started: Some(1), holder_ended: Some(9), ..Sides::default() };
        assert_eq!(holder_alone.billed_span(), None);
    }
}
