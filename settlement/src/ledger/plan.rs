//! Settlement as a pure function: (epoch, config, pending records, payer balances) →
//! the entries to post and the records they settle.
//!
//! Rounding rule (also in `README.md`): a record's cost is kept exact as a numerator
//! over [`COST_DENOMINATOR`]; numerators are summed per (payer, provider) over the
//! epoch and floored once: `payout = floor(Σ numerator / COST_DENOMINATOR)`. The fee of
//! that pair is `floor(payout × fee_bps / 10000)`. The payer is debited exactly
//! `payout + fee`, the provider credited `payout`, the treasury `fee`; so debits equal
//! credits plus fee with no remainder anywhere. The sub-micro-USD fraction floored away
//! is never charged to anyone (it is below the ledger's resolution).
//!
//! Nothing here reads a clock, a store or a random number: the same inputs give the same
//! entries, in the same order, which is what makes a settlement safe to recompute after
//! an interruption.

use std::collections::BTreeMap;

use ionet_common::resources::MicroUsd;
use ionet_common::{NodeId, Quantity};
use serde::{Deserialize, Serialize};

use super::account::{Account, EntryKind, LedgerEntry};
use crate::error::{SettlementError, SettlementResult};
use crate::fast_hash::FastHashMap;
use crate::usage::{MeteredUsage, RecordId, UsageRecord, COST_DENOMINATOR};

/// Basis points in one whole.
pub const BPS_SCALE: u64 = 10_000;

/// The default protocol fee: 2.5%.
pub const DEFAULT_FEE_BPS: u32 = 250;

/// Ledger-wide settings that shape every settlement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerConfig {
    /// Protocol fee charged to payers on top of usage, in basis points (≤ 10000).
    pub fee_bps: u32,
    /// Availability-reward pool, micro-USD per hour of epoch length (0 disables
    /// rewards). An epoch `(start, end]` shares [`reward_pool_between`]`(start, end)`, so
    /// the total over any run of epochs depends on its span only, not on how often
    /// epochs close.
    pub reward_pool_per_hour: MicroUsd,
    /// Where the reward pool is paid from ([`Account::Funding`] by default: new money
    /// from outside; [`Account::Treasury`] to pay it out of fees).
    pub reward_source: Account,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig { fee_bps: DEFAULT_FEE_BPS, reward_pool_per_hour: 0, reward_source: Account::Funding }
    }
}

impl LedgerConfig {
    pub fn validate(&self) -> SettlementResult<()> {
        if self.fee_bps as u64 > BPS_SCALE {
            return Err(SettlementError::InvalidFeeBps(self.fee_bps));
        }
        if matches!(self.reward_source, Account::Payer(_) | Account::Provider(_)) {
            return Err(SettlementError::InvalidAccount(
                self.reward_source.key(),
                "the reward source must be funding or treasury",
            ));
        }
        Ok(())
    }
}

/// One node's verified availability over an epoch (from heartbeats, measured by the
/// control plane) and its operator's declared power figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAvailability {
    pub node_id: NodeId,
    pub provider_wallet: String,
    /// Verified uptime within the epoch, ms.
    pub uptime_ms: u64,
    /// GPUs the node offers (may be fractional).
    pub gpu_capacity: Quantity,
    /// Declared power draw of the node, watts.
    pub declared_watts: u64,
    /// Declared electricity price, micro-USD per kWh.
    pub electricity_price_per_kwh: MicroUsd,
    /// Whether its uptime earns availability rewards (the control plane says no for GPUs
    /// that have not proved themselves); its uptime and power cost are reported either way.
    #[serde(default = "rewarded_by_default")]
    pub rewarded: bool,
}

fn rewarded_by_default() -> bool {
    true
}

impl NodeAvailability {
    /// Reward weight: uptime ms × GPU units (1/10000 GPU); 0 when not rewarded.
    pub fn weight(&self) -> u128 {
        if !self.rewarded {
            return 0;
        }
        self.uptime_ms as u128 * self.gpu_capacity.units().max(0) as u128
    }

    /// `floor(watts × uptime_ms × price_per_kWh / 3.6e9)`: W·ms → kWh is ÷ 1000 ÷ 3.6e6.
    pub fn power_cost(&self) -> u128 {
        self.declared_watts as u128 * self.uptime_ms as u128 * self.electricity_price_per_kwh as u128 / 3_600_000_000
    }
}

