//! TLS on the listen address, as etcd serves an `https://` client URL: one port, ALPN `h2` for
//! gRPC (and JSON over HTTP/2), `http/1.1` or no ALPN for the HTTP/1.x gateway.
//!
//! - `--cert-file`/`--key-file`: the server certificate, re-read when the files change
//!   ([`super::files`]): new handshakes get the new one, open connections keep theirs.
//! - `--trusted-ca-file` (or `--client-cert-auth`, which needs it): a client certificate is
//!   required and verified against that bundle, as etcd does. The bundle is re-read when it
//!   changes too (etcd reads it once; a restart is not needed here). The acceptable-CA list of
//!   the certificate request is left empty, so it cannot go stale across a CA rotation.
//! - `--cipher-suites`: the TLS 1.2 suites offered, by Go's names (etcd's flag); TLS 1.3 is not
//!   affected, as in Go ([`super::server_provider`]).
//! - A handshake must finish within [`HANDSHAKE_TIMEOUT`]; a client that fails it (plaintext,
//!   no or an untrusted certificate, a silent one) is dropped without touching anything else.
//!   A connection whose first byte is not a TLS handshake record is closed without a word, as
//!   etcd's TLS listener does.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::files::Reloading;
use super::identity::{CnPolicy, Peer};
use super::{TlsArgs, TlsError};

/// Longest time a client gets to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listen address's TLS: acceptor and CommonName policy.
#[derive(Debug)]
pub struct ServerTls {
    /// rustls configuration (certificate resolver and client verifier re-read their files).
    config: Arc<ServerConfig>,
    /// What a client certificate's CN means.
    pub policy: CnPolicy,
}

/// A connection whose handshake succeeded.
pub struct Accepted {
    /// The TLS stream.
    pub stream: TlsStream<TcpStream>,
    /// ALPN chose `h2`.
    pub h2: bool,
    /// What the handshake proved about the client.
    pub peer: Peer,
}

impl ServerTls {
    /// The listen address's TLS from the flags: `None` without `--cert-file` (plaintext).
    pub fn from_args(args: &TlsArgs) -> Result<Option<Arc<ServerTls>>, TlsError> {
        let (cert, key) = match (&args.cert_file, &args.key_file) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            (None, None) => {
                if args.trusted_ca_file.is_some() || args.client_cert_auth {
                    return Err(TlsError::Config(
                        "--trusted-ca-file and --client-cert-auth need --cert-file and --key-file"
                            .into(),
                    ));
                }
                return Ok(None);
            }
            _ => {
                return Err(TlsError::Config(
                    "--cert-file and --key-file go together".into(),
                ))
            }
        };
        if args.client_cert_auth && args.trusted_ca_file.is_none() {
            return Err(TlsError::Config(
                "--client-cert-auth needs --trusted-ca-file (the CA bundle client certificates \
                 are verified against)"
                    .into(),
            ));
        }
        let paths = vec![cert.clone(), key.clone()];
        let certified = Reloading::new("server certificate", paths, move || {
            super::load_certified_key("--cert-file", &cert, "--key-file", &key)
        })?;
        let builder =
            ServerConfig::builder_with_provider(super::server_provider(&args.cipher_suites)?)
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &args.trusted_ca_file {
            Some(ca) => {
                let ca = ca.clone();
                let verifier = Reloading::new("trusted CA bundle", vec![ca.clone()], move || {
                    client_verifier(&ca)
                })?;
                builder.with_client_cert_verifier(Arc::new(ClientCa(verifier)))
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(ServerCert(certified)));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(ServerTls {
            config: Arc::new(config),
            policy: CnPolicy {
                client_cert_auth: args.client_cert_auth,
            },
        })))
    }

    /// Completes the TLS handshake of a new connection within [`HANDSHAKE_TIMEOUT`]; `None`
    /// when it fails (the connection is then closed).
    pub async fn accept(&self, tcp: TcpStream) -> Option<Accepted> {
        let handshake = async {
            let mut first = [0u8; 1];
            // 0x16: a TLS handshake record. Anything else (plaintext HTTP or HTTP/2) is closed
            // unanswered, where rustls would answer with an alert.
            match tcp.peek(&mut first).await {
                Ok(1) if first[0] == 0x16 => {}
                _ => return None,
            }
            match TlsAcceptor::from(self.config.clone()).accept(tcp).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    None
                }
            }
        };
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .ok()
            .flatten()?;
        let (_, conn) = stream.get_ref();
        let h2 = conn.alpn_protocol() == Some(b"h2");
        let common_name = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(super::common_name)
            .map(Arc::from);
        Some(Accepted {
            stream,
            h2,
            peer: Peer { common_name },
        })
    }
}

/// A verifier requiring a client certificate signed by a CA of the bundle at `ca`.
fn client_verifier(ca: &std::path::Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = super::load_roots("--trusted-ca-file", ca)?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::provider())
        .build()
        .map_err(|e| TlsError::File {
            flag: "--trusted-ca-file",
            path: ca.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The server certificate, re-read when its files change.
#[derive(Debug)]
struct ServerCert(Reloading<CertifiedKey>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// The client-certificate verifier of the current CA bundle, re-read when it changes.
#[derive(Debug)]
struct ClientCa(Reloading<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for ClientCa {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_client_cert(end_entity, intermediates, now)
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
