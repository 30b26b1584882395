//! TLS between machines: the cluster's certificate authority, the certificates issued
//! under it, what a server presents and what a client trusts.
//!
//! The chain is three deep, all ed25519:
//! - the **cluster CA**, created by the head at its first start and kept beside its
//!   storage (key mode 0600); its SHA-256 (`sha256:<hex>`) is what a joining machine pins;
//! - one **node intermediate** per node daemon, issued by the head at each registration
//!   for a key the daemon made for itself, limited by X.509 name constraints to the
//!   node's own IP address (no other address, no DNS name) and to signing end
//!   certificates (path length 0);
//! - **leaf** certificates the node signs itself: its own server's, and one for each
//!   process on its machine that serves calls (drivers and workers), all for that IP.
//!
//! A client trusts the CA alone and checks the IP it dialled against the leaf, so a
//! provider can vouch for servers at its own IP and nowhere else. The head's own server
//! certificate is signed by the CA directly. What a leaf does not say is which job's
//! server it is: a process on a machine can pose as another server on that machine to a
//! peer whose traffic it intercepts (see ARCHITECTURE.md).
//!
//! Which servers speak TLS is written in their address: `https://host:port` is a TLS
//! server, `host:port` a plain one (allowed on loopback only: [`check_plain_bind`]).
//! A process trusts the cluster CAs it was given ([`trust`]): in production, its one
//! cluster's.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

use crate::{IonetError, IonetResult};

/// How long a node intermediate (and the leaves under it) lasts: a node registers again
/// at every head restart and gets a new one; a node running longer than this restarts.
const NODE_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the cluster CA lasts.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Clocks of strangers' machines disagree: a certificate is valid from an hour ago.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// A TLS handshake that has not finished by then is dropped (a peer holding a socket open
/// without speaking holds nothing else).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const CA_NAME: &str = "ionet cluster CA";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn failed(what: &str, err: impl fmt::Display) -> IonetError {
    IonetError::Internal(format!("{what}: {err}"))
}

/// The SHA-256 of a CA certificate, as a joining machine pins it: `sha256:<hex>`.
pub fn ca_hash(certificate_der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(certificate_der)))
}

/// The hash of the CA certificate in `pem`.
pub fn ca_hash_of_pem(pem: &str) -> IonetResult<String> {
    Ok(ca_hash(&certificate_of_pem(pem)?))
}

fn certificate_of_pem(pem: &str) -> IonetResult<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|err| IonetError::InvalidArgument(format!("not a PEM certificate: {err}")))
}

fn pem_of(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// An ed25519 public key given as its 32 bytes (what a node or a worker sends to be
/// certified).
struct RawEd25519<'a>(&'a [u8]);

impl rcgen::PublicKeyData for RawEd25519<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

fn ed25519_public(bytes: &[u8]) -> IonetResult<RawEd25519<'_>> {
    if bytes.len() != 32 {
        return Err(IonetError::InvalidArgument(format!(
            "a TLS public key is an ed25519 key of 32 bytes, not {} bytes",
            bytes.len()
        )));
    }
    Ok(RawEd25519(bytes))
}

/// A fresh ed25519 key for a server of this process.
pub fn generate_key() -> IonetResult<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|err| failed("making a TLS key", err))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "ionet");
    name.push(DnType::CommonName, common_name);
    name
}

/// A host as written in an address (`10.0.0.5`, `[::1]`, `gpu7.example.net`).
enum Host {
    Ip(IpAddr),
    Dns(String),
}

impl Host {
    fn parse(host: &str) -> IonetResult<Self> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        let valid = !bare.is_empty()
            && bare.len() <= 253
            && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            return Err(IonetError::InvalidArgument(format!("{host:?} is neither an IP address nor a host name")));
        }
        Ok(Host::Dns(bare.to_ascii_lowercase()))
    }

    fn san(&self) -> IonetResult<SanType> {
        Ok(match self {
            Host::Ip(ip) => SanType::IpAddress(*ip),
            Host::Dns(name) => {
                SanType::DnsName(name.clone().try_into().map_err(|err| failed("a host name for a certificate", err))?)
            }
        })
    }
}

