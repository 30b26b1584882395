//! Latency of one scheduling decision at 100, 1,000 and 10,000 nodes with 10 GPU models,
//! and of keeping the view's indexes as a decision's resources are taken and given back.

mod common;

use std::hint::black_box;

use common::{cluster, Lcg, MODELS};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ionet_common::resources::{CPU, GPU};
use ionet_common::{Quantity, ResourceSet};
use ionet_scheduler::{Demand, LabelSelector, SchedulingStrategy};

/// A mix: GPU counts 0.5 to 4, a model named three times in four, a region selector one
/// time in five, and CPU-only demands.
fn demands() -> Vec<Demand> {
    let mut rng = Lcg(7);
    (0..256)
        .map(|_| {
            let gpus = ["0", "0.5", "1", "1", "2", "4"][rng.next(6) as usize];
            let resources =
                ResourceSet::new().with(CPU, Quantity::whole(1 + rng.next(4) as i64)).with(GPU, gpus.parse().unwrap());
            let mut demand = Demand::new(resources);
            if gpus != "0" && rng.next(4) > 0 {
                demand = demand.with_accelerator_type(MODELS[rng.next(10) as usize]);
            }
            if rng.next(5) == 0 {
                demand = demand.with_label_selector(LabelSelector::parse("region in (eu, us)").unwrap());
            }
            demand
        })
        .collect()
}

fn bench_decisions(c: &mut Criterion) {
    let demands = demands();
    let mut group = c.benchmark_group("decision");
    for nodes in [100u32, 1_000, 10_000] {
        let view = cluster(nodes, None);
        let local = common::id(nodes / 2);
        for (name, strategy) in [
            ("default", SchedulingStrategy::Default),
            ("spread", SchedulingStrategy::Spread),
            ("cost", SchedulingStrategy::Cost),
            ("cost_per_tflop", SchedulingStrategy::CostPerTflop),
        ] {
            group.bench_with_input(BenchmarkId::new(name, nodes), &nodes, |b, _| {
                let mut next = 0usize;
                b.iter(|| {
                    next = (next + 1) % demands.len();
                    black_box(view.schedule(&demands[next], &strategy, Some(&local)))
                })
            });
        }
    }
    group.finish();
}

/// Taking a node's resources and giving them back: every index the node is keyed in
/// (utilisation, price, price per TFLOP-hour, per bucket and model) moves twice.
fn bench_allocate_release(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate_release");
    let nodes = 10_000u32;
    let mut view = cluster(nodes, Some(8));
    let one = ResourceSet::new().with(CPU, Quantity::whole(1)).with(GPU, Quantity::whole(1));
    group.bench_function(BenchmarkId::from_parameter(nodes), |b| {
        let mut next = 0u32;
        b.iter(|| {
            next = (next + 7919) % nodes;
            let node = common::id(next);
            if view.allocate(&node, &one).is_ok() {
                view.release(&node, &one).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench_decisions, bench_allocate_release);
criterion_main!(benches);
