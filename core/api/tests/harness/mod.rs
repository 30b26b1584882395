//! A small test runner for test binaries that double as ionet workers and daemons
//! (`harness = false`): runs each case in turn with a timeout, and prints libtest-style
//! lines and a closing `N passed, N failed` line.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub type Case = (&'static str, fn());

/// Runs the cases named on the command line (all if none), each within `timeout`.
pub fn run(cases: &[Case], timeout: Duration) -> ! {
    ionet::testing::run_cli_if_requested();
    ionet::testing::run_worker_if_requested();
    let filters: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with('-')).collect();
    let selected: Vec<&Case> = cases
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|filter| name.contains(filter.as_str())))
        .collect();
    println!("running {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in selected {
        let (sender, receiver) = mpsc::channel();
        let case = *case;
        let started = Instant::now();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(case);
            let _ = sender.send(outcome.is_ok());
        });
        match receiver.recv_timeout(timeout) {
            Ok(true) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", started.elapsed().as_secs_f64());
            }
            Ok(false) => {
                failed += 1;
                println!("test {name} ... FAILED");
                // A failed case may leave ionet initialised; the next starts afresh.
                ionet::shutdown();
            }
            Err(_) => {
                println!("test {name} ... FAILED (timed out after {timeout:?})");
                println!("{} passed, {} failed", passed, failed + 1);
                std::process::exit(1);
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// The live node labelled `name=<name>` (as the tests label their nodes).
#[allow(dead_code)] // not every test binary looks nodes up by name
pub fn node_named(name: &str) -> ionet::Node {
    let nodes = ionet::nodes().unwrap();
    nodes.into_iter().find(|node| node.labels.get("name").map(String::as_str) == Some(name)).unwrap()
}

/// Polls `condition` until it holds, or panics naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temporary directory every user may write to (sticky): a job's workers may run as a
/// user of their own, and check in there too.
pub fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    dir
}

