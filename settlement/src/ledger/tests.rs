//! Ledger invariants: balances sum to zero, debits equal credits plus fee under the
//! written rounding rule, every record settled exactly once however settlement is
//! interrupted and re-run.

use std::collections::{BTreeMap, HashMap};

use ionet_common::resources::{CPU, GPU};
use ionet_common::{JobId, NodeId, Quantity, ResourceSet};
use proptest::prelude::*;

use super::*;
use crate::usage::{RecordId, UsageRecord, COST_DENOMINATOR};
use plan::reward_pool_between;

const PAYERS: [&str; 3] = ["alice", "bob", "carol"];
const WALLETS: [&str; 3] = ["wallet-a", "wallet-b", "wallet-c"];

fn record(id: u128, payer: &str, wallet: &str, gpu_units: i64, cpus: i64, start: u64, end: u64) -> UsageRecord {
    UsageRecord {
        record_id: RecordId(id),
        job_id: JobId::from_sequence(id as u32),
        payer_account: payer.into(),
        node_id: NodeId::from_array([id as u8; 28]),
        provider_wallet: wallet.into(),
        resources: ResourceSet::new().with(GPU, Quantity::from_units(gpu_units)).with(CPU, Quantity::whole(cpus)),
        start_ms: start,
        end_ms: end,
        price_per_gpu_hour: 2_000_000,
        price_per_cpu_hour: 10_000,
    }
}

fn gpu_hour(id: u128, payer: &str, wallet: &str, end: u64) -> UsageRecord {
    record(id, payer, wallet, 10_000, 0, end - 3_600_000, end)
}

fn memory_ledger() -> Ledger<MemoryStore> {
    Ledger::new(MemoryStore::new(), LedgerConfig::default()).unwrap()
}

fn sum_of_balances<S: LedgerStore>(ledger: &Ledger<S>) -> i128 {
    ledger.balances().unwrap().values().map(|b| *b as i128).sum()
}

/// Everything observable about a ledger, to compare two histories.
fn snapshot<S: LedgerStore>(ledger: &Ledger<S>) -> (BTreeMap<Account, i64>, Vec<LedgerEntry>, Vec<EpochSummary>, u64) {
    (
        ledger.balances().unwrap(),
        ledger.entries(0, usize::MAX).unwrap(),
        ledger.epochs().unwrap(),
        ledger.pending_count().unwrap(),
    )
}

/// (payer, wallet, GPU units, CPUs, end, duration, GPU price, CPU price).
type RawRecord = (usize, usize, i64, i64, u64, u64, u64, u64);

fn arb_record() -> impl Strategy<Value = RawRecord> {
    (
        0..PAYERS.len(),
        0..WALLETS.len(),
        0i64..=80_000,     // GPU units: up to 8 GPUs, in 1/10000
        0i64..=16,         // CPUs
        0u64..=10_000_000, // end within ~2.8 h
        0u64..=7_200_000,  // duration
        0u64..=5_000_000,  // price per GPU-hour
        0u64..=50_000,     // price per CPU-hour
    )
}

fn build_records(raw: &[RawRecord]) -> Vec<UsageRecord> {
    raw.iter()
        .enumerate()
        .map(|(index, &(payer, wallet, gpu, cpu, end, duration, gpu_price, cpu_price))| {
            let mut r =
                record(index as u128 + 1, PAYERS[payer], WALLETS[wallet], gpu, cpu, end.saturating_sub(duration), end);
            r.price_per_gpu_hour = gpu_price;
            r.price_per_cpu_hour = cpu_price;
            r
        })
        .collect()
}

const EPOCH_ENDS: [u64; 3] = [3_000_000, 6_000_000, 10_000_000];

