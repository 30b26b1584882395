//! ionet-gcs: the global control store (GCS), served by the head.
//!
//! Data model: a node table (one row per node daemon: address, total and available
//! resources, GPUs, labels, price, payout wallet, state ALIVE → DRAINING → DEAD), a job
//! table (ids assigned in sequence), a namespaced internal KV, and a pub/sub stream of
//! membership changes (node added, drained, dead; job started, finished).
//!
//! How it talks: node daemons call `RegisterNode` once and heartbeat each interval
//! their available resources change, every quarter of the timeout otherwise
//! (`HeartbeatStream`, answered only with news, or `Heartbeat` calls); a health
//! task declares dead any node silent past the timeout (not counting time the head
//! itself stood still) and publishes it. Drivers add jobs and read the tables; any
//! node, account or job may `Subscribe`. The GCS is never on the per-task
//! path: it holds membership, not work.
//!
//! Layout: [`state`] holds the tables and every rule that changes them; [`service`]
//! is the thin tonic adapter; [`storage`] is the backend trait with an in-memory and
//! an embedded-file (redb) implementation; [`server`] wires them to a socket behind the
//! authorization layer, with the health task. The head's own calls out (bundles to node
//! daemons, actors into workers) carry an admin credential it issues itself; an actor's
//! lease is asked with a credential of the actor's job, which its worker is given.
//!
//! Metering ([`metering`], served by [`metering_service`] on the same socket): node
//! daemons report leases starting and ending; the control store stamps both with its own
//! clock, joins the node and job tables into usage records, feeds them to the
//! `ionet-settlement` ledger (and an optional JSON-lines export) and settles each epoch.
//!
//! Payouts ([`payouts`], feature `solana`): a background task pays each settled epoch's
//! provider earnings on Solana and posts what landed back to the ledger.
//!
//! Actors ([`actors`]): the actor table; the control store places each actor on a worker it
//! leases, watches the worker and the owner, and restarts or buries the actor.
//!
//! Placement groups ([`placement_groups`]): a table of groups of resource bundles, placed by a
//! background task with the scheduler's solver and reserved on the node daemons in two phases
//! (prepare on all, then commit; cancel the prepared ones on any refusal).
//!
//! Submitted jobs ([`submissions`], served by [`job_server`]: Ray's Jobs REST API over
//! HTTP): the head places each entrypoint on a node, which runs it under a submission
//! credential and streams its output back; the head keeps the output and the status.
//! The same HTTP server answers Prometheus at `/metrics` ([`metrics`]: nodes, work and
//! money, each credential shown its own part).
//!
//! Actors and placement groups are written to storage with every change and taken back
//! when the head starts ([`actors::Actors::restore`],
//! [`placement_groups::PlacementGroups::restore`]), so a restarted head loses neither.

pub mod actors;
pub mod dashboard;
pub mod error;
pub mod gpu_checks;
pub mod http;
pub mod job_server;
pub mod metering;
pub mod metering_service;
pub mod metrics;
mod node_changes;
pub mod node_scrape;
pub mod objects;
pub mod packages;
#[cfg(feature = "solana")]
pub mod payouts;
pub mod placement_groups;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod submissions;
pub mod task_events;

pub use error::{GcsError, GcsResult};
pub use metering::{Metering, MeteringOptions};
pub use placement_groups::{BundleAgent, GrpcBundleAgent, PlacementGroups};
pub use server::{GcsServer, GcsServerOptions};
pub use service::HeadTls;
pub use state::GcsState;
pub use storage::{GcsStorage, MemoryStorage, RedbStorage};
