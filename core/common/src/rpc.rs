//! The wire protocol: generated messages and tonic clients/servers from `core/common/proto/`,
//! the one mapping between [`IonetError`] and gRPC status codes, and the helpers
//! that open authenticated channels.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Endpoint;

use crate::auth::{AttachToken, Bearer};
use crate::error::{IonetError, IonetResult};
use crate::failover::{self, ClusterChannel, Heads};
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

pub mod status {
    //! One mapping between [`IonetError`] and gRPC statuses, both ways. An error sent by
    //! an ionet server carries its variant in the status's details ([`ErrorDetail`]), so
    //! it comes back as the same variant with the same text, whatever its code; a status
    //! from elsewhere (the transport, a proxy) is read from its code alone.

    use prost::Message;
    use tonic::{Code, Status};

    use super::proto::common::ErrorDetail;
    use crate::error::IonetError;

    /// The code a caller that reads only codes acts on.
    fn code_of(error: &IonetError) -> Code {
        match error {
            IonetError::InvalidArgument(_) | IonetError::Config(_) => Code::InvalidArgument,
            IonetError::NotFound(_) => Code::NotFound,
            IonetError::AlreadyExists(_) => Code::AlreadyExists,
            IonetError::Unauthenticated(_) => Code::Unauthenticated,
            IonetError::PermissionDenied(_) => Code::PermissionDenied,
            IonetError::FailedPrecondition(_) | IonetError::Infeasible(_) => Code::FailedPrecondition,
            IonetError::ResourceExhausted(_) => Code::ResourceExhausted,
            IonetError::Unavailable(_) => Code::Unavailable,
            IonetError::Timeout(_) => Code::DeadlineExceeded,
            IonetError::Io(_) | IonetError::Internal(_) => Code::Internal,
            IonetError::TaskFailed { .. } | IonetError::WorkerCrashed { .. } | IonetError::ActorDied(_) => {
                Code::Aborted
            }
            IonetError::ObjectLost(_) | IonetError::OwnerDied(_) => Code::DataLoss,
            IonetError::Cancelled(_) => Code::Cancelled,
        }
    }

    /// The error as its detail: the variant's name and fields.
    pub fn detail_of(error: &IonetError) -> ErrorDetail {
        let plain = |message: &String| ErrorDetail { message: message.clone(), ..Default::default() };
        let mut detail = match error {
            IonetError::InvalidArgument(m)
            | IonetError::NotFound(m)
            | IonetError::AlreadyExists(m)
            | IonetError::Unauthenticated(m)
            | IonetError::PermissionDenied(m)
            | IonetError::FailedPrecondition(m)
            | IonetError::ResourceExhausted(m)
            | IonetError::Unavailable(m)
            | IonetError::Timeout(m)
            | IonetError::Config(m)
            | IonetError::Internal(m)
            | IonetError::ObjectLost(m)
            | IonetError::OwnerDied(m)
            | IonetError::Infeasible(m)
            | IonetError::ActorDied(m)
            | IonetError::Cancelled(m) => plain(m),
            IonetError::Io(error) => plain(&error.to_string()),
            IonetError::TaskFailed { function, node, message, payload } => ErrorDetail {
                function: function.clone(),
                node: node.clone(),
                message: message.clone(),
                payload: payload.clone(),
                ..Default::default()
            },
            IonetError::WorkerCrashed { function, attempts, reason } => ErrorDetail {
                function: function.clone(),
                attempts: *attempts,
                message: reason.clone(),
                ..Default::default()
            },
        };
        detail.kind = error.kind().to_string();
        detail
    }

    /// The error a detail names; `None` for a kind this build does not know.
    pub fn error_of(detail: ErrorDetail) -> Option<IonetError> {
        let ErrorDetail { kind, message: m, function, node, attempts, payload } = detail;
        Some(match kind.as_str() {
            "InvalidArgument" => IonetError::InvalidArgument(m),
            "NotFound" => IonetError::NotFound(m),
            "AlreadyExists" => IonetError::AlreadyExists(m),
            "Unauthenticated" => IonetError::Unauthenticated(m),
            "PermissionDenied" => IonetError::PermissionDenied(m),
            "FailedPrecondition" => IonetError::FailedPrecondition(m),
            "ResourceExhausted" => IonetError::ResourceExhausted(m),
            "Unavailable" => IonetError::Unavailable(m),
            "Timeout" => IonetError::Timeout(m),
            "Config" => IonetError::Config(m),
            "Io" => IonetError::Io(std::io::Error::other(m)),
            "Internal" => IonetError::Internal(m),
            "TaskFailed" => IonetError::TaskFailed { function, node, message: m, payload },
            "WorkerCrashed" => IonetError::WorkerCrashed { function, attempts, reason: m },
            "ObjectLost" => IonetError::ObjectLost(m),
            "OwnerDied" => IonetError::OwnerDied(m),
            "Infeasible" => IonetError::Infeasible(m),
            "ActorDied" => IonetError::ActorDied(m),
            "Cancelled" => IonetError::Cancelled(m),
            _ => return None,
        })
    }

