//! Server configuration with safe defaults.

use std::net::{Ipv4Addr, SocketAddr};
#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::Duration;

use opamp_proto::{DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_PATH, DEFAULT_PORT, ServerCapabilitySet};

use crate::error::ConfigError;

/// Default WebSocket read buffer: 2 KiB, allocated up front for every connection, so kept
/// small: a fleet is mostly idle sockets. Larger messages are read in 2 KiB steps.
pub const DEFAULT_WS_READ_BUFFER_SIZE: usize = 2 * 1024;
/// Default largest WebSocket frame the server writes: 8 KiB. Larger messages go out as
/// several frames of one message (RFC 6455 fragmentation), because the WebSocket layer keeps
/// a write buffer as large as the largest frame it ever wrote, for the life of the connection.
/// 8 KiB sends typical configs in one frame (one write) and caps that buffer for big ones.
pub const DEFAULT_WS_WRITE_FRAGMENT_SIZE: usize = 8 * 1024;
/// Default capacity of a WebSocket connection's outbound queue, in messages.
pub const DEFAULT_OUTBOUND_QUEUE_CAPACITY: usize = 16;
/// Default time after which an idle plain-HTTP session is forgotten (four 30 s poll intervals).
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit on one socket write (and on the close handshake) before the peer is dropped.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default minimum time between two `ReportFullState` requests to one agent (SEQ-2).
pub const DEFAULT_FULL_STATE_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Default limit on live plain-HTTP sessions: 100 000.
///
/// Each session costs a few KiB (its protocol core, connection handle and map entries), so
/// 100 000 of them stay within a few hundred MiB, while a fleet that size polling every 30 s
/// (HTTP-7) is already over 3 000 requests a second, about what one server instance takes.
/// Without a limit, a client posting fresh instance uids grows memory without bound.
pub const DEFAULT_MAX_HTTP_SESSIONS: usize = 100_000;
/// Default time a plain-HTTP request body has to arrive in full, from the end of its headers:
/// 30 s, which a 64 MiB body meets at about 2.2 MB/s. A client that sends slower gets 408.
pub const DEFAULT_HTTP_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of plain-HTTP sessions one source address may create at once: 1000 (see
/// [`ServerConfig::http_new_session_burst`]).
pub const DEFAULT_HTTP_NEW_SESSION_BURST: u32 = 1000;
/// Default number of plain-HTTP sessions one source address may create per second once its
/// burst is spent: 100 (see [`ServerConfig::http_new_session_rate`]).
pub const DEFAULT_HTTP_NEW_SESSION_RATE: u32 = 100;
/// Upper bound on every timeout of a [`ServerConfig`]: one day. Longer values are refused by
/// [`ServerConfigBuilder::build`] ([`ConfigError::TooLong`]): deadlines are computed as
/// `Instant + timeout`, which overflows (and panics) for values like [`Duration::MAX`].
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// The server capabilities advertised by default (CAP-3): every stable and Beta capability.
///
/// Offers the server did not advertise are stripped from outgoing messages (CAP-4), so a
/// server that never offers packages may narrow this set, and one that uses a Development
/// capability (e.g. `ACCEPTS_CONNECTION_SETTINGS_REQUEST`) must widen it.
pub const DEFAULT_SERVER_CAPABILITIES: ServerCapabilitySet = ServerCapabilitySet::ACCEPTS_STATUS
    .union(ServerCapabilitySet::OFFERS_REMOTE_CONFIG)
    .union(ServerCapabilitySet::ACCEPTS_EFFECTIVE_CONFIG)
    .union(ServerCapabilitySet::OFFERS_PACKAGES)
    .union(ServerCapabilitySet::ACCEPTS_PACKAGES_STATUS)
    .union(ServerCapabilitySet::OFFERS_CONNECTION_SETTINGS);

/// The protocol limits and transport settings of an OpAMP server: everything the
/// embeddable [`OpampService`](crate::OpampService) uses, and nothing it would ignore.
///
/// Where the standalone [`Server`](crate::Server) listens, its path, TLS and a tower layer
/// are the [`ServerBuilder`](crate::ServerBuilder)'s (the tonic split: the service's
/// settings here, the listener's there).
///
/// Build one with [`ServerConfig::builder`]; [`ServerConfig::default`] holds the defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    max_message_size: usize,
    max_message_elements: usize,
    ws_read_buffer_size: usize,
    ws_write_fragment_size: usize,
    outbound_queue_capacity: usize,
    server_capabilities: ServerCapabilitySet,
    http_idle_timeout: Duration,
    write_timeout: Duration,
    full_state_min_interval: Duration,
    max_http_sessions: usize,
    http_body_timeout: Duration,
    limits: ConnectionLimits,
    // --- Agent identity and admission (UID-8, plain-HTTP session table) ---
    remote_addr_from: Option<RemoteAddrFn>,
    http_new_session_burst: u32,
    http_new_session_rate: u32,
}

