//! Building connection-settings offers and tracking what an agent did with them (CS-*,
//! CSS-*). Sans-IO, always built.
//!
//! [`ConnectionSettingsOffer`] builds a [`ConnectionSettingsOffers`] with a stable hash
//! (CS-2): the SHA-256 of a domain tag and the encoded offer without its hash. Protobuf
//! encoding by prost is deterministic (fields in tag order, maps in key order), so the same
//! settings give the same hash in every process and after a restart, and agents, which apply
//! an offer once per hash, do not apply it again. [`OpampSettings`] builds the OpAMP part
//! (endpoint, headers, client certificate, TLS, heartbeat).
//!
//! [`OfferTracking`] is one agent's record: the offer made, and the last
//! `connection_settings_status` it reported (CSS-1); [`OfferTracking::to_send`] says whether
//! the next `ServerToAgent` must carry the offer (CSS-2: while the hash the agent reports is
//! not the offer's). Keep one per agent with the rest of the agent's state.
//!
//! Capability gating is the session core's: each part goes only to an agent with its
//! capability (CS-1).

use std::time::Duration;

use bytes::Bytes;
use opamp_proto::{
    AgentToServer, ConnectionSettingsOffers, ConnectionSettingsStatus, ConnectionSettingsStatuses,
    Header, Headers, Message, OpAmpConnectionSettings, OtherConnectionSettings,
    TelemetryConnectionSettings, TlsCertificate, TlsConnectionSettings,
};
use sha2::{Digest, Sha256};

/// The OpAMP part of an offer (CS-OP-1), built field by field. An unset field is absent from
/// the offer.
#[derive(Clone, Default, PartialEq)]
pub struct OpampSettings(OpAmpConnectionSettings);

impl std::fmt::Debug for OpampSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values and private keys are credentials: not shown.
        let s = &self.0;
        f.debug_struct("OpampSettings")
            .field("destination_endpoint", &s.destination_endpoint)
            .field(
                "headers",
                &s.headers
                    .as_ref()
                    .map(|h| h.headers.iter().map(|h| &h.key).collect::<Vec<_>>()),
            )
            .field("certificate", &s.certificate.is_some())
            .field("heartbeat_interval_seconds", &s.heartbeat_interval_seconds)
            .field("tls", &s.tls.is_some())
            .finish()
    }
}

impl OpampSettings {
    /// Nothing set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the agent connects from now on (CS-OP-8): a `ws`, `wss`, `http` or `https` URL
    /// (CS-OP-9).
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.0.destination_endpoint = url.into();
        self
    }

    /// A header the agent sends on every request and handshake (CS-6), e.g. a rotated
    /// `Authorization`. The offered headers replace the agent's.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.0
            .headers
            .get_or_insert_with(Headers::default)
            .headers
            .push(Header {
                key: name.into(),
                value: value.into(),
            });
        self
    }

    /// The client certificate the agent presents (PEM), with the CA that signed it (CS-5,
    /// CS-7); the agent forgets its earlier one once this one works.
    pub fn client_certificate(
        mut self,
        cert_pem: impl Into<Bytes>,
        private_key_pem: impl Into<Bytes>,
        ca_cert_pem: impl Into<Bytes>,
    ) -> Self {
        self.0.certificate = Some(TlsCertificate {
            cert: cert_pem.into(),
            private_key: private_key_pem.into(),
            ca_cert: ca_cert_pem.into(),
        });
        self
    }

    /// The CA certificates (PEM) the agent trusts for the server.
    pub fn ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls().ca_pem_contents = pem.into();
        self
    }

    /// The lowest TLS version the agent negotiates: `"1.2"` or `"1.3"`.
    pub fn min_tls_version(mut self, version: impl Into<String>) -> Self {
        self.tls().min_version = version.into();
        self
    }

    /// The heartbeat interval (HB-2); whole seconds, 0 switches heartbeats off.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.0.heartbeat_interval_seconds = interval.as_secs();
        self
    }

    fn tls(&mut self) -> &mut TlsConnectionSettings {
        self.0
            .tls
            .get_or_insert_with(TlsConnectionSettings::default)
    }

    /// The message.
    pub fn build(self) -> OpAmpConnectionSettings {
        self.0
    }
}

/// A connection-settings offer for one agent or many (CS-1), with a stable hash (CS-2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionSettingsOffer {
    offers: ConnectionSettingsOffers,
}

/// The domain tag of the hash, so that it cannot collide with another kind of hash.
const HASH_DOMAIN: &[u8] = b"opamp-rs connection settings v1\0";

impl ConnectionSettingsOffer {
    /// An empty offer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The OpAMP connection part (CS-OP-1); needs `AcceptsOpAMPConnectionSettings`.
    pub fn opamp(mut self, settings: impl Into<OpAmpConnectionSettings>) -> Self {
        self.offers.opamp = Some(settings.into());
        self
    }

