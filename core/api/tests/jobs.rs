//! Submitted jobs: `ionet job submit` to the head's job server runs the entrypoint as a
//! driver on a node of the cluster, under the submitting account, with its runtime
//! environment; its output (its workers' lines prefixed) comes back through `ionet job
//! logs`; `ionet job stop` ends it and its workers.

mod harness;

use std::time::{Duration, Instant};

use harness::{wait_until, Cluster};
use ionet::{InitConfig, SchedulingStrategy, TaskOptions};

/// Set (by the runtime environment) in a submitted test binary that plays the driver:
/// `tasks` runs tasks on both nodes and ends; `linger` leaves a task running until stopped.
const SUBMITTED_DRIVER_ENV: &str = "IONET_TEST_SUBMITTED_DRIVER";

/// Prints a line naming the node it runs on, and what the job's working dir and
/// environment gave it.
#[ionet::remote]
fn shout(node: String) -> String {
    let data = std::fs::read_to_string("data.txt").unwrap_or_else(|err| format!("no data.txt: {err}"));
    println!("hello from node {node}: {} / {}", data.trim(), std::env::var("GREETING").unwrap_or_default());
    ionet::get_runtime_context().unwrap().node_id.hex()
}

/// Runs until its worker is stopped.
#[ionet::remote]
fn linger() -> u32 {
    println!("lingering in pid {}", std::process::id());
    std::thread::sleep(Duration::from_secs(600));
    0
}

/// What a task's working dir and environment gave it.
#[ionet::remote]
fn environment() -> String {
    let data = std::fs::read_to_string("data.txt").unwrap_or_else(|err| format!("no data.txt: {err}"));
    format!("{} / {}", data.trim(), std::env::var("GREETING").unwrap_or_default())
}

/// Set in this binary re-run as a driver of its own embedded cluster with
/// `InitConfig::runtime_env` naming this working dir.
const INIT_DRIVER_ENV: &str = "IONET_TEST_INIT_DRIVER";

fn init_driver(working_dir: &str) {
    let runtime_env = serde_json::json!({ "working_dir": working_dir, "env_vars": { "GREETING": "from init" } });
    ionet::init(InitConfig::default().num_cpus(1.0).runtime_env(runtime_env)).expect("the driver starts");
    let seen = ionet::get_timeout(&environment::remote(), Duration::from_secs(60)).unwrap();
    println!("the task saw {seen}");
    let own = TaskOptions::default().runtime_env(serde_json::json!({ "env_vars": { "GREETING": "from the task" } }));
    let seen = ionet::get_timeout(&environment::options(own).remote(), Duration::from_secs(60)).unwrap();
    println!("the task with its own runtime_env saw {seen}");
    ionet::shutdown();
}

/// A Rust driver's `InitConfig::runtime_env` reaches its tasks: its working dir, packed
/// and uploaded to the (embedded) head, unpacked for the task's worker, and its env_vars;
/// a task's own `TaskOptions::runtime_env` adds to it.
fn a_rust_drivers_runtime_env_reaches_its_tasks() {
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("data.txt"), "payload 7\n").unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .env(INIT_DRIVER_ENV, project.path())
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{printed}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(printed.contains("the task saw payload 7 / from init"), "{printed}");
    assert!(printed.contains("the task with its own runtime_env saw payload 7 / from the task"), "{printed}");
}

/// The entrypoint the tests submit (this binary, started by a node for the job server).
fn submitted_driver(mode: &str) {
    // No address: the entrypoint is told where its cluster is (IONET_ADDRESS).
    ionet::init(InitConfig::default()).expect("a submitted entrypoint joins its cluster");
    let context = ionet::get_runtime_context().unwrap();
    println!("GREETING={}", std::env::var("GREETING").unwrap_or_default());
    if let Ok(data) = std::fs::read_to_string("data.txt") {
        println!("the driver reads {}", data.trim());
    }
    println!("driver on node {} as job {}", context.node_id.hex(), context.job_id.hex());
    match mode {
        "tasks" => {
            let mut nodes = Vec::new();
            for name in ["a", "b"] {
                let node = harness::node_named(name);
                let pinned = TaskOptions::default()
                    .scheduling_strategy(SchedulingStrategy::NodeAffinity { node_id: node.node_id, soft: false });
                let ran_on =
                    ionet::get_timeout(&shout::options(pinned).remote(name.to_string()), Duration::from_secs(60));
                nodes.push(ran_on.unwrap());
            }
            println!("tasks ran on {}", nodes.join(","));
        }
        "linger" => {
            let _ = ionet::get(&linger::remote());
        }
        other => panic!("unknown driver mode {other}"),
    }
    ionet::shutdown();
}

