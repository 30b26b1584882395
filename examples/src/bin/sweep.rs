//! A hyperparameter sweep on the cheapest GPUs: ridge regression trained by minibatch SGD
//! for each pair of learning rate and L2 penalty in a grid, one GPU task a trial. The
//! sweep first reserves its GPUs as a placement group, the cheapest the cluster has free
//! (`cheapest_first`), and runs its trials in that group's bundles, so it never holds
//! more than those GPUs; `--gpus N` sets how many (default 4). The dataset is put in the
//! object store once and read by every trial; progress is printed as trials finish, with
//! where each ran and at what price. The driver then trains every trial here too and
//! checks the cluster's answers are the same, best trial included.
//!
//! (The trials compute on the CPU: the point is where they are placed and what they cost.
//! A real one would hand its batches to the GPU it was given, `ionet::get_gpu_ids()`.)
//!
//!   cargo run -p ionet-examples --bin sweep                  # embedded cluster, 4 declared GPUs: 18 trials
//!   cargo run -p ionet-examples --bin sweep -- --gpus 2      # the same on 2 of them
//!   cargo run -p ionet-examples --bin sweep -- --large       # 48 trials on 10 times the data
//!   IONET_API_KEY=<key> cargo run -p ionet-examples --bin sweep -- --address HEAD:6380

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ionet::{PlacementGroupOptions, PlacementStrategy, TaskOptions};
use ionet_examples::{Args, Rng};
use serde::{Deserialize, Serialize};

/// Rows of features and targets: `y = x · w + noise`, `w` known.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Dataset {
    features: usize,
    /// Row-major, `rows × features`.
    x: Vec<f64>,
    y: Vec<f64>,
}

/// The noise's standard deviation: the best a model can do is a mean squared error of
/// its square.
const NOISE: f64 = 0.1;

impl Dataset {
    fn generate(rows: usize, features: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed);
        let weights: Vec<f64> = (0..features).map(|j| ((j + 1) as f64).sin()).collect();
        let mut x = Vec::with_capacity(rows * features);
        let mut y = Vec::with_capacity(rows);
        for _ in 0..rows {
            let row: Vec<f64> = (0..features).map(|_| rng.normal()).collect();
            y.push(row.iter().zip(&weights).map(|(a, b)| a * b).sum::<f64>() + NOISE * rng.normal());
            x.extend(row);
        }
        Dataset { features, x, y }
    }

    fn rows(&self) -> usize {
        self.y.len()
    }

    fn row(&self, at: usize) -> &[f64] {
        &self.x[at * self.features..(at + 1) * self.features]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Trial {
    learning_rate: f64,
    l2: f64,
}

/// A trial's result, and where it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Outcome {
    trial: Trial,
    /// Mean squared error on the held-out fifth (infinite: training diverged).
    validation_mse: f64,
    node_id: String,
    gpu_ids: Vec<u32>,
    seconds: f64,
}

/// Trains `trial` on the first four fifths of `data` for `epochs` (minibatches of 32, in
/// order) and returns the mean squared error on the last fifth.
fn train(data: &Dataset, trial: Trial, epochs: u32) -> f64 {
    let split = data.rows() * 4 / 5;
    let mut weights = vec![0.0; data.features];
    let mut gradient = vec![0.0; data.features];
    for _ in 0..epochs {
        for batch in (0..split).collect::<Vec<_>>().chunks(32) {
            gradient.iter_mut().for_each(|g| *g = 0.0);
            for &at in batch {
                let row = data.row(at);
                let error = row.iter().zip(&weights).map(|(a, b)| a * b).sum::<f64>() - data.y[at];
                gradient.iter_mut().zip(row).for_each(|(g, a)| *g += error * a);
            }
            let scale = 2.0 / batch.len() as f64;
            for (w, g) in weights.iter_mut().zip(&gradient) {
                *w -= trial.learning_rate * (scale * g + 2.0 * trial.l2 * *w);
            }
        }
        if !weights.iter().all(|w| w.is_finite()) {
            return f64::INFINITY;
        }
    }
    let squared: f64 = (split..data.rows())
        .map(|at| {
            let error = data.row(at).iter().zip(&weights).map(|(a, b)| a * b).sum::<f64>() - data.y[at];
            error * error
        })
        .sum();
    let mse = squared / (data.rows() - split) as f64;
    if mse.is_finite() {
        mse
    } else {
        f64::INFINITY
    }
}

