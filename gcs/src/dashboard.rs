//! The head's dashboard: one page (`GET /`, no data in it, so anyone may load it) whose
//! script reads the data routes with the visitor's credential and refreshes them every
//! few seconds; served by the head's HTTP server beside the job server, so it needs no
//! front-end server of its own.
//!
//! Data routes (JSON; each credential shown what [`View`] lets it see, as `/metrics`):
//! - `GET /api/v0/nodes`: every node with its GPUs (model, total, free), CPUs, price,
//!   state and heartbeat age; what it earned, to the operator and the node itself.
//! - `GET /api/v0/jobs`: the jobs the caller's account pays for (the operator: all), each
//!   with its cost and fee so far, leases running and tasks by state; and its
//!   submissions.
//! - `GET /api/v0/tasks?job_id=&state=&name=&limit=`: task rows (state, node, why one
//!   waits, error), at most 1,000.
//! - `GET /api/v0/actors`: the actors of the accounts the caller sees: class, name,
//!   state, node, restarts, why one died.
//! - `GET /api/v0/placement_groups`: the groups of the accounts the caller sees: state,
//!   strategy, each bundle's node and resources, why one waits.
//! - `GET /api/v0/objects?job_id=&limit=`: who holds which object of the caller's
//!   account (the operator: all), asked now of the nodes and drivers
//!   ([`crate::objects`]); at most 1,000 rows, largest first.
//! - `GET /api/v0/market`: the marketplace: credits of the payers the caller sees, what
//!   each job spent, providers' nodes' earnings (the operator's or a node's own), fees
//!   (the operator's), and the live price and free GPUs per model (anyone).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ionet_common::authz::Authorizer;
use ionet_common::resources::{ResourceSet, CPU, GPU};
use ionet_common::rpc::proto::common::{JobState, NodeState};
use ionet_common::rpc::proto::gcs::TaskState;
use ionet_common::{IonetError, JobId, NodeId};
use serde_json::{json, Value};

use crate::metrics::{HeadMetrics, View};

/// The page: markup, style and script in one file, compiled into the binary.
const PAGE: &str = include_str!("dashboard.html");
/// The most task rows one answer carries.
const MAX_TASK_ROWS: usize = 1_000;

/// The dashboard's routes, behind the authorization table.
pub fn router(metrics: Arc<HeadMetrics>, authorizer: Arc<Authorizer>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/v0/nodes", get(nodes))
        .route("/api/v0/jobs", get(jobs))
        .route("/api/v0/tasks", get(tasks))
        .route("/api/v0/market", get(market))
        .route("/api/v0/actors", get(actors))
        .route("/api/v0/placement_groups", get(placement_groups))
        .route("/api/v0/objects", get(objects))
        .route_layer(axum::middleware::from_fn_with_state(authorizer, crate::http::authorize))
        .with_state(metrics)
}

async fn page() -> Response {
    // The page's script reads the credential from the address's fragment, which never
    // reaches a server. Only the page's own script runs (its nonce is new each time, so
    // markup a slip let through runs nothing); nothing may frame the page.
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let policy = format!(
        "default-src 'self'; script-src 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; img-src data:; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    );
    let Ok(policy) = axum::http::HeaderValue::from_str(&policy) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "the page's policy is not a header").into_response();
    };
    let headers = [
        (axum::http::header::CONTENT_SECURITY_POLICY, policy),
        (axum::http::header::REFERRER_POLICY, axum::http::HeaderValue::from_static("no-referrer")),
        (axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store")),
    ];
    (headers, Html(PAGE.replacen("<script>", &format!("<script nonce=\"{nonce}\">"), 1))).into_response()
}

fn view_of(request: &Request) -> Result<View, Response> {
    let principal = crate::http::principal(request.extensions())
        .ok_or_else(|| (StatusCode::FORBIDDEN, "the request did not pass authorization").into_response())?;
    View::of(&principal)
        .ok_or_else(|| (StatusCode::FORBIDDEN, format!("{principal} may not read the dashboard")).into_response())
}

fn usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

fn quantity(set: &ResourceSet, name: &str) -> f64 {
    set.get(name).as_f64()
}

fn failure(error: IonetError) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
}