/// An account's API key, made by the operator.
fn account_key(cluster: &Cluster, name: &str) -> String {
    let created: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["account", "create", name, "--json"])).unwrap();
    created["api_key"].as_str().expect("the account's key").to_string()
}

fn runtime_env(mode: &str) -> String {
    serde_json::json!({ "env_vars": { SUBMITTED_DRIVER_ENV: mode, "GREETING": "hello from the runtime env" } })
        .to_string()
}

fn entrypoint() -> String {
    std::env::current_exe().unwrap().to_string_lossy().into_owned()
}

/// A job submitted by a tenant to a TLS head with two nodes runs its entrypoint on a node
/// with its environment, runs tasks on both nodes, and its output, each worker's line
/// prefixed, comes back through `ionet job submit` (followed) and `ionet job logs`.
fn a_submitted_job_runs_on_the_cluster_and_its_output_comes_back() {
    let mut cluster = Cluster::start(&["--tls", "--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=b"]);
    let key = account_key(&cluster, "acme");
    let job_server = std::fs::read_to_string(cluster.session().join("job_server_address")).unwrap();
    assert!(job_server.starts_with("https://"), "a TLS head's job server speaks TLS: {job_server}");

    let env = runtime_env("tasks");
    let exe = entrypoint();
    let id = "acme-train-1";
    // The job's working dir: a data file its driver and its tasks on both nodes read.
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("data.txt"), "payload 42\n").unwrap();
    std::fs::create_dir(project.path().join(".git")).unwrap();
    std::fs::write(project.path().join(".git/HEAD"), "not shipped").unwrap();
    let dir = project.path().to_string_lossy().into_owned();
    let submit = [
        "job",
        "submit",
        "--api-key",
        &key,
        "--submission-id",
        id,
        "--working-dir",
        &dir,
        "--runtime-env-json",
        &env,
        "--",
        &exe,
    ];
    let printed = cluster.run_ionet_output(&submit);
    assert!(printed.contains("uploaded 100%"), "the upload shows its progress: {printed}");
    let followed = printed;
    assert!(followed.contains("GREETING=hello from the runtime env"), "{followed}");
    assert!(followed.contains("the driver reads payload 42"), "{followed}");
    for name in ["a", "b"] {
        let expected = format!("hello from node {name}: payload 42 / hello from the runtime env");
        let line = followed.lines().find(|line| line.ends_with(&expected));
        let line = line.unwrap_or_else(|| panic!("node {name}'s line is missing:\n{followed}"));
        assert!(line.starts_with("(shout pid=") && line.contains(", ip=127.0.0.1) "), "{line}");
    }
    let ran_on = followed.lines().find_map(|line| line.strip_prefix("tasks ran on ")).expect("the tasks ran");
    let nodes: std::collections::BTreeSet<&str> = ran_on.split(',').collect();
    assert_eq!(nodes.len(), 2, "the tasks ran on both nodes: {followed}");

    // The job server kept it all, and says how it went.
    let logs = cluster.ionet(&["job", "logs", id, "--api-key", &key]);
    assert!(logs.contains("hello from node a") && logs.contains("hello from node b"), "{logs}");
    // Followed over the WebSocket tail (Ray's `logs/tail`) after it ended: all of it, then
    // the server closes.
    let tailed = cluster.ionet(&["job", "logs", id, "--follow", "--api-key", &key]);
    assert_eq!(tailed, logs, "the tail carries the whole output");
    let details: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["job", "status", id, "--json", "--api-key", &key])).unwrap();
    assert_eq!(details["status"], "SUCCEEDED", "{details}");
    assert_eq!(details["type"], "SUBMISSION");
    assert_eq!(details["driver_exit_code"], 0);
    assert_eq!(details["account"], "acme", "the submitting account pays");
    let steps: Vec<&str> =
        details["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(
        steps[0] == "submitted by account acme" && steps[1].contains("fetching and unpacking its packages"),
        "{steps:?}"
    );
    assert!(steps.iter().any(|step| step.starts_with("entrypoint started")), "{steps:?}");
    assert!(steps.last().unwrap().starts_with("Succeeded"), "{steps:?}");
    let status = cluster.ionet(&["job", "status", id, "--api-key", &key]);
    assert!(status.contains("Events:") && status.contains("placed on node"), "{status}");
    let driver_node = details["driver_node_id"].as_str().unwrap();
    let head = cluster.ionet(&["status", "--json"]);
    let head_node = serde_json::from_str::<Vec<serde_json::Value>>(&head)
        .unwrap()
        .into_iter()
        .find(|node| node["is_head"] == true)
        .map(|node| node["node_id"].as_str().unwrap().to_string())
        .unwrap();
    assert_ne!(driver_node, head_node, "the entrypoint runs on a worker node, not the head");
    let job = details["job_id"].as_str().expect("the driver's job");
    let jobs: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ionet(&["job", "list", "--json", "--api-key", &key])).unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["submission_id"], id);
    assert!(logs.contains(&format!("as job {job}")), "{logs}");

    // Another tenant sees none of it, and may neither stop nor delete it.
    let other = account_key(&cluster, "rival");
    let theirs: Vec<serde_json::Value> =
        serde_json::from_str(&cluster.ionet(&["job", "list", "--json", "--api-key", &other])).unwrap();
    assert!(theirs.is_empty(), "a tenant lists only its own submissions: {theirs:?}");
    for command in
        [&["job", "logs", id][..], &["job", "logs", id, "--follow"], &["job", "stop", id], &["job", "delete", id]]
    {
        let args: Vec<&str> = command.iter().copied().chain(["--api-key", other.as_str()]).collect();
        let refused = cluster.ionet_fails(&args);
        assert!(refused.contains("404") && refused.contains(&format!("Job {id} does not exist")), "{refused}");
    }

    // The same directory again is the same package: not uploaded twice.
    let again = cluster.run_ionet_output(&[
        "job",
        "submit",
        "--api-key",
        &key,
        "--working-dir",
        &dir,
        "--runtime-env-json",
        &env,
        "--",
        &exe,
    ]);
    assert!(again.contains("is on the head already"), "{again}");

    // Ended, it may be deleted; its id is free again.
    cluster.ionet(&["job", "delete", id, "--api-key", &key]);
    let gone = cluster.ionet_fails(&["job", "status", id, "--api-key", &key]);
    assert!(gone.contains("does not exist"), "{gone}");
    drop(cluster);
}

