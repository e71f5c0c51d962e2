//! WebSocket settings for OpAMP over tokio-tungstenite (WS-1..WS-10).
//!
//! tungstenite's defaults (128 KiB read buffer, allocated eagerly per connection, and 128 KiB
//! write buffering) suit a few busy sockets, not a server holding 100k mostly idle agents. The
//! configurations here use small buffers and make the OpAMP message limit the WebSocket limit.

pub use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Default read buffer per WebSocket connection: 4 KiB.
pub const DEFAULT_READ_BUFFER_SIZE: usize = 4 * 1024;

/// Default write buffering threshold: 0, every message is written out at once (OpAMP messages
/// are few and latency matters more than batching).
pub const DEFAULT_WRITE_BUFFER_SIZE: usize = 0;

/// Close code for a message over the receive limit: 1009, Message Too Big (WS-9, WS-10).
pub const CLOSE_MESSAGE_TOO_BIG: CloseCode = CloseCode::Size;

/// Close code for a message that breaks the OpAMP framing (a text frame, a non-zero header):
/// 1003 Unsupported Data for text, 1007 Invalid Payload for a malformed binary message.
pub const CLOSE_UNSUPPORTED_DATA: CloseCode = CloseCode::Unsupported;

/// Close code for a malformed binary message: 1007, Invalid Frame Payload Data.
pub const CLOSE_INVALID_PAYLOAD: CloseCode = CloseCode::Invalid;

/// Close code for a normal close, used on graceful stop (WS-16, WS-17).
pub const CLOSE_NORMAL: CloseCode = CloseCode::Normal;

/// Close code a server uses when it is going away (shutting down).
pub const CLOSE_GOING_AWAY: CloseCode = CloseCode::Away;

/// WebSocket settings for a connection with the given limit on incoming messages and the
/// default small buffers.
///
/// The whole message, header included, is limited (WS-8); a single frame may carry a whole
/// message, so the frame limit equals the message limit. The write buffer is capped at
/// `max_message_size` plus the read buffer so a stalled peer cannot make it grow without bound.
pub fn config(max_message_size: usize) -> WebSocketConfig {
    config_with_buffers(
        max_message_size,
        DEFAULT_READ_BUFFER_SIZE,
        DEFAULT_WRITE_BUFFER_SIZE,
    )
}

/// Like [`config`], with explicit buffer sizes.
pub fn config_with_buffers(
    max_message_size: usize,
    read_buffer_size: usize,
    write_buffer_size: usize,
) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer_size)
        .write_buffer_size(write_buffer_size)
        .max_write_buffer_size(
            max_message_size
                .saturating_add(write_buffer_size)
                .saturating_add(read_buffer_size),
        )
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Server-side settings: [`config`] (WS-9 limit on incoming `AgentToServer`).
pub fn server_config(max_message_size: usize) -> WebSocketConfig {
    config(max_message_size)
}

/// Client-side settings: [`config`] (WS-10 limit on incoming `ServerToAgent`).
pub fn client_config(max_message_size: usize) -> WebSocketConfig {
    config(max_message_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_and_the_opamp_limit() {
        let c = server_config(crate::DEFAULT_MAX_MESSAGE_SIZE);
        assert_eq!(c.read_buffer_size, 4096);
        assert_eq!(c.write_buffer_size, 0);
        assert_eq!(c.max_message_size, Some(64 << 20));
        assert_eq!(c.max_frame_size, Some(64 << 20));
        assert!(c.max_write_buffer_size < usize::MAX);
        assert_eq!(u16::from(CLOSE_MESSAGE_TOO_BIG), 1009);
    }
}
