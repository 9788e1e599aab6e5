//! The client's error type.

use std::time::Duration;

use zhibo_proto::client::ErrorCode;
use zhibo_proto::codec::CodecError;

/// What can go wrong talking to a gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection could not be opened (refused, unreachable, bad address).
    #[error("connect {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A QUIC endpoint, handshake or stream failed.
    #[error("quic {addr}: {message}")]
    Quic {
        /// The address tried.
        addr: String,
        /// Why.
        message: String,
    },
    /// The WebSocket handshake or a WebSocket read/write failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// A frame could not be encoded or decoded, or the socket failed.
    #[error("frame: {0}")]
    Codec(#[from] CodecError),
    /// Nothing arrived in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The server closed the connection (or the network cut it) before the answer.
    #[error("connection closed")]
    Closed,
    /// The server refused the sign-in (bad or expired token, unknown device…): retrying cannot help.
    #[error("sign-in refused: {code:?}: {message}")]
    Refused {
        /// The server's code.
        code: ErrorCode,
        /// The server's text.
        message: String,
    },
    /// The server answered a request with an error.
    #[error("server answered {code:?}: {message}")]
    Server {
        /// The server's code.
        code: ErrorCode,
        /// The server's text.
        message: String,
    },
    /// The server sent something the protocol does not allow here.
    #[error("unexpected packet: {0}")]
    Unexpected(String),
    /// The server kicked this connection; the client does not reconnect.
    #[error("kicked: {0}")]
    Kicked(String),
    /// The client was closed by the application.
    #[error("client closed")]
    Shutdown,
    /// The operation is not possible on this transport (e.g. a raw WebSocket without a sign-in URL).
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
}

impl Error {
    /// The server's error code, when the server refused something.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Refused { code, .. } | Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether reconnecting may help (network failures, a server going away), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Refused { code, .. } => {
                matches!(
                    code,
                    ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal
                )
            }
            Error::Kicked(_) | Error::Shutdown | Error::Unsupported(_) => false,
            _ => true,
        }
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Codec(CodecError::Io(e))
    }
}

/// The code of an `Error` packet.
pub(crate) fn code_of(e: &zhibo_proto::client::Error) -> ErrorCode {
    ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified)
}
