//! Bounded gzip decompression of request and response bodies (HTTP-4, HTTP-15): never a
//! panic, never more than the limit, and what we compress comes back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opamp_transport::gzip;

fuzz_target!(|data: &[u8]| {
    const LIMIT: usize = 1 << 16;
    if let Ok(out) = gzip::decompress_limited(data, LIMIT) {
        assert!(out.len() <= LIMIT);
    }
    let packed = gzip::compress(data);
    let back = gzip::decompress_limited(&packed, data.len()).expect("round trip");
    assert_eq!(&back[..], data);
});