fn spec(index: usize) -> EpochSpec {
    let mut spec = EpochSpec::new(index as u64, EPOCH_ENDS[index]);
    spec.availability = vec![
        NodeAvailability {
            node_id: NodeId::from_array([9; 28]),
            provider_wallet: WALLETS[index % WALLETS.len()].into(),
            uptime_ms: 3_000_000,
            gpu_capacity: Quantity::whole(8),
            declared_watts: 2_500,
            electricity_price_per_kwh: 120_000,
            rewarded: true,
        },
        NodeAvailability {
            node_id: NodeId::from_array([8; 28]),
            provider_wallet: "wallet-idle".into(),
            uptime_ms: 2_999_999,
            gpu_capacity: Quantity::from_units(5_000),
            declared_watts: 400,
            electricity_price_per_kwh: 120_000,
            rewarded: true,
        },
    ];
    spec
}

fn rewarding_config() -> LedgerConfig {
    LedgerConfig { reward_pool_per_hour: 1_000_003, ..LedgerConfig::default() }
}

/// Deposits, records and three epochs; returns the ledger.
fn run_history<S: LedgerStore>(
    store: S,
    records: &[UsageRecord],
    deposits: &[u64],
    interrupt: Option<(usize, SettleStep)>,
) -> Ledger<S> {
    let mut ledger = Ledger::new(store, rewarding_config()).unwrap();
    for (payer, amount) in PAYERS.iter().zip(deposits) {
        if *amount > 0 {
            ledger.add_credits(payer, *amount).unwrap();
        }
    }
    assert_eq!(ledger.accept_records(records).unwrap(), records.len());
    for epoch in 0..EPOCH_ENDS.len() {
        if let Some((at_epoch, step)) = interrupt {
            if at_epoch == epoch {
                ledger.interrupt_after(step);
                let err = ledger.settle_epoch(&spec(epoch)).unwrap_err();
                assert!(matches!(err, SettlementError::Interrupted(s) if s == step), "{err}");
                assert!(err.is_retryable());
                // Re-delivery of the whole stream after the crash changes nothing.
                ledger.accept_records(records).unwrap();
            }
        }
        let first = ledger.settle_epoch(&spec(epoch)).unwrap();
        let second = ledger.settle_epoch(&spec(epoch)).unwrap();
        assert_eq!(second, SettleOutcome::AlreadySettled(first.summary().clone()));
    }
    ledger
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn settlement_balances_and_charges_fee_by_the_rule(
        raw in prop::collection::vec(arb_record(), 0..60),
        deposits in prop::collection::vec(0u64..20_000_000, 3),
    ) {
        let records = build_records(&raw);
        let ledger = run_history(MemoryStore::new(), &records, &deposits, None);

        // The sum of all balances is zero.
        prop_assert_eq!(sum_of_balances(&ledger), 0);

        // Every record settled exactly once, in the first epoch whose end covers it.
        prop_assert_eq!(ledger.pending_count().unwrap(), 0);
        for r in &records {
            let expected = EPOCH_ENDS.iter().position(|end| r.end_ms <= *end).unwrap() as u64;
            prop_assert_eq!(ledger.store().settled_in(r.record_id).unwrap(), Some(expected));
        }

        // Recompute each epoch independently from the written rule.
        let mut provider_credits: HashMap<String, i128> = HashMap::new();
        let mut payer_debits: HashMap<String, i128> = HashMap::new();
        let mut treasury = 0i128;
        let mut pools = 0u64;
        for (index, epoch) in ledger.epochs().unwrap().iter().enumerate() {
            let low = if index == 0 { 0 } else { EPOCH_ENDS[index - 1] + 1 };
            let mut pairs: BTreeMap<(&str, &str), u128> = BTreeMap::new();
            for r in records.iter().filter(|r| (low..=EPOCH_ENDS[index]).contains(&r.end_ms)) {
                *pairs.entry((&r.payer_account, &r.provider_wallet)).or_default() += r.cost_numerator().unwrap();
            }
            let mut fee = 0u64;
            let mut usage = 0u64;
            for ((payer, wallet), numerator) in pairs {
                let payout = (numerator / COST_DENOMINATOR) as u64;
                let pair_fee = payout * 250 / 10_000;
                usage += payout;
                fee += pair_fee;
                *provider_credits.entry(wallet.to_string()).or_default() += payout as i128;
                *payer_debits.entry(payer.to_string()).or_default() += (payout + pair_fee) as i128;
            }
            prop_assert_eq!(epoch.total_usage, usage);
            prop_assert_eq!(epoch.total_fee, fee);
            // The reward pool, accrued over the epoch's length, is paid out entirely:
            // shares plus remainder.
            let start = if index == 0 { 0 } else { EPOCH_ENDS[index - 1] };
            let pool = reward_pool_between(1_000_003, start, EPOCH_ENDS[index]).unwrap();
            prop_assert_eq!(epoch.total_rewards + epoch.reward_remainder, pool);
            pools += pool;
            treasury += (fee + epoch.reward_remainder) as i128;
            let provider_rewards: u64 = epoch.providers.iter().map(|p| p.reward).sum();
            prop_assert_eq!(provider_rewards, epoch.total_rewards);
            for p in &epoch.providers {
                *provider_credits.entry(p.wallet.clone()).or_default() += p.reward as i128;
            }
        }
        // Debits equal credits plus fee, account by account: a provider's usage is in its
        // earnings or, where its payer did not fund it, in its receivables.
        let balances = ledger.balances().unwrap();
        let receivable_of = |wallet: &str| -> i128 {
            balances
                .iter()
                .filter(|(account, _)| matches!(account, Account::Receivable(_, w) if w == wallet))
                .map(|(_, balance)| *balance as i128)
                .sum()
        };
        for (wallet, credit) in &provider_credits {
            let earned = balances.get(&Account::provider(wallet.as_str())).copied().unwrap_or(0) as i128;
            prop_assert_eq!(earned + receivable_of(wallet), *credit);
        }
        // Nobody is credited for usage nobody funded: what a payer owes providers is at
        // most its debt.
        for payer in PAYERS {
            let owed: i128 = balances
                .iter()
                .filter(|(account, _)| matches!(account, Account::Receivable(p, _) if p == payer))
                .map(|(_, balance)| *balance as i128)
                .sum();
            let debt = (-(balances.get(&Account::payer(payer)).copied().unwrap_or(0) as i128)).max(0);
            prop_assert!(owed <= debt, "{payer} owes providers {owed} with a debt of {debt}");
        }
        for (payer, deposit) in PAYERS.iter().zip(&deposits) {
            let debit = payer_debits.get(*payer).copied().unwrap_or(0);
            prop_assert_eq!(balances.get(&Account::payer(*payer)).copied().unwrap_or(0) as i128, *deposit as i128 - debit);
        }
        prop_assert_eq!(balances.get(&Account::Treasury).copied().unwrap_or(0) as i128, treasury);
        // The pools over all epochs are the pool of their whole span.
        prop_assert_eq!(pools, reward_pool_between(1_000_003, 0, EPOCH_ENDS[2]).unwrap());
    }

    #[test]
    fn interrupted_settlement_rerun_settles_exactly_once(
        raw in prop::collection::vec(arb_record(), 1..40),
        deposits in prop::collection::vec(0u64..20_000_000, 3),
        epoch in 0..EPOCH_ENDS.len(),
        step in prop::sample::select(SettleStep::ALL.to_vec()),
    ) {
        let records = build_records(&raw);
        let clean = run_history(MemoryStore::new(), &records, &deposits, None);
        let interrupted = run_history(MemoryStore::new(), &records, &deposits, Some((epoch, step)));
        prop_assert_eq!(snapshot(&interrupted), snapshot(&clean));
        prop_assert_eq!(sum_of_balances(&interrupted), 0);
    }
}