/// Finds the peer's address in a request's extensions; see
/// [`ServerConfigBuilder::remote_addr_from`].
pub type RemoteAddrFn = fn(&http::Extensions) -> Option<SocketAddr>;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_message_elements: opamp_proto::DEFAULT_MAX_MESSAGE_ELEMENTS,
            ws_read_buffer_size: DEFAULT_WS_READ_BUFFER_SIZE,
            ws_write_fragment_size: DEFAULT_WS_WRITE_FRAGMENT_SIZE,
            outbound_queue_capacity: DEFAULT_OUTBOUND_QUEUE_CAPACITY,
            server_capabilities: DEFAULT_SERVER_CAPABILITIES,
            http_idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            full_state_min_interval: DEFAULT_FULL_STATE_MIN_INTERVAL,
            max_http_sessions: DEFAULT_MAX_HTTP_SESSIONS,
            http_body_timeout: DEFAULT_HTTP_BODY_TIMEOUT,
            limits: ConnectionLimits::default(),
            remote_addr_from: None,
            http_new_session_burst: DEFAULT_HTTP_NEW_SESSION_BURST,
            http_new_session_rate: DEFAULT_HTTP_NEW_SESSION_RATE,
        }
    }
}

impl ServerConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> ServerConfigBuilder {
        ServerConfigBuilder {
            config: Self::default(),
        }
    }

    /// Limit on one incoming message, WebSocket (header included, WS-8) or plain-HTTP body
    /// after decompression (HTTP-14), and on outgoing ones (WS-11, HTTP-16). Default 64 MiB.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// Limit on the elements an incoming message decodes into (attributes, health
    /// components, config files, ...; [`opamp_proto::elements`]), checked before it is
    /// decoded: a message within the size limit can decode into ten times its size. A message
    /// past it is answered as malformed (`BAD_REQUEST` over WebSocket, 400 over plain HTTP).
    /// Default 262,144 ([`opamp_proto::DEFAULT_MAX_MESSAGE_ELEMENTS`]).
    pub fn max_message_elements(&self) -> usize {
        self.max_message_elements
    }

    /// Initial read buffer of each WebSocket connection (default 2 KiB).
    pub fn ws_read_buffer_size(&self) -> usize {
        self.ws_read_buffer_size
    }

    /// Largest WebSocket frame written; larger messages are fragmented (default 8 KiB).
    pub fn ws_write_fragment_size(&self) -> usize {
        self.ws_write_fragment_size
    }

    /// Capacity of each WebSocket connection's outbound queue (default 16 messages).
    pub fn outbound_queue_capacity(&self) -> usize {
        self.outbound_queue_capacity
    }

    /// Capabilities the server advertises (CAP-3); `ACCEPTS_STATUS` is always included.
    pub fn server_capabilities(&self) -> ServerCapabilitySet {
        self.server_capabilities
    }

    /// Time without a poll after which a plain-HTTP session is forgotten (default 120 s).
    pub fn http_idle_timeout(&self) -> Duration {
        self.http_idle_timeout
    }

    /// Limit on one socket write or close handshake (default 10 s).
    pub fn write_timeout(&self) -> Duration {
        self.write_timeout
    }

    /// Minimum time between two `ReportFullState` requests to one agent (default 30 s, SEQ-2).
    pub fn full_state_min_interval(&self) -> Duration {
        self.full_state_min_interval
    }

    /// Limit on live plain-HTTP sessions (default 100 000, [`DEFAULT_MAX_HTTP_SESSIONS`]).
    /// When it is reached, a request that would start a new session takes the place of the
    /// oldest session that has served one poll only (a stranger that never came back);
    /// sessions that served two polls or more (known agents) are never displaced, and only
    /// when all sessions are known does a new one get 503 with `Retry-After` (THR-5). New
    /// sessions are also rate-limited per source address
    /// ([`http_new_session_burst`](Self::http_new_session_burst)), so that a flood of
    /// strangers from a few addresses cannot push out other new agents before their
    /// second poll.
    pub fn max_http_sessions(&self) -> usize {
        self.max_http_sessions
    }

    /// Time a plain-HTTP request body has to arrive in full; a slower one gets 408 (default
    /// 30 s, [`DEFAULT_HTTP_BODY_TIMEOUT`]).
    pub fn http_body_timeout(&self) -> Duration {
        self.http_body_timeout
    }

    /// Liveness timers and resource limits of connections (see [`ConnectionLimits`]).
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// How the embeddable service finds the peer's address in a request's extensions, if
    /// set (see [`ServerConfigBuilder::remote_addr_from`]).
    pub fn remote_addr_from(&self) -> Option<RemoteAddrFn> {
        self.remote_addr_from
    }

    /// New plain-HTTP sessions one source address (IP, IPv6 /64) may create at once
    /// (default 1000, [`DEFAULT_HTTP_NEW_SESSION_BURST`]); beyond it and
    /// [`http_new_session_rate`](Self::http_new_session_rate), a request that would create
    /// a session gets 429 with `Retry-After` (THR-5). Polls of existing sessions are never
    /// limited. How sessions are admitted when the table is full: see
    /// [`max_http_sessions`](Self::max_http_sessions).
    pub fn http_new_session_burst(&self) -> u32 {
        self.http_new_session_burst
    }

    /// New plain-HTTP sessions per second one source address may create once its burst is
    /// spent (default 100, [`DEFAULT_HTTP_NEW_SESSION_RATE`]).
    pub fn http_new_session_rate(&self) -> u32 {
        self.http_new_session_rate
    }
}

