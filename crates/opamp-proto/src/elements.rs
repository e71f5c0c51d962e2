//! Counting what a message decodes into, before decoding it.
//!
//! A message within the size limit can still be expensive to decode: every nested field
//! becomes a heap value, and a 15-byte `KeyValue` on the wire is about 150 bytes once
//! decoded (the struct, its key and its value). A 60 MiB message of four million tiny
//! attributes decodes into some 600 MiB. [`count_elements`] walks the wire format of the
//! fields that repeat or nest, builds nothing, and stops as soon as the count passes the
//! limit, so a receiver can refuse such a message at the cost of reading it once.
//!
//! An *element* is one field occurrence in a message that the walk enters: the root message
//! and every nested message of the types that can repeat (attributes, health components,
//! config files, package statuses, component details, custom capabilities). Fields of other
//! messages (a config body, a hash) count once each and are not entered.
//!
//! The walk never rejects what the decoder would accept: malformed wire data ends the walk
//! of that message without an error (the decoder then reports it).

use crate::{AgentToServer, ServerToAgent};

/// The recommended default limit of elements in one message: 262,144, a few MiB of decoded
/// values, far above what a real agent reports (hundreds of attributes, thousands of health
/// components or config files).
pub const DEFAULT_MAX_MESSAGE_ELEMENTS: usize = 1 << 18;

/// Depth past which the walk stops entering messages (the decoder's own recursion limit is
/// 100, so deeper data fails to decode anyway).
const MAX_DEPTH: u32 = 100;

/// A message type whose elements [`count_elements`] can count. Sealed: implemented for the
/// two top-level OpAMP messages.
pub trait CountElements: sealed::Sealed {
    #[doc(hidden)]
    const ROOT: Kind;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::AgentToServer {}
    impl Sealed for crate::ServerToAgent {}
}

impl CountElements for AgentToServer {
    const ROOT: Kind = Kind::AgentToServer;
}

impl CountElements for ServerToAgent {
    const ROOT: Kind = Kind::ServerToAgent;
}

/// The message types the walk enters.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AgentToServer,
    ServerToAgent,
    AgentDescription,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
    ComponentHealth,
    HealthEntry,
    EffectiveConfig,
    ConfigMap,
    PackageStatuses,
    CustomCapabilities,
    AvailableComponents,
    ComponentEntry,
    ComponentDetails,
    RemoteConfig,
    ConnectionSettingsOffers,
    ConnectionSettings,
    OtherConnectionEntry,
    Headers,
    PackagesAvailable,
    PackageAvailableEntry,
    PackageAvailable,
}

/// The message type of field `field` of `kind`, if the walk enters it (field numbers of
/// opamp.proto and anyvalue.proto, v0.20.0).
fn child(kind: Kind, field: u64) -> Option<Kind> {
    use Kind::*;
    Some(match (kind, field) {
        (AgentToServer, 3) => AgentDescription,
        (AgentToServer, 5) => ComponentHealth,
        (AgentToServer, 6) => EffectiveConfig,
        (AgentToServer, 8) => PackageStatuses,
        (AgentToServer, 12) => CustomCapabilities,
        (AgentToServer, 14) => AvailableComponents,
        (AgentDescription, 1 | 2) => KeyValue,
        (KeyValue, 2) => AnyValue,
        (AnyValue, 5) => ArrayValue,
        (AnyValue, 6) => KeyValueList,
        (ArrayValue, 1) => AnyValue,
        (KeyValueList, 1) => KeyValue,
        (ComponentHealth, 6) => HealthEntry,
        (ComponentHealth, 7) => KeyValue,
        (HealthEntry, 2) => ComponentHealth,
        // Map entries of config files and package statuses count once each, not entered.
        (EffectiveConfig, 1) => ConfigMap,
        (AvailableComponents, 1) => ComponentEntry,
        (ComponentEntry, 2) => ComponentDetails,
        (ComponentDetails, 1) => KeyValue,
        (ComponentDetails, 2) => ComponentEntry,
        (ServerToAgent, 3) => RemoteConfig,
        (ServerToAgent, 4) => ConnectionSettingsOffers,
        (ServerToAgent, 5) => PackagesAvailable,
        (ServerToAgent, 10) => CustomCapabilities,
        (RemoteConfig, 1) => ConfigMap,
        (ConnectionSettingsOffers, 2..=5) => ConnectionSettings,
        (ConnectionSettingsOffers, 6) => OtherConnectionEntry,
        (OtherConnectionEntry, 2) => ConnectionSettings,
        // headers; `other_settings` entries count once each.
        (ConnectionSettings, 2) => Headers,
        (PackagesAvailable, 1) => PackageAvailableEntry,
        (PackageAvailableEntry, 2) => PackageAvailable,
        _ => return None,
    })
}

/// The message has more elements than the limit (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message decodes into more than {limit} elements")]
pub struct TooManyElements {
    /// The limit in force.
    pub limit: usize,
}