#[test]
fn interruption_at_every_step_with_redb_settles_exactly_once() {
    let raw: Vec<_> = (0..30u64)
        .map(|i| {
            (
                (i % 3) as usize,
                (i % 2) as usize,
                2_500 * (i as i64 % 5),
                (i % 4) as i64,
                i * 330_000,
                1_800_000,
                1_900_000,
                20_000,
            )
        })
        .collect();
    let records = build_records(&raw);
    let deposits = [5_000_000, 0, 100_000_000];
    let clean = run_history(MemoryStore::new(), &records, &deposits, None);
    for epoch in 0..EPOCH_ENDS.len() {
        for step in SettleStep::ALL {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ledger.redb");
            let ledger = run_history(RedbStore::open(&path).unwrap(), &records, &deposits, Some((epoch, step)));
            assert_eq!(snapshot(&ledger), snapshot(&clean), "epoch {epoch} step {step:?}");
        }
    }
}

#[test]
fn interrupted_credit_operations_change_nothing_or_everything() {
    let mut ledger = memory_ledger();
    ledger.interrupt_after(SettleStep::ApplyBalances);
    assert!(ledger.add_credits("alice", 10).is_err());
    assert_eq!(ledger.balance(&Account::payer("alice")).unwrap(), 0);
    assert!(ledger.entries(0, 10).unwrap().is_empty());
    ledger.interrupt_after(SettleStep::Acknowledge);
    assert!(ledger.add_credits("alice", 10).is_err());
    assert_eq!(ledger.balance(&Account::payer("alice")).unwrap(), 10);
}