    /// A copy of `error` (it is not `Clone`: an `Io` error holds an `std::io::Error`), the
    /// same variant with the same text, as the wire would carry it.
    pub fn copy_of(error: &IonetError) -> IonetError {
        error_of(detail_of(error)).unwrap_or_else(|| IonetError::Internal(error.to_string()))
    }

    impl From<IonetError> for Status {
        fn from(error: IonetError) -> Status {
            let detail = detail_of(&error);
            // The message is the variant's own text (a code-only reader's mapping back adds
            // the prefix again); the structured variants' whole text.
            let message = match &error {
                IonetError::Io(_) | IonetError::TaskFailed { .. } | IonetError::WorkerCrashed { .. } => {
                    error.to_string()
                }
                _ => detail.message.clone(),
            };
            Status::with_details(code_of(&error), message, detail.encode_to_vec().into())
        }
    }

    impl From<Status> for IonetError {
        fn from(status: Status) -> IonetError {
            if !status.details().is_empty() {
                if let Some(error) = ErrorDetail::decode(status.details()).ok().and_then(error_of) {
                    return error;
                }
            }
            let message = status.message().to_string();
            match status.code() {
                Code::InvalidArgument | Code::OutOfRange => IonetError::InvalidArgument(message),
                Code::NotFound => IonetError::NotFound(message),
                Code::AlreadyExists => IonetError::AlreadyExists(message),
                Code::Unauthenticated => IonetError::Unauthenticated(message),
                Code::PermissionDenied => IonetError::PermissionDenied(message),
                Code::FailedPrecondition | Code::Aborted => IonetError::FailedPrecondition(message),
                Code::ResourceExhausted => IonetError::ResourceExhausted(message),
                // Without a detail, a cancelled call is the transport's doing (a reset
                // stream, a peer gone): worth retrying.
                Code::Unavailable | Code::Cancelled => IonetError::Unavailable(message),
                Code::DeadlineExceeded => IonetError::Timeout(message),
                Code::DataLoss => IonetError::ObjectLost(message),
                _ => IonetError::Internal(format!("{:?}: {message}", status.code())),
            }
        }
    }

    #[cfg(test)]
    pub(crate) mod tests {
        use super::*;

        /// One of each variant; the match makes a new variant fail to compile here until
        /// it is added.
        pub(crate) fn every_variant() -> Vec<IonetError> {
            let all = vec![
                IonetError::InvalidArgument("bad".into()),
                IonetError::NotFound("gone".into()),
                IonetError::AlreadyExists("twice".into()),
                IonetError::Unauthenticated("who".into()),
                IonetError::PermissionDenied("not yours".into()),
                IonetError::FailedPrecondition("not yet".into()),
                IonetError::ResourceExhausted("full".into()),
                IonetError::Unavailable("later".into()),
                IonetError::Timeout("slow".into()),
                IonetError::Config("typo".into()),
                IonetError::Io(std::io::Error::other("disk")),
                IonetError::Internal("bug".into()),
                IonetError::TaskFailed {
                    function: "f".into(),
                    node: "ab12".into(),
                    message: "boom".into(),
                    payload: b"pickled".to_vec(),
                },
                IonetError::WorkerCrashed { function: "g".into(), attempts: 3, reason: "killed".into() },
                IonetError::ObjectLost("lost".into()),
                IonetError::OwnerDied("gone".into()),
                IonetError::Infeasible("no GPU".into()),
                IonetError::ActorDied("dead".into()),
                IonetError::Cancelled("stop".into()),
            ];
            for error in &all {
                match error {
                    IonetError::InvalidArgument(_)
                    | IonetError::NotFound(_)
                    | IonetError::AlreadyExists(_)
                    | IonetError::Unauthenticated(_)
                    | IonetError::PermissionDenied(_)
                    | IonetError::FailedPrecondition(_)
                    | IonetError::ResourceExhausted(_)
                    | IonetError::Unavailable(_)
                    | IonetError::Timeout(_)
                    | IonetError::Config(_)
                    | IonetError::Io(_)
                    | IonetError::Internal(_)
                    | IonetError::TaskFailed { .. }
                    | IonetError::WorkerCrashed { .. }
                    | IonetError::ObjectLost(_)
                    | IonetError::OwnerDied(_)
                    | IonetError::Infeasible(_)
                    | IonetError::ActorDied(_)
                    | IonetError::Cancelled(_) => {}
                }
            }
            all
        }

