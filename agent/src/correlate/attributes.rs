//! What a span says about an HTTP exchange: its name and the OpenTelemetry
//! HTTP semantic-convention attributes. Pure functions of the exchange.

use std::net::{IpAddr, SocketAddr};

use crate::http::Exchange;
use crate::span::{Attribute, AttributeValue, SpanKind, SpanStatus, Text, TextBuilder};

/// Choices about what spans record, from the configuration.
#[derive(Clone, Debug)]
pub struct SpanSettings {
    /// Request headers recorded as `http.request.header.<name>` (lower-case).
    pub request_headers: Vec<String>,
    /// Response headers recorded as `http.response.header.<name>` (lower-case).
    pub response_headers: Vec<String>,
    /// Query parameters whose values are replaced by `REDACTED`.
    pub redact_query_parameters: Vec<String>,
    /// Collapse id-like path segments into `{id}` for span names.
    pub route_heuristic: bool,
}

impl Default for SpanSettings {
    fn default() -> Self {
        Self {
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            redact_query_parameters: DEFAULT_REDACTED_QUERY_PARAMETERS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            route_heuristic: true,
        }
    }
}

/// A [`SpanSettings`] value refused by [`SpanSettings::validate`]: which
/// field, and why (the reason names the value given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpanSettingsError {
    /// A name in `request_headers`.
    #[error("request_headers: {0}")]
    RequestHeaders(String),
    /// A name in `response_headers`.
    #[error("response_headers: {0}")]
    ResponseHeaders(String),
    /// A name in `redact_query_parameters`.
    #[error("redact_query_parameters: {0}")]
    RedactQueryParameters(String),
}

impl SpanSettingsError {
    /// Why the field's value was refused, without the field's name.
    pub fn reason(&self) -> &str {
        match self {
            Self::RequestHeaders(reason)
            | Self::ResponseHeaders(reason)
            | Self::RedactQueryParameters(reason) => reason,
        }
    }
}

impl SpanSettings {
    /// Checks the names: headers to record are valid lower-case header
    /// names ([`crate::http::check_header_name`]) and never one of
    /// [`SENSITIVE_HEADERS`]; query parameters to redact are non-empty and
    /// lower-case. The first problem found, request headers first.
    pub fn validate(&self) -> Result<(), SpanSettingsError> {
        type Field = fn(String) -> SpanSettingsError;
        for (field, names) in [
            (
                SpanSettingsError::RequestHeaders as Field,
                &self.request_headers,
            ),
            (SpanSettingsError::ResponseHeaders, &self.response_headers),
        ] {
            for name in names {
                crate::http::check_header_name(name).map_err(|e| field(e.to_string()))?;
                if SENSITIVE_HEADERS.contains(&name.as_str()) {
                    return Err(field(format!(
                        "{name} cannot be recorded: the values of {} never leave the agent",
                        SENSITIVE_HEADERS.join(", ")
                    )));
                }
            }
        }
        for name in &self.redact_query_parameters {
            if name.is_empty() {
                return Err(SpanSettingsError::RedactQueryParameters(
                    "must not contain an empty name".into(),
                ));
            }
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(SpanSettingsError::RedactQueryParameters(format!(
                    "name {name:?} must be lower-case"
                )));
            }
        }
        Ok(())
    }
}

/// Headers whose values never leave the agent, whatever the settings
/// ([`SpanSettings::validate`] also refuses to list them in
/// `request_headers` or `response_headers`, so nobody believes credentials
/// are being recorded, or makes them recorded by a later change).
pub const SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "set-cookie",
    "proxy-authorization",
];

/// Query parameters whose values are redacted unless
/// `http.redact_query_parameters` says otherwise.
pub const DEFAULT_REDACTED_QUERY_PARAMETERS: &[&str] = &[
    "token",
    "access_token",
    "password",
    "secret",
    "api_key",
    "key",
    "sig",
    "signature",
    "auth",
];

/// Methods the semantic conventions know; others are reported as `_OTHER`.
const KNOWN_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY",
];

/// The route the heuristic derives from a path: segments that look like
/// ids (all digits, a UUID, or 16+ hex digits) become `{id}`, so span names
/// stay low-cardinality.
pub fn heuristic_route(path: &str) -> Text {
    let mut route = TextBuilder::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            route.push('/');
        }
        if looks_like_id(segment) {
            route.push_str("{id}");
        } else {
            route.push_str(segment);
        }
    }
    route.finish()
}

fn looks_like_id(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let all_digits = segment.bytes().all(|b| b.is_ascii_digit());
    let uuid = segment.len() == 36
        && segment.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    let long_hex = segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit());
    all_digits || uuid || long_hex
}

/// `url.query` with the values of sensitive parameters replaced.
pub fn redact_query(query: &str, sensitive: &[String]) -> String {
    let mut out = String::with_capacity(query.len());
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, _)) if sensitive.iter().any(|s| s.eq_ignore_ascii_case(name)) => {
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
    out
}

