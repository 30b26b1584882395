//! Cluster token authentication, on from the first RPC.
//!
//! The head generates a random token (or takes one from `--token` / `IONET_TOKEN`)
//! and writes it into the session directory, where local `ionet` commands find it.
//! Every RPC carries `authorization: Bearer <token>`; servers check it in a tonic
//! interceptor, so no handler runs for an unauthenticated call. A refusal is logged
//! with the peer's address and answered with `UNAUTHENTICATED`.

use std::fmt;
use std::sync::Arc;

use rand::RngCore;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

use crate::error::{IonetError, IonetResult};

const AUTHORIZATION: &str = "authorization";
const BEARER: &str = "Bearer ";

/// The shared secret of one cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(Arc<str>);

impl ClusterToken {
    /// A fresh random token: 32 bytes as hex.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes).into())
    }

    /// Takes an operator-supplied token; it must be printable ASCII without spaces so it
    /// fits in a gRPC header.
    pub fn new(token: &str) -> IonetResult<Self> {
        let token = token.trim();
        if token.is_empty() {
            return Err(IonetError::InvalidArgument("cluster token is empty".into()));
        }
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(IonetError::InvalidArgument("cluster token must be printable ASCII without spaces".into()));
        }
        Ok(Self(token.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    fn matches(&self, candidate: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if expected.len() != candidate.len() {
            return false;
        }
        expected.iter().zip(candidate).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(<redacted>)")
    }
}

/// Server side: refuses calls without the cluster token.
#[derive(Clone, Debug)]
pub struct CheckToken {
    token: ClusterToken,
}

impl CheckToken {
    pub fn new(token: ClusterToken) -> Self {
        Self { token }
    }
}

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request.metadata().get(AUTHORIZATION).map(|value| value.as_bytes());
        let verdict = match presented {
            None => Err("missing cluster token (no authorization metadata)"),
            Some(value) => match value.strip_prefix(BEARER.as_bytes()) {
                Some(candidate) if self.token.matches(candidate) => Ok(()),
                Some(_) => Err("wrong cluster token"),
                None => Err("authorization metadata is not a bearer token"),
            },
        };
        match verdict {
            Ok(()) => Ok(request),
            Err(why) => {
                let peer = request.remote_addr().map(|addr| addr.to_string()).unwrap_or_else(|| "unknown".into());
                tracing::warn!(peer = %peer, reason = why, "refused unauthenticated request");
                Err(Status::unauthenticated(format!("{why}: pass the cluster token (--token or IONET_TOKEN)")))
            }
        }
    }
}

/// Client side: attaches the cluster token to every call.
#[derive(Clone, Debug)]
pub struct AttachToken {
    header: MetadataValue<tonic::metadata::Ascii>,
}

impl AttachToken {
    pub fn new(token: &ClusterToken) -> Self {
        let header =
            format!("{BEARER}{}", token.as_str()).parse().expect("a ClusterToken is printable ASCII by construction");
        Self { header }
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn right_token_passes_and_wrong_or_missing_is_refused() {
        let token = ClusterToken::generate();
        let mut check = CheckToken::new(token.clone());
        let mut attach = AttachToken::new(&token);
        assert!(check.call(attach.call(Request::new(())).unwrap()).is_ok());

        let mut wrong = AttachToken::new(&ClusterToken::new("nope").unwrap());
        let status = check.call(wrong.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert!(status.message().contains("wrong cluster token"));

        let status = check.call(Request::new(())).unwrap_err();
        assert!(status.message().contains("missing cluster token"));
    }

    #[test]
    fn tokens_with_spaces_are_refused() {
        assert!(ClusterToken::new("a b").is_err());
        assert!(ClusterToken::new("  ").is_err());
        assert_eq!(ClusterToken::new(" abc ").unwrap().as_str(), "abc");
    }
}