/// The host part of an address (`https://10.0.0.5:7000` → `10.0.0.5`).
pub fn host_of(address: &str) -> &str {
    let bare = address.split_once("://").map(|(_, rest)| rest).unwrap_or(address);
    bare.rsplit_once(':').map(|(host, _)| host).unwrap_or(bare)
}

/// Whether `host` names this machine's loopback (where a server may stay plain).
pub fn is_loopback_host(host: &str) -> bool {
    match Host::parse(host) {
        Ok(Host::Ip(ip)) => ip.is_loopback(),
        Ok(Host::Dns(name)) => name == "localhost",
        Err(_) => false,
    }
}

/// A server bound to anything but loopback speaks TLS only: refuses a plain one there.
pub fn check_plain_bind(bound: SocketAddr, tls: bool) -> IonetResult<()> {
    if tls || bound.ip().is_loopback() {
        return Ok(());
    }
    Err(IonetError::Config(format!(
        "a server bound to {bound} (reachable from other machines) speaks only TLS: start the head with --tls, \
         or bind to 127.0.0.1"
    )))
}

fn leaf_params(hosts: &[String], lifetime: Duration) -> IonetResult<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name("ionet server");
    params.subject_alt_names = hosts.iter().map(|host| Host::parse(host)?.san()).collect::<IonetResult<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    Ok(params)
}

/// A signing key and its chain, as a rustls server presents them.
fn certified(key: &KeyPair, chain: Vec<CertificateDer<'static>>) -> IonetResult<Arc<CertifiedKey>> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider().key_provider.load_private_key(der).map_err(|err| failed("loading a TLS key", err))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The head's certificate authority.
pub struct ClusterCa {
    key: KeyPair,
    certificate: CertificateDer<'static>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("hash", &self.hash()).finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// A host name no certificate of a node may carry: permitting only names under it
/// permits no DNS name at all (a name constraint binds only names of its own type).
const NO_DNS_NAME: &str = "no-names.ionet.invalid";

/// A node intermediate's parameters: what the head puts in it and what the node signs as.
/// It may vouch for its node's IP address alone: no other address, no DNS name.
fn node_params(node: &str, ip: IpAddr) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("ionet node {node}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })),
            GeneralSubtree::DnsName(NO_DNS_NAME.into()),
        ],
        excluded_subtrees: Vec::new(),
    });
    params.use_authority_key_identifier_extension = true;
    params
}

/// The IP address a node of a TLS cluster is reached at (a DNS name is refused: a name
/// constraint on one would cover every name below it).
pub fn node_ip(host: &str) -> IonetResult<IpAddr> {
    match Host::parse(host)? {
        Host::Ip(ip) => Ok(ip.to_canonical()),
        Host::Dns(_) => Err(IonetError::InvalidArgument(format!(
            "a node of a TLS cluster is reached at an IP address, not the name {host:?} (pass --node-ip-address)"
        ))),
    }
}

/// Whether two hosts as written in addresses name the same machine (`[::1]` and `::1`,
/// `10.0.0.1` and `::ffff:10.0.0.1`, names in any case).
pub fn same_host(a: &str, b: &str) -> bool {
    match (Host::parse(a), Host::parse(b)) {
        (Ok(Host::Ip(a)), Ok(Host::Ip(b))) => a.to_canonical() == b.to_canonical(),
        (Ok(Host::Dns(a)), Ok(Host::Dns(b))) => a == b,
        _ => false,
    }
}

impl ClusterCa {
    /// A new CA in memory.
    pub fn generate() -> IonetResult<Self> {
        let key = generate_key()?;
        let mut params = ca_params();
        validity(&mut params, CA_LIFETIME);
        let certificate = params.self_signed(&key).map_err(|err| failed("making the cluster CA", err))?.der().clone();
        Ok(Self { key, certificate })
    }

