//! Solving placement groups of 8, 64 and 1,024 bundles on a 2,000-node, 8-GPU-per-node cluster.

mod common;

use std::hint::black_box;

use common::cluster;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ionet_common::resources::{CPU, GPU};
use ionet_common::{Quantity, ResourceSet};
use ionet_scheduler::{solve_placement_group, PlacementStrategy};

fn bench_placement_groups(c: &mut Criterion) {
    let view = cluster(2_000, Some(8));
    let bundle = ResourceSet::new().with(CPU, Quantity::whole(2)).with(GPU, Quantity::whole(1));
    let mut group = c.benchmark_group("placement_group");
    for size in [8usize, 64, 1_024] {
        let bundles = vec![bundle.clone(); size];
        for strategy in [PlacementStrategy::Pack, PlacementStrategy::Spread, PlacementStrategy::StrictSpread] {
            group.bench_with_input(BenchmarkId::new(strategy.to_string(), size), &bundles, |b, bundles| {
                b.iter(|| black_box(solve_placement_group(&view, bundles, strategy)))
            });
        }
    }
    let strict_pack = vec![bundle; 8];
    group.bench_function("STRICT_PACK/8", |b| {
        b.iter(|| black_box(solve_placement_group(&view, &strict_pack, PlacementStrategy::StrictPack)))
    });
    group.finish();
}

criterion_group!(benches, bench_placement_groups);
criterion_main!(benches);
