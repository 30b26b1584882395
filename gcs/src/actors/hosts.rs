//! Shared processes: worker processes the head leases to host several actors of one job
//! (`ActorSpec.share_process`), so that light actors are created without a process
//! start each.
//!
//! Invariants:
//! - A host is a lease of no resources that the head holds, on one node, for one job,
//!   runtime environment and scheduling strategy (the key): actors of other keys never
//!   share it. It seats at most [`MAX_ACTORS_PER_HOST`] actors: those placed on it or
//!   being placed.
//! - An actor leaves its host by `EndActor` (the process lives on for the others). A
//!   host that cannot end one (gone, unreachable, not answering in time) is retired: its
//!   lease is returned as failed, which kills the process, and each of its actors' own
//!   `Watch` ends, so each restarts or dies by its own rules.
//! - A host left empty lingers ([`HOST_LINGER`]) for the next actor, then is retired.
//! - One new host per key is leased at a time: actors created together wait for it and
//!   fill it rather than each leasing a process of its own.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ionet_common::auth::Bearer;
use ionet_common::jobs::runtime_env_json;
use ionet_common::lease::{self, LeaseOutcome};
use ionet_common::rpc::proto::gcs::ActorSpec;
use ionet_common::rpc::proto::node::LeaseGranted;
use ionet_common::rpc::proto::worker::EndActorRequest;
use ionet_common::rpc::CoreWorkerClient;
use ionet_common::ActorId;
use prost::Message;

use super::{lock, Actors, OnLease};

/// The most actors one shared process hosts.
pub(super) const MAX_ACTORS_PER_HOST: usize = 1_000;
/// How long a host left without actors is kept for the next one.
const HOST_LINGER: Duration = Duration::from_secs(5);
/// How long a host has to end an actor before it is taken as hung (and killed).
const END_WAIT: Duration = Duration::from_secs(10);
/// How many times an unreachable host is asked to end an actor.
const END_TRIES: u32 = 3;

/// What hosts are shared by: the job, and its runtime environment and strategy as bytes.
pub(super) type HostKey = (Vec<u8>, Vec<u8>, Vec<u8>);

pub(super) fn host_key(spec: &ActorSpec) -> HostKey {
    // Canonical (its variables sorted): a map's encoding follows its hash order.
    let env = spec.runtime_env.as_ref().map(runtime_env_json).unwrap_or_default().into_bytes();
    let strategy = spec.strategy.as_ref().map(Message::encode_to_vec).unwrap_or_default();
    (spec.job_id.clone(), env, strategy)
}

/// An actor's incarnation seated on a host.
pub(super) type Seat = (ActorId, u32);

/// A shared process and the actors seated on it.
#[derive(Clone)]
pub(super) struct Host {
    pub lease: LeaseGranted,
    pub node_address: String,
    pub actors: HashSet<Seat>,
    /// How many times it was left empty: a linger retires it only if it is still the
    /// same emptiness.
    pub emptied: u64,
}

/// The hosts of each key.
#[derive(Default)]
pub(super) struct Hosts {
    by_key: HashMap<HostKey, Vec<Host>>,
}

impl Hosts {
    /// Seats `actor` on a host of `key` with room (one on `preferred_node` first).
    fn seat(&mut self, key: &HostKey, actor: Seat, preferred_node: &str) -> Option<(LeaseGranted, String)> {
        let hosts = self.by_key.get_mut(key)?;
        let host = hosts
            .iter_mut()
            .filter(|host| host.actors.len() < MAX_ACTORS_PER_HOST)
            .min_by_key(|host| host.node_address != preferred_node)?;
        host.actors.insert(actor);
        Some((host.lease.clone(), host.node_address.clone()))
    }

    /// Takes `host` in (a new lease, or one a restarted head learns from its actors).
    pub(super) fn add(&mut self, key: HostKey, host: Host) {
        let hosts = self.by_key.entry(key).or_default();
        match hosts.iter_mut().find(|known| known.lease.lease_id == host.lease.lease_id) {
            Some(known) => known.actors.extend(host.actors),
            None => hosts.push(host),
        }
    }

    fn find(&self, key: &HostKey, lease_id: &[u8]) -> Option<&Host> {
        self.by_key.get(key)?.iter().find(|host| host.lease.lease_id == lease_id)
    }

    /// Unseats `actor`; when that leaves its host empty, which emptiness it is.
    fn vacate(&mut self, key: &HostKey, lease_id: &[u8], actor: &Seat) -> Option<u64> {
        let host = self.by_key.get_mut(key)?.iter_mut().find(|host| host.lease.lease_id == lease_id)?;
        if !host.actors.remove(actor) || !host.actors.is_empty() {
            return None;
        }
        host.emptied += 1;
        Some(host.emptied)
    }

