//! Which held lease a task joins, and how long a task is expected to run: the lease
//! pool's two policies, pure (no locks, no I/O), so they are tested on their own.
//!
//! Guarantees (unit and property tests below):
//! - A task never joins a lease whose `max_calls` are spent, nor one with
//!   [`MAX_PIPELINE`] tasks in flight.
//! - An idle lease always qualifies; a busy one only while its queued work plus the
//!   task's expected run time stays within [`PIPELINE_BUDGET_MICROS`]. So short tasks
//!   queue a few deep (a worker always has its next task), while a long task, or one of a
//!   function not timed yet (expected to take the whole budget), waits for an idle worker
//!   or a new lease, and nothing queues behind it.
//! - Among those that qualify, the least busy is chosen (the first of equals).
//! - The estimate of a function's run time is a moving average (7/8 old, 1/8 new) of what
//!   its replies report; unknown, it is the whole budget; never zero.

use std::collections::HashMap;

/// A busy lease may take another task while its queued work stays within this budget.
pub(crate) const PIPELINE_BUDGET_MICROS: u64 = 2_000;
/// Tasks one lease may have in flight at most.
pub(crate) const MAX_PIPELINE: usize = 32;

/// What the policy reads of one held lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Tasks pushed and not answered.
    pub in_flight: usize,
    /// The sum of their expected run times, in microseconds.
    pub queued_micros: u64,
    /// Its worker has taken all the calls `max_calls` allows.
    pub spent: bool,
}

/// The lease (index into `slots`) a task expected to run `estimate` µs joins, if any.
pub(crate) fn choose(slots: impl IntoIterator<Item = Slot>, estimate: u64) -> Option<usize> {
    slots
        .into_iter()
        .enumerate()
        .filter(|(_, slot)| {
            !slot.spent
                && (slot.in_flight == 0
                    || (slot.in_flight < MAX_PIPELINE
                        && slot.queued_micros.saturating_add(estimate) <= PIPELINE_BUDGET_MICROS))
        })
        .min_by_key(|(_, slot)| slot.in_flight)
        .map(|(index, _)| index)
}

/// Run times per function (`TaskSpec::profile`), as the replies report them.
#[derive(Default, Debug)]
pub(crate) struct RunTimes {
    averages: HashMap<u64, u64>,
}

impl RunTimes {
    /// How long a task of `profile` is expected to run: the whole pipeline budget while
    /// unknown, so that a function's first tasks never queue behind others.
    pub fn estimate(&self, profile: u64) -> u64 {
        self.averages.get(&profile).copied().unwrap_or(PIPELINE_BUDGET_MICROS).max(1)
    }

    pub fn observe(&mut self, profile: u64, run_micros: u64) {
        let average = self.averages.entry(profile).or_insert(run_micros);
        *average = (*average * 7 + run_micros) / 8;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn slot(in_flight: usize, queued_micros: u64) -> Slot {
        Slot { in_flight, queued_micros, spent: false }
    }

    #[test]
    fn short_tasks_queue_long_ones_wait_for_an_idle_worker() {
        let busy = [slot(3, 300), slot(1, 100)];
        assert_eq!(choose(busy, 50), Some(1), "the least busy lease with room");
        assert_eq!(choose(busy, PIPELINE_BUDGET_MICROS), None, "a long task does not queue");
        assert_eq!(choose([slot(2, 100), slot(0, 0)], PIPELINE_BUDGET_MICROS), Some(1), "an idle lease always fits");
        assert_eq!(choose([slot(MAX_PIPELINE, 0)], 1), None, "a full pipeline takes nothing");
        assert_eq!(choose([Slot { in_flight: 0, queued_micros: 0, spent: true }], 1), None, "spent");
        assert_eq!(choose([], 1), None);
    }

    #[test]
    fn estimates_start_at_the_budget_and_follow_the_replies() {
        let mut times = RunTimes::default();
        assert_eq!(times.estimate(7), PIPELINE_BUDGET_MICROS);
        times.observe(7, 80);
        assert_eq!(times.estimate(7), 80);
        times.observe(7, 160);
        assert_eq!(times.estimate(7), 90, "7/8 old, 1/8 new");
        times.observe(8, 0);
        assert_eq!(times.estimate(8), 1, "never zero");
    }

    proptest! {
        #[test]
        fn the_choice_qualifies_and_is_least_busy(
            raw in prop::collection::vec((0..40usize, 0..4_000u64, any::<bool>()), 0..12),
            estimate in 1..4_000u64,
        ) {
            let slots: Vec<Slot> =
                raw.iter().map(|&(in_flight, queued_micros, spent)| Slot { in_flight, queued_micros, spent }).collect();
            let fits = |slot: &Slot| {
                !slot.spent
                    && (slot.in_flight == 0
                        || (slot.in_flight < MAX_PIPELINE && slot.queued_micros + estimate <= PIPELINE_BUDGET_MICROS))
            };
            match choose(slots.iter().copied(), estimate) {
                Some(index) => {
                    let chosen = slots[index];
                    prop_assert!(fits(&chosen));
                    prop_assert!(slots.iter().filter(|slot| fits(slot)).all(|slot| slot.in_flight >= chosen.in_flight));
                }
                None => prop_assert!(!slots.iter().any(fits)),
            }
        }
    }
}