/// In a task: checks in under `dir` and waits (up to a minute) until `expected` tasks have,
/// so that they run at once, each in a worker of its own.
pub fn meet(dir: &str, expected: usize) {
    std::fs::write(format!("{dir}/{}", std::process::id()), "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(dir).unwrap().count() < expected {
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} tasks ran at once",
            std::fs::read_dir(dir).unwrap().count()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts `condition` holds the whole time `window` lasts (checked every 20 ms): for what
/// must *not* happen, such as an object freed under its holder.
pub fn holds_for(what: &str, window: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        assert!(condition(), "{what}: it stopped holding within {window:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real cluster: a head and node daemons, each this test binary re-executed as `ionet start`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    daemons: Vec<Child>,
    /// Variables set for every daemon, after the harness's own.
    env: Vec<(String, String)>,
    /// The head's arguments, to start it again with.
    head_args: Vec<String>,
}

impl Cluster {
    pub fn start(head_args: &[&str]) -> Self {
        Self::start_with_env(head_args, &[])
    }

    /// A cluster whose daemons run with `env` set (a longer heartbeat timeout, say).
    pub fn start_with_env(head_args: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env = env.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
        let port: &[&str] = if head_args.contains(&"--port") { &[] } else { &["--port", "0"] };
        let jobs: &[&str] = if head_args.contains(&"--dashboard-port") { &[] } else { &["--dashboard-port", "0"] };
        let head_args: Vec<String> =
            [&["--head"], port, jobs, head_args].concat().into_iter().map(str::to_string).collect();
        let mut cluster = Self { dir, daemons: Vec::new(), env, head_args };
        cluster.spawn_head();
        cluster
    }

    fn spawn_head(&mut self) {
        let args = self.head_args.clone();
        self.spawn("head", &args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// SIGKILLs the head (its own node daemon and that node's workers die with it) and
    /// starts it again with the same arguments: give it `--port` and `--storage` for a
    /// head that comes back where it was, with what it stored.
    pub fn restart_head(&mut self) {
        self.kill(0);
        self.start_head_again();
    }

    /// Starts another head in this session that stands by (it shares the head's Redis
    /// `--storage`, and serves once it holds the head lease); its index. Not waited for:
    /// it is ready only once it takes over.
    pub fn add_standby_head(&mut self, args: &[&str]) -> usize {
        let argv: Vec<&str> = ["--head"].iter().chain(args).copied().collect();
        let child = self.command("standby", &argv, &self.dir.path().to_path_buf());
        self.daemons.push(child);
        self.daemons.len() - 1
    }

    /// Whether daemon `index` is still running.
    pub fn is_running(&mut self, index: usize) -> bool {
        self.daemons[index].try_wait().unwrap().is_none()
    }

    /// Starts the head [`Cluster::kill`]ed at index 0 again, with its arguments.
    pub fn start_head_again(&mut self) {
        self.spawn_head();
        let head = self.daemons.pop().unwrap();
        self.daemons[0] = head;
    }

    /// Adds a node; its index for [`Cluster::kill`].
    pub fn add_node(&mut self, args: &[&str]) -> usize {
        let address = self.address();
        self.spawn("node", &[&["--address", address.as_str()], args].concat());
        self.daemons.len() - 1
    }

    /// Gives daemon `index` notice to leave (SIGTERM) and waits for it to exit, at most
    /// `timeout`; returns how long it took.
    pub fn terminate(&mut self, index: usize, timeout: Duration) -> Duration {
        let daemon = &mut self.daemons[index];
        let asked = std::time::Instant::now();
        // SAFETY: signalling a child process this harness started.
        unsafe {
            libc::kill(daemon.id() as i32, libc::SIGTERM);
        }
        loop {
            if daemon.try_wait().unwrap().is_some() {
                return asked.elapsed();
            }
            assert!(asked.elapsed() < timeout, "daemon {index} did not leave within {timeout:?} of notice");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of daemon `index` (0: the head).
    pub fn pid(&self, index: usize) -> u32 {
        self.daemons[index].id()
    }

    /// Kills daemon `index` (SIGKILL: no goodbye to the cluster); its workers die with it.
    pub fn kill(&mut self, index: usize) {
        let daemon = &mut self.daemons[index];
        daemon.kill().unwrap();
        daemon.wait().unwrap();
    }

    /// Adds a node as another machine would: its own session directory `session` (no
    /// admin credential, no cluster CA of the head's), joining with what `args` give it.
    pub fn add_machine(&mut self, session: &Path, args: &[&str]) -> usize {
        self.spawn_in("node", args, &session.to_path_buf());
        self.daemons.len() - 1
    }

    fn spawn(&mut self, role: &str, args: &[&str]) {
        self.spawn_in(role, args, &self.dir.path().to_path_buf());
    }

    /// This binary started as `ionet start --block ... args` in `session`, its output in
    /// `<role>-<n>.out`.
    fn command(&self, role: &str, args: &[&str], session: &PathBuf) -> Child {
        let mut argv: Vec<String> = vec!["start".into(), "--block".into(), "--host".into(), "127.0.0.1".into()];
        argv.extend(args.iter().map(|arg| arg.to_string()));
        argv.push("--temp-dir".into());
        argv.push(session.to_string_lossy().into_owned());
        let log = std::fs::File::create(self.dir.path().join(format!("{role}-{}.out", self.daemons.len()))).unwrap();
        Command::new(std::env::current_exe().unwrap())
            .env(ionet::testing::CLI_ARGS_ENV, serde_json::to_string(&argv).unwrap())
            .env("IONET_HEARTBEAT_INTERVAL_MS", "200")
            .env("IONET_HEARTBEAT_TIMEOUT_MS", "2000")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .env_remove("IONET_CREDENTIAL")
            .env_remove("IONET_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn spawn_in(&mut self, role: &str, args: &[&str], session: &PathBuf) {
        let mut child = self.command(role, args, session);
        let pid_file = session.join("pids").join(format!("{role}-{}.pid", child.id()));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pid_file.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{role} exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "{role} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.daemons.push(child);
    }

    pub fn address(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("head_address")).unwrap().trim().to_string()
    }

    pub fn session(&self) -> &Path {
        self.dir.path()
    }

    /// Runs an `ionet` command (this binary as the CLI) against the cluster; its stdout.
    pub fn ionet(&self, args: &[&str]) -> String {
        let output = self.run_ionet(args);
        assert!(output.status.success(), "ionet {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs an `ionet` command that must fail; what it printed (stdout, then stderr).
    pub fn ionet_fails(&self, args: &[&str]) -> String {
        let output = self.run_ionet(args);
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(!output.status.success(), "ionet {args:?} succeeded: {printed}");
        printed
    }

    /// Runs an `ionet` command that must succeed; all it printed (stdout, then stderr).
    pub fn run_ionet_output(&self, args: &[&str]) -> String {
        let output = self.run_ionet(args);
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "ionet {args:?} failed: {printed}");
        printed
    }

    fn run_ionet(&self, args: &[&str]) -> std::process::Output {
        // The session goes before a `--` (what follows it is a command line of its own).
        let at = args.iter().position(|arg| *arg == "--").unwrap_or(args.len());
        let mut argv: Vec<String> = args[..at].iter().map(|arg| arg.to_string()).collect();
        argv.push("--temp-dir".into());
        argv.push(self.dir.path().to_string_lossy().into_owned());
        argv.extend(args[at..].iter().map(|arg| arg.to_string()));
        Command::new(std::env::current_exe().unwrap())
            .env(ionet::testing::CLI_ARGS_ENV, serde_json::to_string(&argv).unwrap())
            .env_remove("IONET_CREDENTIAL")
            .env_remove("IONET_API_KEY")
            .output()
            .unwrap()
    }

    /// Connects this process to the cluster as a driver.
    pub fn init(&self) {
        self.init_as("default");
    }

    /// Connects as a driver working through the node daemon at `node_address` (not the
    /// head's), as a driver on a worker machine does.
    pub fn init_through(&self, node_address: &str) {
        let config = ionet::InitConfig {
            session_dir: Some(self.dir.path().to_path_buf()),
            node_address: Some(node_address.to_string()),
            ..Default::default()
        };
        ionet::init(config.address("auto")).expect("driver joins the cluster");
    }

    /// Connects as a driver whose usage is billed to `payer`.
    pub fn init_as(&self, payer: &str) {
        let config = ionet::InitConfig {
            session_dir: Some(self.dir.path().to_path_buf()),
            payer_account: payer.to_string(),
            ..Default::default()
        };
        ionet::init(config.address("auto")).expect("driver joins the cluster");
    }
}

impl Cluster {
    /// The last lines of every daemon's log, for a failing test's output.
    fn print_logs(&self) {
        let mut logs: Vec<PathBuf> =
            std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten().map(|e| e.path()).collect();
        logs.extend(std::fs::read_dir(self.dir.path().join("logs")).into_iter().flatten().flatten().map(|e| e.path()));
        logs.sort();
        for path in logs.iter().filter(|path| {
            let name = path.to_string_lossy();
            path.is_file()
                && !["admin_credential", "signing_key", "node_key", "ca_key"]
                    .iter()
                    .any(|secret| name.ends_with(secret))
        }) {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            // Warnings first: what went wrong is often long before the last lines.
            let warnings: Vec<&&str> =
                lines.iter().filter(|line| line.contains("WARN") || line.contains("ERROR")).collect();
            if !warnings.is_empty() {
                eprintln!("----- {} (first 40 warnings and errors of {})", path.display(), warnings.len());
                for line in warnings.iter().take(40) {
                    eprintln!("{line}");
                }
            }
            eprintln!("----- {} (last 40 lines)", path.display());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        ionet::shutdown();
        for child in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A port free on loopback now (for a daemon that must come back at the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ionet-test-{}-{name}", std::process::id()))
}
