//! The head's Prometheus metrics (`GET /metrics` on the head's HTTP server, beside the job
//! server): the cluster's nodes and prices, jobs, submissions and tasks by state, and its
//! money (what each job has cost so far, what each provider's nodes have earned, the
//! protocol's fees, payers' credits), in the OpenMetrics text format (`prometheus-client`
//! encodes it; Prometheus scrapes it as it is).
//!
//! Each scrape reads the tables as they are now and is shown what its credential may see
//! ([`View`]): the operator's credential and the scraper's (`ionet token create --role
//! metrics`, a credential that reads this and nothing else) the whole cluster; an
//! account's key the cluster's public face (nodes, their resources and prices, as
//! `Gcs/GetAllNodes` shows) and its own account's jobs, tasks, bills and credit; a node's
//! credential the public face and its own node's earnings and its wallet's balance; a
//! job's or a submission's credential (providers' nodes hold those) and the node
//! scraper's (`--role node-metrics`, which reads node daemons' through the head:
//! `crate::node_scrape`) the public face only. Counters (`…_total`) only grow while the head runs
//! (task events taken, tasks ended, heartbeats); gauges are the state at the scrape.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ionet_common::authz::Principal;
use ionet_common::resources::{Quantity, ResourceSet};
use ionet_common::rpc::proto::common::{JobState, NodeState};
use ionet_common::{JobId, NodeId};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::GcsResult;
use crate::metering::{Metering, DEFAULT_PAYER};
use crate::state::GcsState;
use crate::submissions::{Status, Submissions};
use crate::task_events::TaskTable;

/// The content type of the answer (OpenMetrics 1.0 text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one scrape may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// The whole cluster and all its money: the operator, the metrics scraper.
    All,
    /// The public face and one account's own.
    Account(String),
    /// The public face and one node's own earnings.
    Node(NodeId),
    /// The public face only.
    Public,
}

impl View {
    /// The view of `principal` (`None`: it may read no metrics).
    pub fn of(principal: &Principal) -> Option<View> {
        match principal {
            Principal::Admin | Principal::Metrics => Some(View::All),
            Principal::Node(node) => Some(View::Node(*node)),
            Principal::Account(account) => Some(View::Account(account.to_string())),
            Principal::Job { .. } | Principal::Submission { .. } | Principal::NodeMetrics => Some(View::Public),
            Principal::Joiner | Principal::Control | Principal::Inspect(_) => None,
        }
    }

    pub fn sees_account(&self, account: &str) -> bool {
        match self {
            View::All => true,
            View::Account(own) => own == account,
            View::Node(_) | View::Public => false,
        }
    }
}

type Labels = Vec<(&'static str, String)>;
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterFamily = Family<Labels, Counter<u64>>;

/// One scrape's registry: families registered as they are made.
struct Sheet {
    registry: Registry,
}

impl Sheet {
    fn gauge(&mut self, name: &str, help: &str) -> GaugeFamily {
        let family = GaugeFamily::default();
        self.registry.register(name, help, family.clone());
        family
    }

    fn counter(&mut self, name: &str, help: &str) -> CounterFamily {
        let family = CounterFamily::default();
        self.registry.register(name, help, family.clone());
        family
    }
}

fn set(family: &GaugeFamily, labels: Labels, value: f64) {
    family.get_or_create(&labels).set(value);
}

fn count(family: &CounterFamily, labels: Labels, value: u64) {
    family.get_or_create(&labels).inc_by(value);
}

fn usd(micros: u64) -> f64 {
    micros as f64 / 1e6
}

fn node_state(state: i32) -> &'static str {
    match NodeState::try_from(state) {
        Ok(NodeState::Alive) => "alive",
        Ok(NodeState::Draining) => "draining",
        Ok(NodeState::Dead) => "dead",
        _ => "unknown",
    }
}

pub(crate) fn submission_status(status: Status) -> &'static str {
    match status {
        Status::Pending => "PENDING",
        Status::Running => "RUNNING",
        Status::Stopped => "STOPPED",
        Status::Succeeded => "SUCCEEDED",
        Status::Failed => "FAILED",
    }
}

/// Reads the head's tables for a scrape.
pub struct HeadMetrics {
    state: Arc<GcsState>,
    metering: Arc<Metering>,
    tasks: Arc<TaskTable>,
    submissions: Arc<Submissions>,
    actors: Arc<crate::actors::Actors>,
    placement_groups: Arc<crate::placement_groups::PlacementGroups>,
    objects: Arc<crate::objects::ObjectListing>,
    nodes: crate::node_scrape::NodeScrape,
}

