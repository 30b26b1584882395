//! The head's HTTP server: Ray's Jobs REST API (default port 8265), so `ionet job …`,
//! `ionet.job_submission.JobSubmissionClient` and Ray's own `ray job submit` and
//! `JobSubmissionClient` pointed at an ionet head all work; Prometheus's `/metrics`
//! ([`crate::metrics`]) and node daemons' metrics, discovered and scraped through the head
//! ([`crate::node_scrape`]); and the dashboard
//! ([`crate::dashboard`]: its page, open to anyone since it holds no data, and its data
//! routes, each credential shown its own part).
//!
//! Same rules as every endpoint of the cluster: TLS whenever the head speaks TLS (its
//! certificate, offering `http/1.1`); every request carries a credential the head issued
//! (`Authorization: Bearer …`, Ray's `headers=` argument) and passes the route's row of
//! [`ionet_common::authz::HTTP_TABLE`] before its handler runs (401 without a valid
//! credential, 403 naming the right it lacks). Every job-server route but the version
//! takes an account's API key (or the operator's credential); a tenant sees its own
//! account's submissions only (another's look absent, 404), and a job's or a submission's
//! credential, which providers' nodes hold, reads none (their environments may hold
//! secrets).
//!
//! Routes and shapes are Ray's (Jobs API version 4), with the WebSocket of `GET
//! /api/jobs/{id}/logs/tail` (what `ray job submit` and `ionet job logs --follow` follow a
//! job's output with: text messages as the output grows, closed once the job ended and
//! all of it was sent). Additions: `GET /api/jobs/{id}/logs?offset=N` returns the output
//! from byte `N` and the `offset` to ask from next (following without a WebSocket); job
//! details carry ionet's `account` and
//! `job_ids` beside Ray's fields (Ray's client ignores them); deleting a running job is
//! a 400, not Ray's 500; a submit naming a field this server does not know is refused
//! unless the field is null.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ionet_common::authz::{Authorizer, Principal};
use ionet_common::IonetError;

use crate::metrics::{HeadMetrics, View};
use crate::submissions::{Submissions, SubmitRequest};
use ionet_common::jobs::MAX_PACKAGE_BYTES;

/// Ray's Jobs API version this server speaks, and the Ray version it answers as (Ray's
/// clients check it before using newer fields).
const JOBS_API_VERSION: &str = "4";
const RAY_COMPATIBLE_VERSION: &str = "2.45.0";

#[derive(Clone)]
struct Served {
    submissions: Arc<Submissions>,
    metrics: Arc<HeadMetrics>,
    authorizer: Arc<Authorizer>,
}

/// The head's HTTP routes (the job server's and `/metrics`), behind the authorization table.
pub fn router(submissions: Arc<Submissions>, metrics: Arc<HeadMetrics>, authorizer: Authorizer) -> Router {
    let served = Served { submissions, metrics, authorizer: Arc::new(authorizer) };
    let dashboard = crate::dashboard::router(served.metrics.clone(), served.authorizer.clone());
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/api/prometheus/targets", get(prometheus_targets))
        .route("/api/nodes/{node_id}/metrics", get(node_metrics))
        .route("/api/version", get(version))
        .route("/api/jobs/", get(list).post(submit))
        .route("/api/jobs", get(list).post(submit))
        .route("/api/jobs/{submission_id}", get(details).delete(remove))
        .route("/api/jobs/{submission_id}/stop", post(stop))
        .route("/api/jobs/{submission_id}/logs", get(logs))
        .route("/api/jobs/{submission_id}/logs/tail", get(tail_logs))
        .route(
            "/api/packages/{protocol}/{package_name}",
            get(package_exists)
                .put(upload_package)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_PACKAGE_BYTES as usize + 1)),
        )
        .route_layer(middleware::from_fn_with_state(served.authorizer.clone(), crate::http::authorize))
        .with_state(served)
        .merge(dashboard)
}

/// An error as the job server answers it: a status and what went wrong.
struct Failure(StatusCode, String);

