//! The HTTP layer of the head's server (the job server and `/metrics`) and of a node
//! daemon's (`/metrics`): axum on tonic's hyper and tower, over the connections
//! [`ionet_common::rpc::incoming_http`] accepts (TLS whenever the process speaks it, the
//! per-peer connection cap), every route behind its row of
//! [`ionet_common::authz::HTTP_TABLE`] ([`authorize`]: 401 without a valid credential,
//! 403 naming the right it lacks, before any handler runs).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use ionet_common::authz::{decide_http, Authorizer};
use ionet_common::rpc::{Incoming, ServerStream};
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// The principal an admitted request carries (the layer put it there).
pub fn principal(extensions: &axum::http::Extensions) -> Option<ionet_common::authz::Principal> {
    extensions.get::<ionet_common::authz::Principal>().cloned()
}

/// Serves `router` on `incoming` (see [`ionet_common::rpc::incoming_http`]) until `stopped`.
pub async fn serve(router: Router, incoming: Incoming, local: SocketAddr, mut stopped: watch::Receiver<bool>) {
    let listener = Connections { incoming, local };
    let served = axum::serve(listener, router.into_make_service_with_connect_info::<Peer>()).with_graceful_shutdown(
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        },
    );
    if let Err(err) = served.await {
        tracing::error!(error = %err, "an HTTP server stopped");
    }
}

/// The accepted connections (TLS or plain) as axum takes them.
struct Connections {
    incoming: Incoming,
    local: SocketAddr,
}

/// The address a request came from (for refusals' log lines).
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Connections>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Connections>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl axum::serve::Listener for Connections {
    type Io = ServerStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    use tonic::transport::server::Connected;
                    let peer = stream.connect_info().remote_addr.unwrap_or(self.local);
                    return (stream, peer);
                }
                Some(Err(err)) => tracing::debug!(error = %err, "an HTTP connection failed before its request"),
                // The listener is gone: nothing more comes.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Every request passes its route's row before its handler; the principal goes with it
/// (a route layer: `middleware::from_fn_with_state(authorizer, authorize)`).
pub async fn authorize(
    State(authorizer): State<Arc<Authorizer>>,
    matched: MatchedPath,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().as_str().to_string();
    let route = matched.as_str().to_string();
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<Peer>>()
        .map_or_else(|| "unknown".to_string(), |info| info.0 .0.to_string());
    // A page holding no data: no credential asked, none looked at.
    if ionet_common::authz::http_route_is_public(&method, &route) {
        return next.run(request).await;
    }
    let header = request.headers().get(axum::http::header::AUTHORIZATION).map(|value| value.as_bytes().to_vec());
    let principal = match authorizer.authenticate(header.as_deref()) {
        Ok(principal) => principal,
        Err(why) => {
            tracing::warn!(%peer, %method, %route, reason = why, "refused an unauthenticated request");
            let message = format!(
                "{why}: send `Authorization: Bearer <credential>` with a credential the head issued (an account's \
                 API key)"
            );
            return (StatusCode::UNAUTHORIZED, message).into_response();
        }
    };
    if let Err(why) = decide_http(&principal, &method, &route) {
        tracing::warn!(%peer, %method, %route, %principal, "refused a request: {why}");
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}
