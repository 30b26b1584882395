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
    /// A provider's machine about to join: may register one new node, nothing else
    /// (`ionet token create --role node`, short-lived).
    Join,
    /// One node daemon: [`Claims::node_id`], holding the key [`Claims::key`].
    Node,
    /// A tenant account's API key (`ionet account create NAME`): starts jobs paid by
    /// [`Claims::account`], nothing else.
    Account,
    /// One job ([`Claims::job_id`]) of one account, issued when the job starts.
    Job,
    /// The head's own control plane calling node daemons (bundle reservations): nothing
    /// else, so a provider's daemon that keeps what the head presented gains no more.
    Control,
    /// One submitted job's entrypoint ([`Claims::submission_id`]) of one account: it may
    /// start jobs paid by the account while the submission runs (the head refuses it once
    /// the submission ended), and read the cluster, nothing else. The node running the
    /// entrypoint holds it, never the account's key.
    Submission,
    /// A metrics scraper (Prometheus): reads the head's `/metrics` with the operator's
    /// view of the cluster and its money, and nothing else (`ionet token create --role
    /// metrics`), so the scraper's configuration holds no right to act.
    Metrics,
    /// A scraper of node daemons (`ionet token create --role node-metrics`): reads each
    /// node's metrics through the head (`/api/nodes/{id}/metrics`) and, on the head, only
    /// the public face. It is sent to the head alone: a daemon refuses it.
    NodeMetrics,
    /// The head reading one node ([`Claims::node_id`]): what its store and workers hold
    /// (`ionet memory`), its metrics (a scrape through the head): minted for each read,
    /// for that node alone, living seconds, so a node that keeps it can read no other.
    Inspect,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Join => "join",
            Role::Node => "node",
            Role::Account => "account",
            Role::Job => "job",
            Role::Control => "control",
            Role::Submission => "submission",
            Role::Metrics => "metrics",
            Role::NodeMetrics => "node-metrics",
            Role::Inspect => "inspect",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = IonetError;

    fn from_str(text: &str) -> IonetResult<Self> {
        match text {
            "admin" => Ok(Role::Admin),
            "join" | "node" => Ok(Role::Join),
            "account" => Ok(Role::Account),
            "job" => Ok(Role::Job),
            "metrics" => Ok(Role::Metrics),
            "node-metrics" => Ok(Role::NodeMetrics),
            other => Err(IonetError::InvalidArgument(format!(
                "unknown role {other:?}: a token is for `node` (to join a machine), `account`, `metrics` (a scraper of the head), `node-metrics` (a scraper of node daemons) or `admin`"
            ))),
        }
    }
}

/// What a credential says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub role: Role,
    /// The node a node credential speaks for (hex), bound to `key` by the head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The node's public key (hex) the head saw it prove at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The account an account key or a job credential speaks for (the job's payer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The job a job credential speaks for (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The submitted job a submission credential speaks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission_id: Option<String>,
    /// Which submission of that id (ids are the tenant's to choose, and may be used
    /// again after a delete): the head issued it this nonce, and no other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Which version of its role's rules it was made under (0: before versions). A
    /// node-metrics token of version 0 was sent to every node daemon scraped (before
    /// daemons were scraped through the head): refused ([`Role::version`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    /// Seconds since the Unix epoch; the credential is refused from then on.
    pub expires_at: u64,
}

impl Claims {
    fn new(role: Role, ttl: Duration) -> Self {
        let issued_at = now_unix();
        Self {
            role,
            node_id: None,
            key: None,
            account: None,
            job_id: None,
            submission_id: None,
            nonce: None,
            version: role.version(),
            issued_at,
            expires_at: issued_at.saturating_add(ttl.as_secs()),
        }
    }
}

fn is_zero(version: &u32) -> bool {
    *version == 0
}

impl Role {
    /// The version of this role's rules credentials are made under now: a credential of
    /// an older one is refused. Node-metrics tokens are at 1 since node daemons are
    /// scraped through the head (a version-0 token went to every daemon).
    pub const fn version(self) -> u32 {
        match self {
            Role::NodeMetrics => 1,
            _ => 0,
        }
    }
}

/// The message a node signs to prove, at registration, that it holds the key it names.
pub fn registration_message(node_id: &[u8], public_key: &[u8]) -> Vec<u8> {
    [&b"ionet-register-node\0"[..], node_id, public_key].concat()
}

