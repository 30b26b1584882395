//! The state API's object commands: `ionet list objects`, `ionet summary objects` and
//! `ionet memory`, over the head's `Gcs/ListObjects` (asked now of every live node and
//! running driver: who holds which object, where, how large, why it is alive). A tenant's
//! API key sees its account's objects, the operator's credential all.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use clap::Args;
use ionet_common::rpc::proto::gcs::{ListObjectsReply, ListObjectsRequest};
use ionet_common::JobId;
use serde_json::Value;

use crate::cli::HeadArgs;

#[derive(Debug, Args, Clone)]
pub struct ObjectFilterArgs {
    /// Only this job's holders (hex id, e.g. 00000001).
    #[arg(long)]
    pub job: Option<String>,
    /// Only rows whose field has this value (`--filter reference_type=LOCAL_REFERENCE`;
    /// fields as `--json` names them; repeatable).
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
    /// The most rows (largest objects first).
    #[arg(long, default_value_t = 10_000)]
    pub limit: u32,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ListObjectsArgs {
    #[command(flatten)]
    pub filter: ObjectFilterArgs,
    /// Print JSON (Ray's `list_objects` fields) for scripts.
    #[arg(long)]
    pub json: bool,
}

fn fetch(filter: &ObjectFilterArgs) -> Result<(ListObjectsReply, Vec<Value>)> {
    let job_id = match &filter.job {
        Some(job) => job.parse::<JobId>()?.to_vec(),
        None => Vec::new(),
    };
    let request = ListObjectsRequest { job_id, limit: filter.limit };
    let reply =
        crate::commands::ask_head(
            &filter.head,
            |mut gcs| async move { Ok(gcs.list_objects(request).await?.into_inner()) },
        )?;
    // Checked against a row's fields even when no row came (a misspelt field is refused).
    let template = ionet_gcs::objects::object_json(&Default::default());
    let rows = reply.objects.iter().map(ionet_gcs::objects::object_json).collect();
    let rows = crate::state_commands::filter_rows(rows, &filter.filters, Some(&template))?;
    Ok((reply, rows))
}

/// What was not seen (a line for stderr).
fn gaps(reply: &ListObjectsReply) -> Option<String> {
    let mut notes = Vec::new();
    if reply.unanswered > 0 {
        notes.push(format!("{} nodes or processes did not answer in time", reply.unanswered));
    }
    if reply.truncated {
        notes.push("more rows than the limit: the largest are shown (raise --limit)".into());
    }
    (!notes.is_empty()).then(|| format!("note: {}", notes.join("; ")))
}

/// Bytes for people: `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn short(value: &Value, length: usize) -> String {
    let text = value.as_str().unwrap_or("-");
    text[..length.min(text.len())].to_string()
}

/// `ionet list objects`: one line per holder of an object (or JSON), largest first.
pub fn list_objects(args: ListObjectsArgs) -> Result<()> {
    let (reply, rows) = fetch(&args.filter)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        writeln!(
            out,
            "{:<16} {:>10} {:<18} {:<7} {:>7} {:<8} {:<8} {:<8}",
            "OBJECT", "SIZE", "REFERENCE", "HOLDER", "PID", "NODE", "JOB", "STATUS"
        )?;
        for row in &rows {
            writeln!(
                out,
                "{:<16} {:>10} {:<18} {:<7} {:>7} {:<8} {:<8} {:<8}",
                short(&row["object_id"], 16),
                human_bytes(row["object_size"].as_u64().unwrap_or(0)),
                row["reference_type"].as_str().unwrap_or("-"),
                row["type"].as_str().unwrap_or("-"),
                row["pid"].as_u64().map_or("-".into(), |pid| pid.to_string()),
                short(&row["node_id"], 8),
                short(&row["job_id"], 8),
                row["task_status"].as_str().unwrap_or("-"),
            )?;
        }
        writeln!(out, "{} rows", rows.len())?;
    }
    if let Some(note) = gaps(&reply) {
        eprintln!("{note}");
    }
    Ok(())
}

/// `ionet summary objects`: rows and bytes by why the objects are alive.
pub fn summary_objects(filter: ObjectFilterArgs) -> Result<()> {
    let (reply, rows) = fetch(&filter)?;
    let mut by_reason: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for row in &rows {
        let entry = by_reason.entry(row["reference_type"].as_str().unwrap_or("-").to_string()).or_default();
        entry.0 += 1;
        entry.1 += row["object_size"].as_u64().unwrap_or(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<20} {:>8} {:>12}", "REFERENCE", "ROWS", "BYTES")?;
    for (reason, (count, bytes)) in &by_reason {
        writeln!(out, "{reason:<20} {count:>8} {:>12}", human_bytes(*bytes))?;
    }
    let distinct: std::collections::BTreeSet<&str> = rows.iter().filter_map(|row| row["object_id"].as_str()).collect();
    writeln!(out, "{} objects, {} holders", distinct.len(), rows.len())?;
    if let Some(note) = gaps(&reply) {
        eprintln!("{note}");
    }
    Ok(())
}

/// `ionet memory`: Ray's `ray memory`, by node: each holder of each object (who, which
/// process, why alive, how large, where stored), then the totals.
pub fn memory(filter: ObjectFilterArgs) -> Result<()> {
    let (reply, rows) = fetch(&filter)?;
    let mut by_node: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for row in &rows {
        by_node.entry(row["node_id"].as_str().unwrap_or("-").to_string()).or_default().push(row);
    }
    let mut out = std::io::stdout().lock();
    let mut stored: BTreeMap<&str, u64> = BTreeMap::new();
    for (node, rows) in &by_node {
        let ip = rows.iter().find_map(|row| row["ip"].as_str()).unwrap_or("-");
        writeln!(out, "--- node {} ({ip}) ---", &node[..8.min(node.len())])?;
        writeln!(
            out,
            "{:<8} {:>7} {:<7} {:<18} {:>10} {:<9} {:<16} WHERE",
            "JOB", "PID", "HOLDER", "REFERENCE", "SIZE", "STATUS", "OBJECT"
        )?;
        for row in rows {
            let stores: Vec<String> = row["store_node_ids"]
                .as_array()
                .map(|ids| ids.iter().map(|id| short(id, 8)).collect())
                .unwrap_or_default();
            let mut place = if stores.is_empty() { "in the holder".to_string() } else { stores.join(",") };
            if row["spilled"].as_bool() == Some(true) {
                place.push_str(" (spilled)");
            }
            writeln!(
                out,
                "{:<8} {:>7} {:<7} {:<18} {:>10} {:<9} {:<16} {place}",
                short(&row["job_id"], 8),
                row["pid"].as_u64().map_or("-".into(), |pid| pid.to_string()),
                row["type"].as_str().unwrap_or("-"),
                row["reference_type"].as_str().unwrap_or("-"),
                human_bytes(row["object_size"].as_u64().unwrap_or(0)),
                row["task_status"].as_str().unwrap_or("-"),
                short(&row["object_id"], 16),
            )?;
            if let Some(id) = row["object_id"].as_str() {
                stored.insert(id, row["object_size"].as_u64().unwrap_or(0));
            }
        }
    }
    writeln!(
        out,
        "{} objects ({}) held by {} references",
        stored.len(),
        human_bytes(stored.values().sum()),
        rows.len()
    )?;
    if let Some(note) = gaps(&reply) {
        eprintln!("{note}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
    }
}
