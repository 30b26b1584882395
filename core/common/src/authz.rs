//! Who may call what: the one authorization table, and the layer that enforces it in
//! front of every gRPC server (before any handler runs).
//!
//! A call's bearer header names its principal ([`Authorizer::authenticate`]): a credential
//! the head signed ([`crate::credential`]) names its role: the *admin* (the operator,
//! whose credential `ionet start --head` writes into the session directory, mode 0600,
//! and the head's own services calling out); a *joiner* (a join token: may register one
//! new node); a *node* (one node daemon, bound to its id and key at registration); an
//! *account* (a tenant's API key: it starts jobs); a *job* (one job of one account: its
//! driver and every worker it leases hold the job's credential, nothing broader). There is
//! no cluster-wide token.
//!
//! Scope, in three places:
//! - a row's [`Access`] says which principals may make the call at all;
//! - a server that belongs to one tenant (a driver's or worker's core worker) is built
//!   with its account ([`Authorizer::for_account`]): its [`Access::Tenant`] rows admit jobs
//!   of that account only, so a stranger's job can neither call its actors nor push tasks
//!   into it;
//! - a call that names a node, a job or an account is checked by its handler against the
//!   caller with [`Principal::may_act_for_node`], [`Principal::may_act_for_job`] and
//!   [`Principal::may_act_for_account`], so each acts only for itself.
//!
//! [`TABLE`] has one row per RPC of every service: its full gRPC path and who may make it.
//! A call whose path has no row is refused (a new RPC is closed until it gets one: the
//! test `every_rpc_of_every_service_has_a_row` reads the protocol files and fails on a
//! missing row). A refusal is `UNAUTHENTICATED` for a missing or bad credential and
//! `PERMISSION_DENIED` (naming the principal, the call and the right it lacks) for a
//! principal the table does not allow; both are logged with the peer's address, never
//! the credential, and nothing runs.
//!
//! The admitted call carries its [`Principal`] in its extensions, for handlers that check
//! scope.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use crate::credential::{Role, Verifier};
use crate::ids::{JobId, NodeId};

const AUTHORIZATION: &str = "authorization";
const BEARER: &[u8] = b"Bearer ";

/// Who a call speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// The operator (a credential with the admin role), or the head's own services.
    Admin,
    /// A machine holding a join token, not yet a node.
    Joiner,
    /// One node daemon (its node credential).
    Node(NodeId),
    /// A tenant account's API key: it starts jobs, paid by the account.
    Account(Arc<str>),
    /// One job of one account (the credential the head issued when the job started),
    /// held by its driver and its workers.
    Job { job: JobId, account: Arc<str> },
    /// The head's control plane calling a node daemon (bundles).
    Control,
    /// A submitted job's entrypoint (its node holds the credential): it starts jobs paid
    /// by `account` while submission `id` (the one the head gave `nonce`) runs.
    Submission { id: Arc<str>, nonce: Arc<str>, account: Arc<str> },
    /// A metrics scraper: reads `/metrics` as the operator sees it, nothing else.
    Metrics,
    /// A scraper of node daemons: reads their `/metrics` (the head's public face only).
    NodeMetrics,
    /// The head asking one node what its store and workers hold (`ionet memory`).
    Inspect(NodeId),
}

impl Principal {
    /// The principal of an admitted call (the layer put it there); a request that did not
    /// pass the layer (a handler called directly, in tests) has none and is refused.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Status::permission_denied("the call carries no principal (it did not pass authorization)"))
    }

    /// Whether this principal may act for `node`: the node itself, or the admin.
    pub fn may_act_for_node(&self, node: &NodeId) -> Result<(), Status> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Node(own) if own == node => Ok(()),
            other => Err(Status::permission_denied(format!("{other} may not act for node {}", node.short()))),
        }
    }

    /// Whether this principal may act on what belongs to `account` (a named actor another
    /// job of the same tenant created, as Ray's drivers of one team share them): a job of
    /// that account, or the admin.
    pub fn may_act_for_account(&self, account: &str) -> Result<(), Status> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Job { account: own, .. } if **own == *account => Ok(()),
            other => Err(Status::permission_denied(format!("{other} may not act for account {account}"))),
        }
    }

    /// Whether this principal may see what belongs to `account` (its jobs, actors, usage
    /// and balance): the admin, the account's key, or one of its jobs. Tenants never see
    /// each other's.
    pub fn sees_account(&self, account: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Account(own)
            | Principal::Job { account: own, .. }
            | Principal::Submission { account: own, .. } => **own == *account,
            Principal::Joiner
            | Principal::Node(_)
            | Principal::Control
            | Principal::Metrics
            | Principal::NodeMetrics
            | Principal::Inspect(_) => false,
        }
    }

    /// The account this principal acts for (the operator's is `default`, as its jobs'
    /// payer); `None` for the cluster's own principals.
    pub fn account(&self) -> Option<&str> {
        match self {
            Principal::Admin => Some("default"),
            Principal::Account(account) | Principal::Job { account, .. } | Principal::Submission { account, .. } => {
                Some(account)
            }
            Principal::Joiner
            | Principal::Node(_)
            | Principal::Control
            | Principal::Metrics
            | Principal::NodeMetrics
            | Principal::Inspect(_) => None,
        }
    }

    /// Whether this principal may act for `job`: the job itself, or the admin.
    pub fn may_act_for_job(&self, job: &JobId) -> Result<(), Status> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Job { job: own, .. } if own == job => Ok(()),
            other => Err(Status::permission_denied(format!("{other} may not act for job {job}"))),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Admin => f.write_str("admin"),
            Principal::Joiner => f.write_str("joining machine (join token)"),
            Principal::Node(node) => write!(f, "node {}", node.short()),
            Principal::Account(account) => write!(f, "account {account}"),
            Principal::Job { job, account } => write!(f, "job {job} (account {account})"),
            Principal::Control => f.write_str("the head's control plane"),
            Principal::Submission { id, account, .. } => write!(f, "submitted job {id} (account {account})"),
            Principal::Metrics => f.write_str("metrics scraper"),
            Principal::NodeMetrics => f.write_str("node metrics scraper"),
            Principal::Inspect(node) => write!(f, "the head reading node {}", node.short()),
        }
    }
}