/// A Rust program built elsewhere (this test binary, stripped, as a tenant's laptop would
/// build it) shipped in the job's working dir runs as the job's driver and as its workers
/// on both nodes, which never built it.
fn a_rust_binary_shipped_in_the_working_dir_runs_its_tasks_on_the_nodes() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=a"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=b"]);
    let key = account_key(&cluster, "acme");
    let project = tempfile::tempdir().unwrap();
    let binary = project.path().join("trainer");
    let stripped = std::process::Command::new("strip").arg("-o").arg(&binary).arg(entrypoint()).status().unwrap();
    assert!(stripped.success(), "strip the test binary");
    std::fs::write(project.path().join("data.txt"), "payload 42\n").unwrap();
    let dir = project.path().to_string_lossy().into_owned();
    let env = runtime_env("tasks");
    let followed = cluster.ionet(&[
        "job",
        "submit",
        "--api-key",
        &key,
        "--working-dir",
        &dir,
        "--runtime-env-json",
        &env,
        "--",
        "./trainer",
    ]);
    for name in ["a", "b"] {
        let expected = format!("hello from node {name}: payload 42 / hello from the runtime env");
        assert!(
            followed.lines().any(|line| line.starts_with("(shout pid=") && line.ends_with(&expected)),
            "{followed}"
        );
    }
    drop(cluster);
}