    /// Where the agent sends its own metrics (OWN-1, OWN-2: a full OTLP/HTTP URL with its
    /// path); needs `ReportsOwnMetrics`.
    pub fn own_metrics(mut self, settings: TelemetryConnectionSettings) -> Self {
        self.offers.own_metrics = Some(settings);
        self
    }

    /// Where the agent sends its own traces (OWN-1); needs `ReportsOwnTraces`.
    pub fn own_traces(mut self, settings: TelemetryConnectionSettings) -> Self {
        self.offers.own_traces = Some(settings);
        self
    }

    /// Where the agent sends its own logs (OWN-1); needs `ReportsOwnLogs`.
    pub fn own_logs(mut self, settings: TelemetryConnectionSettings) -> Self {
        self.offers.own_logs = Some(settings);
        self
    }

    /// Settings of the agent's connection `name` (OTH-1); needs
    /// `AcceptsOtherConnectionSettings`.
    pub fn other_connection(
        mut self,
        name: impl Into<String>,
        settings: OtherConnectionSettings,
    ) -> Self {
        self.offers.other_connections.insert(name.into(), settings);
        self
    }

    /// The hash of the offer (CS-2): the same settings give the same hash.
    pub fn hash(&self) -> [u8; 32] {
        let mut unhashed = self.offers.clone();
        unhashed.hash = Bytes::new();
        let mut h = Sha256::new();
        h.update(HASH_DOMAIN);
        h.update(unhashed.encode_to_vec());
        h.finalize().into()
    }

    /// The message, with its hash.
    pub fn build(&self) -> ConnectionSettingsOffers {
        let mut offers = self.offers.clone();
        offers.hash = Bytes::copy_from_slice(&self.hash());
        offers
    }
}

impl From<OpampSettings> for OpAmpConnectionSettings {
    fn from(s: OpampSettings) -> Self {
        s.0
    }
}

/// What an agent did with the offer made to it, from its last report (CSS-1).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum OfferState {
    /// Nothing offered.
    NotOffered,
    /// Offered; the agent has not reported this offer's hash yet.
    Pending,
    /// The agent is applying it (CS-OP-3: it is trying the new connection).
    Applying,
    /// The agent applied it (CS-OP-5). For OpAMP settings: it is connected with them.
    Applied,
    /// The agent rejected it or could not apply it, with its reason (CS-OP-6).
    Failed(String),
}

/// One agent's connection-settings offer and what it reported about it (CSS-1, CSS-2).
#[derive(Debug, Clone, Default)]
pub struct OfferTracking {
    offered: Option<ConnectionSettingsOffers>,
    reported: Option<ConnectionSettingsStatus>,
}

impl OfferTracking {
    /// Nothing offered, nothing reported.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the offer made to the agent; it replaces an earlier one.
    pub fn offer(&mut self, offers: ConnectionSettingsOffers) {
        self.offered = Some(offers);
    }

    /// The offer made, if any.
    pub fn offered(&self) -> Option<&ConnectionSettingsOffers> {
        self.offered.as_ref()
    }

    /// Reads the agent's `connection_settings_status`, if the message has one (an agent
    /// omits it when unchanged, CSS-3). A copy is kept: no part of the message stays alive.
    pub fn observe(&mut self, msg: &AgentToServer) {
        if let Some(status) = &msg.connection_settings_status {
            self.reported = Some(ConnectionSettingsStatus {
                last_connection_settings_hash: Bytes::copy_from_slice(
                    &status.last_connection_settings_hash,
                ),
                status: status.status,
                error_message: status.error_message.clone(),
            });
        }
    }

    /// The agent's last reported status, whatever offer it names.
    pub fn reported(&self) -> Option<&ConnectionSettingsStatus> {
        self.reported.as_ref()
    }

    /// What the agent did with the current offer.
    pub fn state(&self) -> OfferState {
        let Some(offered) = &self.offered else {
            return OfferState::NotOffered;
        };
        match &self.reported {
            Some(r) if r.last_connection_settings_hash == offered.hash => {
                match ConnectionSettingsStatuses::try_from(r.status) {
                    Ok(ConnectionSettingsStatuses::Applying) => OfferState::Applying,
                    Ok(ConnectionSettingsStatuses::Applied) => OfferState::Applied,
                    Ok(ConnectionSettingsStatuses::Failed) => {
                        OfferState::Failed(r.error_message.clone())
                    }
                    // UNSET or a value from a later spec: not an answer to this offer.
                    _ => OfferState::Pending,
                }
            }
            _ => OfferState::Pending,
        }
    }

