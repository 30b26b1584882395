//! Asking node daemons for worker leases: the one requester behind tasks (the core
//! worker's lease pools) and actors (the control store placing them).
//!
//! A request goes to one daemon and follows its spillbacks to at most
//! [`MAX_SPILLBACKS`] others; what it comes to is a [`LeaseOutcome`], typed so that a
//! caller never confuses what is worth asking again with what is final:
//!
//! | outcome | meaning | who retries |
//! | --- | --- | --- |
//! | `Granted` | a worker is leased on `node_address` | nobody |
//! | `Infeasible` | no node of the cluster can ever meet the demand | nobody: the work fails `Infeasible` |
//! | `Unavailable` | a daemon could not be reached, is restarting, or spilled too often | the caller, paced by [`Backoff`] |
//! | `Refused` | the request itself is wrong (bad argument, credentials, unknown group) | nobody: the work fails with that error |
//!
//! [`outcome_of`] (which errors are worth retrying), [`bundle_target`] (where a lease in a
//! placement group is asked) and [`Backoff`] (how long to pause, when to give up) are
//! pure; [`request`] is the I/O around them.

use std::time::Duration;

use crate::error::IonetError;
use crate::ids::PlacementGroupId;
use crate::rpc::proto::gcs::{GetPlacementGroupReply, PlacementGroupState};
use crate::rpc::proto::node::{request_worker_lease_reply::Outcome, LeaseGranted, RequestWorkerLeaseRequest};
use crate::rpc::{AuthChannel, NodeManagerClient};

/// The bundle index that stands for "any bundle of the group" (Ray's `bundle_index=-1`).
pub const ANY_BUNDLE: u32 = u32::MAX;

/// Spillbacks one request follows before it counts as unavailable (a cluster view that
/// keeps moving under it).
pub const MAX_SPILLBACKS: usize = 16;

/// What one lease request came to.
#[derive(Debug)]
pub enum LeaseOutcome {
    /// A worker leased on the daemon at `node_address` (boxed: the other outcomes are small).
    Granted { lease: Box<LeaseGranted>, node_address: String },
    /// No node can ever meet the demand: final.
    Infeasible(String),
    /// Not now (a daemon unreachable or restarting, spillbacks without end): ask again.
    Unavailable(String),
    /// The request itself was refused (malformed, unauthenticated, ...): final.
    Refused(IonetError),
}

impl LeaseOutcome {
    /// The error a task or actor fails with when this outcome is final (`None` for a
    /// grant); an unavailable outcome given up on fails as `Unavailable`.
    pub fn into_error(self) -> Option<IonetError> {
        match self {
            LeaseOutcome::Granted { .. } => None,
            LeaseOutcome::Infeasible(reason) => Some(IonetError::Infeasible(reason)),
            LeaseOutcome::Unavailable(reason) => Some(IonetError::Unavailable(reason)),
            LeaseOutcome::Refused(error) => Some(error),
        }
    }
}

/// The outcome an error of a lease request (from the transport or the daemon) stands
/// for: the transient kinds (`Unavailable`, `Timeout`, `Io`, `Internal`: a daemon going
/// away mid-call reads as an internal transport error) are worth asking again, an
/// `Infeasible` verdict is final, and every other kind says the request is wrong.
pub fn outcome_of(error: IonetError) -> LeaseOutcome {
    match error {
        IonetError::Unavailable(m) | IonetError::Timeout(m) | IonetError::Internal(m) => LeaseOutcome::Unavailable(m),
        IonetError::Io(err) => LeaseOutcome::Unavailable(err.to_string()),
        IonetError::Infeasible(m) => LeaseOutcome::Infeasible(m),
        other => LeaseOutcome::Refused(other),
    }
}