/// Stopping a submitted job ends its entrypoint and its workers within 5 s, and its
/// credential starts no more jobs.
fn a_stopped_job_ends_with_its_workers() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    cluster.add_node(&["--num-cpus", "2", "--labels", "name=a"]);
    let key = account_key(&cluster, "acme");
    let env = runtime_env("linger");
    let exe = entrypoint();
    let submitted =
        cluster.ionet(&["job", "submit", "--no-wait", "--api-key", &key, "--runtime-env-json", &env, "--", &exe]);
    let id = submitted.trim().to_string();
    assert!(id.starts_with("ionetsubmit_"), "{submitted}");
    let mut worker_pid = None;
    wait_until("the lingering task runs", Duration::from_secs(60), || {
        let logs = cluster.ionet(&["job", "logs", &id, "--api-key", &key]);
        worker_pid = logs.lines().find_map(|line| line.split("lingering in pid ").nth(1)?.trim().parse::<i32>().ok());
        worker_pid.is_some()
    });
    let worker_pid = worker_pid.unwrap();
    let details: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["job", "status", &id, "--json", "--api-key", &key])).unwrap();
    assert_eq!(details["status"], "RUNNING", "{details}");
    let driver_pid: i32 = details["driver_info"]["pid"].as_str().unwrap().parse().unwrap();

    let asked = Instant::now();
    let stopped = cluster.ionet(&["job", "stop", &id, "--api-key", &key]);
    assert!(stopped.contains("stopped"), "{stopped}");
    let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
    wait_until("the entrypoint and its worker end", Duration::from_secs(5).saturating_sub(asked.elapsed()), || {
        !alive(driver_pid) && !alive(worker_pid)
    });
    let details: serde_json::Value =
        serde_json::from_str(&cluster.ionet(&["job", "status", &id, "--json", "--api-key", &key])).unwrap();
    assert_eq!(details["status"], "STOPPED", "{details}");
    assert_eq!(details["message"], "Job was intentionally stopped.");
    // A stopped job cannot be stopped again, and its record stays until deleted.
    let again = cluster.ionet(&["job", "stop", &id, "--api-key", &key]);
    assert!(again.contains("was not running"), "{again}");
    drop(cluster);
}