impl From<IonetError> for Failure {
    fn from(error: IonetError) -> Self {
        let status = match &error {
            IonetError::InvalidArgument(_) | IonetError::AlreadyExists(_) | IonetError::FailedPrecondition(_) => {
                StatusCode::BAD_REQUEST
            }
            IonetError::NotFound(_) => StatusCode::NOT_FOUND,
            IonetError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            IonetError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            IonetError::Unavailable(_) | IonetError::ResourceExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, error.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

type Answer = Result<Response, Failure>;

fn principal(headers: &axum::http::Extensions) -> Result<Principal, Failure> {
    headers
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Failure(StatusCode::FORBIDDEN, "the request did not pass authorization".into()))
}

/// Prometheus metrics, as much of them as the caller's credential may see.
async fn metrics_text(State(served): State<Served>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    let view = View::of(&principal)
        .ok_or_else(|| Failure(StatusCode::FORBIDDEN, format!("{principal} may not read the metrics")))?;
    let text = served.metrics.render(&view).await.map_err(IonetError::from)?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// Prometheus's HTTP service discovery: every live node daemon, scraped through this
/// head at the address the scraper reached it by (`crate::node_scrape`), with its node's
/// id, GPU model and whether it is the head's (what `GetAllNodes` shows anyone holding a
/// credential).
async fn prometheus_targets(State(served): State<Served>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    if View::of(&principal).is_none() {
        return Err(Failure(StatusCode::FORBIDDEN, format!("{principal} may not read the metrics' targets")));
    }
    // The targets are this head, as the scraper reached it: a host and port, nothing else.
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .and_then(|host| host.parse::<axum::http::uri::Authority>().ok())
        .filter(|host| !host.as_str().contains('@'))
        .ok_or_else(|| {
            Failure(StatusCode::BAD_REQUEST, "the request names no host:port: the targets are this head".into())
        })?;
    let host = host.as_str();
    Ok(Json(serde_json::Value::Array(served.metrics.node_scrape().targets(host))).into_response())
}

/// A node daemon's metrics, fetched now by the head with a credential minted for that
/// node alone: for the operator and the scrapers' tokens (a node reads its own daemon
/// directly: no provider makes the head fetch).
async fn node_metrics(State(served): State<Served>, Path(node_id): Path<String>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    if !matches!(principal, Principal::Admin | Principal::Metrics | Principal::NodeMetrics) {
        let why =
            format!("{principal} may not read node {node_id}'s metrics through the head: the operator or a scraper");
        return Err(Failure(StatusCode::FORBIDDEN, why));
    }
    let node = node_id
        .parse::<ionet_common::NodeId>()
        .map_err(|err| Failure(StatusCode::BAD_REQUEST, format!("{node_id:?} is no node id: {err}")))?;
    let text = served.metrics.node_scrape().fetch(&node).await.map_err(|(status, why)| Failure(status, why))?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "version": JOBS_API_VERSION,
        "ray_version": RAY_COMPATIBLE_VERSION,
        "ray_commit": format!("ionet-{}", env!("CARGO_PKG_VERSION")),
        "session_name": "ionet",
    }))
}

