//! How long the dashboard's overview takes the head to answer with a cluster of 100 nodes
//! and 10,000 tasks recorded: the page, then the three data routes its script asks at
//! once (`/api/v0/nodes`, `/api/v0/jobs`, `/api/v0/tasks?state=FAILED&limit=5`), as the
//! operator sees them. A real head in this process, over HTTP on loopback.
//!
//!   cargo bench -p ionet-benches --bench dashboard -- [--nodes 100] [--tasks 10000] [--rounds 30]

use std::time::{Duration, Instant};

use ionet::config::ClusterConfig;
use ionet::rpc::proto::common::{GpuInfo, NodeInfo, WorkerCommand};
use ionet::rpc::proto::gcs::{AddJobRequest, AddTaskEventsRequest, TaskState};
use ionet::{NodeId, Quantity, ResourceSet};
use ionet_common::task_event_batch::{BatchBuilder, Event};
use ionet_gcs::{GcsServer, GcsServerOptions};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|at| args.get(at + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], share: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * share).round() as usize]
}

#[tokio::main]
async fn main() {
    let (nodes, tasks, rounds) = (arg("--nodes", 100), arg("--tasks", 10_000), arg("--rounds", 30) as usize);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = GcsServer::start(GcsServerOptions::new(ClusterConfig::default()), listener).await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", server.serve_jobs(http, &server.address().to_string()).unwrap());

    // The cluster: nodes of 8 priced GPUs each.
    for index in 0..nodes {
        let total = ResourceSet::new().with("GPU", Quantity::whole(8)).with("CPU", Quantity::whole(64));
        let node = NodeInfo {
            node_id: NodeId::random().to_vec(),
            address: format!("127.0.0.{}:{}", 2 + index / 200, 7000 + index),
            total: Some((&total).into()),
            available: Some((&total).into()),
            gpus: (0..8).map(|gpu| GpuInfo { index: gpu, model: "A100-80GB".into(), memory_bytes: 80 << 30 }).collect(),
            price_per_gpu_hour_micros: 1_200_000,
            public_key: vec![7; 32],
            ..Default::default()
        };
        server.state().register_node(node).await.unwrap();
    }
    // The work: one job's tasks, most finished, some failed, running and waiting.
    let admin = server.admin_credential(Duration::from_secs(3600));
    let mut gcs = ionet::rpc::gcs_client(&server.address().to_string(), &admin).await.unwrap();
    let request = AddJobRequest {
        worker_command: Some(WorkerCommand { argv: vec!["/bin/true".into()], ..Default::default() }),
        ..Default::default()
    };
    let started = gcs.add_job(request).await.unwrap().into_inner();
    let job_id = started.job.unwrap().job_id;
    let job = ionet::auth::Bearer::new(&started.job_credential).unwrap();
    let mut job_gcs = ionet::rpc::gcs_client(&server.address().to_string(), &job).await.unwrap();
    let states = [TaskState::Finished, TaskState::Finished, TaskState::Finished, TaskState::Failed, TaskState::Running];
    let names: Vec<String> = (0..20).map(|n| format!("step_{n}")).collect();
    let mut sent = 0u64;
    while sent < tasks {
        let mut batch = BatchBuilder::new(&job_id);
        for n in sent..tasks.min(sent + 10_000) {
            let mut task_id = [0u8; ionet::TaskId::LEN];
            task_id[..8].copy_from_slice(&n.to_le_bytes());
            let state = states[(n % states.len() as u64) as usize];
            batch.push(&Event {
                task_id: &task_id,
                name: &names[(n % 20) as usize],
                state,
                time_us: 1_000_000 + n,
                error: if state == TaskState::Failed { "ValueError: the loss is NaN" } else { "" },
                run_us: 1_000,
                ..Default::default()
            });
        }
        sent = tasks.min(sent + 10_000);
        let request = AddTaskEventsRequest { events: Some(batch.finish()), dropped: 0 };
        job_gcs.add_task_events(request).await.unwrap();
    }

    let client = reqwest::Client::new();
    let get = |path: &'static str| {
        let (client, url, credential) = (client.clone(), format!("{base}{path}"), admin.as_str().to_string());
        async move {
            let response = client.get(url).bearer_auth(credential).send().await.unwrap();
            assert!(response.status().is_success(), "{path}: {}", response.status());
            response.bytes().await.unwrap().len()
        }
    };
    let mut page_times = Vec::with_capacity(rounds);
    let mut data_times = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        get("/").await;
        page_times.push(started.elapsed());
        let started = Instant::now();
        let (a, b, c) =
            tokio::join!(get("/api/v0/nodes"), get("/api/v0/jobs"), get("/api/v0/tasks?state=FAILED&limit=5"));
        data_times.push(started.elapsed());
        bytes = a + b + c;
    }
    page_times.sort();
    data_times.sort();
    println!("dashboard overview, {nodes} nodes and {tasks} tasks recorded, {rounds} rounds:");
    println!(
        "  page:             median {:>7.2} ms   p95 {:>7.2} ms",
        percentile(&page_times, 0.5).as_secs_f64() * 1e3,
        percentile(&page_times, 0.95).as_secs_f64() * 1e3
    );
    println!(
        "  its data (3 at once, {bytes} bytes): median {:>7.2} ms   p95 {:>7.2} ms",
        percentile(&data_times, 0.5).as_secs_f64() * 1e3,
        percentile(&data_times, 0.95).as_secs_f64() * 1e3
    );
    server.shutdown().await;
}
