//! ionet: a Rust-native task and actor runtime for ML work on rented, heterogeneous GPUs.
//!
//! ```ignore
//! #[ionet::remote]
//! fn square(x: u64) -> u64 { x * x }
//!
//! fn main() -> ionet::IonetResult<()> {
//!     ionet::init(ionet::InitConfig::default())?;       // embedded local cluster
//!     let refs: Vec<_> = (0..100).map(|i| square::remote(i)).collect();
//!     let squares = ionet::get_all(&refs)?;
//!     ionet::shutdown();
//!     Ok(())
//! }
//! ```
//!
//! - [`init`] joins a cluster (`address`) or starts an embedded one (head + node daemon
//!   in this process). Call it first in `main`: worker processes are the same binary
//!   re-executed, and there `init` serves tasks and never returns.
//! - `#[ionet::remote]` on a function generates `f::remote(args)` and
//!   `f::options(TaskOptions).remote(args)`, returning a typed [`ObjectRef`]; arguments
//!   are values or refs (the task starts once they exist).
//! - [`placement_group`] reserves bundles of resources together over nodes;
//!   `TaskOptions::placement_group(&group, index)` runs a task inside bundle `index`.
//! - [`get`], [`get_all`], [`get_timeout`], [`put`], [`wait`] read and write objects.
//! - Errors a caller can match on are [`IonetError`] variants: `TaskFailed` (the remote
//!   message, function and node), `WorkerCrashed` (after `max_retries`), `Timeout`,
//!   `ObjectLost` (every copy gone and it cannot be made again from its lineage),
//!   `OwnerDied`, `Infeasible`.
//!
//! The shared vocabulary (ids, resources, protocol) is re-exported from `ionet-common`.

extern crate self as ionet;

pub mod actor;
mod actor_client;
mod actor_policy;
mod actor_pool;
mod actor_rows;
mod api;
mod blocked;
mod borrows;
mod channels;
mod cluster_info;
mod context;
mod executor;
pub mod generator;
mod held;
mod init;
pub mod inline;
mod lease_pool;
mod lineage;
mod memory;
mod object_ref;
mod object_store;
mod options;
mod output;
mod owner;
mod placement_group;
pub mod raw;
mod runtime;
mod runtime_env;
mod service;
mod slots;
pub mod state;
mod submit;
pub mod task;
mod task_events;
mod task_stream;
pub mod testing;

pub use actor::{create_actor, exit_actor, get_actor, kill, ActorClassHandle, ActorHandle, ActorOptions};
pub use actor_pool::ActorPool;
pub use api::{
    cancel, get, get_all, get_bytes, get_record_batch, get_timeout, nodes, put, put_bytes, put_record_batch, wait,
    wait_flags, ObjectBytes,
};
pub use arrow_array;
pub use cluster_info::{
    ActorInfo, ActorState, Gpu, Node, NodeState, PlacementGroup, PlacementGroupInfo, PlacementGroupState,
    PlacementStrategy,
};
pub use context::{
    current_task_id, get_gpu_ids, get_runtime_context, is_canceled, set_cancel_hook, CancelHook, RuntimeContext,
};
pub use generator::{stream, stream_with_backpressure, GeneratorSink, ObjectRefGenerator};
pub use init::{init, is_initialized, shutdown, InitConfig, WORKER_ARGV_ENV};
pub use ionet_common::*;
pub use ionet_macros::{actor, remote};
pub use object_ref::{collect_contained, Arg, IntoArg, ObjectRef};
pub use options::{bundle_from_ray, retries_from_ray, SchedulingStrategy, TaskOptions, ANY_BUNDLE};
pub use placement_group::{
    detached_placement_group, named_placement_group, placement_group, placement_group_info, placement_group_table,
    placement_group_with, remove_placement_group, PlacementGroupOptions,
};

#[doc(hidden)]
pub use inventory;
#[doc(hidden)]
pub use serde;