    /// The CA kept at `key_path` (mode 0600) and `certificate_path`, created there on
    /// first start: restarting the head keeps the hash every machine pinned.
    pub fn load_or_create(key_path: &Path, certificate_path: &Path) -> IonetResult<Self> {
        match crate::files::read_private(key_path) {
            Ok(key_pem) => {
                let key_pem = String::from_utf8(key_pem)
                    .map_err(|_| IonetError::Config(format!("{} is not a PEM key", key_path.display())))?;
                let key = KeyPair::from_pem(&key_pem)
                    .map_err(|err| IonetError::Config(format!("{} is not a usable key: {err}", key_path.display())))?;
                let pem = std::fs::read_to_string(certificate_path).map_err(|err| {
                    IonetError::Config(format!(
                        "the cluster CA's key is at {} but its certificate {} cannot be read: {err}",
                        key_path.display(),
                        certificate_path.display()
                    ))
                })?;
                let certificate = certificate_of_pem(&pem)?;
                Ok(Self { key, certificate })
            }
            Err(crate::files::NotPrivate::Io(err)) if err.kind() == std::io::ErrorKind::NotFound => {
                let ca = Self::generate()?;
                crate::files::create_private(key_path, ca.key.serialize_pem().as_bytes())
                    .map_err(|err| IonetError::Config(format!("cannot write {}: {err}", key_path.display())))?;
                crate::files::replace_private(certificate_path, ca.pem().as_bytes())
                    .map_err(|err| IonetError::Config(format!("cannot write {}: {err}", certificate_path.display())))?;
                Ok(ca)
            }
            Err(err) => Err(IonetError::Config(format!("the cluster CA key {}: {err:?}", key_path.display()))),
        }
    }

    /// The CA certificate, PEM (public: what clients trust).
    pub fn pem(&self) -> String {
        pem_of(&self.certificate)
    }

    /// What a joining machine pins: `sha256:<hex>` of the CA certificate.
    pub fn hash(&self) -> String {
        ca_hash(&self.certificate)
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::new(ca_params(), &self.key)
    }

    /// The head's own server certificate for `hosts`, with a fresh key; the chain carries
    /// the CA too, so a machine joining with only its hash can find and check it.
    pub fn server_identity(&self, hosts: &[String]) -> IonetResult<Arc<CertifiedKey>> {
        let key = generate_key()?;
        let leaf = leaf_params(hosts, CA_LIFETIME)?
            .signed_by(&key, &self.issuer())
            .map_err(|err| failed("signing the head's certificate", err))?;
        certified(&key, vec![leaf.der().clone(), self.certificate.clone()])
    }

    /// A node's intermediate (DER): for its `public_key` (ed25519, 32 bytes), able to
    /// certify servers at `host` and nowhere else.
    pub fn certify_node(&self, node: &str, host: &str, public_key: &[u8]) -> IonetResult<Vec<u8>> {
        let mut params = node_params(node, node_ip(host)?);
        validity(&mut params, NODE_CERTIFICATE_LIFETIME);
        let certificate = params
            .signed_by(&ed25519_public(public_key)?, &self.issuer())
            .map_err(|err| failed("signing a node's certificate", err))?;
        Ok(certificate.der().to_vec())
    }
}

/// A node daemon's signing side: its intermediate's key (made at start, never written),
/// the intermediate the head issued for it, and the leaves it signs under it.
pub struct NodeAuthority {
    key: KeyPair,
    node: String,
    host: String,
    ip: IpAddr,
    intermediate: RwLock<Option<CertificateDer<'static>>>,
}

impl fmt::Debug for NodeAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeAuthority").field("node", &self.node).field("host", &self.host).finish_non_exhaustive()
    }
}

impl NodeAuthority {
    /// `node`: the node id (hex) the head names the intermediate after; `host`: the host
    /// the node advertises (the only one it may certify).
    pub fn new(node: &str, host: &str) -> IonetResult<Self> {
        Ok(Self {
            ip: node_ip(host)?,
            key: generate_key()?,
            node: node.to_string(),
            host: host.to_string(),
            intermediate: RwLock::new(None),
        })
    }