/// One trial, as a GPU task.
#[ionet::remote]
fn run_trial(data: Dataset, trial: Trial, epochs: u32) -> Outcome {
    let started = Instant::now();
    let validation_mse = train(&data, trial, epochs);
    let context = ionet::get_runtime_context().expect("a task runs in a cluster");
    Outcome {
        trial,
        validation_mse,
        node_id: context.node_id.hex(),
        gpu_ids: ionet::get_gpu_ids(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse("sweep: a hyperparameter sweep, one GPU task a trial, on the cheapest GPUs [--gpus N]");
    // Alone on a laptop: 4 GPUs declared (none needed: the trials compute on the CPU).
    let embedded = ionet::InitConfig::default().num_cpus(4.0).num_gpus(4).gpu_type("A100-80GB");
    ionet::init(args.init_config(embedded))?;
    let (rows, epochs) = args.size((2_000, 20), (20_000, 30));
    let learning_rates =
        args.size(vec![0.3, 0.1, 0.03, 0.01, 0.003, 0.001], vec![0.3, 0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005]);
    let penalties = args.size(vec![0.0, 0.001, 0.01], vec![0.0, 0.0001, 0.0003, 0.001, 0.003, 0.01]);
    let trials: Vec<Trial> = learning_rates
        .iter()
        .flat_map(|&learning_rate| penalties.iter().map(move |&l2| Trial { learning_rate, l2 }))
        .collect();
    println!("job {}", ionet::get_runtime_context()?.job_id.hex());

    // Where trials may run: each node's GPU model, price and region.
    let nodes: HashMap<String, ionet::Node> =
        ionet::nodes()?.into_iter().map(|node| (node.node_id.hex(), node)).collect();
    let price_of = |node_id: &str| match nodes.get(node_id) {
        Some(node) if node.price_per_gpu_hour > 0 => ionet::resources::format_usd(node.price_per_gpu_hour),
        Some(_) => "0 (unpriced)".to_string(),
        None => "?".to_string(),
    };

    // The sweep's GPUs: the cheapest the cluster has free, reserved together (on as few
    // nodes as hold them), each bundle a GPU and a CPU.
    let bundle = std::collections::BTreeMap::from([("GPU".to_string(), 1.0), ("CPU".to_string(), 1.0)]);
    let cheapest = PlacementGroupOptions { name: "sweep".into(), cheapest_first: true, ..Default::default() };
    let group = ionet::placement_group_with(vec![bundle; args.gpus], PlacementStrategy::Pack, cheapest)?;
    if !group.wait(Duration::from_secs(120))? {
        return Err(format!("{} GPUs could not be reserved within 2 minutes", args.gpus).into());
    }
    let reserved: Vec<String> = group.bundle_nodes()?.iter().map(|node| node.hex()).collect();
    let hourly: u64 = reserved.iter().filter_map(|node| nodes.get(node)).map(|node| node.price_per_gpu_hour).sum();
    println!(
        "reserved {} GPUs, the cheapest free, for ${} an hour:",
        reserved.len(),
        ionet::resources::format_usd(hourly)
    );
    for node in reserved.iter().collect::<std::collections::BTreeSet<_>>() {
        let model = nodes.get(node).map(|node| node.accelerator_type.clone()).unwrap_or_default();
        let count = reserved.iter().filter(|held| *held == node).count();
        println!("  {count} x {model} on node {} at ${}/GPU-h", &node[..8], price_of(node));
    }
    let data = Dataset::generate(rows, 16, 7);
    let data_ref = ionet::put(&data)?;
    println!("{} trials of ridge regression ({rows} rows, 16 features, {epochs} epochs), one GPU each", trials.len());
    let started = Instant::now();
    let in_the_group = TaskOptions::default().num_gpus(1.0).placement_group_any_bundle(&group);
    let mut pending: Vec<_> =
        trials.iter().map(|&trial| run_trial::options(in_the_group.clone()).remote(&data_ref, trial, epochs)).collect();
    let mut outcomes = Vec::with_capacity(trials.len());
    while !pending.is_empty() {
        let (done, rest) = ionet::wait(&pending, 1, Some(Duration::from_secs(600)))?;
        if done.is_empty() {
            return Err("no trial finished within 10 minutes".into());
        }
        pending = rest;
        for finished in done {
            let outcome = ionet::get(&finished)?;
            let (model, region) = match nodes.get(&outcome.node_id) {
                Some(node) => {
                    (node.accelerator_type.clone(), node.labels.get("region").cloned().unwrap_or_else(|| "-".into()))
                }
                None => ("?".into(), "-".into()),
            };
            let price = price_of(&outcome.node_id);
            println!(
                "  trial {:>2}/{}  lr {:<6} l2 {:<6} validation MSE {:>10.6}  {:.2} s on node {} ({model} GPU {:?}, ${price}/GPU-h, region {region})",
                outcomes.len() + 1,
                trials.len(),
                outcome.trial.learning_rate,
                outcome.trial.l2,
                outcome.validation_mse,
                outcome.seconds,
                &outcome.node_id[..8],
                outcome.gpu_ids,
            );
            outcomes.push(outcome);
        }
    }
    let best = outcomes.iter().min_by(|a, b| a.validation_mse.total_cmp(&b.validation_mse)).ok_or("no trials")?.clone();
    println!(
        "best: lr {} l2 {}: validation MSE {:.6} (the noise alone gives {:.6}); {} trials in {:.1} s",
        best.trial.learning_rate,
        best.trial.l2,
        best.validation_mse,
        NOISE * NOISE,
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    ionet::remove_placement_group(&group)?;
    ionet::shutdown();

    // The same trials here: the cluster's answers must be these, bit for bit.
    for outcome in &outcomes {
        let here = train(&data, outcome.trial, epochs);
        if here.to_bits() != outcome.validation_mse.to_bits() {
            return Err(
                format!("trial {:?}: the cluster said {}, here {here}", outcome.trial, outcome.validation_mse).into()
            );
        }
    }
    if !(best.validation_mse < 2.0 * NOISE * NOISE) {
        return Err(format!(
            "the best trial's error {} is far above the noise's {}",
            best.validation_mse,
            NOISE * NOISE
        )
        .into());
    }
    println!("checked: every trial's answer matches training it here");
    Ok(())
}