        #[test]
        fn every_error_comes_back_as_itself() {
            let all = every_variant();
            let kinds: std::collections::BTreeSet<_> = all.iter().map(IonetError::kind).collect();
            assert_eq!(kinds.len(), all.len(), "two variants share a kind");
            for error in all {
                let (kind, text, retryable) = (error.kind(), error.to_string(), error.is_retryable());
                let status = Status::from(error);
                assert!(text.ends_with(status.message()), "a code-only reader sees the variant's text");
                // Through the wire: the status as a client receives it.
                let mut headers = tonic::codegen::http::HeaderMap::new();
                status.add_header(&mut headers).unwrap();
                let status = Status::from_header_map(&headers).unwrap();
                let back = IonetError::from(status);
                if let IonetError::TaskFailed { payload, .. } = &back {
                    assert_eq!(payload, b"pickled", "a failure's payload crosses apart from its text");
                }
                assert_eq!((back.kind(), back.to_string(), back.is_retryable()), (kind, text.clone(), retryable));
                let copy = copy_of(&back);
                assert_eq!((copy.kind(), copy.to_string()), (kind, text), "a copy is the same error");
            }
        }

        #[test]
        fn a_status_from_elsewhere_is_read_by_its_code() {
            let read = |code, message: &str| IonetError::from(Status::new(code, message));
            assert!(matches!(read(Code::Unavailable, "connection refused"), IonetError::Unavailable(_)));
            assert!(read(Code::Cancelled, "stream reset").is_retryable());
            assert!(matches!(read(Code::NotFound, "x"), IonetError::NotFound(m) if m == "x"));
            assert!(matches!(read(Code::Unknown, "h2"), IonetError::Internal(m) if m.contains("h2")));
            // A detail of a kind this build does not know falls back to the code.
            let unknown = ErrorDetail { kind: "FromTheFuture".into(), message: "m".into(), ..Default::default() };
            let status = Status::with_details(Code::NotFound, "m", unknown.encode_to_vec().into());
            assert!(matches!(IonetError::from(status), IonetError::NotFound(_)));
        }
    }
}

/// An authenticated channel: every call on it carries the caller's credential. To a
/// list of heads (`a,b`), it follows the one that answers ([`crate::failover`]).
pub type AuthChannel = InterceptedService<ClusterChannel, AttachToken>;

pub type GcsClient = proto::gcs::gcs_client::GcsClient<AuthChannel>;
pub type NodeManagerClient = proto::node::node_manager_client::NodeManagerClient<AuthChannel>;
pub type MeteringClient = proto::metering::metering_client::MeteringClient<AuthChannel>;
pub type CoreWorkerClient = proto::worker::core_worker_client::CoreWorkerClient<AuthChannel>;

/// A server whose every call passes the authorization table first
/// ([`crate::authz`]); add services to it as to `Server::builder()`.
pub type AuthorizedServer =
    tonic::transport::Server<tower_layer::Stack<crate::authz::AuthorizeLayer, tower_layer::Identity>>;
/// The router of an [`AuthorizedServer`].
pub type AuthorizedRouter =
    tonic::transport::server::Router<tower_layer::Stack<crate::authz::AuthorizeLayer, tower_layer::Identity>>;

/// Most streams one connection may hold open at once (HTTP/2's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; tonic's default is none): a peer cannot make a server
/// hold unbounded state. A client past it should wait for a stream to end, but hyper's can
/// hang there for good (hyperium/hyper#3559), and a driver keeps a long poll on the head
/// per actor handle it holds: with 4,096, ten thousand actors created at once hung one run
/// in two. It is well above what a driver needs.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32_768;

/// How much a peer may send on one connection before the server reads it (HTTP/2's
/// connection window; hyper's default is 1 MiB). h2 also ends a connection whose unread
/// small DATA frames outgrow half of it (its guard against floods of tiny frames,
/// `ENHANCE_YOUR_CALM`): a driver creating ten thousand actors at once sends the head that
/// many small requests, a few hundred kilobytes of them unread while the head is busy,
/// which ended its connection mid-burst with 1 MiB.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// Every ionet server starts here: no call reaches a handler unless `authorizer` admits it,
/// and no connection holds more than [`MAX_STREAMS_PER_CONNECTION`] streams.
pub fn server(authorizer: crate::authz::Authorizer) -> AuthorizedServer {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .layer(crate::authz::AuthorizeLayer::new(authorizer))
}

