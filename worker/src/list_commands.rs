//! `ionet list nodes|jobs|placement-groups`: the head's tables as rows with Ray's field
//! names (`--json` for scripts, `--filter key=value` on those fields), each credential
//! shown what the head shows it (every node to anyone; an account's own jobs and groups).

use std::io::Write;

use anyhow::Result;
use clap::Args;
use ionet_common::rpc::proto::common::{JobInfo, JobState};
use ionet_common::rpc::proto::gcs::{GetAllJobsRequest, GetAllNodesRequest, ListPlacementGroupsRequest};
use serde_json::{json, Value};

use crate::cli::HeadArgs;

#[derive(Debug, Args, Clone)]
pub struct ListArgs {
    /// Only rows whose field has this value (`--filter state=ALIVE`; fields as `--json`
    /// names them, any case; repeatable).
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

/// What to list.
#[derive(Clone, Copy, Debug)]
pub enum Table {
    Nodes,
    Jobs,
    PlacementGroups,
}

/// A job as Ray's `list_jobs` shows it (plus who pays and the submission that started it).
pub fn job_json(job: &JobInfo) -> Value {
    let finished = job.state == JobState::Finished as i32;
    json!({
        "job_id": hex::encode(&job.job_id),
        "type": if job.submission_id.is_empty() { "DRIVER" } else { "SUBMISSION" },
        "status": if finished { "FINISHED" } else { "RUNNING" },
        "account": if job.payer_account.is_empty() { "default" } else { job.payer_account.as_str() },
        "namespace": job.namespace,
        "entrypoint": job.entrypoint,
        "submission_id": job.submission_id,
        "driver_pid": job.driver_pid,
        "start_time": job.start_time_ms,
        "end_time": job.end_time_ms,
        "min_reliability": f64::from(job.min_reliability_bps) / f64::from(ionet_common::reliability::FULL),
    })
}

/// The rows of `table`, as the head shows them to `args`'s credential.
fn fetch(table: Table, args: &ListArgs) -> Result<Vec<Value>> {
    let rows = crate::commands::ask_head(&args.head, |mut gcs| async move {
        let rows = match table {
            Table::Nodes => {
                let nodes = gcs
                    .get_all_nodes(GetAllNodesRequest { include_dead: true, ..Default::default() })
                    .await?
                    .into_inner()
                    .nodes;
                crate::status::node_rows(&nodes, ionet_common::clock::now_ms())?
            }
            Table::Jobs => {
                gcs.get_all_jobs(GetAllJobsRequest {}).await?.into_inner().jobs.iter().map(job_json).collect()
            }
            Table::PlacementGroups => gcs
                .list_placement_groups(ListPlacementGroupsRequest {})
                .await?
                .into_inner()
                .groups
                .iter()
                .map(ionet_gcs::placement_groups::group_json)
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    })?;
    // With no row to read the fields from, an empty record's are the fields.
    let template = match table {
        Table::Nodes => {
            crate::status::node_rows(&[Default::default()], 0).ok().and_then(|rows| rows.into_iter().next())
        }
        Table::Jobs => Some(job_json(&JobInfo::default())),
        Table::PlacementGroups => ionet_gcs::placement_groups::group_json(&Default::default()).ok(),
    };
    crate::state_commands::filter_rows(rows, &args.filters, template.as_ref())
}

/// A field of a row as one cell of text (`-` for none; ids cut to 16 characters).
fn cell(row: &Value, field: &str) -> String {
    match &row[field] {
        Value::Null => "-".into(),
        Value::String(text) if field.ends_with("_id") && text.len() > 16 => text[..16].to_string(),
        Value::String(text) => text.clone(),
        Value::Array(items) => items.len().to_string(),
        other => other.to_string(),
    }
}

/// `ionet list nodes|jobs|placement-groups`.
pub fn list(table: Table, args: ListArgs) -> Result<()> {
    let rows = fetch(table, &args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(());
    }
    let columns: &[&str] = match table {
        Table::Nodes => &["node_id", "state", "address", "accelerator_type", "price_per_gpu_hour", "is_head"],
        Table::Jobs => &["job_id", "type", "status", "account", "driver_pid", "entrypoint"],
        Table::PlacementGroups => &["placement_group_id", "name", "state", "strategy", "creator_job_id", "bundles"],
    };
    let cells: Vec<Vec<String>> =
        rows.iter().map(|row| columns.iter().map(|field| cell(row, field)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(index, field)| cells.iter().map(|row| row[index].len()).chain([field.len()]).max().unwrap_or(0))
        .collect();
    let line = |texts: Vec<String>| -> String {
        texts.iter().zip(&widths).map(|(text, width)| format!("{text:<width$}")).collect::<Vec<_>>().join("  ")
    };
    writeln!(out, "{}", line(columns.iter().map(|field| field.to_ascii_uppercase()).collect()).trim_end())?;
    for row in cells {
        writeln!(out, "{}", line(row).trim_end())?;
    }
    writeln!(out, "{} rows", rows.len())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A misspelt field is refused even when the listing is empty: each table knows its
    /// fields from an empty record.
    #[test]
    fn each_table_knows_its_fields_without_a_row() {
        let node = crate::status::node_rows(&[Default::default()], 0).unwrap().remove(0);
        let group = ionet_gcs::placement_groups::group_json(&Default::default()).unwrap();
        for (template, field) in [(node, "state"), (job_json(&JobInfo::default()), "status"), (group, "strategy")] {
            let kept = crate::state_commands::filter_rows(Vec::new(), &[format!("{field}=x")], Some(&template));
            assert!(kept.unwrap().is_empty());
            let refused = crate::state_commands::filter_rows(Vec::new(), &["colour=red".into()], Some(&template));
            assert!(refused.unwrap_err().to_string().contains("no field \"colour\""));
        }
    }
}