/// Who may make a call (the admin may make every call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading the cluster's public face (its nodes, prices, totals): any node, account or
    /// job.
    Read,
    /// The admin only: money and the operator's controls.
    Admin,
    /// The head's own calls into node daemons (bundles): its control credential.
    Control,
    /// A node, for itself (its handler checks which).
    Node,
    /// Between node daemons (object transfers): any node.
    Peer,
    /// Registering a node: a joiner (a new node), a node (itself again).
    Register,
    /// Starting a job: an account's API key (its jobs are paid by it), or a submitted
    /// job's entrypoint (for that account, while it runs).
    StartJob,
    /// The head's job server (submitting, reading, stopping, deleting submissions, and
    /// packages): an account's API key (handlers keep each account to its own).
    Submit,
    /// A job's own calls (its handler checks which job, or the scope is its own by
    /// construction).
    Job,
    /// A job's objects on a node: its workers, and the peer nodes that copy or free them.
    JobOrPeer,
    /// A tenant's own process (a driver's or worker's core worker): a job of the account
    /// the server belongs to.
    Tenant,
    /// A tenant's own process, or a node daemon holding a lease it granted (asking for
    /// idle leases back).
    TenantOrNode,
    /// The metrics (`/metrics`): the scraper's credential and every node, account, job or
    /// submission credential, each shown its own part (the handler scopes it); on a node
    /// daemon, the head's fetch with a credential minted for that node (its handler
    /// checks which).
    Metrics,
    /// The head asking one node what it holds (`ionet memory`): a credential minted for
    /// that node alone (its handler checks which).
    Inspect,
    /// Anyone, with no credential at all: HTTP pages that hold no data (the dashboard's
    /// page, whose script asks the data routes with the visitor's credential). No RPC
    /// may have this row.
    Public,
}

impl Access {
    /// Whether `principal` has this right on a server belonging to `tenant` (`None`: a
    /// server of the cluster, not of one account).
    pub fn allows(self, principal: &Principal, tenant: Option<&str>) -> bool {
        let own_tenant = |account: &str| tenant == Some(account);
        match (self, principal) {
            (_, Principal::Admin) => true,
            (
                Access::Read,
                Principal::Node(_) | Principal::Account(_) | Principal::Job { .. } | Principal::Submission { .. },
            ) => true,
            (Access::Node | Access::Peer | Access::JobOrPeer | Access::Register, Principal::Node(_)) => true,
            (Access::Register, Principal::Joiner) => true,
            (Access::StartJob, Principal::Account(_) | Principal::Submission { .. }) => true,
            (Access::Submit, Principal::Account(_)) => true,
            (Access::Job | Access::JobOrPeer, Principal::Job { .. }) => true,
            (Access::Tenant | Access::TenantOrNode, Principal::Job { account, .. }) => own_tenant(account),
            (Access::TenantOrNode, Principal::Node(_)) => true,
            (Access::Control, Principal::Control) => true,
            (Access::Inspect, Principal::Inspect(_)) => true,
            (Access::Public, _) => true,
            (
                Access::Metrics,
                Principal::Metrics
                | Principal::NodeMetrics
                | Principal::Node(_)
                | Principal::Account(_)
                | Principal::Job { .. }
                | Principal::Submission { .. }
                | Principal::Inspect(_),
            ) => true,
            _ => false,
        }
    }

    fn right(self) -> &'static str {
        match self {
            Access::Read => "a node, account, job or submission credential",
            Access::Admin => "the admin role",
            Access::Control => "the head's control credential",
            Access::Node => "a node credential",
            Access::Peer => "a node credential (calls between nodes)",
            Access::Register => "a join token or a node credential",
            Access::StartJob => "an account's API key or a submitted job's credential",
            Access::Submit => "an account's API key",
            Access::Job => "a job's own credential",
            Access::JobOrPeer => "a job's own credential or a node credential",
            Access::Tenant => "a credential of a job of the account this process belongs to",
            Access::TenantOrNode => {
                "a credential of a job of the account this process belongs to, or a node credential"
            }
            Access::Metrics => {
                "a metrics, node-metrics, node, account, job or submission credential (on a node daemon, \
                 the head's read of that node)"
            }
            Access::Inspect => "the head's ask of this node (an inspect credential)",
            Access::Public => "nothing",
        }
    }
}

