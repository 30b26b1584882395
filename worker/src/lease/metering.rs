//! Lease starts and ends, told to the head's metering service in order, off the lease
//! path: a send that fails while the head is away is retried, one the head refuses is
//! logged and dropped (metering never blocks a lease; the head also ends the leases of
//! a node it declares dead).

use std::time::{Duration, Instant};

use ionet_common::resources::ResourceSet;
use ionet_common::{JobId, LeaseId, NodeId, PlacementGroupId};

/// What the control store is told about leases, in order, off the lease path.
pub(super) enum MeterEvent {
    /// `bundle`: a committed bundle's group and index (the head is its holder).
    Started {
        lease_id: LeaseId,
        job_id: JobId,
        resources: ResourceSet,
        bundle: Option<(PlacementGroupId, u32)>,
    },
    Ended {
        lease_id: LeaseId,
    },
}

/// The most events one report carries.
const MAX_BATCH: usize = 4_096;

/// How long the first event of a report waits for others to join it.
const REPORT_LINGER: Duration = Duration::from_millis(20);

/// Sends lease starts and ends to the head's metering service, in order, as many as
/// arrive within [`REPORT_LINGER`] of the first in one call. A call that fails while the head is away is retried; an event the
/// head refuses is logged and dropped (metering never blocks a lease; the head also ends
/// the leases of a node it declares dead).
pub(super) async fn report_leases(
    node_id: NodeId,
    mut client: ionet_common::rpc::MeteringClient,
    mut events: tokio::sync::mpsc::UnboundedReceiver<(Instant, MeterEvent)>,
) {
    use ionet_common::rpc::proto::common::ResourceQuantities;
    use ionet_common::rpc::proto::metering::{
        lease_event, LeaseEndedRequest, LeaseEvent, LeaseStartedRequest, ReportLeasesRequest,
    };
    let mut queued: Vec<(Instant, MeterEvent)> = Vec::new();
    while let Some(first) = events.recv().await {
        queued.push(first);
        // Let what follows gather for a moment, asleep (a waiting receiver would be woken
        // by every send, on the lease path's cores): one call per event would cost as
        // much as the leases themselves. Each event carries its age, so nothing is
        // billed differently for the wait.
        tokio::time::sleep(REPORT_LINGER).await;
        while queued.len() < MAX_BATCH {
            match events.try_recv() {
                Ok(event) => queued.push(event),
                Err(_) => break,
            }
        }
        for attempt in 0..20u32 {
            // How long each event waited here: the head dates it back (a few seconds at most).
            let age = |at: &Instant| at.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
            let batch = queued
                .iter()
                .map(|(at, event)| LeaseEvent {
                    event: Some(match event {
                        MeterEvent::Started { lease_id, job_id, resources, bundle } => {
                            lease_event::Event::Started(LeaseStartedRequest {
                                lease_id: lease_id.to_vec(),
                                node_id: node_id.to_vec(),
                                job_id: job_id.to_vec(),
                                resources: Some(ResourceQuantities::from_set(resources)),
                                placement_group_id: bundle.map(|(group, _)| group.to_vec()).unwrap_or_default(),
                                bundle_index: bundle.map(|(_, index)| index).unwrap_or(0),
                                age_ms: age(at),
                            })
                        }
                        MeterEvent::Ended { lease_id } => lease_event::Event::Ended(LeaseEndedRequest {
                            lease_id: lease_id.to_vec(),
                            age_ms: age(at),
                        }),
                    }),
                })
                .collect();
            match client.report_leases(ReportLeasesRequest { node_id: node_id.to_vec(), events: batch }).await {
                Ok(reply) => {
                    for refusal in reply.into_inner().refusals.iter().filter(|refusal| !refusal.is_empty()) {
                        tracing::warn!(error = %refusal, "the control store did not take a lease report");
                    }
                    break;
                }
                Err(status) if status.code() == tonic::Code::Unavailable && attempt < 19 => {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt + 1))).await;
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), events = queued.len(), "the control store did not take lease reports");
                    break;
                }
            }
        }
        queued.clear();
    }
}
