//! The `ionet` command line: argument definitions and the dispatch to each command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ionet", version, about = "ionet: a task and actor runtime for rented, heterogeneous GPUs")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the head (--head) or a node daemon that joins a head (--address).
    Start(StartArgs),
    /// Show the cluster's nodes (or its actors, with --actors).
    Status(StatusArgs),
    /// List cluster state: `ionet list actors`.
    #[command(subcommand)]
    List(ListCommand),
    /// Counts of the cluster's state: `ionet summary tasks [--job J]`.
    #[command(subcommand)]
    Summary(SummaryCommand),
    /// Tasks that ran, as a Chrome trace (open in Perfetto): `ionet timeline --job J -o trace.json`.
    Timeline(crate::state_commands::TimelineArgs),
    /// Who holds which object, on which node, how large, and why it is alive (Ray's `ray
    /// memory`).
    Memory(crate::object_commands::ObjectFilterArgs),
    /// Stop the daemons this machine started (found through the session directory).
    Stop(StopArgs),
    /// Give a node notice to leave: `ionet drain --node 3f2a --deadline 60s`. It takes no
    /// new leases, its actors restart elsewhere, its running tasks may finish until the
    /// deadline, then it leaves (the operator's admin credential).
    Drain(DrainArgs),
    /// Trust a node again that repeated failed GPU checks marked untrusted: `ionet trust
    /// --node 3f2a` (the operator's admin credential). It takes work again once its latest
    /// check passed; if that failed, it is checked again at once.
    Trust(TrustArgs),
    /// Usage records the head metered (ended and open leases).
    Usage(UsageArgs),
    /// What a job's workers printed: `ionet logs --job 00000001 [--node 3f2a] [--follow]`
    /// (each line as its driver shows it, `(task pid=…, ip=…) line`).
    Logs(LogsArgs),
    /// Submitted jobs (the head's job server, as `ray job`): `ionet job submit -- python
    /// train.py`, `status`, `logs --follow`, `stop`, `list`, `delete`; and a job's bill,
    /// `ionet job cost 00000001` (live while it runs; --json or --csv for a receipt).
    #[command(subcommand)]
    Job(JobCommand),
    /// The settlement ledger.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Close a settlement epoch now: debit payers, credit providers and the treasury.
    Settle(SettleArgs),
    /// A provider's earnings per settled epoch.
    Earnings(EarningsArgs),
    /// On-chain payouts of settled epochs (a head started with --payout-rpc-url).
    Payouts(PayoutsArgs),
    /// A local Solana chain to pay providers on: `ionet devnet start` (the in-process
    /// runtime behind JSON-RPC on loopback, with a funded payout authority and a test
    /// dollar; `ionet stop` stops it). Needs a binary built with the `devnet` feature.
    #[command(subcommand)]
    Devnet(DevnetCommand),
    /// Solana wallets: `ionet wallet new FILE` makes a provider's payout keypair and prints
    /// its address; `ionet wallet balance ADDRESS` reads what it holds of the payout asset.
    #[command(subcommand)]
    Wallet(WalletCommand),
    /// Prepaid credits of payer accounts (1 credit = 1 USD).
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Price GPUs on the live cluster: the cheapest free GPUs now, against list price.
    Quote(QuoteArgs),
    /// Tokens the operator hands out: `ionet token create --role node --ttl 24h`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Tenant accounts: `ionet account create acme` prints its API key.
    #[command(subcommand)]
    Account(AccountCommand),
}