/// What to settle: the epoch's id, its end on the control-plane clock, and the
/// availability measured during it. An epoch covers every unsettled record whose
/// `end_ms <= end_ms` (late records of earlier epochs included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSpec {
    pub epoch_id: u64,
    /// Where the epoch began, for its reward pool: the ledger takes the previous epoch's
    /// end instead when there is one; for the first, when metering began.
    pub start_ms: u64,
    pub end_ms: u64,
    pub availability: Vec<NodeAvailability>,
}

impl EpochSpec {
    /// An epoch ending at `end_ms`, beginning where the previous one ended (at 0 for the
    /// first).
    pub fn new(epoch_id: u64, end_ms: u64) -> Self {
        EpochSpec { epoch_id, start_ms: 0, end_ms, availability: Vec::new() }
    }

    /// Epoch `epoch_id` of a fixed-length schedule starting at `origin_ms`:
    /// it ends at `origin_ms + (epoch_id + 1) × length_ms`.
    pub fn scheduled(epoch_id: u64, origin_ms: u64, length_ms: u64) -> Self {
        EpochSpec::new(epoch_id, origin_ms + (epoch_id + 1) * length_ms)
    }
}

/// What payers owe providers for usage they did not fund: payer → wallet → micro-USD
/// (the balances of the `receivable` accounts).
pub type Receivables = BTreeMap<String, BTreeMap<String, MicroUsd>>;

/// A payer's part of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayerEpoch {
    pub payer: String,
    pub usage: MicroUsd,
    pub fee: MicroUsd,
    /// The part of `usage` its balance did not cover: owed to the providers as
    /// receivables (they are not paid it until the payer pays).
    pub unfunded: MicroUsd,
    /// Debt newly incurred this epoch: the part of `usage + fee` the prepaid balance did
    /// not cover. It stays on the payer's account as a negative balance.
    pub shortfall: MicroUsd,
    /// The payer's balance after the epoch (negative = debt).
    pub balance_after: i64,
}

/// A provider's part of one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderEpoch {
    pub wallet: String,
    /// Usage credited: what its payers funded.
    pub revenue: MicroUsd,
    pub reward: MicroUsd,
    /// Usage its payers did not fund: a receivable, credited once they pay.
    pub receivable: MicroUsd,
    /// Receivables of earlier epochs credited this epoch (their payers paid).
    pub repaid: MicroUsd,
    /// Sum over the provider's nodes of [`NodeAvailability::power_cost`] (reported, not
    /// posted: the ledger does not pay electricity bills).
    pub power_cost: MicroUsd,
    pub uptime_ms: u64,
    pub gpu_capacity: Quantity,
    /// GPU-hours sold, in 1/10000 GPU·ms units.
    pub gpu_unit_ms: u128,
    pub records: u64,
}

/// The permanent record of a settled (or planned) epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch_id: u64,
    pub end_ms: u64,
    pub fee_bps: u32,
    pub records: u64,
    /// Σ provider usage credits.
    pub total_usage: MicroUsd,
    /// Σ treasury fee credits.
    pub total_fee: MicroUsd,
    /// Σ provider reward credits.
    pub total_rewards: MicroUsd,
    /// Reward pool left by integer division, credited to the treasury.
    pub reward_remainder: MicroUsd,
    pub payers: Vec<PayerEpoch>,
    pub providers: Vec<ProviderEpoch>,
}

/// A provider's earnings in one epoch, as `ionet earnings` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderEarnings {
    pub epoch_id: u64,
    pub revenue: MicroUsd,
    pub reward: MicroUsd,
    pub power_cost: MicroUsd,
    /// revenue + reward − power cost.
    pub net: i64,
    pub uptime_ms: u64,
    pub gpu_capacity: Quantity,
}

impl ProviderEpoch {
    pub fn earnings(&self, epoch_id: u64) -> ProviderEarnings {
        ProviderEarnings {
            epoch_id,
            revenue: self.revenue,
            reward: self.reward,
            power_cost: self.power_cost,
            net: self.revenue as i64 + self.reward as i64 - self.power_cost as i64,
            uptime_ms: self.uptime_ms,
            gpu_capacity: self.gpu_capacity,
        }
    }
}

