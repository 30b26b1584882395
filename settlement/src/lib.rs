//! ionet-settlement: metering, the double-entry ledger and epoch settlement.
//!
//! Every lease of resources on a rented node (a task's, an actor's, a placement-group
//! bundle's) ends in a [`UsageRecord`] made by the control plane, never by the provider:
//! who pays (`payer_account`), who supplied the node (`provider_wallet`), what was
//! leased, from when to when on the control-plane clock, and at what price. Records go
//! to [`MeterSink`]s: the ledger ([`LedgerHandle`]) and any exporter
//! ([`JsonLinesExporter`]).
//!
//! The [`Ledger`] is double-entry. Accounts are payers (prepaid credits, 1 credit =
//! 1 USD = 1,000,000 micro-USD), providers (by wallet), the protocol treasury and an
//! external funding account through which deposits, refunds and reward emissions
//! enter and leave, so every balance sums to zero, always. Amounts are integer
//! micro-USD ([`MicroUsd`](ionet_common::resources::MicroUsd)).
//!
//! Per epoch, [`Ledger::settle_epoch`] takes every pending record ending by the
//! epoch's end, credits each provider its usage at its price, debits the payer that
//! plus the protocol fee (basis points, default 250) credited to the treasury, and
//! splits the availability-reward pool among providers by verified uptime × GPUs. A
//! payer short of credit goes into debt (a negative balance); nothing is dropped.
//! Debits equal credits plus fee, exactly: see `src/ledger/README.md` for the rounding
//! rule and the guarantees.
//!
//! Layout: [`two_party`] (a lease's two sides, node and holder, and the span a record
//! may bill: pure, property-tested), [`usage`] (records and their exact cost), [`meter`] (sinks),
//! [`ledger::plan`] (settlement as a pure function from pending records and balances to
//! entries), [`ledger::store`] (the [`LedgerStore`] trait, atomic commits, the
//! in-memory backend) and [`ledger::redb_store`] (the embedded-file backend, default
//! in a deployment). The control store (`ionet-gcs`) owns a [`LedgerHandle`], feeds it
//! records as leases end and calls `settle_epoch` at each epoch boundary with the
//! uptime its heartbeats verified; the CLI (`ionet usage/ledger/settle/credits/
//! earnings`) reads the same API. Nothing here does network I/O or reads a clock,
//! except [`solana`] (feature `solana`): paying each settled epoch's provider earnings
//! out in SOL or an SPL token, crash-safe and at most once (`src/solana/README.md`).

pub mod error;
mod fast_hash;
pub mod ledger;
pub mod meter;
#[cfg(feature = "solana")]
pub mod solana;
pub mod two_party;
pub mod usage;

pub use error::{SettlementError, SettlementResult};
pub use ledger::{
    Account, EntryKind, EpochSpec, EpochSummary, Ledger, LedgerConfig, LedgerEntry, LedgerHandle, LedgerStore,
    MemoryStore, NodeAvailability, ProviderEarnings, RedbStore, SettleOutcome, SettleStep, SettlementPlan,
};
pub use meter::{read_json_lines, JsonLinesExporter, MeterFanout, MeterSink};
pub use usage::{RecordId, UsageRecord};