/// One row: a call, and who may make it.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// The gRPC path, `/<package>.<Service>/<Method>`.
    pub path: &'static str,
    pub access: Access,
}

const fn row(path: &'static str, access: Access) -> Rule {
    Rule { path, access }
}

/// Every RPC of every service, and who may call it.
pub const TABLE: &[Rule] = &[
    // The control store (head).
    row("/ionet.gcs.Gcs/RegisterNode", Access::Register),
    row("/ionet.gcs.Gcs/Heartbeat", Access::Node),
    row("/ionet.gcs.Gcs/HeartbeatStream", Access::Node),
    row("/ionet.gcs.Gcs/StartGpuCheck", Access::Node),
    row("/ionet.gcs.Gcs/CommitGpuCheck", Access::Node),
    row("/ionet.gcs.Gcs/RevealGpuCheck", Access::Node),
    // Trusting a node again after repeated failed checks is the operator's word alone.
    row("/ionet.gcs.Gcs/ClearUntrusted", Access::Admin),
    row("/ionet.gcs.Gcs/DrainNode", Access::Node),
    row("/ionet.gcs.Gcs/GetAllNodes", Access::Read),
    // A node's spillback past its sampled view (a scan of the table: nodes only).
    row("/ionet.gcs.Gcs/FindNodes", Access::Node),
    row("/ionet.gcs.Gcs/AddJob", Access::StartJob),
    row("/ionet.gcs.Gcs/MarkJobFinished", Access::Job),
    row("/ionet.gcs.Gcs/GetAllJobs", Access::Read),
    row("/ionet.gcs.Gcs/GetJobWorkerCommand", Access::Job),
    row("/ionet.gcs.Gcs/KvPut", Access::Job),
    row("/ionet.gcs.Gcs/KvGet", Access::Job),
    row("/ionet.gcs.Gcs/KvDel", Access::Job),
    row("/ionet.gcs.Gcs/KvKeys", Access::Job),
    row("/ionet.gcs.Gcs/Subscribe", Access::Read),
    row("/ionet.gcs.Gcs/GetClusterInfo", Access::Read),
    row("/ionet.gcs.Gcs/CreatePlacementGroup", Access::Job),
    row("/ionet.gcs.Gcs/GetPlacementGroup", Access::Job),
    row("/ionet.gcs.Gcs/RemovePlacementGroup", Access::Job),
    // Listings show each caller its own account's (the state API, `ionet list`).
    row("/ionet.gcs.Gcs/ListPlacementGroups", Access::Read),
    row("/ionet.gcs.Gcs/CreateActor", Access::Job),
    row("/ionet.gcs.Gcs/GetActor", Access::Job),
    // Each actor followed is checked as `GetActor` checks it (the caller's account's).
    row("/ionet.gcs.Gcs/WatchActors", Access::Job),
    row("/ionet.gcs.Gcs/GetNamedActor", Access::Job),
    row("/ionet.gcs.Gcs/ListActors", Access::Read),
    row("/ionet.gcs.Gcs/KillActor", Access::Job),
    row("/ionet.gcs.Gcs/CreateToken", Access::Admin),
    row("/ionet.gcs.Gcs/ObjectsMoved", Access::Node),
    row("/ionet.gcs.Gcs/GetObjectMoves", Access::JobOrPeer),
    // The handler serves a package the caller's own job or submission ships (an
    // account's key: any of the account's).
    row("/ionet.gcs.Gcs/GetPackage", Access::Read),
    // A driver's init uploads its account's packages: its account's key (as the job server).
    row("/ionet.gcs.Gcs/HasPackage", Access::Submit),
    row("/ionet.gcs.Gcs/PutPackage", Access::Submit),
    // Task events: a job's own processes report their own job's tasks (the handler checks
    // which job); anyone reads, the handler keeping each to its account's tasks.
    row("/ionet.gcs.Gcs/AddTaskEvents", Access::Job),
    row("/ionet.gcs.Gcs/ListTasks", Access::Read),
    row("/ionet.gcs.Gcs/ListObjects", Access::Read),
    // Metering and the ledger (head). Moving money is the operator's alone.
    row("/ionet.metering.Metering/LeaseStarted", Access::Node),
    row("/ionet.metering.Metering/LeaseEnded", Access::Node),
    row("/ionet.metering.Metering/ReportLeases", Access::Node),
    row("/ionet.metering.Metering/ReportHeldLeases", Access::Job),
    row("/ionet.metering.Metering/JobCost", Access::Read),
    row("/ionet.metering.Metering/ListUsage", Access::Read),
    row("/ionet.metering.Metering/AddCredits", Access::Admin),
    row("/ionet.metering.Metering/Refund", Access::Admin),
    row("/ionet.metering.Metering/Balances", Access::Read),
    row("/ionet.metering.Metering/Settle", Access::Admin),
    row("/ionet.metering.Metering/Earnings", Access::Read),
    row("/ionet.metering.Metering/ListPayouts", Access::Read),
    row("/ionet.metering.Metering/Deposits", Access::Read),
    // A node daemon.
    row("/ionet.node.NodeManager/GetNodeStats", Access::Read),
    row("/ionet.node.NodeManager/RequestWorkerLease", Access::Job),
    row("/ionet.node.NodeManager/ReturnWorkerLease", Access::Job),
    row("/ionet.node.NodeManager/EndLeases", Access::Control),
    row("/ionet.node.NodeManager/Drain", Access::Admin),
    row("/ionet.node.NodeManager/RegisterWorker", Access::Job),
    row("/ionet.node.NodeManager/SetWorkerBlocked", Access::Job),
    row("/ionet.node.NodeManager/SetWorkerHolding", Access::Job),
    row("/ionet.node.NodeManager/StreamLogs", Access::Job),
    row("/ionet.node.NodeManager/IssueCertificate", Access::Job),
    row("/ionet.node.NodeManager/CreateObject", Access::Job),
    row("/ionet.node.NodeManager/SealObject", Access::Job),
    row("/ionet.node.NodeManager/EnsureObjectLocal", Access::Job),
    row("/ionet.node.NodeManager/AddObjectLocation", Access::Peer),
    row("/ionet.node.NodeManager/TakeObjects", Access::Peer),
    row("/ionet.node.NodeManager/FreeObjects", Access::JobOrPeer),
    row("/ionet.node.NodeManager/ListObjects", Access::Inspect),
    row("/ionet.node.NodeManager/PrepareBundle", Access::Control),
    row("/ionet.node.NodeManager/CommitBundle", Access::Control),
    row("/ionet.node.NodeManager/CancelBundle", Access::Control),
    row("/ionet.node.NodeManager/RunEntrypoint", Access::Control),
    row("/ionet.node.NodeManager/StopEntrypoint", Access::Control),
    // A node's object manager (transfers between nodes).
    row("/ionet.object.ObjectManager/Pull", Access::Peer),
    row("/ionet.object.ObjectManager/Free", Access::Peer),
    row("/ionet.object.ObjectManager/Stats", Access::Read),
    // A driver's or worker's core worker: its own tenant's jobs (and the head's services).
    row("/ionet.worker.CoreWorker/Tasks", Access::Tenant),
    row("/ionet.worker.CoreWorker/GetObject", Access::Tenant),
    row("/ionet.worker.CoreWorker/Exit", Access::Tenant),
    row("/ionet.worker.CoreWorker/CreateActor", Access::Tenant),
    row("/ionet.worker.CoreWorker/EndActor", Access::Tenant),
    row("/ionet.worker.CoreWorker/ActorCalls", Access::Tenant),
    row("/ionet.worker.CoreWorker/Watch", Access::Tenant),
    row("/ionet.worker.CoreWorker/ReturnIdleLeases", Access::TenantOrNode),
    row("/ionet.worker.CoreWorker/ReportGeneratorItem", Access::Tenant),
    row("/ionet.worker.CoreWorker/CancelTask", Access::Tenant),
    row("/ionet.worker.CoreWorker/ReleaseBorrows", Access::Tenant),
    row("/ionet.worker.CoreWorker/BorrowObjects", Access::Tenant),
    row("/ionet.worker.CoreWorker/ListReferences", Access::Tenant),
];