/// Everything one settlement will write, computed before anything is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettlementPlan {
    pub summary: EpochSummary,
    /// The entries to post, in a deterministic order (sequence numbers are 0).
    pub entries: Vec<LedgerEntry>,
    /// The records this settlement consumes (each exactly once).
    pub record_ids: Vec<RecordId>,
}

#[derive(Default)]
struct PairTotal {
    numerator: u128,
}

#[derive(Default, Clone, Copy)]
struct ProviderTotal {
    gpu_unit_ms: u128,
    records: u64,
}

/// Accumulates pending records for one epoch; the hot path of settlement.
///
/// Payer and provider names are interned on first sight so that the per-record work
/// is three hash lookups and no allocation.
#[derive(Default)]
pub struct EpochPlanner {
    payer_index: FastHashMap<String, u32>,
    payer_names: Vec<String>,
    provider_index: FastHashMap<String, u32>,
    provider_names: Vec<String>,
    provider_totals: Vec<ProviderTotal>,
    pairs: FastHashMap<(u32, u32), PairTotal>,
    record_ids: Vec<RecordId>,
}

fn intern(index: &mut FastHashMap<String, u32>, names: &mut Vec<String>, name: &str) -> u32 {
    if let Some(&id) = index.get(name) {
        return id;
    }
    let id = names.len() as u32;
    names.push(name.to_owned());
    index.insert(name.to_owned(), id);
    id
}

fn overflow(what: impl Into<String>) -> SettlementError {
    SettlementError::Overflow(what.into())
}