    /// The offer to put in the next `ServerToAgent`: while the agent has not reported its hash
    /// (CSS-2). Once it reported APPLYING, APPLIED or FAILED for it, nothing: a FAILED offer is
    /// not pushed again (the agent would not apply it again anyway, CS-2); make a new one.
    pub fn to_send(&self) -> Option<&ConnectionSettingsOffers> {
        match self.state() {
            OfferState::Pending => self.offered.as_ref(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(hash: &[u8], s: ConnectionSettingsStatuses, msg: &str) -> AgentToServer {
        AgentToServer {
            connection_settings_status: Some(ConnectionSettingsStatus {
                last_connection_settings_hash: Bytes::copy_from_slice(hash),
                status: s as i32,
                error_message: msg.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn cs_2_the_hash_is_stable_and_covers_every_part() {
        let make = || {
            ConnectionSettingsOffer::new()
                .opamp(
                    OpampSettings::new()
                        .endpoint("wss://b.example/v1/opamp")
                        .header("authorization", "Bearer t1")
                        .heartbeat(Duration::from_secs(10)),
                )
                .other_connection("b", OtherConnectionSettings::default())
                .other_connection("a", OtherConnectionSettings::default())
        };
        let a = make().build();
        assert_eq!(a.hash.len(), 32);
        assert_eq!(a, make().build(), "same settings, same hash");
        assert_eq!(a.hash[..], make().hash()[..], "build and hash agree");
        let rotated = ConnectionSettingsOffer::new()
            .opamp(
                OpampSettings::new()
                    .endpoint("wss://b.example/v1/opamp")
                    .header("authorization", "Bearer t2")
                    .heartbeat(Duration::from_secs(10)),
            )
            .other_connection("a", OtherConnectionSettings::default())
            .other_connection("b", OtherConnectionSettings::default())
            .build();
        assert_ne!(rotated.hash, a.hash, "a rotated header is a new offer");
        let telemetry = make()
            .own_metrics(TelemetryConnectionSettings {
                destination_endpoint: "https://otlp/v1/metrics".into(),
                ..Default::default()
            })
            .build();
        assert_ne!(telemetry.hash, a.hash);
        assert_eq!(
            telemetry.own_metrics.unwrap().destination_endpoint,
            "https://otlp/v1/metrics"
        );
    }

    #[test]
    fn cs_2_the_hash_does_not_depend_on_the_process() {
        // SHA-256 of the tag and the protobuf encoding, written out by hand: the hash must
        // not change between releases, or every agent would apply its offer again after a
        // server upgrade.
        let h = ConnectionSettingsOffer::new()
            .opamp(OpampSettings::new().heartbeat(Duration::from_secs(10)))
            .hash();
        let mut expected = Sha256::new();
        expected.update(HASH_DOMAIN);
        // field 2 (opamp), length 2: field 4 (heartbeat_interval_seconds) = 10.
        expected.update([0x12, 0x02, 0x20, 0x0a]);
        assert_eq!(h, <[u8; 32]>::from(expected.finalize()));
    }

    #[test]
    fn css_1_css_2_tracking_follows_the_agents_reports() {
        let offer = ConnectionSettingsOffer::new()
            .opamp(OpampSettings::new().endpoint("ws://b/v1/opamp"))
            .build();
        let mut t = OfferTracking::new();
        assert_eq!(t.state(), OfferState::NotOffered);
        assert_eq!(t.to_send(), None);
        t.offer(offer.clone());
        assert_eq!(t.state(), OfferState::Pending);
        assert_eq!(t.to_send(), Some(&offer), "CSS-2: sent until acknowledged");
        // A status for an older offer does not acknowledge this one.
        t.observe(&status(b"older", ConnectionSettingsStatuses::Applied, ""));
        assert_eq!(t.state(), OfferState::Pending);
        t.observe(&status(
            &offer.hash,
            ConnectionSettingsStatuses::Applying,
            "",
        ));
        assert_eq!(t.state(), OfferState::Applying);
        assert_eq!(t.to_send(), None);
        // A message without a status keeps the last one (CSS-3).
        t.observe(&AgentToServer::default());
        assert_eq!(t.state(), OfferState::Applying);
        t.observe(&status(
            &offer.hash,
            ConnectionSettingsStatuses::Applied,
            "",
        ));
        assert_eq!(t.state(), OfferState::Applied);
        t.observe(&status(
            &offer.hash,
            ConnectionSettingsStatuses::Failed,
            "connection refused",
        ));
        assert_eq!(t.state(), OfferState::Failed("connection refused".into()));
        assert_eq!(t.to_send(), None, "a failed offer is not pushed again");
        assert_eq!(
            t.reported().unwrap().error_message,
            "connection refused".to_owned()
        );
        t.observe(&status(&offer.hash, ConnectionSettingsStatuses::Unset, ""));
        assert_eq!(t.state(), OfferState::Pending);
    }
}