/// A connection a server accepted: plain (loopback only) or TLS, holding its place in
/// its peer's count of open connections until it closes.
pub struct ServerStream {
    io: Io,
    _slot: Option<PeerSlot>,
}

enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

/// Most connections one remote host may hold open to one server at once. Loopback is
/// not counted: a node's own drivers and workers all connect from it.
pub const MAX_CONNECTIONS_PER_PEER: usize = 1024;

/// Open connections per remote host of one server.
#[derive(Debug)]
pub struct PeerConnections {
    max: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One open connection of a remote host; its count goes down when this drops.
pub struct PeerSlot {
    peers: std::sync::Arc<PeerConnections>,
    ip: std::net::IpAddr,
}

impl PeerConnections {
    pub fn new(max: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { max, open: std::sync::Mutex::new(std::collections::HashMap::new()) })
    }

    /// A place for one more connection from `ip`, or `Err` when it holds the most
    /// already. Loopback always gets one (`Ok(None)`: not counted).
    pub fn admit(self: &std::sync::Arc<Self>, ip: std::net::IpAddr) -> Result<Option<PeerSlot>, usize> {
        let ip = Self::host_of(ip);
        if ip.is_loopback() {
            return Ok(None);
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= self.max {
            return Err(*count);
        }
        *count += 1;
        Ok(Some(PeerSlot { peers: self.clone(), ip }))
    }

    /// Connections `ip` holds open now.
    pub fn open(&self, ip: std::net::IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(&Self::host_of(ip)).copied().unwrap_or(0)
    }

    /// Who is counted for `ip`: an IPv4 address as itself (also when mapped into IPv6),
    /// an IPv6 address by its /64, which one host commonly holds whole.
    fn host_of(ip: std::net::IpAddr) -> std::net::IpAddr {
        match ip.to_canonical() {
            std::net::IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                std::net::IpAddr::V6(std::net::Ipv6Addr::from(bits))
            }
            v4 => v4,
        }
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl ServerStream {
    fn tcp(&self) -> &tokio::net::TcpStream {
        match &self.io {
            Io::Plain(stream) => stream,
            Io::Tls(stream) => stream.get_ref().0,
        }
    }
}

impl tonic::transport::server::Connected for ServerStream {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

impl tokio::io::AsyncRead for ServerStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ServerStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => std::pin::Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_write_vectored(cx, bufs),
            Io::Tls(stream) => std::pin::Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => std::pin::Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
        }
    }
}

/// The longest queue of connections not yet accepted a server asks the kernel for; Linux
/// caps it at `net.core.somaxconn` (4,096 by default). The 128 of `TcpListener::bind`
/// (tokio's and `std`'s) is far too short for a head whose nodes all connect at once, as
/// after its restart: 10,000 nodes overflowed it, and each connection whose SYN was
/// dropped waited out TCP's retransmission (1 s, then 3, 7, 15) before it was accepted.
pub const ACCEPT_BACKLOG: u32 = 65_535;

/// A server's socket on `host:port` (port 0: a free one), with [`ACCEPT_BACKLOG`]; the
/// first of `host`'s addresses that binds.
pub async fn listen(host: &str, port: u16) -> std::io::Result<tokio::net::TcpListener> {
    let mut refused = None;
    let addresses = tokio::net::lookup_host((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .map_err(|err| std::io::Error::new(err.kind(), format!("{host}: {err}")))?;
    for address in addresses {
        // An address that fails (a family this kernel lacks, a port taken) leaves the
        // next one to try, as `TcpListener::bind` does.
        let attempt = || {
            let socket =
                if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            // As `TcpListener::bind` does: a restarted server rebinds its port at once.
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(ACCEPT_BACKLOG)
        };
        match attempt() {
            Ok(listener) => return Ok(listener),
            Err(err) => refused = Some(err),
        }
    }
    Err(refused.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host} names no address to listen on"))
    }))
}

/// Raises this process's soft limit on open descriptors to its hard limit and returns
/// the limit it has now. A daemon calls it at start: a head holds a connection per node,
/// and the usual soft limit (1,024) left a head of more nodes failing every accept.
pub fn raise_descriptor_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write the struct passed, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur as u64)
}

/// The connections a server takes from `listener`.
pub type Incoming = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<ServerStream>> + Send>>;