/// `--gpus 2 --gpu-type A100-80GB --max-price 1.5` runs the entrypoint on the cheaper of
/// two matching nodes, holding its GPUs there (they are not free to others while it runs,
/// it sees them, and the lease is metered to the account); a price no node asks is
/// refused, naming the cheapest.
fn gpus_and_a_price_place_the_entrypoint_on_the_cheapest_node() {
    let mut cluster = Cluster::start(&["--num-cpus", "0"]);
    let gpu_node = |price: &str, name: &str| {
        [
            "--num-cpus",
            "1",
            "--num-gpus",
            "4",
            "--gpu-type",
            "A100-80GB",
            "--price-per-gpu-hour",
            price,
            "--labels",
            name,
        ]
        .map(str::to_string)
    };
    for (price, name) in [("1.40", "name=cheap"), ("1.45", "name=dear")] {
        let args = gpu_node(price, name);
        cluster.add_node(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    cluster.add_node(&["--num-cpus", "1", "--num-gpus", "4", "--gpu-type", "H100", "--price-per-gpu-hour", "0.5"]);
    let key = account_key(&cluster, "acme");
    cluster.ionet(&["credits", "add", "--account", "acme", "--amount", "100"]);
    let gpus = ["--gpus", "2", "--gpu-type", "A100-80GB", "--max-price", "1.5"];
    let script = "echo visible=$CUDA_VISIBLE_DEVICES; sleep 600";
    let args: Vec<&str> = ["job", "submit", "--no-wait", "--api-key", &key]
        .into_iter()
        .chain(gpus)
        .chain(["--", "sh", "-c", script])
        .collect();
    let id = cluster.ionet(&args).trim().to_string();
    let mut details = serde_json::Value::Null;
    wait_until("the entrypoint runs", Duration::from_secs(60), || {
        details = serde_json::from_str(&cluster.ionet(&["job", "status", &id, "--json", "--api-key", &key])).unwrap();
        details["status"] == "RUNNING" && cluster.ionet(&["job", "logs", &id, "--api-key", &key]).contains("visible=")
    });
    let cheap = harness_node(&cluster, "cheap");
    assert_eq!(details["driver_node_id"].as_str(), Some(cheap.as_str()), "the cheaper A100 node: {details}");
    let logs = cluster.ionet(&["job", "logs", &id, "--api-key", &key]);
    let visible = logs.lines().find_map(|line| line.strip_prefix("visible=")).unwrap_or_default();
    assert_eq!(visible.split(',').count(), 2, "it sees its 2 GPUs: {logs}");
    // Held there: the node offers 2 of its 4 GPUs to others while it runs.
    let free_gpus = |cluster: &Cluster| {
        let nodes: Vec<serde_json::Value> = serde_json::from_str(&cluster.ionet(&["status", "--json"])).unwrap();
        let node = nodes.iter().find(|node| node["node_id"] == cheap.as_str()).cloned().unwrap();
        node["resources_available"]["GPU"].as_f64()
    };
    wait_until("the node holds 2 of its GPUs", Duration::from_secs(30), || free_gpus(&cluster) == Some(2.0));
    // Metered to the account: a lease of 2 GPUs on that node.
    wait_until("the entrypoint's GPUs are metered", Duration::from_secs(30), || {
        let usage: Vec<serde_json::Value> = serde_json::from_str(&cluster.ionet(&["usage", "--json"])).unwrap();
        usage.iter().any(|record| {
            record["payer_account"] == "acme"
                && record["node_id"] == cheap.as_str()
                && record["resources"]["GPU"] == 2.0
        })
    });
    // The tenant's own driver sees the group that holds them and may not end it (that
    // would end its metering while the entrypoint keeps the GPUs).
    let config = ionet::InitConfig {
        session_dir: Some(cluster.session().to_path_buf()),
        api_key: Some(key.clone()),
        ..Default::default()
    };
    ionet::init(config.address("auto")).unwrap();
    let held = ionet::placement_group_table().unwrap();
    let held = held.iter().find(|group| group.name == format!("entrypoint of {id}")).expect("the entrypoint's group");
    let refused = ionet::remove_placement_group(&ionet::PlacementGroup::from_id(held.id).unwrap()).unwrap_err();
    assert!(refused.to_string().contains("ends with the submission"), "{refused}");
    ionet::shutdown();
    cluster.ionet(&["job", "stop", &id, "--api-key", &key]);
    wait_until("its GPUs are free again", Duration::from_secs(30), || free_gpus(&cluster) == Some(4.0));

    // An account that cannot pay for them holds them only until the head sees it: its
    // entrypoint stops (it would run on unmetered), saying why, and the GPUs come back.
    let broke = account_key(&cluster, "broke");
    let args: Vec<&str> = ["job", "submit", "--no-wait", "--api-key", &broke]
        .into_iter()
        .chain(gpus)
        .chain(["--", "sleep", "600"])
        .collect();
    let id = cluster.ionet(&args).trim().to_string();
    wait_until("the unfunded entrypoint ends", Duration::from_secs(60), || {
        let details: serde_json::Value =
            serde_json::from_str(&cluster.ionet(&["job", "status", &id, "--json", "--api-key", &broke])).unwrap();
        details["status"] == "FAILED"
            && details["message"].as_str().is_some_and(|message| message.contains("cannot cover its leases"))
    });
    wait_until("its GPUs are free again", Duration::from_secs(30), || free_gpus(&cluster) == Some(4.0));

    // Under a price no A100 node asks: refused, naming the cheapest.
    let args: Vec<&str> =
        ["job", "submit", "--api-key", &key, "--gpus", "2", "--gpu-type", "A100-80GB", "--max-price", "1.0"]
            .into_iter()
            .chain(["--", "true"])
            .collect();
    let refused = cluster.ionet_fails(&args);
    assert!(refused.contains("asks at most $1.00 per GPU-hour") && refused.contains("asks $1.40"), "{refused}");
    drop(cluster);
}

/// A node's id (hex) by its `name` label, as `ionet status` lists it.
fn harness_node(cluster: &Cluster, name: &str) -> String {
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&cluster.ionet(&["status", "--json"])).unwrap();
    let node = nodes.iter().find(|node| node["labels"]["name"] == name).unwrap_or_else(|| panic!("no node {name}"));
    node["node_id"].as_str().unwrap().to_string()
}

/// Bad submissions get a clear error naming what and why; nothing runs.
fn bad_submissions_are_refused_clearly() {
    let cluster = Cluster::start(&["--num-cpus", "1"]);
    let key = account_key(&cluster, "acme");
    let exe = entrypoint();
    let cases: [(&[&str], &str); 4] = [
        (&["--runtime-env-json", r#"{"colour": "blue"}"#], "unknown runtime_env key \"colour\""),
        (&["--runtime-env-json", r#"{"env_vars": {"A": 1}}"#], "must be a string"),
        (&["--submission-id", "../escape"], "is not valid"),
        (&["--entrypoint-num-gpus", "4"], "no node can run the entrypoint"),
    ];
    for (flags, expected) in cases {
        let args: Vec<&str> = ["job", "submit", "--api-key", &key]
            .iter()
            .copied()
            .chain(flags.iter().copied())
            .chain(["--", &exe])
            .collect();
        let refused = cluster.ionet_fails(&args);
        assert!(refused.contains(expected), "{flags:?}: {refused}");
    }
    // A working dir over the limit is refused before anything is sent.
    let huge = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(huge.path().join("weights.bin")).unwrap();
    file.set_len(ionet_common::jobs::MAX_PACKAGE_BYTES + 1).unwrap();
    let dir = huge.path().to_string_lossy().into_owned();
    let refused = cluster.ionet_fails(&["job", "submit", "--api-key", &key, "--working-dir", &dir, "--", &exe]);
    assert!(refused.contains("more than 100 MiB"), "{refused}");
    // A working dir named by a path the head never saw.
    let unknown = r#"{"working_dir": "gcs://_ionet_pkg_0123456789abcdef.zip"}"#;
    let refused = cluster.ionet_fails(&["job", "submit", "--api-key", &key, "--runtime-env-json", unknown, "--", &exe]);
    assert!(refused.contains("was not uploaded by account acme"), "{refused}");
    // A command that does not exist: the job fails, saying so.
    let missing = cluster.ionet_fails(&["job", "submit", "--api-key", &key, "--", "/no/such/program"]);
    assert!(missing.contains("FAILED") && missing.contains("exit code 127"), "{missing}");
    // Without a credential, or with a job's worth of nothing, the job server refuses.
    let anonymous = cluster.ionet_fails(&["job", "list", "--api-key", "not-a-credential"]);
    assert!(anonymous.contains("401"), "{anonymous}");
    drop(cluster);
}

fn main() {
    ionet::testing::run_worker_if_requested();
    if let Ok(mode) = std::env::var(SUBMITTED_DRIVER_ENV) {
        submitted_driver(&mode);
        std::process::exit(0);
    }
    if let Ok(working_dir) = std::env::var(INIT_DRIVER_ENV) {
        init_driver(&working_dir);
        std::process::exit(0);
    }
    harness::run(
        &[
            (
                "a_submitted_job_runs_on_the_cluster_and_its_output_comes_back",
                a_submitted_job_runs_on_the_cluster_and_its_output_comes_back,
            ),
            ("a_stopped_job_ends_with_its_workers", a_stopped_job_ends_with_its_workers),
            (
                "a_rust_binary_shipped_in_the_working_dir_runs_its_tasks_on_the_nodes",
                a_rust_binary_shipped_in_the_working_dir_runs_its_tasks_on_the_nodes,
            ),
            ("bad_submissions_are_refused_clearly", bad_submissions_are_refused_clearly),
            ("a_rust_drivers_runtime_env_reaches_its_tasks", a_rust_drivers_runtime_env_reaches_its_tasks),
            (
                "gpus_and_a_price_place_the_entrypoint_on_the_cheapest_node",
                gpus_and_a_price_place_the_entrypoint_on_the_cheapest_node,
            ),
        ],
        Duration::from_secs(180),
    );
}
