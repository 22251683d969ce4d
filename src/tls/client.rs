//! TLS to etcd: the gRPC channel's connections (ALPN `h2`) and the gateway's HTTP/1.1 calls
//! (`/version`, `/health`, lock and election routes; ALPN `http/1.1`) to `https://` endpoints.
//!
//! Flags as `etcd grpc-proxy start` names them: `--cacert` verifies etcd's certificate against
//! the name of the endpoint's host (SNI is that host; IP addresses are checked against the
//! certificate's IP SANs), `--cert`/`--key` are presented when etcd asks for a client
//! certificate, `--insecure-skip-tls-verify` accepts any server certificate. The client
//! certificate must have an empty CommonName (grpc-proxy's `EmptyCN` rule): with
//! `--client-cert-auth` etcd would take a CN as the user of every tokenless call the proxy
//! makes or forwards. The CA bundle and the client certificate are re-read when their files
//! change (at the next connection to etcd), and a replacement certificate with a CN is refused
//! like the original.
//!
//! Startup fails with a clear error on mixed `http://` and `https://` endpoints, TLS flags
//! without `https://` endpoints, an `https://` endpoint with neither `--cacert` nor
//! `--insecure-skip-tls-verify`, and a missing or unusable file.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::files::Reloading;
use super::{TlsArgs, TlsError};

/// Longest time for the TCP connection plus the TLS handshake to etcd.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// TLS client configurations for etcd (one per ALPN protocol).
#[derive(Debug)]
pub struct UpstreamTls {
    /// For the gRPC channel: ALPN `h2` (etcd serves gRPC over TLS only on HTTP/2).
    grpc: Arc<ClientConfig>,
    /// For the gateway's HTTP/1.1 calls: ALPN `http/1.1`.
    http1: Arc<ClientConfig>,
}

/// Which protocol a connection to etcd will speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC (HTTP/2).
    H2,
    /// HTTP/1.1.
    Http1,
}

/// Whether an endpoint URL is `https://` (`None`: plaintext, with or without `http://`).
fn is_https(endpoint: &str) -> bool {
    endpoint
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("https"))
}

impl UpstreamTls {
    /// The TLS configuration the endpoints and flags ask for: `None` for plaintext endpoints.
    pub fn from_args(
        args: &TlsArgs,
        endpoints: &[String],
    ) -> Result<Option<Arc<UpstreamTls>>, TlsError> {
        let https = endpoints.iter().filter(|e| is_https(e)).count();
        let flags = args.cacert.is_some() || args.cert.is_some() || args.insecure_skip_tls_verify;
        if https == 0 {
            if flags {
                return Err(TlsError::Config(
                    "--cacert, --cert, --key and --insecure-skip-tls-verify apply to https:// \
                     endpoints, and every --endpoints URL is plaintext"
                        .into(),
                ));
            }
            return Ok(None);
        }
        if https != endpoints.len() {
            return Err(TlsError::Config(format!(
                "--endpoints mixes http:// and https:// URLs ({}): use one scheme for the cluster",
                endpoints.join(",")
            )));
        }
        let provider = super::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = if args.insecure_skip_tls_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SkipVerify(provider.clone())))
        } else {
            let Some(ca) = &args.cacert else {
                return Err(TlsError::Config(
                    "https:// endpoints need --cacert (the CA bundle that signed etcd's \
                     certificate) or --insecure-skip-tls-verify"
                        .into(),
                ));
            };
            let ca = ca.clone();
            let roots = Reloading::new("upstream CA bundle", vec![ca.clone()], move || {
                server_verifier(&ca)
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EtcdCa(roots)))
        };
        let mut config = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (cert.clone(), key.clone());
                let paths = vec![cert.clone(), key.clone()];
                let reloading = Reloading::new("upstream client certificate", paths, move || {
                    load_empty_cn(&cert, &key)
                })?;
                builder.with_client_cert_resolver(Arc::new(ClientCert(reloading)))
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError::Config("--cert and --key go together".into())),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let grpc = Arc::new(config.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http1 = Arc::new(config);
        Ok(Some(Arc::new(UpstreamTls { grpc, http1 })))
    }

    /// Connects to `authority` (`host:port`) and completes a TLS handshake with the host as
    /// server name, within [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, authority: &str, alpn: Alpn) -> io::Result<TlsStream<TcpStream>> {
        let name = server_name(authority)?;
        let connector = TlsConnector::from(match alpn {
            Alpn::H2 => self.grpc.clone(),
            Alpn::Http1 => self.http1.clone(),
        });
        let attempt = async {
            let tcp = TcpStream::connect(authority).await?;
            let _ = tcp.set_nodelay(true);
            connector.connect(name, tcp).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, attempt)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))?
    }

    /// A connector for tonic's channel to one endpoint.
    pub fn grpc_connector(self: &Arc<Self>) -> GrpcConnector {
        GrpcConnector { tls: self.clone() }
    }
}

