//! Plain-HTTP header helpers (HTTP-2..HTTP-5, THR-5).

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use opamp_proto::{CONTENT_TYPE_PROTOBUF, INSTANCE_UID_HEADER, InstanceUid, InvalidInstanceUid};

pub use opamp_proto::CONTENT_TYPE_PROTOBUF as PROTOBUF;

/// Whether the request's `Content-Type` is `application/x-protobuf` (HTTP-2). Parameters and
/// the case of the media type are ignored.
pub fn is_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(CONTENT_TYPE_PROTOBUF))
}

/// Whether the body is gzip-encoded (`Content-Encoding: gzip`, HTTP-3).
pub fn is_gzip_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| coding.trim().eq_ignore_ascii_case("gzip"))
}

/// Whether the body has a `Content-Encoding` other than gzip or identity, which OpAMP peers do
/// not use; a server should answer 415.
pub fn has_unsupported_encoding(headers: &HeaderMap) -> bool {
    headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .any(|c| {
            !c.is_empty() && !c.eq_ignore_ascii_case("gzip") && !c.eq_ignore_ascii_case("identity")
        })
}

/// Whether `Accept-Encoding` allows a gzip response (HTTP-4): `gzip` or `*` listed with a
/// non-zero quality.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            if !coding.eq_ignore_ascii_case("gzip") && coding != "*" {
                return false;
            }
            // "q=0" (or 0.0, 0.00...) refuses the coding.
            !parts.any(|p| {
                let p = p.trim();
                p.len() >= 2
                    && p[..2].eq_ignore_ascii_case("q=")
                    && p[2..].trim().parse::<f32>().is_ok_and(|q| q == 0.0)
            })
        })
}

/// The `OpAMP-Instance-UID` header (HTTP-5): `None` when absent, an error when present but not
/// a canonical UUID.
pub fn instance_uid(headers: &HeaderMap) -> Option<Result<InstanceUid, InvalidInstanceUid>> {
    headers.get(INSTANCE_UID_HEADER).map(|v| {
        v.to_str()
            .map_err(|_| InvalidInstanceUid::Text)
            .and_then(str::parse)
    })
}

/// Parses a `Retry-After` value (THR-5, RFC 9110 §10.2.3): delay-seconds, or an HTTP-date
/// measured from `now` (a date in the past means "now", zero delay). `None` when malformed.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Very large numbers saturate rather than fail: the server asked for "a long time".
        return Some(Duration::from_secs(
            value.parse::<u64>().unwrap_or(u64::MAX),
        ));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A delay in whole seconds for `Retry-After` (THR-5), rounded up; saturates at `u64::MAX`
/// (for [`Duration::MAX`]) instead of overflowing.
pub fn retry_after_seconds(delay: Duration) -> u64 {
    delay
        .as_secs()
        .saturating_add(u64::from(delay.subsec_nanos() > 0))
}

/// Formats a delay as a `Retry-After` delay-seconds value, rounding up to whole seconds
/// (see [`retry_after_seconds`]).
pub fn format_retry_after(delay: Duration) -> String {
    retry_after_seconds(delay).to_string()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn http_2_content_type() {
        assert!(is_protobuf(&headers(&[(
            "content-type",
            "application/x-protobuf"
        )])));
        assert!(is_protobuf(&headers(&[(
            "content-type",
            "Application/X-Protobuf; charset=x"
        )])));
        assert!(!is_protobuf(&headers(&[(
            "content-type",
            "application/json"
        )])));
        assert!(!is_protobuf(&headers(&[])));
    }

    #[test]
    fn http_3_content_encoding() {
        assert!(is_gzip_encoded(&headers(&[("content-encoding", "gzip")])));
        assert!(is_gzip_encoded(&headers(&[("content-encoding", "GZIP")])));
        assert!(!is_gzip_encoded(&headers(&[])));
        assert!(has_unsupported_encoding(&headers(&[(
            "content-encoding",
            "br"
        )])));
        assert!(!has_unsupported_encoding(&headers(&[(
            "content-encoding",
            "gzip"
        )])));
        assert!(!has_unsupported_encoding(&headers(&[(
            "content-encoding",
            "identity"
        )])));
    }

    #[test]
    fn http_4_accept_encoding() {
        assert!(accepts_gzip(&headers(&[("accept-encoding", "gzip")])));
        assert!(accepts_gzip(&headers(&[(
            "accept-encoding",
            "deflate, gzip;q=0.5"
        )])));
        assert!(accepts_gzip(&headers(&[("accept-encoding", "*")])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "gzip;q=0")])));
        assert!(!accepts_gzip(&headers(&[(
            "accept-encoding",
            "gzip; Q=0.000"
        )])));
        assert!(!accepts_gzip(&headers(&[("accept-encoding", "identity")])));
        assert!(!accepts_gzip(&headers(&[])));
    }

    #[test]
    fn http_5_instance_uid_header() {
        let ok = headers(&[("opamp-instance-uid", "f81d4fae-7dec-11d0-a765-00a0c91e6bf6")]);
        assert_eq!(
            instance_uid(&ok).unwrap().unwrap().to_string(),
            "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
        );
        assert!(
            instance_uid(&headers(&[("opamp-instance-uid", "nope")]))
                .unwrap()
                .is_err()
        );
        assert!(instance_uid(&headers(&[])).is_none());
    }

    #[test]
    fn thr_5_retry_after_seconds_and_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:37 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn retry_after_formats_whole_seconds_rounding_up() {
        assert_eq!(format_retry_after(Duration::from_secs(30)), "30");
        assert_eq!(format_retry_after(Duration::from_millis(1500)), "2");
        assert_eq!(format_retry_after(Duration::ZERO), "0");
    }

    #[test]
    fn thr_5_retry_after_saturates_for_duration_max() {
        // Review finding 10: `as_secs() + 1` overflowed (panic in debug, "0" in release).
        assert_eq!(format_retry_after(Duration::MAX), u64::MAX.to_string());
        assert_eq!(
            format_retry_after(Duration::from_secs(u64::MAX)),
            u64::MAX.to_string()
        );
    }
}
