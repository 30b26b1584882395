//! Monte Carlo π over tasks: each task throws darts at the unit square and counts those
//! inside the quarter circle; the driver adds the counts. Checks π to within 0.01.
//!
//!   cargo run -p ionet-examples --bin pi                  # embedded cluster: 100 tasks × 100,000 darts
//!   cargo run -p ionet-examples --bin pi -- --large       # 1,000 tasks × 1,000,000 darts
//!   IONET_API_KEY=<key> cargo run -p ionet-examples --bin pi -- --address HEAD:6380

use ionet_examples::{Args, Rng};

/// Darts inside the quarter circle, of `darts` thrown with `seed`.
#[ionet::remote]
fn inside(seed: u64, darts: u64) -> u64 {
    let mut rng = Rng::new(seed);
    (0..darts)
        .filter(|_| {
            let (x, y) = (rng.unit(), rng.unit());
            x * x + y * y <= 1.0
        })
        .count() as u64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse("pi: Monte Carlo π over tasks");
    ionet::init(args.init_config(ionet::InitConfig::default()))?;
    let (tasks, darts) = args.size((100u64, 100_000u64), (1_000, 1_000_000));
    let started = std::time::Instant::now();
    let counts: Vec<_> = (0..tasks).map(|seed| inside::remote(seed, darts)).collect();
    let hits: u64 = ionet::get_all(&counts)?.into_iter().sum();
    let pi = 4.0 * hits as f64 / (tasks * darts) as f64;
    println!("π ≈ {pi:.5} from {} darts in {tasks} tasks ({:.1} s)", tasks * darts, started.elapsed().as_secs_f64());
    ionet::shutdown();
    let error = (pi - std::f64::consts::PI).abs();
    if error > 0.01 {
        return Err(format!("π came out {pi}, {error:.4} off").into());
    }
    Ok(())
}