    /// Whether a caller at `peer` is on this node's machine (a loopback address, or the
    /// node's own): only its own processes are given certificates.
    pub fn is_local(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        peer.is_loopback() || peer == self.ip
    }

    /// The public key the head certifies (ed25519, 32 bytes).
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// Takes the intermediate the head issued (DER); returns this node's own server
    /// identity under it.
    pub fn install(&self, intermediate: Vec<u8>) -> IonetResult<Arc<CertifiedKey>> {
        if intermediate.is_empty() {
            return Err(IonetError::Unavailable("the head issued this node no certificate".into()));
        }
        *self.intermediate.write().unwrap_or_else(|p| p.into_inner()) = Some(CertificateDer::from(intermediate));
        let key = generate_key()?;
        let chain = self.issue(key.public_key_raw())?;
        certified(&key, chain.into_iter().map(CertificateDer::from).collect())
    }

    /// A leaf for `public_key` (ed25519, 32 bytes) at this node's host, and the
    /// intermediate above it: the chain a server of this node presents.
    pub fn issue(&self, public_key: &[u8]) -> IonetResult<Vec<Vec<u8>>> {
        let intermediate = self.intermediate.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            IonetError::Unavailable("this node has no certificate yet (it has not registered with the head)".into())
        })?;
        let issuer = Issuer::new(node_params(&self.node, self.ip), &self.key);
        let leaf = leaf_params(std::slice::from_ref(&self.host), NODE_CERTIFICATE_LIFETIME)?
            .signed_by(&ed25519_public(public_key)?, &issuer)
            .map_err(|err| failed("signing a certificate", err))?;
        Ok(vec![leaf.der().to_vec(), intermediate.to_vec()])
    }
}

/// A server identity made of `key` and the `chain` (DER, leaf first) issued for it.
pub fn identity(key: &KeyPair, chain: Vec<Vec<u8>>) -> IonetResult<Arc<CertifiedKey>> {
    if chain.is_empty() {
        return Err(IonetError::Unavailable("no certificate was issued for this server".into()));
    }
    certified(key, chain.into_iter().map(CertificateDer::from).collect())
}

/// What a TLS server presents: set once known (a node's, after it registers); until
/// then handshakes fail.
#[derive(Debug, Default)]
pub struct ServerCert(RwLock<Option<Arc<CertifiedKey>>>);

impl ServerCert {
    pub fn new(identity: Option<Arc<CertifiedKey>>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(identity)))
    }

    pub fn set(&self, identity: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(identity);
    }

    /// The rustls configuration of a server presenting this (HTTP/2 only).
    pub fn server_config(self: &Arc<Self>) -> IonetResult<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| failed("configuring TLS", err))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The rustls configuration of an HTTP/1.1 server presenting this (the job server).
    pub fn http_server_config(self: &Arc<Self>) -> IonetResult<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| failed("configuring TLS", err))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The cluster CAs this process trusts (PEM).
static TRUSTED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// How many cluster CAs this process trusts (a client made from them is stale once it
/// trusts more).
pub fn trusted_count() -> usize {
    TRUSTED.read().unwrap_or_else(|p| p.into_inner()).len()
}

