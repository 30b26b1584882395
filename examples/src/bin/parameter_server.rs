//! A parameter server with worker actors: logistic regression trained by synchronous data
//! parallelism. Each `DataWorker` actor holds a shard of the data and computes the
//! gradient of the loss on it for the weights it is handed; the `ParameterServer` actor
//! holds the weights and applies the workers' gradients (passed to it as object refs it
//! reads itself: they never pass through the driver). The driver checks the model
//! classifies held-out data well, and that the weights are those the same steps give when
//! run here.
//!
//!   cargo run -p ionet-examples --bin parameter_server              # 4 workers, 100 steps
//!   cargo run -p ionet-examples --bin parameter_server -- --large    # 8 workers, 400 steps, 10x data
//!   IONET_API_KEY=<key> cargo run -p ionet-examples --bin parameter_server -- --address HEAD:6380

use ionet::ObjectRef;
use ionet_examples::{Args, Rng};

const FEATURES: usize = 10;

/// Rows of features and 0/1 labels from a known linear rule, with label noise.
fn shard(rows: usize, seed: u64) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let truth: Vec<f64> = (0..FEATURES).map(|j| if j % 2 == 0 { 1.5 } else { -1.0 }).collect();
    let mut x = Vec::with_capacity(rows);
    let mut y = Vec::with_capacity(rows);
    for _ in 0..rows {
        let row: Vec<f64> = (0..FEATURES).map(|_| rng.normal()).collect();
        let margin: f64 = row.iter().zip(&truth).map(|(a, b)| a * b).sum::<f64>() + 0.3 * rng.normal();
        y.push(if margin > 0.0 { 1.0 } else { 0.0 });
        x.push(row);
    }
    (x, y)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The mean gradient of the logistic loss over `(x, y)` at `weights`.
fn gradient(x: &[Vec<f64>], y: &[f64], weights: &[f64]) -> Vec<f64> {
    let mut sum = vec![0.0; FEATURES];
    for (row, label) in x.iter().zip(y) {
        let error = sigmoid(row.iter().zip(weights).map(|(a, b)| a * b).sum()) - label;
        sum.iter_mut().zip(row).for_each(|(g, a)| *g += error * a);
    }
    sum.iter().map(|g| g / x.len() as f64).collect()
}

/// Averages `gradients` and steps `weights` against them.
fn step(weights: &mut [f64], gradients: &[Vec<f64>], learning_rate: f64) {
    for (j, w) in weights.iter_mut().enumerate() {
        let mean = gradients.iter().map(|g| g[j]).sum::<f64>() / gradients.len() as f64;
        *w -= learning_rate * mean;
    }
}

pub struct ParameterServer {
    weights: Vec<f64>,
    learning_rate: f64,
}

#[ionet::actor]
impl ParameterServer {
    pub fn new(learning_rate: f64) -> Self {
        ParameterServer { weights: vec![0.0; FEATURES], learning_rate }
    }

    /// Reads the workers' gradients from the object store, steps, returns the new weights.
    pub fn apply_gradients(&mut self, gradients: Vec<ObjectRef<Vec<f64>>>) -> Vec<f64> {
        let gradients = ionet::get_all(&gradients).expect("the workers' gradients");
        step(&mut self.weights, &gradients, self.learning_rate);
        self.weights.clone()
    }

    pub fn weights(&self) -> Vec<f64> {
        self.weights.clone()
    }
}

pub struct DataWorker {
    x: Vec<Vec<f64>>,
    y: Vec<f64>,
}

#[ionet::actor]
impl DataWorker {
    pub fn new(rows: usize, seed: u64) -> Self {
        let (x, y) = shard(rows, seed);
        DataWorker { x, y }
    }

    pub fn compute_gradient(&self, weights: Vec<f64>) -> Vec<f64> {
        gradient(&self.x, &self.y, &weights)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse("parameter_server: synchronous data-parallel training with a parameter server actor");
    ionet::init(args.init_config(ionet::InitConfig::default()))?;
    let (workers, rows, steps) = args.size((4usize, 1_000usize, 100usize), (8, 10_000, 400));
    let learning_rate = 0.5;
    let started = std::time::Instant::now();
    let server = ParameterServer::remote(learning_rate)?;
    let shards: Vec<DataWorkerHandle> =
        (0..workers).map(|index| DataWorker::remote(rows, index as u64 + 1)).collect::<Result<_, _>>()?;
    let mut weights = ionet::put(&vec![0.0; FEATURES])?;
    for at in 0..steps {
        // Every worker's gradient at the current weights, handed to the server as refs.
        let gradients: Vec<ObjectRef<Vec<f64>>> =
            shards.iter().map(|worker| worker.compute_gradient(&weights)).collect();
        weights = server.apply_gradients(gradients);
        if (at + 1) % (steps / 5) == 0 {
            let now = ionet::get(&weights)?;
            println!("step {:>4}/{steps}: weights {:.3?}…", at + 1, &now[..3]);
        }
    }
    let trained = ionet::get(&server.weights())?;
    println!("{workers} workers × {rows} rows, {steps} steps in {:.1} s", started.elapsed().as_secs_f64());
    ionet::shutdown();

    // The same steps here, gradients averaged in the same order: the same weights.
    let data: Vec<_> = (0..workers).map(|index| shard(rows, index as u64 + 1)).collect();
    let mut here = vec![0.0; FEATURES];
    for _ in 0..steps {
        let gradients: Vec<Vec<f64>> = data.iter().map(|(x, y)| gradient(x, y, &here)).collect();
        step(&mut here, &gradients, learning_rate);
    }
    if here.iter().zip(&trained).any(|(a, b)| (a - b).abs() > 1e-12) {
        return Err(format!("the cluster trained {trained:?}, here {here:?}").into());
    }
    let (test_x, test_y) = shard(2_000, 999);
    let correct = test_x
        .iter()
        .zip(&test_y)
        .filter(|(row, label)| {
            let predicted = sigmoid(row.iter().zip(&trained).map(|(a, b)| a * b).sum()) > 0.5;
            predicted == (**label > 0.5)
        })
        .count();
    let accuracy = correct as f64 / test_y.len() as f64;
    println!("held-out accuracy {:.1}%", accuracy * 100.0);
    if accuracy < 0.9 {
        return Err(format!("held-out accuracy {accuracy} is below 0.9").into());
    }
    println!("checked: the weights are those the same steps give here");
    Ok(())
}
