//! The OpAMP WebSocket message framing (WS-1..WS-9).
//!
//! One OpAMP message is one binary WebSocket message: a header, a protobuf base-128 varint
//! whose value is 0 in this version of the protocol, then the encoded protobuf payload (WS-2,
//! WS-3). The encoder always writes the one-byte header `0x00`. The decoder reads a full
//! varint (1 to 10 bytes), so a multi-byte encoding of 0 is accepted, and it rejects a
//! non-zero or truncated header as malformed (WS-4). The payload is whatever follows the header
//! (WS-5) and may be empty (WS-6).
//!
//! Size limits apply to the whole WebSocket message, header included (WS-8); the recommended
//! default is [`DEFAULT_MAX_MESSAGE_SIZE`], 64 MiB.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// The recommended default limit on one OpAMP message in any direction: 64 MiB (WS-8, HTTP-13).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// The header this version of the protocol writes: the varint 0 (WS-3).
pub const HEADER: u8 = 0x00;

/// Why a WebSocket message is not a valid OpAMP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message is larger than the receive limit (WS-9, WS-10). A WebSocket peer should
    /// close with status 1009.
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
    /// The message ended inside the varint header, or was empty (WS-2).
    #[error("truncated OpAMP header")]
    TruncatedHeader,
    /// The varint header is longer than 10 bytes or does not fit in 64 bits.
    #[error("malformed OpAMP header varint")]
    MalformedHeader,
    /// The header is a valid varint but not 0; such values are reserved (WS-3, WS-4).
    #[error("unsupported OpAMP header value {0} (only 0 is defined)")]
    NonZeroHeader(u64),
    /// The payload is not a valid protobuf encoding of the expected message.
    #[error("invalid protobuf payload: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// The payload would decode into more elements than the limit
    /// ([`elements`](crate::elements)); it was not decoded.
    #[error(transparent)]
    TooManyElements(#[from] crate::elements::TooManyElements),
}

/// A message is over a size limit (WS-9..WS-12, HTTP-14..HTTP-17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message of {size} bytes exceeds the limit of {limit} bytes")]
pub struct MessageTooLarge {
    /// The size of the message in bytes (a lower bound where reading stopped at the limit).
    pub size: usize,
    /// The limit in force.
    pub limit: usize,
}

/// Checks `size` against `limit`.
pub fn check_size(size: usize, limit: usize) -> Result<(), MessageTooLarge> {
    if size > limit {
        Err(MessageTooLarge { size, limit })
    } else {
        Ok(())
    }
}

/// Encodes `message` as one WebSocket message: the header `0x00`, then the payload.
pub fn encode<M: Message>(message: &M) -> Bytes {
    let mut buf = BytesMut::with_capacity(1 + message.encoded_len());
    encode_to(message, &mut buf);
    buf.freeze()
}

/// Appends the framed `message` to `buf`.
pub fn encode_to<M: Message>(message: &M, buf: &mut BytesMut) {
    buf.reserve(1 + message.encoded_len());
    buf.put_u8(HEADER);
    // Cannot fail: the buffer has just been given room for the whole message.
    message.encode_raw(buf);
}

/// Encodes `message` framed, unless the framed size is over `limit`: a sender MUST NOT send
/// such a message (WS-11, WS-12).
pub fn encode_with_limit<M: Message>(message: &M, limit: usize) -> Result<Bytes, MessageTooLarge> {
    check_size(1 + message.encoded_len(), limit)?;
    Ok(encode(message))
}

/// Checks the size and the header of a framed message and returns its payload.
pub fn payload(frame: &[u8], limit: usize) -> Result<&[u8], DecodeError> {
    check_size(frame.len(), limit)?;
    let header_len = read_zero_header(frame)?;
    Ok(&frame[header_len..])
}

/// Decodes a framed message of type `M`, checking size and header first.
pub fn decode<M: Message + Default>(frame: &[u8], limit: usize) -> Result<M, DecodeError> {
    Ok(M::decode(payload(frame, limit)?)?)
}

/// Like [`decode`], but first counts the elements the payload decodes into and refuses it,
/// without decoding, past `max_elements` ([`elements`](crate::elements)).
pub fn decode_limited<M>(frame: &[u8], limit: usize, max_elements: usize) -> Result<M, DecodeError>
where
    M: Message + Default + crate::elements::CountElements,
{
    let payload = payload(frame, limit)?;
    crate::elements::count_elements::<M>(payload, max_elements)?;
    Ok(M::decode(payload)?)
}

/// Like [`decode`], but `bytes` fields of the result share `frame`'s memory instead of copying.
pub fn decode_bytes<M: Message + Default>(frame: Bytes, limit: usize) -> Result<M, DecodeError> {
    check_size(frame.len(), limit)?;
    let header_len = read_zero_header(&frame)?;
    Ok(M::decode(frame.slice(header_len..))?)
}

