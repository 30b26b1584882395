//! `ionet devnet` and `ionet wallet` as an operator and a provider use them: a local chain
//! started as a daemon of the session, funded, read over its JSON-RPC; wallets written once
//! and never overwritten; balances read from the chain; bad input refused; `ionet stop`
//! stops the chain; a chain killed outright is not taken for a live one. (Payouts through
//! it, end to end, are the main job's: `python/tests/test_main_job.py`.)
#![cfg(feature = "devnet")]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

fn ionet(session: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ionet"))
        .args(args)
        .env("IONET_SESSION_DIR", session)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running ionet")
}

fn ok(session: &Path, args: &[&str]) -> String {
    let out = ionet(session, args);
    assert!(out.status.success(), "ionet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn refused(session: &Path, args: &[&str]) -> String {
    let out = ionet(session, args);
    assert!(!out.status.success(), "ionet {args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

fn devnet_info(session: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(session.join("devnet/devnet.json")).unwrap()).unwrap()
}

fn pid_of(started: &str) -> i32 {
    let pid = started.split("(pid ").nth(1).and_then(|rest| rest.split(')').next()).expect("a pid in the output");
    pid.parse().unwrap()
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z ")) {
        assert!(Instant::now() < deadline, "pid {pid} still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_devnet_is_funded_read_over_rpc_refuses_a_second_and_stops_with_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("session");
    let started = ok(&session, &["devnet", "start", "--usd", "250", "--sol", "3"]);
    assert!(started.contains("serves JSON-RPC at http://127.0.0.1:"), "{started}");
    assert!(started.contains("--payout-rpc-url http://127.0.0.1:"), "the head's flags are printed: {started}");
    let pid = pid_of(&started);
    let info = devnet_info(&session);
    let authority = info["authority"].as_str().unwrap().to_string();
    assert_eq!(info["asset"], format!("spl:{}:6", info["mint"].as_str().unwrap()));
    let keypair = Path::new(info["keypair"].as_str().unwrap());
    assert_eq!(std::fs::metadata(keypair).unwrap().permissions().mode() & 0o777, 0o600, "the payout key is private");

    let again = refused(&session, &["devnet", "start"]);
    assert!(again.contains("a devnet already runs for this session"), "{again}");

    // The authority holds what it was given, read from the chain over its RPC.
    let balance: Value = serde_json::from_str(&ok(&session, &["wallet", "balance", &authority, "--json"])).unwrap();
    assert_eq!((balance["amount"].as_u64(), balance["usd_micros"].as_u64()), (Some(250_000_000), Some(250_000_000)));
    let text = ok(&session, &["wallet", "balance", &authority]);
    assert!(text.contains("250.000000 tokens ($250.00)"), "{text}");
    let sol: Value =
        serde_json::from_str(&ok(&session, &["wallet", "balance", &authority, "--json", "--asset", "sol:1000000000"]))
            .unwrap();
    let lamports = sol["amount"].as_u64().unwrap();
    assert!(lamports <= 3_000_000_000 && lamports > 2_900_000_000, "3 SOL less the set-up's fees and rent: {sol}");

    // A provider's wallet: written once, mode 0600, holding nothing yet.
    let wallet_file = dir.path().join("provider.json");
    let wallet = ok(&session, &["wallet", "new", wallet_file.to_str().unwrap()]).trim().to_string();
    assert!((32..=44).contains(&wallet.len()), "a base58 address: {wallet:?}");
    assert_eq!(std::fs::metadata(&wallet_file).unwrap().permissions().mode() & 0o777, 0o600);
    let key = std::fs::read(&wallet_file).unwrap();
    let overwrite = refused(&session, &["wallet", "new", wallet_file.to_str().unwrap()]);
    assert!(overwrite.contains("never overwritten"), "{overwrite}");
    assert_eq!(std::fs::read(&wallet_file).unwrap(), key, "the wallet file is unchanged");
    let empty: Value = serde_json::from_str(&ok(&session, &["wallet", "balance", &wallet, "--json"])).unwrap();
    assert_eq!(empty["amount"], 0);

    let bad = refused(&session, &["wallet", "balance", "not-an-address"]);
    assert!(bad.contains("is not a Solana address"), "{bad}");
    let bad = refused(&session, &["wallet", "balance", &wallet, "--asset", "gold:7"]);
    assert!(bad.contains("--asset \"gold:7\""), "{bad}");

    // `ionet stop` stops the chain; then nothing is there to default to.
    let stopped = ok(&session, &["stop"]);
    assert!(stopped.contains("stopped 1 ionet daemon(s)"), "{stopped}");
    wait_gone(pid);
    assert!(!session.join("devnet/devnet.json").exists(), "its file goes with it");
    let gone = refused(&session, &["wallet", "balance", &wallet]);
    assert!(gone.contains("no devnet runs for this session"), "{gone}");
}

#[test]
fn a_devnet_killed_outright_is_not_taken_for_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("session");
    let pid = pid_of(&ok(&session, &["devnet", "start"]));
    // SAFETY: kill(2) on the devnet this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
    assert!(session.join("devnet/devnet.json").exists(), "a killed devnet leaves its file");
    let gone = refused(&session, &["wallet", "balance", "11111111111111111111111111111111"]);
    assert!(gone.contains("no devnet runs for this session"), "{gone}");
    let restarted = ok(&session, &["devnet", "start"]);
    let pid = pid_of(&restarted);
    assert!(alive(pid));
    ok(&session, &["stop"]);
    wait_gone(pid);
}