/// Where a lease in bundle `index` of the placement group whose row is `group` is asked:
/// the address of the node holding the bundle, and the bundle (for [`ANY_BUNDLE`], the
/// group's bundles in turn: `turn` picks one). The lease goes to that node alone (no
/// spillback: only it holds the bundle). A group not placed yet is `Unavailable` (ask
/// again); a removed group, or a bundle it does not have, is `Refused`.
pub fn bundle_target(group: &GetPlacementGroupReply, index: u32, turn: usize) -> Result<(String, u32), LeaseOutcome> {
    let name = PlacementGroupId::from_bytes(&group.placement_group_id)
        .map(|id| id.short())
        .unwrap_or_else(|_| "(malformed id)".into());
    match PlacementGroupState::try_from(group.state).unwrap_or(PlacementGroupState::Pending) {
        PlacementGroupState::Created => {}
        PlacementGroupState::Removed => {
            let removed = format!("placement group {name} was removed");
            return Err(LeaseOutcome::Refused(IonetError::FailedPrecondition(removed)));
        }
        PlacementGroupState::Pending => {
            return Err(LeaseOutcome::Unavailable(format!("placement group {name} is not placed yet")))
        }
    }
    let nodes = &group.bundle_node_addresses;
    let index = if index == ANY_BUNDLE && !nodes.is_empty() { (turn % nodes.len()) as u32 } else { index };
    match nodes.get(index as usize) {
        Some(address) => Ok((address.clone(), index)),
        None => {
            let why = format!("placement group {name} has no bundle {index} ({} bundles)", nodes.len());
            Err(LeaseOutcome::Refused(IonetError::InvalidArgument(why)))
        }
    }
}

/// Asks the daemon at `address` for a lease, following spillbacks. `connect` opens (or
/// reuses) an authenticated channel to a daemon.
pub async fn request(
    connect: impl Fn(&str) -> Result<AuthChannel, IonetError>,
    mut address: String,
    mut request: RequestWorkerLeaseRequest,
) -> LeaseOutcome {
    let (first_address, first_no_spillback) = (address.clone(), request.no_spillback);
    // The node a spillback sent the request to, while it is being asked.
    let mut spilled_to: Option<Vec<u8>> = None;
    for _ in 0..=MAX_SPILLBACKS {
        let channel = match connect(&address) {
            Ok(channel) => channel,
            Err(err) => return outcome_of(err),
        };
        let reply = match NodeManagerClient::new(channel).request_worker_lease(request.clone()).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                match outcome_of(status.into()) {
                    // A node it was spilled to is unreachable (gone, most likely, before
                    // the head has declared it dead): the first daemon chooses again at
                    // once, avoiding it.
                    LeaseOutcome::Unavailable(_) if spilled_to.is_some() => {
                        let unreachable = spilled_to.take().expect("checked");
                        if !request.avoid_nodes.contains(&unreachable) {
                            request.avoid_nodes.push(unreachable);
                        }
                        request.no_spillback = first_no_spillback;
                        address = first_address.clone();
                        continue;
                    }
                    LeaseOutcome::Unavailable(reason) => {
                        return LeaseOutcome::Unavailable(format!("lease request to {address} failed: {reason}"))
                    }
                    other => return other,
                }
            }
        };
        match reply.outcome {
            Some(Outcome::Granted(lease)) => {
                return LeaseOutcome::Granted { lease: Box::new(lease), node_address: address }
            }
            Some(Outcome::Spillback(spillback)) => {
                address = spillback.node_address;
                spilled_to = Some(spillback.node_id);
                request.no_spillback = true;
            }
            Some(Outcome::Infeasible(reason)) => return LeaseOutcome::Infeasible(reason),
            None => {
                return LeaseOutcome::Refused(IonetError::Internal(format!(
                    "the node daemon at {address} answered a lease request with nothing"
                )))
            }
        }
    }
    LeaseOutcome::Unavailable(format!("a lease request spilled back more than {MAX_SPILLBACKS} times"))
}

