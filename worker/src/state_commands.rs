//! The state API's commands: `ionet list tasks`, `ionet summary tasks` and `ionet
//! timeline`, over the head's `Gcs/ListTasks` (tasks as their owners reported them). A
//! tenant's API key sees its account's tasks, the operator's credential all.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use ionet_common::rpc::proto::gcs::{ListTasksReply, ListTasksRequest, TaskRow, TaskState};
use ionet_common::{IonetError, JobId};
use serde_json::{json, Value};

use crate::cli::HeadArgs;

#[derive(Debug, Args, Clone)]
pub struct TaskFilterArgs {
    /// Only this job's tasks (hex id, e.g. 00000001).
    #[arg(long)]
    pub job: Option<String>,
    /// Only tasks in this state: PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT, RUNNING,
    /// FINISHED or FAILED.
    #[arg(long)]
    pub state: Option<String>,
    /// Only tasks of this name (their function's, or the `name` option).
    #[arg(long)]
    pub name: Option<String>,
    /// Only tasks whose field has this value (`--filter node_id=…`; fields as `--json`
    /// names them, any case; repeatable).
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
    /// The most tasks listed (oldest first).
    #[arg(long, default_value_t = 10_000)]
    pub limit: u32,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ListTasksArgs {
    #[command(flatten)]
    pub filter: TaskFilterArgs,
    /// Print JSON (Ray's `list_tasks` fields) for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct TimelineArgs {
    #[command(flatten)]
    pub filter: TaskFilterArgs,
    /// Where to write the trace (Chrome trace JSON: open it in Perfetto or chrome://tracing).
    #[arg(short = 'o', long = "output", default_value = "timeline.json")]
    pub output: std::path::PathBuf,
}

/// Asks the head for the tasks `filter` names.
fn fetch(filter: &TaskFilterArgs) -> Result<ListTasksReply> {
    let job_id = match &filter.job {
        Some(job) => job.parse::<JobId>()?.to_vec(),
        None => Vec::new(),
    };
    let state = task_state_named(filter.state.as_deref())?;
    let request =
        ListTasksRequest { job_id, state, name: filter.name.clone().unwrap_or_default(), limit: filter.limit };
    let mut reply =
        crate::commands::ask_head(
            &filter.head,
            |mut gcs| async move { Ok(gcs.list_tasks(request).await?.into_inner()) },
        )?;
    if !filter.filters.is_empty() {
        let filters = parse_filters(&filter.filters)?;
        known_fields(&row_json(&TaskRow::default()), &filters)?;
        reply.tasks.retain(|row| passes(&row_json(row), &filters));
        // What the head matched is more than what passed here: the count shown is ours.
        reply.total = reply.tasks.len() as u64;
    }
    Ok(reply)
}

/// `key=value` filters, as the list commands take them.
fn parse_filters(filters: &[String]) -> Result<Vec<(String, String)>> {
    filters
        .iter()
        .map(|filter| match filter.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.trim().to_string())),
            _ => bail!("a filter is KEY=VALUE (e.g. state=FAILED), not {filter:?}"),
        })
        .collect()
}

/// Whether `row` has every field of `filters` with its value (strings in any case; a
/// missing or null field matches nothing).
fn passes(row: &Value, filters: &[(String, String)]) -> bool {
    filters.iter().all(|(key, wanted)| match &row[key.as_str()] {
        Value::Null => false,
        Value::String(text) => text.eq_ignore_ascii_case(wanted),
        other => other.to_string().eq_ignore_ascii_case(wanted),
    })
}

/// The rows of a listing that pass `filters` (`key=value`); a key the rows (or, when
/// there are none, `template`) do not have is refused, naming the fields there are.
pub fn filter_rows(rows: Vec<Value>, filters: &[String], template: Option<&Value>) -> Result<Vec<Value>> {
    let filters = parse_filters(filters)?;
    if let Some(fields) = rows.first().or(template) {
        known_fields(fields, &filters)?;
    }
    Ok(rows.into_iter().filter(|row| passes(row, &filters)).collect())
}

/// Refuses a filter on a field `row` does not have, naming those it has.
fn known_fields(row: &Value, filters: &[(String, String)]) -> Result<()> {
    let Value::Object(fields) = row else { return Ok(()) };
    if let Some((key, _)) = filters.iter().find(|(key, _)| !fields.contains_key(key)) {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        bail!("no field {key:?} to filter on: the fields are {}", names.join(", "));
    }
    Ok(())
}

/// The wire value of a task state named as Ray names it (any case); 0 (any) for none.
pub fn task_state_named(state: Option<&str>) -> Result<i32, IonetError> {
    let Some(state) = state else { return Ok(0) };
    match TaskState::from_str_name(&state.trim().to_ascii_uppercase()) {
        Some(known) if known != TaskState::Unspecified => Ok(known as i32),
        _ => Err(IonetError::InvalidArgument(format!(
            "{state:?} is no task state: PENDING_ARGS_AVAIL, PENDING_NODE_ASSIGNMENT, RUNNING, FINISHED, FAILED"
        ))),
    }
}

fn state_name(row: &TaskRow) -> &'static str {
    ionet_gcs::task_events::state_name(row.state)
}