impl EpochPlanner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(records: usize) -> Self {
        EpochPlanner { record_ids: Vec::with_capacity(records), ..Self::default() }
    }

    /// Adds one record to the epoch. The caller guarantees each record is offered once.
    pub fn add(&mut self, record: &MeteredUsage<'_>) -> SettlementResult<()> {
        let duration = record.end_ms.saturating_sub(record.start_ms) as u128;
        let gpu_unit_ms = record.gpu_units.max(0) as u128 * duration;
        let cpu_unit_ms = record.cpu_units.max(0) as u128 * duration;
        let numerator = gpu_unit_ms
            .checked_mul(record.price_per_gpu_hour as u128)
            .and_then(|gpu| {
                cpu_unit_ms.checked_mul(record.price_per_cpu_hour as u128).and_then(|cpu| gpu.checked_add(cpu))
            })
            .ok_or_else(|| overflow(format!("cost of usage record {}", record.record_id)))?;

        let payer = intern(&mut self.payer_index, &mut self.payer_names, record.payer_account);
        let provider = intern(&mut self.provider_index, &mut self.provider_names, record.provider_wallet);
        if provider as usize == self.provider_totals.len() {
            self.provider_totals.push(ProviderTotal::default());
        }
        let pair = self.pairs.entry((payer, provider)).or_default();
        pair.numerator = pair.numerator.checked_add(numerator).ok_or_else(|| {
            overflow(format!("usage of payer {} at provider {}", record.payer_account, record.provider_wallet))
        })?;
        let totals = &mut self.provider_totals[provider as usize];
        totals.gpu_unit_ms += gpu_unit_ms;
        totals.records += 1;
        self.record_ids.push(record.record_id);
        Ok(())
    }

    pub fn records(&self) -> usize {
        self.record_ids.len()
    }

    /// Turns the totals into entries. `balance_of` gives each payer's balance before
    /// the epoch (only used to report shortfalls; it never changes what is posted).
    pub fn finish(
        self,
        spec: &EpochSpec,
        config: &LedgerConfig,
        balance_of: &mut dyn FnMut(&Account) -> SettlementResult<i64>,
        receivables: &Receivables,
    ) -> SettlementResult<SettlementPlan> {
        config.validate()?;
        let epoch = Some(spec.epoch_id);
        let mut pairs: Vec<((u32, u32), PairTotal)> = self.pairs.into_iter().collect();
        pairs.sort_unstable_by(|((pa, qa), _), ((pb, qb), _)| {
            (&self.payer_names[*pa as usize], &self.provider_names[*qa as usize])
                .cmp(&(&self.payer_names[*pb as usize], &self.provider_names[*qb as usize]))
        });

        let mut entries = Vec::with_capacity(pairs.len() + self.payer_names.len());
        // Per payer: (usage, fee) and its pairs' payouts, in (payer, provider) order.
        let mut payer_totals: BTreeMap<&str, (u64, u64, Vec<(&str, u64)>)> = BTreeMap::new();
        let mut providers: BTreeMap<String, ProviderEpoch> = BTreeMap::new();
        let (mut total_usage, mut total_fee) = (0u64, 0u64);

        for ((payer, provider), total) in &pairs {
            let payer_name = &self.payer_names[*payer as usize];
            let wallet = &self.provider_names[*provider as usize];
            let payout = u64::try_from(total.numerator / COST_DENOMINATOR)
                .map_err(|_| overflow(format!("payout of {payer_name} to {wallet}")))?;
            let fee = (payout as u128 * config.fee_bps as u128 / BPS_SCALE as u128) as u64;
            let sums = payer_totals.entry(payer_name.as_str()).or_default();
            sums.0 = sums.0.checked_add(payout).ok_or_else(|| overflow("payer usage"))?;
            sums.1 = sums.1.checked_add(fee).ok_or_else(|| overflow("payer fee"))?;
            sums.2.push((wallet.as_str(), payout));
            total_usage = total_usage.checked_add(payout).ok_or_else(|| overflow("total usage"))?;
            total_fee = total_fee.checked_add(fee).ok_or_else(|| overflow("total fee"))?;
            provider_entry(&mut providers, wallet);
        }
        for (index, wallet) in self.provider_names.iter().enumerate() {
            let totals = self.provider_totals[index];
            let entry = providers
                .entry(wallet.clone())
                .or_insert_with(|| ProviderEpoch { wallet: wallet.clone(), ..ProviderEpoch::default() });
            entry.gpu_unit_ms = totals.gpu_unit_ms;
            entry.records = totals.records;
        }
        // Payers that owe providers from earlier epochs are looked at even without usage.
        for payer in receivables.keys() {
            payer_totals.entry(payer.as_str()).or_default();
        }

        let mut payers = Vec::with_capacity(payer_totals.len());
        for (payer, (usage, fee, payouts)) in payer_totals {
            let account = Account::payer(payer);
            let before = balance_of(&account)?;
            // Receivables from earlier epochs are paid once the payer's balance has come
            // back past what it still owes (oldest wallet order, deterministic).
            let debt = (-(before as i128)).max(0) as u128;
            if let Some(owed) = receivables.get(payer) {
                let outstanding: u128 = owed.values().map(|&amount| amount as u128).sum();
                let mut repayable = outstanding.saturating_sub(debt) as u64;
                for (wallet, &amount) in owed {
                    let repaid = amount.min(repayable);
                    if repaid == 0 {
                        continue;
                    }
                    repayable -= repaid;
                    entries.push(LedgerEntry::new(
                        epoch,
                        EntryKind::Repaid,
                        Account::receivable(payer, wallet.as_str()),
                        Account::provider(wallet.as_str()),
                        repaid,
                    ));
                    let entry = provider_entry(&mut providers, wallet);
                    entry.repaid = entry.repaid.checked_add(repaid).ok_or_else(|| overflow("repaid"))?;
                }
            }
            // This epoch's usage is funded from what the balance holds; the rest is owed
            // to the providers (a receivable each), spread over them in proportion.
            let available = before.max(0) as u64;
            let unfunded = usage.saturating_sub(available);
            let mut spread = 0u64;
            for (index, (wallet, payout)) in payouts.iter().enumerate() {
                let share = if index + 1 == payouts.len() {
                    unfunded - spread
                } else {
                    (unfunded as u128 * *payout as u128 / usage.max(1) as u128) as u64
                };
                let share = share.min(*payout);
                spread += share;
                let funded = payout - share;
                let entry = provider_entry(&mut providers, wallet);
                if funded > 0 {
                    entries.push(LedgerEntry::new(
                        epoch,
                        EntryKind::Usage,
                        account.clone(),
                        Account::provider(*wallet),
                        funded,
                    ));
                    entry.revenue = entry.revenue.checked_add(funded).ok_or_else(|| overflow("revenue"))?;
                }
                if share > 0 {
                    entries.push(LedgerEntry::new(
                        epoch,
                        EntryKind::Receivable,
                        account.clone(),
                        Account::receivable(payer, *wallet),
                        share,
                    ));
                    entry.receivable = entry.receivable.checked_add(share).ok_or_else(|| overflow("receivable"))?;
                }
            }
            if usage == 0 && fee == 0 {
                continue;
            }
            if fee > 0 {
                entries.push(LedgerEntry::new(epoch, EntryKind::Fee, account.clone(), Account::Treasury, fee));
            }
            let charge = usage as i128 + fee as i128;
            let after =
                i64::try_from(before as i128 - charge).map_err(|_| overflow(format!("balance of {account}")))?;
            let debt_before = (-(before as i128)).max(0);
            let debt_after = (-(after as i128)).max(0);
            payers.push(PayerEpoch {
                payer: payer.to_string(),
                usage,
                fee,
                unfunded,
                shortfall: (debt_after - debt_before).max(0) as u64,
                balance_after: after,
            });
        }

        // Availability rewards, aggregated per wallet over its nodes.
        let mut weights: BTreeMap<&str, u128> = BTreeMap::new();
        for node in &spec.availability {
            let weight = weights.entry(node.provider_wallet.as_str()).or_default();
            *weight = weight.checked_add(node.weight()).ok_or_else(|| overflow("reward weight"))?;
            let entry = providers
                .entry(node.provider_wallet.clone())
                .or_insert_with(|| ProviderEpoch { wallet: node.provider_wallet.clone(), ..ProviderEpoch::default() });
            entry.uptime_ms = entry.uptime_ms.saturating_add(node.uptime_ms);
            entry.gpu_capacity = entry.gpu_capacity + node.gpu_capacity;
            entry.power_cost =
                u64::try_from(entry.power_cost as u128 + node.power_cost()).map_err(|_| overflow("power cost"))?;
        }
        let weights: Vec<(&str, u128)> = weights.into_iter().collect();
        let pool = reward_pool_between(config.reward_pool_per_hour, spec.start_ms, spec.end_ms)?;
        let (shares, reward_remainder) = split_rewards(pool, &weights)?;
        let mut total_rewards = 0u64;
        for (wallet, share) in shares {
            if share == 0 {
                continue;
            }
            total_rewards += share;
            providers.get_mut(wallet).expect("weighted wallet has an entry").reward = share;
            entries.push(LedgerEntry::new(
                epoch,
                EntryKind::Reward,
                config.reward_source.clone(),
                Account::provider(wallet),
                share,
            ));
        }
        if reward_remainder > 0 && config.reward_source != Account::Treasury {
            entries.push(LedgerEntry::new(
                epoch,
                EntryKind::RewardRemainder,
                config.reward_source.clone(),
                Account::Treasury,
                reward_remainder,
            ));
        }

        Ok(SettlementPlan {
            summary: EpochSummary {
                epoch_id: spec.epoch_id,
                end_ms: spec.end_ms,
                fee_bps: config.fee_bps,
                records: self.record_ids.len() as u64,
                total_usage,
                total_fee,
                total_rewards,
                reward_remainder,
                payers,
                providers: providers.into_values().collect(),
            },
            entries,
            record_ids: self.record_ids,
        })
    }
}