    /// Forgets the host of `lease_id` (with `empty_since`, only while it is still empty
    /// since that emptiness); whether it did.
    fn retire(&mut self, key: &HostKey, lease_id: &[u8], empty_since: Option<u64>) -> bool {
        let Some(hosts) = self.by_key.get_mut(key) else { return false };
        let before = hosts.len();
        let kept = |host: &Host| match empty_since {
            Some(emptied) => !host.actors.is_empty() || host.emptied != emptied,
            None => false,
        };
        hosts.retain(|host| host.lease.lease_id != lease_id || kept(host));
        let retired = hosts.len() < before;
        if hosts.is_empty() {
            self.by_key.remove(key);
        }
        retired
    }

    #[cfg(test)]
    pub(super) fn count(&self) -> usize {
        self.by_key.values().map(Vec::len).sum()
    }
}

impl Actors {
    /// A seat for incarnation `incarnation` of `actor_id` on a host of its key: one with
    /// room, or a new one leased for it (one at a time per key).
    pub(super) async fn host_seat(
        &self,
        spec: &ActorSpec,
        actor_id: ActorId,
        incarnation: u32,
        credential: &Bearer,
    ) -> LeaseOutcome {
        let key = host_key(spec);
        let seated = |hosts: &mut Hosts| {
            hosts
                .seat(&key, (actor_id, incarnation), &spec.node_address)
                .map(|(lease, node_address)| LeaseOutcome::Granted { lease: Box::new(lease), node_address })
        };
        if let Some(seat) = seated(&mut lock(&self.hosts)) {
            return seat;
        }
        let gate = self.host_starts.entry(key.clone()).or_default().clone();
        let _leasing = gate.lock().await;
        if let Some(seat) = seated(&mut lock(&self.hosts)) {
            return seat;
        }
        let outcome = match self.target(spec, incarnation) {
            Ok((address, request)) => {
                lease::request(|address| self.channel(address, credential), address, request).await
            }
            Err(outcome) => outcome,
        };
        drop(_leasing);
        // The gate goes with the last actor waiting on it (this one, and the map's).
        self.host_starts.remove_if(&key, |_, held| Arc::ptr_eq(held, &gate) && Arc::strong_count(held) <= 2);
        if let LeaseOutcome::Granted { lease, node_address } = &outcome {
            let host = Host {
                lease: (**lease).clone(),
                node_address: node_address.clone(),
                actors: HashSet::from([(actor_id, incarnation)]),
                emptied: 0,
            };
            lock(&self.hosts).add(key, host);
            tracing::info!(worker = %lease.worker_address, "a shared process leased for actors");
        }
        outcome
    }

