//! The reference OpAMP server: a control plane with a web UI.
//!
//! ```sh
//! cargo run --release -p opamp-reference-server
//! # OpAMP (WebSocket and plain HTTP): 127.0.0.1:4320/v1/opamp
//! # web UI and JSON API:               http://127.0.0.1:4321/
//! ```
//!
//! Flags: `--opamp-addr ADDR` (default 127.0.0.1:4320), `--ui-addr ADDR` (default
//! 127.0.0.1:4321), `--ui-allowed-host NAME[:PORT]` (repeatable: another `Host` name the UI
//! answers to), `--tls-cert PEM --tls-key PEM` to serve OpAMP over TLS, `--tls-client-ca PEM`
//! to require client certificates (mTLS), `--ca-cert PEM --ca-key PEM` to sign agents' CSRs
//! with that CA (every valid CSR is approved; the issued certificate is offered back as the
//! agent's client certificate, CSR-3..CSR-9), `--package-signing-key FILE` (the Ed25519 seed,
//! 64 hex digits, that signs uploaded packages; without it a key is generated at start and
//! its public key printed) and `--package-url-base URL` (where agents download packages:
//! default the UI listener's `http://ADDR`), `--database URL` (`sqlite://PATH`, default
//! `sqlite://opamp-server.db`, or `postgres://USER@HOST/DB` for several nodes), `--node-id
//! NAME` (this node's name in agent records; default `HOSTNAME:PORT`) and `--validate-config
//! CMD` (a shell command that gets each new config version on stdin; non-zero refuses it).

mod api;
mod control;
mod db;
mod desired;
mod packages;
mod rollout;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opamp::async_trait;
use opamp::proto::{
    AgentToServer, CommandType, InstanceUid, PackagesAvailable, ServerToAgent, ServerToAgentCommand,
};
use opamp::server::{
    Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
    SharedMessage, Transport,
};

use opamp::server::csr::CertificateAuthority;

use crate::control::Control;
use crate::packages::{PackageLimits, Repo};
use crate::store::{Fleet, hex};

const USAGE: &str = "usage: opamp-reference-server [--opamp-addr ADDR] [--ui-addr ADDR] \
                     [--ui-allowed-host NAME[:PORT]]... \
                     [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]] \
                     [--ca-cert PEM --ca-key PEM] \
                     [--package-signing-key FILE] [--package-url-base URL] \
                     [--database sqlite://PATH | --database postgres://USER@HOST/DB] \
                     [--node-id NAME] [--validate-config CMD]";

struct Args {
    opamp_addr: SocketAddr,
    ui_addr: SocketAddr,
    /// Extra `Host` names the UI answers to (`--ui-allowed-host`, repeatable).
    ui_allowed_hosts: Vec<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_client_ca: Option<String>,
    /// The CA that signs agents' CSRs (`--ca-cert`, `--ca-key`).
    ca_cert: Option<String>,
    ca_key: Option<String>,
    package_signing_key: Option<String>,
    package_url_base: Option<String>,
    database: String,
    node_id: Option<String>,
    validate_config: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        opamp_addr: SocketAddr::from(([127, 0, 0, 1], 4320)),
        ui_addr: SocketAddr::from(([127, 0, 0, 1], 4321)),
        ui_allowed_hosts: Vec::new(),
        tls_cert: None,
        tls_key: None,
        tls_client_ca: None,
        ca_cert: None,
        ca_key: None,
        package_signing_key: None,
        package_url_base: None,
        database: "sqlite://opamp-server.db".into(),
        node_id: None,
        validate_config: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--opamp-addr" => {
                args.opamp_addr = value()?.parse().map_err(|e| format!("--opamp-addr: {e}"))?
            }
            "--ui-addr" => {
                args.ui_addr = value()?.parse().map_err(|e| format!("--ui-addr: {e}"))?
            }
            "--ui-allowed-host" => args.ui_allowed_hosts.push(value()?),
            "--tls-cert" => args.tls_cert = Some(value()?),
            "--tls-key" => args.tls_key = Some(value()?),
            "--tls-client-ca" => args.tls_client_ca = Some(value()?),
            "--ca-cert" => args.ca_cert = Some(value()?),
            "--ca-key" => args.ca_key = Some(value()?),
            "--package-signing-key" => args.package_signing_key = Some(value()?),
            "--package-url-base" => args.package_url_base = Some(value()?),
            "--database" => args.database = value()?,
            "--node-id" => args.node_id = Some(value()?),
            "--validate-config" => args.validate_config = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    if args.ca_cert.is_some() != args.ca_key.is_some() {
        return Err("--ca-cert and --ca-key go together".into());
    }
    Ok(args)
}

