//! Framing and decoding of an `AgentToServer`, as the server does it: never a panic; what
//! decodes re-encodes and decodes to the same message; the element count is a bound the
//! decoder agrees with.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opamp_proto::{AgentToServer, Message, elements, framing};

fuzz_target!(|data: &[u8]| {
    let _ = elements::count_elements::<AgentToServer>(data, usize::MAX);
    if let Ok(msg) = framing::decode_limited::<AgentToServer>(data, 1 << 20, 1 << 16) {
        let again = framing::encode(&msg);
        let back: AgentToServer = framing::decode(&again, usize::MAX).expect("re-decodes");
        assert_eq!(back, msg);
    }
    // The plain-HTTP path: no header, the body is the message.
    if let Ok(msg) = AgentToServer::decode(data) {
        let bytes = msg.encode_to_vec();
        assert_eq!(AgentToServer::decode(&bytes[..]).expect("re-decodes"), msg);
        // A message of n elements passes a limit of n, and fails a limit of n - 1.
        let n = elements::count_elements::<AgentToServer>(&bytes, usize::MAX).expect("no limit");
        assert!(elements::count_elements::<AgentToServer>(&bytes, n).is_ok());
        if n > 0 {
            assert!(elements::count_elements::<AgentToServer>(&bytes, n - 1).is_err());
        }
    }
});