#[test]
fn shortfall_becomes_debt_and_credits_repay_it() {
    let mut ledger = memory_ledger();
    ledger.add_credits("alice", 1_000_000).unwrap();
    // Three GPU-hours at $2: $6 usage + 2.5% fee = $6.15 against $1 of credit.
    let records: Vec<_> = (0..3).map(|i| gpu_hour(i, "alice", "wallet-a", 4_000_000)).collect();
    ledger.accept_records(&records).unwrap();
    let outcome = ledger.settle_epoch(&EpochSpec::new(0, 4_000_000)).unwrap();
    let payer = &outcome.summary().payers[0];
    assert_eq!((payer.usage, payer.fee), (6_000_000, 150_000));
    assert_eq!(payer.shortfall, 5_150_000);
    assert_eq!(payer.balance_after, -5_150_000);
    assert_eq!(ledger.balance(&Account::payer("alice")).unwrap(), -5_150_000);
    // The provider is credited what was funded; the rest is its receivable, and the
    // payer's debt is not dropped.
    assert_eq!(payer.unfunded, 5_000_000);
    let provider = &outcome.summary().providers[0];
    assert_eq!((provider.revenue, provider.receivable, provider.repaid), (1_000_000, 5_000_000, 0));
    assert_eq!(ledger.balance(&Account::provider("wallet-a")).unwrap(), 1_000_000);
    assert_eq!(ledger.balance(&Account::receivable("alice", "wallet-a")).unwrap(), 5_000_000);
    assert_eq!(ledger.balance(&Account::Treasury).unwrap(), 150_000);
    assert_eq!(ledger.refund("alice").unwrap(), 0, "nothing to refund while in debt");
    assert_eq!(ledger.add_credits("alice", 6_000_000).unwrap(), 850_000);
    // A second epoch: the paid debt frees the receivable first (paid with this epoch),
    // the new usage is funded from what is left, and only the new debt is shortfall.
    ledger.accept_records(&[gpu_hour(10, "alice", "wallet-a", 8_000_000)]).unwrap();
    let outcome = ledger.settle_epoch(&EpochSpec::new(1, 8_000_000)).unwrap();
    assert_eq!(outcome.summary().payers[0].shortfall, 2_050_000 - 850_000);
    assert_eq!(outcome.summary().payers[0].unfunded, 2_000_000 - 850_000);
    let provider = &outcome.summary().providers[0];
    assert_eq!((provider.revenue, provider.receivable, provider.repaid), (850_000, 1_150_000, 5_000_000));
    assert_eq!(ledger.balance(&Account::provider("wallet-a")).unwrap(), 1_000_000 + 5_000_000 + 850_000);
    assert_eq!(ledger.balance(&Account::receivable("alice", "wallet-a")).unwrap(), 1_150_000);
    assert_eq!(sum_of_balances(&ledger), 0);
}

