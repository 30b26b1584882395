//! `ionet status`: the node table as a person or a script reads it.

use ionet_common::resources::{self, format_usd, ResourceSet};
use ionet_common::rpc::proto::common::{NodeInfo, NodeState};
use ionet_common::IonetResult;
use ionet_common::{gpu_proof, reliability};
use serde_json::{json, Value};

fn state_name(state: i32) -> &'static str {
    match NodeState::try_from(state).unwrap_or(NodeState::Unspecified) {
        NodeState::Alive => "ALIVE",
        NodeState::Draining => "DRAINING",
        NodeState::Dead => "DEAD",
        NodeState::Unspecified => "UNKNOWN",
    }
}

fn resource_map(set: &ResourceSet) -> Value {
    Value::Object(set.iter().map(|(name, quantity)| (name.to_string(), json!(quantity.as_f64()))).collect())
}

fn sets(node: &NodeInfo) -> IonetResult<(ResourceSet, ResourceSet)> {
    let total = node.total.clone().unwrap_or_default().to_set()?;
    let available = node.available.clone().unwrap_or_default().to_set()?;
    Ok((total, available))
}

/// One JSON object per node; resource quantities as numbers, as Ray prints them.
pub fn nodes_json(nodes: &[NodeInfo], now_ms: u64) -> IonetResult<Value> {
    Ok(Value::Array(node_rows(nodes, now_ms)?))
}

/// Each node as a row of [`nodes_json`].
pub fn node_rows(nodes: &[NodeInfo], now_ms: u64) -> IonetResult<Vec<Value>> {
    let mut rows = Vec::with_capacity(nodes.len());
    for node in nodes {
        let (total, available) = sets(node)?;
        let record = node.reliability.clone().unwrap_or_default();
        rows.push(json!({
            "node_id": hex::encode(&node.node_id),
            "address": node.address,
            "hostname": node.hostname,
            "state": state_name(node.state),
            "is_head": node.is_head,
            "resources_total": resource_map(&total),
            "resources_available": resource_map(&available),
            "gpus": node.gpus.iter().map(|gpu| json!({"index": gpu.index, "model": gpu.model, "memory_bytes": gpu.memory_bytes})).collect::<Vec<_>>(),
            "accelerator_type": node.accelerator_type,
            "price_per_gpu_hour": node.price_per_gpu_hour_micros as f64 / 1e6,
            "price_per_gpu_hour_micros": node.price_per_gpu_hour_micros,
            "wallet": node.wallet,
            "labels": node.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "pid": node.pid,
            "registered_at_ms": node.registered_at_ms,
            "last_heartbeat_ms": node.last_heartbeat_ms,
            "heartbeat_age_ms": now_ms.saturating_sub(node.last_heartbeat_ms),
            "death_cause": node.death_cause,
            "gpu_check": gpu_check_json(node),
            "gpu_tflops": gpu_proof::gpu_tflops_milli(node) as f64 / 1000.0,
            "gpu_tflops_measured": gpu_proof::tflops_measured(node),
            "reliability": f64::from(reliability::listed_score_bps(node)) / f64::from(reliability::FULL),
            "reliability_record": {
                "down_ms": record.down_ms,
                "leases": record.leases,
                "leases_lost": record.leases_lost,
            },
        }));
    }
    Ok(rows)
}

/// The head's check of the node's GPUs, as `ionet status --json` shows it.
fn gpu_check_json(node: &NodeInfo) -> Value {
    let check = node.gpu_check.clone().unwrap_or_default();
    json!({
        "state": ionet_common::gpu_proof::state_name(&check),
        "reason": check.reason,
        "simulated": check.simulated,
        "tflops": check.tflops,
        "bandwidth_gb_per_s": check.bandwidth_gb_per_s,
        "checked_at_ms": check.checked_at_ms,
        "passes": check.passes,
        "failures": check.failures,
        "took_ms": check.took_ms,
        "recent_failures_ms": check.recent_failures_ms,
        "untrusted_since_ms": check.untrusted_since_ms,
        "cleared_at_ms": check.cleared_at_ms,
        "held_back_because": ionet_common::gpu_proof::held_back_because(&check),
    })
}

/// Per-GPU FP32 TFLOPS: measured (`17.3`), published for the declared model
/// (`19.5 (published)`), or `-`.
fn tflops_cell(node: &NodeInfo) -> String {
    match gpu_proof::gpu_tflops_milli(node) {
        0 => "-".into(),
        milli if gpu_proof::tflops_measured(node) => format!("{:.1}", milli as f64 / 1000.0),
        milli => format!("{:.1} (published)", milli as f64 / 1000.0),
    }
}

