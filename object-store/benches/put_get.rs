//! Store put throughput against a plain memcpy of the same size, and get (map) latency.
//!
//! `cargo bench -p ionet-object-store --bench put_get -- --measurement-time 3 --warm-up-time 1`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use ionet_common::ObjectId;
use ionet_object_store::{LocalObjectStore, StoreClient, StoreConfig};

const MIB: usize = 1024 * 1024;
const PUT_SIZE: usize = 100 * MIB;
const GIB: u64 = 1 << 30;

fn store() -> LocalObjectStore {
    LocalObjectStore::new(StoreConfig::with_capacity(4 * GIB)).unwrap()
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|n| (n * 31 % 251) as u8).collect()
}

/// One line up front: put of 10 × 100 MiB (1000 MiB) vs memcpy of the same bytes into an
/// already-touched buffer and into a fresh one, in GB/s, and the ratio.
fn print_put_vs_memcpy() {
    let store = store();
    let data = payload(PUT_SIZE);
    let rounds = 10;
    let gb = (rounds * PUT_SIZE) as f64 / 1e9;

    let mut warm = vec![0u8; PUT_SIZE];
    warm.copy_from_slice(&data);
    let start = Instant::now();
    for _ in 0..rounds {
        warm.copy_from_slice(black_box(&data));
        black_box(&warm);
    }
    let memcpy_warm = start.elapsed();

    let start = Instant::now();
    for _ in 0..rounds {
        // Large zeroed allocations come straight from mmap: untouched pages, faulted in by
        // the copy, as tmpfs pages are by a put.
        let mut fresh = vec![0u8; PUT_SIZE];
        fresh.copy_from_slice(black_box(&data));
        black_box(&fresh);
    }
    let memcpy_fresh = start.elapsed();

    let ids: Vec<ObjectId> = (0..rounds).map(|_| ObjectId::random()).collect();
    let start = Instant::now();
    for id in &ids {
        store.put(*id, &data).unwrap();
    }
    let put = start.elapsed();
    for id in &ids {
        store.delete(id).unwrap();
    }

    let rate = |elapsed: Duration| gb / elapsed.as_secs_f64();
    println!(
        "put 10 x 100 MiB: store put {:.2} GB/s, memcpy (warm dest) {:.2} GB/s, memcpy (fresh dest) \
         {:.2} GB/s; put / warm memcpy = {:.2}, put / fresh memcpy = {:.2}",
        rate(put),
        rate(memcpy_warm),
        rate(memcpy_fresh),
        memcpy_warm.as_secs_f64() / put.as_secs_f64(),
        memcpy_fresh.as_secs_f64() / put.as_secs_f64(),
    );
}

fn put_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("put_100MiB");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(PUT_SIZE as u64));
    let data = payload(PUT_SIZE);
    let store = store();
    group.bench_function("store_put", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let id = ObjectId::random();
                let start = Instant::now();
                store.put(id, &data).unwrap();
                total += start.elapsed();
                store.delete(&id).unwrap();
            }
            total
        })
    });
    group.bench_function("store_create_write_seal", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let id = ObjectId::random();
                let start = Instant::now();
                let mut created = store.create(id, PUT_SIZE as u64).unwrap();
                created.as_mut_slice().copy_from_slice(&data);
                drop(created);
                store.seal(&id).unwrap();
                total += start.elapsed();
                store.delete(&id).unwrap();
            }
            total
        })
    });
    let mut dest = vec![0u8; PUT_SIZE];
    group.bench_function("memcpy_warm", |b| {
        b.iter(|| {
            dest.copy_from_slice(black_box(&data));
            black_box(&dest);
        })
    });
    group.finish();
}

fn get_latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("get");
    let store = store();
    let client = StoreClient::open(store.dir()).unwrap();
    for (label, size) in [("1KiB", 1024), ("100MiB", PUT_SIZE)] {
        let id = ObjectId::random();
        store.put(id, &payload(size)).unwrap();
        // A view kept alive elsewhere: get reuses its mapping.
        let live = store.get(&id).unwrap().unwrap();
        group.bench_with_input(BenchmarkId::new("store_get_mapped", label), &id, |b, id| {
            b.iter(|| black_box(store.get(id).unwrap().unwrap()))
        });
        drop(live);
        // No live view: each get maps the file anew.
        group.bench_with_input(BenchmarkId::new("store_get_unmapped", label), &id, |b, id| {
            b.iter(|| black_box(store.get(id).unwrap().unwrap()))
        });
        // Another process's path: open + mmap + close, no call to the store.
        group.bench_with_input(BenchmarkId::new("client_map", label), &id, |b, id| {
            b.iter(|| black_box(client.map(id).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, put_throughput, get_latency);

fn main() {
    print_put_vs_memcpy();
    benches();
    criterion::Criterion::default().configure_from_args().final_summary();
}
