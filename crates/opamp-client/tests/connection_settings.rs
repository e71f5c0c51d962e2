//! Offered OpAMP connection settings applied by the drivers (CS-OP-1..CS-OP-6) against two
//! real `opamp-server`s on loopback: the agent moves from server A to server B, a candidate
//! pointing at a dead port or at a server whose certificate it cannot verify rolls back to A
//! and reports FAILED, a `wss` candidate with an offered CA is APPLIED, a vetoed offer
//! changes nothing, and a restarted agent uses the settings it persisted.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use opamp_client::core::TelemetryConnectionOffer;
use opamp_client::{Callbacks, OpampClient, ServerGuards, SettingsRejected};
use opamp_proto::{
    AgentCapabilitySet, AgentToServer, ConnectionSettingsOffers, ConnectionSettingsStatus,
    ConnectionSettingsStatuses, OpAmpConnectionSettings, ServerToAgent,
    TelemetryConnectionSettings,
};
use opamp_server::connection_settings::{
    ConnectionSettingsOffer, OfferState, OfferTracking, OpampSettings,
};
use opamp_server::{
    Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
};
use tokio::sync::mpsc;

/// What a server saw.
#[derive(Debug)]
enum Seen {
    /// A connection (WebSocket upgrade or HTTP request) with its `authorization` header.
    Connecting(Option<String>),
    Message(Box<AgentToServer>),
}

/// A server that records what it sees and offers what its `OfferTracking` holds until the
/// agent reported it (CSS-2).
struct State {
    seen: mpsc::UnboundedSender<Seen>,
    tracking: Mutex<OfferTracking>,
}

struct Callbacks0(Arc<State>);

#[async_trait]
impl ServerCallbacks for Callbacks0 {
    async fn on_connecting(&self, request: &http::request::Parts) -> ConnectionResponse {
        let auth = request
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        let _ = self.0.seen.send(Seen::Connecting(auth));
        ConnectionResponse::accept(Arc::new(PerConnection(self.0.clone())))
    }
}

struct PerConnection(Arc<State>);

#[async_trait]
impl ConnectionCallbacks for PerConnection {
    async fn on_message(&self, _conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        let offer = {
            let mut t = self.0.tracking.lock().unwrap();
            t.observe(&msg);
            t.to_send().cloned()
        };
        let _ = self.0.seen.send(Seen::Message(Box::new(msg)));
        Some(ServerToAgent {
            connection_settings: offer,
            ..Default::default()
        })
    }
}

