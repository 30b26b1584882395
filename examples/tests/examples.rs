//! Every example at its small size, run as a user runs it (its own binary, an embedded
//! cluster of its own): each checks its own answer and exits non-zero when it is wrong;
//! here its exit and what it printed are checked too. One at a time (each starts a
//! cluster), each within a deadline.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What `binary` printed, once it exited successfully within `deadline`.
fn run(binary: &str, args: &[&str], deadline: Duration) -> String {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    // A session directory of its own: nothing of another cluster on this machine is joined.
    let session = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary)
        .args(args)
        .env("IONET_SESSION_DIR", session.path())
        .env_remove("IONET_ADDRESS")
        .env_remove("IONET_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("{binary}: {err}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).map(|_| text)
    });
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{binary} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().unwrap().unwrap();
    let err = errors.join().unwrap().unwrap();
    assert!(status.success(), "{binary} {args:?} failed ({status}):\n{out}\n{err}");
    out
}

#[test]
fn monte_carlo_pi_is_within_a_hundredth() {
    let out = run(env!("CARGO_BIN_EXE_pi"), &[], Duration::from_secs(300));
    let pi: f64 = out.split_whitespace().nth(2).and_then(|value| value.parse().ok()).expect(&out);
    assert!((pi - std::f64::consts::PI).abs() < 0.01, "{out}");
}

#[test]
fn the_sweeps_trials_match_training_here_and_the_best_is_known() {
    let out = run(env!("CARGO_BIN_EXE_sweep"), &[], Duration::from_secs(300));
    assert_eq!(out.lines().filter(|line| line.trim_start().starts_with("trial ")).count(), 18, "{out}");
    // With this data and grid the best is a learning rate of 0.01 without a penalty.
    assert!(out.contains("best: lr 0.01 l2 0:"), "{out}");
    assert!(out.contains("checked: every trial's answer matches training it here"), "{out}");
}

#[test]
fn the_parameter_server_trains_what_the_same_steps_give_here() {
    let out = run(env!("CARGO_BIN_EXE_parameter_server"), &[], Duration::from_secs(300));
    assert_eq!(out.lines().filter(|line| line.starts_with("step ")).count(), 5, "progress shown: {out}");
    assert!(out.contains("checked: the weights are those the same steps give here"), "{out}");
}

#[test]
fn batch_inference_scores_every_row_as_the_model_does_here() {
    let out = run(env!("CARGO_BIN_EXE_batch_inference"), &[], Duration::from_secs(300));
    assert!(out.starts_with("80000 rows in 40 Arrow batches scored by 2 GPU actors"), "{out}");
    assert!(out.contains("checked: every score matches the model run here"), "{out}");
}

#[test]
fn the_readmes_rust_example_runs_as_written() {
    let out = run(env!("CARGO_BIN_EXE_readme"), &[], Duration::from_secs(300));
    assert_eq!(out.trim(), "[0, 1, 4, 9] 49");
}