/// Shared state: the control plane (desired state, the store), the fleet connected here,
/// the package repository and a live connection per agent, to push configs and package
/// offers.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) control: Control,
    pub(crate) fleet: Fleet,
    pub(crate) packages: Repo,
    pub(crate) connections: Mutex<HashMap<InstanceUid, Connection>>,
    /// Agents that reconnected and whose drift baseline is to be read back from the store
    /// (bounded: when full, a baseline starts afresh at the agent's next APPLIED).
    restore_tx: tokio::sync::mpsc::Sender<InstanceUid>,
    /// Signs agents' CSRs (`--ca-cert`, `--ca-key`); `None`: CSRs are refused.
    ca: Option<CertificateAuthority>,
}

impl State {
    /// The state and the receiving end of its restore queue, for `restore_baselines`.
    fn new(control: Control, packages: Repo) -> (Self, tokio::sync::mpsc::Receiver<InstanceUid>) {
        let (restore_tx, restore_rx) = tokio::sync::mpsc::channel(100_000);
        let state = Self {
            control,
            fleet: Fleet::default(),
            packages,
            connections: Mutex::default(),
            restore_tx,
            ca: None,
        };
        (state, restore_rx)
    }

    /// The answer to a CSR (CSR-3..CSR-6): signed with the CA and offered back as the agent's
    /// client certificate for its current endpoint (auto-approved: every CSR that verifies,
    /// with the agent's own uid, CSR-9), else BAD_REQUEST with the reason.
    async fn answer_csr(&self, uid: InstanceUid, csr: &[u8]) -> ServerToAgent {
        use opamp::server::connection_settings::{ConnectionSettingsOffer, OpampSettings};
        let Some(ca) = &self.ca else {
            return opamp::server::bad_request("this server does not sign certificate requests");
        };
        let cert = match ca.sign(csr, uid) {
            Ok(cert) => cert,
            Err(e) => {
                tracing::warn!(%uid, "refused a CSR: {e}");
                return opamp::server::bad_request(e.to_string());
            }
        };
        let offers = ConnectionSettingsOffer::new()
            .opamp(OpampSettings::new().client_certificate(
                cert.cert,
                cert.private_key,
                cert.ca_cert,
            ))
            .build();
        let hash = hex(&offers.hash);
        match self.fleet.offer_connection_settings(uid, offers) {
            Ok(message) => {
                let _ = self
                    .control
                    .store
                    .record(
                        &db::Actor {
                            who: "csr".into(),
                            address: self.control.node.clone(),
                        },
                        "csr-signed",
                        &uid.to_string(),
                        &format!("offer hash {hash}"),
                    )
                    .await;
                message
            }
            Err(m) => opamp::server::bad_request(m),
        }
    }

    /// The package offer for `uid` (PKG-2: only to agents that accept packages), if a package
    /// set matches it.
    pub(crate) fn package_offer(&self, uid: InstanceUid) -> Option<PackagesAvailable> {
        if !self.packages.has_sets() || !self.fleet.accepts_packages(uid) {
            return None;
        }
        self.packages
            .offer_for(uid, |selector| self.fleet.package_target(uid, selector))
    }