#[test]
fn refund_returns_unused_credit_once() {
    let mut ledger = memory_ledger();
    ledger.add_credits("bob", 10_000_000).unwrap();
    ledger.accept_records(&[gpu_hour(1, "bob", "wallet-a", 3_600_000)]).unwrap();
    ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap();
    assert_eq!(ledger.refund("bob").unwrap(), 10_000_000 - 2_050_000);
    assert_eq!(ledger.refund("bob").unwrap(), 0);
    assert_eq!(ledger.balance(&Account::payer("bob")).unwrap(), 0);
    assert_eq!(ledger.balance(&Account::Funding).unwrap(), -2_050_000);
    let kinds: Vec<_> = ledger.entries(0, 10).unwrap().iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EntryKind::Deposit, EntryKind::Usage, EntryKind::Fee, EntryKind::Refund]);
    assert!(ledger.add_credits("bob", 0).is_err());
    assert!(ledger.add_credits("", 5).is_err());
}

#[test]
fn redelivered_records_are_settled_once() {
    let mut ledger = memory_ledger();
    ledger.add_credits("alice", 100_000_000).unwrap();
    let r = gpu_hour(1, "alice", "wallet-a", 3_600_000);
    assert_eq!(ledger.accept_records(&[r.clone(), r.clone()]).unwrap(), 1);
    ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap();
    assert_eq!(ledger.accept_records(std::slice::from_ref(&r)).unwrap(), 0);
    ledger.settle_epoch(&EpochSpec::new(1, 7_200_000)).unwrap();
    assert_eq!(ledger.balance(&Account::provider("wallet-a")).unwrap(), 2_000_000);
    // A different record under a pending id is refused, not merged.
    let mut a = gpu_hour(2, "alice", "wallet-a", 9_000_000);
    ledger.accept_records(std::slice::from_ref(&a)).unwrap();
    a.price_per_gpu_hour += 1;
    let err = ledger.accept_records(&[a]).unwrap_err();
    assert!(matches!(err, SettlementError::ConflictingRecord(_)), "{err}");
}

#[test]
fn late_records_go_to_the_next_epoch_and_epochs_run_in_order() {
    let mut ledger = memory_ledger();
    ledger.settle_epoch(&EpochSpec::new(5, 10_000)).unwrap();
    // Ended in epoch 5 but arrived after it closed.
    ledger.accept_records(&[record(1, "alice", "wallet-a", 10_000, 0, 0, 9_000)]).unwrap();
    let outcome = ledger.settle_epoch(&EpochSpec::new(6, 20_000)).unwrap();
    assert_eq!(outcome.summary().records, 1);
    let err = ledger.settle_epoch(&EpochSpec::new(4, 30_000)).unwrap_err();
    assert!(err.to_string().contains("epoch 4 (end 30000 ms) is out of order"), "{err}");
    assert!(matches!(ledger.settle_epoch(&EpochSpec::new(5, 0)).unwrap(), SettleOutcome::AlreadySettled(_)));
}

#[test]
fn dry_run_writes_nothing_and_matches_the_settlement() {
    let mut ledger = memory_ledger();
    ledger
        .accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000), gpu_hour(2, "bob", "wallet-b", 3_600_000)])
        .unwrap();
    let before = snapshot(&ledger);
    let plan = ledger.dry_run(&EpochSpec::new(0, 3_600_000)).unwrap();
    assert_eq!(snapshot(&ledger), before);
    assert_eq!(plan.entries.len(), 4);
    let outcome = ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap();
    assert_eq!(outcome.summary(), &plan.summary);
}

