//! What each caller may read of the node table: rows a second, per principal.
//!
//! A whole read of 10,000 nodes is tens of milliseconds of the head's CPU, so a caller
//! reading in a loop (or a thousand reads at once) could take the head from everyone
//! else. Each principal has a budget of rows: `ClusterConfig::read_rows_per_s` come back
//! every second, up to a second's worth or one whole table, whichever is more. A read
//! reserves what it may cost before it runs (the table's size, or the number of ids it
//! names) and gives back what it did not use. A read the budget cannot cover yet waits
//! for it, up to `MOST_WAITED`; one that would wait longer is refused at once, costing
//! nothing, with the time to come back. The operator and the head's own control plane
//! read without a budget. Accounts are one budget whatever job or submission they read
//! through; each node is one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use ionet_common::authz::Principal;
use ionet_common::NodeId;
use tonic::Status;

/// The longest a read waits for its budget before it is refused instead.
pub const MOST_WAITED: Duration = Duration::from_secs(2);

/// Past this many budgets kept, full ones (of callers not reading lately) are dropped.
const MOST_KEPT: usize = 100_000;

/// Whose budget a read spends.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Reader {
    Account(std::sync::Arc<str>),
    Node(NodeId),
    /// Machines holding a join token, and scrapers: one budget for each kind.
    Kind(&'static str),
}

impl Reader {
    fn of(principal: &Principal) -> Option<Reader> {
        Some(match principal {
            Principal::Admin | Principal::Control => return None,
            Principal::Account(account) => Reader::Account(account.clone()),
            Principal::Job { account, .. } | Principal::Submission { account, .. } => Reader::Account(account.clone()),
            Principal::Node(node) | Principal::Inspect(node) => Reader::Node(*node),
            Principal::Joiner => Reader::Kind("joiner"),
            Principal::Metrics => Reader::Kind("metrics"),
            Principal::NodeMetrics => Reader::Kind("node-metrics"),
        })
    }
}

/// One reader's rows: what is left (below zero while reads wait for it), and when it was
/// last topped up.
struct Rows {
    left: f64,
    at: Instant,
}

/// Every reader's budget.
pub struct ReadBudgets {
    per_second: f64,
    budgets: DashMap<Reader, Mutex<Rows>>,
}

/// Rows reserved for one read: `settle` gives back what it did not use.
#[must_use = "a reservation is settled with what the read used"]
pub struct Reserved<'a> {
    budgets: &'a ReadBudgets,
    reader: Option<Reader>,
    rows: usize,
}

impl Reserved<'_> {
    /// The read used `used` rows of those reserved: the rest go back.
    pub fn settle(self, used: usize) {
        let Some(reader) = &self.reader else { return };
        if let Some(budget) = self.budgets.budgets.get(reader) {
            let mut rows = budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            rows.left += self.rows.saturating_sub(used) as f64;
        }
    }
}

impl ReadBudgets {
    /// Budgets of `per_second` rows a second; 0: reads are not limited.
    pub fn new(per_second: u64) -> Self {
        ReadBudgets { per_second: per_second as f64, budgets: DashMap::new() }
    }

    /// Reserves `rows` of `principal`'s budget for a read of a table of `table` rows, and
    /// waits until the budget covers them; refuses (reserving nothing) a read that would
    /// wait longer than `MOST_WAITED`, saying when to come back.
    pub async fn reserve(&self, principal: &Principal, rows: usize, table: usize) -> Result<Reserved<'_>, Status> {
        let reader = Reader::of(principal).filter(|_| self.per_second > 0.0);
        let Some(reader) = reader else { return Ok(Reserved { budgets: self, reader: None, rows }) };
        let wait = self.take(&reader, rows, table).map_err(|wait| {
            Status::resource_exhausted(format!(
                "{principal} has read its share of the node table ({} rows a second): try again in {} ms",
                self.per_second as u64,
                wait.as_millis()
            ))
        })?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(Reserved { budgets: self, reader: Some(reader), rows })
    }

    /// Takes `rows` from `reader`'s budget: how long until it covers them, or (taking
    /// nothing) how long until a read of that many could come back.
    fn take(&self, reader: &Reader, rows: usize, table: usize) -> Result<Duration, Duration> {
        let most = self.per_second.max(table as f64);
        if self.budgets.len() > MOST_KEPT {
            self.budgets.retain(|_, budget| {
                let rows = budget.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
                rows.left + rows.at.elapsed().as_secs_f64() * self.per_second < most
            });
        }
        let budget =
            self.budgets.entry(reader.clone()).or_insert_with(|| Mutex::new(Rows { left: most, at: Instant::now() }));
        let mut budget = budget.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        budget.left = (budget.left + now.duration_since(budget.at).as_secs_f64() * self.per_second).min(most);
        budget.at = now;
        let after = budget.left - rows as f64;
        let wait = Duration::from_secs_f64((-after).max(0.0) / self.per_second);
        if wait > MOST_WAITED {
            return Err(wait - MOST_WAITED);
        }
        budget.left = after;
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> Reader {
        Reader::Account(name.into())
    }

    #[test]
    fn a_reader_waits_for_its_budget_and_is_refused_past_the_longest_wait() {
        let budgets = ReadBudgets::new(100);
        // A full budget: a second's worth, or a whole table when that is more.
        assert_eq!(budgets.take(&account("a"), 1_000, 1_000), Ok(Duration::ZERO));
        // The next whole read waits for its rows to come back: ten seconds, refused.
        let refused = budgets.take(&account("a"), 1_000, 1_000).unwrap_err();
        assert!(refused > Duration::from_secs(7) && refused <= Duration::from_secs(8), "{refused:?}");
        // A small one waits a little.
        let wait = budgets.take(&account("a"), 50, 1_000).unwrap();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        // Another reader's budget is its own.
        assert_eq!(budgets.take(&account("b"), 1_000, 1_000), Ok(Duration::ZERO));
    }

    #[test]
    fn what_a_read_did_not_use_goes_back() {
        let budgets = ReadBudgets::new(100);
        let principal = Principal::Account("a".into());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            let reserved = budgets.reserve(&principal, 1_000, 1_000).await.unwrap();
            reserved.settle(10);
            // 990 came back: another read of 900 needs no wait.
            assert_eq!(budgets.take(&account("a"), 900, 1_000), Ok(Duration::ZERO));
        });
    }

    #[test]
    fn the_operator_and_unlimited_heads_read_freely() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async {
            let limited = ReadBudgets::new(1);
            for _ in 0..10 {
                limited.reserve(&Principal::Admin, 1_000, 1_000).await.unwrap().settle(1_000);
            }
            let unlimited = ReadBudgets::new(0);
            for _ in 0..10 {
                unlimited.reserve(&Principal::Account("a".into()), 1_000, 1_000).await.unwrap().settle(1_000);
            }
            assert!(limited.budgets.is_empty() && unlimited.budgets.is_empty());
        });
    }
}
