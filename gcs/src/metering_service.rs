//! The tonic adapter of the metering service: decodes requests, calls [`Metering`],
//! encodes replies. No decisions are made here.

use std::sync::Arc;

use ionet_common::authz::Principal;
use ionet_common::rpc::proto::metering::metering_server::Metering as MeteringRpc;
use ionet_common::rpc::proto::metering::*;
use ionet_common::{JobId, NodeId};
use ionet_settlement as settlement;
use tonic::{Request, Response, Status};

use crate::error::GcsError;
use crate::metering::Metering;

/// The most lease events one `ReportLeases` call may carry.
const MAX_LEASE_EVENTS: usize = 10_000;

pub struct MeteringService {
    metering: Arc<Metering>,
}

impl MeteringService {
    pub fn new(metering: Arc<Metering>) -> Self {
        Self { metering }
    }
}

/// An optional id: empty bytes mean "any".
fn optional<T>(bytes: &[u8], parse: impl Fn(&[u8]) -> ionet_common::IonetResult<T>) -> Result<Option<T>, Status> {
    if bytes.is_empty() {
        Ok(None)
    } else {
        Ok(Some(parse(bytes).map_err(GcsError::from)?))
    }
}

pub fn summary_to_proto(summary: &settlement::EpochSummary) -> EpochSummary {
    EpochSummary {
        epoch_id: summary.epoch_id,
        end_ms: summary.end_ms,
        fee_bps: summary.fee_bps,
        records: summary.records,
        total_usage_micros: summary.total_usage,
        total_fee_micros: summary.total_fee,
        total_rewards_micros: summary.total_rewards,
        reward_remainder_micros: summary.reward_remainder,
        payers: summary
            .payers
            .iter()
            .map(|payer| PayerEpoch {
                payer: payer.payer.clone(),
                usage_micros: payer.usage,
                fee_micros: payer.fee,
                shortfall_micros: payer.shortfall,
                balance_after_micros: payer.balance_after,
                unfunded_micros: payer.unfunded,
            })
            .collect(),
        providers: summary
            .providers
            .iter()
            .map(|provider| ProviderEpoch {
                wallet: provider.wallet.clone(),
                revenue_micros: provider.revenue,
                reward_micros: provider.reward,
                power_cost_micros: provider.power_cost,
                uptime_ms: provider.uptime_ms,
                gpu_capacity_units: provider.gpu_capacity.units(),
                records: provider.records,
                receivable_micros: provider.receivable,
                repaid_micros: provider.repaid,
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl MeteringRpc for MeteringService {
    async fn lease_started(
        &self,
        request: Request<LeaseStartedRequest>,
    ) -> Result<Response<LeaseStartedReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // A node reports its own leases only.
        principal.may_act_for_node(&NodeId::from_bytes(&request.node_id).map_err(GcsError::from)?)?;
        let start_ms = self.metering.lease_started(&request).await?;
        Ok(Response::new(LeaseStartedReply { start_ms }))
    }

    async fn lease_ended(&self, request: Request<LeaseEndedRequest>) -> Result<Response<LeaseEndedReply>, Status> {
        let reporter = match Principal::of(&request)? {
            Principal::Node(node) => Some(node),
            _ => None,
        };
        let request = request.into_inner();
        let record = self.metering.lease_ended_by(&request.lease_id, request.age_ms, reporter).await?;
        Ok(Response::new(LeaseEndedReply { record }))
    }

    async fn report_leases(
        &self,
        request: Request<ReportLeasesRequest>,
    ) -> Result<Response<ReportLeasesReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let node = NodeId::from_bytes(&request.node_id).map_err(GcsError::from)?;
        // A node reports its own leases only.
        principal.may_act_for_node(&node)?;
        if request.events.len() > MAX_LEASE_EVENTS {
            return Err(Status::invalid_argument(format!(
                "a report carries {} lease events; at most {MAX_LEASE_EVENTS} fit in one",
                request.events.len()
            )));
        }
        let reporter = match principal {
            Principal::Node(node) => Some(node),
            _ => None,
        };
        let refusals = self.metering.node_report(node, request.events, reporter).await?;
        Ok(Response::new(ReportLeasesReply { refusals }))
    }

    async fn report_held_leases(
        &self,
        request: Request<ReportHeldLeasesRequest>,
    ) -> Result<Response<ReportHeldLeasesReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        // A holder speaks for its own job's leases only.
        let job_id = JobId::from_bytes(&request.job_id).map_err(GcsError::from)?;
        principal.may_act_for_job(&job_id)?;
        self.metering.holder_report(job_id, &request.leases, false).await?;
        Ok(Response::new(ReportHeldLeasesReply {}))
    }

    async fn job_cost(&self, request: Request<JobCostRequest>) -> Result<Response<JobCostReply>, Status> {
        let principal = Principal::of(&request)?;
        let job_id = JobId::from_bytes(&request.into_inner().job_id).map_err(GcsError::from)?;
        let reply = self.metering.job_cost(job_id).await?;
        // A tenant reads its own account's bills; a node none.
        if matches!(principal, Principal::Node(_)) || !principal.sees_account(&reply.payer_account) {
            return Err(Status::permission_denied(format!("{principal} may not read the bill of job {job_id}")));
        }
        Ok(Response::new(reply))
    }

    async fn list_usage(&self, request: Request<ListUsageRequest>) -> Result<Response<ListUsageReply>, Status> {
        let principal = Principal::of(&request)?;
        let request = request.into_inner();
        let job_id = optional(&request.job_id, JobId::from_bytes)?;
        let node_id = optional(&request.node_id, NodeId::from_bytes)?;
        let mut records = self.metering.list_usage(job_id, node_id).await?;
        // A tenant sees what its account paid for, a provider what its node served.
        records.retain(|record| match &principal {
            Principal::Node(node) => record.node_id == node.as_bytes(),
            other => other.sees_account(&record.payer_account),
        });
        Ok(Response::new(ListUsageReply { records }))
    }

    async fn add_credits(&self, request: Request<AddCreditsRequest>) -> Result<Response<AddCreditsReply>, Status> {
        let request = request.into_inner();
        let balance_micros = self.metering.add_credits(&request.account, request.amount_micros).await?;
        Ok(Response::new(AddCreditsReply { balance_micros }))
    }

    async fn refund(&self, request: Request<RefundRequest>) -> Result<Response<RefundReply>, Status> {
        let refunded_micros = self.metering.refund(&request.into_inner().account).await?;
        Ok(Response::new(RefundReply { refunded_micros }))
    }

    async fn balances(&self, request: Request<BalancesRequest>) -> Result<Response<BalancesReply>, Status> {
        // The operator sees the whole ledger; a tenant its own account's balance.
        let principal = Principal::of(&request)?;
        let balances = self
            .metering
            .balances()
            .await?
            .into_iter()
            .map(|(account, balance_micros)| AccountBalance { account: account.key(), balance_micros })
            .filter(|balance| match &principal {
                Principal::Admin => true,
                other => balance.account.strip_prefix("payer:").is_some_and(|payer| other.sees_account(payer)),
            })
            .collect();
        Ok(Response::new(BalancesReply { balances }))
    }

    async fn settle(&self, request: Request<SettleRequest>) -> Result<Response<SettleReply>, Status> {
        let dry_run = request.into_inner().dry_run;
        let summary = self.metering.settle_now(dry_run).await?;
        Ok(Response::new(SettleReply { summary: Some(summary_to_proto(&summary)), dry_run }))
    }

    async fn list_payouts(&self, _request: Request<ListPayoutsRequest>) -> Result<Response<ListPayoutsReply>, Status> {
        let reply = match self.metering.payouts() {
            Some(payouts) => ListPayoutsReply { enabled: true, epochs: payouts.list().await? },
            None => ListPayoutsReply { enabled: false, epochs: Vec::new() },
        };
        Ok(Response::new(reply))
    }

    async fn deposits(&self, request: Request<DepositsRequest>) -> Result<Response<DepositsReply>, Status> {
        let principal = Principal::of(&request)?;
        let mut reply = match self.metering.payouts() {
            Some(payouts) => payouts.deposits().await?,
            None => DepositsReply {
                watching: false,
                reason: "this head does not pay out on chain (start it with --payout-rpc-url, --payout-keypair and \
                         --payout-asset): deposits are taken in the payout asset"
                    .into(),
                ..DepositsReply::default()
            },
        };
        // A tenant sees its own account's deposits; held ones name nobody: the operator's.
        if principal != Principal::Admin {
            reply.deposits.retain(|deposit| !deposit.account.is_empty() && principal.sees_account(&deposit.account));
        }
        Ok(Response::new(reply))
    }

    async fn earnings(&self, request: Request<EarningsRequest>) -> Result<Response<EarningsReply>, Status> {
        let (epochs, balance_micros) = self.metering.earnings(&request.into_inner().wallet).await?;
        Ok(Response::new(EarningsReply {
            epochs: epochs
                .into_iter()
                .map(|(epoch, rewards_withheld)| ProviderEarnings {
                    epoch_id: epoch.epoch_id,
                    revenue_micros: epoch.revenue,
                    reward_micros: epoch.reward,
                    power_cost_micros: epoch.power_cost,
                    net_micros: epoch.net,
                    uptime_ms: epoch.uptime_ms,
                    gpu_capacity_units: epoch.gpu_capacity.units(),
                    rewards_withheld,
                })
                .collect(),
            balance_micros,
        }))
    }
}