#[derive(Debug, Args, Clone)]
pub struct DrainArgs {
    /// The node: its id or a prefix of it (as `ionet status` shows it).
    #[arg(long)]
    pub node: String,
    /// How long its running tasks may take to finish, e.g. 60s or 10m.
    #[arg(long, default_value = "60s")]
    pub deadline: String,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct TrustArgs {
    /// The node: its id or a prefix of it (as `ionet status` shows it).
    #[arg(long)]
    pub node: String,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct LogsArgs {
    /// The job (hex id, e.g. 00000001).
    #[arg(long, required_unless_present = "actor")]
    pub job: Option<String>,
    /// Only this actor's output: its id (or a prefix of it) or its name, as `ionet list
    /// actors` shows them (its job is then the actor's).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this node: its id or a prefix of it (as `ionet status` shows it).
    #[arg(long)]
    pub node: Option<String>,
    /// Keep printing what the workers print, until interrupted.
    #[arg(long)]
    pub follow: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Submit a command line to run on the cluster as a job's driver, on a node the head
    /// picks; follows its output until it ends (unless --no-wait).
    Submit(crate::job_commands::JobSubmitArgs),
    /// A submitted job's status.
    Status(crate::job_commands::JobStatusArgs),
    /// What a submitted job's entrypoint printed (its drivers print their workers' lines).
    Logs(crate::job_commands::JobLogsArgs),
    /// Stop a submitted job (its entrypoint, then every job it started).
    Stop(crate::job_commands::JobStopArgs),
    /// Submitted jobs (a tenant sees its own account's).
    List(crate::job_commands::JobListArgs),
    /// Forget a submitted job that ended, and its output.
    Delete(crate::job_commands::JobDeleteArgs),
    /// Every lease of the job so far, with node, GPU model, seconds, price, cost and fee.
    Cost(JobCostArgs),
}

#[derive(Debug, Args, Clone)]
pub struct JobCostArgs {
    /// The job (hex id, e.g. 00000001).
    pub job: String,
    /// The receipt as JSON.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// The receipt as CSV, one lease a line.
    #[arg(long)]
    pub csv: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// An API key for a tenant account: its drivers start jobs paid by it.
    Create(AccountCreateArgs),
}

#[derive(Debug, Args, Clone)]
pub struct AccountCreateArgs {
    /// The account (its jobs' payer in the ledger).
    pub name: String,
    /// How long the key is valid: seconds, or with a unit (`30d`).
    #[arg(long, default_value = "365d")]
    pub ttl: String,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// A signed, expiring token; `--role node` lets one machine join as a node.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args, Clone)]
pub struct TokenCreateArgs {
    /// What the token is for: `node` (a machine joining the cluster), `metrics` (a
    /// Prometheus scraper of the head: reads its `/metrics`, nothing else) or
    /// `node-metrics` (a scraper of node daemons: reads theirs through the head, and the
    /// head's public face).
    #[arg(long, default_value = "node")]
    pub role: String,
    /// How long it is valid: seconds, or with a unit (`30m`, `24h`, `7d`).
    #[arg(long, default_value = "24h")]
    pub ttl: String,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct SessionArgs {
    /// Session directory (pid files, logs, head address, admin credential). Default:
    /// <temp dir>/ionet-<uid>/session_latest (this user's alone, mode 0700).
    #[arg(long = "temp-dir", env = "IONET_SESSION_DIR", global = true)]
    pub temp_dir: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
#[command(args_override_self = true)]
pub struct StartArgs {
    /// Start the head: the control store plus a node daemon.
    #[arg(long, conflicts_with = "address")]
    pub head: bool,
    /// Join the head at HOST:PORT (https://HOST:PORT for a head serving TLS).
    #[arg(long)]
    pub address: Option<String>,
    /// Joining a head that serves TLS: the SHA-256 of its cluster CA, as `ionet start
    /// --head` prints it (`sha256:<hex>`). The node trusts the head only if the CA it
    /// presents has this hash.
    #[arg(long = "ca-hash", requires = "address")]
    pub ca_hash: Option<String>,
    /// Head: serve TLS even when bound to loopback (anything else is TLS always). The
    /// head makes the cluster CA at its first start and certifies each node at join.
    #[arg(long, conflicts_with = "address")]
    pub tls: bool,
    /// Port of the control store (head only; 0 picks a free one).
    #[arg(long, default_value_t = 6380)]
    pub port: u16,
    /// Port of the head's job server (Ray's Jobs REST API; 0 picks a free one). Default
    /// 8265, or a free one when 8265 is taken (the session's `job_server_address` says
    /// which).
    #[arg(long = "dashboard-port")]
    pub dashboard_port: Option<u16>,
    /// Port of this node's daemon (0 picks a free one). Fixed, a daemon restarted on the
    /// same machine comes back at the address drivers and the cluster already know.
    #[arg(long = "node-manager-port", default_value_t = 0)]
    pub node_manager_port: u16,
    /// Port of this node's Prometheus metrics (`/metrics`; 0 picks a free one: the head
    /// lists every node's at `/api/prometheus/targets` for Prometheus to discover).
    #[arg(long = "metrics-port", visible_alias = "metrics-export-port", default_value_t = 0)]
    pub metrics_port: u16,
    /// Address the servers bind to. Loopback by default; bound to anything else, they
    /// speak TLS only (a node there joins a head serving TLS).
    #[arg(long = "bind", visible_alias = "host", default_value = "127.0.0.1")]
    pub host: String,
    /// Address other machines use to reach this one (default: found from the route to the head).
    #[arg(long = "node-ip-address")]
    pub node_ip_address: Option<String>,
    /// Where the control store keeps its tables (head only): an embedded database file,
    /// or a Redis server (`redis://host:port/db`). A head restarted on the same storage
    /// keeps its jobs, KV, nodes, actors and placement groups.
    #[arg(long)]
    pub storage: Option<String>,
    /// The other heads sharing this Redis `--storage` (`host:port,...`), as their node
    /// daemons and drivers reach them: one head is active, holding the head lease; the
    /// others stand by (serving nothing) and take over when it lapses. Node daemons and
    /// drivers are given every head's address (`--address a,b`) and follow the active one.
    #[arg(long = "other-heads")]
    pub other_heads: Option<String>,
    /// How long the head lease on Redis lasts unless the active head renews it (it
    /// renews every third of it): a standby takes over at most this long after the
    /// active head dies.
    #[arg(long = "head-lease", default_value = "5s")]
    pub head_lease: String,
    /// Settlement ledger file (head only). Default: <session dir>/ledger.redb.
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Also append every usage record to this file as JSON lines (head only).
    #[arg(long = "usage-export")]
    pub usage_export: Option<PathBuf>,
    /// How long a payer's credit must cover its running leases at their prices, after
    /// what it already owes, for its jobs to get new leases (head only; e.g. `10m`, the
    /// default, `90s`). At zero credit its running leases end.
    #[arg(long = "credit-horizon")]
    pub credit_horizon: Option<String>,
    #[command(flatten)]
    pub payout: PayoutArgs,
    /// Let the head's own node daemon run tasks and actors even though the head pays out
    /// on chain (by default a head with `--payout-rpc-url` takes no leases: the process
    /// holding the payout keypair runs no tenant code).
    #[arg(long = "allow-head-workloads")]
    pub allow_head_workloads: bool,
    /// First id for jobs' workers on this machine: a daemon started as root runs each
    /// job's workers as a uid of their own (and each account's as a group of its own),
    /// taken in order from here and never reused.
    #[arg(long = "worker-uid-base", default_value_t = crate::identities::DEFAULT_UID_BASE)]
    pub worker_uid_base: u32,
    /// INSECURE: run jobs' workers as the daemon's own user even when it is root, so that
    /// tenant code can read the node's key, the session and every job's objects. Only for
    /// a machine whose sole tenant is its operator.
    #[arg(long = "insecure-workers-as-daemon-user")]
    pub workers_as_daemon_user: bool,
    /// A node's join token (`ionet token create --role node` on the head). Default, on
    /// the operator's own machine: the admin credential in the session directory.
    #[arg(long = "join-token", env = "IONET_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The node's private key (created there, mode 0600, on first start). Default:
    /// `node_key` in the session directory.
    #[arg(long = "node-key")]
    pub node_key: Option<PathBuf>,
    /// Configuration file (TOML); IONET_* variables override it.
    #[arg(long, env = "IONET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Shared memory for this node's object store, e.g. 8GiB (default: 30% of memory).
    #[arg(long = "object-store-memory")]
    pub object_store_memory: Option<String>,
    /// Stay in the foreground until stopped.
    #[arg(long)]
    pub block: bool,
    /// Seconds a node waits for its first registration before giving up.
    #[arg(long, default_value_t = 30)]
    pub connect_timeout: u64,
    /// Notice to leave (SIGTERM): seconds a node lets its running tasks finish, taking no
    /// new leases, before it leaves (its actors restart elsewhere at once).
    #[arg(long = "drain-deadline", default_value_t = 30)]
    pub drain_deadline: u64,
    #[command(flatten)]
    pub resources: ResourceArgs,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// Paying settled epochs out on Solana (head only; needs a binary built with the
/// `solana` feature).
#[derive(Debug, Args, Clone, Default)]
pub struct PayoutArgs {
    /// Solana RPC node the head pays through, e.g. https://api.mainnet-beta.solana.com.
    #[arg(long = "payout-rpc-url", env = "IONET_PAYOUT_RPC_URL")]
    pub rpc_url: Option<String>,
    /// Keypair file (Solana CLI JSON) of the paying authority.
    #[arg(long = "payout-keypair", env = "IONET_PAYOUT_KEYPAIR", requires = "rpc_url")]
    pub keypair: Option<PathBuf>,
    /// What providers are paid in: sol:<lamports per USD> or spl:<mint>:<decimals>
    /// (USDC on mainnet: spl:EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v:6).
    #[arg(long = "payout-asset", env = "IONET_PAYOUT_ASSET", requires = "rpc_url")]
    pub asset: Option<String>,
    /// Payout state file (signed transactions, kept before sending). Default:
    /// <session dir>/payouts.redb.
    #[arg(long = "payout-store")]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DevnetCommand {
    /// Start the local chain in the background, funded, and print the head's payout flags.
    Start(crate::devnet::DevnetStartArgs),
}

#[derive(Debug, Subcommand)]
pub enum WalletCommand {
    /// Write a new keypair to FILE (Solana CLI format, mode 0600) and print its address.
    New(crate::devnet::WalletNewArgs),
    /// What an address holds of the payout asset, read from a Solana RPC node.
    Balance(crate::devnet::WalletBalanceArgs),
}

#[derive(Debug, Args, Clone, Default)]
pub struct ResourceArgs {
    /// CPUs to offer (default: detected). Fractions allowed.
    #[arg(long = "num-cpus")]
    pub num_cpus: Option<String>,
    /// GPUs to offer (default: detected through the CUDA driver).
    #[arg(long = "num-gpus")]
    pub num_gpus: Option<u32>,
    /// GPU model, e.g. A100-80GB, H100, RTX4090.
    #[arg(long = "gpu-type")]
    pub gpu_type: Option<String>,
    /// Memory of each GPU, e.g. 80GB (default: known for common models).
    #[arg(long = "gpu-memory")]
    pub gpu_memory: Option<String>,
    /// Memory to offer, e.g. 64GiB (default: detected).
    #[arg(long)]
    pub memory: Option<String>,
    /// Custom resources as JSON, e.g. '{"nvlink": 1}'.
    #[arg(long)]
    pub resources: Option<String>,
    /// Node labels, e.g. region=eu,provider=acme.
    #[arg(long)]
    pub labels: Option<String>,
    /// Price asked per GPU-hour in USD, e.g. 1.20.
    #[arg(long = "price-per-gpu-hour")]
    pub price_per_gpu_hour: Option<String>,
    /// Price asked per CPU-hour in USD, e.g. 0.02.
    #[arg(long = "price-per-cpu-hour")]
    pub price_per_cpu_hour: Option<String>,
    /// Power the machine draws, in watts (reported as power cost beside earnings).
    #[arg(long = "power-watts")]
    pub power_watts: Option<u64>,
    /// What the provider pays for electricity, in USD per kWh, e.g. 0.15.
    #[arg(long = "electricity-price")]
    pub electricity_price: Option<String>,
    /// Payout wallet of the provider.
    #[arg(long)]
    pub wallet: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// Control store address (default: this machine's session's head).
    #[arg(long)]
    pub address: Option<String>,
    /// The credential to read with: an account's API key, or the admin credential.
    /// Default: the admin credential the head wrote into this machine's session directory.
    #[arg(long, env = "IONET_CREDENTIAL", hide_env_values = true)]
    pub credential: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    /// Show the actors instead of the nodes.
    #[arg(long)]
    pub actors: bool,
    /// With --actors: include dead actors.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub session: SessionArgs,
}

#[derive(Debug, Args, Clone)]
pub struct StopArgs {
    /// Kill at once (SIGKILL) instead of draining (SIGTERM).
    #[arg(long)]
    pub force: bool,
    /// Seconds to wait for a daemon to drain before killing it (past a node's default
    /// drain deadline).
    #[arg(long, default_value_t = 40)]
    pub grace_period: u64,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// How a client command finds the head: as `ionet status` does.
#[derive(Debug, Args, Clone)]
pub struct HeadArgs {
    /// Control store address (default: this machine's session's head).
    #[arg(long)]
    pub address: Option<String>,
    /// The credential to call with: the admin credential for the operator's calls
    /// (credits, settle, tokens), an account's API key for reading. Default: the admin
    /// credential the head wrote into this machine's session directory.
    #[arg(long, env = "IONET_CREDENTIAL", hide_env_values = true)]
    pub credential: Option<String>,
    #[command(flatten)]
    pub session: SessionArgs,
}

#[derive(Debug, Args, Clone)]
pub struct UsageArgs {
    /// Only this job (hex id, e.g. 00000001).
    #[arg(long)]
    pub job: Option<String>,
    /// Only this node (hex id).
    #[arg(long)]
    pub node: Option<String>,
    /// Under each record, who said the lease started and ended, when, and which word
    /// counted (a record runs only while both the node and the lease's holder say so).
    #[arg(long)]
    pub explain: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Subcommand)]
pub enum ListCommand {
    /// Nodes, dead ones too: state, address, GPUs, price.
    Nodes(crate::list_commands::ListArgs),
    /// Jobs your account pays for (the operator: all): DRIVER or SUBMISSION, status.
    Jobs(crate::list_commands::ListArgs),
    /// Placement groups: state, strategy, each bundle's node and resources.
    #[command(name = "placement-groups")]
    PlacementGroups(crate::list_commands::ListArgs),
    /// Actors: state, node, resources, restarts, cause of death.
    Actors(ListActorsArgs),
    /// Tasks as their owners reported them: state, node, attempt, why one waits, what one
    /// failed with (`--job J --state FAILED --json`).
    Tasks(crate::state_commands::ListTasksArgs),
    /// Objects and who holds them: size, why alive, holder's process and node, where
    /// stored (asked now of every node and driver).
    Objects(crate::object_commands::ListObjectsArgs),
}

#[derive(Debug, Subcommand)]
pub enum SummaryCommand {
    /// How many tasks of each name are in each state.
    Tasks(crate::state_commands::TaskFilterArgs),
    /// Objects and bytes by why they are alive.
    Objects(crate::object_commands::ObjectFilterArgs),
}

#[derive(Debug, Args, Clone)]
pub struct ListActorsArgs {
    /// Include dead actors.
    #[arg(long)]
    pub all: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Every account's balance (they sum to zero).
    Balances(BalancesArgs),
}

#[derive(Debug, Args, Clone)]
pub struct BalancesArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct SettleArgs {
    /// Show what settling now would post, without posting it.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct EarningsArgs {
    /// The provider's payout wallet.
    #[arg(long)]
    pub wallet: String,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct PayoutsArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Buy prepaid credits for a payer account.
    Add(CreditsAddArgs),
    /// Return a payer account's unused credits.
    Refund(CreditsRefundArgs),
    /// Where to pay in (the payout asset, with the memo `ionet:<account>`): each landed
    /// transfer is credited once.
    DepositAddress(DepositsArgs),
    /// The deposits seen at the deposit address (a tenant sees its own; the operator
    /// every one, held ones included).
    Deposits(DepositsArgs),
}

#[derive(Debug, Args, Clone)]
pub struct DepositsArgs {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct CreditsAddArgs {
    #[arg(long)]
    pub account: String,
    /// Amount in USD, e.g. 100 or 12.50.
    #[arg(long, allow_hyphen_values = true)]
    pub amount: String,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct CreditsRefundArgs {
    #[arg(long)]
    pub account: String,
    #[command(flatten)]
    pub head: HeadArgs,
}

#[derive(Debug, Args, Clone)]
pub struct QuoteArgs {
    /// How many GPUs.
    #[arg(long)]
    pub gpus: u32,
    /// GPU model, e.g. A100-80GB (default: any).
    #[arg(long = "gpu-type")]
    pub gpu_type: Option<String>,
    /// Least memory per GPU, e.g. 40GB.
    #[arg(long = "min-gpu-memory")]
    pub min_gpu_memory: Option<String>,
    /// Only nodes labelled with this region.
    #[arg(long)]
    pub region: Option<String>,
    /// Highest price per GPU-hour in USD, e.g. 2.0.
    #[arg(long = "max-price")]
    pub max_price: Option<String>,
    /// For how many hours (fractions allowed).
    #[arg(long, default_value_t = 1.0)]
    pub hours: f64,
    /// What cheapest means: `price` per GPU-hour, or `per-tflop`: price per TFLOP-hour
    /// (the GPU's FP32 TFLOPS as the head measured them; published figures for simulated
    /// GPUs).
    #[arg(long, default_value = "price", value_parser = ["price", "per-tflop"])]
    pub rank: String,
    /// Only nodes whose reliability score (uptime, GPU checks, leases lost to the node's
    /// death; as `ionet status` shows it) is at least this share, e.g. 0.95.
    #[arg(long = "min-reliability")]
    pub min_reliability: Option<f64>,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub head: HeadArgs,
}

/// Runs one parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    use crate::{commands, metering_commands, quote_command};
    match cli.command {
        Command::Start(args) => commands::start(args),
        Command::Status(args) => commands::status(args),
        Command::List(ListCommand::Actors(args)) => commands::list_actors(args),
        Command::List(ListCommand::Tasks(args)) => crate::state_commands::list_tasks(args),
        Command::Summary(SummaryCommand::Tasks(args)) => crate::state_commands::summary_tasks(args),
        Command::Timeline(args) => crate::state_commands::timeline(args),
        Command::List(ListCommand::Objects(args)) => crate::object_commands::list_objects(args),
        Command::List(ListCommand::Nodes(args)) => crate::list_commands::list(crate::list_commands::Table::Nodes, args),
        Command::List(ListCommand::Jobs(args)) => crate::list_commands::list(crate::list_commands::Table::Jobs, args),
        Command::List(ListCommand::PlacementGroups(args)) => {
            crate::list_commands::list(crate::list_commands::Table::PlacementGroups, args)
        }
        Command::Summary(SummaryCommand::Objects(args)) => crate::object_commands::summary_objects(args),
        Command::Memory(args) => crate::object_commands::memory(args),
        Command::Stop(args) => commands::stop(args),
        Command::Drain(args) => commands::drain(args),
        Command::Trust(args) => commands::trust(args),
        Command::Logs(args) => commands::logs(args),
        Command::Usage(args) => metering_commands::usage(args),
        Command::Job(JobCommand::Cost(args)) => metering_commands::job_cost(args),
        Command::Job(JobCommand::Submit(args)) => crate::job_commands::submit(args),
        Command::Job(JobCommand::Status(args)) => crate::job_commands::status(args),
        Command::Job(JobCommand::Logs(args)) => crate::job_commands::logs(args),
        Command::Job(JobCommand::Stop(args)) => crate::job_commands::stop(args),
        Command::Job(JobCommand::List(args)) => crate::job_commands::list(args),
        Command::Job(JobCommand::Delete(args)) => crate::job_commands::delete(args),
        Command::Ledger(LedgerCommand::Balances(args)) => metering_commands::balances(args),
        Command::Settle(args) => metering_commands::settle(args),
        Command::Earnings(args) => metering_commands::earnings(args),
        Command::Payouts(args) => metering_commands::payouts(args),
        Command::Devnet(DevnetCommand::Start(args)) => crate::devnet::devnet_start(args),
        Command::Wallet(WalletCommand::New(args)) => crate::devnet::wallet_new(args),
        Command::Wallet(WalletCommand::Balance(args)) => crate::devnet::wallet_balance(args),
        Command::Credits(CreditsCommand::Add(args)) => metering_commands::credits_add(args),
        Command::Credits(CreditsCommand::Refund(args)) => metering_commands::credits_refund(args),
        Command::Credits(CreditsCommand::DepositAddress(args)) => metering_commands::deposits(args, true),
        Command::Credits(CreditsCommand::Deposits(args)) => metering_commands::deposits(args, false),
        Command::Quote(args) => quote_command::quote(args),
        Command::Token(TokenCommand::Create(args)) => commands::token_create(args),
        Command::Account(AccountCommand::Create(args)) => commands::account_create(args),
    }
}
