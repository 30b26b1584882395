//! What the example programs share: how each starts (an embedded cluster of its own, or
//! joining one with `--address`), reading its size from its arguments.
//!
//! Every example is a binary of this crate (`src/bin/`), runnable as written:
//!
//! ```text
//! cargo run -p ionet-examples --bin pi                        # an embedded local cluster, small size
//! cargo run -p ionet-examples --bin pi -- --large             # the larger size
//! IONET_API_KEY=<key> cargo run -p ionet-examples --bin pi -- --address HEAD:6380   # a real cluster
//! ```
//!
//! On a real cluster, the node daemons run the program's own binary as its workers, so it
//! must be readable and runnable by every user (not under a private home directory); the
//! account the key names pays for what it leases. Each example checks its own answer and
//! exits non-zero when it is wrong: `tests/examples.rs` runs every one at its small size.

/// How an example was asked to run.
#[derive(Clone, Debug, Default)]
pub struct Args {
    /// `--address HEAD:PORT` (or `auto`: this machine's session): join that cluster.
    pub address: Option<String>,
    /// `--large`: the larger size.
    pub large: bool,
    /// `--gpus N`: how many GPUs an example that reserves them asks for (default 4).
    pub gpus: usize,
}

impl Args {
    /// This process's arguments (`--address A`, `--large`); anything else is refused,
    /// saying what the example takes.
    pub fn parse(usage: &str) -> Args {
        let mut args = Args { gpus: 4, ..Args::default() };
        let mut given = std::env::args().skip(1);
        while let Some(arg) = given.next() {
            match arg.as_str() {
                "--address" => args.address = given.next(),
                "--large" => args.large = true,
                "--gpus" => match given.next().and_then(|count| count.parse().ok()).filter(|count| *count > 0) {
                    Some(count) => args.gpus = count,
                    None => {
                        eprintln!("--gpus takes a whole number above 0\n\n{usage}");
                        std::process::exit(2);
                    }
                },
                "-h" | "--help" => {
                    println!(
                        "{usage}\n\n  --address HEAD:PORT|auto   join a running cluster (else start one here)\n  \
                         --large                    the larger size\n  \
                         --gpus N                   GPUs to reserve, for an example that reserves them (default 4)"
                    );
                    std::process::exit(0);
                }
                other => {
                    eprintln!("unknown argument {other:?}\n\n{usage}");
                    std::process::exit(2);
                }
            }
        }
        args
    }

    /// How to start: joining the cluster at `--address`, else an embedded one shaped by
    /// `embedded` (what a laptop declares: CPUs, and GPUs it may only pretend to have).
    pub fn init_config(&self, embedded: ionet::InitConfig) -> ionet::InitConfig {
        match &self.address {
            Some(address) => ionet::InitConfig::default().address(address.clone()),
            None => embedded,
        }
    }

    /// `small` or `large`, as asked.
    pub fn size<T>(&self, small: T, large: T) -> T {
        if self.large {
            large
        } else {
            small
        }
    }
}

/// A small, fast, reproducible random number generator (xorshift64*): the same seed gives
/// the same numbers on every machine, so a task's answer can be checked here.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Never zero (xorshift's fixed point); seeds near each other spread apart.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}
