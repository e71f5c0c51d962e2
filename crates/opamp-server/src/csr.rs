//! A certificate authority for the agent-initiated CSR flow (CSR-3..CSR-9), feature `csr`.
//! Sans-IO.
//!
//! An agent sends `connection_settings_request.opamp.certificate_request.csr` (PEM, CSR-2);
//! [`csr_of`] finds it in an `AgentToServer`. [`CertificateAuthority::sign`] parses it,
//! verifies its signature, checks the instance uid it carries against the agent's (CSR-9:
//! the common name or a `urn:uuid:` subject alternative name, when present, must be the
//! uid the message came from), and signs a client certificate with the configured CA. The
//! answer is a [`TlsCertificate`] with the certificate and the CA certificate and no private
//! key (CSR-4: only the agent holds it), for the `certificate` of an OpAMP connection offer
//! (e.g. [`OpampSettings::client_certificate`](crate::connection_settings::OpampSettings::client_certificate)
//! with an empty key). A request that fails any check is the embedder's to answer with
//! [`bad_request`](crate::bad_request) (CSR-6). Approval (CSR-3) is the embedder's: call
//! `sign` once the request is approved.
//!
//! Keep the CA's private key off the OpAMP server where you can (CS-7): this helper is for
//! the setups where it is not.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opamp_proto::{AgentToServer, InstanceUid, TlsCertificate};
use rcgen::{
    CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Why a CSR was refused; answer the agent with BAD_REQUEST (CSR-6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Not a PEM certificate signing request, or its signature does not verify.
    #[error("invalid certificate signing request: {0}")]
    Invalid(String),
    /// The request carries an instance uid that is not the agent's (CSR-9).
    #[error("the CSR is for instance uid {found}, the request came from {expected}")]
    WrongInstanceUid {
        /// The uid in the CSR.
        found: String,
        /// The uid of the agent that sent it.
        expected: InstanceUid,
    },
    /// The CA certificate or key could not be used.
    #[error("CA: {0}")]
    Ca(String),
    /// Signing failed.
    #[error("signing the certificate: {0}")]
    Signing(String),
}

/// The CSR (PEM) of a `connection_settings_request`, if the message has one (CSR-2).
pub fn csr_of(msg: &AgentToServer) -> Option<&[u8]> {
    let request = msg
        .connection_settings_request
        .as_ref()?
        .opamp
        .as_ref()?
        .certificate_request
        .as_ref()?;
    (!request.csr.is_empty()).then_some(&request.csr[..])
}

/// Signs agents' CSRs with a CA certificate and key (PEM).
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: Bytes,
    validity: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// The default validity of an issued certificate: 30 days.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

impl CertificateAuthority {
    /// A CA from its certificate and private key (PEM). Issued certificates are valid for
    /// [`DEFAULT_VALIDITY`].
    pub fn from_pem(ca_cert_pem: &str, ca_key_pem: &str) -> Result<Self, CsrError> {
        let key = KeyPair::from_pem(ca_key_pem).map_err(|e| CsrError::Ca(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(ca_cert_pem, key).map_err(|e| CsrError::Ca(e.to_string()))?;
        Ok(Self {
            issuer,
            ca_pem: Bytes::copy_from_slice(ca_cert_pem.as_bytes()),
            validity: DEFAULT_VALIDITY,
        })
    }

    /// How long issued certificates are valid, from the moment they are signed.
    pub fn with_validity(mut self, validity: Duration) -> Self {
        self.validity = validity;
        self
    }

    /// Verifies `csr_pem` from the agent `agent_uid` and signs a client certificate for its
    /// key (CSR-4, CSR-9). The answer has `cert` and `ca_cert`, never `private_key`.
    pub fn sign(&self, csr_pem: &[u8], agent_uid: InstanceUid) -> Result<TlsCertificate, CsrError> {
        let pem =
            std::str::from_utf8(csr_pem).map_err(|_| CsrError::Invalid("not PEM text".into()))?;
        // Parses and verifies the request's signature (proof of the private key).
        let mut request = CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| CsrError::Invalid(e.to_string()))?;
        let expected = agent_uid.to_string();
        for found in uids_in(&request) {
            if !found.eq_ignore_ascii_case(&expected) {
                return Err(CsrError::WrongInstanceUid {
                    found,
                    expected: agent_uid,
                });
            }
        }
        let params = &mut request.params;
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + self.validity).into();
        // A client certificate, whatever the request asked for.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = request
            .signed_by(&self.issuer)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        Ok(TlsCertificate {
            cert: Bytes::from(cert.pem().into_bytes()),
            private_key: Bytes::new(),
            ca_cert: self.ca_pem.clone(),
        })
    }
}

/// The instance uids a CSR names: its common name if it looks like a UUID, and its
/// `urn:uuid:` subject alternative names.
fn uids_in(request: &CertificateSigningRequestParams) -> Vec<String> {
    let mut uids = Vec::new();
    if let Some(cn) = request.params.distinguished_name.get(&DnType::CommonName) {
        let cn = match cn {
            DnValue::Utf8String(s) => Some(s.clone()),
            DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
            DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
            _ => None,
        };
        if let Some(cn) = cn.filter(|c| looks_like_uuid(c)) {
            uids.push(cn);
        }
    }
    for san in &request.params.subject_alt_names {
        if let SanType::URI(uri) = san {
            if let Some(uid) = uri.as_str().strip_prefix("urn:uuid:") {
                uids.push(uid.to_owned());
            }
        }
    }
    uids
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36 && s.parse::<InstanceUid>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer};

    fn ca() -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let key_pem = key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(params, key).unwrap();
        (ca.pem(), key_pem)
    }

    fn csr_for(cn: &str, san: Option<&str>) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(san) = san {
            params.subject_alt_names = vec![SanType::URI(san.try_into().unwrap())];
        }
        (params.serialize_request(&key).unwrap().pem().unwrap(), key)
    }

    #[test]
    fn csr_4_csr_9_a_csr_with_the_agents_uid_is_signed_without_a_private_key() {
        let (ca_pem, ca_key) = ca();
        let ca = CertificateAuthority::from_pem(&ca_pem, &ca_key).unwrap();
        let uid = InstanceUid::new_v7();
        let (csr, _key) = csr_for(&uid.to_string(), Some(&format!("urn:uuid:{uid}")));
        let issued = ca.sign(csr.as_bytes(), uid).unwrap();
        assert!(
            issued.private_key.is_empty(),
            "CSR-4: only the agent holds the key"
        );
        assert_eq!(issued.ca_cert, Bytes::from(ca_pem.clone().into_bytes()));
        let cert = std::str::from_utf8(&issued.cert).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        // That it chains to the CA is checked by a TLS server requiring client certificates
        // from it: crates/opamp-client/tests/csr.rs.
    }

    #[test]
    fn csr_6_csr_9_bad_requests_are_refused() {
        let (ca_pem, ca_key) = ca();
        let ca = CertificateAuthority::from_pem(&ca_pem, &ca_key).unwrap();
        let uid = InstanceUid::new_v7();
        assert!(matches!(
            ca.sign(b"garbage", uid),
            Err(CsrError::Invalid(_))
        ));
        assert!(matches!(
            ca.sign(&[0xff, 0xfe], uid),
            Err(CsrError::Invalid(_))
        ));
        // Another agent's uid, in the common name or in a SAN.
        let other = InstanceUid::new_v7();
        let (csr, _) = csr_for(&other.to_string(), None);
        assert!(matches!(
            ca.sign(csr.as_bytes(), uid),
            Err(CsrError::WrongInstanceUid { .. })
        ));
        let (csr, _) = csr_for("agent", Some(&format!("urn:uuid:{other}")));
        assert!(matches!(
            ca.sign(csr.as_bytes(), uid),
            Err(CsrError::WrongInstanceUid { .. })
        ));
        // A CSR whose signature does not verify: its body altered.
        let (csr, _) = csr_for(&uid.to_string(), None);
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let mid = lines.len() / 2;
        // One base64 digit of a full middle line changed (always a change: swapping A and B
        // left a line without either as it was, and the CSR valid).
        let line = &lines[mid];
        let first = if line.starts_with('A') { "B" } else { "A" };
        lines[mid] = format!("{first}{}", &line[1..]);
        assert!(ca.sign(lines.join("\n").as_bytes(), uid).is_err());
        // Without a uid the CSR is accepted (CSR-9 applies when it carries one).
        let (csr, _) = csr_for("agent", None);
        assert!(ca.sign(csr.as_bytes(), uid).is_ok());
        // A bad CA.
        assert!(CertificateAuthority::from_pem("x", &ca_key).is_err());
    }

    #[test]
    fn csr_2_csr_of_finds_the_request() {
        let msg = AgentToServer {
            connection_settings_request: Some(opamp_proto::ConnectionSettingsRequest {
                opamp: Some(opamp_proto::OpAmpConnectionSettingsRequest {
                    certificate_request: Some(opamp_proto::CertificateRequest {
                        csr: Bytes::from_static(b"PEM"),
                    }),
                }),
            }),
            ..Default::default()
        };
        assert_eq!(csr_of(&msg), Some(&b"PEM"[..]));
        assert_eq!(csr_of(&AgentToServer::default()), None);
    }
}
