//! `Debug` for the generated types that can carry secrets or large payloads: their bodies
//! are shown as a length, never dumped (see the crate docs).

use std::fmt;

use crate::v1::{AgentConfigObject, CustomMessage, Header, TlsCertificate};

/// Shows a byte payload as its length.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

impl fmt::Debug for AgentConfigObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfigObject")
            .field("body", &Len(self.body.len()))
            .field("content_type", &self.content_type)
            .field("role", &self.role)
            .finish()
    }
}

impl fmt::Debug for CustomMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomMessage")
            .field("capability", &self.capability)
            .field("type", &self.r#type)
            .field("data", &Len(self.data.len()))
            .finish()
    }
}

impl fmt::Debug for TlsCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCertificate")
            .field("cert", &Len(self.cert.len()))
            .field("private_key", &Len(self.private_key.len()))
            .field("ca_cert", &Len(self.ca_cert.len()))
            .finish()
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = ["authorization", "proxy-authorization", "cookie"]
            .iter()
            .any(|name| self.key.eq_ignore_ascii_case(name));
        let mut s = f.debug_struct("Header");
        s.field("key", &self.key);
        if secret {
            s.field("value", &format_args!("<redacted>"));
        } else {
            s.field("value", &self.value);
        }
        s.finish()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn payloads_are_not_dumped() {
        let obj = AgentConfigObject {
            body: Bytes::from_static(b"password: hunter2"),
            content_type: "text/yaml".into(),
            role: String::new(),
        };
        let text = format!("{obj:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("<17 bytes>") && text.contains("text/yaml"),
            "{text}"
        );

        let msg = CustomMessage {
            capability: "io.example.cap".into(),
            r#type: "t".into(),
            data: Bytes::from_static(b"secret-data"),
        };
        assert!(!format!("{msg:?}").contains("secret-data"));

        let cert = TlsCertificate {
            private_key: Bytes::from_static(b"-----BEGIN PRIVATE KEY-----"),
            ..Default::default()
        };
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn secret_header_values_are_redacted_others_shown() {
        let auth = Header {
            key: "Authorization".into(),
            value: "Bearer abc".into(),
        };
        assert!(!format!("{auth:?}").contains("abc"));
        let plain = Header {
            key: "X-Tenant".into(),
            value: "blue".into(),
        };
        assert!(format!("{plain:?}").contains("blue"));
    }
}