/// Builds a [`ServerConfig`]; every setter has a safe default.
#[derive(Debug, Clone)]
pub struct ServerConfigBuilder {
    config: ServerConfig,
}

impl From<ServerConfig> for ServerConfigBuilder {
    /// A builder starting from `config`.
    fn from(config: ServerConfig) -> Self {
        Self { config }
    }
}

/// The address the standalone server binds by default: `0.0.0.0:4320` (GEN-3).
pub const DEFAULT_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT);

/// The URL path the standalone server answers on by default: `/v1/opamp` (GEN-2).
pub const DEFAULT_SERVER_PATH: &str = DEFAULT_PATH;

impl ServerConfigBuilder {
    /// A standalone server with these settings, listening on `addr`: shorthand for
    /// [`Server::builder()`](crate::Server::builder)`.config(..).listen(addr)`; the rest of
    /// the chain sets the [`ServerBuilder`](crate::ServerBuilder).
    #[cfg(feature = "tokio")]
    pub fn listen_addr(self, addr: SocketAddr) -> crate::ServerBuilder {
        crate::ServerBuilder::from_config(self).listen(addr)
    }

    /// A standalone server with these settings, answering on `path`: see
    /// [`ServerBuilder::path`](crate::ServerBuilder::path).
    #[cfg(feature = "tokio")]
    pub fn path(self, path: impl Into<String>) -> crate::ServerBuilder {
        crate::ServerBuilder::from_config(self).path(path)
    }

    /// Sets the message size limit in bytes (WS-8, HTTP-13); must be at least 1.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// Sets the limit on the elements of an incoming message
    /// ([`ServerConfig::max_message_elements`]); must be at least 1.
    pub fn max_message_elements(mut self, elements: usize) -> Self {
        self.config.max_message_elements = elements;
        self
    }

    /// Sets the initial WebSocket read buffer in bytes; must be at least 64.
    pub fn ws_read_buffer_size(mut self, bytes: usize) -> Self {
        self.config.ws_read_buffer_size = bytes;
        self
    }

    /// Sets the outbound queue capacity per WebSocket connection; must be at least 1.
    pub fn outbound_queue_capacity(mut self, messages: usize) -> Self {
        self.config.outbound_queue_capacity = messages;
        self
    }

    /// Sets the advertised server capabilities; `ACCEPTS_STATUS` is added (CAP-3) and bits
    /// this version does not define are dropped (CAP-5).
    pub fn server_capabilities(mut self, capabilities: ServerCapabilitySet) -> Self {
        self.config.server_capabilities = capabilities | ServerCapabilitySet::ACCEPTS_STATUS;
        self
    }

    /// Sets the largest WebSocket frame the server writes (at least 64 bytes); larger
    /// messages are sent as several frames of one message. Larger values mean fewer frames
    /// per big message but a larger write buffer kept per connection after one is sent.
    pub fn ws_write_fragment_size(mut self, bytes: usize) -> Self {
        self.config.ws_write_fragment_size = bytes;
        self
    }