/// A row as Ray's state API names its fields (plus ionet's worker address and reason).
pub fn row_json(row: &TaskRow) -> Value {
    let ms = |us: u64| if us == 0 { Value::Null } else { json!(us / 1000) };
    json!({
        "task_id": hex::encode(&row.task_id),
        "job_id": hex::encode(&row.job_id),
        "name": row.name,
        "func_or_class_name": row.name,
        "state": state_name(row),
        "type": ionet_common::task_event_batch::task_type(&row.task_id, &row.actor_id),
        "actor_id": (!row.actor_id.is_empty()).then(|| hex::encode(&row.actor_id)),
        "attempt_number": row.attempt,
        "node_id": (!row.node_id.is_empty()).then(|| hex::encode(&row.node_id)),
        "worker_address": (!row.worker_address.is_empty()).then(|| row.worker_address.clone()),
        "error_message": (!row.error.is_empty()).then(|| row.error.clone()),
        "pending_reason": (!row.reason.is_empty()).then(|| row.reason.clone()),
        "creation_time_ms": ms(row.submitted_us),
        "start_time_ms": ms(row.started_us),
        "end_time_ms": ms(row.ended_us),
    })
}

/// What was lost on the way, if anything (a line for stderr).
fn losses(reply: &ListTasksReply) -> Option<String> {
    (reply.dropped_events > 0 || reply.forgotten_tasks > 0).then(|| {
        format!(
            "note: {} task events were dropped on the way and {} old tasks forgotten by the head (its bound)",
            reply.dropped_events, reply.forgotten_tasks
        )
    })
}

/// `ionet list tasks`: one line per task (or JSON), oldest first.
pub fn list_tasks(args: ListTasksArgs) -> Result<()> {
    let reply = fetch(&args.filter)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let rows: Vec<Value> = reply.tasks.iter().map(row_json).collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        writeln!(
            out,
            "{:<16} {:<8} {:<24} {:<23} {:>7} {:<8} DETAIL",
            "TASK", "JOB", "NAME", "STATE", "ATTEMPT", "NODE"
        )?;
        for row in &reply.tasks {
            let node = if row.node_id.is_empty() {
                "-".to_string()
            } else {
                hex::encode(&row.node_id[..4.min(row.node_id.len())])
            };
            let detail =
                if !row.error.is_empty() { row.error.lines().next().unwrap_or_default() } else { row.reason.as_str() };
            writeln!(
                out,
                "{:<16} {:<8} {:<24} {:<23} {:>7} {:<8} {}",
                hex::encode(&row.task_id[..8.min(row.task_id.len())]),
                hex::encode(&row.job_id),
                row.name,
                state_name(row),
                row.attempt,
                node,
                detail
            )?;
        }
        writeln!(out, "{} of {} matching tasks shown", reply.tasks.len(), reply.total)?;
    }
    if let Some(note) = losses(&reply) {
        eprintln!("{note}");
    }
    Ok(())
}

/// `ionet summary tasks`: how many tasks of each name are in each state.
pub fn summary_tasks(filter: TaskFilterArgs) -> Result<()> {
    let reply = fetch(&filter)?;
    let mut counts: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
    for row in &reply.tasks {
        *counts.entry(row.name.as_str()).or_default().entry(state_name(row)).or_default() += 1;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<32} STATES", "NAME")?;
    for (name, states) in &counts {
        let states: Vec<String> = states.iter().map(|(state, count)| format!("{state}: {count}")).collect();
        writeln!(out, "{name:<32} {}", states.join(", "))?;
    }
    writeln!(out, "{} tasks", reply.tasks.len())?;
    if reply.total > reply.tasks.len() as u64 {
        eprintln!("note: {} tasks match; the first {} are summarised (raise --limit)", reply.total, reply.tasks.len());
    }
    if let Some(note) = losses(&reply) {
        eprintln!("{note}");
    }
    Ok(())
}

/// `ionet timeline -o FILE`: every task that ran, as a slice on its node (process) and
/// worker (thread), in Chrome's trace format.
pub fn timeline(args: TimelineArgs) -> Result<()> {
    let reply = fetch(&args.filter)?;
    let ran: Vec<&TaskRow> =
        reply.tasks.iter().filter(|row| row.started_us > 0 && row.ended_us >= row.started_us).collect();
    if ran.is_empty() && reply.total == 0 {
        bail!("no task matches: nothing to draw (see `ionet list tasks`)");
    }
    let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
    let mut workers: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = Vec::new();
    for row in &ran {
        let node = hex::encode(&row.node_id);
        let next = nodes.len() as u64 + 1;
        let pid = *nodes.entry(node).or_insert(next);
        let next = workers.len() as u64 + 1;
        let tid = *workers.entry(row.worker_address.clone()).or_insert(next);
        events.push(json!({
            "name": row.name,
            "cat": "task",
            "ph": "X",
            "ts": row.started_us,
            "dur": row.ended_us - row.started_us,
            "pid": pid,
            "tid": tid,
            "args": { "task_id": hex::encode(&row.task_id), "state": state_name(row), "attempt": row.attempt },
        }));
    }
    for (node, pid) in &nodes {
        let name = format!("node {}", &node[..8.min(node.len())]);
        events.push(json!({ "name": "process_name", "ph": "M", "pid": pid, "args": { "name": name } }));
    }
    let trace = json!({ "traceEvents": events, "displayTimeUnit": "ms" });
    std::fs::write(&args.output, serde_json::to_vec(&trace)?)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "{} task slices on {} nodes written to {} (open it in Perfetto)",
        ran.len(),
        nodes.len(),
        args.output.display()
    );
    if let Some(note) = losses(&reply) {
        eprintln!("{note}");
    }
    Ok(())
}