/// The epoch line of provider `wallet`, made empty if it has none yet.
fn provider_entry<'a>(providers: &'a mut BTreeMap<String, ProviderEpoch>, wallet: &str) -> &'a mut ProviderEpoch {
    providers
        .entry(wallet.to_string())
        .or_insert_with(|| ProviderEpoch { wallet: wallet.to_string(), ..ProviderEpoch::default() })
}

/// Splits `pool` among wallets in proportion to their weight:
/// `share_i = floor(pool × weight_i / Σ weight)`; returns the shares (in input order)
/// and the remainder `pool − Σ share_i` (less than the number of wallets with weight).
/// With no weight at all nothing is emitted: no shares and no remainder. Should the
/// weights sum past 2^64 they are all shifted right by the same number of bits first,
/// so that `pool × weight` always fits in 128 bits.
pub fn split_rewards<'a>(
    pool: MicroUsd,
    weights: &[(&'a str, u128)],
) -> SettlementResult<(Vec<(&'a str, MicroUsd)>, MicroUsd)> {
    let total: u128 = weights
        .iter()
        .try_fold(0u128, |sum, (_, weight)| sum.checked_add(*weight))
        .ok_or_else(|| overflow("total reward weight"))?;
    let shift = 64u32.saturating_sub(total.leading_zeros());
    let total = weights.iter().map(|(_, weight)| weight >> shift).sum::<u128>();
    if pool == 0 || total == 0 {
        return Ok((Vec::new(), 0));
    }
    let mut paid = 0u64;
    let mut shares = Vec::with_capacity(weights.len());
    for (wallet, weight) in weights {
        let share = (pool as u128 * (weight >> shift) / total) as u64;
        paid += share;
        shares.push((*wallet, share));
    }
    Ok((shares, pool - paid))
}

/// The reward pool of the epoch `(start_ms, end_ms]` at `per_hour` micro-USD per hour:
/// what accrued by `end_ms` less what accrued by `start_ms`, each floored from the Unix
/// epoch, so consecutive epochs sum to exactly the pool of their whole span.
pub fn reward_pool_between(per_hour: MicroUsd, start_ms: u64, end_ms: u64) -> SettlementResult<MicroUsd> {
    const HOUR_MS: u128 = 3_600_000;
    let accrued = |at: u64| u128::from(per_hour) * u128::from(at) / HOUR_MS;
    let pool = accrued(end_ms).saturating_sub(accrued(start_ms.min(end_ms)));
    u64::try_from(pool).map_err(|_| overflow("reward pool"))
}

/// The pure entry point: plans one epoch from an iterator of pending records.
pub fn plan_epoch<'a>(
    spec: &EpochSpec,
    config: &LedgerConfig,
    records: impl IntoIterator<Item = &'a UsageRecord>,
    balance_of: &mut dyn FnMut(&Account) -> SettlementResult<i64>,
    receivables: &Receivables,
) -> SettlementResult<SettlementPlan> {
    let mut planner = EpochPlanner::new();
    for record in records {
        if record.end_ms <= spec.end_ms {
            planner.add(&record.metered())?;
        }
    }
    planner.finish(spec, config, balance_of, receivables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reward_pool_accrues_by_time_not_by_closing() {
        const HOUR: u64 = 3_600_000;
        assert_eq!(reward_pool_between(1_000_000, 0, HOUR).unwrap(), 1_000_000);
        assert_eq!(reward_pool_between(1_000_000, HOUR, HOUR + HOUR / 2).unwrap(), 500_000);
        // However an hour is cut into epochs, its pools sum to the hour's.
        let ends = [7, 999, 1_234_567, 2_000_001, 3_599_999, HOUR];
        let mut start = 0;
        let mut total = 0;
        for end in ends {
            total += reward_pool_between(1_000_003, HOUR * 5 + start, HOUR * 5 + end).unwrap();
            start = end;
        }
        assert_eq!(total, 1_000_003);
        assert_eq!(reward_pool_between(1_000_000, HOUR, HOUR).unwrap(), 0);
    }

    #[test]
    fn rewards_split_by_weight_and_remainder_goes_back() {
        let (shares, remainder) = split_rewards(100, &[("a", 1), ("b", 1), ("c", 1)]).unwrap();
        assert_eq!(shares, vec![("a", 33), ("b", 33), ("c", 33)]);
        assert_eq!(remainder, 1);
        let (shares, remainder) = split_rewards(1_000, &[("a", 3), ("b", 1)]).unwrap();
        assert_eq!(shares, vec![("a", 750), ("b", 250)]);
        assert_eq!(remainder, 0);
        let (shares, remainder) = split_rewards(1_000, &[("a", 0)]).unwrap();
        assert!(shares.is_empty());
        assert_eq!(remainder, 0);
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let big = u128::MAX / 4;
        let (shares, remainder) = split_rewards(u64::MAX, &[("a", big), ("b", big)]).unwrap();
        let paid: u128 = shares.iter().map(|(_, s)| *s as u128).sum();
        assert_eq!(paid + remainder as u128, u64::MAX as u128);
    }

    #[test]
    fn power_cost_is_watts_times_hours_times_price() {
        let node = NodeAvailability {
            node_id: NodeId::from_array([0; 28]),
            provider_wallet: "w".into(),
            uptime_ms: 3_600_000,
            gpu_capacity: Quantity::whole(8),
            declared_watts: 3_000,
            electricity_price_per_kwh: 150_000,
            rewarded: true,
        };
        // 3 kW for 1 h at $0.15/kWh = $0.45.
        assert_eq!(node.power_cost(), 450_000);
    }
}
