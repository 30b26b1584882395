//! The wire protocol: generated messages and tonic clients/servers from `core/proto/`,
//! the one mapping between [`IonetError`] and gRPC status codes, and the helpers
//! that open authenticated channels.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{AttachToken, ClusterToken};
use crate::error::{IonetError, IonetResult};
use crate::resources::ResourceSet;

pub mod proto {
    pub mod common {
        tonic::include_proto!("ionet.common");
    }
    pub mod gcs {
        tonic::include_proto!("ionet.gcs");
    }
    pub mod node {
        tonic::include_proto!("ionet.node");
    }
    pub mod object {
        tonic::include_proto!("ionet.object");
    }
    pub mod metering {
        tonic::include_proto!("ionet.metering");
    }
    pub mod worker {
        tonic::include_proto!("ionet.worker");
    }
}

/// Domain errors to gRPC codes and back.
pub mod status {
    use tonic::{Code, Status};

    use crate::error::IonetError;

    impl From<IonetError> for Status {
        fn from(error: IonetError) -> Status {
            let code = match &error {
                IonetError::InvalidArgument(_) | IonetError::Config(_) => Code::InvalidArgument,
                IonetError::NotFound(_) => Code::NotFound,
                IonetError::AlreadyExists(_) => Code::AlreadyExists,
                IonetError::Unauthenticated(_) => Code::Unauthenticated,
                IonetError::FailedPrecondition(_) => Code::FailedPrecondition,
                IonetError::ResourceExhausted(_) => Code::ResourceExhausted,
                IonetError::Unavailable(_) => Code::Unavailable,
                IonetError::Timeout(_) => Code::DeadlineExceeded,
                IonetError::Io(_) | IonetError::Internal(_) => Code::Internal,
                IonetError::TaskFailed { .. } | IonetError::WorkerCrashed { .. } => Code::Aborted,
                IonetError::ObjectLost(_) => Code::DataLoss,
                IonetError::Infeasible(_) => Code::FailedPrecondition,
                IonetError::ActorDied(_) => Code::Aborted,
                IonetError::Cancelled(_) => Code::Cancelled,
            };
            // The message keeps the variant's own text only, so it is not prefixed twice
            // when the client maps it back.
            let message = match error {
                IonetError::InvalidArgument(m)
                | IonetError::Config(m)
                | IonetError::NotFound(m)
                | IonetError::AlreadyExists(m)
                | IonetError::Unauthenticated(m)
                | IonetError::FailedPrecondition(m)
                | IonetError::ResourceExhausted(m)
                | IonetError::Unavailable(m)
                | IonetError::Timeout(m)
                | IonetError::Internal(m)
                | IonetError::ObjectLost(m)
                | IonetError::Infeasible(m)
                | IonetError::ActorDied(m)
                | IonetError::Cancelled(m) => m,
                other @ (IonetError::Io(_) | IonetError::TaskFailed { .. } | IonetError::WorkerCrashed { .. }) => {
                    other.to_string()
                }
            };
            Status::new(code, message)
        }
    }

    impl From<Status> for IonetError {
        fn from(status: Status) -> IonetError {
            let message = status.message().to_string();
            match status.code() {
                Code::InvalidArgument | Code::OutOfRange => IonetError::InvalidArgument(message),
                Code::NotFound => IonetError::NotFound(message),
                Code::AlreadyExists => IonetError::AlreadyExists(message),
                Code::Unauthenticated | Code::PermissionDenied => IonetError::Unauthenticated(message),
                Code::FailedPrecondition | Code::Aborted => IonetError::FailedPrecondition(message),
                Code::ResourceExhausted => IonetError::ResourceExhausted(message),
                Code::Unavailable | Code::Cancelled => IonetError::Unavailable(message),
                Code::DeadlineExceeded => IonetError::Timeout(message),
                Code::DataLoss => IonetError::ObjectLost(message),
                _ => IonetError::Internal(format!("{:?}: {message}", status.code())),
            }
        }
    }
}

/// An authenticated channel: every call on it carries the cluster token.
pub type AuthChannel = InterceptedService<Channel, AttachToken>;

pub type GcsClient = proto::gcs::gcs_client::GcsClient<AuthChannel>;
pub type NodeManagerClient = proto::node::node_manager_client::NodeManagerClient<AuthChannel>;
pub type MeteringClient = proto::metering::metering_client::MeteringClient<AuthChannel>;
pub type CoreWorkerClient = proto::worker::core_worker_client::CoreWorkerClient<AuthChannel>;

/// The connections accepted on `listener`, with Nagle's algorithm off: a server given its
/// own listener (`serve_with_incoming`) does not apply `Server::tcp_nodelay` to them, and a
/// small reply held back until the peer's delayed ACK costs a request its latency.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    })
}

/// Default cap on one gRPC message, both ways.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

fn endpoint(address: &str, connect_timeout: Duration) -> IonetResult<Endpoint> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    Ok(Endpoint::from_shared(uri)
        .map_err(|err| IonetError::InvalidArgument(format!("address {address:?} is not valid: {err}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}

/// Connects to `address` now, failing with `Unavailable` if nothing answers.
pub async fn connect(address: &str, token: &ClusterToken, connect_timeout: Duration) -> IonetResult<AuthChannel> {
    let channel = endpoint(address, connect_timeout)?
        .connect()
        .await
        .map_err(|err| IonetError::Unavailable(format!("cannot reach {address}: {err}")))?;
    Ok(InterceptedService::new(channel, AttachToken::new(token)))
}

/// A channel that connects on first use and reconnects after failures.
pub fn connect_lazy(address: &str, token: &ClusterToken, connect_timeout: Duration) -> IonetResult<AuthChannel> {
    let channel = endpoint(address, connect_timeout)?.connect_lazy();
    Ok(InterceptedService::new(channel, AttachToken::new(token)))
}

pub async fn gcs_client(address: &str, token: &ClusterToken) -> IonetResult<GcsClient> {
    let channel = connect(address, token, Duration::from_secs(5)).await?;
    // No cap on what the client sends: an oversize request then meets the server's cap,
    // which answers with a status naming both sizes, where a client-side cap would only
    // surface as an HTTP/2 reset.
    Ok(GcsClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES))
}

/// A client of the head's metering and ledger service (same address and token as the GCS).
pub async fn metering_client(address: &str, token: &ClusterToken) -> IonetResult<MeteringClient> {
    let channel = connect(address, token, Duration::from_secs(5)).await?;
    Ok(MeteringClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES))
}

impl proto::common::ResourceQuantities {
    pub fn from_set(set: &ResourceSet) -> Self {
        Self { units: set.to_units() }
    }

    pub fn to_set(&self) -> IonetResult<ResourceSet> {
        ResourceSet::from_units(self.units.iter())
    }
}

impl From<&ResourceSet> for proto::common::ResourceQuantities {
    fn from(set: &ResourceSet) -> Self {
        Self::from_set(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn errors_round_trip_through_status() {
        let status: Status = IonetError::NotFound("node 3f2a… is not registered".into()).into();
        assert_eq!(status.code(), Code::NotFound);
        let back: IonetError = status.into();
        assert_eq!(back.to_string(), "not found: node 3f2a… is not registered");
        let unavailable: IonetError = Status::unavailable("head away").into();
        assert!(unavailable.is_retryable());
    }
}
