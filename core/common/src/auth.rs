//! Cluster token authentication, on from the first RPC.
//!
//! The head generates a random token (or takes one from `--token` / `IONET_TOKEN`)
//! and writes it into the session directory, where local `ionet` commands find it.
//! Every RPC carries `authorization: Bearer <token>` (or a signed credential in its
//! place); servers check it, with the authorization table, in the layer of
//! [`crate::authz`], so no handler runs for an unauthenticated or unauthorised call.

use std::fmt;
use std::sync::{Arc, RwLock};

use rand::RngCore;
use tonic::metadata::{Ascii, MetadataValue};
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

/// A credential that may change while channels carrying it stay open: a node daemon
/// joins with a join token, then speaks with the node credential the head issued it.
#[derive(Clone)]
pub struct SharedCredential(Arc<RwLock<MetadataValue<Ascii>>>);

impl fmt::Debug for SharedCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedCredential(<redacted>)")
    }
}

impl SharedCredential {
    pub fn new(credential: &ClusterToken) -> Self {
        Self(Arc::new(RwLock::new(header_of(credential))))
    }

    /// Every channel carrying this credential presents `credential` from the next call on.
    pub fn replace(&self, credential: &ClusterToken) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = header_of(credential);
    }
}

/// The header value; marked sensitive, so HTTP/2 never indexes it in its header tables and
/// tonic's own debugging never prints it.
fn header_of(credential: &ClusterToken) -> MetadataValue<Ascii> {
    let mut header: MetadataValue<Ascii> =
        format!("{BEARER}{}", credential.as_str()).parse().expect("a ClusterToken is printable ASCII by construction");
    header.set_sensitive(true);
    header
}

/// Client side: attaches the caller's credential to every call.
#[derive(Clone)]
pub struct AttachToken {
    header: Header,
}

impl fmt::Debug for AttachToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AttachToken(<redacted>)")
    }
}

#[derive(Clone)]
enum Header {
    /// The same for the channel's life (drivers and workers: nothing to lock per call).
    Fixed(MetadataValue<Ascii>),
    Shared(SharedCredential),
}

impl AttachToken {
    pub fn new(token: &ClusterToken) -> Self {
        Self { header: Header::Fixed(header_of(token)) }
    }

    pub fn shared(credential: &SharedCredential) -> Self {
        Self { header: Header::Shared(credential.clone()) }
    }
}

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = match &self.header {
            Header::Fixed(header) => header.clone(),
            Header::Shared(shared) => shared.0.read().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        request.metadata_mut().insert(AUTHORIZATION, header);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_credential_changes_for_every_channel_carrying_it() {
        use tonic::service::Interceptor;
        let first = ClusterToken::new("first").unwrap();
        let shared = SharedCredential::new(&first);
        let mut attach = AttachToken::shared(&shared);
        let presented = |attach: &mut AttachToken| {
            attach.call(Request::new(())).unwrap().metadata().get(AUTHORIZATION).unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(presented(&mut attach), "Bearer first");
        shared.replace(&ClusterToken::new("second").unwrap());
        assert_eq!(presented(&mut attach), "Bearer second");
        assert_eq!(presented(&mut AttachToken::new(&first)), "Bearer first");
        // Never printed.
        assert!(!format!("{attach:?} {shared:?}").contains("second"));
        let request = attach.call(Request::new(())).unwrap();
        assert!(request.metadata().get(AUTHORIZATION).unwrap().is_sensitive());
    }

    #[test]
    fn tokens_with_spaces_are_refused() {
        assert!(ClusterToken::new("a b").is_err());
        assert!(ClusterToken::new("  ").is_err());
        assert_eq!(ClusterToken::new(" abc ").unwrap().as_str(), "abc");
    }
}