/// The head's tables a scrape and the dashboard read.
pub struct HeadTables {
    pub state: Arc<GcsState>,
    pub metering: Arc<Metering>,
    pub tasks: Arc<TaskTable>,
    pub submissions: Arc<Submissions>,
    pub actors: Arc<crate::actors::Actors>,
    pub placement_groups: Arc<crate::placement_groups::PlacementGroups>,
    pub objects: Arc<crate::objects::ObjectListing>,
    /// Mints the credentials node daemons' metrics are fetched with.
    pub issuer: ionet_common::credential::Issuer,
}

impl HeadMetrics {
    pub fn new(tables: HeadTables) -> Self {
        let HeadTables { state, metering, tasks, submissions, actors, placement_groups, objects, issuer } = tables;
        let nodes = crate::node_scrape::NodeScrape::new(state.clone(), issuer);
        Self { state, metering, tasks, submissions, actors, placement_groups, objects, nodes }
    }

    /// Node daemons' metrics, scraped through the head.
    pub fn node_scrape(&self) -> &crate::node_scrape::NodeScrape {
        &self.nodes
    }

    pub fn placement_groups(&self) -> &Arc<crate::placement_groups::PlacementGroups> {
        &self.placement_groups
    }

    /// Who holds which object (asked of the nodes and drivers when read).
    pub fn objects(&self) -> &Arc<crate::objects::ObjectListing> {
        &self.objects
    }

    pub fn actors(&self) -> &Arc<crate::actors::Actors> {
        &self.actors
    }

    pub fn state(&self) -> &Arc<GcsState> {
        &self.state
    }

    pub fn metering(&self) -> &Arc<Metering> {
        &self.metering
    }

    pub fn tasks(&self) -> &Arc<TaskTable> {
        &self.tasks
    }

    pub fn submissions(&self) -> &Arc<Submissions> {
        &self.submissions
    }

    /// The metrics `view` may see, as OpenMetrics text.
    pub async fn render(&self, view: &View) -> GcsResult<String> {
        let mut sheet = Sheet { registry: Registry::with_prefix("ionet") };
        self.nodes(&mut sheet, view);
        if matches!(view, View::All | View::Account(_)) {
            self.work(&mut sheet, view);
        }
        self.money(&mut sheet, view).await?;
        if *view == View::All {
            ionet_common::rpc_metrics::rpc_metrics().register(&mut sheet.registry);
        }
        let mut text = String::new();
        encode(&mut text, &sheet.registry).map_err(|err| crate::error::GcsError::Storage(err.to_string()))?;
        Ok(text)
    }

    /// The public face: nodes, their resources and prices, heartbeats.
    fn nodes(&self, sheet: &mut Sheet, _view: &View) {
        let nodes_by_state = sheet.gauge("nodes", "Nodes by state");
        let info = sheet.gauge("node_info", "One per node: its state, GPU model and whether it is the head's");
        let total =
            sheet.gauge("node_resource_total", "What a live node has, by resource (GPU, CPU, memory bytes, ...)");
        let available = sheet.gauge("node_resource_available", "What a live node has free, by resource");
        let gpu_price = sheet.gauge("node_gpu_price_usd_per_hour", "What a node's provider asks per GPU-hour (USD)");
        let cpu_price = sheet.gauge("node_cpu_price_usd_per_hour", "What a node's provider asks per CPU-hour (USD)");
        let age = sheet.gauge("node_heartbeat_age_seconds", "Seconds since a live node's last heartbeat");
        let heartbeats = sheet.counter("heartbeats", "Heartbeats the head took since it started");
        count(&heartbeats, vec![], self.state.heartbeats_received());
        let reads = sheet.counter(
            "node_table_reads",
            "Reads of the node table the head answered: whole, or by delta (what changed since the reader's version)",
        );
        let (whole, delta) = self.state.node_reads();
        count(&reads, vec![("kind", "whole".into())], whole);
        count(&reads, vec![("kind", "delta".into())], delta);
        for state in ["alive", "draining", "dead"] {
            set(&nodes_by_state, vec![("state", state.into())], 0.0);
        }
        let now = self.state.now_ms();
        for node in self.state.nodes(true) {
            let Ok(id) = NodeId::from_bytes(&node.node_id) else { continue };
            let state = node_state(node.state);
            nodes_by_state.get_or_create(&vec![("state", state.into())]).inc();
            let gpu_type = match node.gpus.first() {
                Some(gpu) => gpu.model.clone(),
                None => node.accelerator_type.clone(),
            };
            let node_label = || ("node_id", id.hex());
            // Dead nodes are counted, and show no series of their own: one join token can
            // register many ids, and the table keeps every one.
            if node.state == NodeState::Dead as i32 {
                continue;
            }
            let gpu_type = label_text(&gpu_type);
            set(
                &info,
                vec![
                    node_label(),
                    ("state", state.into()),
                    ("gpu_type", gpu_type.clone()),
                    ("is_head", node.is_head.to_string()),
                ],
                1.0,
            );
            let resources = |quantities: &Option<ionet_common::rpc::proto::common::ResourceQuantities>| {
                quantities.clone().unwrap_or_default().to_set().unwrap_or_else(|_| ResourceSet::new())
            };
            for (family, set_of) in [(&total, resources(&node.total)), (&available, resources(&node.available))] {
                // The standard resources and a few custom ones: a provider names as many
                // as it likes, and each would be series of its own.
                let standard = |name: &str| {
                    use ionet_common::resources::{CPU, GPU, GPU_MEMORY, MEMORY};
                    [CPU, GPU, MEMORY, GPU_MEMORY].contains(&name)
                };
                let custom = set_of
                    .iter()
                    .filter(|(resource, _)| {
                        !standard(resource) && !resource.starts_with(ionet_common::resources::ACCELERATOR_PREFIX)
                    })
                    .take(MAX_RESOURCES_PER_NODE);
                let shown = set_of.iter().filter(|(resource, _)| standard(resource)).chain(custom);
                for (resource, quantity) in shown {
                    set(family, vec![node_label(), ("resource", label_text(resource))], Quantity::as_f64(quantity));
                }
            }
            if !node.gpus.is_empty() {
                set(&gpu_price, vec![node_label(), ("gpu_type", gpu_type)], usd(node.price_per_gpu_hour_micros));
            }
            set(&cpu_price, vec![node_label()], usd(node.price_per_cpu_hour_micros));
            set(&age, vec![node_label()], now.saturating_sub(node.last_heartbeat_ms) as f64 / 1e3);
        }
    }