/// One route of the head's HTTP server (the job server, Ray's Jobs REST API): its method,
/// its path as the router declares it, and who may call it.
#[derive(Clone, Copy, Debug)]
pub struct HttpRule {
    pub method: &'static str,
    pub route: &'static str,
    pub access: Access,
}

const fn http(method: &'static str, route: &'static str, access: Access) -> HttpRule {
    HttpRule { method, route, access }
}

/// Every route of the head's HTTP server, and who may call it. A request to a route with
/// no row is refused, as a gRPC call is; handlers scope what a principal sees (a tenant
/// its own account's submissions, the operator all). Submissions (their environment may
/// hold secrets) and their output are the account key's alone: a job's or a submission's
/// credential, which providers' nodes hold, reads none of them.
pub const HTTP_TABLE: &[HttpRule] = &[
    http("GET", "/api/version", Access::Read),
    // Ray's clients send the list and submit with and without the trailing slash.
    http("GET", "/api/jobs/", Access::Submit),
    http("GET", "/api/jobs", Access::Submit),
    http("POST", "/api/jobs/", Access::Submit),
    http("POST", "/api/jobs", Access::Submit),
    http("GET", "/api/jobs/{submission_id}", Access::Submit),
    http("DELETE", "/api/jobs/{submission_id}", Access::Submit),
    http("POST", "/api/jobs/{submission_id}/stop", Access::Submit),
    http("GET", "/api/jobs/{submission_id}/logs", Access::Submit),
    http("GET", "/api/jobs/{submission_id}/logs/tail", Access::Submit),
    // Packages (working_dir, py_modules): an account's own.
    http("GET", "/api/packages/{protocol}/{package_name}", Access::Submit),
    http("PUT", "/api/packages/{protocol}/{package_name}", Access::Submit),
    // Prometheus metrics: the operator's and the scraper's whole view; a tenant's
    // credential its account's part, a node's its own (`gcs::metrics`).
    http("GET", "/metrics", Access::Metrics),
    // The dashboard: its page (no data in it; anyone may load it), and the data its
    // script asks with the visitor's credential, each shown its own part.
    http("GET", "/", Access::Public),
    http("GET", "/api/v0/nodes", Access::Read),
    http("GET", "/api/v0/jobs", Access::Read),
    http("GET", "/api/v0/tasks", Access::Read),
    http("GET", "/api/v0/market", Access::Read),
    http("GET", "/api/v0/actors", Access::Read),
    http("GET", "/api/v0/placement_groups", Access::Read),
    http("GET", "/api/v0/objects", Access::Read),
    // Prometheus's service discovery of node daemons' metrics (the public node table),
    // each scraped through the head (the scrapers and the operator: the handler checks);
    // the head fetches it with a credential minted for that node alone.
    http("GET", "/api/prometheus/targets", Access::Metrics),
    http("GET", "/api/nodes/{node_id}/metrics", Access::Metrics),
];

