//! How long the dashboard's overview takes with a cluster of 100 nodes and 10,000 tasks
//! recorded. First the head's side: the page, then the three data routes its script asks at
//! once (`/api/v0/nodes`, `/api/v0/jobs`, `/api/v0/tasks?state=FAILED&limit=5`). Then the
//! operator's: a real browser (headless Chromium, driven over its DevTools protocol) opening
//! the overview afresh each round, timed from the start of the navigation to the first page
//! with the cluster's data on screen (the page's own `ionet-first-render` mark; target
//! < 300 ms). A real head in this process, over HTTP on loopback; without a `chromium` on
//! the PATH the browser's part is skipped, saying so.
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
    let listener = ionet_common::rpc::listen("127.0.0.1", 0).await.unwrap();
    let server = GcsServer::start(GcsServerOptions::new(ClusterConfig::default()), listener).await.unwrap();
    let http = ionet_common::rpc::listen("127.0.0.1", 0).await.unwrap();
    let base = format!("http://{}", server.serve_jobs(http, &server.address().to_string()).unwrap());

    // The cluster: nodes of 8 priced GPUs each.
    for index in 0..nodes {
        let total = ResourceSet::new().with("GPU", Quantity::whole(8)).with("CPU", Quantity::whole(64));
        let node = NodeInfo {
            node_id: NodeId::random().to_vec(),
            address: format!("127.0.0.{}:{}", 2 + index / 200, 7000 + index),
            total: Some((&total).into()),
            available: Some((&total).into()),
            gpus: (0..8)
                .map(|gpu| GpuInfo { index: gpu, model: "A100-80GB".into(), memory_bytes: 80 << 30, simulated: true })
                .collect(),
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
    let measured = browser_first_render(&format!("{base}/#/&key={}", admin.as_str()), rounds).await;
    server.shutdown().await;
    match measured {
        Ok(Some(mut renders)) => {
            renders.sort();
            println!(
                "  in Chromium, navigation to first render: median {:>7.2} ms   p95 {:>7.2} ms",
                percentile(&renders, 0.5).as_secs_f64() * 1e3,
                percentile(&renders, 0.95).as_secs_f64() * 1e3
            );
        }
        Ok(None) => println!("  in Chromium: not measured: no chromium on the PATH (python/test.sh installs Debian's)"),
        Err(why) => {
            eprintln!("  in Chromium: the overview did not render: {why}");
            std::process::exit(1);
        }
    }
}

/// Each round's time from the start of a navigation to the overview with its data on screen,
/// as headless Chromium renders it: the browser is started once (a fresh profile), and each
/// round leaves the page for `about:blank` and opens `url` again, then waits (in the page,
/// without polling it from here) for the time the page records
/// (`document.body.dataset.firstRenderMs`, from `performance.now()`). `None`: no Chromium.
async fn browser_first_render(url: &str, rounds: usize) -> Result<Option<Vec<Duration>>, String> {
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncBufReadExt;
    use tokio_tungstenite::tungstenite::Message;

    let Some(chromium) = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("chromium")).find(|file| file.is_file()))
    else {
        return Ok(None);
    };
    let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
    // As root in a container Chromium runs only without its own sandbox.
    let mut browser = tokio::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0", "--window-size=1280,1000"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting chromium: {e}"))?;
    // It says where its DevTools listen on its standard error.
    let mut lines = tokio::io::BufReader::new(browser.stderr.take().expect("piped")).lines();
    let listening = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(at) = line.strip_prefix("DevTools listening on ws://") {
                return at.split('/').next().map(str::to_string);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or("chromium did not say where its DevTools listen")?;
    // Keep reading its standard error so that it never blocks writing it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    // Its first page may be listed a moment after it says it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        let targets: serde_json::Value = reqwest::get(format!("http://{listening}/json/list"))
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let page = targets
            .as_array()
            .and_then(|all| all.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .map(str::to_string);
        match page {
            Some(page) => break page,
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            None => return Err("chromium has no page to drive".into()),
        }
    };
    let stream = tokio::net::TcpStream::connect(&listening).await.map_err(|e| e.to_string())?;
    let (mut socket, _) = tokio_tungstenite::client_async(page.as_str(), stream).await.map_err(|e| e.to_string())?;

    // One DevTools command, answered by the reply with its id (events between are skipped).
    let mut next_id = 0u64;
    let mut call = async |method: &str, params: serde_json::Value| -> Result<serde_json::Value, String> {
        next_id += 1;
        let id = next_id;
        let command = serde_json::json!({ "id": id, "method": method, "params": params });
        socket.send(Message::text(command.to_string())).await.map_err(|e| e.to_string())?;
        while let Some(message) = socket.next().await {
            let Message::Text(text) = message.map_err(|e| e.to_string())? else { continue };
            let reply: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if reply["id"] == id {
                return match reply.get("error") {
                    Some(error) => Err(format!("{method}: {error}")),
                    None => Ok(reply["result"].clone()),
                };
            }
        }
        Err("chromium closed its DevTools connection".into())
    };

    // Resolves, in the page, once it recorded its first render (watching the attribute).
    let first_render = serde_json::json!({
        "expression": r#"new Promise((resolve) => {
            const read = () => document.body && document.body.dataset.firstRenderMs;
            if (read()) return resolve(read());
            new MutationObserver((_, observer) => {
                if (read()) { observer.disconnect(); resolve(read()); }
            }).observe(document, { attributes: true, childList: true, subtree: true });
        })"#,
        "awaitPromise": true,
        "returnByValue": true,
        "timeout": 30_000,
    });
    let mut renders = Vec::with_capacity(rounds);
    for round in 0..rounds {
        call("Page.navigate", serde_json::json!({ "url": "about:blank" })).await?;
        call("Page.navigate", serde_json::json!({ "url": url })).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Asked of the old document, the promise dies with it: asked again, of the new.
            let answer = call("Runtime.evaluate", first_render.clone()).await;
            let ms = answer.as_ref().ok().and_then(|result| result["result"]["value"].as_str()?.parse::<u64>().ok());
            if let Some(ms) = ms {
                renders.push(Duration::from_millis(ms));
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("round {round}: no first render within 30 s ({answer:?})"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(Some(renders))
}
