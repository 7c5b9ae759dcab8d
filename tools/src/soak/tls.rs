//! HTTPS for `soak` and `rehearse`: a rustls client that offers only HTTP/1.1, trusting the
//! system's roots, a CA file (`--cacert`), or, with `--insecure`, any certificate (the
//! handshake's signatures are still checked: only the chain of trust is skipped, as `curl -k`).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What a load needs to speak TLS to its target.
#[derive(Debug, Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    /// The name sent in SNI and checked against the certificate.
    pub server_name: ServerName<'static>,
}

/// Which certificates to trust.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// The system's roots (/etc/ssl/certs and the like).
    System,
    /// The CA certificates of a PEM file.
    CaFile(&'a Path),
    /// Any certificate.
    Insecure,
}

impl Tls {
    pub fn new(host: &str, trust: Trust) -> Result<Self, String> {
        let server_name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|_| format!("`{host}` is not a host name for TLS"))?
            .to_owned();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let mut config = match trust {
            Trust::Insecure => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth(),
            Trust::System => builder
                .with_root_certificates(system_roots())
                .with_no_client_auth(),
            Trust::CaFile(path) => builder
                .with_root_certificates(roots_from(path)?)
                .with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    // Certificates the store cannot parse are skipped, as every TLS client does.
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    roots
}

fn roots_from(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs =
        CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

/// Trusts any certificate chain; checks the handshake's signatures like the default verifier.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
