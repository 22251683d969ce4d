//! `--tls`: every target over TLS with client certificates, as etcd runs in production.
//!
//! [`setup`] generates, with `rcgen`, a CA, one server certificate (IP SAN 127.0.0.1, server
//! and client auth, no CommonName: etcd's gateway also presents it to etcd's own gRPC
//! server) and one client certificate without CommonName (grpc-proxy refuses a CN
//! certificate toward etcd, and etcd with auth off ignores the CN anyway) into the run's
//! directory. Then etcd serves `https://` with `--client-cert-auth`, `etcd grpc-proxy start`
//! and etcd-fanout speak TLS to etcd (`--cacert`, `--cert`, `--key`) and to their clients
//! (their `--cert-file`, `--key-file`, `--trusted-ca-file`), and every loadgen client (the
//! gRPC watchers and the writer through tonic's rustls, the HTTP/1.1 watchers, ranges and
//! probes through [`connect`]) presents the client certificate.
//!
//! The mode is process-wide (set once, before any target runs), like `auth.rs`'s tokens.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::http1::BoxError;

/// The generated files and the client side's configurations.
pub struct Tls {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate and key (etcd, grpc-proxy and etcd-fanout listen with it).
    pub server: (PathBuf, PathBuf),
    /// Client certificate and key without CommonName (loadgen's clients, and both proxies
    /// toward etcd).
    pub client: (PathBuf, PathBuf),
    /// rustls client configuration of the HTTP/1.1 clients (ALPN `http/1.1`).
    http: Arc<rustls::ClientConfig>,
    /// tonic's TLS configuration of the gRPC clients.
    grpc: ClientTlsConfig,
}

/// Set by [`setup`]: the run is over TLS.
static TLS: OnceLock<Tls> = OnceLock::new();

/// The TLS setup of the run, if `--tls`.
pub fn get() -> Option<&'static Tls> {
    TLS.get()
}

/// `https` with `--tls`, else `http`.
pub fn url(addr: SocketAddr) -> String {
    match get() {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, "etcd-fanout loadgen CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A leaf without CommonName: client auth, and server auth with the loopback SANs if
/// `server`.
fn leaf_params(server: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "etcd-fanout loadgen");
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if server {
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        p.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
    }
    p
}

fn issue(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    ca: &CertifiedIssuer<'_, KeyPair>,
) -> Result<(PathBuf, PathBuf), BoxError> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

/// Generates the certificates into `dir` and turns TLS on for the rest of the process.
pub fn setup(dir: &Path) -> Result<(), BoxError> {
    std::fs::create_dir_all(dir)?;
    let ca = CertifiedIssuer::self_signed(ca_params(), KeyPair::generate()?)?;
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem())?;
    let server = issue(dir, "server", leaf_params(true), &ca)?;
    let client = issue(dir, "client", leaf_params(false), &ca)?;

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca_path)? {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(&client.0)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&client.1)?;
    let mut http = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    http.alpn_protocols = vec![b"http/1.1".to_vec()];

    let grpc = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca_path)?))
        .identity(Identity::from_pem(
            std::fs::read(&client.0)?,
            std::fs::read(&client.1)?,
        ));
    TLS.set(Tls {
        ca: ca_path,
        server,
        client,
        http: Arc::new(http),
        grpc,
    })
    .map_err(|_| "TLS set up twice")?;
    Ok(())
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

impl Tls {
    /// tonic's client TLS configuration (CA, client certificate).
    pub fn grpc(&self) -> ClientTlsConfig {
        self.grpc.clone()
    }

    /// etcd's flags for an `https://` client URL requiring client certificates.
    pub fn etcd_flags(&self) -> Vec<String> {
        vec![
            format!("--cert-file={}", s(&self.server.0)),
            format!("--key-file={}", s(&self.server.1)),
            format!("--trusted-ca-file={}", s(&self.ca)),
            "--client-cert-auth".into(),
        ]
    }

    /// `etcd grpc-proxy start`'s flags: toward etcd, then toward its clients.
    pub fn grpc_proxy_flags(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", s(&self.ca)),
            format!("--cert={}", s(&self.client.0)),
            format!("--key={}", s(&self.client.1)),
            format!("--cert-file={}", s(&self.server.0)),
            format!("--key-file={}", s(&self.server.1)),
            format!("--trusted-ca-file={}", s(&self.ca)),
        ]
    }

    /// etcd-fanout's flags: toward etcd, then toward its clients (etcd's own names).
    pub fn fanout_flags(&self) -> Vec<String> {
        vec![
            "--cacert".into(),
            s(&self.ca),
            "--cert".into(),
            s(&self.client.0),
            "--key".into(),
            s(&self.client.1),
            "--cert-file".into(),
            s(&self.server.0),
            "--key-file".into(),
            s(&self.server.1),
            "--trusted-ca-file".into(),
            s(&self.ca),
            "--client-cert-auth".into(),
        ]
    }
}

/// A client connection of the HTTP/1.1 clients: TCP, or TLS over TCP with `--tls`.
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS, presenting the client certificate.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to `addr` (TCP_NODELAY), completing a TLS handshake with `--tls`.
pub async fn connect(addr: SocketAddr) -> Result<Conn, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let Some(t) = get() else {
        return Ok(Conn::Plain(tcp));
    };
    let name = ServerName::IpAddress(addr.ip().into());
    let s = tokio_rustls::TlsConnector::from(t.http.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    Ok(Conn::Tls(Box::new(s)))
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