/// The cluster CAs this process trusts (PEM), for a client of its own (HTTP).
pub fn trusted_pems() -> Vec<String> {
    TRUSTED.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Trusts the cluster CA in `pem` for every TLS connection this process makes.
pub fn trust(pem: &str) -> IonetResult<()> {
    let pem = pem_of(&certificate_of_pem(pem)?);
    let mut trusted = TRUSTED.write().unwrap_or_else(|p| p.into_inner());
    if !trusted.contains(&pem) {
        trusted.push(pem);
    }
    Ok(())
}

/// The TLS settings of a client connection: the trusted cluster CAs and nothing else (no
/// public web roots).
pub fn client_config(address: &str) -> IonetResult<tonic::transport::ClientTlsConfig> {
    let trusted = TRUSTED.read().unwrap_or_else(|p| p.into_inner());
    if trusted.is_empty() {
        return Err(IonetError::Config(format!(
            "{address} speaks TLS but this process trusts no cluster CA: pass the CA (IONET_CA_FILE, or \
             `ionet start --ca-hash` on a joining machine)"
        )));
    }
    Ok(tonic::transport::ClientTlsConfig::new()
        .ca_certificates(trusted.iter().map(tonic::transport::Certificate::from_pem))
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The rustls settings of an HTTP/1.1 client (the job server's WebSocket tail) trusting
/// the cluster CA in `pem` and nothing else.
pub fn http_client_config(pem: &str) -> IonetResult<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate_of_pem(pem)?).map_err(|err| failed("trusting the cluster CA", err))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| failed("configuring TLS", err))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Fetches the cluster CA from the head at `address` (`https://host:port`), trusting it
/// only if its hash is `expected` and the head's certificate verifies under it: what a
/// machine joining with `--ca-hash` does first. Returns the CA (PEM).
pub async fn fetch_ca(address: &str, expected: &str, timeout: Duration) -> IonetResult<String> {
    let host = host_of(address);
    let target = address.split_once("://").map(|(_, rest)| rest).unwrap_or(address).to_string();
    let server_name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
        .map_err(|err| IonetError::InvalidArgument(format!("{address}: {err}")))?;
    let pinned = Arc::new(PinnedCa { expected: expected.to_string(), found: Mutex::new(None), provider: provider() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| failed("configuring TLS", err))?
        .dangerous()
        .with_custom_certificate_verifier(pinned.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let stream = tokio::net::TcpStream::connect(&target)
            .await
            .map_err(|err| IonetError::Unavailable(format!("cannot reach {address}: {err}")))?;
        connector.connect(server_name, stream).await.map_err(|err| {
            IonetError::PermissionDenied(format!(
                "the head at {address} is not the cluster pinned by {expected}: {err}"
            ))
        })
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| IonetError::Timeout(format!("no TLS handshake with {address} within {timeout:?}")))??;
    let found = pinned.found.lock().unwrap_or_else(|p| p.into_inner()).take();
    found.map(|der| pem_of(&der)).ok_or_else(|| IonetError::Internal("the handshake checked no CA".into()))
}

/// A verifier that trusts the CA the server presents in its chain if that CA has the
/// pinned hash, then checks the server's certificate under it as usual.
#[derive(Debug)]
struct PinnedCa {
    expected: String,
    found: Mutex<Option<CertificateDer<'static>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|certificate| ca_hash(certificate) == self.expected).ok_or_else(|| {
            rustls::Error::General(format!("it presented no CA certificate with hash {}", self.expected))
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|err| rustls::Error::General(err.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) = Some(ca.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(ca: &ClusterCa, chain: &[Vec<u8>], host: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.certificate.clone()).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
        let intermediates: Vec<_> = chain[1..].iter().map(|der| CertificateDer::from(der.clone())).collect();
        let name = ServerName::try_from(host.to_string()).unwrap();
        verifier
            .verify_server_cert(&CertificateDer::from(chain[0].clone()), &intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_node_certifies_its_own_host_and_no_other() {
        let ca = ClusterCa::generate().unwrap();
        let node = NodeAuthority::new("abcd", "10.0.0.5").unwrap();
        let intermediate = ca.certify_node("abcd", "10.0.0.5", &node.public_key()).unwrap();
        node.install(intermediate).unwrap();
        let worker = generate_key().unwrap();
        let chain = node.issue(worker.public_key_raw()).unwrap();
        verify(&ca, &chain, "10.0.0.5").unwrap();
        // The same chain does not pass for another host.
        assert!(verify(&ca, &chain, "10.0.0.6").is_err());

        // A node whose intermediate names 10.0.0.5 but which signs a leaf for another
        // host (a provider forging the head's address) is refused by the name constraint.
        let rogue = NodeAuthority { host: "10.0.0.1".into(), ..NodeAuthority::new("abcd", "10.0.0.5").unwrap() };
        let rogue_name =
            NodeAuthority { host: "head.example.net".into(), ..NodeAuthority::new("abcd", "10.0.0.5").unwrap() };
        let intermediate = ca.certify_node("abcd", "10.0.0.5", &rogue_name.public_key()).unwrap();
        *rogue_name.intermediate.write().unwrap() = Some(CertificateDer::from(intermediate));
        let named = rogue_name.issue(worker.public_key_raw()).unwrap();
        let refused = verify(&ca, &named, "head.example.net").unwrap_err();
        assert!(format!("{refused:?}").contains("NameConstraint"), "a DNS name too: {refused:?}");
        let intermediate = ca.certify_node("abcd", "10.0.0.5", &rogue.public_key()).unwrap();
        *rogue.intermediate.write().unwrap() = Some(CertificateDer::from(intermediate));
        let forged = rogue.issue(worker.public_key_raw()).unwrap();
        let refused = verify(&ca, &forged, "10.0.0.1").unwrap_err();
        assert!(format!("{refused:?}").contains("NameConstraint"), "{refused:?}");

        // Another cluster's CA vouches for nothing here.
        let other = ClusterCa::generate().unwrap();
        assert!(verify(&other, &chain, "10.0.0.5").is_err());
    }

    #[test]
    fn the_ca_survives_a_restart_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("ca_key"), dir.path().join("ca.pem"));
        let first = ClusterCa::load_or_create(&key, &cert).unwrap();
        let again = ClusterCa::load_or_create(&key, &cert).unwrap();
        assert_eq!(first.hash(), again.hash());
        assert_eq!(ca_hash_of_pem(&again.pem()).unwrap(), first.hash());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        // A reloaded CA still issues certificates that verify under the first one.
        let node = NodeAuthority::new("ef01", "127.0.0.1").unwrap();
        node.install(again.certify_node("ef01", "127.0.0.1", &node.public_key()).unwrap()).unwrap();
        let chain = node.issue(generate_key().unwrap().public_key_raw()).unwrap();
        verify(&first, &chain, "127.0.0.1").unwrap();
    }

    #[test]
    fn bad_keys_and_hosts_are_refused() {
        let ca = ClusterCa::generate().unwrap();
        assert!(matches!(ca.certify_node("n", "10.0.0.5", &[1, 2, 3]), Err(IonetError::InvalidArgument(_))));
        assert!(matches!(ca.certify_node("n", "no spaces", &[0; 32]), Err(IonetError::InvalidArgument(_))));
        // A node is certified for an IP address, never a name (whose constraint would
        // cover every name below it).
        assert!(matches!(ca.certify_node("n", "example.net", &[0; 32]), Err(IonetError::InvalidArgument(_))));
        assert!(
            same_host("[::1]", "::1") && same_host("10.0.0.1", "::ffff:10.0.0.1") && !same_host("10.0.0.1", "10.0.0.2")
        );
        let node = NodeAuthority::new("n", "10.0.0.5").unwrap();
        assert!(node.is_local("127.0.0.1".parse().unwrap()) && node.is_local("10.0.0.5".parse().unwrap()));
        assert!(!node.is_local("10.0.0.6".parse().unwrap()), "another machine gets no certificate");
        assert!(check_plain_bind("0.0.0.0:1".parse().unwrap(), false).is_err());
        assert!(check_plain_bind("127.0.0.1:1".parse().unwrap(), false).is_ok());
        assert!(check_plain_bind("0.0.0.0:1".parse().unwrap(), true).is_ok());
        assert_eq!(host_of("https://10.0.0.5:7000"), "10.0.0.5");
        assert_eq!(host_of("10.0.0.5:7000"), "10.0.0.5");
        assert_eq!(host_of("[::1]:7000"), "[::1]");
    }
}