/// Pauses between attempts that came to `Unavailable`: 100 ms, doubling up to 2 s, and
/// a verdict once `give_up_after` has passed since the first failure (`None`: never).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    failing_for: Duration,
    give_up_after: Option<Duration>,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const LONGEST: Duration = Duration::from_secs(2);

    pub fn new(give_up_after: Option<Duration>) -> Self {
        Self { next: Self::FIRST, failing_for: Duration::ZERO, give_up_after }
    }

    /// The pause before the next attempt after another failure, or `None` when the
    /// failures have lasted `give_up_after` (the pauses are summed, so the verdict does
    /// not depend on how long each attempt itself took).
    pub fn after_failure(&mut self) -> Option<Duration> {
        if self.give_up_after.is_some_and(|limit| self.failing_for >= limit) {
            return None;
        }
        let pause = self.next;
        self.failing_for += pause;
        self.next = (self.next * 2).min(Self::LONGEST);
        Some(pause)
    }

    /// An attempt succeeded: the next failure starts afresh.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
        self.failing_for = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::status;

    /// Every error kind a daemon or the transport can answer has one outcome, and only
    /// the transient ones are retried; an error crossing the wire keeps its outcome.
    #[test]
    fn every_error_kind_has_one_outcome() {
        for error in status::tests::every_variant() {
            let kind = error.kind();
            let retried = matches!(kind, "Unavailable" | "Timeout" | "Io" | "Internal");
            let over_the_wire: IonetError = tonic::Status::from(status::copy_of(&error)).into();
            for outcome in [outcome_of(error), outcome_of(over_the_wire)] {
                match outcome {
                    LeaseOutcome::Unavailable(_) => assert!(retried, "{kind} must not be retried"),
                    LeaseOutcome::Infeasible(_) => assert_eq!(kind, "Infeasible"),
                    LeaseOutcome::Refused(refused) => {
                        assert!(!retried && kind != "Infeasible", "{kind} must not be final");
                        assert_eq!(refused.kind(), kind, "a refusal keeps its kind");
                    }
                    LeaseOutcome::Granted { .. } => unreachable!(),
                }
            }
        }
        // A status from the transport, without ionet's detail: a refused connection.
        let refused: IonetError = tonic::Status::unavailable("error trying to connect").into();
        assert!(matches!(outcome_of(refused), LeaseOutcome::Unavailable(_)));
    }

    #[test]
    fn a_bundle_is_asked_of_its_node_once_its_group_is_placed() {
        let mut group = GetPlacementGroupReply {
            placement_group_id: PlacementGroupId::random().to_vec(),
            state: PlacementGroupState::Created as i32,
            bundle_node_addresses: vec!["10.0.0.1:1".into(), "10.0.0.2:1".into()],
            ..Default::default()
        };
        assert_eq!(bundle_target(&group, 1, 0).unwrap(), ("10.0.0.2:1".to_string(), 1));
        let any: Vec<u32> = (0..4).map(|turn| bundle_target(&group, ANY_BUNDLE, turn).unwrap().1).collect();
        assert_eq!(any, [0, 1, 0, 1], "any bundle: the group's bundles in turn");
        match bundle_target(&group, 5, 0) {
            Err(LeaseOutcome::Refused(IonetError::InvalidArgument(why))) => {
                assert!(why.contains("no bundle 5"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        group.state = PlacementGroupState::Pending as i32;
        assert!(matches!(bundle_target(&group, 0, 0), Err(LeaseOutcome::Unavailable(_))), "pending: ask again");
        group.state = PlacementGroupState::Removed as i32;
        match bundle_target(&group, 0, 0) {
            Err(LeaseOutcome::Refused(IonetError::FailedPrecondition(why))) => {
                assert!(why.contains("removed"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_and_gives_up_on_time() {
        let mut backoff = Backoff::new(Some(Duration::from_secs(5)));
        let pauses: Vec<Duration> = std::iter::from_fn(|| backoff.after_failure()).collect();
        let millis: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [100, 200, 400, 800, 1600, 2000]);
        assert!(pauses.iter().sum::<Duration>() >= Duration::from_secs(5));
        backoff.reset();
        assert_eq!(backoff.after_failure(), Some(Backoff::FIRST), "a success starts the pauses afresh");
        let mut forever = Backoff::new(None);
        assert!((0..1000).all(|_| forever.after_failure().is_some()));
        assert_eq!(forever.after_failure(), Some(Backoff::LONGEST));
    }
}
