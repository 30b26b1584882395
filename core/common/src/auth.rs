//! What a caller presents: a bearer credential the head signed ([`crate::credential`]),
//! on every RPC, from the first.
//!
//! There is no cluster-wide secret: the operator, each node daemon, each tenant account
//! and each job holds a credential of its own, and every RPC carries
//! `authorization: Bearer <credential>`. Servers check it, with the authorization table,
//! in the layer of [`crate::authz`], so no handler runs for an unauthenticated or
//! unauthorised call. A credential is never printed: its `Debug` is redacted and its
//! header is marked sensitive.

use std::fmt;
use std::sync::{Arc, RwLock};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

use crate::error::{IonetError, IonetResult};

const AUTHORIZATION: &str = "authorization";
const BEARER: &str = "Bearer ";

/// A credential as a caller presents it (a signed, expiring credential from the head).
#[derive(Clone, PartialEq, Eq)]
pub struct Bearer(Arc<str>);

impl Bearer {
    /// Takes a credential given as text; it must be printable ASCII without spaces so it
    /// fits in a gRPC header.
    pub fn new(credential: &str) -> IonetResult<Self> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(IonetError::InvalidArgument("the credential is empty".into()));
        }
        if !credential.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(IonetError::InvalidArgument("a credential is printable ASCII without spaces".into()));
        }
        Ok(Self(credential.into()))
    }

    /// The credential a call carried (its bearer header), if it carried one.
    pub fn of<T>(request: &Request<T>) -> Option<Self> {
        let header = request.metadata().get(AUTHORIZATION)?.to_str().ok()?;
        Self::new(header.strip_prefix(BEARER)?).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Bearer(<redacted>)")
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
    pub fn new(credential: &Bearer) -> Self {
        Self(Arc::new(RwLock::new(header_of(credential))))
    }

    /// Every channel carrying this credential presents `credential` from the next call on.
    pub fn replace(&self, credential: &Bearer) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = header_of(credential);
    }
}

/// The header value; marked sensitive, so HTTP/2 never indexes it in its header tables and
/// tonic's own debugging never prints it.
fn header_of(credential: &Bearer) -> MetadataValue<Ascii> {
    let mut header: MetadataValue<Ascii> =
        format!("{BEARER}{}", credential.as_str()).parse().expect("a Bearer is printable ASCII by construction");
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
    pub fn new(token: &Bearer) -> Self {
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
        let first = Bearer::new("first").unwrap();
        let shared = SharedCredential::new(&first);
        let mut attach = AttachToken::shared(&shared);
        let presented = |attach: &mut AttachToken| {
            attach.call(Request::new(())).unwrap().metadata().get(AUTHORIZATION).unwrap().to_str().unwrap().to_string()
        };
        assert_eq!(presented(&mut attach), "Bearer first");
        shared.replace(&Bearer::new("second").unwrap());
        assert_eq!(presented(&mut attach), "Bearer second");
        assert_eq!(presented(&mut AttachToken::new(&first)), "Bearer first");
        // Never printed.
        assert!(!format!("{attach:?} {shared:?}").contains("second"));
        let request = attach.call(Request::new(())).unwrap();
        assert!(request.metadata().get(AUTHORIZATION).unwrap().is_sensitive());
    }

    #[test]
    fn credentials_with_spaces_are_refused() {
        assert!(Bearer::new("a b").is_err());
        assert!(Bearer::new("  ").is_err());
        assert_eq!(Bearer::new(" abc ").unwrap().as_str(), "abc");
    }
}