/// Counts the elements of an encoded `M` (the protobuf payload, after the OpAMP header),
/// stopping with an error as soon as they pass `limit`.
pub fn count_elements<M: CountElements>(
    payload: &[u8],
    limit: usize,
) -> Result<usize, TooManyElements> {
    let mut count = 0usize;
    walk(payload, M::ROOT, 0, &mut count, limit)?;
    Ok(count)
}

fn walk(
    mut buf: &[u8],
    kind: Kind,
    depth: u32,
    count: &mut usize,
    limit: usize,
) -> Result<(), TooManyElements> {
    while !buf.is_empty() {
        let Some((key, rest)) = varint(buf) else {
            return Ok(());
        };
        buf = rest;
        *count += 1;
        if *count > limit {
            return Err(TooManyElements { limit });
        }
        let rest = match key & 7 {
            0 => varint(buf).map(|(_, rest)| rest),
            1 => buf.get(8..),
            5 => buf.get(4..),
            2 => varint(buf)
                .and_then(|(len, rest)| {
                    let len = usize::try_from(len).ok()?;
                    let body = rest.get(..len)?;
                    Some((body, rest.get(len..)?))
                })
                .map(|(body, rest)| {
                    if let Some(inner) = child(kind, key >> 3)
                        && depth < MAX_DEPTH
                    {
                        return walk(body, inner, depth + 1, count, limit).map(|()| rest);
                    }
                    Ok(rest)
                })
                .transpose()?,
            // Groups (deprecated) and invalid wire types: the decoder decides.
            _ => None,
        };
        match rest {
            Some(rest) => buf = rest,
            None => return Ok(()),
        }
    }
    Ok(())
}

/// A base-128 varint and the rest of `buf`; `None` if it is truncated or too long.
fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &buf[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{
        AgentConfigMap, AgentConfigObject, AgentDescription, AnyValue, ArrayValue, ComponentHealth,
        EffectiveConfig, KeyValue, any_value,
    };

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
        }
    }

    #[test]
    fn counts_attributes_nested_values_health_and_config_files() {
        let nested = KeyValue {
            key: "list".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue {
                    values: vec![AnyValue::default(); 3],
                })),
            }),
        };
        let msg = AgentToServer {
            instance_uid: vec![1; 16].into(),
            sequence_num: 7,
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![kv("a", "1"), kv("b", "2")],
                non_identifying_attributes: vec![nested],
            }),
            health: Some(ComponentHealth {
                healthy: true,
                component_health_map: [(
                    "c".to_string(),
                    ComponentHealth {
                        healthy: true,
                        ..Default::default()
                    },
                )]
                .into(),
                ..Default::default()
            }),
            effective_config: Some(EffectiveConfig {
                config_map: Some(AgentConfigMap {
                    config_map: [("f".to_string(), AgentConfigObject::default())].into(),
                }),
            }),
            ..Default::default()
        };
        // Root: uid, seq, description, health, effective config: 5.
        // Description: 3 attributes; "a" and "b": key, value, the value's string (3 each);
        // "list": key, value, array_value, its 3 values: 15.
        // Health: healthy, one map entry: its key and value, the value's `healthy`: 5.
        // Effective config: config_map, its one entry (not entered): 2.
        let n = count_elements::<AgentToServer>(&msg.encode_to_vec(), usize::MAX).unwrap();
        assert_eq!(n, 5 + 15 + 5 + 2);
    }

    #[test]
    fn stops_at_the_limit() {
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                non_identifying_attributes: (0..1000).map(|i| kv(&i.to_string(), "v")).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = msg.encode_to_vec();
        assert_eq!(
            count_elements::<AgentToServer>(&bytes, 100),
            Err(TooManyElements { limit: 100 })
        );
        assert!(count_elements::<AgentToServer>(&bytes, 10_000).is_ok());
    }

    #[test]
    fn malformed_input_ends_the_walk_without_error() {
        for junk in [&[0xff; 20][..], &[0x1a, 0x7f, 0x01], &[0x0b, 0x01], &[]] {
            assert!(
                count_elements::<AgentToServer>(junk, 10).is_ok(),
                "{junk:?}"
            );
        }
        // Deep nesting (a health tree 10,000 levels deep) is walked only to the decoder's
        // recursion limit.
        let mut deep = Vec::new();
        for level in 0..20_000 {
            // ComponentHealth.component_health_map (6) and the entry's value (2), in turn.
            let tag = if level % 2 == 0 { 0x12 } else { 0x32 };
            let mut outer = vec![tag];
            prost::encoding::encode_varint(deep.len() as u64, &mut outer);
            outer.extend(deep);
            deep = outer;
        }
        let mut root = vec![0x2a]; // AgentToServer.health (5)
        prost::encoding::encode_varint(deep.len() as u64, &mut root);
        root.extend(deep);
        let deep = root;
        assert!(count_elements::<AgentToServer>(&deep, usize::MAX).is_ok());
    }
}