    /// Sets the plain-HTTP session idle timeout; must be non-zero and at most
    /// [`MAX_TIMEOUT`]. The standalone server
    /// also keeps an idle keep-alive connection open this long (it should exceed the agents'
    /// polling interval, 30 s by default, HTTP-7).
    pub fn http_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.http_idle_timeout = timeout;
        self
    }

    /// Sets the socket write timeout; must be non-zero and at most [`MAX_TIMEOUT`].
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// Sets the limit on live plain-HTTP sessions; must be non-zero. Sessions idle for longer
    /// than [`http_idle_timeout`](Self::http_idle_timeout) or ended count until the
    /// periodic sweep forgets them.
    pub fn max_http_sessions(mut self, sessions: usize) -> Self {
        self.config.max_http_sessions = sessions;
        self
    }

    /// Sets the time a plain-HTTP request body has to arrive in full, counted from the end of
    /// its headers; must be non-zero and at most [`MAX_TIMEOUT`]. A body that takes longer is
    /// answered with 408 Request Timeout. It bounds what a client that trickles its body
    /// holds (a task and up to [`max_message_size`](Self::max_message_size) of buffer); a
    /// graceful stop does not wait for it.
    pub fn http_body_timeout(mut self, timeout: Duration) -> Self {
        self.config.http_body_timeout = timeout;
        self
    }

    /// Sets the minimum time between two `ReportFullState` requests to one agent.
    pub fn full_state_min_interval(mut self, interval: Duration) -> Self {
        self.config.full_state_min_interval = interval;
        self
    }

    /// Sets the liveness timers and resource limits of connections (see [`ConnectionLimits`]).
    pub fn limits(mut self, limits: ConnectionLimits) -> Self {
        self.config.limits = limits;
        self
    }

    /// A standalone server with these settings, serving TLS: see
    /// [`ServerBuilder::tls`](crate::ServerBuilder::tls).
    #[cfg(feature = "tls")]
    pub fn tls(self, tls: Arc<rustls::ServerConfig>) -> crate::ServerBuilder {
        crate::ServerBuilder::from_config(self).tls(tls)
    }

    /// Sets how [`OpampService`](crate::OpampService) finds the peer's address (what
    /// [`Connection::remote_addr`](crate::Connection::remote_addr) returns) in a request's
    /// extensions, for stacks that store it under their own type. Without it (or when it
    /// returns `None`) the service takes a [`SocketAddr`] extension, as the standalone
    /// server inserts. With axum's `into_make_service_with_connect_info::<SocketAddr>()`:
    ///
    /// ```
    /// # use std::net::SocketAddr;
    /// use axum::extract::ConnectInfo;
    ///
    /// let config = opamp_server::ServerConfig::builder()
    ///     .remote_addr_from(|ext| ext.get::<ConnectInfo<SocketAddr>>().map(|info| info.0))
    ///     .build()?;
    /// # Ok::<(), opamp_server::ConfigError>(())
    /// ```
    pub fn remote_addr_from(mut self, find: RemoteAddrFn) -> Self {
        self.config.remote_addr_from = Some(find);
        self
    }

    /// Sets how many plain-HTTP sessions one source address may create at once; must be
    /// non-zero. Agents behind one NAT address share it: size it for the largest group
    /// that starts (or re-registers after a server restart) together.
    pub fn http_new_session_burst(mut self, sessions: u32) -> Self {
        self.config.http_new_session_burst = sessions;
        self
    }

    /// Sets how many plain-HTTP sessions per second one source address may create once its
    /// burst is spent; must be non-zero.
    pub fn http_new_session_rate(mut self, per_second: u32) -> Self {
        self.config.http_new_session_rate = per_second;
        self
    }

    /// Checks the values and returns the configuration.
    pub fn build(self) -> Result<ServerConfig, ConfigError> {
        let c = self.config;
        if c.max_message_size == 0 {
            return Err(ConfigError::Zero("max_message_size"));
        }
        if c.max_message_elements == 0 {
            return Err(ConfigError::Zero("max_message_elements"));
        }
        if c.outbound_queue_capacity == 0 {
            return Err(ConfigError::Zero("outbound_queue_capacity"));
        }
        if c.http_idle_timeout.is_zero() {
            return Err(ConfigError::Zero("http_idle_timeout"));
        }
        if c.write_timeout.is_zero() {
            return Err(ConfigError::Zero("write_timeout"));
        }
        if c.http_body_timeout.is_zero() {
            return Err(ConfigError::Zero("http_body_timeout"));
        }
        if c.max_http_sessions == 0 {
            return Err(ConfigError::Zero("max_http_sessions"));
        }
        if c.http_new_session_burst == 0 {
            return Err(ConfigError::Zero("http_new_session_burst"));
        }
        if c.http_new_session_rate == 0 {
            return Err(ConfigError::Zero("http_new_session_rate"));
        }
        for (name, value) in [
            ("http_idle_timeout", c.http_idle_timeout),
            ("write_timeout", c.write_timeout),
            ("http_body_timeout", c.http_body_timeout),
        ] {
            if value > MAX_TIMEOUT {
                return Err(ConfigError::TooLong {
                    name,
                    max: MAX_TIMEOUT,
                });
            }
        }
        c.limits.validate()?;
        if c.ws_read_buffer_size < 64 {
            return Err(ConfigError::ReadBufferTooSmall(c.ws_read_buffer_size));
        }
        if c.ws_write_fragment_size < 64 {
            return Err(ConfigError::FragmentTooSmall(c.ws_write_fragment_size));
        }
        Ok(ServerConfig {
            server_capabilities: ServerCapabilitySet::from_bits_truncate(
                c.server_capabilities.bits(),
            ) | ServerCapabilitySet::ACCEPTS_STATUS,
            ..c
        })
    }
}

