//! `ionet quote` against a live cluster: the cheapest free GPUs first, exact hourly and
//! total prices, the saving against list price, region and price filters, and a refusal
//! that says what is short (exit code 1).

mod common;

use std::collections::BTreeMap;

use common::TestCluster;
use serde_json::Value;

const LIST_MODEL: &str = "A100-80GB";

/// A head (no GPUs) and three A100-80GB providers; returns node ids by name.
fn cluster() -> (TestCluster, BTreeMap<&'static str, String>) {
    let mut cluster = TestCluster::start(&[]);
    let mut pids = Vec::new();
    for (name, gpus, price, region) in
        [("eu-1.20", "4", "1.20", "eu"), ("us-0.90", "4", "0.90", "us"), ("eu-2.50", "2", "2.50", "eu")]
    {
        let index = cluster.add_node(&[
            "--num-gpus",
            gpus,
            "--gpu-type",
            LIST_MODEL,
            "--price-per-gpu-hour",
            price,
            "--labels",
            &format!("region={region}"),
            "--wallet",
            &format!("wallet-{name}"),
        ]);
        pids.push((name, cluster.nodes[index].id()));
    }
    let status = cluster.status_json();
    let ids = pids
        .into_iter()
        .map(|(name, pid)| {
            let node = status.as_array().unwrap().iter().find(|node| node["pid"] == pid).expect("node listed");
            (name, node["node_id"].as_str().unwrap().to_string())
        })
        .collect();
    (cluster, ids)
}

fn quote_json(cluster: &TestCluster, args: &[&str]) -> Value {
    let stdout = cluster.ionet_ok(&[&["quote"], args, &["--json"]].concat());
    serde_json::from_str(&stdout).expect("quote --json prints JSON")
}

