//! Cluster token authentication, on from the first RPC.
//!
//! The head generates a random token (or takes one from `--token` / `IONET_TOKEN`)
//! and writes it into the session directory, where local `ionet` commands find it.
//! Every RPC carries `authorization: Bearer <token>` (or a signed credential in its
//! place); servers check it, with the authorization table, in the layer of
//! [`crate::authz`], so no handler runs for an unauthenticated or unauthorised call.

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
    pub(crate) fn matches(&self, candidate: &[u8]) -> bool {
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

    #[test]
    fn tokens_with_spaces_are_refused() {
        assert!(ClusterToken::new("a b").is_err());
        assert!(ClusterToken::new("  ").is_err());
        assert_eq!(ClusterToken::new(" abc ").unwrap().as_str(), "abc");
    }
}
