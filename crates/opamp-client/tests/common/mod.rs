//! Small loopback test servers and recording callbacks, shared by the socket tests.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::large_enum_variant
)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opamp_client::{
    BackoffPolicy, Callbacks, ConnectError, MessageData, OpampClient, SettingsRejected,
    StartSettings,
};
use opamp_proto::{
    AgentDescription, AgentToServer, AnyValue, EffectiveConfig, KeyValue, OpAmpConnectionSettings,
    ServerErrorResponse, ServerToAgent, ServerToAgentCommand, any_value,
};
use opamp_transport::tls::CertifiedKeyPem;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Every test waits at most this long for anything.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the callbacks saw.
#[derive(Debug)]
pub enum Cb {
    Connect,
    ConnectFailed(String, Option<(http::StatusCode, Option<Duration>)>),
    Error(ServerErrorResponse),
    Message(MessageData),
    Settings(OpAmpConnectionSettings),
    Command(ServerToAgentCommand),
}

/// Callbacks that report everything on a channel.
pub struct Recorder {
    pub tx: mpsc::UnboundedSender<Cb>,
    /// Set after start, for callbacks that call the client.
    pub client: OnceLock<OpampClient>,
    pub stop_on_connect: bool,
    pub effective_config: Mutex<Option<EffectiveConfig>>,
}

impl Recorder {
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Cb>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                tx,
                client: OnceLock::new(),
                stop_on_connect: false,
                effective_config: Mutex::new(None),
            }),
            rx,
        )
    }
}

#[async_trait]
impl Callbacks for Recorder {
    async fn on_connect(&self) {
        let _ = self.tx.send(Cb::Connect);
        if self.stop_on_connect {
            let client = self.client.get().expect("client set");
            // From inside a callback: must return at once, not deadlock.
            client.stop().await.unwrap();
        }
    }
    async fn on_connect_failed(&self, error: &ConnectError) {
        let status = match error {
            ConnectError::Status {
                status,
                retry_after,
            } => Some((*status, *retry_after)),
            _ => None,
        };
        let _ = self.tx.send(Cb::ConnectFailed(error.to_string(), status));
    }
    async fn on_error(&self, error: &ServerErrorResponse) {
        let _ = self.tx.send(Cb::Error(error.clone()));
    }
    async fn on_message(&self, data: MessageData) {
        let _ = self.tx.send(Cb::Message(data));
    }
    async fn on_opamp_connection_settings(
        &self,
        settings: &OpAmpConnectionSettings,
        _offer_hash: &[u8],
    ) -> Result<(), SettingsRejected> {
        let _ = self.tx.send(Cb::Settings(settings.clone()));
        Ok(())
    }
    async fn on_command(&self, command: &ServerToAgentCommand) {
        let _ = self.tx.send(Cb::Command(*command));
    }
    async fn get_effective_config(&self) -> Option<EffectiveConfig> {
        self.effective_config.lock().unwrap().clone()
    }
}

/// Waits for the next callback matching `f`, skipping others.
pub async fn expect_cb<T>(
    rx: &mut mpsc::UnboundedReceiver<Cb>,
    mut f: impl FnMut(&Cb) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let cb = rx.recv().await.expect("callbacks channel open");
            if let Some(t) = f(&cb) {
                return t;
            }
        }
    })
    .await
    .expect("timed out waiting for a callback")
}

/// Receives with the test timeout.
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out")
        .expect("channel open")
}

/// A fast backoff for socket tests.
pub fn fast_backoff() -> BackoffPolicy {
    BackoffPolicy::default()
        .with_initial_interval(Duration::from_millis(10))
        .with_max_interval(Duration::from_millis(50))
        .with_throttle_min_interval(Duration::from_millis(10))
}

pub fn settings(url: String) -> StartSettings {
    StartSettings::new(url)
        .with_backoff(fast_backoff())
        .with_jitter_seed(1)
        .with_connect_timeout(Duration::from_secs(5))
        .with_request_timeout(Duration::from_secs(5))
        .with_stop_timeout(Duration::from_secs(2))
}

pub fn description() -> AgentDescription {
    AgentDescription {
        identifying_attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue("test-agent".into())),
            }),
        }],
        non_identifying_attributes: vec![],
    }
}

pub fn ack(msg: &AgentToServer) -> ServerToAgent {
    ServerToAgent {
        instance_uid: msg.instance_uid.clone(),
        capabilities: 0x7f,
        ..Default::default()
    }
}

/// A remote config of `files` files, with `hash`.
pub fn config_offer(to: &AgentToServer, files: usize, hash: &'static [u8]) -> ServerToAgent {
    let mut map = opamp_proto::AgentConfigMap::default();
    for i in 0..files {
        map.config_map
            .insert(format!("f{i}"), opamp_proto::AgentConfigObject::default());
    }
    ServerToAgent {
        remote_config: Some(opamp_proto::AgentRemoteConfig {
            config: Some(map),
            config_hash: bytes::Bytes::from_static(hash),
        }),
        ..ack(to)
    }
}

/// A TCP listener on loopback; `handle(n, stream)` runs per accepted connection `n`.
pub async fn tcp_server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(usize, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(n, stream));
            n += 1;
        }
    });
    addr
}

/// A plain-HTTP server; `handle(n, request, body)` answers request number `n`.
pub async fn http_server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(usize, http::request::Parts, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let handle = Arc::new(handle);
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tcp_server(move |_, stream| {
        let handle = handle.clone();
        let count = count.clone();
        async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handle = handle.clone();
                let n = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    Ok::<_, std::convert::Infallible>(handle(n, parts, body).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

/// A 200 answer carrying `msg`.
pub fn ok(msg: &ServerToAgent) -> Response<Full<Bytes>> {
    use opamp_proto::Message;
    Response::builder()
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(msg.encode_to_vec())))
        .unwrap()
}

/// Decodes a plain-HTTP request body, gunzipping when needed.
pub fn decode_request(parts: &http::request::Parts, body: &Bytes) -> AgentToServer {
    use opamp_proto::Message;
    let body = if parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v == "gzip")
    {
        opamp_transport::gzip::decompress_limited(body, 1 << 20).unwrap()
    } else {
        body.clone()
    };
    AgentToServer::decode(body).unwrap()
}

/// A test CA, a server certificate for `localhost` and a client certificate it signed.
pub struct Pki {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub server: CertifiedKeyPem,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

pub fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &ca).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["agent".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

    Pki {
        ca_pem: ca.pem(),
        ca_key_pem,
        server: CertifiedKeyPem {
            cert_chain: server_cert.pem().into_bytes(),
            private_key: server_key.serialize_pem().into_bytes(),
        },
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}