async fn nodes(State(metrics): State<Arc<HeadMetrics>>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let earned = match metrics.usage_totals(&view).await {
        Ok(totals) => {
            let mut earned: BTreeMap<NodeId, u64> = BTreeMap::new();
            for ((node, _wallet), micros) in totals.by_node {
                *earned.entry(node).or_default() += micros;
            }
            earned
        }
        Err(err) => return failure(err.into()),
    };
    let now = metrics.state().now_ms();
    let mut rows = Vec::new();
    for node in metrics.state().nodes(true) {
        let Ok(id) = NodeId::from_bytes(&node.node_id) else { continue };
        let total = node.total.clone().unwrap_or_default().to_set().unwrap_or_default();
        let available = node.available.clone().unwrap_or_default().to_set().unwrap_or_default();
        let alive = node.state != NodeState::Dead as i32;
        let state = match NodeState::try_from(node.state) {
            Ok(NodeState::Alive) => "ALIVE",
            Ok(NodeState::Draining) => "DRAINING",
            Ok(NodeState::Dead) => "DEAD",
            _ => "UNKNOWN",
        };
        let host = node.address.rsplit_once("://").map_or(node.address.as_str(), |(_, rest)| rest);
        rows.push(json!({
            "node_id": id.hex(),
            "state": state,
            "is_head": node.is_head,
            "address": host,
            "gpu_type": node.gpus.first().map_or(node.accelerator_type.clone(), |gpu| gpu.model.clone()),
            "gpus_total": quantity(&total, GPU),
            "gpus_available": if alive { quantity(&available, GPU) } else { 0.0 },
            "cpus_total": quantity(&total, CPU),
            "cpus_available": if alive { quantity(&available, CPU) } else { 0.0 },
            "price_per_gpu_hour": usd(node.price_per_gpu_hour_micros),
            "price_per_cpu_hour": usd(node.price_per_cpu_hour_micros),
            "heartbeat_age_s": if alive { now.saturating_sub(node.last_heartbeat_ms) as f64 / 1e3 } else { 0.0 },
            "death_cause": node.death_cause,
            "earned_usd": earned.get(&id).map(|micros| usd(*micros)),
            "gpu_check": gpu_check_words(&node),
            "gpu_tflops": ionet_common::gpu_proof::gpu_tflops_milli(&node) as f64 / 1000.0,
            "gpu_tflops_measured": ionet_common::gpu_proof::tflops_measured(&node),
            "reliability": f64::from(ionet_common::reliability::listed_score_bps(&node))
                / f64::from(ionet_common::reliability::FULL),
        }));
    }
    Json(json!({ "nodes": rows })).into_response()
}

/// The head's check of a node's GPUs, in words: `passed`, `passed (simulated)`,
/// `pending`, `overdue`, `failed: why`, `untrusted: why`, or empty for a node without GPUs.
fn gpu_check_words(node: &ionet_common::rpc::proto::common::NodeInfo) -> String {
    let Some(check) = &node.gpu_check else { return String::new() };
    match ionet_common::gpu_proof::state_name(check) {
        "none" => String::new(),
        "failed" => format!("failed: {}", check.reason),
        "untrusted" => format!("untrusted: {}", ionet_common::gpu_proof::held_back_because(check)),
        state if check.simulated => format!("{state} (simulated)"),
        state => state.to_string(),
    }
}

async fn jobs(State(metrics): State<Arc<HeadMetrics>>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let sees = |account: &str| view.sees_account(account);
    let totals = match metrics.usage_totals(&view).await {
        Ok(totals) => totals,
        Err(err) => return failure(err.into()),
    };
    let bills: BTreeMap<JobId, crate::metrics::JobBill> =
        totals.by_job.into_iter().map(|((job, _), bill)| (job, bill)).collect();
    let counts = metrics.tasks().job_counts(sees);
    let mut rows = Vec::new();
    for job in metrics.state().jobs() {
        let account = crate::metrics::payer(&job.payer_account);
        let Ok(id) = JobId::from_bytes(&job.job_id) else { continue };
        if !sees(&account) {
            continue;
        }
        let bill = bills.get(&id).copied().unwrap_or_default();
        let by_state = counts.get(&job.job_id).copied().unwrap_or_default();
        let tasks: serde_json::Map<String, Value> = by_state
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(state, count)| (crate::task_events::state_name(state as i32).to_string(), json!(count)))
            .collect();
        rows.push(json!({
            "job_id": id.hex(),
            "state": if job.state == JobState::Finished as i32 { "FINISHED" } else { "RUNNING" },
            "account": account,
            "submission_id": job.submission_id,
            "entrypoint": job.entrypoint,
            "start_time_ms": job.start_time_ms,
            "end_time_ms": job.end_time_ms,
            "cost_usd": usd(bill.cost),
            "fee_usd": usd(bill.fee),
            "running_leases": bill.leases,
            "tasks": tasks,
        }));
    }
    let submissions: Vec<Value> = metrics
        .submissions()
        .list(&ionet_common::authz::Principal::Admin)
        .into_iter()
        .filter(|submission| sees(&submission.account))
        .map(|submission| {
            json!({
                "submission_id": submission.submission_id,
                "account": submission.account,
                "status": crate::metrics::submission_status(submission.status),
                "message": submission.message,
                "entrypoint": submission.entrypoint,
                "start_time_ms": submission.start_time,
                "end_time_ms": submission.end_time,
            })
        })
        .collect();
    Json(json!({ "jobs": rows, "submissions": submissions })).into_response()
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TaskQuery {
    job_id: Option<String>,
    state: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
}