/// A node daemon's own key pair: generated on first start, kept on the provider's disk
/// (mode 0600); the head binds the node's id to its public key at first registration.
#[derive(Clone)]
pub struct KeyPair {
    key: SigningKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair(public {})", hex::encode(self.public_key()))
    }
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self { key: SigningKey::from_bytes(&secret) }
    }

    /// The key pair kept at `path` (32 bytes, mode 0600), created there on first use. A
    /// file of another size, or readable by others, is refused rather than trusted.
    pub fn load_or_create(path: &Path) -> IonetResult<Self> {
        let io =
            |err: std::io::Error| IonetError::Io(std::io::Error::new(err.kind(), format!("{}: {err}", path.display())));
        for _ in 0..2 {
            match crate::files::read_private(path) {
                Ok(bytes) => return Self::from_file(path, &bytes),
                Err(crate::files::NotPrivate::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                    let pair = Self::generate();
                    match crate::files::create_private(path, &pair.key.to_bytes()) {
                        Ok(()) => return Ok(pair),
                        // Another process created it first: read theirs.
                        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                        Err(err) => return Err(io(err)),
                    }
                }
                Err(crate::files::NotPrivate::Io(err)) => return Err(io(err)),
                Err(crate::files::NotPrivate::Exposed(why)) => {
                    return Err(IonetError::FailedPrecondition(format!(
                        "{}: a private key must be private: {why}",
                        path.display()
                    )))
                }
            }
        }
        Err(IonetError::Internal(format!("{}: created and gone again", path.display())))
    }

    fn from_file(path: &Path, bytes: &[u8]) -> IonetResult<Self> {
        let secret: [u8; 32] = bytes.try_into().map_err(|_| {
            IonetError::FailedPrecondition(format!(
                "{}: a private key is 32 bytes, this file has {}",
                path.display(),
                bytes.len()
            ))
        })?;
        Ok(Self { key: SigningKey::from_bytes(&secret) })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

/// Whether `signature` is `public_key`'s over `message`.
pub fn verify_signature(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let (Ok(key), Ok(signature)) = (<[u8; 32]>::try_from(public_key), <[u8; 64]>::try_from(signature)) else {
        return false;
    };
    VerifyingKey::from_bytes(&key)
        .map(|key| key.verify(message, &Signature::from_bytes(&signature)).is_ok())
        .unwrap_or(false)
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or(0)
}

/// The head's signing key.
#[derive(Clone, Debug)]
pub struct Issuer {
    pair: KeyPair,
}

impl Issuer {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self { pair: KeyPair::generate() }
    }

    /// The key kept at `path` (mode 0600), created there on first use.
    pub fn load_or_create(path: &Path) -> IonetResult<Self> {
        Ok(Self { pair: KeyPair::load_or_create(path)? })
    }

    /// The key that checks this issuer's credentials.
    pub fn verifier(&self) -> Verifier {
        Verifier { key: self.pair.key.verifying_key() }
    }

    /// A credential for `role`, valid for `ttl` from now.
    pub fn issue(&self, role: Role, ttl: Duration) -> String {
        self.sign(&Claims::new(role, ttl))
    }

    /// A node's credential: `node_id`, holding `public_key`, valid for `ttl`.
    pub fn issue_node(&self, node_id: &[u8], public_key: &[u8], ttl: Duration) -> String {
        let claims = Claims {
            node_id: Some(hex::encode(node_id)),
            key: Some(hex::encode(public_key)),
            ..Claims::new(Role::Node, ttl)
        };
        self.sign(&claims)
    }

    /// The head's ask of node `node_id` what it holds, valid for `ttl`.
    pub fn issue_inspect(&self, node_id: &[u8], ttl: Duration) -> String {
        self.sign(&Claims { node_id: Some(hex::encode(node_id)), ..Claims::new(Role::Inspect, ttl) })
    }

    /// An account's API key: starts jobs paid by `account`, valid for `ttl`.
    pub fn issue_account(&self, account: &str, ttl: Duration) -> String {
        self.sign(&Claims { account: Some(account.to_string()), ..Claims::new(Role::Account, ttl) })
    }

    /// A job's credential: `job_id`, paid by `account`, valid for `ttl`.
    pub fn issue_job(&self, job_id: &[u8], account: &str, ttl: Duration) -> String {
        let claims = Claims {
            job_id: Some(hex::encode(job_id)),
            account: Some(account.to_string()),
            ..Claims::new(Role::Job, ttl)
        };
        self.sign(&claims)
    }

    /// A submitted job's credential: its entrypoint starts jobs paid by `account` while
    /// submission `submission_id` (the one given `nonce`) runs, valid for `ttl`.
    pub fn issue_submission(&self, submission_id: &str, nonce: &str, account: &str, ttl: Duration) -> String {
        let claims = Claims {
            submission_id: Some(submission_id.to_string()),
            nonce: Some(nonce.to_string()),
            account: Some(account.to_string()),
            ..Claims::new(Role::Submission, ttl)
        };
        self.sign(&claims)
    }

    /// The text form of `claims`, signed.
    pub fn sign(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).expect("claims are plain data");
        let signature = self.pair.sign(&body);
        format!("{PREFIX}.{}.{}", hex::encode(&body), hex::encode(signature))
    }
}