// ---- Liveness and resource limits of connections ----

/// Default factor between an agent's heartbeat interval and the read-idle timeout of its
/// WebSocket: 3, so that two lost heartbeats are forgiven and a third closes the connection.
pub const DEFAULT_HEARTBEAT_TIMEOUT_FACTOR: u32 = 3;
/// Default heartbeat interval assumed for an agent that reports heartbeats (HB-1) without the
/// server having offered one: 30 s, the spec's default (WS-14).
pub const DEFAULT_AGENT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Default floor of the WebSocket read-idle timeout: 30 s, so that a tiny offered heartbeat
/// interval (1 s) does not close agents at the first hiccup of the network.
pub const DEFAULT_IDLE_TIMEOUT_FLOOR: Duration = Duration::from_secs(30);
/// Default interval of the server's WebSocket pings to agents that send no heartbeats:
/// 30 s, the spec's heartbeat default. Agents that send heartbeats are pinged only when a
/// heartbeat is overdue (see [`ConnectionLimits`]).
pub const DEFAULT_WS_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default time a new connection has for its first message: 15 s. A WebSocket that sends no
/// message within it after the upgrade is closed (1008); a TCP connection of the standalone
/// server that sends no complete request head within it is dropped. Agents send their first
/// message at once, so 15 s leaves room for slow links.
pub const DEFAULT_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default least average pace of a WebSocket message or plain-HTTP body in progress, once
/// its grace time passed: 256 KiB/s (2 Mbit/s). See [`ConnectionLimits::min_read_rate`].
pub const DEFAULT_MIN_READ_RATE: u64 = 256 * 1024;
/// Default grace time of a message in progress before its pace counts: 10 s.
pub const DEFAULT_READ_GRACE: Duration = Duration::from_secs(10);
/// Default budget for the bytes of all incomplete WebSocket messages and plain-HTTP bodies
/// together: 256 MiB, four messages of the default 64 MiB limit at once.
pub const DEFAULT_MAX_INCOMPLETE_BYTES: usize = 256 * 1024 * 1024;
/// Messages up to this size may use a reserve of a quarter of the incomplete-bytes budget
/// beyond it: 64 KiB. Heartbeats and status reports of good agents therefore get through
/// while large stalled messages hold the budget, and memory stays bounded by 1.25 x the
/// budget even when many connections hold small partial messages.
pub const BUDGET_EXEMPT_MESSAGE_SIZE: usize = 64 * 1024;
/// File descriptors kept out of the standalone server's connection limit
/// (`ServerBuilder::max_connections`) when it is derived from
/// the process limit: 64 (the listener, logs, the embedder's own sockets and files).
pub const FD_RESERVE: usize = 64;