async fn tasks(State(metrics): State<Arc<HeadMetrics>>, query: Query<TaskQuery>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let job = match query.job_id.as_deref().filter(|job| !job.is_empty()) {
        Some(text) => match text.parse::<JobId>() {
            Ok(job) => job.to_vec(),
            Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
        },
        None => Vec::new(),
    };
    let state = match query.state.as_deref().filter(|state| !state.is_empty()) {
        Some(text) => match TaskState::from_str_name(&text.to_ascii_uppercase()) {
            Some(state) if state != TaskState::Unspecified => state,
            _ => return (StatusCode::BAD_REQUEST, format!("{text:?} is no task state")).into_response(),
        },
        None => TaskState::Unspecified,
    };
    let limit = query.limit.unwrap_or(MAX_TASK_ROWS).min(MAX_TASK_ROWS);
    let listing = metrics.tasks().list(
        |account| view.sees_account(account),
        &job,
        state,
        query.name.as_deref().unwrap_or(""),
        limit,
    );
    let hex_or_empty = |bytes: &[u8]| if bytes.is_empty() { String::new() } else { hex::encode(bytes) };
    let rows: Vec<Value> = listing
        .rows
        .iter()
        .map(|row| {
            json!({
                "task_id": hex::encode(&row.task_id),
                "job_id": hex::encode(&row.job_id),
                "name": row.name,
                "state": crate::task_events::state_name(row.state),
                "type": ionet_common::task_event_batch::task_type(&row.task_id, &row.actor_id),
                "actor_id": hex_or_empty(&row.actor_id),
                "attempt": row.attempt,
                "node_id": hex_or_empty(&row.node_id),
                "worker_address": row.worker_address,
                "error_message": row.error,
                "reason": row.reason,
                "submitted_ms": row.submitted_us / 1000,
                "start_time_ms": row.started_us / 1000,
                "end_time_ms": row.ended_us / 1000,
            })
        })
        .collect();
    Json(json!({
        "total": listing.total,
        "tasks": rows,
        "dropped_events": listing.dropped_events,
        "forgotten_tasks": listing.forgotten_tasks,
    }))
    .into_response()
}

async fn actors(State(metrics): State<Arc<HeadMetrics>>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let rows = visible_rows(&metrics, &view, metrics.actors().list(true), "an actor's", |actor| {
        (actor.spec.as_ref().map(|spec| spec.job_id.clone()).unwrap_or_default(), crate::actors::actor_json(actor))
    });
    Json(json!({ "actors": rows })).into_response()
}

/// The rows of `items` whose job's payer `view` sees, each with that account; `row`
/// gives an item's job id and its row (one unreadable item costs its own row only).
fn visible_rows<T>(
    metrics: &HeadMetrics,
    view: &View,
    items: Vec<T>,
    what: &str,
    row: impl Fn(&T) -> (Vec<u8>, Result<Value, IonetError>),
) -> Vec<Value> {
    let mut rows = Vec::new();
    for item in &items {
        let (job, shown) = row(item);
        let account =
            JobId::from_bytes(&job).map(|job| metrics.state().payer_of(&job)).unwrap_or_else(|_| "default".into());
        if !view.sees_account(&account) {
            continue;
        }
        match shown {
            Ok(mut shown) => {
                shown["account"] = json!(account);
                rows.push(shown);
            }
            Err(err) => tracing::warn!(error = %err, "{what} row could not be shown"),
        }
    }
    rows
}

