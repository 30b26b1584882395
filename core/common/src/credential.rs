//! Signed, expiring credentials: what a principal other than a cluster member presents.
//!
//! The head holds an ed25519 signing key ([`Issuer`]); a credential is its signature over
//! a set of [`Claims`] (a role, the ids the role is bound to, an expiry). Any server that
//! knows the head's public key ([`Verifier`]) checks one without asking the head, so a
//! node daemon can later check a job's credential on its own. Why signatures rather than
//! client certificates: a credential must name a job and an account, which change far more
//! often than machines, and it travels in a header that tonic hands to the authorization
//! layer as is; TLS (the cluster CA) authenticates the machines underneath.
//!
//! Text form (printable ASCII, fits a gRPC header): `ionet1.<hex claims>.<hex signature>`,
//! the claims as JSON. Verification checks the signature before reading the claims, then
//! the expiry; a credential of another head, a changed byte or an expired one is refused
//! with a reason that names which.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::{IonetError, IonetResult};

const PREFIX: &str = "ionet1";
/// Claims longer than this are refused before decoding (a credential is a header).
const MAX_CREDENTIAL_BYTES: usize = 4096;

/// Who a credential speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The operator: accounts, join tokens, credits, settlement, draining any node.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
        })
    }
}

/// What a credential says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub role: Role,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    /// Seconds since the Unix epoch; the credential is refused from then on.
    pub expires_at: u64,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

/// The head's signing key.
#[derive(Clone)]
pub struct Issuer {
    key: SigningKey,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Issuer(public {})", hex::encode(self.key.verifying_key().as_bytes()))
    }
}

impl Issuer {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self { key: SigningKey::from_bytes(&secret) }
    }

    /// The key kept at `path` (32 bytes, mode 0600), created there on first use. A file
    /// of another size, or readable by others, is refused rather than trusted.
    pub fn load_or_create(path: &Path) -> IonetResult<Self> {
        let io =
            |err: std::io::Error| IonetError::Io(std::io::Error::new(err.kind(), format!("{}: {err}", path.display())));
        match std::fs::read(path) {
            Ok(bytes) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(IonetError::FailedPrecondition(format!(
                        "{}: the head's signing key is readable by others (mode {:o}); chmod 600 it",
                        path.display(),
                        mode & 0o777
                    )));
                }
                let secret: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    IonetError::FailedPrecondition(format!(
                        "{}: a signing key is 32 bytes, this file has {}",
                        path.display(),
                        bytes.len()
                    ))
                })?;
                Ok(Self { key: SigningKey::from_bytes(&secret) })
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let issuer = Self::generate();
                crate::files::write_new_private(path, &issuer.key.to_bytes()).map_err(io)?;
                Ok(issuer)
            }
            Err(err) => Err(io(err)),
        }
    }

    /// The key that checks this issuer's credentials.
    pub fn verifier(&self) -> Verifier {
        Verifier { key: self.key.verifying_key() }
    }

    /// A credential for `role`, valid for `ttl` from now.
    pub fn issue(&self, role: Role, ttl: Duration) -> String {
        let issued_at = now_unix();
        self.sign(&Claims { role, issued_at, expires_at: issued_at.saturating_add(ttl.as_secs()) })
    }

    /// The text form of `claims`, signed.
    pub fn sign(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).expect("claims are plain data");
        let signature = self.key.sign(&body);
        format!("{PREFIX}.{}.{}", hex::encode(&body), hex::encode(signature.to_bytes()))
    }
}

/// Checks credentials against the head's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    key: VerifyingKey,
}

impl Verifier {
    /// Whether `text` looks like a credential at all (as opposed to a cluster token).
    pub fn is_credential(text: &[u8]) -> bool {
        text.starts_with(PREFIX.as_bytes()) && text.get(PREFIX.len()) == Some(&b'.')
    }

    /// The claims of `text` if the head signed it and it has not expired.
    pub fn verify(&self, text: &[u8]) -> Result<Claims, &'static str> {
        if text.len() > MAX_CREDENTIAL_BYTES {
            return Err("credential too long");
        }
        let text = std::str::from_utf8(text).map_err(|_| "credential is not text")?;
        let mut parts = text.split('.');
        let (Some(PREFIX), Some(body), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed credential (expected ionet1.<claims>.<signature>)");
        };
        let body = hex::decode(body).map_err(|_| "malformed credential claims")?;
        let signature: [u8; 64] = hex::decode(signature)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or("malformed credential signature")?;
        self.key
            .verify(&body, &Signature::from_bytes(&signature))
            .map_err(|_| "credential not signed by this cluster's head")?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|_| "credential claims unreadable")?;
        if now_unix() >= claims.expires_at {
            return Err("credential expired");
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_verifies_with_its_heads_key_only() {
        let head = Issuer::generate();
        let credential = head.issue(Role::Admin, Duration::from_secs(60));
        assert!(Verifier::is_credential(credential.as_bytes()));
        assert!(credential.bytes().all(|byte| byte.is_ascii_graphic()), "fits a header");
        assert_eq!(head.verifier().verify(credential.as_bytes()).unwrap().role, Role::Admin);

        let other = Issuer::generate();
        assert_eq!(other.verifier().verify(credential.as_bytes()), Err("credential not signed by this cluster's head"));
    }

    #[test]
    fn a_changed_or_expired_credential_is_refused() {
        let head = Issuer::generate();
        let verifier = head.verifier();
        let credential = head.issue(Role::Admin, Duration::from_secs(60));
        // Flip one hex digit of the claims.
        let mut tampered = credential.clone().into_bytes();
        let at = PREFIX.len() + 3;
        tampered[at] = if tampered[at] == b'0' { b'1' } else { b'0' };
        assert!(verifier.verify(&tampered).is_err());

        let expired = head.sign(&Claims { role: Role::Admin, issued_at: 1, expires_at: 2 });
        assert_eq!(verifier.verify(expired.as_bytes()), Err("credential expired"));

        for junk in [&b"ionet1."[..], b"ionet1.zz.zz", b"ionet1.00.00.00", b"\xff\xfe", &[b'a'; 5000]] {
            assert!(verifier.verify(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn the_key_file_is_created_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing-key");
        let first = Issuer::load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = Issuer::load_or_create(&path).unwrap();
        assert_eq!(first.verifier(), again.verifier(), "the same key after a restart");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let refused = Issuer::load_or_create(&path).unwrap_err();
        assert!(refused.to_string().contains("readable by others"), "{refused}");
    }
}