/// The connections accepted on `listener`, with Nagle's algorithm off (a server given its
/// own listener does not apply `Server::tcp_nodelay` to them, and a small reply held back
/// until the peer's delayed ACK costs a request its latency); with `tls`, each after its
/// TLS handshake, made concurrently and dropped past [`crate::tls::HANDSHAKE_TIMEOUT`]
/// (a client speaking plain text to it never gets a call through). A remote host holds
/// at most [`MAX_CONNECTIONS_PER_PEER`] of them open at once; more are closed at accept.
///
/// Refuses a plain server bound to anything but loopback: there, servers speak TLS only.
pub fn incoming(
    listener: tokio::net::TcpListener,
    tls: Option<&std::sync::Arc<crate::tls::ServerCert>>,
) -> IonetResult<Incoming> {
    incoming_with(listener, tls.map(|cert| cert.server_config()).transpose()?)
}

/// [`incoming`] for an HTTP/1.1 server (the head's job server): the same checks, TLS
/// offering `http/1.1`.
pub fn incoming_http(
    listener: tokio::net::TcpListener,
    tls: Option<&std::sync::Arc<crate::tls::ServerCert>>,
) -> IonetResult<Incoming> {
    incoming_with(listener, tls.map(|cert| cert.http_server_config()).transpose()?)
}

fn incoming_with(
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
) -> IonetResult<Incoming> {
    use tokio_stream::StreamExt;
    crate::tls::check_plain_bind(listener.local_addr()?, tls.is_some())?;
    let peers = PeerConnections::new(MAX_CONNECTIONS_PER_PEER);
    let Some(config) = tls else {
        return Ok(Box::pin(tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| {
            match accepted {
                Ok(stream) => {
                    let slot = admit(&peers, &stream)?;
                    let _ = stream.set_nodelay(true);
                    Some(Ok(ServerStream { io: Io::Plain(stream), _slot: slot }))
                }
                Err(err) => Some(Err(err)),
            }
        })));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = sender.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors, most likely: the next accept may succeed.
                    tracing::warn!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = admit(&peers, &stream) else { continue };
            let _ = stream.set_nodelay(true);
            let (acceptor, sender) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(ServerStream { io: Io::Tls(Box::new(stream)), _slot: slot })).await;
                    }
                    Ok(Err(err)) => tracing::info!(%peer, error = %err, "refused a connection: no TLS handshake"),
                    Err(_) => tracing::info!(%peer, "refused a connection: no TLS handshake within the deadline"),
                }
            });
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
}

/// A place among its peer's connections for `stream`, or `None` (and the connection
/// closed) when the peer holds the most already.
fn admit(peers: &std::sync::Arc<PeerConnections>, stream: &tokio::net::TcpStream) -> Option<Option<PeerSlot>> {
    let Ok(peer) = stream.peer_addr() else { return None };
    match peers.admit(peer.ip()) {
        Ok(slot) => Some(slot),
        Err(open) => {
            tracing::warn!(%peer, open, "refused a connection: its host holds the most connections a peer may");
            None
        }
    }
}

/// Default cap on one gRPC message, both ways.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// `host:port` of an address, without its scheme (`https://10.0.0.5:7000` → `10.0.0.5:7000`).
pub fn socket_address_of(address: &str) -> &str {
    address.split_once("://").map(|(_, rest)| rest).unwrap_or(address)
}

/// Whether the server at `address` speaks TLS (its address says so: `https://`).
pub fn is_tls_address(address: &str) -> bool {
    address.starts_with("https://")
}

