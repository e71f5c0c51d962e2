//! End to end against the workspace's own `opamp-server`, over both transports.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use opamp_client::OpampClient;
use opamp_proto::{
    AgentCapabilitySet, AgentConfigMap, AgentConfigObject, AgentRemoteConfig, AgentToServer,
    RemoteConfigStatus, RemoteConfigStatuses, ServerToAgent,
};
use opamp_server::{
    Connection, ConnectionCallbacks, ConnectionResponse, Server, ServerCallbacks, ServerConfig,
};
use tokio::sync::mpsc;

struct Fleet(mpsc::UnboundedSender<AgentToServer>);

#[async_trait]
impl ServerCallbacks for Fleet {
    async fn on_connecting(&self, _request: &http::request::Parts) -> ConnectionResponse {
        ConnectionResponse::accept(Arc::new(Agents(self.0.clone())))
    }
}

struct Agents(mpsc::UnboundedSender<AgentToServer>);

#[async_trait]
impl ConnectionCallbacks for Agents {
    async fn on_message(&self, _conn: &Connection, msg: AgentToServer) -> Option<ServerToAgent> {
        let first = msg.sequence_num == 0;
        let _ = self.0.send(msg);
        first.then(|| {
            let mut config = AgentConfigMap::default();
            config.config_map.insert(
                String::new(),
                AgentConfigObject {
                    body: Bytes::from_static(b"receivers: {}"),
                    content_type: "text/yaml".into(),
                    ..Default::default()
                },
            );
            ServerToAgent {
                remote_config: Some(AgentRemoteConfig {
                    config: Some(config),
                    config_hash: Bytes::from_static(b"h1"),
                }),
                ..Default::default()
            }
        })
    }
}

async fn round_trip(scheme: &str) {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let config = ServerConfig::builder()
        .listen_addr("127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap();
    let server = Server::bind(config, Arc::new(Fleet(tx))).await.unwrap();
    let addr = server.local_addr();
    let (cb, mut cbs) = Recorder::new();
    let client = OpampClient::start(
        settings(format!("{scheme}://{addr}/v1/opamp"))
            .with_capabilities(
                AgentCapabilitySet::REPORTS_STATUS
                    | AgentCapabilitySet::ACCEPTS_REMOTE_CONFIG
                    | AgentCapabilitySet::REPORTS_REMOTE_CONFIG,
            )
            .with_agent_description(description()),
        cb,
    )
    .unwrap();
    let first = recv(&mut seen).await;
    assert!(first.agent_description.is_some());
    let data = expect_cb(&mut cbs, |c| match c {
        Cb::Message(d) => Some(d.clone()),
        _ => None,
    })
    .await;
    let remote = data.remote_config.unwrap();
    assert_eq!(remote.config_hash, Bytes::from_static(b"h1"));
    // RC-5, RC-7: applied, with the hash echoed.
    let mut status = RemoteConfigStatus {
        last_remote_config_hash: remote.config_hash.clone(),
        ..Default::default()
    };
    status.set_status(RemoteConfigStatuses::Applied);
    client.set_remote_config_status(status.clone()).unwrap();
    loop {
        let m = recv(&mut seen).await;
        if m.remote_config_status.is_some() {
            assert_eq!(m.remote_config_status, Some(status));
            assert!(m.agent_description.is_none(), "CMP-1");
            break;
        }
    }
    client.stop().await.unwrap();
    loop {
        if recv(&mut seen).await.agent_disconnect.is_some() {
            break;
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_websocket_against_opamp_server() {
    round_trip("ws").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_plain_http_against_opamp_server() {
    round_trip("http").await;
}