/// (node id, GPUs, price in micro-USD) per placement.
fn placements(quote: &Value) -> Vec<(String, u64, u64)> {
    quote["placements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node_id"].as_str().unwrap().to_string(),
                p["gpus"].as_u64().unwrap(),
                p["price_per_gpu_hour_micros"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn quote_fills_the_cheapest_nodes_and_prices_exactly() {
    let (cluster, ids) = cluster();
    let quote = quote_json(&cluster, &["--gpus", "6", "--gpu-type", LIST_MODEL, "--hours", "24"]);
    assert_eq!(
        placements(&quote),
        vec![(ids["us-0.90"].clone(), 4, 900_000), (ids["eu-1.20"].clone(), 2, 1_200_000)],
        "{quote:#}"
    );
    assert!(quote["placements"][0]["address"].as_str().unwrap().starts_with("127.0.0.1:"), "{quote:#}");
    // 4 × $0.90 + 2 × $1.20 = $6.00/h; × 24 h = $144.00.
    assert_eq!(quote["hourly_micros"], 6_000_000);
    assert_eq!(quote["total_micros"], 144_000_000);
    assert_eq!(quote["hourly"], "6.00");
    assert_eq!(quote["total"], "144.00");
    // The saving is the list price of the same 6 GPUs for 24 h, less the total.
    let list = quote["list_prices"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["model"], LIST_MODEL);
    let list_per_gpu_hour = list[0]["per_gpu_hour_micros"].as_u64().unwrap();
    assert_eq!(quote["list_hourly_micros"].as_u64().unwrap(), 6 * list_per_gpu_hour);
    let list_total = 24 * 6 * list_per_gpu_hour;
    assert_eq!(quote["list_total_micros"].as_u64().unwrap(), list_total);
    assert_eq!(quote["saving_micros"].as_i64().unwrap(), list_total as i64 - 144_000_000);
    let percent = quote["saving_percent"].as_f64().unwrap();
    let expected = (list_total as f64 - 144e6) / list_total as f64 * 100.0;
    assert!((percent - expected).abs() < 0.06, "{percent} vs {expected}");

    // The same question for people.
    let text = cluster.ionet_ok(&["quote", "--gpus", "6", "--gpu-type", LIST_MODEL, "--hours", "24"]);
    assert!(text.contains("$6.00/h, $144.00 in total"), "{text}");
    assert!(text.contains(&ids["us-0.90"][..8]) && text.contains("saving: $"), "{text}");

    // In region eu: all of the $1.20 node, then 2 of the $2.50 node.
    let quote = quote_json(&cluster, &["--gpus", "6", "--gpu-type", LIST_MODEL, "--hours", "24", "--region", "eu"]);
    assert_eq!(
        placements(&quote),
        vec![(ids["eu-1.20"].clone(), 4, 1_200_000), (ids["eu-2.50"].clone(), 2, 2_500_000)],
        "{quote:#}"
    );
    assert_eq!(quote["hourly_micros"], 9_800_000);
    assert_eq!(quote["total_micros"], 24 * 9_800_000u64);

    // The memory filter keeps 80 GB GPUs.
    let quote = quote_json(&cluster, &["--gpus", "2", "--min-gpu-memory", "40GB"]);
    assert_eq!(placements(&quote), vec![(ids["us-0.90"].clone(), 2, 900_000)]);
}

#[test]
fn quote_refusal_says_what_is_short() {
    let (cluster, _) = cluster();
    let stderr =
        cluster.ionet_err(&["quote", "--gpus", "6", "--gpu-type", LIST_MODEL, "--max-price", "1.0", "--hours", "24"]);
    assert!(
        stderr.contains(
            "asked for 6 A100-80GB GPUs at most $1.00/GPU-h; the cluster has 4 available that match \
             (6 more are available above $1.00/GPU-h)"
        ),
        "{stderr}"
    );
    let stderr = cluster.ionet_err(&["quote", "--gpus", "11", "--gpu-type", LIST_MODEL]);
    assert!(stderr.contains("the cluster has 10 available that match"), "{stderr}");
    let stderr = cluster.ionet_err(&["quote", "--gpus", "1", "--max-price", "cheap"]);
    assert!(stderr.contains("--max-price \"cheap\""), "{stderr}");
}

#[test]
fn quote_ranked_per_tflop_puts_the_cheapest_work_first_not_the_cheapest_gpu() {
    let mut cluster = TestCluster::start(&[]);
    for (model, price) in [("T4", "0.35"), ("A100-80GB", "0.60"), ("H100", "2.10")] {
        cluster.add_node(&["--num-gpus", "4", "--gpu-type", model, "--price-per-gpu-hour", price]);
    }
    let models = |quote: &Value| -> Vec<String> {
        quote["placements"].as_array().unwrap().iter().map(|p| p["accelerator_type"].as_str().unwrap().into()).collect()
    };
    // By price the T4 is cheapest; per TFLOP-hour (simulated GPUs: their models' published
    // FP32 figures, 8.1, 19.5 and 67) the A100 ($0.0308) beats the H100 ($0.0313) and the
    // T4 ($0.0432).
    assert_eq!(models(&quote_json(&cluster, &["--gpus", "4"])), ["T4"]);
    let ranked = quote_json(&cluster, &["--gpus", "12", "--rank", "per-tflop"]);
    assert_eq!(models(&ranked), ["A100-80GB", "H100", "T4"], "{ranked:#}");
    assert_eq!(ranked["rank"], "per-tflop");
    assert_eq!(ranked["placements"][0]["gpu_tflops"], 19.5);
    assert_eq!(ranked["placements"][0]["price_per_tflop_hour_micros"], 30_769);
    let text = cluster.ionet_ok(&["quote", "--gpus", "4", "--rank", "per-tflop"]);
    assert!(text.contains("USD/TFLOP-H") && text.contains("0.0308"), "{text}");
    let refused = cluster.ionet(&["quote", "--gpus", "4", "--rank", "fastest"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("invalid value 'fastest'"), "{stderr}");
}
