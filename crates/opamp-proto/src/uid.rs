//! The agent instance uid (UID-1..UID-7).

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// An agent instance uid: exactly 16 bytes (UID-2).
///
/// New uids are UUID v7 ([`InstanceUid::new_v7`]), as the spec recommends. The text form is the
/// canonical hyphenated UUID (`01890a5d-ac96-774b-bcce-b302099a8057`), used for the
/// `OpAMP-Instance-UID` HTTP header (HTTP-5); parsing accepts it in either case.
///
/// A value of this type always holds 16 bytes: convert wire bytes with
/// [`TryFrom<&[u8]>`](#impl-TryFrom%3C%26%5Bu8%5D%3E-for-InstanceUid), which rejects any other
/// length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceUid([u8; 16]);

/// Why bytes or text are not an instance uid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInstanceUid {
    /// The bytes were not 16 long (UID-2).
    #[error("instance uid must be 16 bytes, got {0}")]
    Length(usize),
    /// The text was not a canonical hyphenated UUID.
    #[error("instance uid text must be a hyphenated UUID (8-4-4-4-12 hex digits)")]
    Text,
}

impl InstanceUid {
    /// A new UUID v7 uid: time-ordered and random, so fleets do not collide (UID-1, UID-2).
    pub fn new_v7() -> Self {
        Self(*uuid::Uuid::now_v7().as_bytes())
    }

    /// The uid with these 16 bytes.
    pub const fn from_array(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes.
    pub const fn as_array(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 16 bytes as a [`Bytes`], the type of `instance_uid` fields in messages.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }
}

impl From<[u8; 16]> for InstanceUid {
    fn from(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl TryFrom<&[u8]> for InstanceUid {
    type Error = InvalidInstanceUid;

    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 16]>::try_from(bytes)
            .map(Self)
            .map_err(|_| InvalidInstanceUid::Length(bytes.len()))
    }
}

impl From<InstanceUid> for Bytes {
    fn from(uid: InstanceUid) -> Self {
        uid.to_bytes()
    }
}

impl fmt::Display for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = uuid::Uuid::encode_buffer();
        f.write_str(
            uuid::Uuid::from_bytes(self.0)
                .hyphenated()
                .encode_lower(&mut buf),
        )
    }
}

impl fmt::Debug for InstanceUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceUid({self})")
    }
}

impl FromStr for InstanceUid {
    type Err = InvalidInstanceUid;

    /// Parses the canonical hyphenated form only (HTTP-5): 36 characters, hyphens at 8-4-4-4-12.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // uuid's parser also takes simple, braced and URN forms; the header has one form.
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return Err(InvalidInstanceUid::Text);
        }
        uuid::Uuid::try_parse(s)
            .map(|u| Self(*u.as_bytes()))
            .map_err(|_| InvalidInstanceUid::Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_uids_are_version_7_and_distinct() {
        let a = InstanceUid::new_v7();
        let b = InstanceUid::new_v7();
        assert_ne!(a, b);
        assert_eq!(a.as_array()[6] >> 4, 7, "UUID version nibble");
        assert_eq!(a.as_array()[8] >> 6, 0b10, "RFC 4122 variant");
    }

    #[test]
    fn http_5_text_form_is_canonical_hyphenated_and_round_trips() {
        let uid = InstanceUid::from_array([
            0xf8, 0x1d, 0x4f, 0xae, 0x7d, 0xec, 0x11, 0xd0, 0xa7, 0x65, 0x00, 0xa0, 0xc9, 0x1e,
            0x6b, 0xf6,
        ]);
        assert_eq!(uid.to_string(), "f81d4fae-7dec-11d0-a765-00a0c91e6bf6");
        assert_eq!(
            "f81d4fae-7dec-11d0-a765-00a0c91e6bf6".parse::<InstanceUid>(),
            Ok(uid)
        );
        assert_eq!(
            "F81D4FAE-7DEC-11D0-A765-00A0C91E6BF6".parse::<InstanceUid>(),
            Ok(uid)
        );
    }

    #[test]
    fn non_canonical_text_is_rejected() {
        for bad in [
            "",
            "f81d4fae7dec11d0a76500a0c91e6bf6",
            "{f81d4fae-7dec-11d0-a765-00a0c91e6bf6}",
            "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            "f81d4fae-7dec-11d0-a765-00a0c91e6bfg",
            "f81d4fae-7dec-11d0-a765-00a0c91e6bf6-",
            "f81d4fa-e7dec-11d0-a765-00a0c91e6bf6",
        ] {
            assert_eq!(
                bad.parse::<InstanceUid>(),
                Err(InvalidInstanceUid::Text),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn uid_2_bytes_must_be_16_long() {
        assert_eq!(
            InstanceUid::try_from(&[0u8; 15][..]),
            Err(InvalidInstanceUid::Length(15))
        );
        assert_eq!(
            InstanceUid::try_from(&[0u8; 17][..]),
            Err(InvalidInstanceUid::Length(17))
        );
        assert!(InstanceUid::try_from(&[7u8; 16][..]).is_ok());
    }
}