/// Checks credentials against the head's public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    key: VerifyingKey,
}

impl Verifier {
    /// The head's public key, as it travels to nodes (32 bytes).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> IonetResult<Self> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| IonetError::InvalidArgument(format!("a public key is 32 bytes, got {}", bytes.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| IonetError::InvalidArgument("not an ed25519 public key".into()))?;
        Ok(Self { key })
    }

    /// [`Verifier::from_bytes`] of hex text (as a worker's environment carries it).
    pub fn from_hex(text: &str) -> IonetResult<Self> {
        let bytes = hex::decode(text)
            .map_err(|_| IonetError::InvalidArgument(format!("the head's key {text:?} is not hex")))?;
        Self::from_bytes(&bytes)
    }

    /// Whether `text` looks like a credential at all (before checking its signature).
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

    /// A node-metrics token of the days daemons were sent it is refused; one made now
    /// is taken.
    #[test]
    fn a_node_metrics_token_made_before_scraping_through_the_head_is_refused() {
        let head = Issuer::generate();
        let authorizer = crate::authz::Authorizer::new(Some(head.verifier()));
        let bearer = |token: String| format!("Bearer {token}").into_bytes();
        let old = head.sign(&Claims { version: 0, ..Claims::new(Role::NodeMetrics, Duration::from_secs(60)) });
        let refused = authorizer.authenticate(Some(&bearer(old))).unwrap_err();
        assert!(refused.contains("made before node daemons were scraped through the head"), "{refused}");
        let new = head.issue(Role::NodeMetrics, Duration::from_secs(60));
        assert_eq!(authorizer.authenticate(Some(&bearer(new))), Ok(crate::authz::Principal::NodeMetrics));
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

        let expired = head.sign(&Claims { issued_at: 1, expires_at: 2, ..Claims::new(Role::Admin, Duration::ZERO) });
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

    #[test]
    fn a_node_credential_names_its_node_and_key_and_a_proof_binds_them() {
        let head = Issuer::generate();
        let node = KeyPair::generate();
        let node_id = [7u8; 28];
        let credential = head.issue_node(&node_id, &node.public_key(), Duration::from_secs(60));
        let claims = head.verifier().verify(credential.as_bytes()).unwrap();
        assert_eq!((claims.role, claims.node_id.unwrap()), (Role::Node, hex::encode(node_id)));
        assert_eq!(claims.key.unwrap(), hex::encode(node.public_key()));

        let message = registration_message(&node_id, &node.public_key());
        let proof = node.sign(&message);
        assert!(verify_signature(&node.public_key(), &message, &proof));
        let impostor = KeyPair::generate();
        assert!(!verify_signature(&impostor.public_key(), &message, &proof), "another key's proof");
        assert!(!verify_signature(&node.public_key(), &registration_message(&[8u8; 28], &node.public_key()), &proof));
        assert!(!verify_signature(&[0u8; 3], &message, &proof));

        let shipped = Verifier::from_bytes(&head.verifier().to_bytes()).unwrap();
        assert_eq!(shipped, head.verifier());
        assert!(Verifier::from_bytes(&[1, 2]).is_err());
        assert_eq!("node".parse::<Role>().unwrap(), Role::Join);
        assert!("root".parse::<Role>().is_err());
    }
}