/// Whether `route` of the head's HTTP server is open to anyone without a credential.
pub fn http_route_is_public(method: &str, route: &str) -> bool {
    HTTP_TABLE.iter().any(|rule| rule.method == method && rule.route == route && rule.access == Access::Public)
}

/// Whether `principal` may make a `method` request to `route` of the head's HTTP server.
pub fn decide_http(principal: &Principal, method: &str, route: &str) -> Result<(), String> {
    match HTTP_TABLE.iter().find(|rule| rule.method == method && rule.route == route) {
        None => {
            Err(format!("{principal} may not call {method} {route}: the route has no row in the authorization table"))
        }
        Some(rule) if rule.access.allows(principal, None) => Ok(()),
        Some(rule) => Err(format!("{principal} may not call {method} {route}: it requires {}", rule.access.right())),
    }
}

/// The row of `path`, if the table has one (a map built once: every call looks here).
pub fn rule(path: &str) -> Option<&'static Rule> {
    static BY_PATH: std::sync::OnceLock<std::collections::HashMap<&'static str, &'static Rule>> =
        std::sync::OnceLock::new();
    BY_PATH.get_or_init(|| TABLE.iter().map(|rule| (rule.path, rule)).collect()).get(path).copied()
}

/// Whether `principal` may call `path` on a server belonging to `tenant` (`None`: a
/// server of the cluster): `Ok`, or the reason it may not.
pub fn decide(principal: &Principal, path: &str, tenant: Option<&str>) -> Result<(), String> {
    match rule(path) {
        None => Err(format!("{principal} may not call {path}: the call has no row in the authorization table")),
        Some(rule) if rule.access.allows(principal, tenant) => Ok(()),
        Some(rule) => Err(format!("{principal} may not call {path}: it requires {}", rule.access.right())),
    }
}

/// The principal verified claims name.
fn principal_of(claims: crate::credential::Claims) -> Result<Principal, &'static str> {
    match claims.role {
        Role::Admin => Ok(Principal::Admin),
        Role::Control => Ok(Principal::Control),
        Role::Metrics => Ok(Principal::Metrics),
        Role::NodeMetrics if claims.version >= Role::NodeMetrics.version() => Ok(Principal::NodeMetrics),
        Role::NodeMetrics => Err("a node-metrics token made before node daemons were scraped through the head \
             (every daemon scraped was sent it): make a new one with `ionet token create --role node-metrics`"),
        Role::Join => Ok(Principal::Joiner),
        Role::Inspect => claims
            .node_id
            .and_then(|hex_id| hex::decode(hex_id).ok())
            .and_then(|bytes| NodeId::from_bytes(&bytes).ok())
            .map(Principal::Inspect)
            .ok_or("inspect credential without a valid node id"),
        Role::Node => claims
            .node_id
            .and_then(|hex_id| hex::decode(hex_id).ok())
            .and_then(|bytes| NodeId::from_bytes(&bytes).ok())
            .map(Principal::Node)
            .ok_or("node credential without a valid node id"),
        Role::Account => claims
            .account
            .filter(|account| !account.trim().is_empty())
            .map(|account| Principal::Account(account.into()))
            .ok_or("account key without an account"),
        Role::Job => {
            let job = claims
                .job_id
                .and_then(|hex_id| hex::decode(hex_id).ok())
                .and_then(|bytes| JobId::from_bytes(&bytes).ok())
                .ok_or("job credential without a valid job id")?;
            let account = claims.account.ok_or("job credential without an account")?;
            Ok(Principal::Job { job, account: account.into() })
        }
        Role::Submission => {
            let id = claims.submission_id.filter(|id| !id.is_empty()).ok_or("submission credential without an id")?;
            let nonce =
                claims.nonce.filter(|nonce| !nonce.is_empty()).ok_or("submission credential without a nonce")?;
            let account = claims
                .account
                .filter(|account| !account.trim().is_empty())
                .ok_or("submission credential without an account")?;
            Ok(Principal::Submission { id: id.into(), nonce: nonce.into(), account: account.into() })
        }
    }
}