    /// Pushes its package offer to every connected agent `selector` matches; returns them.
    /// Each offer carries the agent's own download token, so each is encoded for its agent.
    pub(crate) fn push_packages(&self, selector: &BTreeMap<String, String>) -> Vec<InstanceUid> {
        let targets = self.fleet.package_targets(selector);
        for uid in &targets {
            if let Some(offer) = self.package_offer(*uid) {
                self.push(
                    *uid,
                    ServerToAgent {
                        packages_available: Some(offer),
                        ..Default::default()
                    },
                );
            }
        }
        targets
    }
}

impl State {
    /// Pushes `message` to the agent now if it is connected (over plain HTTP it rides on the
    /// next poll response); otherwise it gets it when it next reports.
    pub(crate) fn push(&self, uid: InstanceUid, message: ServerToAgent) {
        let conn = store::lock(&self.connections).get(&uid).cloned();
        if let Some(conn) = conn {
            if let Err(e) = conn.send(message) {
                tracing::warn!(%uid, "push failed, the agent gets the config on its next report: {e}");
            }
        }
    }

    /// Like [`push`](Self::push), for a message encoded once for many agents.
    pub(crate) fn push_shared(&self, uid: InstanceUid, message: &SharedMessage) {
        let conn = store::lock(&self.connections).get(&uid).cloned();
        if let Some(conn) = conn {
            if let Err(e) = conn.send_shared(message) {
                tracing::warn!(%uid, "push failed, the agent gets the config on its next report: {e}");
            }
        }
    }
}

impl State {
    /// Closes every live connection (WebSocket close frame; plain-HTTP sessions end). Agents
    /// reconnect by themselves; the fleet benchmark uses this for its reconnect storm.
    pub(crate) fn disconnect_all(&self) -> usize {
        let conns: Vec<Connection> = store::lock(&self.connections).values().cloned().collect();
        for conn in &conns {
            conn.disconnect();
        }
        conns.len()
    }
}

impl State {
    /// Sends the Restart command to a connected agent that declared AcceptsRestartCommand.
    pub(crate) fn restart(&self, uid: InstanceUid) -> Result<(), String> {
        if !self.fleet.accepts_restart(uid) {
            return Err(format!(
                "agent {uid} is unknown or does not accept the Restart command"
            ));
        }
        let conn = store::lock(&self.connections).get(&uid).cloned();
        let conn = conn.ok_or_else(|| format!("agent {uid} is not connected"))?;
        let command = ServerToAgent {
            command: Some(ServerToAgentCommand {
                r#type: CommandType::Restart as i32,
            }),
            ..Default::default()
        };
        conn.send(command).map_err(|e| format!("agent {uid}: {e}"))
    }
}

#[cfg(test)]
impl State {
    /// A state on a new SQLite file in the temporary directory, for tests.
    pub(crate) async fn for_test(packages: Repo) -> Arc<State> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join("opamp-reference-server-unit-tests");
        let path = dir.join(format!(
            "{}-{}.db",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let store = db::Store::open(&format!("sqlite://{}", path.display()))
            .await
            .expect("a test database");
        let control = Control::new(store, "test-node".into(), None)
            .await
            .expect("the control plane");
        let (state, restore_rx) = State::new(control, packages);
        let state = Arc::new(state);
        tokio::spawn(state.clone().restore_baselines(restore_rx));
        state
    }
}

struct Callbacks(Arc<State>);

#[async_trait]
impl ServerCallbacks for Callbacks {
    async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
        // The reference server admits every agent; see the opamp-server docs to authenticate.
        ConnectionResponse::accept(Arc::new(AgentHandler {
            state: self.0.clone(),
            uid: std::sync::Mutex::new(None),
        }))
    }
}

/// One connection's callbacks (plain HTTP: one session's).
struct AgentHandler {
    state: Arc<State>,
    /// The uid this connection last spoke for: a switch (UID-7) releases the old one.
    uid: std::sync::Mutex<Option<InstanceUid>>,
}

impl AgentHandler {
    /// Forgets `uid`'s live connection if it is `conn`, and marks the agent disconnected.
    fn release(&self, uid: InstanceUid, conn: &Connection) {
        let mut conns = store::lock(&self.state.connections);
        if conns.get(&uid).is_some_and(|c| c.same_connection(conn)) {
            conns.remove(&uid);
            self.state.fleet.disconnected(uid);
        }
    }
}

