//! TLS mode of the harness. With `ETCD_FANOUT_TEST_TLS=1` (or after [`force`]) every etcd the
//! tests start serves `https://` with `--client-cert-auth`, every proxy runs TLS on both sides
//! (upstream client certificate, `--cert-file`/`--trusted-ca-file`/`--client-cert-auth` on
//! its listen address), and the harness's clients (tonic channels, the blocking HTTP/1.1
//! clients) connect over TLS with a client certificate without CommonName. The same tests
//! then run over TLS unchanged.
//!
//! Certificates are generated here with `rcgen`, once per test process: a CA, server
//! certificates (IP SAN 127.0.0.1), client certificates with and without a CommonName, an
//! expired one, and one from another CA.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Set by [`force`]: TLS mode whatever the environment says.
static FORCED: AtomicBool = AtomicBool::new(false);

/// True when the harness runs in TLS mode.
pub fn enabled() -> bool {
    FORCED.load(Ordering::Relaxed)
        || matches!(
            std::env::var("ETCD_FANOUT_TEST_TLS").as_deref(),
            Ok("1") | Ok("true") | Ok("yes")
        )
}

/// Turns TLS mode on for the whole test process (for test files that are TLS-only).
pub fn force() {
    FORCED.store(true, Ordering::Relaxed);
}

/// `http` or `https`, by mode.
pub fn scheme() -> &'static str {
    if enabled() {
        "https"
    } else {
        "http"
    }
}

/// The client URL of a loopback port, by mode.
pub fn url(port: u16) -> String {
    format!("{}://127.0.0.1:{port}", scheme())
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// Every certificate the tests use.
#[derive(Debug)]
pub struct Certs {
    /// Directory holding the files.
    pub dir: PathBuf,
    /// The CA every server and good client certificate is signed by.
    pub ca: PathBuf,
    /// Another CA (signs [`Certs::wrong_ca`]).
    pub other_ca: PathBuf,
    /// Server certificate (SANs 127.0.0.1, ::1, localhost; no CN; server and client auth).
    pub server: Pair,
    /// A second server certificate from the same CA (rotation).
    pub server2: Pair,
    /// Client certificate without CommonName.
    pub client: Pair,
    /// Client certificate with CommonName `alice`.
    pub client_cn: Pair,
    /// Expired client certificate (no CN).
    pub expired: Pair,
    /// Client certificate signed by [`Certs::other_ca`].
    pub wrong_ca: Pair,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn leaf_params(cn: Option<&str>, server: bool) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "etcd-fanout tests");
    if let Some(cn) = cn {
        p.distinguished_name.push(DnType::CommonName, cn);
    }
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if server {
        p.extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        p.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().expect("ip")),
            SanType::IpAddress("::1".parse().expect("ip")),
            SanType::DnsName("localhost".try_into().expect("dns")),
        ];
    }
    p
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write PEM");
    path
}

fn issue(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    issuer: &CertifiedIssuer<'_, KeyPair>,
) -> Pair {
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    Pair {
        cert: write(dir, &format!("{name}.pem"), &cert.pem()),
        key: write(dir, &format!("{name}-key.pem"), &key.serialize_pem()),
    }
}

/// Generates a full set of certificates into `dir`.
pub fn generate(dir: &Path) -> Certs {
    std::fs::create_dir_all(dir).expect("cert dir");
    let ca = CertifiedIssuer::self_signed(
        ca_params("etcd-fanout test CA"),
        KeyPair::generate().expect("key"),
    )
    .expect("CA");
    let other = CertifiedIssuer::self_signed(
        ca_params("some other CA"),
        KeyPair::generate().expect("key"),
    )
    .expect("CA");
    let mut expired = leaf_params(None, false);
    expired.not_before = rcgen::date_time_ymd(2001, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2002, 1, 1);
    Certs {
        ca: write(dir, "ca.pem", &ca.pem()),
        other_ca: write(dir, "other-ca.pem", &other.pem()),
        server: issue(dir, "server", leaf_params(None, true), &ca),
        server2: issue(dir, "server2", leaf_params(None, true), &ca),
        client: issue(dir, "client", leaf_params(None, false), &ca),
        client_cn: issue(dir, "client-cn", leaf_params(Some("alice"), false), &ca),
        expired: issue(dir, "expired", expired, &ca),
        wrong_ca: issue(dir, "wrong-ca", leaf_params(None, false), &other),
        dir: dir.to_path_buf(),
    }
}

/// The process's certificates (generated on first use, in the system's temporary directory).
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("etcd-fanout-tls-certs-{}", std::process::id()));
        generate(&dir)
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// etcd's flags for an `https://` client URL with client certificates required.
pub fn etcd_flags() -> Vec<String> {
    let c = certs();
    vec![
        "--cert-file".into(),
        s(&c.server.cert),
        "--key-file".into(),
        s(&c.server.key),
        "--trusted-ca-file".into(),
        s(&c.ca),
        "--client-cert-auth".into(),
    ]
}

