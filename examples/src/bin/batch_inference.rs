//! Batch inference over Arrow record batches through a pool of GPU actors: the driver
//! puts the input as Arrow record batches in the object store; each `Model` actor (one
//! GPU each) loads its weights once and scores the batches it is handed, reading each
//! batch's columns straight from shared memory, without copying; `ActorPool` keeps every
//! actor busy. The driver checks every prediction against the same model run here.
//!
//!   cargo run -p ionet-examples --bin batch_inference              # 40 batches of 2,000 rows, 2 actors
//!   cargo run -p ionet-examples --bin batch_inference -- --large    # 200 batches of 20,000 rows, 4 actors
//!   IONET_API_KEY=<key> cargo run -p ionet-examples --bin batch_inference -- --address HEAD:6380

use std::sync::Arc;

use ionet::arrow_array::{Array, ArrayRef, Float64Array, RecordBatch};
use ionet::{ActorOptions, ObjectRef};
use ionet_examples::{Args, Rng};

const FEATURES: usize = 8;
const HIDDEN: usize = 32;

/// A small two-layer network (tanh, then a sigmoid score), its weights drawn from `seed`
/// as a stand-in for loading a checkpoint.
struct Network {
    hidden: Vec<[f64; FEATURES]>,
    bias: Vec<f64>,
    output: Vec<f64>,
}

impl Network {
    fn load(seed: u64) -> Network {
        let mut rng = Rng::new(seed);
        let scale = 1.0 / (FEATURES as f64).sqrt();
        let hidden = (0..HIDDEN).map(|_| std::array::from_fn(|_| rng.normal() * scale)).collect();
        let bias = (0..HIDDEN).map(|_| 0.1 * rng.normal()).collect();
        let output = (0..HIDDEN).map(|_| rng.normal() / (HIDDEN as f64).sqrt()).collect();
        Network { hidden, bias, output }
    }

    fn score(&self, row: &[f64; FEATURES]) -> f64 {
        let z: f64 = self
            .hidden
            .iter()
            .zip(&self.bias)
            .zip(&self.output)
            .map(|((weights, bias), out)| {
                (weights.iter().zip(row).map(|(w, x)| w * x).sum::<f64>() + bias).tanh() * out
            })
            .sum();
        1.0 / (1.0 + (-z).exp())
    }

    /// Scores every row of `batch` (columns `x0`..`x7`, float64).
    fn score_batch(&self, batch: &RecordBatch) -> Vec<f64> {
        let columns: Vec<&Float64Array> = (0..FEATURES)
            .map(|j| {
                let column = batch.column_by_name(&format!("x{j}")).expect("a feature column");
                column.as_any().downcast_ref::<Float64Array>().expect("float64 features")
            })
            .collect();
        (0..batch.num_rows()).map(|at| self.score(&std::array::from_fn(|j| columns[j].value(at)))).collect()
    }
}

/// The model, served by one actor on one GPU.
pub struct Model {
    network: Network,
}

#[ionet::actor]
impl Model {
    pub fn new(seed: u64) -> Self {
        Model { network: Network::load(seed) }
    }

    /// The scores of every row of the batch `batch` refers to (read in place).
    pub fn predict(&self, batch: ObjectRef<RecordBatch>) -> Vec<f64> {
        let batch = ionet::get_record_batch(&batch).expect("the input batch");
        self.network.score_batch(&batch)
    }
}

/// Input batch `index`: `rows` rows of 8 float64 features.
fn input(index: u64, rows: usize) -> RecordBatch {
    let mut rng = Rng::new(1_000 + index);
    let columns: Vec<(String, ArrayRef)> = (0..FEATURES)
        .map(|j| {
            let values: Float64Array = (0..rows).map(|_| rng.normal()).collect();
            (format!("x{j}"), Arc::new(values) as ArrayRef)
        })
        .collect();
    RecordBatch::try_from_iter(columns).expect("columns of one length")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse("batch_inference: Arrow record batches scored by a pool of GPU actors");
    // Alone on a laptop: 4 GPUs declared, for the large size's 4 actors (they compute on
    // the CPU).
    let embedded = ionet::InitConfig::default().num_cpus(4.0).num_gpus(4).gpu_type("L40S");
    ionet::init(args.init_config(embedded))?;
    let (batches, rows, actors) = args.size((40u64, 2_000usize, 2usize), (200, 20_000, 4));
    const SEED: u64 = 42;
    let started = std::time::Instant::now();
    let inputs: Vec<ObjectRef<RecordBatch>> =
        (0..batches).map(|index| ionet::put_record_batch(&input(index, rows))).collect::<Result<_, _>>()?;
    let models: Vec<ModelHandle> = (0..actors)
        .map(|_| Model::options(ActorOptions::new().num_gpus(1.0)).remote(SEED))
        .collect::<Result<_, _>>()?;
    let mut pool = ionet::ActorPool::new(models);
    let scores = pool.map(|model: &ModelHandle, batch: ObjectRef<RecordBatch>| model.predict(batch), inputs);
    let scores: Vec<Vec<f64>> = scores.into_iter().collect::<Result<_, _>>()?;
    let total: usize = scores.iter().map(Vec::len).sum();
    let positive = scores.iter().flatten().filter(|score| **score > 0.5).count();
    println!(
        "{total} rows in {batches} Arrow batches scored by {actors} GPU actors in {:.1} s: {:.1}% scored positive",
        started.elapsed().as_secs_f64(),
        100.0 * positive as f64 / total as f64
    );
    ionet::shutdown();

    // The same model here, on the same batches: the same scores, in order.
    let network = Network::load(SEED);
    for (index, got) in scores.iter().enumerate() {
        let expected = network.score_batch(&input(index as u64, rows));
        // Another machine's libm may round exp and tanh differently in the last bits.
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
        if got.len() != expected.len() || got.iter().zip(&expected).any(|(a, b)| !close(*a, *b)) {
            return Err(format!("batch {index}: the actors' scores differ from the model's here").into());
        }
    }
    println!("checked: every score matches the model run here");
    Ok(())
}
