//! Opening a byte stream to the server: TCP, then TLS for `wss` and `https` (feature `tls`).

use std::time::Duration;

#[cfg(feature = "tls")]
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::ConnectError;
use crate::settings::Endpoint;

/// A plain or TLS stream.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed connection, so both drivers handle plain and TLS streams alike.
pub(crate) type BoxedIo = Box<dyn Io>;

/// Connects to the endpoint's host and port, with TLS when the scheme asks for it, within
/// `timeout`.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<BoxedIo, ConnectError> {
    tokio::time::timeout(timeout, connect_inner(endpoint))
        .await
        .map_err(|_| ConnectError::Timeout)?
}

async fn connect_inner(endpoint: &Endpoint) -> Result<BoxedIo, ConnectError> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
    // OpAMP messages are small and latency-sensitive.
    tcp.set_nodelay(true)?;
    #[cfg(feature = "tls")]
    if let Some(config) = &endpoint.tls_config {
        let name = ServerName::try_from(endpoint.host.clone())
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        return Ok(Box::new(tls));
    }
    Ok(Box::new(tcp))
}

/// The headers for a request or handshake: the static ones, then the header function's.
pub(crate) fn extra_headers(settings: &crate::settings::StartSettings) -> http::HeaderMap {
    let mut headers = settings.headers.clone();
    if let Some(f) = &settings.header_fn {
        // Replaces static headers of the same name (HeaderMap's `Extend` inserts the first
        // value of each name and appends the rest).
        headers.extend(f());
    }
    headers
}