/// Liveness timers and resource limits of the server's connections (part of a
/// [`ServerConfig`], set with [`ServerConfigBuilder::limits`]).
///
/// - **Read-idle timeout** (WebSocket): an agent that reports heartbeats (HB-1, HB-7) must
///   send something within `heartbeat_timeout_factor` x its heartbeat interval (the one the
///   server offered in `connection_settings.opamp.heartbeat_interval_seconds`, else
///   [`DEFAULT_AGENT_HEARTBEAT_INTERVAL`]), at least `idle_timeout_floor`. It is pinged
///   only once a heartbeat is overdue (after 2/3 of that timeout in silence), so an agent
///   whose local heartbeat interval is longer than the server assumes is kept while it
///   answers (WS-14). An agent without heartbeats (or offered interval 0) is sent a
///   WebSocket Ping after each `ws_ping_interval` of read silence and must answer within
///   `heartbeat_timeout_factor` x that interval (its Pong counts as traffic). With pings off
///   (`ws_ping_interval` `None`), heartbeating agents are closed at their idle timeout and
///   agents without heartbeats have none. Expiry closes with 1001 (Going Away).
///   Plain-HTTP sessions expire after [`ServerConfig::http_idle_timeout`] without a poll.
/// - **First message**: see [`DEFAULT_FIRST_MESSAGE_TIMEOUT`]; closes with 1008.
/// - **Connection limit** (standalone server only, so set on its `ServerBuilder`, not
///   here): at `max_connections` open TCP connections the
///   server closes the oldest connection that never delivered an OpAMP message (a WebSocket
///   before its first message: 1013; plain HTTP before its first answered request) to admit
///   the new one; when every connection is a real agent, the new one is closed at once.
/// - **Message pace** (both transports): a message in progress must have arrived, on
///   average since its first byte, at `min_read_rate` bytes/s once `read_grace` passed, i.e.
///   complete before `first byte + read_grace + received / min_read_rate`, and no gap
///   between its bytes may last longer than `read_grace` (a peer that sent most of a
///   message fast cannot hold the rest back on that credit). A WebSocket that falls behind
///   is closed with 1008; a plain-HTTP body gets 408.
/// - **Incomplete-bytes budget** (both transports): bytes of incomplete messages and bodies
///   count towards `max_incomplete_bytes` (a plain-HTTP body with a `Content-Length` counts
///   its whole length from its head on, until it is answered). Past it, a message that
///   needs more is refused (one up to [`BUDGET_EXEMPT_MESSAGE_SIZE`] only past 1.25 x the
///   budget): a WebSocket is closed with 1013 (Try Again Later), a plain-HTTP request gets
///   503 with `Retry-After: 30` (THR-5).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionLimits {
    heartbeat_timeout_factor: u32,
    idle_timeout_floor: Duration,
    ws_ping_interval: Option<Duration>,
    first_message_timeout: Duration,
    min_read_rate: u64,
    read_grace: Duration,
    max_incomplete_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            heartbeat_timeout_factor: DEFAULT_HEARTBEAT_TIMEOUT_FACTOR,
            idle_timeout_floor: DEFAULT_IDLE_TIMEOUT_FLOOR,
            ws_ping_interval: Some(DEFAULT_WS_PING_INTERVAL),
            first_message_timeout: DEFAULT_FIRST_MESSAGE_TIMEOUT,
            min_read_rate: DEFAULT_MIN_READ_RATE,
            read_grace: DEFAULT_READ_GRACE,
            max_incomplete_bytes: DEFAULT_MAX_INCOMPLETE_BYTES,
        }
    }
}

impl ConnectionLimits {
    /// Read-idle timeout as a multiple of the heartbeat (or ping) interval (default 3,
    /// [`DEFAULT_HEARTBEAT_TIMEOUT_FACTOR`]).
    pub fn heartbeat_timeout_factor(&self) -> u32 {
        self.heartbeat_timeout_factor
    }

    /// Least read-idle timeout (default 30 s, [`DEFAULT_IDLE_TIMEOUT_FLOOR`]).
    pub fn idle_timeout_floor(&self) -> Duration {
        self.idle_timeout_floor
    }

    /// Interval of WebSocket pings to agents without heartbeats; `None` when off (default
    /// 30 s, [`DEFAULT_WS_PING_INTERVAL`]).
    pub fn ws_ping_interval(&self) -> Option<Duration> {
        self.ws_ping_interval
    }

    /// Time a new connection has for its first message (default 15 s,
    /// [`DEFAULT_FIRST_MESSAGE_TIMEOUT`]).
    pub fn first_message_timeout(&self) -> Duration {
        self.first_message_timeout
    }

    /// Least average pace of a message in progress, in bytes per second (default 256 KiB/s,
    /// [`DEFAULT_MIN_READ_RATE`]).
    pub fn min_read_rate(&self) -> u64 {
        self.min_read_rate
    }

    /// Grace time of a message in progress before its pace counts (default 10 s,
    /// [`DEFAULT_READ_GRACE`]).
    pub fn read_grace(&self) -> Duration {
        self.read_grace
    }

    /// Budget for the bytes of all incomplete messages and bodies (default 256 MiB,
    /// [`DEFAULT_MAX_INCOMPLETE_BYTES`]).
    pub fn max_incomplete_bytes(&self) -> usize {
        self.max_incomplete_bytes
    }