#[test]
fn rewards_split_by_uptime_times_gpus_with_remainder_to_treasury() {
    let config = LedgerConfig { reward_pool_per_hour: 1_000_000, ..LedgerConfig::default() };
    let mut ledger = Ledger::new(MemoryStore::new(), config).unwrap();
    let node = |byte: u8, wallet: &str, uptime_ms: u64, gpus: i64| NodeAvailability {
        node_id: NodeId::from_array([byte; 28]),
        provider_wallet: wallet.into(),
        uptime_ms,
        gpu_capacity: Quantity::whole(gpus),
        declared_watts: 1_000,
        electricity_price_per_kwh: 100_000,
        rewarded: true,
    };
    let mut spec = EpochSpec::new(0, 3_600_000);
    // Weights 8·h, 1·h + 1·h (two nodes of wallet-b), 0: shares 8/10, 2/10, 0.
    spec.availability = vec![
        node(1, "wallet-a", 3_600_000, 8),
        node(2, "wallet-b", 3_600_000, 1),
        node(3, "wallet-b", 3_600_000, 1),
        node(4, "wallet-c", 0, 4),
    ];
    ledger.add_credits("alice", 100_000_000).unwrap();
    ledger.accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000)]).unwrap();
    ledger.settle_epoch(&spec).unwrap();
    assert_eq!(ledger.balance(&Account::provider("wallet-a")).unwrap(), 2_000_000 + 800_000);
    assert_eq!(ledger.balance(&Account::provider("wallet-b")).unwrap(), 200_000);
    assert_eq!(ledger.balance(&Account::provider("wallet-c")).unwrap(), 0);

    // An indivisible pool: 3 equal weights share 100 → 33 each, 1 to the treasury.
    let config = LedgerConfig { reward_pool_per_hour: 100, fee_bps: 0, ..LedgerConfig::default() };
    let mut ledger = Ledger::new(MemoryStore::new(), config).unwrap();
    let mut spec = EpochSpec::new(0, 3_600_000);
    spec.availability = vec![node(1, "a", 10, 1), node(2, "b", 10, 1), node(3, "c", 10, 1)];
    let summary = ledger.settle_epoch(&spec).unwrap().summary().clone();
    assert_eq!((summary.total_rewards, summary.reward_remainder), (99, 1));
    assert_eq!(ledger.balance(&Account::Treasury).unwrap(), 1);
    assert_eq!(ledger.balance(&Account::Funding).unwrap(), -100);

    // Earnings: revenue, reward, power cost (1 kW × 1 h × $0.10/kWh) and net.
    let mut ledger =
        Ledger::new(MemoryStore::new(), LedgerConfig { reward_pool_per_hour: 1_000_000, ..LedgerConfig::default() })
            .unwrap();
    let mut spec = EpochSpec::new(0, 3_600_000);
    spec.availability = vec![node(1, "wallet-a", 3_600_000, 8), node(2, "wallet-b", 3_600_000, 2)];
    ledger.add_credits("alice", 100_000_000).unwrap();
    ledger.accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000)]).unwrap();
    ledger.settle_epoch(&spec).unwrap();
    let earnings = ledger.earnings("wallet-a").unwrap();
    assert_eq!(earnings.len(), 1);
    let e = &earnings[0];
    assert_eq!((e.revenue, e.reward, e.power_cost, e.net), (2_000_000, 800_000, 100_000, 2_700_000));
    assert!(ledger.earnings("nobody").unwrap().is_empty());
}

#[test]
fn redb_ledger_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    {
        let mut ledger = Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap();
        ledger.add_credits("alice", 5_000_000).unwrap();
        ledger
            .accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000), gpu_hour(2, "alice", "wallet-a", 9_000_000)])
            .unwrap();
        ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap();
    }
    let mut ledger = Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap();
    assert_eq!(ledger.balance(&Account::payer("alice")).unwrap(), 5_000_000 - 2_050_000);
    assert_eq!(ledger.pending_count().unwrap(), 1);
    assert_eq!(ledger.epochs().unwrap().len(), 1);
    assert_eq!(ledger.entries(0, 100).unwrap().len(), 3);
    assert!(matches!(ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap(), SettleOutcome::AlreadySettled(_)));
    assert_eq!(ledger.accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000)]).unwrap(), 0);
    ledger.settle_epoch(&EpochSpec::new(1, 9_000_000)).unwrap();
    assert_eq!(ledger.balance(&Account::payer("alice")).unwrap(), 5_000_000 - 2 * 2_050_000);
    assert_eq!(sum_of_balances(&ledger), 0);
    let sequences: Vec<u64> = ledger.entries(0, 100).unwrap().iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, [0, 1, 2, 3, 4]);
}

