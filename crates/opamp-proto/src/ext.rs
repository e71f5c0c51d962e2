//! Small constructors on the generated types, for the attributes every agent reports.

use bytes::Bytes;

use crate::v1::{AgentConfigMap, AgentConfigObject, AnyValue, KeyValue, any_value};

impl KeyValue {
    /// An attribute with any value: `KeyValue::new("service.name", "collector")`,
    /// `KeyValue::new("process.pid", 42_i64)`.
    pub fn new(key: impl Into<String>, value: impl Into<AnyValue>) -> Self {
        Self {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// The value as a string, if it is a string value.
    pub fn str_value(&self) -> Option<&str> {
        self.value.as_ref().and_then(AnyValue::as_str)
    }
}

impl AgentConfigMap {
    /// A config of one object under the name `""`, as single-file agents use (RC-9).
    pub fn single(body: impl Into<Bytes>, content_type: impl Into<String>) -> Self {
        let mut map = Self::default();
        map.config_map.insert(
            String::new(),
            AgentConfigObject {
                body: body.into(),
                content_type: content_type.into(),
                role: String::new(),
            },
        );
        map
    }
}

impl AnyValue {
    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Some(any_value::Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }
}

macro_rules! any_value_from {
    ($($ty:ty => $variant:ident $(via $conv:path)?),* $(,)?) => {$(
        impl From<$ty> for AnyValue {
            fn from(v: $ty) -> Self {
                Self { value: Some(any_value::Value::$variant($($conv)?(v))) }
            }
        }
    )*};
}

any_value_from! {
    String => StringValue,
    &str => StringValue via String::from,
    &String => StringValue via String::clone,
    bool => BoolValue,
    i64 => IntValue,
    f64 => DoubleValue,
    Bytes => BytesValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_constructors() {
        let kv = KeyValue::new("service.name", "collector");
        assert_eq!(kv.key, "service.name");
        assert_eq!(kv.str_value(), Some("collector"));
        assert_eq!(
            KeyValue::new("n", 3_i64).value,
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(3))
            })
        );
        assert_eq!(KeyValue::new("b", true).str_value(), None);
        assert_eq!(AnyValue::from(String::from("x")).as_str(), Some("x"));
    }

    #[test]
    fn rc_9_single_object_config_uses_the_empty_name() {
        let map = AgentConfigMap::single(Bytes::from_static(b"a: 1"), "text/yaml");
        assert_eq!(map.config_map.len(), 1);
        assert_eq!(map.config_map[""].body, Bytes::from_static(b"a: 1"));
        assert_eq!(map.config_map[""].content_type, "text/yaml");
    }
}