struct TestServer {
    server: Server,
    state: Arc<State>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl TestServer {
    async fn start(tls: Option<&Pki>) -> Self {
        let (tx, seen) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            seen: tx,
            tracking: Mutex::new(OfferTracking::new()),
        });
        let mut config = ServerConfig::builder().listen_addr("127.0.0.1:0".parse().unwrap());
        if let Some(pki) = tls {
            config = config.tls(opamp_transport::tls::server_config(&pki.server, None).unwrap());
        }
        let server = Server::bind(config.build().unwrap(), Arc::new(Callbacks0(state.clone())))
            .await
            .unwrap();
        Self {
            server,
            state,
            seen,
        }
    }

    fn url(&self, scheme: &str) -> String {
        let port = self.server.local_addr().port();
        let host = if scheme.ends_with('s') {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{port}/v1/opamp")
    }

    fn offer(&self, offer: ConnectionSettingsOffers) {
        self.state.tracking.lock().unwrap().offer(offer);
    }

    fn state(&self) -> OfferState {
        self.state.tracking.lock().unwrap().state()
    }

    /// The next message whose connection settings status matches `f`.
    async fn status_where(
        &mut self,
        f: impl Fn(&ConnectionSettingsStatus) -> bool,
    ) -> AgentToServer {
        let wait = async {
            loop {
                if let Seen::Message(m) = recv(&mut self.seen).await {
                    if m.connection_settings_status.as_ref().is_some_and(&f) {
                        return *m;
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .expect("timed out waiting for a status")
    }

    /// The next message.
    async fn message(&mut self) -> AgentToServer {
        loop {
            if let Seen::Message(m) = recv(&mut self.seen).await {
                return *m;
            }
        }
    }

    /// The next connection's `authorization` header.
    async fn connecting(&mut self) -> Option<String> {
        loop {
            if let Seen::Connecting(auth) = recv(&mut self.seen).await {
                return auth;
            }
        }
    }

    fn nothing_seen(&mut self) -> bool {
        self.seen.try_recv().is_err()
    }
}

fn is(
    status: ConnectionSettingsStatuses,
    hash: &[u8],
) -> impl Fn(&ConnectionSettingsStatus) -> bool {
    let hash = hash.to_vec();
    move |s| s.status == status as i32 && s.last_connection_settings_hash[..] == hash[..]
}

/// What the agent's hooks saw.
#[derive(Debug)]
enum Hook {
    Offered,
    Applied(Box<OpAmpConnectionSettings>, Bytes),
    Failed(String),
    Telemetry(String),
}

/// An agent that persists what it applied and vetoes offers whose endpoint contains "veto".
struct Agent(mpsc::UnboundedSender<Hook>);

#[async_trait]
impl Callbacks for Agent {
    async fn on_opamp_connection_settings(
        &self,
        settings: &OpAmpConnectionSettings,
        _offer_hash: &[u8],
    ) -> Result<(), SettingsRejected> {
        let _ = self.0.send(Hook::Offered);
        if settings.destination_endpoint.contains("veto") {
            return Err(SettingsRejected::new("not an endpoint of ours"));
        }
        Ok(())
    }
    async fn on_opamp_connection_settings_applied(
        &self,
        settings: &OpAmpConnectionSettings,
        offer_hash: &[u8],
    ) {
        let _ = self.0.send(Hook::Applied(
            Box::new(settings.clone()),
            Bytes::copy_from_slice(offer_hash),
        ));
    }
    async fn on_opamp_connection_settings_failed(&self, _offer_hash: &[u8], reason: &str) {
        let _ = self.0.send(Hook::Failed(reason.to_owned()));
    }
    /// Takes an own-metrics destination over https only (OWN-2 allows refusing http).
    async fn on_telemetry_connection_settings(
        &self,
        settings: &TelemetryConnectionOffer,
        _offer_hash: &[u8],
    ) -> Result<(), SettingsRejected> {
        let endpoint = settings
            .own_metrics
            .as_ref()
            .map(|m| m.destination_endpoint.clone())
            .unwrap_or_default();
        let _ = self.0.send(Hook::Telemetry(endpoint.clone()));
        if endpoint.starts_with("https://") {
            Ok(())
        } else {
            Err(SettingsRejected::new("own metrics only over https"))
        }
    }
}

fn caps() -> AgentCapabilitySet {
    AgentCapabilitySet::REPORTS_STATUS
        | AgentCapabilitySet::REPORTS_OWN_METRICS
        | AgentCapabilitySet::ACCEPTS_OPAMP_CONNECTION_SETTINGS
        | AgentCapabilitySet::REPORTS_CONNECTION_SETTINGS_STATUS
        | AgentCapabilitySet::REPORTS_HEARTBEAT
}

fn start_agent(url: String) -> (OpampClient, mpsc::UnboundedReceiver<Hook>) {
    start_agent_with(settings(url))
}

fn start_agent_with(
    settings: opamp_client::StartSettings,
) -> (OpampClient, mpsc::UnboundedReceiver<Hook>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = OpampClient::start(
        settings
            .with_capabilities(caps())
            .with_agent_description(description())
            // Heartbeats keep messages flowing, so a server's new offer goes out soon.
            .with_heartbeat_interval(Duration::from_millis(200))
            // The tests make a second offer right after the first.
            .with_server_guards(
                ServerGuards::default()
                    .with_connection_settings_min_interval(Duration::from_millis(100)),
            ),
        Arc::new(Agent(tx)),
    )
    .unwrap();
    (client, rx)
}

async fn hook<T>(rx: &mut mpsc::UnboundedReceiver<Hook>, f: impl Fn(Hook) -> Option<T>) -> T {
    loop {
        if let Some(t) = f(recv(rx).await) {
            return t;
        }
    }
}

async fn moves_from_a_to_b(scheme: &str) {
    let mut a = TestServer::start(None).await;
    let mut b = TestServer::start(None).await;
    let offer = ConnectionSettingsOffer::new()
        .opamp(
            OpampSettings::new()
                .endpoint(b.url(scheme))
                .header("authorization", "Bearer for-b")
                // HB-2: applied with the rest once B answered (0 would switch heartbeats off).
                .heartbeat(Duration::from_secs(1)),
        )
        .build();
    a.offer(offer.clone());
    let (client, mut hooks) = start_agent(a.url(scheme));

    // CS-OP-3: A hears APPLYING with the offer's hash, in the goodbye (agent_disconnect).
    let bye = a
        .status_where(is(ConnectionSettingsStatuses::Applying, &offer.hash))
        .await;
    assert!(
        bye.agent_disconnect.is_some(),
        "APPLYING goes with the goodbye"
    );
    // CS-OP-4, CS-6: the agent connects to B with the offered header.
    assert_eq!(b.connecting().await.as_deref(), Some("Bearer for-b"));
    let first = b
        .status_where(is(ConnectionSettingsStatuses::Applying, &offer.hash))
        .await;
    assert!(
        first.agent_description.is_some(),
        "the full state goes to B"
    );
    // CS-OP-5: B answered, so APPLIED, and the embedder's hook persists the settings.
    b.status_where(is(ConnectionSettingsStatuses::Applied, &offer.hash))
        .await;
    let (persisted, hash) = hook(&mut hooks, |h| match h {
        Hook::Applied(s, hash) => Some((s, hash)),
        _ => None,
    })
    .await;
    assert_eq!(persisted.destination_endpoint, b.url(scheme));
    assert_eq!(hash, offer.hash);
    assert!(client.is_connected());
    // Still on B: its heartbeats keep coming there.
    b.message().await;
    client.stop().await.unwrap();

    // A restarted agent uses the persisted settings (with the status it persisted): it goes
    // to B directly, and reports the offer as APPLIED from its first message.
    let restarted = settings(a.url(scheme))
        .with_opamp_connection_settings(&persisted)
        .unwrap()
        .with_connection_settings_status(ConnectionSettingsStatus {
            last_connection_settings_hash: hash.clone(),
            status: ConnectionSettingsStatuses::Applied as i32,
            error_message: String::new(),
        });
    let (client, _hooks) = start_agent_with(restarted);
    assert_eq!(b.connecting().await.as_deref(), Some("Bearer for-b"));
    let first = b.status_where(|_| true).await;
    assert!(
        first.agent_description.is_some(),
        "the restarted agent's first message"
    );
    assert!(is(ConnectionSettingsStatuses::Applied, &hash)(
        first.connection_settings_status.as_ref().unwrap()
    ));
    client.stop().await.unwrap();
    a.server.shutdown().await;
    b.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cs_op_8_websocket_agent_moves_to_another_server_and_reports_applied() {
    moves_from_a_to_b("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cs_op_8_plain_http_agent_moves_to_another_server_and_reports_applied() {
    moves_from_a_to_b("http").await;
}

async fn dead_port_rolls_back(scheme: &str) {
    let mut a = TestServer::start(None).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let offer = ConnectionSettingsOffer::new()
        .opamp(OpampSettings::new().endpoint(format!("{scheme}://127.0.0.1:{dead}/v1/opamp")))
        .build();
    a.offer(offer.clone());
    let (client, mut hooks) = start_agent(a.url(scheme));
    a.status_where(is(ConnectionSettingsStatuses::Applying, &offer.hash))
        .await;
    // CS-OP-6: back on A, FAILED with the reason.
    let failed = a
        .status_where(is(ConnectionSettingsStatuses::Failed, &offer.hash))
        .await;
    let reason = failed.connection_settings_status.unwrap().error_message;
    assert!(!reason.is_empty());
    assert_eq!(
        hook(&mut hooks, |h| match h {
            Hook::Failed(r) => Some(r),
            _ => None,
        })
        .await,
        reason
    );
    assert_eq!(a.state(), OfferState::Failed(reason));
    // The agent stays on A: its next messages come there (heartbeats).
    a.message().await;
    client.stop().await.unwrap();
    a.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cs_op_6_websocket_candidate_on_a_dead_port_rolls_back_and_reports_failed() {
    dead_port_rolls_back("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cs_op_6_plain_http_candidate_on_a_dead_port_rolls_back_and_reports_failed() {
    dead_port_rolls_back("http").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cs_op_4_wss_candidate_is_verified_with_the_offered_ca() {
    let pki = pki();
    let mut a = TestServer::start(None).await;
    let mut b = TestServer::start(Some(&pki)).await;
    // First without the CA: the agent cannot verify B (system roots), so it stays on A.
    let unverifiable = ConnectionSettingsOffer::new()
        .opamp(OpampSettings::new().endpoint(b.url("wss")))
        .build();
    a.offer(unverifiable.clone());
    let (client, mut hooks) = start_agent(a.url("ws"));
    let failed = a
        .status_where(is(ConnectionSettingsStatuses::Failed, &unverifiable.hash))
        .await;
    let reason = failed.connection_settings_status.unwrap().error_message;
    assert!(reason.contains("TLS"), "{reason}");

    // Then with the CA that signed B's certificate (and TLS 1.3 at least): APPLIED on B.
    let with_ca = ConnectionSettingsOffer::new()
        .opamp(
            OpampSettings::new()
                .endpoint(b.url("wss"))
                .ca_pem(pki.ca_pem.clone())
                .min_tls_version("1.3"),
        )
        .build();
    a.offer(with_ca.clone());
    b.status_where(is(ConnectionSettingsStatuses::Applied, &with_ca.hash))
        .await;
    let (applied, _) = hook(&mut hooks, |h| match h {
        Hook::Applied(s, hash) => Some((s, hash)),
        _ => None,
    })
    .await;
    assert_eq!(applied.tls.unwrap().ca_pem_contents, pki.ca_pem);
    client.stop().await.unwrap();
    a.server.shutdown().await;
    b.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cs_4_a_vetoed_offer_changes_nothing() {
    let mut a = TestServer::start(None).await;
    let mut b = TestServer::start(None).await;
    let offer = ConnectionSettingsOffer::new()
        .opamp(OpampSettings::new().endpoint(format!("{}?veto", b.url("ws"))))
        .build();
    a.offer(offer.clone());
    let (client, mut hooks) = start_agent(a.url("ws"));
    hook(&mut hooks, |h| matches!(h, Hook::Offered).then_some(())).await;
    let failed = a
        .status_where(is(ConnectionSettingsStatuses::Failed, &offer.hash))
        .await;
    assert_eq!(
        failed.connection_settings_status.unwrap().error_message,
        "not an endpoint of ours"
    );
    assert!(
        failed.agent_disconnect.is_none(),
        "the agent did not leave A"
    );
    // Had the agent tried B, B would have seen it before A heard FAILED.
    assert!(b.nothing_seen(), "a vetoed offer was tried");
    // Later messages still go to A, and the offer is not handed over again (CS-2).
    for _ in 0..3 {
        a.message().await;
    }
    assert!(b.nothing_seen());
    while let Ok(h) = hooks.try_recv() {
        assert!(!matches!(h, Hook::Offered), "offered twice: {h:?}");
    }
    client.stop().await.unwrap();
    a.server.shutdown().await;
    b.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_1_css_3_own_metrics_offer_reaches_the_embedder_and_its_answer_is_the_status() {
    let mut a = TestServer::start(None).await;
    let metrics = |url: &str| {
        ConnectionSettingsOffer::new()
            .own_metrics(TelemetryConnectionSettings {
                destination_endpoint: url.into(),
                ..Default::default()
            })
            .build()
    };
    let good = metrics("https://otlp.example:4318/v1/metrics");
    a.offer(good.clone());
    let (client, mut hooks) = start_agent(a.url("ws"));
    let endpoint = hook(&mut hooks, |h| match h {
        Hook::Telemetry(e) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!(endpoint, "https://otlp.example:4318/v1/metrics");
    a.status_where(is(ConnectionSettingsStatuses::Applied, &good.hash))
        .await;
    assert_eq!(a.state(), OfferState::Applied);

    let plain = metrics("http://otlp.example:4318/v1/metrics");
    a.offer(plain.clone());
    let failed = a
        .status_where(is(ConnectionSettingsStatuses::Failed, &plain.hash))
        .await;
    assert_eq!(
        failed.connection_settings_status.unwrap().error_message,
        "own metrics only over https"
    );
    assert!(
        client.is_connected(),
        "a telemetry offer does not touch the OpAMP connection"
    );
    client.stop().await.unwrap();
    a.server.shutdown().await;
}