/// The proxy's upstream flags (CA, client certificate without CN).
pub fn proxy_upstream_flags() -> Vec<String> {
    let c = certs();
    vec![
        "--cacert".into(),
        s(&c.ca),
        "--cert".into(),
        s(&c.client.cert),
        "--key".into(),
        s(&c.client.key),
    ]
}

/// The proxy's listen-side flags (server certificate, client certificates required).
pub fn proxy_listen_flags() -> Vec<String> {
    let c = certs();
    vec![
        "--cert-file".into(),
        s(&c.server.cert),
        "--key-file".into(),
        s(&c.server.key),
        "--trusted-ca-file".into(),
        s(&c.ca),
        "--client-cert-auth".into(),
    ]
}

/// A rustls client configuration trusting the test CA, presenting `cert` if given. One per
/// (certificate, ALPN) for the process, so that its session cache resumes TLS sessions (a
/// test making thousands of short connections would otherwise pay a full handshake each).
pub fn client_config(cert: Option<&Pair>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    type Key = (Option<PathBuf>, Vec<Vec<u8>>);
    static CONFIGS: std::sync::Mutex<Vec<(Key, Arc<rustls::ClientConfig>)>> =
        std::sync::Mutex::new(Vec::new());
    let key: Key = (
        cert.map(|p| p.cert.clone()),
        alpn.iter().map(|a| a.to_vec()).collect(),
    );
    let mut configs = CONFIGS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = configs.iter().find(|(k, _)| *k == key) {
        return c.clone();
    }
    let config = new_client_config(cert, alpn);
    configs.push((key, config.clone()));
    config
}

fn new_client_config(cert: Option<&Pair>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&certs().ca).expect("ca") {
        roots.add(c.expect("ca pem")).expect("ca cert");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match cert {
        Some(p) => {
            let chain = CertificateDer::pem_file_iter(&p.cert)
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(&p.key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(config)
}

/// A blocking client connection: plain TCP, or TLS over it.
pub enum Stream {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// The TCP socket (timeouts, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => match s.read(buf) {
                // Go closes without close_notify; treat it as the end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Ports known to serve TLS outside TLS mode (a proxy given its own `--cert-file`).
static TLS_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Records that `port` serves TLS whatever the mode.
pub fn mark_tls_port(port: u16) {
    if let Ok(mut p) = TLS_PORTS.lock() {
        p.push(port);
    }
}

/// True when the harness talks TLS to `port`.
pub fn is_tls_port(port: u16) -> bool {
    enabled() || TLS_PORTS.lock().map(|p| p.contains(&port)).unwrap_or(false)
}

/// Connects to a loopback port: over TLS with the CN-less client certificate in TLS mode or
/// to a TLS port (ALPN `http/1.1`), plain TCP otherwise.
pub fn connect(port: u16) -> io::Result<Stream> {
    if is_tls_port(port) {
        handshake(port, client_config(Some(&certs().client), &[b"http/1.1"]))
    } else {
        TcpStream::connect(("127.0.0.1", port)).map(Stream::Plain)
    }
}

/// Connects over TLS presenting `cert`, and completes a full handshake (a fresh client
/// configuration: no session to resume, so the server shows its current certificate and
/// verifies the client's).
pub fn connect_tls(port: u16, cert: Option<&Pair>, alpn: &[&[u8]]) -> io::Result<Stream> {
    handshake(port, new_client_config(cert, alpn))
}

/// Connects over TLS with `config` and completes the handshake.
fn handshake(port: u16, config: Arc<rustls::ClientConfig>) -> io::Result<Stream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    // TLS 1.3: the server's verdict on the client certificate arrives after the handshake;
    // a refused client sees it on its first read.
    Ok(Stream::Tls(Box::new(s)))
}

/// tonic's TLS settings trusting the test CA and presenting `cert`.
pub fn tonic_tls(cert: &Pair) -> tonic::transport::ClientTlsConfig {
    let read = |p: &Path| std::fs::read(p).expect("read PEM");
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(&certs().ca)))
        .identity(tonic::transport::Identity::from_pem(
            read(&cert.cert),
            read(&cert.key),
        ))
}

/// etcdctl's TLS flags (CA and the CN-less client certificate) in TLS mode, none otherwise.
pub fn etcdctl_flags() -> Vec<String> {
    if !enabled() {
        return Vec::new();
    }
    let c = certs();
    vec![
        format!("--cacert={}", s(&c.ca)),
        format!("--cert={}", s(&c.client.cert)),
        format!("--key={}", s(&c.client.key)),
    ]
}

/// The `etcd-client` crate's options in TLS mode (CA and the CN-less client certificate).
pub fn etcd_client_options() -> Option<etcd_client::ConnectOptions> {
    enabled().then(|| etcd_client_tls(&certs().client))
}

/// The `etcd-client` crate's options trusting the test CA and presenting `cert`.
pub fn etcd_client_tls(cert: &Pair) -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new().with_tls(tonic_tls(cert))
}