    /// Asks the host at `address` to end the guest: again while it cannot be reached,
    /// a few times ([`END_TRIES`]: a blip, not a dead process, whose guests should
    /// restart at once), and for at most [`END_WAIT`] in all; whether it did.
    async fn end_guest(&self, address: &str, credential: &Bearer, actor_id: ActorId, incarnation: u32) -> bool {
        let deadline = tokio::time::Instant::now() + END_WAIT;
        for attempt in 1..=END_TRIES {
            let request = EndActorRequest { actor_id: actor_id.to_vec(), incarnation };
            let answer = match self.channel(address, credential) {
                Ok(channel) => {
                    let mut client = CoreWorkerClient::new(channel);
                    tokio::time::timeout_at(deadline, client.end_actor(request)).await
                }
                Err(err) => Ok(Err(tonic::Status::unavailable(err.to_string()))),
            };
            match answer {
                Ok(Ok(_)) => return true,
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable && attempt < END_TRIES => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(status)) => {
                    tracing::warn!(actor = %actor_id, error = %status.message(), "a shared process did not end an actor");
                    return false;
                }
                Err(_) => {
                    tracing::warn!(actor = %actor_id, "a shared process did not answer an actor's end in time");
                    return false;
                }
            }
        }
        false
    }

    /// Ends the guest running `on` its host's lease and unseats it. A host that cannot
    /// end it is retired (killed, with its other actors). Whether the actor surely no
    /// longer runs.
    pub(super) async fn leave_host(self: &Arc<Self>, on: &OnLease<'_>) -> bool {
        let OnLease { spec, actor_id, incarnation, lease_id, node_address } = *on;
        let key = host_key(spec);
        let address = lock(&self.hosts).find(&key, lease_id).map(|host| host.lease.worker_address.clone());
        let ended = match (address, self.job_credential(&spec.job_id)) {
            (Some(address), Ok(credential)) => self.end_guest(&address, &credential, actor_id, incarnation).await,
            // A host the head does not know (one a previous run leased, whose actors
            // none is alive) holds nothing else it knows of.
            _ => false,
        };
        if ended {
            if let Some(emptied) = lock(&self.hosts).vacate(&key, lease_id, &(actor_id, incarnation)) {
                let actors = self.clone();
                let (lease_id, node_address, job_id) =
                    (lease_id.to_vec(), node_address.to_string(), spec.job_id.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(HOST_LINGER).await;
                    if lock(&actors.hosts).retire(&key, &lease_id, Some(emptied)) {
                        actors.return_lease_surely(&job_id, &lease_id, &node_address).await;
                    }
                });
            }
            return true;
        }
        lock(&self.hosts).retire(&key, lease_id, None);
        self.return_lease(&spec.job_id, lease_id.to_vec(), node_address, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(lease: u8, node: &str, actors: &[Seat]) -> Host {
        Host {
            lease: LeaseGranted { lease_id: vec![lease], worker_address: format!("w{lease}"), ..Default::default() },
            node_address: node.into(),
            actors: actors.iter().copied().collect(),
            emptied: 0,
        }
    }

    fn seat() -> Seat {
        (ActorId::random(), 0)
    }

    #[test]
    fn a_host_seats_up_to_its_limit_its_creators_node_first_and_is_retired_only_when_empty() {
        let key: HostKey = (vec![1], Vec::new(), Vec::new());
        let other: HostKey = (vec![2], Vec::new(), Vec::new());
        let mut hosts = Hosts::default();
        let full: Vec<Seat> = (0..MAX_ACTORS_PER_HOST).map(|_| seat()).collect();
        hosts.add(key.clone(), host(1, "a", &full));
        assert!(hosts.seat(&key, seat(), "a").is_none(), "a full host seats no one");
        assert!(hosts.seat(&other, seat(), "a").is_none(), "another job's key has no host");
        hosts.add(key.clone(), host(2, "b", &[]));
        hosts.add(key.clone(), host(3, "a", &[]));
        let (lease, node) = hosts.seat(&key, seat(), "a").unwrap();
        assert_eq!((lease.lease_id, node.as_str()), (vec![3], "a"), "the creator's node first");
        let seated = seat();
        let (lease, _) = hosts.seat(&key, seated, "c").unwrap();
        assert_eq!(lease.lease_id, vec![2], "else the first with room");
        // The same lease learnt again (a restarted head) merges its actors.
        hosts.add(key.clone(), host(3, "a", &[seat()]));
        assert_eq!(hosts.count(), 3);
        assert_eq!(hosts.find(&key, &[3]).unwrap().actors.len(), 2);
        assert_eq!(hosts.vacate(&key, &[1], &full[0]), None, "a host with actors left is not empty");
        // An older incarnation's late end never unseats the newer one.
        assert_eq!(hosts.vacate(&key, &[2], &(seated.0, seated.1 + 1)), None);
        let emptied = hosts.vacate(&key, &[2], &seated).expect("its only actor gone, a host is empty");
        assert!(!hosts.retire(&key, &[1], Some(emptied)), "a host with actors is not retired as empty");
        // Seated again and emptied again: the first emptiness's linger retires nothing.
        hosts.seat(&key, seated, "b").unwrap();
        let again = hosts.vacate(&key, &[2], &seated).unwrap();
        assert!(!hosts.retire(&key, &[2], Some(emptied)), "an earlier emptiness's linger");
        assert!(hosts.retire(&key, &[2], Some(again)), "the latest's retires it");
        assert!(hosts.retire(&key, &[1], None), "a failed one is, actors and all");
        assert_eq!(hosts.count(), 1);
    }

    #[test]
    fn the_key_is_the_same_for_the_same_environment_whatever_its_order() {
        use ionet_common::rpc::proto::common::RuntimeEnv;
        let vars: Vec<(String, String)> = (0..16).map(|i| (format!("V{i}"), i.to_string())).collect();
        let spec = |vars: Vec<(String, String)>| ActorSpec {
            job_id: vec![1],
            runtime_env: Some(RuntimeEnv { env_vars: vars.into_iter().collect(), ..Default::default() }),
            ..Default::default()
        };
        let reversed: Vec<_> = vars.iter().rev().cloned().collect();
        assert_eq!(host_key(&spec(vars)), host_key(&spec(reversed)));
    }
}
