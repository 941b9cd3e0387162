//! HTTP stage: captured message bytes in, HTTP/1.x exchanges out.
//!
//! [`HttpConnection`] parses both directions of one TCP connection
//! incrementally (heads split across messages, bodies walked over by their
//! framing without being copied, pipelining, interim responses, protocol
//! switches, messages the capture cut short) and pairs requests with
//! responses into [`Exchange`]s. [`start_line`] only reads the first line
//! of a message, for views that need no more.
//!
//! - `head`: heads via httparse;
//! - `framing`: where a body ends by the framing fields, the method and the
//!   status (RFC 9112 section 6), leniently here and strictly for the proxy;
//! - `body`: Content-Length, chunked and close-delimited bodies (the
//!   proxy walks bodies with it too);
//! - `connection`: the per-direction state machines and the pairing.

pub(crate) mod body;
mod connection;
pub(crate) mod framing;
mod head;

pub use connection::{Exchange, HttpConnection, StreamDirection};
pub use head::{Fields, RequestHead, ResponseHead};

/// The start line of an HTTP/1.x message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartLine {
    /// `METHOD target HTTP/1.x`.
    Request {
        /// Request method.
        method: String,
        /// Request target as sent (path and query).
        target: String,
        /// Minor version: 0 or 1.
        version: u8,
    },
    /// `HTTP/1.x code reason`.
    Response {
        /// Minor version: 0 or 1.
        version: u8,
        /// Status code.
        status: u16,
        /// Reason phrase.
        reason: String,
    },
}

/// `tchar` of RFC 9110 section 5.6.2: the characters of a token (a method,
/// a field name, a transfer coding).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Why a configured header name is refused ([`check_header_name`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderNameError {
    /// Empty, or holding a character that is not a token character.
    #[error("{0:?} is not a valid header name")]
    Invalid(String),
    /// Holding an upper-case letter.
    #[error("header name {0:?} must be lower-case")]
    NotLowerCase(String),
}

/// Checks a header name given in settings (headers to record, headers to
/// send): RFC 9110 token characters only, and lower-case. Names are
/// lower-cased when parsed; one built in code must be too, or the stages
/// that compare names with `==` would miss it.
pub fn check_header_name(name: &str) -> Result<(), HeaderNameError> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(HeaderNameError::Invalid(name.to_string()));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(HeaderNameError::NotLowerCase(name.to_string()));
    }
    Ok(())
}

/// Headers the start-line reader looks at; more are not needed to find it.
const MAX_HEADERS: usize = 64;

/// Reads the start line at the beginning of `bytes`, if they begin an
/// HTTP/1.x request or response. Works on a prefix: the head need not be
/// complete, only the start line.
pub fn start_line(bytes: &[u8]) -> Option<StartLine> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    if bytes.starts_with(b"HTTP/") {
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(bytes) {
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {}
            Err(_) => return None,
        }
        return Some(StartLine::Response {
            version: response.version?,
            status: response.code?,
            reason: response.reason.unwrap_or_default().to_string(),
        });
    }
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {}
        Err(_) => return None,
    }
    Some(StartLine::Request {
        method: request.method?.to_string(),
        target: request.path?.to_string(),
        version: request.version?,
    })
}

impl std::fmt::Display for StartLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Request {
                method,
                target,
                version,
            } => write!(f, "{method} {target} HTTP/1.{version}"),
            Self::Response {
                version,
                status,
                reason,
            } => write!(f, "HTTP/1.{version} {status} {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_is_read_from_a_complete_head() {
        let line = start_line(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(
            line,
            StartLine::Request {
                method: "GET".into(),
                target: "/a?b=1".into(),
                version: 1
            }
        );
        assert_eq!(line.to_string(), "GET /a?b=1 HTTP/1.1");
    }

    #[test]
    fn request_line_is_read_from_a_partial_head() {
        let line = start_line(b"POST /upload HTTP/1.0\r\nContent-Len").unwrap();
        assert!(
            matches!(line, StartLine::Request { ref method, version: 0, .. } if method == "POST")
        );
    }

    #[test]
    fn status_line_is_read() {
        let line = start_line(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap();
        assert_eq!(
            line,
            StartLine::Response {
                version: 1,
                status: 404,
                reason: "Not Found".into()
            }
        );
    }

    #[test]
    fn body_bytes_and_binary_are_not_start_lines() {
        assert_eq!(start_line(b"{\"json\": true}"), None);
        assert_eq!(start_line(&[0x16, 0x03, 0x01, 0x00, 0xa5]), None);
        assert_eq!(start_line(b""), None);
        assert_eq!(start_line(b"GET"), None);
    }

    #[test]
    fn configured_header_names_are_tokens_in_lower_case() {
        for good in ["x-request-id", "traceparent", "x_b3!"] {
            assert_eq!(check_header_name(good), Ok(()), "{good}");
        }
        assert_eq!(
            check_header_name("x request").unwrap_err().to_string(),
            "\"x request\" is not a valid header name"
        );
        assert!(check_header_name("").is_err());
        assert_eq!(
            check_header_name("X-Api-Key").unwrap_err().to_string(),
            "header name \"X-Api-Key\" must be lower-case"
        );
    }
}