fn endpoint(address: &str, connect_timeout: Duration) -> IonetResult<Endpoint> {
    let uri = if address.contains("://") { address.to_string() } else { format!("http://{address}") };
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|err| IonetError::InvalidArgument(format!("address {address:?} is not valid: {err}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if !is_tls_address(address) {
        return Ok(endpoint);
    }
    endpoint
        .tls_config(crate::tls::client_config(address)?)
        .map_err(|err| IonetError::Config(format!("TLS to {address}: {err}")))
}

/// Connects to `address` now (to a list of heads: the first that answers), failing with
/// `Unavailable` if nothing answers.
async fn connect_now(address: &str, connect_timeout: Duration) -> IonetResult<ClusterChannel> {
    let address = &failover::one_scheme(address).map_err(IonetError::InvalidArgument)?;
    let list = failover::addresses(address);
    if list.len() <= 1 {
        let channel = endpoint(address.trim(), connect_timeout)?
            .connect()
            .await
            .map_err(|err| IonetError::Unavailable(format!("cannot reach {address}: {err}")))?;
        return Ok(ClusterChannel::One(channel));
    }
    let mut channels =
        list.iter().map(|head| Ok(endpoint(head, connect_timeout)?.connect_lazy())).collect::<IonetResult<Vec<_>>>()?;
    let mut last = String::new();
    for (index, head) in list.iter().enumerate() {
        match endpoint(head, connect_timeout)?.connect().await {
            Ok(channel) => {
                channels[index] = channel;
                return Ok(ClusterChannel::Heads(Heads::new(channels, index)));
            }
            Err(err) => last = format!("{head}: {err}"),
        }
    }
    Err(IonetError::Unavailable(format!("cannot reach any head of {address} (last: {last})")))
}

/// Connects to `address` now, failing with `Unavailable` if nothing answers.
pub async fn connect(address: &str, token: &Bearer, connect_timeout: Duration) -> IonetResult<AuthChannel> {
    Ok(InterceptedService::new(connect_now(address, connect_timeout).await?, AttachToken::new(token)))
}

/// [`connect`] with a credential that may change ([`crate::auth::SharedCredential`]: a
/// node daemon's, renewed while it runs).
pub async fn connect_shared(
    address: &str,
    credential: &crate::auth::SharedCredential,
    connect_timeout: Duration,
) -> IonetResult<AuthChannel> {
    Ok(InterceptedService::new(connect_now(address, connect_timeout).await?, AttachToken::shared(credential)))
}

/// [`connect_lazy`] with a credential that may change ([`crate::auth::SharedCredential`]).
pub fn connect_lazy_shared(
    address: &str,
    credential: &crate::auth::SharedCredential,
    connect_timeout: Duration,
) -> IonetResult<AuthChannel> {
    Ok(InterceptedService::new(lazy_channel(address, connect_timeout)?, AttachToken::shared(credential)))
}

/// A channel that connects on first use and reconnects after failures.
pub fn connect_lazy(address: &str, credential: &Bearer, connect_timeout: Duration) -> IonetResult<AuthChannel> {
    Ok(with_credential(lazy_channel(address, connect_timeout)?, credential))
}

/// A connection (made on first use) that carries no credential yet: one process speaking
/// as several principals (the head, for the jobs whose actors it places) shares it between
/// them with [`with_credential`].
pub fn lazy_channel(address: &str, connect_timeout: Duration) -> IonetResult<ClusterChannel> {
    let address = &failover::one_scheme(address).map_err(IonetError::InvalidArgument)?;
    let list = failover::addresses(address);
    if list.len() <= 1 {
        return Ok(ClusterChannel::One(endpoint(address.trim(), connect_timeout)?.connect_lazy()));
    }
    let channels =
        list.iter().map(|head| Ok(endpoint(head, connect_timeout)?.connect_lazy())).collect::<IonetResult<Vec<_>>>()?;
    Ok(ClusterChannel::Heads(Heads::new(channels, 0)))
}

/// `channel`'s connection, with every call carrying `credential`.
pub fn with_credential(channel: impl Into<ClusterChannel>, credential: &Bearer) -> AuthChannel {
    InterceptedService::new(channel.into(), AttachToken::new(credential))
}

pub async fn gcs_client(address: &str, token: &Bearer) -> IonetResult<GcsClient> {
    let channel = connect(address, token, Duration::from_secs(5)).await?;
    // No cap on what the client sends: an oversize request then meets the server's cap,
    // which answers with a status naming both sizes, where a client-side cap would only
    // surface as an HTTP/2 reset.
    Ok(GcsClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES))
}

/// A client of the head's metering and ledger service (same address as the GCS).
pub async fn metering_client(address: &str, token: &Bearer) -> IonetResult<MeteringClient> {
    let channel = connect(address, token, Duration::from_secs(5)).await?;
    Ok(MeteringClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES))
}

impl proto::gcs::NodeRows {
    /// The rows, decoded; an error names the first that is not a `NodeInfo`.
    pub fn decode_nodes(&self) -> IonetResult<Vec<proto::common::NodeInfo>> {
        use prost::Message as _;
        self.nodes
            .iter()
            .enumerate()
            .map(|(index, row)| {
                proto::common::NodeInfo::decode(row.as_ref()).map_err(|err| {
                    IonetError::Internal(format!("row {index} of the node table the head sent is not a node: {err}"))
                })
            })
            .collect()
    }
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

