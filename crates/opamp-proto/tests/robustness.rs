//! Nothing from the wire may panic: seeded, deterministic mutation of real messages (the
//! cross-implementation vectors) and random bytes through every decoder, and a message nested
//! far deeper than any real one. A failure prints the seed and iteration to reproduce it.

use opamp_proto::{
    AgentDescription, AgentToServer, DEFAULT_MAX_MESSAGE_SIZE, Message, ServerToAgent, framing,
};

/// splitmix64: a tiny deterministic generator, enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("vectors dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| std::fs::read(p).expect("vector"))
        .collect();
    out.sort();
    assert!(out.len() >= 6, "vectors missing");
    out
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 => {
                let i = rng.below(v.len() + 1);
                let n = rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if !v.is_empty() => {
                // Duplicate a chunk: repeated fields, merged sub-messages, bad lengths.
                let a = rng.below(v.len());
                let b = (a + rng.below(64)).min(v.len());
                let chunk = v[a..b].to_vec();
                let i = rng.below(v.len() + 1);
                v.splice(i..i, chunk);
            }
            _ => {
                // Varint extremes where a length or tag might be.
                let i = rng.below(v.len() + 1);
                v.splice(
                    i..i,
                    [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
                );
            }
        }
    }
    v
}

fn decode_everything(bytes: &[u8]) {
    let _ = AgentToServer::decode(bytes);
    let _ = ServerToAgent::decode(bytes);
    let _ = AgentDescription::decode(bytes);
    let mut framed = vec![0u8];
    framed.extend_from_slice(bytes);
    let _ = framing::decode::<AgentToServer>(&framed, DEFAULT_MAX_MESSAGE_SIZE);
    let _ = framing::decode_bytes::<ServerToAgent>(framed.into(), DEFAULT_MAX_MESSAGE_SIZE);
    let _ = framing::decode::<AgentToServer>(bytes, DEFAULT_MAX_MESSAGE_SIZE);
    // Whatever decodes must re-encode and decode again to the same message.
    if let Ok(m) = AgentToServer::decode(bytes) {
        assert_eq!(
            AgentToServer::decode(&m.encode_to_vec()[..]).as_ref(),
            Ok(&m)
        );
    }
    if let Ok(m) = ServerToAgent::decode(bytes) {
        assert_eq!(
            ServerToAgent::decode(&m.encode_to_vec()[..]).as_ref(),
            Ok(&m)
        );
    }
}

#[test]
fn mutated_vectors_never_panic_any_decoder() {
    let seeds = seeds();
    let mut rng = Rng(0x0a4a_2026);
    for i in 0..20_000 {
        let seed = &seeds[i % seeds.len()];
        let input = mutate(&mut rng, seed);
        let result = std::panic::catch_unwind(|| decode_everything(&input));
        assert!(
            result.is_ok(),
            "panic at iteration {i} on {} bytes: {input:02x?}",
            input.len()
        );
    }
}

#[test]
fn random_bytes_never_panic_any_decoder() {
    let mut rng = Rng(0x5eed);
    for i in 0..20_000 {
        let len = rng.below(96);
        let input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let result = std::panic::catch_unwind(|| decode_everything(&input));
        assert!(result.is_ok(), "panic at iteration {i}: {input:02x?}");
    }
}

/// Appends field `number` (length-delimited) holding `inner` to `out`.
fn field(out: &mut Vec<u8>, number: u32, inner: &[u8]) {
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(inner.len() as u64, out);
    out.extend_from_slice(inner);
}

#[test]
fn deeply_nested_values_are_an_error_not_a_stack_overflow() {
    // AnyValue{kvlist_value: KeyValueList{values: [KeyValue{value: AnyValue{...}}]}}, 5000
    // levels, built from the inside out without recursion.
    let mut any = Vec::new();
    for _ in 0..5000 {
        let mut kv = Vec::new();
        field(&mut kv, 2, &any); // KeyValue.value
        let mut list = Vec::new();
        field(&mut list, 1, &kv); // KeyValueList.values
        let mut next = Vec::new();
        field(&mut next, 6, &list); // AnyValue.kvlist_value
        any = next;
    }
    let mut kv = Vec::new();
    field(&mut kv, 2, &any);
    let mut description = Vec::new();
    field(&mut description, 1, &kv); // AgentDescription.identifying_attributes
    let mut report = Vec::new();
    field(&mut report, 3, &description); // AgentToServer.agent_description
    assert!(
        AgentToServer::decode(&report[..]).is_err(),
        "prost's recursion limit applies"
    );
}
