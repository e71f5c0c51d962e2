//! The transport helpers this crate uses, from `opamp-transport`, and tests that pin the
//! behaviour the server relies on.

pub(crate) use opamp_transport::gzip::{GzipError, compress as gzip, decompress_limited};
pub(crate) use opamp_transport::http::{
    accepts_gzip, has_unsupported_encoding, instance_uid, is_gzip_encoded, is_protobuf,
};
use opamp_transport::ws::WebSocketConfig;

/// The WebSocket settings of every server connection: small buffers for a mostly idle
/// fleet, and the OpAMP message limit on messages and frames (WS-8, WS-9).
pub(crate) fn ws_config(read_buffer_size: usize, max_message_size: usize) -> WebSocketConfig {
    opamp_transport::ws::config_with_buffers(
        max_message_size,
        read_buffer_size,
        opamp_transport::ws::DEFAULT_WRITE_BUFFER_SIZE,
    )
}

/// The drivers' clock for the session core: tokio's, so that a test on a paused runtime
/// (`tokio::time::pause`) drives the core on the same virtual clock as the timers.
pub(crate) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn http_14_gzip_bomb_stops_at_the_limit() {
        let bomb = gzip(&vec![0u8; 10 * 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024);
        assert!(matches!(
            decompress_limited(&bomb, 1024 * 1024),
            Err(GzipError::TooLarge(_))
        ));
        assert_eq!(
            decompress_limited(&bomb, 10 * 1024 * 1024).unwrap().len(),
            10 << 20
        );
        assert!(matches!(
            decompress_limited(b"not gzip", 100),
            Err(GzipError::Invalid(_))
        ));
    }

    fn headers(name: http::header::HeaderName, v: &'static str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, HeaderValue::from_static(v));
        m
    }

    #[test]
    fn http_4_accept_encoding_parsing() {
        let h = |v| accepts_gzip(&headers(ACCEPT_ENCODING, v));
        assert!(h("gzip"));
        assert!(h("deflate, GZIP;q=0.5"));
        assert!(h("*"));
        assert!(!h("gzip;q=0"));
        assert!(!h("br, deflate"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn http_3_content_encoding_parsing() {
        assert!(is_gzip_encoded(&headers(CONTENT_ENCODING, "gzip")));
        assert!(!has_unsupported_encoding(&headers(
            CONTENT_ENCODING,
            "identity"
        )));
        assert!(has_unsupported_encoding(&headers(CONTENT_ENCODING, "br")));
        assert!(!has_unsupported_encoding(&HeaderMap::new()));
    }

    #[test]
    fn http_2_content_type_parsing() {
        let h = |v| is_protobuf(&headers(CONTENT_TYPE, v));
        assert!(h("application/x-protobuf"));
        assert!(h("Application/X-Protobuf; charset=binary"));
        assert!(!h("application/json"));
        assert!(!h("application/x-protobuff"));
    }

    #[test]
    fn ws_buffers_are_small_by_default() {
        let c = ws_config(4096, 1 << 20);
        assert_eq!(c.read_buffer_size, 4096);
        assert_eq!(c.write_buffer_size, 0);
        assert_eq!(c.max_message_size, Some(1 << 20));
        assert_eq!(c.max_frame_size, Some(1 << 20));
    }
}
