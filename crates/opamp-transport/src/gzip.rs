//! gzip for plain-HTTP bodies (HTTP-3, HTTP-4), with decompression bounded by a size limit.

use std::io::{Read, Write};

use bytes::Bytes;
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use crate::MessageTooLarge;

/// Why a gzip body could not be decompressed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GzipError {
    /// The decompressed body is larger than the limit; decompression stopped there (HTTP-14).
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
    /// The body is not valid gzip.
    #[error("invalid gzip body: {0}")]
    Invalid(#[from] std::io::Error),
}

/// Compresses `data` with gzip at the fastest level (servers compress many responses).
pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 2 + 64), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

/// Decompresses a gzip body, failing with [`GzipError::TooLarge`] as soon as the output would
/// exceed `limit` bytes. Memory use is bounded by `limit` whatever the compression ratio.
pub fn decompress_limited(data: &[u8], limit: usize) -> Result<Bytes, GzipError> {
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit).min(1 << 20));
    // Read one byte past the limit to tell "exactly at the limit" from "over it".
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    GzDecoder::new(data).take(cap).read_to_end(&mut out)?;
    if out.len() > limit {
        return Err(MessageTooLarge {
            size: out.len(),
            limit,
        }
        .into());
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let data = b"opamp ".repeat(1000);
        let packed = compress(&data);
        assert!(packed.len() < data.len());
        assert_eq!(decompress_limited(&packed, data.len()).unwrap(), data);
    }

    #[test]
    fn http_14_bomb_stops_at_the_limit() {
        // 64 MiB of zeros compress to about 64 KiB.
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        encoder.write_all(&vec![0u8; 64 << 20]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 100 << 10);
        match decompress_limited(&bomb, 1 << 20) {
            Err(GzipError::TooLarge(e)) => assert_eq!((e.size, e.limit), ((1 << 20) + 1, 1 << 20)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_invalid() {
        assert!(matches!(
            decompress_limited(b"not gzip", 100),
            Err(GzipError::Invalid(_))
        ));
        let mut truncated = compress(b"hello world hello world");
        truncated.truncate(truncated.len() - 6);
        assert!(matches!(
            decompress_limited(&truncated, 100),
            Err(GzipError::Invalid(_))
        ));
    }
}