#[async_trait]
impl ConnectionCallbacks for AgentHandler {
    async fn on_message(&self, conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        let uid = InstanceUid::try_from(&msg.instance_uid[..]).ok()?;
        let previous = store::lock(&self.uid).replace(uid);
        if let Some(old) = previous.filter(|old| *old != uid) {
            self.release(old, conn);
        }
        let known = {
            let mut conns = store::lock(&self.state.connections);
            let known = conns.get(&uid).is_some_and(|c| c.same_connection(conn));
            conns.insert(uid, conn.clone());
            known
        };
        if !known {
            // An agent this node does not hold: its drift baseline comes back from the store,
            // in a batch, after this message is answered (its reports it sends itself).
            let restore = !self.state.fleet.contains(uid);
            let transport = match conn.transport() {
                Transport::WebSocket => "websocket",
                _ => "http",
            };
            self.state
                .fleet
                .connected(uid, transport, conn.remote_addr().map(|a| a.to_string()));
            if restore && self.state.restore_tx.try_send(uid).is_err() {
                tracing::debug!(%uid, "restore queue full: the drift baseline starts afresh");
            }
        }
        let mut reply = self.state.fleet.report(uid, &msg);
        // The desired config: recomputed when the description changed (selectors and
        // templates see the attributes) or the desired state moved on since; only then is
        // the reply computed again.
        if self
            .state
            .refresh_offer(uid, msg.agent_description.is_some() || !known)
        {
            reply = self.state.fleet.pending_reply(uid);
        }
        // PKG-2: the offer rides on every reply; the session core drops it once the agent
        // reports its all-packages hash (and, over WebSocket, once it was sent).
        if let Some(offer) = self.state.package_offer(uid) {
            reply.get_or_insert_default().packages_available = Some(offer);
        }
        // CSR-2: a certificate request gets the signed certificate (or the refusal) at once.
        if let Some(csr) = opamp::server::csr::csr_of(&msg) {
            let answer = self.state.answer_csr(uid, csr).await;
            if answer.error_response.is_some() {
                return Some(answer);
            }
            reply.get_or_insert_default().connection_settings = answer.connection_settings;
        }
        reply
    }

    async fn on_connection_close(&self, conn: &Connection) {
        let last = *store::lock(&self.uid);
        if let Some(uid) = last {
            self.release(uid, conn);
        }
    }
}

/// `--package-signing-key`: a file holding the 32-byte Ed25519 seed as 64 hex digits.
fn read_seed(path: &str) -> Result<[u8; 32], String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--package-signing-key {path}: {e}"))?;
    let text = text.trim();
    let mut seed = [0u8; 32];
    let ok = text.len() == 64
        && text.is_ascii()
        && seed.iter_mut().enumerate().all(|(i, b)| {
            u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map(|v| *b = v)
                .is_ok()
        });
    if ok {
        Ok(seed)
    } else {
        Err(format!(
            "--package-signing-key {path}: expected a 32-byte Ed25519 seed as 64 hex digits"
        ))
    }
}

