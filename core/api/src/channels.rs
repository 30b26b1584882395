//! The channel cache: one gRPC channel per peer address, opened lazily on first use and
//! shared by every call to that peer afterwards (tonic channels multiplex).
//!
//! A channel carries this process's credentials on every call. Opening never blocks: the
//! connection is made by the first call, so a peer that is down shows as that call's
//! `Unavailable`, not here.

use std::time::Duration;

use dashmap::DashMap;
use ionet_common::auth::Bearer;
use ionet_common::rpc::{self, AuthChannel};
use ionet_common::IonetResult;

/// How long a call waits for its connection to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Channels {
    /// The job's credential, carried by every call.
    credential: Bearer,
    /// The runtime the channels' connection tasks run on.
    handle: tokio::runtime::Handle,
    open: DashMap<String, AuthChannel>,
}

impl Channels {
    pub(crate) fn new(credential: Bearer, handle: tokio::runtime::Handle) -> Self {
        Self { credential, handle, open: DashMap::new() }
    }

    /// The channel to `address`, opened once and shared.
    pub(crate) fn get(&self, address: &str) -> IonetResult<AuthChannel> {
        if let Some(channel) = self.open.get(address) {
            return Ok(channel.clone());
        }
        // A lazy channel spawns its connection task: it needs the runtime, even when
        // called from a user thread.
        let _entered = self.handle.enter();
        let channel = self
            .open
            .entry(address.to_string())
            .or_try_insert_with(|| rpc::connect_lazy(address, &self.credential, CONNECT_TIMEOUT))?
            .clone();
        Ok(channel)
    }

    /// How many peers have a channel.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_gets_one_channel_and_a_bad_address_an_error() {
        let channels = Channels::new(Bearer::new("credential").unwrap(), tokio::runtime::Handle::current());
        channels.get("127.0.0.1:1").unwrap();
        channels.get("127.0.0.1:1").unwrap();
        channels.get("127.0.0.1:2").unwrap();
        assert_eq!(channels.len(), 2, "one channel per peer, reused");
        let error = channels.get("not an address").unwrap_err();
        assert!(error.to_string().contains("not an address"), "the error names the address: {error}");
        assert_eq!(channels.len(), 2, "a failed open leaves nothing behind");
    }
}