    /// A server's accept queue holds as many connections as the kernel allows, not the
    /// 128 of `TcpListener::bind`: a head's nodes connecting at once are all taken in by
    /// the kernel while the server is busy, none left retransmitting its SYN.
    #[tokio::test]
    async fn a_server_queues_as_many_connections_as_the_kernel_allows() {
        let most = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .unwrap_or(4096);
        if most <= 128 {
            eprintln!(
                "skipped: this kernel queues at most {most} connections (net.core.somaxconn), no more than bind's"
            );
            return;
        }
        // Far past 128, within what the kernel allows and this process may hold open
        // (its soft limit raised to the hard one, as a daemon's is).
        let count = most.min(1_500);
        let open_most = raise_descriptor_limit().unwrap_or_default() as usize;
        if open_most < count + 64 {
            eprintln!("skipped: this process may hold {open_most} descriptors, the test needs {}", count + 64);
            return;
        }
        let listener = listen("127.0.0.1", 0).await.unwrap();
        let address = listener.local_addr().unwrap();
        // Nothing accepts: every connection waits in the queue.
        let mut connects = tokio::task::JoinSet::new();
        for _ in 0..count {
            connects.spawn(tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(address)));
        }
        let mut queued = Vec::new();
        while let Some(outcome) = connects.join_next().await {
            if let Ok(Ok(Ok(stream))) = outcome {
                queued.push(stream);
            }
        }
        assert_eq!(queued.len(), count, "connections the server's queue took before any was accepted");
        drop(listener);
    }

    #[tokio::test]
    async fn listening_where_nothing_can_bind_says_why() {
        let within = |call| tokio::time::timeout(Duration::from_secs(30), call);
        // A port taken by another server: the kernel's word, not a hang.
        let taken = listen("127.0.0.1", 0).await.unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = within(listen("127.0.0.1", port)).await.expect("answered").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        // A name no resolver knows (`.invalid` is reserved for that): an error, not a hang.
        let err = within(listen("no-such-host.invalid", 0)).await.expect("answered").unwrap_err();
        assert!(err.to_string().contains("no-such-host.invalid"), "{err}");
    }

    /// A process started with a low soft limit on descriptors (a login shell's 1,024, here
    /// 256) has its hard limit after `raise_descriptor_limit`: run in a child of this test
    /// binary started with the low limit, so this process's own limit is left alone.
    #[test]
    fn a_daemon_raises_its_descriptor_limit_to_the_hard_one() {
        const CHILD: &str = "IONET_TEST_DESCRIPTOR_LIMIT_CHILD";
        let read = || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            // SAFETY: getrlimit writes the struct passed, nothing else.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
            limit
        };
        if std::env::var_os(CHILD).is_some() {
            assert_eq!(read().rlim_cur, 256, "the child starts with the low limit");
            let raised = raise_descriptor_limit().unwrap();
            assert_eq!((raised, read().rlim_cur), (read().rlim_max as u64, read().rlim_max));
            println!("child raised its limit to {raised}");
            return;
        }
        if read().rlim_max <= 256 {
            eprintln!("skipped: the hard limit is {}, no higher than the child's soft one", read().rlim_max);
            return;
        }
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.args(["--exact", "rpc::tests::a_daemon_raises_its_descriptor_limit_to_the_hard_one", "--nocapture"]);
        child.env(CHILD, "1");
        // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
        unsafe {
            use std::os::unix::process::CommandExt;
            child.pre_exec(|| {
                let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                limit.rlim_cur = 256;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = child.output().unwrap();
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{printed}{}", String::from_utf8_lossy(&output.stderr));
        assert!(printed.contains("child raised its limit to"), "the child ran the test: {printed}");
    }

    /// Decodes `bytes` as every message a peer sends a server or a client reads from one,
    /// and runs the checks a handler runs first on what it decoded: nothing may panic.
    fn decode_everything(bytes: &[u8]) {
        use prost::Message;
        macro_rules! decode {
            ($($message:ty),* $(,)?) => { $( let _ = <$message>::decode(bytes); )* };
        }
        decode!(
            proto::worker::TaskBatch,
            proto::worker::ActorCallBatch,
            proto::worker::ReplyBatch,
            proto::worker::GetObjectReply,
            proto::worker::ReportGeneratorItemRequest,
            proto::worker::CreateActorRequest,
            proto::object::ObjectChunk,
            proto::object::PullRequest,
            proto::node::RequestWorkerLeaseRequest,
            proto::node::RequestWorkerLeaseReply,
            proto::node::PrepareBundleRequest,
            proto::gcs::RegisterNodeRequest,
            proto::gcs::CreateActorRequest,
            proto::gcs::ClusterEvent,
            proto::metering::LeaseStartedRequest,
            proto::metering::LeaseEndedRequest,
            proto::gcs::AddJobRequest,
            proto::gcs::GetJobWorkerCommandReply,
            proto::node::IssueCertificateRequest,
            proto::node::IssueCertificateReply,
        );
        // What a head certifies at registration, and a node for its processes: refused
        // or signed, never a panic.
        static AUTHORITIES: std::sync::OnceLock<(crate::tls::ClusterCa, crate::tls::NodeAuthority)> =
            std::sync::OnceLock::new();
        let (ca, node) = AUTHORITIES.get_or_init(|| {
            let ca = crate::tls::ClusterCa::generate().unwrap();
            let node = crate::tls::NodeAuthority::new("n", "10.0.0.5").unwrap();
            node.install(ca.certify_node("n", "10.0.0.5", &node.public_key()).unwrap()).unwrap();
            (ca, node)
        });
        if let Ok(request) = proto::node::IssueCertificateRequest::decode(bytes) {
            let _ = node.issue(&request.public_key);
        }
        if let Ok(request) = proto::gcs::RegisterNodeRequest::decode(bytes) {
            let address = request.node.map(|node| node.address).unwrap_or_default();
            let _ = ca.certify_node("n", crate::tls::host_of(&address), &request.tls_public_key);
        }
        if let Ok(request) = proto::gcs::HeartbeatRequest::decode(bytes) {
            let _ = crate::NodeId::from_bytes(&request.node_id);
            let _ = request.available.map(|available| available.to_set());
        }
        if let Ok(request) = proto::gcs::RegisterNodeRequest::decode(bytes) {
            let node = request.node.unwrap_or_default();
            let _ = node.total.unwrap_or_default().to_set();
            let message = crate::credential::registration_message(&node.node_id, &node.public_key);
            let _ = crate::credential::verify_signature(&node.public_key, &message, &request.proof);
        }
        if let Ok(request) = proto::metering::LeaseStartedRequest::decode(bytes) {
            let _ = request.resources.unwrap_or_default().to_set();
            let _ = crate::LeaseId::from_bytes(&request.lease_id);
        }
        if let Ok(reply) = proto::worker::GetObjectReply::decode(bytes) {
            if let Some(proto::worker::get_object_reply::Result::Error(detail)) = reply.result {
                let _ = status::error_of(detail);
            }
        }
    }

    #[test]
    fn a_remote_host_holds_at_most_so_many_connections() {
        let peers = PeerConnections::new(2);
        let (far, other) = ("10.0.0.9".parse().unwrap(), "10.0.0.10".parse().unwrap());
        let first = peers.admit(far).unwrap();
        let second = peers.admit(far).unwrap();
        assert!(first.is_some() && second.is_some());
        assert_eq!(peers.admit(far).err(), Some(2), "a third is refused");
        assert!(peers.admit(other).unwrap().is_some(), "another host has its own count");
        drop(first);
        assert_eq!(peers.open(far), 1);
        assert!(peers.admit(far).unwrap().is_some(), "a closed connection makes room");
        // One IPv6 host's /64 counts as one peer; a mapped IPv4 address as itself.
        let (one, two) = ("2001:db8::1".parse().unwrap(), "2001:db8::ffff".parse().unwrap());
        let _kept = (peers.admit(one).unwrap(), peers.admit(two).unwrap());
        assert!(peers.admit("2001:db8::2".parse().unwrap()).is_err(), "the /64 holds two already");
        assert_eq!(peers.open("::ffff:10.0.0.9".parse().unwrap()), 1, "10.0.0.9 written as mapped is itself");
        // The node's own processes connect from loopback: never counted.
        for _ in 0..10 {
            assert!(peers.admit("127.0.0.1".parse().unwrap()).unwrap().is_none());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Random bytes, as a malformed or hostile peer sends them.
        #[test]
        fn random_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            decode_everything(&bytes);
        }

        /// Well-formed messages with hostile field values: quantities at the edges of i64,
        /// ids of any length, names of any text.
        #[test]
        fn hostile_fields_never_panic_a_handler_check(
            units in proptest::collection::hash_map(".{0,8}", proptest::prelude::any::<i64>(), 0..6),
            node_id in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            use prost::Message;
            let quantities = proto::common::ResourceQuantities { units: units.clone() };
            if let Ok(set) = quantities.to_set() {
                // Read from the wire: never negative, never an empty name.
                for (name, quantity) in set.iter() {
                    proptest::prop_assert!(!name.trim().is_empty() && quantity.units() >= 0);
                }
                // Sums of hostile totals saturate instead of overflowing.
                let mut sum = set.clone();
                sum.add(&set);
                sum.add(&set);
            }
            let request = proto::gcs::HeartbeatRequest { node_id, available: Some(quantities), ..Default::default() };
            decode_everything(&request.encode_to_vec());
        }
    }
}

/// A codec that sends and receives a message's raw bytes, unencoded: for tools and tests
/// that put arbitrary (also malformed) messages on the wire, or call any path.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

/// [`RawCodec`]'s two halves.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCoder;

impl tonic::codec::Encoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCoder;
    type Decoder = RawCoder;

    fn encoder(&mut self) -> RawCoder {
        RawCoder
    }

    fn decoder(&mut self) -> RawCoder {
        RawCoder
    }
}