/// What a server knows to tell principals apart.
#[derive(Clone, Debug)]
pub struct Authorizer {
    /// The head's public key: the head's own servers know it from the start, a node learns
    /// it when it registers ([`Authorizer::learn_head_key`]); until then no credential is
    /// accepted.
    verifier: Arc<std::sync::RwLock<Option<Verifier>>>,
    /// The account a tenant's process belongs to (its [`Access::Tenant`] rows admit only
    /// that account's jobs); `None` on the cluster's own servers.
    tenant: Option<Arc<str>>,
    /// Credentials this server has verified, with their principal and expiry: a caller's
    /// next call costs a lookup, not a signature check. Bounded (expired ones go first
    /// when full, then all); emptied when the head's key changes.
    verified: Arc<std::sync::RwLock<std::collections::HashMap<Box<[u8]>, (Principal, u64)>>>,
}

/// Most verified credentials an [`Authorizer`] remembers: more than a head's nodes and
/// their tenants' jobs call it with (at 4096, a head of 10,000 nodes emptied it every
/// few hundred heartbeats and checked a signature on nearly every one).
const VERIFIED_CAPACITY: usize = 1 << 16;

impl Authorizer {
    /// A server of the cluster (the head's, a node daemon's).
    pub fn new(verifier: Option<Verifier>) -> Self {
        Self { verifier: Arc::new(std::sync::RwLock::new(verifier)), tenant: None, verified: Arc::default() }
    }

    /// The server of a process that belongs to `account` (a driver or one of its job's
    /// workers).
    pub fn for_account(verifier: Verifier, account: &str) -> Self {
        Self { tenant: Some(account.into()), ..Self::new(Some(verifier)) }
    }

    /// From now on, credentials signed by `verifier`'s key are accepted (a clone of this
    /// authorizer, already serving, sees it too).
    pub fn learn_head_key(&self, verifier: Verifier) {
        *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = Some(verifier);
        self.verified.write().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The principal a bearer header names, or why it names none.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Principal, &'static str> {
        let value = header.ok_or("missing credential (no authorization metadata)")?;
        let presented = value.strip_prefix(BEARER).ok_or("authorization metadata is not a bearer credential")?;
        if !Verifier::is_credential(presented) {
            return Err("not a credential of this cluster");
        }
        let now = crate::credential::now_unix();
        if let Some((principal, expires_at)) =
            self.verified.read().unwrap_or_else(|p| p.into_inner()).get(presented).cloned()
        {
            if now < expires_at {
                return Ok(principal);
            }
        }
        // The key stays read-locked until the principal is remembered, so a new head key
        // (which empties the cache under the write lock) never meets an entry the old key
        // admitted.
        let verifier = self.verifier.read().unwrap_or_else(|p| p.into_inner());
        let claims = verifier.as_ref().ok_or("this server does not know the head's key yet")?.verify(presented)?;
        let expires_at = claims.expires_at;
        let principal = principal_of(claims)?;
        let mut verified = self.verified.write().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_CAPACITY {
            verified.retain(|_, (_, expires_at)| now < *expires_at);
            // Freed little: start afresh rather than walk a full cache at every insert.
            if verified.len() >= VERIFIED_CAPACITY - VERIFIED_CAPACITY / 8 {
                verified.clear();
            }
        }
        verified.insert(presented.into(), (principal.clone(), expires_at));
        drop(verified);
        drop(verifier);
        Ok(principal)
    }

    /// The principal of a call to `path` with bearer `header`, if the table lets it make
    /// the call; else the status to answer. Refusals are logged with `peer`.
    /// `peer` is formatted only into a refusal's log line, so an admitted call (every call
    /// of the hot paths) never pays for it.
    pub fn admit(
        &self,
        path: &str,
        header: Option<&[u8]>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Principal, Status> {
        let peer = || peer.map_or_else(|| "unknown".to_string(), |address| address.to_string());
        let principal = self.authenticate(header).map_err(|why| {
            tracing::warn!(peer = %peer(), path = %path, reason = why, "refused an unauthenticated call");
            Status::unauthenticated(format!("{why}: pass a credential the head issued (IONET_API_KEY, --credential)"))
        })?;
        decide(&principal, path, self.tenant.as_deref()).map_err(|why| {
            tracing::warn!(peer = %peer(), path = %path, %principal, "refused a call: {why}");
            Status::permission_denied(why)
        })?;
        Ok(principal)
    }
}

/// The layer for `tonic::transport::Server::layer`: every call passes [`Authorizer::admit`]
/// before routing.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    authorizer: Arc<Authorizer>,
}

impl AuthorizeLayer {
    pub fn new(authorizer: Authorizer) -> Self {
        Self { authorizer: Arc::new(authorizer) }
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner, authorizer: self.authorizer.clone() }
    }
}

/// The service [`AuthorizeLayer`] wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
}

