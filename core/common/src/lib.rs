//! ionet: a Rust-native task and actor runtime for ML work on rented, heterogeneous GPUs.
//!
//! This crate is what users depend on. Today it holds the vocabulary every other
//! crate shares:
//!
//! - [`ids`]: fixed-size binary ids (job, node, worker, task, actor, object,
//!   placement group), hex on display;
//! - [`resources`]: exact fixed-point resource quantities (`GPU` down to 1/10000)
//!   and resource sets, prices in integer micro-USD;
//! - [`config`]: cluster configuration from defaults, a TOML file and `IONET_*`
//!   environment variables;
//! - [`auth`]: the bearer credential every RPC carries; [`credential`]: credentials the
//!   head signs (the admin's); [`authz`]: the one authorization table, enforced in front
//!   of every server; [`files`]: private files and directories for secrets;
//! - [`rpc`]: the wire protocol generated from `core/common/proto/*.proto` (tonic + prost),
//!   authenticated channel helpers and the one error ↔ gRPC status mapping;
//! - [`lease`]: the one lease requester (tasks and actors) and its typed outcome;
//! - [`worker_env`]: the worker-process protocol (what a daemon tells a worker it starts);
//! - [`gpu_proof`]: the compute and memory challenges by which the head checks that a
//!   node's GPUs are what its provider declares (prover and verifier, CPU backend);
//! - [`error`]: [`IonetError`], the error every layer converts into.
//!
//! How the processes talk: node daemons register with the global control store
//! (`ionet-gcs`) and heartbeat their available resources to it; the control store
//! keeps the node, job and KV tables and publishes changes on a stream. The task
//! API (`init`, `remote`, `get`, `put`, actors) builds on these pieces.

pub mod auth;
pub mod authz;
pub mod clock;
pub mod config;
pub mod credential;
pub mod error;
pub mod failover;
pub mod files;
pub mod gpu_proof;
pub mod ids;
pub mod jobs;
pub mod lease;
pub mod reliability;
pub mod resources;
pub mod rpc;
pub mod rpc_metrics;
pub mod task_event_batch;
pub mod tls;
pub mod worker_env;

pub use error::{IonetError, IonetResult};
pub use ids::{ActorId, JobId, LeaseId, NodeId, ObjectId, PlacementGroupId, TaskId, WorkerId};
pub use resources::{Quantity, ResourceSet};