fn tls_config(
    args: &Args,
) -> Result<Option<Arc<rustls::ServerConfig>>, Box<dyn std::error::Error>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let identity = opamp::transport::tls::CertifiedKeyPem {
        cert_chain: std::fs::read(cert)?,
        private_key: std::fs::read(key)?,
    };
    let client_ca = args.tls_client_ca.as_ref().map(std::fs::read).transpose()?;
    Ok(Some(opamp::transport::tls::server_config(
        &identity,
        client_ca.as_deref(),
    )?))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };

    let ui = tokio::net::TcpListener::bind(args.ui_addr).await?;
    let ui_addr = ui.local_addr()?;
    let store = db::Store::open(&args.database)
        .await
        .map_err(|e| format!("--database {}: {e}", db::redact(&args.database)))?;
    let node = args.node_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".into());
        match args.opamp_addr.port() {
            // A port chosen by the system is not known yet, and differs at every start.
            0 => format!("{host}-{}", std::process::id()),
            port => format!("{host}:{port}"),
        }
    });
    println!(
        "database: {} (schema version {}, node {node})",
        store.description,
        store.schema_version().await?
    );
    let seed = match &args.package_signing_key {
        Some(path) => read_seed(path)?,
        // Generated once, kept in the database: every node and every restart signs with it.
        None => {
            let generated: [u8; 32] = rand::random();
            let stored = store
                .setting_or_insert("package_signing_seed", &generated)
                .await?;
            <[u8; 32]>::try_from(stored.as_slice())
                .map_err(|_| "the stored package signing seed is not 32 bytes")?
        }
    };
    let url_base = args
        .package_url_base
        .clone()
        .unwrap_or_else(|| format!("http://{ui_addr}"));
    let token_key = store
        .setting_or_insert("package_token_key", &rand::random::<[u8; 32]>())
        .await?;
    let token_key = <[u8; 32]>::try_from(token_key.as_slice())
        .map_err(|_| "the stored package token key is not 32 bytes")?;
    let repo = Repo::new(PackageLimits::default(), seed, url_base).with_token_key(token_key);
    let public_key = hex(&repo.public_key());
    println!(
        "package signing public key: {public_key} ({})",
        if args.package_signing_key.is_some() {
            "from --package-signing-key"
        } else {
            "generated at first start and kept in the database; agents: --accept-packages with it"
        }
    );
    tracing::info!(%public_key, "package signing key");
    let control = Control::new(store, node, args.validate_config.clone()).await?;
    let (mut state, restore_rx) = State::new(control, repo);
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        let read = |p: &String| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
        state.ca = Some(
            CertificateAuthority::from_pem(&read(cert)?, &read(key)?)
                .map_err(|e| format!("--ca-cert/--ca-key: {e}"))?,
        );
    }
    let signs = state.ca.is_some();
    let state = Arc::new(state);
    state.load_packages().await?;
    tokio::spawn(state.clone().restore_baselines(restore_rx));
    tokio::spawn(state.clone().write_behind());
    tokio::spawn(state.clone().follow());
    tokio::spawn(state.clone().drive_rollouts());
    let mut config = ServerConfig::builder().listen_addr(args.opamp_addr);
    if signs {
        // CSR-1: agents send CSRs only to a server that says it takes them.
        config = config.server_capabilities(
            opamp::server::DEFAULT_SERVER_CAPABILITIES
                | opamp::proto::ServerCapabilitySet::ACCEPTS_CONNECTION_SETTINGS_REQUEST,
        );
    }
    let tls = tls_config(&args)?;
    if let Some(tls) = tls.clone() {
        config = config.tls(tls);
    }
    let server = Server::bind(config.build()?, Arc::new(Callbacks(state.clone()))).await?;
    let scheme = if tls.is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let addr = server.local_addr();
    println!(
        "OpAMP endpoint: {}://{addr}/v1/opamp (WebSocket), {}://{addr}/v1/opamp (plain HTTP)",
        scheme.0, scheme.1
    );

    println!("web UI: http://{ui_addr}/");
    if !ui_addr.ip().is_loopback() && args.ui_allowed_hosts.is_empty() {
        println!(
            "web UI answers only to Host {ui_addr}: add --ui-allowed-host NAME for the names \
             operators use"
        );
    }
    let policy = api::HostPolicy::new(ui_addr, &args.ui_allowed_hosts);
    let api_state = state.clone();
    let ui_task = tokio::spawn(async move {
        let app =
            api::router(api_state, policy).into_make_service_with_connect_info::<SocketAddr>();
        if let Err(e) = axum::serve(ui, app).await {
            tracing::error!("UI server failed: {e}");
        }
    });

    shutdown_signal().await;
    println!("stopping");
    ui_task.abort();
    server.shutdown().await;
    // What the agents reported last, and that they left.
    state.flush().await;
    Ok(())
}

/// Ctrl-C or SIGTERM: both stop the server gracefully (Close frames to WebSocket agents,
/// requests in flight finished).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
