//! The holders of this node's leases (the core workers that asked for them): pressed to
//! give back the leases they keep idle when requests wait here, and probed so that the
//! leases of a holder that is gone end.

use std::time::{Duration, Instant};

use ionet_common::LeaseId;

use super::{Leases, PRESS_INTERVAL};

impl Leases {
    /// Asks the holders of this node's leases to give back the leases they keep idle
    /// for reuse (a request waits for room). At most once per `PRESS_INTERVAL`; the asks
    /// go out in the background and their failures are ignored (a holder that is gone is
    /// found by the probe of dead holders).
    pub(super) fn press_holders(&self) {
        // Each holder with the job its leases are for: it is asked with that job's own
        // credential, never the node's (a holder's address is the requester's to name).
        let holders: std::collections::BTreeMap<String, Option<ionet_common::JobId>> = {
            let mut state = self.lock();
            let now = Instant::now();
            if state.pressed_at.is_some_and(|at| now.duration_since(at) < PRESS_INTERVAL) {
                return;
            }
            state.pressed_at = Some(now);
            state
                .leases
                .values()
                .filter(|granted| !granted.holder.is_empty())
                .map(|granted| {
                    let job = state
                        .processes
                        .get(&granted.worker)
                        .and_then(|process| ionet_common::JobId::from_bytes(&process.key.job_id).ok());
                    (granted.holder.clone(), job)
                })
                .collect()
        };
        if self.holder_channels.len() > 4096 {
            self.holder_channels.clear();
        }
        for (holder, job) in holders {
            let channel = match self.holder_channels.get(&holder) {
                Some(channel) => channel.clone(),
                None => {
                    let Some(credential) = job.and_then(|job| self.job_credentials.get(&job).map(|c| c.clone())) else {
                        continue;
                    };
                    match ionet_common::rpc::connect_lazy(&holder, &credential, Duration::from_secs(2)) {
                        Ok(channel) => {
                            self.holder_channels.insert(holder.clone(), channel.clone());
                            channel
                        }
                        Err(_) => continue,
                    }
                }
            };
            tokio::spawn(async move {
                let mut client = ionet_common::rpc::CoreWorkerClient::new(channel);
                let request = ionet_common::rpc::proto::worker::ReturnIdleLeasesRequest {};
                let _ = tokio::time::timeout(Duration::from_secs(2), client.return_idle_leases(request)).await;
            });
        }
    }

    /// The reference tables of the worker processes running here for `account`'s jobs
    /// (every account's when `None`), for `ionet memory`: each asked at once with its
    /// own job's credential, at most `limit` rows each, bounded by `timeout`.
    pub async fn worker_references(
        &self,
        account: Option<&str>,
        limit: u32,
        timeout: Duration,
    ) -> Vec<ionet_common::rpc::proto::node::NodeWorkerReferences> {
        let workers: Vec<(String, ionet_common::JobId, u32)> = {
            let state = self.lock();
            state
                .processes
                .values()
                .filter(|process| !process.address.is_empty())
                .filter_map(|process| {
                    let job = ionet_common::JobId::from_bytes(&process.key.job_id).ok()?;
                    Some((process.address.clone(), job, process.pid))
                })
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for (address, job, pid) in workers {
            let job_account = self.job_accounts.get(&job).map(|account| account.clone());
            if account.is_some_and(|account| job_account.as_deref() != Some(account)) {
                continue;
            }
            let credential = self.job_credentials.get(&job).map(|credential| credential.clone());
            asks.spawn(async move {
                let answer = match credential
                    .map(|credential| ionet_common::rpc::connect_lazy(&address, &credential, timeout))
                {
                    Some(Ok(channel)) => {
                        let request = ionet_common::rpc::proto::worker::ListReferencesRequest { limit };
                        let mut client = ionet_common::rpc::CoreWorkerClient::new(channel);
                        match tokio::time::timeout(timeout, client.list_references(request)).await {
                            Ok(Ok(reply)) => Some(reply.into_inner()),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                ionet_common::rpc::proto::node::NodeWorkerReferences {
                    address,
                    job_id: job.to_vec(),
                    pid,
                    answered: answer.is_some(),
                    references: answer,
                }
            });
        }
        let mut answers = Vec::new();
        while let Some(answer) = asks.join_next().await {
            if let Ok(answer) = answer {
                answers.push(answer);
            }
        }
        answers
    }

    /// Ends the leases whose holder's address refuses connections (its process is gone;
    /// a probe that times out proves nothing, as with a partitioned network), as failed: the
    /// leased workers are killed, since they may still run the dead holder's tasks, and
    /// the resources come back. Returns how many leases ended.
    pub async fn end_leases_of_dead_holders(&self, timeout: Duration) -> usize {
        let holders: std::collections::BTreeSet<String> =
            self.lock().leases.values().map(|granted| granted.holder.clone()).filter(|h| !h.is_empty()).collect();
        // All probes at once: a holder that does not answer costs one timeout, not one each.
        let mut probes = tokio::task::JoinSet::new();
        for holder in holders {
            probes.spawn(async move {
                // A TLS holder's address carries its scheme; the probe is a bare connect.
                let target = ionet_common::rpc::socket_address_of(&holder).to_string();
                let refused = matches!(
                    tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&target)).await,
                    Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused
                );
                (holder, refused)
            });
        }
        let mut ended = 0;
        while let Some(probe) = probes.join_next().await {
            let Ok((holder, true)) = probe else { continue };
            let doomed: Vec<LeaseId> =
                self.lock().leases.iter().filter(|(_, granted)| granted.holder == holder).map(|(id, _)| *id).collect();
            for lease_id in doomed {
                tracing::warn!(lease = %lease_id.short(), %holder, "the lease holder is gone; its lease ends");
                if self.end_lease(lease_id, true).is_ok() {
                    ended += 1;
                }
            }
        }
        ended
    }
}