#[test]
fn ledger_handle_is_a_meter_sink() {
    use crate::meter::{JsonLinesExporter, MeterFanout, MeterSink};
    use std::sync::Arc;
    let handle = LedgerHandle::new(memory_ledger());
    let exporter = Arc::new(JsonLinesExporter::new(Vec::new()));
    let fanout = MeterFanout::new().with(Arc::new(handle.clone())).with(exporter.clone());
    fanout.record(&gpu_hour(1, "alice", "wallet-a", 3_600_000)).unwrap();
    fanout.record_batch(&[gpu_hour(2, "bob", "wallet-a", 3_600_000)]).unwrap();
    assert_eq!(handle.lock().pending_count().unwrap(), 2);
    let invalid = record(3, "", "wallet-a", 1, 0, 0, 1);
    assert!(handle.record(&invalid).is_err());
}

#[test]
fn invalid_config_is_refused() {
    let err = Ledger::new(MemoryStore::new(), LedgerConfig { fee_bps: 10_001, ..LedgerConfig::default() }).unwrap_err();
    assert_eq!(err.to_string(), "fee of 10001 basis points is out of range (at most 10000)");
}

#[test]
fn memory_store_reuses_slots_after_a_partial_settlement() {
    let mut ledger = memory_ledger();
    ledger
        .accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000), gpu_hour(2, "bob", "wallet-b", 9_000_000)])
        .unwrap();
    ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap();
    assert_eq!(ledger.pending_count().unwrap(), 1);
    ledger
        .accept_records(&[gpu_hour(3, "carol", "wallet-a", 9_000_000), gpu_hour(4, "carol", "wallet-c", 20_000_000)])
        .unwrap();
    let mut pending: Vec<u128> = ledger.pending_records(10).unwrap().iter().map(|r| r.record_id.0).collect();
    pending.sort();
    assert_eq!(pending, [2, 3, 4]);
    let outcome = ledger.settle_epoch(&EpochSpec::new(1, 9_000_000)).unwrap();
    assert_eq!(outcome.summary().records, 2);
    assert_eq!(ledger.settled_in(RecordId(3)).unwrap(), Some(1));
    assert_eq!(ledger.settled_in(RecordId(4)).unwrap(), None);
    assert_eq!(ledger.pending_records(10).unwrap()[0].record_id, RecordId(4));
}

#[test]
fn commit_of_a_record_not_pending_changes_nothing() {
    for mut store in [Box::new(MemoryStore::new()) as Box<dyn LedgerStore>, {
        let dir = tempfile::tempdir().unwrap();
        Box::new(RedbStore::open(dir.path().join("l.redb")).unwrap())
    }] {
        store.insert_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000)]).unwrap();
        let batch = CommitBatch {
            entries: vec![LedgerEntry::new(
                Some(0),
                EntryKind::Usage,
                Account::payer("alice"),
                Account::provider("wallet-a"),
                5,
            )],
            settle_records: vec![RecordId(1), RecordId(99)],
            close_epoch: Some(EpochSpec::new(0, 1).pipe_summary()),
            once_key: Some("payout:x".into()),
            interrupt_after: None,
        };
        let err = store.commit(batch).unwrap_err();
        assert!(err.to_string().contains("usage record 00000000000000000000000000000063 is not pending"), "{err}");
        assert_eq!(store.pending_count().unwrap(), 1);
        assert!(store.balances().unwrap().is_empty());
        assert!(store.entries(0, 10).unwrap().is_empty());
        assert!(!store.is_applied("payout:x").unwrap(), "a failed commit spends no once-only key");
        assert!(store.epochs().unwrap().is_empty());
    }
}

trait PipeSummary {
    fn pipe_summary(&self) -> EpochSummary;
}

impl PipeSummary for EpochSpec {
    fn pipe_summary(&self) -> EpochSummary {
        plan_epoch(self, &LedgerConfig::default(), [], &mut |_| Ok(0), &Receivables::new()).unwrap().summary
    }
}