async fn submit(State(served): State<Served>, request: Request) -> Answer {
    // An account's key (the table): the operator's submissions are paid by `default`, as
    // its drivers' jobs are.
    let account = crate::packages::own_account(&principal(request.extensions())?)?;
    let body = axum::body::to_bytes(request.into_body(), MAX_SUBMIT_BYTES)
        .await
        .map_err(|err| Failure(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body: {err}")))?;
    let submit = SubmitRequest::parse(&body)?;
    let id = served.submissions.submit(&account, submit).await?;
    Ok(Json(serde_json::json!({ "job_id": id, "submission_id": id })).into_response())
}

/// The largest submit request (a runtime environment names packages, it does not carry them).
const MAX_SUBMIT_BYTES: usize = 1024 * 1024;

async fn list(State(served): State<Served>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    let details: Vec<serde_json::Value> = served
        .submissions
        .list(&principal)
        .iter()
        .map(|record| record.details(&served.submissions.jobs_of(&record.submission_id)))
        .collect();
    Ok(Json(details).into_response())
}

async fn details(State(served): State<Served>, Path(id): Path<String>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    let record = served.submissions.get(&principal, &id)?;
    Ok(Json(record.details(&served.submissions.jobs_of(&id))).into_response())
}

async fn stop(State(served): State<Served>, Path(id): Path<String>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    let stopped = served.submissions.stop(&principal, &id).await?;
    Ok(Json(serde_json::json!({ "stopped": stopped })).into_response())
}

async fn remove(State(served): State<Served>, Path(id): Path<String>, request: Request) -> Answer {
    let principal = principal(request.extensions())?;
    let deleted = served.submissions.delete(&principal, &id).await?;
    Ok(Json(serde_json::json!({ "deleted": deleted })).into_response())
}

async fn logs(
    State(served): State<Served>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Answer {
    let principal = principal(request.extensions())?;
    match query.get("offset") {
        // Ray's shape: the whole output.
        None => {
            let (logs, _) = served.submissions.logs(&principal, &id, 0).await?;
            Ok(Json(serde_json::json!({ "logs": logs })).into_response())
        }
        Some(offset) => {
            let offset: u64 = offset
                .parse()
                .map_err(|_| Failure(StatusCode::BAD_REQUEST, format!("offset {offset:?} is not a byte count")))?;
            let (logs, next) = served.submissions.logs(&principal, &id, offset).await?;
            Ok(Json(serde_json::json!({ "logs": logs, "offset": next })).into_response())
        }
    }
}

/// How often a followed job's output is read while nothing new came.
const TAIL_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// The most output one WebSocket message carries (Ray's client takes up to 4 MiB).
const TAIL_CHUNK: u64 = 1024 * 1024;

/// Ray's `logs/tail`: a WebSocket carrying the job's output as it grows (a submission
/// that is unknown, or another account's, is a 404 before the upgrade).
async fn tail_logs(
    State(served): State<Served>,
    Path(id): Path<String>,
    axum::Extension(principal): axum::Extension<Principal>,
    upgrade: WebSocketUpgrade,
) -> Answer {
    served.submissions.get(&principal, &id)?;
    Ok(upgrade.on_upgrade(move |socket| follow(served, principal, id, socket)).into_response())
}

/// Sends submission `id`'s output on `socket` from the start, in messages of at most
/// [`TAIL_CHUNK`] bytes, until the job ended and everything it wrote went; then closes
/// with code 1000 ("normal": all of it came), or 1011 when it could not go on (the
/// submission deleted meanwhile, its output unreadable). Stops when the client leaves.
async fn follow(served: Served, principal: Principal, id: String, mut socket: WebSocket) {
    use axum::extract::ws::{close_code, CloseFrame};
    let mut offset = 0;
    let failure = loop {
        // The status first: output read after the job ended is all of it.
        let ended = match served.submissions.get(&principal, &id) {
            Ok(record) => record.status.is_terminal(),
            Err(err) => break Some(format!("submission {id}: {err}")),
        };
        let (logs, next) = match served.submissions.logs_up_to(&principal, &id, offset, TAIL_CHUNK).await {
            Ok(read) => read,
            Err(err) => break Some(format!("reading submission {id}'s output: {err}")),
        };
        if !logs.is_empty() {
            if socket.send(Message::Text(logs.into())).await.is_err() {
                return;
            }
        } else if ended {
            break None;
        }
        let caught_up = next - offset < TAIL_CHUNK;
        offset = next;
        // Caught up: wait for more output, unless the client closes meanwhile (what it
        // sends otherwise is ignored).
        let pause = tokio::time::sleep(TAIL_POLL);
        tokio::pin!(pause);
        while caught_up {
            tokio::select! {
                _ = &mut pause => break,
                received = socket.recv() => match received {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    };
    // A close frame with its code: Ray's client takes one without it for a broken connection.
    let frame = match failure {
        None => CloseFrame { code: close_code::NORMAL, reason: "".into() },
        Some(why) => {
            tracing::warn!(submission = %id, "stopped following a job's output: {why}");
            // A close frame's reason is at most 123 bytes.
            let mut end = why.len().min(120);
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            CloseFrame { code: close_code::ERROR, reason: why[..end].into() }
        }
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// Packages live under Ray's `gcs` protocol (what its clients name them with).
fn checked_protocol(protocol: &str) -> Result<(), Failure> {
    if protocol == "gcs" {
        Ok(())
    } else {
        Err(Failure(StatusCode::BAD_REQUEST, format!("packages are uploaded under gcs://, not {protocol}://")))
    }
}

async fn package_exists(
    State(served): State<Served>,
    Path((protocol, name)): Path<(String, String)>,
    request: Request,
) -> Answer {
    checked_protocol(&protocol)?;
    let account = crate::packages::own_account(&principal(request.extensions())?)?;
    if served.submissions.packages().exists(&account, &name)? {
        Ok(StatusCode::OK.into_response())
    } else {
        Err(Failure(StatusCode::NOT_FOUND, format!("package {name} was not uploaded by account {account}")))
    }
}

async fn upload_package(
    State(served): State<Served>,
    Path((protocol, name)): Path<(String, String)>,
    request: Request,
) -> Answer {
    checked_protocol(&protocol)?;
    let account = crate::packages::own_account(&principal(request.extensions())?)?;
    let body = axum::body::to_bytes(request.into_body(), MAX_PACKAGE_BYTES as usize).await.map_err(|_| {
        Failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "package {name} is larger than {} MiB, the most a package may be: leave large files out \
                 (excludes) and fetch them in the job",
                MAX_PACKAGE_BYTES / (1024 * 1024)
            ),
        )
    })?;
    served.submissions.packages().put(&account, &name, body).await?;
    Ok(StatusCode::OK.into_response())
}
