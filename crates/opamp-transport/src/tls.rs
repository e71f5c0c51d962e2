//! TLS and mTLS configuration with rustls (ring provider), built from PEM.
//!
//! - [`server_config`]: a server certificate chain and key, and optionally the CA that client
//!   certificates must chain to (mTLS).
//! - [`client_config`]: the roots to trust (a custom CA PEM, or the system's roots), an
//!   optional client certificate (mTLS), and — for tests only — skipping verification, named
//!   `dangerous_*` as rustls does.
//!
//! Both advertise ALPN `http/1.1`: OpAMP's WebSocket upgrade is an HTTP/1.1 mechanism.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

pub use rustls;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input held no certificate, or could not be parsed.
    #[error("no valid certificate in the {what} PEM")]
    NoCertificate {
        /// Which input: "certificate chain", "client CA", "CA".
        what: &'static str,
    },
    /// The private key PEM could not be parsed.
    #[error("invalid private key PEM: {0}")]
    PrivateKey(rustls_pki_types::pem::Error),
    /// The system's root certificates could not be loaded and no CA was given.
    #[error("no root certificates: the system store is empty or unreadable")]
    NoRoots,
    /// rustls refused the configuration (for example a key that does not match its
    /// certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The minimum TLS version is above the maximum.
    #[error("no TLS version between the minimum and the maximum")]
    NoVersion,
    /// The client-certificate verifier could not be built from the client CA.
    #[error("client CA rejected: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// A certificate chain and its private key, PEM-encoded.
#[derive(Clone)]
pub struct CertifiedKeyPem {
    /// The certificate chain, leaf first.
    pub cert_chain: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: Vec<u8>,
}

impl std::fmt::Debug for CertifiedKeyPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKeyPem")
            .field(
                "cert_chain",
                &format_args!("<{} bytes>", self.cert_chain.len()),
            )
            .field("private_key", &format_args!("<redacted>"))
            .finish()
    }
}

/// The crypto provider used throughout: rustls with ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate { what })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(TlsError::PrivateKey)
}

fn roots(pem: &[u8], what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(pem, what)? {
        store.add(cert)?;
    }
    Ok(store)
}

/// A server configuration presenting `identity`. With `client_ca_pem`, clients MUST present a
/// certificate that chains to one of those CAs (mTLS); without it, no client certificate is
/// asked for.
pub fn server_config(
    identity: &CertifiedKeyPem,
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        Some(pem) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(pem, "client CA")?),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(
        certs(&identity.cert_chain, "certificate chain")?,
        key(&identity.private_key)?,
    )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS protocol version, as a bound of what a client negotiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TlsVersion {
    /// TLS 1.2.
    Tls12,
    /// TLS 1.3.
    Tls13,
}

impl TlsVersion {
    fn rustls(self) -> &'static rustls::SupportedProtocolVersion {
        match self {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        }
    }
}

/// What a client trusts and presents.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ClientTls {
    /// PEM of the CA certificates to trust. `None` trusts the system's root certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// Trust the system's root certificates as well as [`ca_pem`](Self::ca_pem).
    pub include_system_roots: bool,
    /// The lowest TLS version negotiated; `None`: TLS 1.2 (rustls supports nothing older).
    pub min_version: Option<TlsVersion>,
    /// The highest TLS version negotiated; `None`: TLS 1.3.
    pub max_version: Option<TlsVersion>,
    /// A client certificate and key to present (mTLS).
    pub client_identity: Option<CertifiedKeyPem>,
    /// Accept any server certificate. Only for tests: it removes all protection TLS gives.
    pub dangerous_skip_verify: bool,
}

impl ClientTls {
    /// Trust only the CAs in this PEM.
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Present this client certificate (mTLS).
    pub fn with_client_identity(mut self, identity: CertifiedKeyPem) -> Self {
        self.client_identity = Some(identity);
        self
    }

    /// Accept any server certificate. Only for tests.
    pub fn dangerous_skip_verify(mut self) -> Self {
        self.dangerous_skip_verify = true;
        self
    }
}

/// A client configuration from `tls`.
pub fn client_config(tls: &ClientTls) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let min = tls.min_version.unwrap_or(TlsVersion::Tls12);
    let max = tls.max_version.unwrap_or(TlsVersion::Tls13);
    let versions: Vec<_> = [TlsVersion::Tls12, TlsVersion::Tls13]
        .into_iter()
        .filter(|v| (min..=max).contains(v))
        .map(TlsVersion::rustls)
        .collect();
    if versions.is_empty() {
        return Err(TlsError::NoVersion);
    }
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_protocol_versions(&versions)?;
    let builder = if tls.dangerous_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let store = match &tls.ca_pem {
            Some(pem) if tls.include_system_roots => {
                let mut store = system_roots()?;
                for cert in certs(pem, "CA")? {
                    store.add(cert)?;
                }
                store
            }
            Some(pem) => roots(pem, "CA")?,
            None => system_roots()?,
        };
        builder.with_root_certificates(store)
    };
    let mut config = match &tls.client_identity {
        Some(id) => builder.with_client_auth_cert(
            certs(&id.cert_chain, "certificate chain")?,
            key(&id.private_key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    // Certificates the store cannot parse are skipped, as browsers do.
    let (added, _) =
        store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    Ok(store)
}

/// A verifier that accepts every server certificate (signatures are still checked, so the
/// handshake itself is well-formed). Used only by `dangerous_skip_verify`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> CertifiedKeyPem {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        CertifiedKeyPem {
            cert_chain: ck.cert.pem().into_bytes(),
            private_key: ck.signing_key.serialize_pem().into_bytes(),
        }
    }

    #[test]
    fn builds_server_and_client_configs() {
        let id = self_signed();
        let server = server_config(&id, None).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        server_config(&id, Some(&id.cert_chain)).unwrap();
        client_config(&ClientTls::default().with_ca_pem(id.cert_chain.clone())).unwrap();
        client_config(
            &ClientTls::default()
                .with_ca_pem(id.cert_chain.clone())
                .with_client_identity(id.clone()),
        )
        .unwrap();
        client_config(&ClientTls::default().dangerous_skip_verify()).unwrap();
    }

    #[test]
    fn bad_pem_is_a_typed_error() {
        let id = self_signed();
        let no_cert = CertifiedKeyPem {
            cert_chain: b"junk".to_vec(),
            ..id.clone()
        };
        assert!(matches!(
            server_config(&no_cert, None),
            Err(TlsError::NoCertificate { .. })
        ));
        let no_key = CertifiedKeyPem {
            private_key: b"junk".to_vec(),
            ..id.clone()
        };
        assert!(matches!(
            server_config(&no_key, None),
            Err(TlsError::PrivateKey(_))
        ));
        let other = self_signed();
        let mismatched = CertifiedKeyPem {
            private_key: other.private_key,
            ..id
        };
        assert!(server_config(&mismatched, None).is_err());
        assert!(client_config(&ClientTls::default().with_ca_pem(b"junk".to_vec())).is_err());
        assert!(format!("{:?}", self_signed()).contains("<redacted>"));
    }
}