async fn placement_groups(State(metrics): State<Arc<HeadMetrics>>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let rows = visible_rows(&metrics, &view, metrics.placement_groups().list(), "a placement group's", |group| {
        (group.job_id.clone(), crate::placement_groups::group_json(group))
    });
    Json(json!({ "placement_groups": rows })).into_response()
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ObjectQuery {
    job_id: Option<String>,
    limit: Option<usize>,
}

async fn objects(State(metrics): State<Arc<HeadMetrics>>, query: Query<ObjectQuery>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let job = match query.job_id.as_deref().filter(|job| !job.is_empty()) {
        Some(text) => match text.parse::<JobId>() {
            Ok(job) => Some(job),
            Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
        },
        None => None,
    };
    // Objects are private: a node's or a job's view has none to see.
    let scope = match view {
        View::All => crate::objects::Scope::All,
        View::Account(account) => crate::objects::Scope::Account(account),
        View::Node(_) | View::Public => {
            return Json(json!({ "objects": [], "unanswered": 0, "truncated": false })).into_response();
        }
    };
    let limit = query.limit.unwrap_or(MAX_TASK_ROWS).min(MAX_TASK_ROWS);
    let reply = metrics.objects().list(&scope, job, limit).await;
    let rows: Vec<Value> = reply.objects.iter().map(crate::objects::object_json).collect();
    Json(json!({ "objects": rows, "unanswered": reply.unanswered, "truncated": reply.truncated })).into_response()
}

async fn market(State(metrics): State<Arc<HeadMetrics>>, request: Request) -> Response {
    let view = match view_of(&request) {
        Ok(view) => view,
        Err(refused) => return refused,
    };
    let totals = match metrics.usage_totals(&view).await {
        Ok(totals) => totals,
        Err(err) => return failure(err.into()),
    };
    let balances = match metrics.metering().balances().await {
        Ok(balances) => balances,
        Err(err) => return failure(err.into()),
    };
    let credits: Vec<Value> = balances
        .iter()
        .filter_map(|(account, balance)| match account {
            ionet_settlement::Account::Payer(name) if view.sees_account(name) => {
                Some(json!({ "account": name, "balance_usd": *balance as f64 / 1e6 }))
            }
            _ => None,
        })
        .collect();
    let mut spend: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for ((_, account), bill) in &totals.by_job {
        let entry = spend.entry(account.clone()).or_default();
        entry.0 = entry.0.saturating_add(bill.cost);
        entry.1 = entry.1.saturating_add(bill.fee);
    }
    let spend: Vec<Value> = spend
        .into_iter()
        .map(|(account, (cost, fee))| json!({ "account": account, "cost_usd": usd(cost), "fee_usd": usd(fee) }))
        .collect();
    let providers: Vec<Value> = totals
        .by_node
        .iter()
        .map(|((node, wallet), earned)| json!({ "node_id": node.hex(), "wallet": wallet, "earned_usd": usd(*earned) }))
        .collect();
    // The live quote: per GPU model, the cheapest price asked and the GPUs free now.
    let mut models: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
    for node in metrics.state().nodes(false) {
        // What a tenant can rent now: nodes taking work, not draining.
        if node.no_workloads || node.state != NodeState::Alive as i32 || ionet_common::gpu_proof::held_back(&node) {
            continue;
        }
        let Some(gpu) = node.gpus.first() else { continue };
        let total = node.total.clone().unwrap_or_default().to_set().unwrap_or_default();
        let available = node.available.clone().unwrap_or_default().to_set().unwrap_or_default();
        let entry = models.entry(gpu.model.clone()).or_insert((f64::MAX, 0.0, 0.0));
        entry.0 = entry.0.min(usd(node.price_per_gpu_hour_micros));
        entry.1 += quantity(&available, GPU);
        entry.2 += quantity(&total, GPU);
    }
    let quote: Vec<Value> = models
        .into_iter()
        .map(|(model, (cheapest, free, total))| {
            json!({ "gpu_type": model, "cheapest_per_gpu_hour": cheapest, "gpus_free": free, "gpus_total": total })
        })
        .collect();
    let view_name = match &view {
        View::All => "operator",
        View::Account(_) => "account",
        View::Node(_) => "node",
        View::Public => "public",
    };
    Json(json!({
        "view": view_name,
        "credits": credits,
        "spend": spend,
        "providers": providers,
        "fees_usd": (view == View::All).then(|| usd(totals.fees)),
        "quote": quote,
    }))
    .into_response()
}