/// The span name, `{method} {route}` when a route is known, else
/// `{method}`, from the attributes [`attributes`] gave the exchange (the
/// route is derived once, for both).
pub fn span_name_from(attributes: &[Attribute]) -> Text {
    let text = |key: &str| {
        attributes.iter().find_map(|a| match &a.value {
            AttributeValue::String(s) if a.key == key => Some(s.as_ref()),
            _ => None,
        })
    };
    let method = text("http.request.method").unwrap_or("_OTHER");
    let route = text("http.route");
    let mut name = TextBuilder::with_capacity(method.len() + 1 + route.map_or(0, str::len));
    name.push_str(method);
    if let Some(route) = route {
        name.push(' ');
        name.push_str(route);
    }
    name.finish()
}

/// The method as the conventions name it: a known method (the static
/// string, so that the attribute does not allocate) or `_OTHER`.
fn normalized_method(method: &str) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| **known == method)
        .copied()
        .unwrap_or("_OTHER")
}

/// Path and query of a request target; absolute-form targets (proxies) give
/// their path.
fn split_target(target: &str) -> (&str, Option<&str>) {
    let without_authority = match target.find("://") {
        Some(scheme_end) => {
            let rest = &target[scheme_end + 3..];
            rest.find('/').map_or("/", |i| &rest[i..])
        }
        None => target,
    };
    match without_authority.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (without_authority, None),
    }
}

/// Host and port from a Host header value.
fn host_and_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        if let Some((addr, after)) = rest.split_once(']') {
            return (addr, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty() => {
            (h, p.parse().ok())
        }
        _ => (host, None),
    }
}

/// An address as text, the way `Display` writes it. IPv4 is written by
/// hand: it is formatted for every span, and the formatting machinery
/// behind `to_string` costs several times the few bytes it writes.
fn address_text(ip: IpAddr) -> Text {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string().into();
    };
    let mut text = TextBuilder::default();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text.finish()
}

/// The socket's view of the exchange: this process's end and the peer's.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    /// This process's end.
    pub local: SocketAddr,
    /// The peer's end.
    pub remote: SocketAddr,
}

