//! Settling one epoch of usage records: the in-memory store at 1,000,000 records and
//! the redb store at 100,000 (its commit writes every record's move to disk); and
//! 1,000,000 two-party leases (four words each: node and holder start, holder return,
//! node end) made into records and settled.
//!
//! cargo bench -p ionet-settlement --bench ledger_settlement

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use ionet_common::resources::{CPU, GPU};
use ionet_common::{JobId, NodeId, Quantity, ResourceSet};
use ionet_settlement::two_party::{stamp, Sides};
use ionet_settlement::{EpochSpec, Ledger, LedgerConfig, LedgerStore, MemoryStore, RecordId, RedbStore, UsageRecord};

const PAYERS: usize = 1_000;
const PROVIDERS: usize = 200;
const EPOCH_END_MS: u64 = 3_600_000;

fn records(count: usize) -> Vec<UsageRecord> {
    let payers: Vec<String> = (0..PAYERS).map(|i| format!("payer-{i}")).collect();
    let wallets: Vec<String> = (0..PROVIDERS).map(|i| format!("wallet-{i:044}")).collect();
    (0..count)
        .map(|i| {
            let mix = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            UsageRecord {
                record_id: RecordId(i as u128 + 1),
                job_id: JobId::from_sequence((mix % 5_000) as u32),
                payer_account: payers[(mix % PAYERS as u64) as usize].clone(),
                node_id: NodeId::from_array([(mix % 251) as u8; 28]),
                provider_wallet: wallets[((mix >> 20) % PROVIDERS as u64) as usize].clone(),
                resources: ResourceSet::new()
                    .with(GPU, Quantity::from_units(2_500 * (1 + (mix >> 40) as i64 % 32)))
                    .with(CPU, Quantity::whole(1 + (mix >> 50) as i64 % 16)),
                start_ms: (mix >> 8) % EPOCH_END_MS / 2,
                end_ms: EPOCH_END_MS / 2 + (mix >> 16) % (EPOCH_END_MS / 2),
                price_per_gpu_hour: 1_000_000 + (mix >> 30) % 2_000_000,
                price_per_cpu_hour: 10_000,
            }
        })
        .collect()
}

fn loaded<S: LedgerStore>(store: S, records: &[UsageRecord]) -> Ledger<S> {
    let mut ledger = Ledger::new(store, LedgerConfig::default()).unwrap();
    for payer in 0..PAYERS {
        ledger.add_credits(&format!("payer-{payer}"), 1_000_000_000_000).unwrap();
    }
    for chunk in records.chunks(50_000) {
        ledger.accept_records(chunk).unwrap();
    }
    ledger
}

fn settle_memory(c: &mut Criterion) {
    const COUNT: usize = 1_000_000;
    let template = loaded(MemoryStore::new(), &records(COUNT)).into_store();
    let mut group = c.benchmark_group("settle_epoch");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(COUNT as u64));
    group.bench_function("memory_1m_records", |b| {
        b.iter_batched(
            || Ledger::new(template.clone(), LedgerConfig::default()).unwrap(),
            |mut ledger| {
                let outcome = ledger.settle_epoch(&EpochSpec::new(0, EPOCH_END_MS)).unwrap();
                assert_eq!(outcome.summary().records, COUNT as u64);
                ledger
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn settle_redb(c: &mut Criterion) {
    const COUNT: usize = 100_000;
    let records = records(COUNT);
    let mut group = c.benchmark_group("settle_epoch");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(COUNT as u64));
    group.bench_function("redb_100k_records", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let dir = tempfile::tempdir().unwrap();
                let mut ledger = loaded(RedbStore::open(dir.path().join("l.redb")).unwrap(), &records);
                let start = Instant::now();
                let outcome = ledger.settle_epoch(&EpochSpec::new(0, EPOCH_END_MS)).unwrap();
                total += start.elapsed();
                assert_eq!(outcome.summary().records, COUNT as u64);
            }
            total
        })
    });
    group.finish();
}

/// Each lease's four words become its record (the later start, the earliest end), then
/// the ledger accepts the records and settles the epoch: records per second end to end.
fn settle_two_party(c: &mut Criterion) {
    const COUNT: usize = 1_000_000;
    let template = records(COUNT);
    let mut group = c.benchmark_group("settle_epoch");
    group.sample_size(10).sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(COUNT as u64));
    group.bench_function("two_party_1m_leases", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let mut ledger = loaded(MemoryStore::new(), &[]);
                let start = Instant::now();
                let mut made = Vec::with_capacity(COUNT);
                for lease in &template {
                    let sides = Sides {
                        node_started: Some(stamp(lease.start_ms, 3)),
                        holder_started: Some(stamp(lease.start_ms + 2, 0)),
                        holder_ended: Some(stamp(lease.end_ms, 40)),
                        node_ended: Some(stamp(lease.end_ms + 30_000, 0)),
                        forced_end: None,
                    };
                    let (start_ms, end_ms, _) = sides.billed_span().expect("both sides spoke");
                    made.push(UsageRecord { start_ms, end_ms, ..lease.clone() });
                }
                for chunk in made.chunks(50_000) {
                    ledger.accept_records(chunk).unwrap();
                }
                let outcome = ledger.settle_epoch(&EpochSpec::new(0, EPOCH_END_MS)).unwrap();
                total += start.elapsed();
                assert_eq!(outcome.summary().records, COUNT as u64);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, settle_memory, settle_redb, settle_two_party);
criterion_main!(benches);
