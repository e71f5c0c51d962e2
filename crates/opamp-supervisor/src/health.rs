//! The agent's own health endpoint, when it has one (for the Collector, its `health_check`
//! extension): an HTTP `GET` whose 2xx answer means healthy.
//!
//! Plain `http://` only, as health endpoints on loopback are; the request is HTTP/1.1 with
//! `Connection: close`, and at most [`MAX_ANSWER`] bytes of the answer are read.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most of an answer that is read; the rest is ignored.
pub const MAX_ANSWER: usize = 8192;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Whether the answer was 2xx.
    pub healthy: bool,
    /// "200 OK: {body}", "503 Service Unavailable: ...", or why there was no answer.
    pub status: String,
}

/// A parsed health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEndpoint {
    authority: String,
    path: String,
    url: String,
}

impl HealthEndpoint {
    /// Parses an `http://host:port/path` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{url:?}: only http:// is supported"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?}: no host"))?
            .as_str()
            .to_owned();
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority
        } else {
            format!("{authority}:80")
        };
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        Ok(Self {
            authority,
            path,
            url: url.to_owned(),
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends one `GET`, bounded by `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Probe {
        match tokio::time::timeout(timeout, self.get()).await {
            Ok(Ok(probe)) => probe,
            Ok(Err(e)) => Probe {
                healthy: false,
                status: format!("{}: {e}", self.url),
            },
            Err(_) => Probe {
                healthy: false,
                status: format!("{}: no answer within {timeout:?}", self.url),
            },
        }
    }

    async fn get(&self) -> std::io::Result<Probe> {
        let mut stream = TcpStream::connect(&self.authority).await?;
        let host = self.authority.trim_end_matches(":80");
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: opamp-supervisor\r\n\r\n",
            self.path
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::with_capacity(1024);
        let mut buf = [0u8; 2048];
        while answer.len() < MAX_ANSWER {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n.min(MAX_ANSWER - answer.len())]);
        }
        Ok(parse_answer(&answer))
    }
}

fn parse_answer(answer: &[u8]) -> Probe {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    // "HTTP/1.1 200 OK"
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let code: Option<u16> = parts.next().and_then(|c| c.parse().ok());
    let reason = parts.next().unwrap_or("").trim();
    match code {
        Some(code) if version.starts_with("HTTP/") => {
            let body = body.trim();
            let mut status = format!("{code} {reason}");
            if !body.is_empty() {
                status.push_str(": ");
                status.extend(body.chars().take(1024));
            }
            Probe {
                healthy: (200..300).contains(&code),
                status,
            }
        }
        _ => Probe {
            healthy: false,
            status: format!(
                "not an HTTP answer: {:?}",
                status_line.chars().take(80).collect::<String>()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ok = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(
            ok,
            Probe {
                healthy: true,
                status: "200 OK: ok".into()
            }
        );
        let bad = parse_answer(b"HTTP/1.0 503 Service Unavailable\r\n\r\n{\"status\":\"down\"}\n");
        assert!(!bad.healthy);
        assert_eq!(bad.status, "503 Service Unavailable: {\"status\":\"down\"}");
        assert!(!parse_answer(b"garbage").healthy);
        assert!(!parse_answer(b"").healthy);
    }

    #[test]
    fn endpoints() {
        let e = HealthEndpoint::parse("http://127.0.0.1:13133/health?x=1").unwrap();
        assert_eq!(e.authority, "127.0.0.1:13133");
        assert_eq!(e.path, "/health?x=1");
        assert_eq!(
            HealthEndpoint::parse("http://localhost").unwrap().authority,
            "localhost:80"
        );
        assert!(HealthEndpoint::parse("https://x/").is_err());
        assert!(HealthEndpoint::parse("not a url").is_err());
    }

    #[tokio::test]
    async fn no_listener_is_unhealthy() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = HealthEndpoint::parse(&format!("http://127.0.0.1:{port}/")).unwrap();
        let p = e.probe(Duration::from_secs(5)).await;
        assert!(!p.healthy);
        assert!(p.status.contains(&port.to_string()), "{p:?}");
    }
}