/// The semantic-convention attributes of one exchange.
pub fn attributes(
    exchange: &Exchange,
    kind: SpanKind,
    ends: Endpoints,
    settings: &SpanSettings,
) -> Vec<Attribute> {
    let request = &exchange.request;
    let mut out = Vec::with_capacity(16);
    let method = normalized_method(request.method());
    out.push(Attribute::string("http.request.method", method));
    if method == "_OTHER" {
        out.push(Attribute::string(
            "http.request.method_original",
            Text::copy(request.method()),
        ));
    }
    let (path, query) = split_target(request.target());
    out.push(Attribute::string("url.path", Text::copy(path)));
    if let Some(query) = query {
        out.push(Attribute::string(
            "url.query",
            redact_query(query, &settings.redact_query_parameters),
        ));
    }
    out.push(Attribute::string("url.scheme", "http"));
    if settings.route_heuristic && path.starts_with('/') {
        out.push(Attribute::string("http.route", heuristic_route(path)));
    }
    if let Some(response) = &exchange.response {
        out.push(Attribute::int(
            "http.response.status_code",
            response.status as i64,
        ));
    }
    out.push(Attribute::string(
        "network.protocol.version",
        match request.minor_version {
            0 => "1.0",
            _ => "1.1",
        },
    ));

    // server.* names the server as the client addressed it (Host), falling
    // back to the socket; client.* and network.peer.* come from the socket.
    let host = request.header("host").map(String::from_utf8_lossy);
    let server_socket = if kind == SpanKind::Server {
        ends.local
    } else {
        ends.remote
    };
    let (server_address, server_port) = match host.as_deref().map(str::trim) {
        Some(h) if !h.is_empty() => {
            let (name, port) = host_and_port(h);
            (Text::copy(name), port.unwrap_or(server_socket.port()))
        }
        _ => (address_text(server_socket.ip()), server_socket.port()),
    };
    out.push(Attribute::string("server.address", server_address));
    out.push(Attribute::int("server.port", server_port as i64));
    let peer_address = address_text(ends.remote.ip());
    if kind == SpanKind::Server {
        out.push(Attribute::string("client.address", peer_address.clone()));
        out.push(Attribute::int("client.port", ends.remote.port() as i64));
    }
    out.push(Attribute::string("network.peer.address", peer_address));
    out.push(Attribute::int(
        "network.peer.port",
        ends.remote.port() as i64,
    ));
    if let Some(agent) = request.header("user-agent") {
        out.push(Attribute::string(
            "user_agent.original",
            Text::copy(&String::from_utf8_lossy(agent)),
        ));
    }
    for name in &settings.request_headers {
        if SENSITIVE_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let values: Vec<String> = request
            .headers_named(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if !values.is_empty() {
            out.push(Attribute::string(
                format!("http.request.header.{name}"),
                values.join(","),
            ));
        }
    }
    if let Some(response) = &exchange.response {
        for name in &settings.response_headers {
            if SENSITIVE_HEADERS.contains(&name.as_str()) {
                continue;
            }
            let values: Vec<String> = response
                .headers_named(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            if !values.is_empty() {
                out.push(Attribute::string(
                    format!("http.response.header.{name}"),
                    values.join(","),
                ));
            }
        }
    }
    out
}

/// Error for 5xx on servers and 4xx/5xx on clients; a request that never
/// got a response is an error on both sides.
pub fn status(exchange: &Exchange, kind: SpanKind) -> SpanStatus {
    match &exchange.response {
        None => SpanStatus::Error("no response".to_string()),
        Some(r) if r.status >= 500 => SpanStatus::Error(format!("HTTP {}", r.status)),
        Some(r) if r.status >= 400 && kind == SpanKind::Client => {
            SpanStatus::Error(format!("HTTP {}", r.status))
        }
        Some(_) => SpanStatus::Unset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_text_writes_what_display_writes() {
        for octet in 0..=255u8 {
            let ip = IpAddr::from([octet, 255 - octet, octet / 2, octet % 10]);
            assert_eq!(address_text(ip), ip.to_string());
        }
        for ip in ["::1", "fe80::1", "2001:db8::8a2e:370:7334"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_text(ip), ip.to_string());
        }
    }

    #[test]
    fn span_settings_refuse_sensitive_and_malformed_names() {
        assert_eq!(SpanSettings::default().validate(), Ok(()));
        let headers = |request: &[&str], response: &[&str]| SpanSettings {
            request_headers: request.iter().map(|s| s.to_string()).collect(),
            response_headers: response.iter().map(|s| s.to_string()).collect(),
            ..SpanSettings::default()
        };
        assert_eq!(
            headers(&["x-request-id"], &["content-type"]).validate(),
            Ok(())
        );
        for name in SENSITIVE_HEADERS {
            let e = headers(&["x-request-id", name], &[])
                .validate()
                .unwrap_err();
            assert_eq!(
                e,
                SpanSettingsError::RequestHeaders(format!(
                    "{name} cannot be recorded: the values of authorization, cookie, \
                     set-cookie, proxy-authorization never leave the agent"
                ))
            );
            let e = headers(&[], &[name]).validate().unwrap_err();
            assert!(matches!(e, SpanSettingsError::ResponseHeaders(_)), "{e}");
        }
        let e = headers(&["x request"], &[]).validate().unwrap_err();
        assert_eq!(e.reason(), "\"x request\" is not a valid header name");
        let redact = |names: &[&str]| SpanSettings {
            redact_query_parameters: names.iter().map(|s| s.to_string()).collect(),
            ..SpanSettings::default()
        };
        assert_eq!(
            redact(&["token", ""]).validate().unwrap_err().to_string(),
            "redact_query_parameters: must not contain an empty name"
        );
        assert_eq!(
            redact(&["Token"]).validate().unwrap_err().reason(),
            "name \"Token\" must be lower-case"
        );
    }

    #[test]
    fn route_heuristic_collapses_numeric_uuid_and_long_hex_segments() {
        assert_eq!(heuristic_route("/users/42/orders"), "/users/{id}/orders");
        assert_eq!(
            heuristic_route("/o/123e4567-e89b-12d3-a456-426614174000"),
            "/o/{id}"
        );
        assert_eq!(heuristic_route("/blob/0123456789abcdef0123"), "/blob/{id}");
        assert_eq!(heuristic_route("/v1/items"), "/v1/items");
        assert_eq!(heuristic_route("/"), "/");
        assert_eq!(
            heuristic_route("/cafe"),
            "/cafe",
            "short hex words are not ids"
        );
    }

    #[test]
    fn sensitive_query_values_are_redacted_and_others_kept() {
        let sensitive = vec!["token".to_string(), "password".to_string()];
        assert_eq!(
            redact_query("a=1&token=abc&Password=x&b", &sensitive),
            "a=1&token=REDACTED&Password=REDACTED&b"
        );
        assert_eq!(redact_query("", &sensitive), "");
    }

    #[test]
    fn targets_split_into_path_and_query() {
        assert_eq!(split_target("/a/b?x=1"), ("/a/b", Some("x=1")));
        assert_eq!(split_target("/a"), ("/a", None));
        assert_eq!(split_target("http://example.com/p?q"), ("/p", Some("q")));
        assert_eq!(split_target("http://example.com"), ("/", None));
        assert_eq!(split_target("*"), ("*", None));
    }

    #[test]
    fn host_header_forms() {
        assert_eq!(
            host_and_port("example.com:8080"),
            ("example.com", Some(8080))
        );
        assert_eq!(host_and_port("example.com"), ("example.com", None));
        assert_eq!(host_and_port("[::1]:80"), ("::1", Some(80)));
    }

    #[test]
    fn sensitive_headers_are_the_four_the_guide_names() {
        for h in [
            "authorization",
            "cookie",
            "set-cookie",
            "proxy-authorization",
        ] {
            assert!(SENSITIVE_HEADERS.contains(&h));
        }
    }
}
