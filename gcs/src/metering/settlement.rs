//! Epoch settlement: cutting the leases still open at an epoch's end, measuring each GPU
//! node's availability in the epoch, closing the epoch in the ledger, and the background
//! task that closes scheduled epochs. Settlements are serialised by `Metering::settling`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ionet_common::resources::GPU;
use ionet_common::rpc::proto::common::{GpuCheckState, NodeState};
use ionet_common::NodeId;
use ionet_settlement::{EpochSpec, EpochSummary, NodeAvailability, SettleOutcome};
use tokio::sync::watch;

use super::{wallet_of, Changes, Metering};
use crate::error::GcsResult;
use crate::state::blocking;
use crate::storage::Table;

/// Why `wallet`'s nodes earned no reward in `epoch_id` (empty: nothing was withheld, or
/// it is not known). Blocking: storage is read.
pub(super) fn withheld(storage: &dyn crate::storage::GcsStorage, epoch_id: u64, wallet: &str) -> Vec<String> {
    match storage.get(Table::Meta, &withheld_key(epoch_id, wallet)) {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Where why a wallet's rewards of an epoch were withheld is kept (`Meta` table, JSON).
fn withheld_key(epoch_id: u64, wallet: &str) -> Vec<u8> {
    let mut key = b"withheld/".to_vec();
    key.extend_from_slice(&epoch_id.to_be_bytes());
    key.push(b'/');
    key.extend_from_slice(wallet.as_bytes());
    key
}

impl Metering {
    /// Cuts every lease open before `end_ms` there: a record for the part before, the
    /// rest stays open as the next segment.
    async fn cut_open_leases(&self, end_ms: u64) -> GcsResult<()> {
        let changes = {
            let mut book = self.book();
            let mut changes = Changes::default();
            let mut cuts = Vec::new();
            for lease in book.open.values_mut() {
                if !lease.is_running() || lease.segment_start().is_none_or(|start| start >= end_ms) {
                    continue;
                }
                if let Some(made) = lease.record_until(end_ms, "epoch") {
                    cuts.push(made);
                    lease.segment_start = Some(end_ms);
                    lease.segment += 1;
                    changes.put_leases.push(lease.clone());
                }
            }
            for made in cuts {
                book.push(made.clone(), false);
                changes.records.push(made);
            }
            changes
        };
        self.apply(changes).await
    }

    /// Each GPU node's uptime in `(previous_end_ms, end_ms]`, reported with its power cost;
    /// it earns availability rewards only for real GPUs passing the head's check, from when
    /// they passed: none in an epoch with a failed check, never for simulated GPUs. With
    /// it, why each node not rewarded is not: `(wallet, "node 3f2a…: why")`.
    fn availability(&self, previous_end_ms: u64, end_ms: u64) -> (Vec<NodeAvailability>, Vec<(String, String)>) {
        let (mut availability, mut withheld) = (Vec::new(), Vec::new());
        for node in self.state.nodes(true) {
            let Ok(node_id) = NodeId::from_bytes(&node.node_id) else {
                continue;
            };
            let gpus = node.total.clone().unwrap_or_default().to_set().map(|total| total.get(GPU)).unwrap_or_default();
            if gpus.is_zero() {
                continue;
            }
            let check = node.gpu_check.clone().unwrap_or_default();
            let passing = check.state == GpuCheckState::Passed as i32 && check.passed_since_ms > 0;
            // Every reason that applies, the check's own first.
            let mut reasons = Vec::new();
            if check.untrusted_since_ms != 0 {
                reasons.push(ionet_common::gpu_proof::held_back_because(&check));
            } else if check.last_failed_at_ms > previous_end_ms {
                reasons.push(format!("it failed a GPU check this epoch: {}", check.reason));
            } else if check.state == GpuCheckState::Overdue as i32 {
                reasons.push(ionet_common::gpu_proof::held_back_because(&check));
            } else if !passing {
                reasons.push("its GPUs have not passed the head's check".to_string());
            }
            if check.simulated {
                reasons.push("its GPUs are simulated (declared, checked on the CPU): never rewarded".to_string());
            }
            let why = (!reasons.is_empty()).then(|| reasons.join("; "));
            let rewarded = why.is_none();
            let mut from = node.registered_at_ms.max(previous_end_ms);
            if rewarded {
                // From when it passed, and never for time it was untrusted (cleared since).
                from = from.max(check.passed_since_ms).max(check.cleared_at_ms);
            }
            let to = if node.state == NodeState::Dead as i32 { node.last_heartbeat_ms.min(end_ms) } else { end_ms };
            let provider_wallet = wallet_of(&node, &node_id);
            // Said only of a node that was there in the epoch (not of one long gone).
            if let Some(why) = why.filter(|_| to > from) {
                withheld.push((provider_wallet.clone(), format!("node {}: {why}", node_id.short())));
            }
            availability.push(NodeAvailability {
                node_id,
                provider_wallet,
                uptime_ms: to.saturating_sub(from),
                gpu_capacity: gpus,
                declared_watts: node.power_watts,
                electricity_price_per_kwh: node.electricity_price_per_kwh_micros,
                rewarded,
            });
        }
        (availability, withheld)
    }

    /// Closes the next epoch at `end_ms` (or plans it, when `dry_run`: open leases are
    /// then not cut, so the plan covers ended leases only). Serialised with every other
    /// settlement.
    pub async fn settle_at(&self, end_ms: u64, dry_run: bool) -> GcsResult<EpochSummary> {
        let _settling = self.settling.lock().await;
        let ledger = self.ledger.clone();
        let last = blocking(move || Ok(ledger.lock().epochs()?.last().cloned())).await?;
        let (epoch_id, previous_end) = match &last {
            Some(last) => (last.epoch_id + 1, last.end_ms),
            None => (0, 0),
        };
        let end_ms = end_ms.max(previous_end);
        // The first epoch's reward pool accrues from when metering began.
        let start_ms =
            if last.is_some() { previous_end } else { self.last_epoch_end_ms.load(Ordering::SeqCst).min(end_ms) };
        let (availability, withheld) = self.availability(previous_end, end_ms);
        let spec = EpochSpec { epoch_id, start_ms, end_ms, availability };
        let ledger = self.ledger.clone();
        if dry_run {
            return blocking(move || Ok(ledger.lock().dry_run(&spec)?.summary)).await;
        }
        self.cut_open_leases(end_ms).await?;
        let outcome = blocking(move || Ok(ledger.lock().settle_epoch(&spec)?)).await?;
        if let SettleOutcome::Settled(summary) = &outcome {
            // What the epoch charged is owed no more: it is in the balances now.
            {
                let mut book = self.book();
                for payer in &summary.payers {
                    if let Some(owed) = book.owed.get_mut(&payer.payer) {
                        *owed = owed.saturating_sub(payer.usage.saturating_add(payer.fee));
                    }
                }
            }
            // Why nodes earned no availability reward, for their providers' earnings (only
            // when there was a pool to earn from). Words, not money: kept beside the ledger.
            if self.state.config().reward_pool_per_hour_micros > 0 && !withheld.is_empty() {
                if let Err(err) = self.keep_withheld(epoch_id, withheld).await {
                    tracing::warn!(epoch = epoch_id, error = %err, "could not keep why rewards were withheld");
                }
            }
        }
        self.last_epoch_end_ms.store(end_ms, Ordering::SeqCst);
        self.settled.notify_one();
        if let Err(err) = self.forget_settled_dead_nodes(end_ms).await {
            tracing::warn!(error = %err, "could not forget the longest dead nodes; trying after the next epoch");
        }
        Ok(match outcome {
            SettleOutcome::Settled(summary) | SettleOutcome::AlreadySettled(summary) => summary,
        })
    }

    /// Forgets dead nodes past the head's limit whose accounts are closed: no lease open
    /// on them in the book, and their death no later than `settled_until_ms` (the end of
    /// an epoch closed since, which counted their availability to it).
    async fn forget_settled_dead_nodes(&self, settled_until_ms: u64) -> GcsResult<usize> {
        let busy: std::collections::HashSet<NodeId> = self.book().open.values().map(|lease| lease.node_id).collect();
        self.state
            .forget_dead_nodes(|node| {
                node.last_heartbeat_ms <= settled_until_ms
                    && NodeId::from_bytes(&node.node_id).is_ok_and(|node_id| !busy.contains(&node_id))
            })
            .await
    }

    /// Stores, per wallet, why its nodes earned no reward in `epoch_id`.
    async fn keep_withheld(&self, epoch_id: u64, withheld: Vec<(String, String)>) -> GcsResult<()> {
        let mut by_wallet: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (wallet, why) in withheld {
            by_wallet.entry(wallet).or_default().push(why);
        }
        let storage = self.state.storage().clone();
        blocking(move || {
            for (wallet, notes) in by_wallet {
                let value =
                    serde_json::to_vec(&notes).map_err(|err| crate::error::GcsError::Storage(err.to_string()))?;
                storage.put(Table::Meta, &withheld_key(epoch_id, &wallet), &value)?;
            }
            Ok(())
        })
        .await
    }

    /// Closes the epoch now (control-store clock).
    pub async fn settle_now(&self, dry_run: bool) -> GcsResult<EpochSummary> {
        self.settle_at(self.state.now_ms(), dry_run).await
    }

    /// Settles the latest scheduled boundary if it is past and not yet closed. Returns
    /// the summary when it closed one.
    pub async fn settle_due(&self) -> GcsResult<Option<EpochSummary>> {
        let length = self.state.config().epoch_length_ms.max(1);
        let boundary = self.state.now_ms() / length * length;
        if boundary <= self.last_epoch_end_ms.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let summary = self.settle_at(boundary, false).await?;
        Ok(Some(summary))
    }
}

pub(super) async fn close_epochs(metering: Arc<Metering>, mut stopped: watch::Receiver<bool>) {
    let length = metering.state.config().epoch_length_ms;
    let period = Duration::from_millis((length / 4).clamp(10, 1_000));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stopped.changed() => return,
        }
        if let Err(err) = metering.end_leases_of_dead_nodes().await {
            tracing::error!(error = %err, "could not end the leases of dead nodes");
        }
        if let Err(err) = metering.end_leases_of_finished_jobs().await {
            tracing::error!(error = %err, "could not end the leases of finished jobs");
        }
        if let Err(err) = metering.drop_unmatched().await {
            tracing::error!(error = %err, "could not drop unmatched lease reports");
        }
        match metering.settle_due().await {
            Ok(Some(summary)) => tracing::info!(
                epoch = summary.epoch_id,
                end_ms = summary.end_ms,
                records = summary.records,
                "scheduled epoch closed"
            ),
            Ok(None) => {}
            Err(err) => tracing::error!(error = %err, "scheduled settlement failed; retrying next tick"),
        }
    }
}