    /// Jobs, submissions and tasks of the accounts the view sees.
    fn work(&self, sheet: &mut Sheet, view: &View) {
        let jobs = sheet.gauge("jobs", "Jobs by state and paying account");
        for job in self.state.jobs() {
            let account = payer(&job.payer_account);
            if !view.sees_account(&account) {
                continue;
            }
            let state = if job.state == JobState::Finished as i32 { "FINISHED" } else { "RUNNING" };
            jobs.get_or_create(&vec![("state", state.into()), ("account", account)]).inc();
        }
        let submissions = sheet.gauge("submissions", "Submitted jobs by status and account");
        for submission in self.submissions.list(&Principal::Admin) {
            if view.sees_account(&submission.account) {
                let labels =
                    vec![("status", submission_status(submission.status).into()), ("account", submission.account)];
                submissions.get_or_create(&labels).inc();
            }
        }
        let actors = sheet.gauge("actors", "Actors by state and account");
        for actor in self.actors.list(true) {
            let job = actor.spec.as_ref().and_then(|spec| JobId::from_bytes(&spec.job_id).ok());
            let account = job.map(|job| self.state.payer_of(&job)).unwrap_or_else(|| DEFAULT_PAYER.into());
            if view.sees_account(&account) {
                let labels = vec![("state", crate::actors::state_name(actor.state).into()), ("account", account)];
                actors.get_or_create(&labels).inc();
            }
        }
        let tasks = sheet.gauge("tasks", "Tasks the head keeps a row of, by state and account");
        let events = sheet.counter("task_events", "Task events the head took, by account");
        let dropped = sheet.counter("task_events_dropped", "Task events their senders dropped (buffer full, refused)");
        let forgotten = sheet.counter("tasks_forgotten", "Task rows the head forgot to stay within its bounds");
        let finished = sheet.counter("tasks_finished", "Tasks that finished, by account");
        let failed = sheet.counter("tasks_failed", "Tasks that failed (their owner gave up, or their job ended first)");
        for counts in self.tasks.counts(|account| view.sees_account(account)) {
            let account = || vec![("account", counts.account.clone())];
            for (state, rows) in counts.by_state.iter().enumerate().skip(1) {
                set(
                    &tasks,
                    vec![
                        ("state", crate::task_events::state_name(state as i32).into()),
                        ("account", counts.account.clone()),
                    ],
                    *rows as f64,
                );
            }
            count(&events, account(), counts.events);
            count(&dropped, account(), counts.dropped_events);
            count(&forgotten, account(), counts.forgotten_tasks);
            count(&finished, account(), counts.finished);
            count(&failed, account(), counts.failed);
        }
    }