    /// Sets the read-idle factor; must be at least 1.
    pub fn with_heartbeat_timeout_factor(mut self, factor: u32) -> Self {
        self.heartbeat_timeout_factor = factor;
        self
    }

    /// Sets the least read-idle timeout; non-zero, at most [`MAX_TIMEOUT`].
    pub fn with_idle_timeout_floor(mut self, floor: Duration) -> Self {
        self.idle_timeout_floor = floor;
        self
    }

    /// Sets the ping interval for agents without heartbeats (`None`: no pings at all, and
    /// no idle timeout for agents without heartbeats); non-zero, at most [`MAX_TIMEOUT`].
    pub fn with_ws_ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.ws_ping_interval = interval;
        self
    }

    /// Sets the first-message deadline; non-zero, at most [`MAX_TIMEOUT`].
    pub fn with_first_message_timeout(mut self, timeout: Duration) -> Self {
        self.first_message_timeout = timeout;
        self
    }

    /// Sets the least pace of a message in progress, in bytes per second; must be non-zero.
    pub fn with_min_read_rate(mut self, bytes_per_second: u64) -> Self {
        self.min_read_rate = bytes_per_second;
        self
    }

    /// Sets the grace time of a message in progress; at most [`MAX_TIMEOUT`].
    pub fn with_read_grace(mut self, grace: Duration) -> Self {
        self.read_grace = grace;
        self
    }

    /// Sets the budget for bytes of incomplete messages and bodies; must be non-zero.
    pub fn with_max_incomplete_bytes(mut self, bytes: usize) -> Self {
        self.max_incomplete_bytes = bytes;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_timeout_factor == 0 {
            return Err(ConfigError::Zero("heartbeat_timeout_factor"));
        }
        if self.min_read_rate == 0 {
            return Err(ConfigError::Zero("min_read_rate"));
        }
        if self.max_incomplete_bytes == 0 {
            return Err(ConfigError::Zero("max_incomplete_bytes"));
        }
        let mut timeouts = vec![
            ("idle_timeout_floor", self.idle_timeout_floor),
            ("first_message_timeout", self.first_message_timeout),
        ];
        if let Some(ping) = self.ws_ping_interval {
            timeouts.push(("ws_ping_interval", ping));
        }
        for (name, value) in timeouts {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
            if value > MAX_TIMEOUT {
                return Err(ConfigError::TooLong {
                    name,
                    max: MAX_TIMEOUT,
                });
            }
        }
        if self.read_grace > MAX_TIMEOUT {
            return Err(ConfigError::TooLong {
                name: "read_grace",
                max: MAX_TIMEOUT,
            });
        }
        Ok(())
    }

    // Pure arithmetic, tested without the drivers; the session core's `ws_liveness` uses it.
    /// The WebSocket read-idle timeout of an agent: `heartbeat` is its heartbeat interval
    /// (`None` when it sends no heartbeats). `None`: no idle timeout.
    pub(crate) fn ws_idle_timeout(&self, heartbeat: Option<Duration>) -> Option<Duration> {
        let interval = heartbeat.or(self.ws_ping_interval)?;
        Some(
            interval
                .saturating_mul(self.heartbeat_timeout_factor)
                .max(self.idle_timeout_floor)
                .min(MAX_TIMEOUT),
        )
    }

    #[cfg(feature = "tokio")]
    /// The time by which a message in progress must be complete or have made progress:
    /// `received` bytes arrived since its first byte at `started`, the latest at
    /// `last_progress`. The average pace bounds the whole message; the gap bound stops a
    /// peer that sent most of a message fast from holding the rest back on that credit.
    pub(crate) fn message_deadline(
        &self,
        started: tokio::time::Instant,
        received: usize,
        last_progress: tokio::time::Instant,
    ) -> tokio::time::Instant {
        let pace = Duration::from_secs_f64(received as f64 / self.min_read_rate as f64);
        let average = started + self.read_grace + pace.min(MAX_TIMEOUT);
        average.min(last_progress.max(started) + self.read_grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        let c = ServerConfig::default();
        assert_eq!(DEFAULT_LISTEN_ADDR.port(), 4320, "GEN-3");
        assert_eq!(DEFAULT_SERVER_PATH, "/v1/opamp", "GEN-2");
        assert_eq!(c.max_message_size(), 64 * 1024 * 1024, "WS-8, HTTP-13");
        assert!(c.ws_read_buffer_size() <= 4096);
        assert_eq!(c.outbound_queue_capacity(), 16);
        assert_eq!(c.max_http_sessions(), DEFAULT_MAX_HTTP_SESSIONS);
        assert_eq!(c.http_body_timeout(), DEFAULT_HTTP_BODY_TIMEOUT);
        assert!(
            c.server_capabilities()
                .contains(ServerCapabilitySet::ACCEPTS_STATUS)
        );
    }

    #[test]
    fn builder_rejects_bad_values() {
        assert!(matches!(
            ServerConfig::builder().outbound_queue_capacity(0).build(),
            Err(ConfigError::Zero("outbound_queue_capacity"))
        ));
        assert!(matches!(
            ServerConfig::builder().ws_read_buffer_size(1).build(),
            Err(ConfigError::ReadBufferTooSmall(1))
        ));
        let c = ServerConfig::builder()
            .server_capabilities(ServerCapabilitySet::OFFERS_REMOTE_CONFIG)
            .build()
            .unwrap();
        assert_eq!(
            c.server_capabilities(),
            ServerCapabilitySet::OFFERS_REMOTE_CONFIG | ServerCapabilitySet::ACCEPTS_STATUS,
            "CAP-3: AcceptsStatus is always set"
        );
    }

    #[test]
    fn timeouts_over_one_day_are_refused() {
        // Review finding 9: hyper computes `Instant + header_read_timeout` (our idle timeout)
        // for every connection, which panics for Duration::MAX.
        type Set = fn(ServerConfigBuilder, Duration) -> ServerConfigBuilder;
        let setters: [(&str, Set); 3] = [
            ("http_idle_timeout", ServerConfigBuilder::http_idle_timeout),
            ("write_timeout", ServerConfigBuilder::write_timeout),
            ("http_body_timeout", ServerConfigBuilder::http_body_timeout),
        ];
        for (name, set) in setters {
            for too_long in [Duration::MAX, MAX_TIMEOUT + Duration::from_nanos(1)] {
                assert_eq!(
                    set(ServerConfig::builder(), too_long).build().unwrap_err(),
                    ConfigError::TooLong {
                        name,
                        max: MAX_TIMEOUT
                    },
                    "{name}"
                );
            }
            assert!(set(ServerConfig::builder(), MAX_TIMEOUT).build().is_ok());
            assert_eq!(
                set(ServerConfig::builder(), Duration::ZERO)
                    .build()
                    .unwrap_err(),
                ConfigError::Zero(name)
            );
        }
        assert_eq!(
            ServerConfig::builder()
                .max_http_sessions(0)
                .build()
                .unwrap_err(),
            ConfigError::Zero("max_http_sessions")
        );
    }

    #[test]
    fn connection_limits_defaults_and_bounds() {
        let l = ConnectionLimits::default();
        assert_eq!(l.heartbeat_timeout_factor(), 3);
        assert_eq!(l.first_message_timeout(), Duration::from_secs(15));
        assert_eq!(l.ws_ping_interval(), Some(Duration::from_secs(30)));
        // HB-7: 3 x the heartbeat, at least the floor; pings stand in for heartbeats.
        assert_eq!(
            l.ws_idle_timeout(Some(Duration::from_secs(30))),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            l.ws_idle_timeout(Some(Duration::from_secs(1))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(l.ws_idle_timeout(None), Some(Duration::from_secs(90)));
        assert_eq!(
            l.clone().with_ws_ping_interval(None).ws_idle_timeout(None),
            None
        );
        assert_eq!(
            l.ws_idle_timeout(Some(Duration::from_secs(u64::MAX / 2))),
            Some(MAX_TIMEOUT),
            "huge offers saturate"
        );
        let build = |l: ConnectionLimits| ServerConfig::builder().limits(l).build();
        for (limits, name) in [
            (
                l.clone().with_heartbeat_timeout_factor(0),
                "heartbeat_timeout_factor",
            ),
            (l.clone().with_min_read_rate(0), "min_read_rate"),
            (
                l.clone().with_max_incomplete_bytes(0),
                "max_incomplete_bytes",
            ),
            (
                l.clone().with_first_message_timeout(Duration::ZERO),
                "first_message_timeout",
            ),
            (
                l.clone().with_ws_ping_interval(Some(Duration::ZERO)),
                "ws_ping_interval",
            ),
        ] {
            assert_eq!(build(limits).unwrap_err(), ConfigError::Zero(name));
        }
        assert_eq!(
            build(l.clone().with_read_grace(Duration::MAX)).unwrap_err(),
            ConfigError::TooLong {
                name: "read_grace",
                max: MAX_TIMEOUT
            }
        );
    }
}