/// Like [`decode_bytes`], but first counts the elements the payload decodes into and
/// refuses it, without decoding, past `max_elements` ([`elements`](crate::elements)).
pub fn decode_bytes_limited<M>(
    frame: Bytes,
    limit: usize,
    max_elements: usize,
) -> Result<M, DecodeError>
where
    M: Message + Default + crate::elements::CountElements,
{
    check_size(frame.len(), limit)?;
    let header_len = read_zero_header(&frame)?;
    crate::elements::count_elements::<M>(&frame[header_len..], max_elements)?;
    Ok(M::decode(frame.slice(header_len..))?)
}

/// Reads the varint header at the start of `frame`; returns its length if its value is 0.
fn read_zero_header(frame: &[u8]) -> Result<usize, DecodeError> {
    let mut value: u64 = 0;
    for (i, &byte) in frame.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        // The tenth byte may only carry the top bit of a u64.
        if i == 9 && byte > 1 {
            return Err(DecodeError::MalformedHeader);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return if value == 0 {
                Ok(i + 1)
            } else {
                Err(DecodeError::NonZeroHeader(value))
            };
        }
    }
    if frame.len() >= 10 {
        Err(DecodeError::MalformedHeader)
    } else {
        Err(DecodeError::TruncatedHeader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentToServer, ServerToAgent};

    fn report() -> AgentToServer {
        AgentToServer {
            instance_uid: Bytes::from_static(&[1; 16]),
            sequence_num: 7,
            capabilities: 1,
            ..Default::default()
        }
    }

    #[test]
    fn ws_2_round_trip() {
        let frame = encode(&report());
        assert_eq!(frame[0], 0);
        assert_eq!(
            decode::<AgentToServer>(&frame, DEFAULT_MAX_MESSAGE_SIZE),
            Ok(report())
        );
        assert_eq!(
            decode_bytes::<AgentToServer>(frame, DEFAULT_MAX_MESSAGE_SIZE),
            Ok(report())
        );
    }

    #[test]
    fn ws_6_only_header_is_an_empty_message() {
        assert_eq!(
            decode::<ServerToAgent>(&[0x00], DEFAULT_MAX_MESSAGE_SIZE),
            Ok(ServerToAgent::default())
        );
        assert_eq!(&encode(&ServerToAgent::default())[..], &[0x00]);
    }

    #[test]
    fn ws_4_multi_byte_zero_header_is_accepted() {
        let mut frame = vec![0x80, 0x80, 0x00];
        frame.extend_from_slice(&report().encode_to_vec());
        assert_eq!(
            decode::<AgentToServer>(&frame, DEFAULT_MAX_MESSAGE_SIZE),
            Ok(report())
        );
        // The longest legal encoding of 0: ten bytes.
        let mut frame = vec![0x80; 9];
        frame.push(0x00);
        assert_eq!(payload(&frame, 100), Ok(&[][..]));
    }

    #[test]
    fn ws_4_non_zero_header_is_malformed() {
        assert_eq!(
            payload(&[0x01, 0x08], 100),
            Err(DecodeError::NonZeroHeader(1))
        );
        assert_eq!(
            payload(&[0x96, 0x01], 100),
            Err(DecodeError::NonZeroHeader(150))
        );
        // A protobuf message sent with no header (legacy) starts with a field tag, not 0.
        let legacy = report().encode_to_vec();
        assert!(matches!(
            payload(&legacy, 100),
            Err(DecodeError::NonZeroHeader(_))
        ));
    }

    #[test]
    fn ws_2_truncated_or_overlong_header_is_malformed() {
        assert_eq!(payload(&[], 100), Err(DecodeError::TruncatedHeader));
        assert_eq!(payload(&[0x80], 100), Err(DecodeError::TruncatedHeader));
        assert_eq!(payload(&[0xff; 9], 100), Err(DecodeError::TruncatedHeader));
        assert_eq!(payload(&[0x80; 11], 100), Err(DecodeError::MalformedHeader));
        let mut overflow = vec![0x80; 9];
        overflow.push(0x02);
        assert_eq!(payload(&overflow, 100), Err(DecodeError::MalformedHeader));
    }

    #[test]
    fn ws_9_oversized_message_is_rejected_before_decoding() {
        let frame = encode(&report());
        let limit = frame.len() - 1;
        assert_eq!(
            decode::<AgentToServer>(&frame, limit),
            Err(DecodeError::TooLarge(MessageTooLarge {
                size: frame.len(),
                limit
            }))
        );
        assert!(decode::<AgentToServer>(&frame, frame.len()).is_ok());
    }

    #[test]
    fn ws_11_encoder_refuses_oversized_messages() {
        let len = encode(&report()).len();
        assert!(encode_with_limit(&report(), len).is_ok());
        assert_eq!(
            encode_with_limit(&report(), len - 1),
            Err(MessageTooLarge {
                size: len,
                limit: len - 1
            })
        );
    }

    #[test]
    fn garbage_payload_is_a_protobuf_error() {
        assert!(matches!(
            decode::<AgentToServer>(&[0x00, 0xff, 0xff, 0xff], 100),
            Err(DecodeError::Protobuf(_))
        ));
    }
}
