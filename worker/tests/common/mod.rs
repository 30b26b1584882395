//! A real cluster of `ionet` processes on loopback for integration tests: ephemeral
//! ports, a temp session directory, fast heartbeats, and every process killed when
//! the cluster is dropped.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ionet_common::auth::Bearer;
use ionet_common::rpc::GcsClient;

pub const HEARTBEAT_INTERVAL_MS: u64 = 200;
pub const HEARTBEAT_TIMEOUT_MS: u64 = 1_500;
/// Long enough for a daemon to start on a loaded 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn ionet_binary() -> &'static str {
    env!("CARGO_BIN_EXE_ionet")
}

/// Polls `condition` until it holds, or panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub head: Option<Child>,
    pub nodes: Vec<Child>,
    pub runtime: tokio::runtime::Runtime,
    spawned: usize,
}

impl TestCluster {
    /// A head with `extra` flags, ready (its pid file written) before this returns.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut cluster = Self { dir, head: None, nodes: Vec::new(), runtime, spawned: 0 };
        cluster.start_head(&[&["--port", "0"], extra].concat());
        cluster
    }

    pub fn session(&self) -> &Path {
        self.dir.path()
    }

    fn daemon(&mut self, args: &[&str]) -> Child {
        self.spawned += 1;
        let out = File::create(self.dir.path().join(format!("daemon-{}.out", self.spawned))).unwrap();
        Command::new(ionet_binary())
            .args(["start", "--block", "--host", "127.0.0.1", "--num-cpus", "1", "--temp-dir"])
            .arg(self.dir.path())
            .args(args)
            .env("IONET_HEARTBEAT_INTERVAL_MS", HEARTBEAT_INTERVAL_MS.to_string())
            .env("IONET_HEARTBEAT_TIMEOUT_MS", HEARTBEAT_TIMEOUT_MS.to_string())
            .env("IONET_RECONNECT_INITIAL_BACKOFF_MS", "50")
            .env("IONET_RECONNECT_MAX_BACKOFF_MS", "300")
            .env_remove("IONET_CREDENTIAL")
            .env_remove("IONET_API_KEY")
            .env_remove("IONET_SESSION_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn ionet")
    }

    fn pid_file(&self, role: &str, pid: u32) -> PathBuf {
        self.dir.path().join("pids").join(format!("{role}-{pid}.pid"))
    }

    fn wait_ready(&self, role: &str, child: &mut Child) {
        let pid_file = self.pid_file(role, child.id());
        let deadline = Instant::now() + START_TIMEOUT;
        while !pid_file.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{role} exited during start-up with {status}:\n{}", self.daemon_output());
            }
            assert!(Instant::now() < deadline, "{role} not ready in time:\n{}", self.daemon_output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemons wrote to stderr, for failure messages.
    pub fn daemon_output(&self) -> String {
        let mut text = String::new();
        for index in 1..=self.spawned {
            let path = self.dir.path().join(format!("daemon-{index}.out"));
            text.push_str(&format!("--- daemon {index} ---\n{}\n", std::fs::read_to_string(path).unwrap_or_default()));
        }
        text
    }

    pub fn start_head(&mut self, args: &[&str]) {
        let mut child = self.daemon(&[&["--head"], args].concat());
        self.wait_ready("head", &mut child);
        self.head = Some(child);
    }

    /// A node daemon joining the head, ready before this returns; its index in `nodes`.
    pub fn add_node(&mut self, args: &[&str]) -> usize {
        let address = self.address();
        let mut child = self.daemon(&[&["--address", address.as_str()], args].concat());
        self.wait_ready("node", &mut child);
        self.nodes.push(child);
        self.nodes.len() - 1
    }

    pub fn address(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("head_address")).expect("head address").trim().to_string()
    }

    /// Runs an `ionet` command against this cluster's session directory.
    pub fn ionet(&self, args: &[&str]) -> Output {
        Command::new(ionet_binary())
            .args(args)
            .arg("--temp-dir")
            .arg(self.dir.path())
            .env_remove("IONET_CREDENTIAL")
            .env_remove("IONET_API_KEY")
            .output()
            .expect("run ionet")
    }

    pub fn status_json(&self) -> serde_json::Value {
        let output = self.ionet(&["status", "--json"]);
        assert!(output.status.success(), "ionet status failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("status --json prints JSON")
    }

    /// A client of the head's control store, as the operator.
    pub fn client(&self) -> GcsClient {
        self.admin_client()
    }

    pub fn client_with(&self, credential: &Bearer) -> GcsClient {
        let address = self.address();
        self.runtime.block_on(ionet_common::rpc::gcs_client(&address, credential)).expect("connect to the head")
    }

    /// The operator's credential, as the head wrote it into the session directory.
    pub fn admin_credential(&self) -> Bearer {
        let text = std::fs::read_to_string(self.session().join("admin_credential")).expect("the head wrote it");
        Bearer::new(&text).unwrap()
    }

    /// A client of the head's control store with the operator's credential.
    pub fn admin_client(&self) -> GcsClient {
        self.client_with(&self.admin_credential())
    }

    /// A client of the head's metering service with the operator's credential (which may
    /// report leases for any node, as tests that stand in for a node do).
    pub fn metering_client(&self) -> ionet_common::rpc::MeteringClient {
        let address = self.address();
        self.runtime
            .block_on(ionet_common::rpc::metering_client(&address, &self.admin_credential()))
            .expect("connect to the head's metering service")
    }

    /// Runs an `ionet` command that must succeed; returns its stdout.
    pub fn ionet_ok(&self, args: &[&str]) -> String {
        let output = self.ionet(args);
        assert!(
            output.status.success(),
            "ionet {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    /// Runs an `ionet` command that must fail with exit code 1; returns its stderr.
    pub fn ionet_err(&self, args: &[&str]) -> String {
        let output = self.ionet(args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "ionet {args:?} should fail: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).expect("utf-8 output")
    }

    pub fn kill_head(&mut self) {
        if let Some(mut head) = self.head.take() {
            head.kill().unwrap();
            head.wait().unwrap();
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for child in self.nodes.iter_mut().chain(self.head.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