impl<S, B> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let header = request.headers().get(AUTHORIZATION).map(|value| value.as_bytes());
        let peer =
            request.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|info| info.remote_addr());
        let method = crate::rpc_metrics::method_label(request.uri().path());
        match self.authorizer.admit(request.uri().path(), header, peer) {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
                let started = std::time::Instant::now();
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let answered = answer.await;
                    crate::rpc_metrics::rpc_metrics().answered(method, started.elapsed());
                    answered
                })
            }
            Err(status) => {
                crate::rpc_metrics::rpc_metrics().refused(method, status.code());
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::Issuer;
    use std::collections::BTreeSet;
    use std::time::Duration;

    /// Every RPC the protocol files declare, as gRPC paths.
    fn declared_rpcs() -> BTreeSet<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/ionet");
        let mut paths = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let package = text
                .lines()
                .find_map(|line| line.trim().strip_prefix("package "))
                .map(|package| package.trim_end_matches(';').trim().to_string());
            let mut service = None;
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("service ") {
                    service = rest.split_whitespace().next().map(str::to_string);
                } else if let Some(rest) = line.strip_prefix("rpc ") {
                    let method = rest.split('(').next().unwrap().trim();
                    let (package, service) = (package.as_ref().unwrap(), service.as_ref().unwrap());
                    paths.insert(format!("/{package}.{service}/{method}"));
                }
            }
        }
        assert!(paths.len() > 50, "the protocol files were read: {paths:?}");
        paths
    }

    #[test]
    fn every_rpc_of_every_service_has_a_row() {
        let declared = declared_rpcs();
        let missing: Vec<_> = declared.iter().filter(|path| rule(path).is_none()).collect();
        assert!(missing.is_empty(), "RPCs without a row in authz::TABLE: {missing:?}");
        let mut seen = BTreeSet::new();
        for rule in TABLE {
            assert!(seen.insert(rule.path), "two rows for {}", rule.path);
            assert!(declared.contains(rule.path), "a row for a call no service declares: {}", rule.path);
        }
    }

    #[test]
    fn money_moves_only_for_the_admin() {
        let job = Principal::Job { job: JobId::from_sequence(1), account: "acme".into() };
        for path in [
            "/ionet.metering.Metering/AddCredits",
            "/ionet.metering.Metering/Refund",
            "/ionet.metering.Metering/Settle",
        ] {
            let refused = decide(&job, path, None).unwrap_err();
            assert!(refused.contains("job") && refused.contains(path) && refused.contains("admin role"), "{refused}");
            decide(&Principal::Node(NodeId::random()), path, None).unwrap_err();
            decide(&Principal::Admin, path, None).unwrap();
        }
        for rule in TABLE {
            decide(&Principal::Admin, rule.path, None).unwrap();
        }
        assert!(decide(&Principal::Admin, "/ionet.gcs.Gcs/Nonexistent", None).unwrap_err().contains("no row"));
    }

    #[test]
    fn the_header_names_the_principal() {
        let head = Issuer::generate();
        let authorizer = Authorizer::new(Some(head.verifier()));
        let bearer = |text: &str| format!("Bearer {text}").into_bytes();

        let admin = head.issue(Role::Admin, Duration::from_secs(60));
        assert_eq!(authorizer.authenticate(Some(&bearer(&admin))), Ok(Principal::Admin));

        let stranger = Issuer::generate().issue(Role::Admin, Duration::from_secs(60));
        assert!(authorizer.authenticate(Some(&bearer(&stranger))).is_err());
        assert_eq!(authorizer.authenticate(Some(&bearer("nope"))), Err("not a credential of this cluster"));
        assert!(authorizer.authenticate(None).unwrap_err().contains("missing"));
        assert!(authorizer.authenticate(Some(admin.as_bytes())).unwrap_err().contains("bearer"));

        let node_id = NodeId::random();
        let node = head.issue_node(node_id.as_bytes(), &[1; 32], Duration::from_secs(60));
        assert_eq!(authorizer.authenticate(Some(&bearer(&node))), Ok(Principal::Node(node_id)));
        let join = head.issue(Role::Join, Duration::from_secs(60));
        assert_eq!(authorizer.authenticate(Some(&bearer(&join))), Ok(Principal::Joiner));
        let account = head.issue_account("acme", Duration::from_secs(60));
        assert_eq!(authorizer.authenticate(Some(&bearer(&account))), Ok(Principal::Account("acme".into())));
        let job_id = JobId::from_sequence(7);
        let job = head.issue_job(&job_id.to_vec(), "acme", Duration::from_secs(60));
        assert_eq!(
            authorizer.authenticate(Some(&bearer(&job))),
            Ok(Principal::Job { job: job_id, account: "acme".into() })
        );

        let without_key = Authorizer::new(None);
        assert!(without_key.authenticate(Some(&bearer(&admin))).unwrap_err().contains("head's key"));
        // A node daemon learns the head's key when it registers; its server sees it at once.
        let serving = without_key.clone();
        without_key.learn_head_key(head.verifier());
        assert_eq!(serving.authenticate(Some(&bearer(&admin))), Ok(Principal::Admin));
    }

    #[test]
    fn a_verified_credential_is_remembered_until_the_heads_key_changes() {
        let head = Issuer::generate();
        let authorizer = Authorizer::new(Some(head.verifier()));
        let job = format!("Bearer {}", head.issue_job(&[0, 0, 0, 5], "acme", Duration::from_secs(60))).into_bytes();
        let first = authorizer.authenticate(Some(&job)).unwrap();
        assert_eq!(authorizer.authenticate(Some(&job)).unwrap(), first, "the second call hits the cache");
        assert_eq!(authorizer.verified.read().unwrap().len(), 1);
        // Nothing refused is remembered.
        let expired = format!("Bearer {}", head.issue(Role::Admin, Duration::ZERO)).into_bytes();
        assert_eq!(authorizer.authenticate(Some(&expired)), Err("credential expired"));
        assert_eq!(authorizer.verified.read().unwrap().len(), 1);
        // Another head's key: what the old one signed is no longer accepted.
        authorizer.learn_head_key(Issuer::generate().verifier());
        assert!(authorizer.authenticate(Some(&job)).is_err());
    }

    #[test]
    fn principals_act_only_for_themselves() {
        let (mine, theirs) = (NodeId::random(), NodeId::random());
        let node = Principal::Node(mine);
        node.may_act_for_node(&mine).unwrap();
        let refused = node.may_act_for_node(&theirs).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains(&theirs.short()), "{}", refused.message());
        Principal::Admin.may_act_for_node(&theirs).unwrap();
        assert!(Principal::Joiner.may_act_for_node(&mine).is_err());

        let (own, other) = (JobId::from_sequence(1), JobId::from_sequence(2));
        let job = Principal::Job { job: own, account: "acme".into() };
        job.may_act_for_job(&own).unwrap();
        assert!(job.may_act_for_job(&other).unwrap_err().message().contains("may not act for job"));
        assert!(Principal::Account("acme".into()).may_act_for_job(&own).is_err());
        assert!(Principal::Node(mine).may_act_for_job(&own).is_err());
        job.may_act_for_account("acme").unwrap();
        assert!(job.may_act_for_account("globex").unwrap_err().message().contains("may not act for account globex"));
        assert!(Principal::Account("acme".into()).may_act_for_account("acme").is_err(), "a key starts jobs only");
        assert!(Principal::Node(mine).may_act_for_account("acme").is_err());
        assert!(job.sees_account("acme") && Principal::Account("acme".into()).sees_account("acme"));
        assert!(!job.sees_account("globex") && !Principal::Node(mine).sees_account("acme"));
        assert!(Principal::Admin.sees_account("globex"));

        let stranger = Principal::Job { job: other, account: "globex".into() };
        for rule in TABLE {
            let path = rule.path;
            assert_eq!(decide(&Principal::Joiner, path, None).is_ok(), path == "/ionet.gcs.Gcs/RegisterNode", "{path}");
            assert_ne!(rule.access, Access::Public, "{path}: every RPC takes a credential");
            // A metrics scraper's token makes no call at all (it reads `/metrics` only).
            assert!(decide(&Principal::Metrics, path, None).is_err(), "{path}");
            assert!(decide(&Principal::NodeMetrics, path, None).is_err(), "{path}");
            // An account's key starts jobs, uploads its packages, and reads.
            let account_may = path == "/ionet.gcs.Gcs/AddJob" || matches!(rule.access, Access::Read | Access::Submit);
            assert_eq!(decide(&Principal::Account("a".into()), path, None).is_ok(), account_may, "{path}");
            let node_may = matches!(
                rule.access,
                Access::Read
                    | Access::Node
                    | Access::Peer
                    | Access::Register
                    | Access::JobOrPeer
                    | Access::TenantOrNode
            );
            assert_eq!(decide(&node, path, None).is_ok(), node_may, "{path}");
            let job_may = matches!(rule.access, Access::Read | Access::Job | Access::JobOrPeer);
            assert_eq!(decide(&job, path, None).is_ok(), job_may, "{path}");
            // A tenant's own process: its account's jobs, never another's.
            let tenant_row = matches!(rule.access, Access::Tenant | Access::TenantOrNode);
            assert_eq!(decide(&job, path, Some("acme")).is_ok(), job_may || tenant_row, "{path}");
            assert_eq!(decide(&stranger, path, Some("acme")).is_ok(), job_may, "{path}");
        }
        for rule in HTTP_TABLE {
            let scraper_may = rule.access == Access::Public
                || (rule.method == "GET"
                    && matches!(rule.route, "/metrics" | "/api/prometheus/targets" | "/api/nodes/{node_id}/metrics"));
            assert_eq!(
                decide_http(&Principal::Metrics, rule.method, rule.route).is_ok(),
                scraper_may,
                "{}",
                rule.route
            );
        }
        let refused = decide(&stranger, "/ionet.worker.CoreWorker/ActorCalls", Some("acme")).unwrap_err();
        assert!(refused.contains("globex") && refused.contains("account this process belongs to"), "{refused}");
    }

    #[test]
    fn a_refusal_has_the_right_code() {
        let head = Issuer::generate();
        let authorizer = Authorizer::new(Some(head.verifier()));
        let job = head.issue_job(&JobId::from_sequence(3).to_vec(), "acme", Duration::from_secs(60));
        let job = format!("Bearer {job}").into_bytes();
        let settle = "/ionet.metering.Metering/Settle";
        assert_eq!(authorizer.admit(settle, Some(&job), None).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(authorizer.admit(settle, None, None).unwrap_err().code(), tonic::Code::Unauthenticated);
        let admitted = authorizer.admit("/ionet.gcs.Gcs/KvGet", Some(&job), None).unwrap();
        assert_eq!(admitted, Principal::Job { job: JobId::from_sequence(3), account: "acme".into() });
        // On a tenant's process, another account's job is refused.
        let acme = Authorizer::for_account(head.verifier(), "globex");
        let calls = "/ionet.worker.CoreWorker/ActorCalls";
        assert_eq!(acme.admit(calls, Some(&job), None).unwrap_err().code(), tonic::Code::PermissionDenied);
    }
}