    /// Usage so far, summed: per job the view sees (its records and running leases), per
    /// node the view sees the earnings of, and in all.
    pub async fn usage_totals(&self, view: &View) -> GcsResult<UsageTotals> {
        let fee_bps = u64::from(self.state.config().protocol_fee_bps);
        let fee_of = |cost: u64| cost.saturating_mul(fee_bps) / 10_000;
        let mut totals = UsageTotals::default();
        // The public face holds no money: no pass over the usage for it.
        if *view == View::Public {
            return Ok(totals);
        }
        for record in self.metering.list_usage(None, None).await? {
            let account = payer(&record.payer_account);
            let fee = fee_of(record.cost_micros);
            totals.fees = totals.fees.saturating_add(fee);
            totals.running += u64::from(record.open);
            if let (true, Ok(job)) = (view.sees_account(&account), JobId::from_bytes(&record.job_id)) {
                let bill = totals.by_job.entry((job, account)).or_default();
                bill.cost = bill.cost.saturating_add(record.cost_micros);
                bill.fee = bill.fee.saturating_add(fee);
                bill.leases += u64::from(record.open);
            }
            let Ok(node) = NodeId::from_bytes(&record.node_id) else { continue };
            let own_node = match view {
                View::All => true,
                View::Node(own) => *own == node,
                View::Account(_) | View::Public => false,
            };
            if own_node {
                // The provider earns the whole cost; the fee is the payer's, on top.
                let earned = totals.by_node.entry((node, record.provider_wallet.clone())).or_default();
                *earned = earned.saturating_add(record.cost_micros);
            }
        }
        Ok(totals)
    }

    /// Money: bills of jobs, earnings of nodes, fees, balances.
    async fn money(&self, sheet: &mut Sheet, view: &View) -> GcsResult<()> {
        let job_cost = sheet.gauge("job_cost_usd", "What a job has cost so far (records and running leases, USD)");
        let job_fee = sheet.gauge("job_fee_usd", "The protocol's fee on a job's cost so far, paid on top of it (USD)");
        let job_leases = sheet.gauge("job_running_leases", "A job's leases running now");
        let node_earned = sheet.gauge(
            "node_earned_usd",
            "What a node's leases have earned its provider so far (USD; the payer pays the fee on top)",
        );
        let UsageTotals { by_job, by_node, fees, running } = self.usage_totals(view).await?;
        for ((job, account), JobBill { cost, fee, leases }) in by_job {
            let labels = || vec![("job_id", job.to_string()), ("account", account.clone())];
            set(&job_cost, labels(), usd(cost));
            set(&job_fee, labels(), usd(fee));
            set(&job_leases, labels(), leases as f64);
        }
        for ((node, wallet), earned) in by_node {
            set(&node_earned, vec![("node_id", node.hex()), ("wallet", wallet)], usd(earned));
        }

        // The ledger's balances: credits of the payers the view sees; providers' settled
        // earnings and the protocol's treasury (the operator's).
        let credit = sheet.gauge("account_credit_usd", "A payer's prepaid credit left (USD; negative: debt)");
        let provider =
            sheet.gauge("provider_balance_usd", "A provider wallet's settled earnings not yet paid out (USD)");
        for (account, balance) in self.metering.balances().await? {
            match account {
                ionet_settlement::Account::Payer(name) if view.sees_account(&name) => {
                    set(&credit, vec![("account", name)], balance as f64 / 1e6);
                }
                // A wallet is a node's word, not proof of owning it: the operator's only.
                ionet_settlement::Account::Provider(wallet) if *view == View::All => {
                    set(&provider, vec![("wallet", wallet)], balance as f64 / 1e6);
                }
                ionet_settlement::Account::Treasury if *view == View::All => {
                    let treasury = sheet.gauge("treasury_balance_usd", "The protocol's settled fees (USD)");
                    set(&treasury, vec![], balance as f64 / 1e6);
                }
                _ => {}
            }
        }
        if *view == View::All {
            let fee_gauge = sheet.gauge("protocol_fees_usd", "The protocol's fees in all usage so far (USD)");
            set(&fee_gauge, vec![], usd(fees));
            let leases = sheet.gauge("leases_running", "Leases running now, on every node");
            set(&leases, vec![], running as f64);
        }
        Ok(())
    }
}

/// The most custom resources of one node shown, beside CPU, GPU and memory (past them
/// they are left out).
const MAX_RESOURCES_PER_NODE: usize = 16;

/// A provider's text as a label value: at most 64 bytes (a model name, a resource).
pub(crate) fn label_text(text: &str) -> String {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// One job's bill so far (micro-USD) and its leases running now.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobBill {
    pub cost: u64,
    pub fee: u64,
    pub leases: u64,
}

/// Usage summed for a view ([`HeadMetrics::usage_totals`]).
#[derive(Debug, Default)]
pub struct UsageTotals {
    /// By job and paying account.
    pub by_job: BTreeMap<(JobId, String), JobBill>,
    /// What each node earned its wallet (micro-USD; the payer pays the fee on top).
    pub by_node: BTreeMap<(NodeId, String), u64>,
    /// Fees and leases running, in all (whatever the view).
    pub fees: u64,
    pub running: u64,
}

/// A job's payer as metering bills it.
pub(crate) fn payer(account: &str) -> String {
    if account.trim().is_empty() {
        DEFAULT_PAYER.to_string()
    } else {
        account.to_string()
    }
}
