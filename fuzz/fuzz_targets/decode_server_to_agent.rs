//! Framing and decoding of a `ServerToAgent`, as the client does it (zero-copy `Bytes`):
//! never a panic; what decodes re-encodes and decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use opamp_proto::{Message, ServerToAgent, elements, framing};

fuzz_target!(|data: &[u8]| {
    let _ = elements::count_elements::<ServerToAgent>(data, 1 << 10);
    let frame = Bytes::copy_from_slice(data);
    if let Ok(msg) = framing::decode_bytes_limited::<ServerToAgent>(frame, 1 << 20, 1 << 16) {
        let again = msg.encode_to_vec();
        assert_eq!(ServerToAgent::decode(&again[..]).expect("re-decodes"), msg);
    }
});
