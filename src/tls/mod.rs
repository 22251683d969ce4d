//! TLS on both sides of the proxy, with the flag names of the programs it stands in for:
//! `etcd grpc-proxy start`'s for the connection to etcd (`--cacert`, `--cert`, `--key`,
//! `--insecure-skip-tls-verify`, [`client`]) and etcd's own for the listen address
//! (`--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`, [`server`]).
//!
//! Certificates, keys and CA bundles are PEM files re-read when they change on disk
//! ([`files`]): a rotation by cert-manager or a Kubernetes Secret (files replaced, often by a
//! symlink swap) takes effect at the next handshake, and open connections are kept. What a
//! client certificate's CommonName means is decided in one place, [`identity`].
//!
//! rustls with the `ring` provider: no system OpenSSL, no `aws-lc` build.

pub mod client;
pub mod files;
pub mod identity;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// TLS flags (flattened into [`crate::config::Config`]).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// CA bundle verifying etcd's server certificate (https endpoints).
    #[arg(long, env = "ETCD_FANOUT_CACERT")]
    pub cacert: Option<PathBuf>,

    /// Client certificate presented to etcd (its CommonName must be empty, as grpc-proxy
    /// requires: etcd would take a CN as the user of every tokenless forwarded call).
    #[arg(long, env = "ETCD_FANOUT_CERT", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Private key of `--cert`.
    #[arg(long, env = "ETCD_FANOUT_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Accept any server certificate from etcd (still encrypted; for etcd's `--auto-tls`).
    #[arg(long, env = "ETCD_FANOUT_INSECURE_SKIP_TLS_VERIFY")]
    pub insecure_skip_tls_verify: bool,

    /// Server certificate of the listen address: serve TLS (gRPC over ALPN `h2`, the HTTP
    /// gateway over `http/1.1`) instead of plaintext. Re-read when the file changes.
    #[arg(long, env = "ETCD_FANOUT_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,

    /// Private key of `--cert-file`.
    #[arg(long, env = "ETCD_FANOUT_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,

    /// CA bundle verifying client certificates: clients must present one it signed (as
    /// etcd). Re-read when the file changes.
    #[arg(long, env = "ETCD_FANOUT_TRUSTED_CA_FILE", requires = "cert_file")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Require verified client certificates and treat a certificate's CommonName as an etcd
    /// identity, as etcd does (see the TLS section of the README). Needs `--trusted-ca-file`.
    #[arg(long, env = "ETCD_FANOUT_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,

    /// TLS 1.2 cipher suites offered to clients, comma-separated, by Go's names as etcd takes
    /// them (e.g. `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`); TLS 1.3 suites are not
    /// affected, as in etcd. Default: every suite rustls has (ECDHE with AES-GCM or
    /// ChaCha20-Poly1305).
    #[arg(
        long,
        env = "ETCD_FANOUT_CIPHER_SUITES",
        value_delimiter = ',',
        requires = "cert_file"
    )]
    pub cipher_suites: Vec<String>,
}

/// A TLS configuration that cannot be used; startup stops with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM block.
    #[error("{flag} {path}: {reason}")]
    File {
        /// The flag naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The flags contradict each other or the endpoints.
    #[error("{0}")]
    Config(String),
}

impl TlsError {
    fn file(flag: &'static str, path: &Path, reason: impl ToString) -> TlsError {
        TlsError::File {
            flag,
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// The crypto provider of every TLS configuration (rustls' `ring`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Go's names of TLS 1.2 cipher suites that etcd 3.4 accepts in `--cipher-suites`
/// (`pkg/tlsutil/cipher_suites.go`) and rustls does not implement (RSA key exchange, CBC, RC4,
/// 3DES): named in the startup error as unsupported rather than unknown.
const GO_ONLY_SUITES: [&str; 16] = [
    "TLS_RSA_WITH_RC4_128_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
];

/// The listen address's crypto provider for `--cipher-suites` (Go's names; the empty list
/// keeps every suite): TLS 1.3 suites kept, TLS 1.2 ones restricted to the list, in the
/// provider's order of preference. As etcd 3.4.23, the list must hold an ECDHE
/// `AES_128_GCM_SHA256` suite (HTTP/2's mandatory one; etcd exits otherwise). Go names ChaCha20 suites without the `_SHA256` rustls
/// (and the IANA registry) adds; both spellings are taken.
pub fn server_provider(names: &[String]) -> Result<Arc<CryptoProvider>, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    if names.is_empty() {
        return Ok(Arc::new(provider));
    }
    let iana = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
    for name in names.iter().map(|n| n.trim()) {
        let known = provider.cipher_suites.iter().any(|s| {
            s.tls13().is_none() && (iana(s) == name || iana(s) == format!("{name}_SHA256"))
        });
        if known {
            continue;
        }
        return Err(TlsError::Config(if GO_ONLY_SUITES.contains(&name) {
            format!(
                "--cipher-suites: {name} is not supported (TLS 1.2 suites available: ECDHE with \
                 AES-GCM or ChaCha20-Poly1305)"
            )
        } else {
            format!("--cipher-suites: unexpected TLS cipher suite {name:?}")
        }));
    }
    // etcd (Go's HTTP/2 server) refuses to start without one: RFC 7540's mandatory suite.
    let h2_required = [
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    ];
    if !names.iter().any(|n| h2_required.contains(&n.trim())) {
        return Err(TlsError::Config(format!(
            "--cipher-suites: HTTP/2 requires an AES_128_GCM_SHA256 suite (at least one of {}), \
             as etcd does",
            h2_required.join(" or ")
        )));
    }
    provider.cipher_suites.retain(|s| {
        s.tls13().is_some()
            || names
                .iter()
                .any(|n| iana(s) == n.trim() || iana(s) == format!("{}_SHA256", n.trim()))
    });
    Ok(Arc::new(provider))
}

/// Every certificate of a PEM file, in order (a chain: the leaf first).
pub fn load_certs(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    std::fs::metadata(path).map_err(|e| TlsError::file(flag, path, e))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::file(flag, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::file(flag, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::file(flag, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    std::fs::metadata(path).map_err(|e| TlsError::file(flag, path, e))?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::file(flag, path, e))
}

/// A certificate chain and its key, checked to belong together.
pub fn load_certified_key(
    cert_flag: &'static str,
    cert: &Path,
    key_flag: &'static str,
    key: &Path,
) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let chain = load_certs(cert_flag, cert)?;
    let der = load_key(key_flag, key)?;
    rustls::sign::CertifiedKey::from_der(chain, der, &provider()).map_err(|e| {
        TlsError::file(
            key_flag,
            key,
            format!("unusable with {cert_flag} {}: {e}", cert.display()),
        )
    })
}

/// A root store of every certificate in a CA bundle.
pub fn load_roots(flag: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(flag, path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::file(flag, path, format!("bad CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The CommonName of a DER certificate's subject; `None` when it has none (or it is empty, or
/// the certificate cannot be parsed: rustls has verified it already).
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .find(|s| !s.is_empty())?;
    Some(cn.to_string())
}