/// The table's cell: `passed`, `passed (simulated)`, `pending`, `OVERDUE` (a lease put
/// its check off too long), `FAILED: why`, `UNTRUSTED: why`, or `-`.
fn gpu_check_cell(node: &NodeInfo) -> String {
    let check = node.gpu_check.clone().unwrap_or_default();
    match ionet_common::gpu_proof::state_name(&check) {
        "none" => "-".into(),
        "failed" => format!("FAILED: {}", check.reason),
        "overdue" => "OVERDUE: no new leases until its check runs".into(),
        "untrusted" => format!("UNTRUSTED: {}", ionet_common::gpu_proof::held_back_because(&check)),
        state if check.simulated => format!("{state} (simulated)"),
        state => state.to_string(),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.0}GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A fixed-width table, one line per node.
pub fn nodes_table(nodes: &[NodeInfo], now_ms: u64) -> IonetResult<String> {
    let header = [
        "NODE",
        "ADDRESS",
        "STATE",
        "CPU",
        "GPU",
        "GPU MODEL",
        "VRAM",
        "$/GPU-H",
        "TFLOPS",
        "RELIABILITY",
        "LABELS",
        "HEARTBEAT",
        "GPU CHECK",
    ];
    let mut rows: Vec<[String; 13]> = Vec::with_capacity(nodes.len());
    for node in nodes {
        let (total, available) = sets(node)?;
        let pair = |name: &str| format!("{}/{}", available.get(name), total.get(name));
        let vram = node.gpus.first().map(|gpu| gib(gpu.memory_bytes)).unwrap_or_else(|| "-".into());
        let labels: Vec<String> = {
            let mut labels: Vec<_> = node.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
            labels.sort();
            labels
        };
        let age = if node.state == NodeState::Dead as i32 {
            "-".to_string()
        } else {
            format!("{:.1}s", now_ms.saturating_sub(node.last_heartbeat_ms) as f64 / 1000.0)
        };
        let mut id = hex::encode(&node.node_id);
        id.truncate(8);
        if node.is_head {
            id.push_str(" (head)");
        }
        rows.push([
            id,
            node.address.clone(),
            state_name(node.state).to_string(),
            pair(resources::CPU),
            pair(resources::GPU),
            if node.accelerator_type.is_empty() { "-".into() } else { node.accelerator_type.clone() },
            vram,
            format_usd(node.price_per_gpu_hour_micros),
            tflops_cell(node),
            reliability::format(reliability::listed_score_bps(node)),
            if labels.is_empty() { "-".into() } else { labels.join(",") },
            age,
            gpu_check_cell(node),
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row.iter()) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    let alive = nodes.iter().filter(|node| node.state == NodeState::Alive as i32).count();
    out.push_str(&format!("{alive} alive of {} nodes\n", nodes.len()));
    Ok(out)
}

/// One JSON object per actor (Ray's `ray list actors` fields where they exist).
pub fn actors_json(actors: &[ionet_common::rpc::proto::gcs::ActorInfo]) -> IonetResult<Value> {
    Ok(Value::Array(actors.iter().map(ionet_gcs::actors::actor_json).collect::<IonetResult<_>>()?))
}

/// A fixed-width table, one line per actor.
pub fn actors_table(actors: &[ionet_common::rpc::proto::gcs::ActorInfo]) -> IonetResult<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<24} {:<16} {:<17} {:<10} {:>8} {:<20} CAUSE",
        "ACTOR", "CLASS", "NAME", "STATE", "NODE", "RESTARTS", "RESOURCES"
    );
    for actor in actors {
        let spec = actor.spec.clone().unwrap_or_default();
        let resources = spec.resources.clone().unwrap_or_default().to_set()?;
        let shown = if spec.display_class.is_empty() { &spec.class_name } else { &spec.display_class };
        let class = shown.rsplit("::").next().unwrap_or_default().to_string();
        let mut node = hex::encode(&actor.node_id);
        node.truncate(8);
        let mut id = hex::encode(&spec.actor_id);
        id.truncate(12);
        let _ = writeln!(
            out,
            "{:<12} {:<24} {:<16} {:<17} {:<10} {:>8} {:<20} {}",
            id,
            class,
            spec.name,
            ionet_gcs::actors::state_name(actor.state),
            node,
            actor.restarts,
            resources.to_string(),
            actor.death_cause
        );
    }
    Ok(out)
}
