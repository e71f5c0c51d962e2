//! The agent side of the CSR flow (CSR-1..CSR-8), feature `csr`.
//!
//! [`CertificateRequest::generate`] makes an ECDSA P-256 key pair and a PEM certificate
//! signing request carrying the instance uid (as its common name and as a `urn:uuid:`
//! subject alternative name, CSR-9). [`OpampClient::request_client_certificate`](crate::OpampClient::request_client_certificate)
//! does that, keeps the key, and sends the request once the server advertised
//! `AcceptsConnectionSettingsRequest`; the server's answer is an OpAMP connection offer whose
//! certificate has no private key (CSR-4): the client puts the kept key in and tries it like
//! any other offer (CSR-7, CS-OP-4..CS-OP-6), so the certificate is used only once a server
//! accepted it, and the old one (the bootstrap certificate, if any) is kept otherwise.

use opamp_proto::{
    CertificateRequest as ProtoRequest, ConnectionSettingsRequest, InstanceUid,
    OpAmpConnectionSettingsRequest,
};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};

use crate::ClientError;

/// A key pair and the CSR for it.
#[derive(Clone)]
pub struct CertificateRequest {
    csr_pem: String,
    private_key_pem: String,
}

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateRequest")
            .field("csr_pem", &self.csr_pem)
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

impl CertificateRequest {
    /// A new key pair and a CSR for the agent `uid` (CSR-2, CSR-9).
    pub fn generate(uid: InstanceUid) -> Result<Self, ClientError> {
        let err = |e: rcgen::Error| ClientError::Csr(e.to_string());
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, uid.to_string());
        let urn = format!("urn:uuid:{uid}");
        params.subject_alt_names = vec![SanType::URI(urn.try_into().map_err(err)?)];
        let csr = params.serialize_request(&key).map_err(err)?;
        Ok(Self {
            csr_pem: csr.pem().map_err(err)?,
            private_key_pem: key.serialize_pem(),
        })
    }

    /// The CSR, PEM.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// The private key, PEM (PKCS#8). Never sent.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    /// The message that carries the CSR (CSR-2).
    pub fn to_request(&self) -> ConnectionSettingsRequest {
        ConnectionSettingsRequest {
            opamp: Some(OpAmpConnectionSettingsRequest {
                certificate_request: Some(ProtoRequest {
                    csr: self.csr_pem.clone().into_bytes().into(),
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_2_the_request_carries_a_csr_and_never_the_key() {
        let uid = InstanceUid::new_v7();
        let r = CertificateRequest::generate(uid).unwrap();
        assert!(
            r.csr_pem()
                .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        );
        assert!(r.private_key_pem().contains("PRIVATE KEY"));
        let msg = r.to_request();
        let csr = &msg.opamp.unwrap().certificate_request.unwrap().csr;
        assert_eq!(&csr[..], r.csr_pem().as_bytes());
        assert!(!format!("{r:?}").contains(r.private_key_pem()));
        // A fresh key each time.
        let again = CertificateRequest::generate(uid).unwrap();
        assert_ne!(again.private_key_pem(), r.private_key_pem());
    }
}
