//! ionet-worker: the node daemon and the `ionet` command-line binary.
//!
//! A node daemon runs on every machine of a cluster (the head runs one beside the
//! control store). It works out what the machine offers ([`node_spec`]: detected CPUs
//! and memory, GPUs found through the CUDA driver loaded at run time ([`gpu`]), or
//! what the operator declares), serves its own gRPC endpoint, registers with the
//! control store and heartbeats its available resources ([`node_daemon`]), and drains
//! on SIGTERM. It follows what each job's workers print for the job's driver ([`logs`]),
//! and runs the entrypoints of jobs submitted to the head's job server ([`entrypoints`]).
//!
//! The binary is thin: [`cli`] parses arguments, [`commands`] wires the parts
//! together. Daemons started on one machine find each other, and `ionet status` and
//! `ionet stop` find them, through the session directory ([`session`]). [`devnet`] runs a
//! local Solana chain to pay providers on and makes and reads their payout wallets.

pub mod cli;
pub mod cluster_view;
pub mod commands;
pub mod cuda_prover;
pub mod devnet;
pub mod entrypoints;
pub mod gpu;
pub mod gpu_check;
pub mod identities;
pub mod job_commands;
pub mod lease;
pub mod list_commands;
pub mod logging;
pub mod logs;
pub mod metering_commands;
pub mod node_daemon;
pub mod node_metrics;
pub mod node_spec;
pub mod object_commands;
pub mod objects;
pub mod packages;
pub mod pip_envs;
pub mod quote_command;
pub mod session;
pub mod state_commands;
pub mod status;