/// The server name of `host:port` (`[v6]:port` too), as rustls wants it.
fn server_name(authority: &str) -> io::Result<ServerName<'static>> {
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))
}

/// A verifier of etcd's certificate against the CA bundle at `ca` and the endpoint's name.
fn server_verifier(ca: &std::path::Path) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let roots = super::load_roots("--cacert", ca)?;
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::provider())
        .build()
        .map_err(|e| TlsError::File {
            flag: "--cacert",
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })
}

/// etcd's certificate verified by the current `--cacert` bundle, re-read when it changes.
#[derive(Debug)]
struct EtcdCa(Reloading<Arc<WebPkiServerVerifier>>);

impl ServerCertVerifier for EtcdCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

/// Loads the upstream client certificate, refusing one with a CommonName.
fn load_empty_cn(cert: &std::path::Path, key: &std::path::Path) -> Result<CertifiedKey, TlsError> {
    let ck = super::load_certified_key("--cert", cert, "--key", key)?;
    if let Some(cn) = ck.cert.first().and_then(super::common_name) {
        return Err(TlsError::File {
            flag: "--cert",
            path: cert.to_path_buf(),
            reason: format!(
                "the client certificate has CommonName {cn:?}: with --client-cert-auth etcd \
                 would run every tokenless request the proxy sends as user {cn:?}; use a \
                 certificate with an empty CommonName (as etcd grpc-proxy requires)"
            ),
        });
    }
    Ok(ck)
}

/// The upstream client certificate, re-read when its files change.
#[derive(Debug)]
struct ClientCert(Reloading<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `--insecure-skip-tls-verify`: any server certificate is accepted; the handshake's
/// signatures are still checked (the connection is encrypted to the holder of that key).
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tonic connector for one `https://` endpoint: TCP, then TLS with ALPN `h2`.
#[derive(Debug, Clone)]
pub struct GrpcConnector {
    /// The client configuration.
    tls: Arc<UpstreamTls>,
}

impl tower::Service<http::Uri> for GrpcConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in URI"))?;
            let authority = if authority.contains(':') && !authority.ends_with(']') {
                authority
            } else {
                format!("{authority}:443")
            };
            tls.connect(&authority, Alpn::H2).await.map(TokioIo::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1:2379").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:2379").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("etcd-0.etcd:2379").unwrap(),
            ServerName::DnsName(_)
        ));
    }

    #[test]
    fn endpoint_schemes_and_flags() {
        let args = TlsArgs::default();
        let http = vec!["http://127.0.0.1:2379".to_string()];
        let https = vec!["https://127.0.0.1:2379".to_string()];
        assert!(UpstreamTls::from_args(&args, &http).unwrap().is_none());
        let mixed = vec![http[0].clone(), https[0].clone()];
        let err = UpstreamTls::from_args(&args, &mixed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mixes http:// and https://"), "{err}");
        let err = UpstreamTls::from_args(&args, &https)
            .unwrap_err()
            .to_string();
        assert!(err.contains("need --cacert"), "{err}");
        let skip = TlsArgs {
            insecure_skip_tls_verify: true,
            ..TlsArgs::default()
        };
        assert!(UpstreamTls::from_args(&skip, &https).unwrap().is_some());
        let err = UpstreamTls::from_args(&skip, &http)
            .unwrap_err()
            .to_string();
        assert!(err.contains("every --endpoints URL is plaintext"), "{err}");
        let missing = TlsArgs {
            cacert: Some("/nonexistent/ca.pem".into()),
            ..TlsArgs::default()
        };
        let err = UpstreamTls::from_args(&missing, &https)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--cacert /nonexistent/ca.pem: "), "{err}");
    }
}