fn payouts_are_recorded_once_on<S: LedgerStore>(mut ledger: Ledger<S>, reopen: impl FnOnce(Ledger<S>) -> Ledger<S>) {
    ledger.add_credits("alice", 5_000_000).unwrap();
    ledger.accept_records(&[gpu_hour(1, "alice", "wallet-a", 3_600_000)]).unwrap();
    ledger.settle_epoch(&EpochSpec::new(0, 3_600_000)).unwrap();
    let provider = Account::provider("wallet-a");
    assert_eq!(ledger.balance(&provider).unwrap(), 2_000_000);

    let paid = [("wallet-a".to_string(), 1_500_000)];
    assert!(ledger.record_payout(0, "solana:0:1", &paid).unwrap());
    assert!(!ledger.record_payout(0, "solana:0:1", &paid).unwrap(), "the same reference posts nothing");
    let mut ledger = reopen(ledger);
    assert!(!ledger.record_payout(0, "solana:0:1", &paid).unwrap(), "still nothing after a reopen");
    assert_eq!(ledger.balance(&provider).unwrap(), 500_000);
    assert_eq!(sum_of_balances(&ledger), 0);
    let last = ledger.entries(0, 100).unwrap().pop().unwrap();
    assert_eq!(
        (last.kind, last.debit, last.credit, last.amount),
        (EntryKind::Payout, provider, Account::Funding, 1_500_000)
    );

    // More than the provider has earned is refused, and posts nothing.
    let err = ledger.record_payout(0, "solana:0:2", &[("wallet-a".to_string(), 500_001)]).unwrap_err().to_string();
    assert!(err.contains("provider:wallet-a") && err.contains("500001"), "{err}");
    assert!(ledger.record_payout(0, "solana:0:2", &[("wallet-a".to_string(), 500_000)]).unwrap());
    assert_eq!(ledger.balance(&Account::provider("wallet-a")).unwrap(), 0);
}

#[test]
fn payouts_are_recorded_once_in_memory() {
    payouts_are_recorded_once_on(memory_ledger(), |ledger| ledger);
}

#[test]
fn payouts_are_recorded_once_in_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let ledger = Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap();
    payouts_are_recorded_once_on(ledger, |ledger| {
        drop(ledger);
        Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap()
    });
}

#[test]
fn a_deposit_is_credited_once_per_reference_also_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    {
        let mut ledger = Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap();
        assert!(ledger.deposit_once("alice", 5_000_000, "5Sig1").unwrap());
        assert!(!ledger.deposit_once("alice", 5_000_000, "5Sig1").unwrap(), "the same transfer again");
        assert!(ledger.deposit_once("bob", 2_000_000, "5Sig2").unwrap());
        assert!(ledger.deposit_once("alice", 0, "5Sig3").is_err());
        assert!(ledger.deposit_once("alice", 1, "").is_err());
    }
    let mut ledger = Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap();
    assert!(!ledger.deposit_once("alice", 5_000_000, "5Sig1").unwrap(), "nor after a restart");
    assert_eq!(ledger.balance(&Account::payer("alice")).unwrap(), 5_000_000);
    assert_eq!(ledger.balance(&Account::payer("bob")).unwrap(), 2_000_000);
    assert_eq!(sum_of_balances(&ledger), 0);
}

#[test]
fn a_ledger_of_an_older_layout_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    {
        let mut ledger = Ledger::new(RedbStore::open(&path).unwrap(), LedgerConfig::default()).unwrap();
        ledger.settle_epoch(&EpochSpec::new(0, 1_000)).unwrap();
    }
    // As an older ionet left it: epochs, and no layout mark.
    let database = redb::Database::create(&path).unwrap();
    let transaction = database.begin_write().unwrap();
    transaction.delete_table(redb::TableDefinition::<&str, u64>::new("meta")).unwrap();
    transaction.commit().unwrap();
    drop(database);
    let err = RedbStore::open(&path).unwrap_err().to_string();
    assert!(err.contains("layout 1") && err.contains("reads layout 2"), "{err}");
}
