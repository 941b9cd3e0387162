//! The correlate stage on synthetic capture events: no kernel needed.

use std::net::SocketAddr;

use super::*;
use crate::capture::{ProcessName, Syscall};
use crate::proxy::RedirectScope;
use crate::span::{SpanStatus, flags};

const SERVER_PID: u32 = 100;
const CLIENT_PID: u32 = 200;

/// A process with no event loop in its mappings.
const THREADED_PID: u32 = SERVER_PID;
/// A Node.js process.
const NODE_PID: u32 = 300;
/// An nginx process.
const NGINX_PID: u32 = 400;

/// A proc filesystem with the two processes above (made once per test
/// binary; the pids of other tests are absent, so their runtime is unknown).
fn fake_proc() -> &'static std::path::Path {
    static ROOT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root =
            std::env::temp_dir().join(format!("agent-correlate-proc-{}", std::process::id()));
        for (pid, exe) in [
            (THREADED_PID, "/usr/bin/python3.11"),
            (NODE_PID, "/usr/bin/node"),
            (NGINX_PID, "/usr/sbin/nginx"),
        ] {
            let dir = root.join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            let _ = std::fs::remove_file(dir.join("exe"));
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
            std::fs::write(dir.join("maps"), "").unwrap();
        }
        root
    })
}

fn correlator(percentage: f64) -> Correlator {
    let processes = ProcessTable::new(fake_proc(), ProcessFilter::default());
    Correlator::new(
        Sampler::new(percentage, true).unwrap(),
        SpanSettings::default(),
        processes,
    )
}

fn connection(id: u64, pid: u32, role: Role, local: &str, remote: &str) -> Connection {
    Connection {
        id: ConnectionId(id),
        pid,
        fd: 5,
        role,
        local: local.parse::<SocketAddr>().unwrap(),
        remote: remote.parse::<SocketAddr>().unwrap(),
    }
}

fn message(
    connection: Connection,
    tid: u32,
    direction: Direction,
    ts: u64,
    bytes: &[u8],
) -> CaptureEvent<'static> {
    CaptureEvent::Data(Message {
        connection,
        tid,
        direction,
        syscall: Syscall::Read,
        timestamp_ns: ts,
        len: bytes.len() as u32,
        bytes: bytes.to_vec().into(),
        truncated: false,
        python_context: 0,
    })
}

fn run(c: &mut Correlator, events: &[CaptureEvent]) -> Vec<Span> {
    let mut spans = Vec::new();
    for e in events {
        c.handle(e, &mut spans);
    }
    spans
}

fn server_conn() -> Connection {
    connection(
        1,
        SERVER_PID,
        Role::Server,
        "10.0.0.1:8080",
        "10.0.0.9:40000",
    )
}

fn upstream_conn() -> Connection {
    connection(
        2,
        SERVER_PID,
        Role::Client,
        "10.0.0.1:50000",
        "10.0.0.2:9090",
    )
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[test]
fn inbound_request_without_traceparent_starts_a_new_random_sampled_trace() {
    let s = server_conn();
    let spans = run(
        &mut correlator(100.0),
        &[
            message(
                s,
                11,
                Direction::Ingress,
                1_000,
                b"GET /users/42?token=abc HTTP/1.1\r\nHost: shop:8080\r\nUser-Agent: t/1\r\n\r\n",
            ),
            message(s, 11, Direction::Egress, 5_000, OK),
        ],
    );
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.kind, SpanKind::Server);
    assert!(span.trace_id.is_valid() && span.span_id.is_valid());
    assert_eq!(span.parent_span_id, None);
    assert_eq!(span.flags, flags::SAMPLED | flags::RANDOM);
    assert_eq!(span.name, "GET /users/{id}");
    assert_eq!(span.end_unix_nano - span.start_unix_nano, 4_000);
    assert_eq!(span.status, SpanStatus::Unset);
    assert_eq!(
        span.attribute("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(span.attribute("url.path").as_deref(), Some("/users/42"));
    assert_eq!(
        span.attribute("url.query").as_deref(),
        Some("token=REDACTED")
    );
    assert_eq!(span.attribute("server.address").as_deref(), Some("shop"));
    assert_eq!(span.attribute("server.port").as_deref(), Some("8080"));
    assert_eq!(
        span.attribute("client.address").as_deref(),
        Some("10.0.0.9")
    );
    assert_eq!(span.attribute("client.port").as_deref(), Some("40000"));
    assert_eq!(
        span.attribute("user_agent.original").as_deref(),
        Some("t/1")
    );
    assert_eq!(
        span.attribute("network.protocol.version").as_deref(),
        Some("1.1")
    );
    // The executable, read from the (fake) /proc.
    assert_eq!(span.resource.service_name, "python3.11");
}

#[test]
fn inbound_valid_traceparent_is_continued() {
    let s = server_conn();
    let spans = run(
        &mut correlator(100.0),
        &[
            message(
                s,
                11,
                Direction::Ingress,
                1,
                b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: a=1\r\n\r\n",
            ),
            message(s, 11, Direction::Egress, 2, OK),
        ],
    );
    let span = &spans[0];
    assert_eq!(span.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span.parent_span_id.unwrap().to_hex(), "b7ad6b7169203331");
    assert_ne!(span.span_id.to_hex(), "b7ad6b7169203331");
    assert_eq!(
        span.flags,
        flags::SAMPLED,
        "the random flag is copied exactly (here: unset)"
    );
    assert_eq!(span.trace_state, "a=1");
}

#[test]
fn inbound_invalid_traceparent_restarts_the_trace_and_drops_tracestate() {
    let s = server_conn();
    let spans = run(
        &mut correlator(100.0),
        &[
            message(
                s,
                11,
                Direction::Ingress,
                1,
                b"GET / HTTP/1.1\r\ntraceparent: ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\ntracestate: a=1\r\n\r\n",
            ),
            message(s, 11, Direction::Egress, 2, OK),
        ],
    );
    let span = &spans[0];
    assert_ne!(span.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span.parent_span_id, None);
    assert_eq!(span.trace_state, "");
    assert_eq!(span.flags & flags::RANDOM, flags::RANDOM);
}

#[test]
fn outbound_call_from_the_serving_thread_is_a_child_of_the_server_span() {
    let (s, u) = (server_conn(), upstream_conn());
    let spans = run(
        &mut correlator(100.0),
        &[
            message(s, 11, Direction::Ingress, 1, b"GET /front HTTP/1.1\r\n\r\n"),
            message(
                u,
                11,
                Direction::Egress,
                2,
                b"GET /back HTTP/1.1\r\nHost: backend\r\n\r\n",
            ),
            message(u, 11, Direction::Ingress, 3, OK),
            message(s, 11, Direction::Egress, 4, OK),
        ],
    );
    assert_eq!(spans.len(), 2);
    let (client, server) = (&spans[0], &spans[1]);
    assert_eq!(
        (client.kind, server.kind),
        (SpanKind::Client, SpanKind::Server)
    );
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(client.parent_span_id, Some(server.span_id));
    assert_eq!(
        client.attribute("server.address").as_deref(),
        Some("backend")
    );
    assert_eq!(
        client.attribute("network.peer.port").as_deref(),
        Some("9090")
    );
}

#[test]
fn outbound_call_from_another_thread_starts_its_own_trace() {
    let (s, u) = (server_conn(), upstream_conn());
    let spans = run(
        &mut correlator(100.0),
        &[
            message(s, 11, Direction::Ingress, 1, b"GET /front HTTP/1.1\r\n\r\n"),
            message(u, 12, Direction::Egress, 2, b"GET /back HTTP/1.1\r\n\r\n"),
            message(u, 12, Direction::Ingress, 3, OK),
            message(s, 11, Direction::Egress, 4, OK),
        ],
    );
    assert_ne!(spans[0].trace_id, spans[1].trace_id);
    assert_eq!(spans[0].parent_span_id, None);
}

fn decision(span: &Span) -> String {
    span.attribute(PARENT_DECISION_ATTRIBUTE)
        .unwrap_or_default()
}

/// An inbound request read by `tid` of `pid` on connection `id`, and an
/// outbound call sent by `caller_tid` while it is in flight.
fn call_while_serving(pid: u32, tid: u32, caller_tid: u32) -> Vec<CaptureEvent<'static>> {
    let s = connection(10, pid, Role::Server, "10.0.0.1:8080", "10.0.0.9:40000");
    let u = connection(11, pid, Role::Client, "10.0.0.1:50000", "10.0.0.2:9090");
    vec![
        message(
            s,
            tid,
            Direction::Ingress,
            1,
            b"GET /front HTTP/1.1\r\n\r\n",
        ),
        message(
            u,
            caller_tid,
            Direction::Egress,
            2,
            b"GET /back HTTP/1.1\r\n\r\n",
        ),
        message(u, caller_tid, Direction::Ingress, 3, OK),
        message(s, tid, Direction::Egress, 4, OK),
    ]
}

#[test]
fn every_span_says_how_its_parent_was_decided() {
    let spans = run(
        &mut correlator(100.0),
        &call_while_serving(THREADED_PID, 11, 11),
    );
    assert_eq!(decision(&spans[0]), "thread");
    assert_eq!(spans[0].parent_span_id, Some(spans[1].span_id));
    assert_eq!(decision(&spans[1]), "root");
    let spans = run(
        &mut correlator(100.0),
        &call_while_serving(THREADED_PID, 11, 12),
    );
    assert_eq!(decision(&spans[0]), "none-no-inbound");
}

#[test]
fn an_event_loop_never_gets_the_thread_signal_even_at_concurrency_one() {
    let spans = run(
        &mut correlator(100.0),
        &call_while_serving(NODE_PID, 11, 11),
    );
    let (client, server) = (&spans[0], &spans[1]);
    assert_eq!(client.parent_span_id, None);
    assert_ne!(client.trace_id, server.trace_id);
    assert_eq!(decision(client), "none-event-loop-javascript");
}

#[test]
fn a_process_whose_runtime_cannot_be_read_gets_no_parent() {
    let spans = run(&mut correlator(100.0), &call_while_serving(4242, 11, 11));
    assert_eq!(spans[0].parent_span_id, None);
    assert_eq!(decision(&spans[0]), "none-runtime-unknown");
}

#[test]
fn a_thread_with_two_requests_in_flight_is_never_trusted_again() {
    let mut c = correlator(100.0);
    let a = connection(
        20,
        THREADED_PID,
        Role::Server,
        "10.0.0.1:8080",
        "10.0.0.9:40001",
    );
    let b = connection(
        21,
        THREADED_PID,
        Role::Server,
        "10.0.0.1:8080",
        "10.0.0.9:40002",
    );
    let u = connection(
        22,
        THREADED_PID,
        Role::Client,
        "10.0.0.1:50000",
        "10.0.0.2:9090",
    );
    // One thread reads two requests before answering either (an event
    // loop the runtime check did not recognize): the call it then makes
    // could be for either.
    let spans = run(
        &mut c,
        &[
            message(a, 11, Direction::Ingress, 1, b"GET /a HTTP/1.1\r\n\r\n"),
            message(b, 11, Direction::Ingress, 2, b"GET /b HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Egress, 3, b"GET /back HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Ingress, 4, OK),
            message(a, 11, Direction::Egress, 5, OK),
            message(b, 11, Direction::Egress, 6, OK),
        ],
    );
    assert_eq!(spans[0].kind, SpanKind::Client);
    assert_eq!(spans[0].parent_span_id, None);
    assert_eq!(decision(&spans[0]), "none-concurrent-thread");
    // Later, one request at a time on that process: still no parent.
    let spans = run(&mut c, &call_while_serving(THREADED_PID, 11, 11));
    assert_eq!(spans[0].parent_span_id, None);
    assert_eq!(decision(&spans[0]), "none-concurrent-thread");
}

#[test]
fn a_request_answered_by_another_thread_ends_the_trust() {
    let mut c = correlator(100.0);
    let s = connection(
        30,
        THREADED_PID,
        Role::Server,
        "10.0.0.1:8080",
        "10.0.0.9:40003",
    );
    run(
        &mut c,
        &[
            message(s, 11, Direction::Ingress, 1, b"GET /a HTTP/1.1\r\n\r\n"),
            message(s, 12, Direction::Egress, 2, OK),
        ],
    );
    let spans = run(&mut c, &call_while_serving(THREADED_PID, 11, 11));
    assert_eq!(decision(&spans[0]), "none-concurrent-thread");
}

#[test]
fn a_request_left_unanswered_is_not_served_after_its_connection_closes() {
    let mut c = correlator(100.0);
    let s = connection(
        40,
        THREADED_PID,
        Role::Server,
        "10.0.0.1:8080",
        "10.0.0.9:40004",
    );
    let u = connection(
        41,
        THREADED_PID,
        Role::Client,
        "10.0.0.1:50001",
        "10.0.0.2:9090",
    );
    let spans = run(
        &mut c,
        &[
            message(s, 11, Direction::Ingress, 1, b"GET /a HTTP/1.1\r\n\r\n"),
            CaptureEvent::Closed(s),
            message(u, 11, Direction::Egress, 3, b"GET /later HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Ingress, 4, OK),
        ],
    );
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
    assert_eq!(client.parent_span_id, None);
    assert_eq!(decision(client), "none-no-inbound");
}

#[test]
fn outbound_traceparent_on_the_wire_fixes_the_client_span_id() {
    let u = connection(
        3,
        CLIENT_PID,
        Role::Client,
        "10.0.0.1:50000",
        "10.0.0.2:9090",
    );
    let spans = run(
        &mut correlator(100.0),
        &[
            message(
                u,
                7,
                Direction::Egress,
                1,
                b"GET / HTTP/1.1\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
            ),
            message(u, 7, Direction::Ingress, 2, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        ],
    );
    let span = &spans[0];
    assert_eq!(span.kind, SpanKind::Client);
    assert_eq!(span.trace_id.to_hex(), "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span.span_id.to_hex(), "b7ad6b7169203331");
    assert_eq!(
        span.status,
        SpanStatus::Error("HTTP 404".into()),
        "4xx is an error on clients"
    );
}

#[test]
fn pipelined_requests_pair_first_in_first_out() {
    let s = server_conn();
    let spans = run(
        &mut correlator(100.0),
        &[
            message(s, 11, Direction::Ingress, 1, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n"),
            message(
                s,
                11,
                Direction::Egress,
                2,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\nHTTP/1.1 503 U\r\nContent-Length: 0\r\n\r\n",
            ),
        ],
    );
    let got: Vec<(String, String)> = spans
        .iter()
        .map(|s| {
            (
                s.attribute("url.path").unwrap(),
                s.attribute("http.response.status_code").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [("/1", "200"), ("/2", "404"), ("/3", "503")].map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(
        spans[1].status,
        SpanStatus::Unset,
        "4xx is not an error on servers"
    );
    assert_eq!(spans[2].status, SpanStatus::Error("HTTP 503".into()));
}

#[test]
fn zero_percent_sampling_exports_nothing_and_counts_it() {
    let s = server_conn();
    let mut c = correlator(0.0);
    let spans = run(
        &mut c,
        &[
            message(s, 11, Direction::Ingress, 1, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Egress, 2, OK),
        ],
    );
    assert!(spans.is_empty());
    assert_eq!(c.counters().sampled_out, 1);
}

#[test]
fn unknown_role_learns_the_request_direction_from_the_first_request_line() {
    let c0 = connection(
        9,
        SERVER_PID,
        Role::Unknown,
        "10.0.0.1:8080",
        "10.0.0.9:40000",
    );
    let spans = run(
        &mut correlator(100.0),
        &[
            message(c0, 11, Direction::Ingress, 1, b"GET /x HTTP/1.1\r\n\r\n"),
            message(c0, 11, Direction::Egress, 2, OK),
        ],
    );
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].kind, SpanKind::Server);
}

#[test]
fn close_without_response_is_an_error_span() {
    let s = server_conn();
    let spans = run(
        &mut correlator(100.0),
        &[
            message(s, 11, Direction::Ingress, 1, b"GET /hang HTTP/1.1\r\n\r\n"),
            CaptureEvent::Closed(s),
        ],
    );
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].status, SpanStatus::Error("no response".into()));
}

/// curl (client end) and nginx (server end) of one loopback connection.
fn local_pair(id: u64) -> (Connection, Connection) {
    let client = connection(
        id,
        CLIENT_PID,
        Role::Client,
        "127.0.0.1:5000",
        "127.0.0.1:80",
    );
    let server = connection(
        id + 1,
        SERVER_PID,
        Role::Server,
        "127.0.0.1:80",
        "127.0.0.1:5000",
    );
    (client, server)
}

#[test]
fn server_end_joins_the_trace_of_the_client_end_on_this_node_client_seen_first() {
    let (c, s) = local_pair(20);
    let spans = run(
        &mut correlator(100.0),
        &[
            message(c, 7, Direction::Egress, 1, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Ingress, 2, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Egress, 3, OK),
            message(c, 7, Direction::Ingress, 4, OK),
        ],
    );
    let (server, client) = (&spans[0], &spans[1]);
    assert_eq!(
        (server.kind, client.kind),
        (SpanKind::Server, SpanKind::Client)
    );
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!(client.parent_span_id, None);
}

#[test]
fn server_end_joins_the_trace_of_the_client_end_on_this_node_server_seen_first() {
    let (c, s) = local_pair(30);
    let spans = run(
        &mut correlator(100.0),
        &[
            // The server's read can be delivered before the client's write.
            CaptureEvent::Opened {
                connection: s,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            CaptureEvent::Opened {
                connection: c,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            message(s, 11, Direction::Ingress, 2, b"GET / HTTP/1.1\r\n\r\n"),
            message(c, 7, Direction::Egress, 1, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Egress, 3, OK),
            message(c, 7, Direction::Ingress, 4, OK),
        ],
    );
    let (server, client) = (&spans[0], &spans[1]);
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
}

/// Both ends of `local_pair(id)` open, and the server's whole exchange
/// before anything of the client's.
fn server_answers_first(correlator: &mut Correlator, id: u64) -> Vec<Span> {
    let (c, s) = local_pair(id);
    run(
        correlator,
        &[
            CaptureEvent::Opened {
                connection: c,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            CaptureEvent::Opened {
                connection: s,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            message(s, 11, Direction::Ingress, 2, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Egress, 3, OK),
        ],
    )
}

/// The client's thread lost its CPU between sending and its syscall's
/// return: the server read, answered and was reported before the client's
/// send. Its span waits for that request and joins the client's trace.
#[test]
fn server_that_answered_before_its_local_clients_send_was_seen_joins_its_trace() {
    let (c, _) = local_pair(35);
    let mut correlator = correlator(100.0);
    let mut spans = server_answers_first(&mut correlator, 35);
    assert!(spans.is_empty(), "the server's span waits: {spans:#?}");
    spans.extend(run(
        &mut correlator,
        &[
            message(c, 7, Direction::Egress, 1, b"GET / HTTP/1.1\r\n\r\n"),
            message(c, 7, Direction::Ingress, 4, OK),
        ],
    ));
    let (server, client) = (&spans[0], &spans[1]);
    assert_eq!(
        (server.kind, client.kind),
        (SpanKind::Server, SpanKind::Client)
    );
    assert_eq!(server.trace_id, client.trace_id);
    assert_eq!(server.parent_span_id, Some(client.span_id));
    assert_eq!(decision(server), "local-peer");
    assert_eq!(correlator.counters().spans, 2);
}

/// A held SERVER span whose client's request never comes goes out as it
/// is once its wait is over (here: at the end of the input).
#[test]
fn a_held_server_span_goes_out_unchanged_when_its_client_never_shows() {
    let mut correlator = correlator(100.0);
    let mut spans = server_answers_first(&mut correlator, 37);
    // Timestamps 2 and 3 ns after boot: its wait ended long ago.
    correlator.release_held(&mut spans);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].parent_span_id, None);
    assert_eq!(decision(&spans[0]), "root");
}

/// curl -> `middle` (server end + upstream client end, one thread) ->
/// python: the spans, each found by its pid and kind.
fn local_chain(middle: u32) -> impl Fn(u32, SpanKind) -> Span {
    let curl = connection(40, 600, Role::Client, "127.0.0.1:5000", "127.0.0.1:80");
    let middle_in = connection(41, middle, Role::Server, "127.0.0.1:80", "127.0.0.1:5000");
    let middle_out = connection(42, middle, Role::Client, "127.0.0.1:6000", "127.0.0.1:8000");
    let python = connection(43, 500, Role::Server, "127.0.0.1:8000", "127.0.0.1:6000");
    let spans = run(
        &mut correlator(100.0),
        &[
            message(curl, 1, Direction::Egress, 1, b"GET /a HTTP/1.1\r\n\r\n"),
            message(
                middle_in,
                2,
                Direction::Ingress,
                2,
                b"GET /a HTTP/1.1\r\n\r\n",
            ),
            message(
                middle_out,
                2,
                Direction::Egress,
                3,
                b"GET /a HTTP/1.0\r\n\r\n",
            ),
            message(python, 3, Direction::Ingress, 4, b"GET /a HTTP/1.0\r\n\r\n"),
            message(python, 3, Direction::Egress, 5, OK),
            message(middle_out, 2, Direction::Ingress, 6, OK),
            message(middle_in, 2, Direction::Egress, 7, OK),
            message(curl, 1, Direction::Ingress, 8, OK),
        ],
    );
    assert_eq!(spans.len(), 4);
    move |pid: u32, kind: SpanKind| {
        spans
            .iter()
            .find(|s| {
                s.kind == kind
                    && s.resource
                        .attributes
                        .contains(&Attribute::int("process.pid", pid as i64))
            })
            .cloned()
            .unwrap()
    }
}

#[test]
fn a_chain_of_local_services_forms_one_trace() {
    let span = local_chain(THREADED_PID);
    let curl_client = span(600, SpanKind::Client);
    let middle_server = span(THREADED_PID, SpanKind::Server);
    let middle_client = span(THREADED_PID, SpanKind::Client);
    let python_server = span(500, SpanKind::Server);
    for s in [&middle_server, &middle_client, &python_server] {
        assert_eq!(s.trace_id, curl_client.trace_id, "one trace");
    }
    assert_eq!(curl_client.parent_span_id, None);
    assert_eq!(middle_server.parent_span_id, Some(curl_client.span_id));
    assert_eq!(decision(&middle_server), "local-peer");
    assert_eq!(middle_client.parent_span_id, Some(middle_server.span_id));
    assert_eq!(python_server.parent_span_id, Some(middle_client.span_id));
}

/// nginx is an event loop: its upstream call has no exact parent, so the
/// chain is two traces, each linked right, rather than one linked by luck.
#[test]
fn a_chain_through_an_event_loop_is_cut_there_not_guessed() {
    let span = local_chain(NGINX_PID);
    let curl_client = span(600, SpanKind::Client);
    let nginx_server = span(NGINX_PID, SpanKind::Server);
    let nginx_client = span(NGINX_PID, SpanKind::Client);
    let python_server = span(500, SpanKind::Server);
    assert_eq!(nginx_server.parent_span_id, Some(curl_client.span_id));
    assert_eq!(nginx_client.parent_span_id, None);
    assert_eq!(decision(&nginx_client), "none-event-loop-server");
    assert_ne!(nginx_client.trace_id, curl_client.trace_id);
    assert_eq!(python_server.parent_span_id, Some(nginx_client.span_id));
    assert_eq!(python_server.trace_id, nginx_client.trace_id);
}

#[test]
fn ends_seen_from_mid_connection_are_not_linked() {
    // Roles unknown: request positions on the two ends may not agree.
    let c = connection(
        50,
        CLIENT_PID,
        Role::Unknown,
        "127.0.0.1:5000",
        "127.0.0.1:80",
    );
    let s = connection(
        51,
        SERVER_PID,
        Role::Unknown,
        "127.0.0.1:80",
        "127.0.0.1:5000",
    );
    let spans = run(
        &mut correlator(100.0),
        &[
            message(c, 7, Direction::Egress, 1, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Ingress, 2, b"GET / HTTP/1.1\r\n\r\n"),
            message(s, 11, Direction::Egress, 3, OK),
            message(c, 7, Direction::Ingress, 4, OK),
        ],
    );
    assert_ne!(spans[0].trace_id, spans[1].trace_id);
}

fn proxied_key() -> ProxiedRequestKey {
    ProxiedRequestKey {
        client: "10.0.0.1:50000".parse().unwrap(),
        original_destination: "10.0.0.2:9090".parse().unwrap(),
        index: 0,
    }
}

#[tokio::test]
async fn proxied_request_client_span_is_the_parent_the_proxy_injects_correlator_first() {
    let contexts = std::sync::Arc::new(ProxyContexts::new());
    let mut c = correlator(100.0);
    c.share_with_proxy(contexts.clone(), RedirectScope::of_ports(vec![9090]));
    let u = upstream_conn();
    let mut spans = run(
        &mut c,
        &[message(
            u,
            11,
            Direction::Egress,
            1,
            b"GET /p HTTP/1.1\r\n\r\n",
        )],
    );
    let injected = contexts
        .context_for(proxied_key(), std::time::Duration::from_millis(10))
        .await;
    spans.extend(run(&mut c, &[message(u, 11, Direction::Ingress, 2, OK)]));
    assert_eq!(spans.len(), 1);
    assert_eq!(
        (spans[0].trace_id, spans[0].span_id),
        (
            injected.traceparent.trace_id,
            injected.traceparent.parent_id
        )
    );
}

/// A request to a destination the rules exclude never reaches the proxy:
/// the correlator settles nothing for it (before, the port alone decided,
/// and such entries piled up in the agreement table).
#[tokio::test]
async fn a_request_the_rules_do_not_redirect_is_not_settled_with_the_proxy() {
    let contexts = std::sync::Arc::new(ProxyContexts::new());
    let mut c = correlator(100.0);
    let excluded = RedirectScope {
        exclude_cidrs: vec!["10.0.0.2/32".parse().unwrap()],
        ..RedirectScope::of_ports(vec![9090])
    };
    c.share_with_proxy(contexts.clone(), excluded);
    let u = upstream_conn();
    run(
        &mut c,
        &[message(
            u,
            11,
            Direction::Egress,
            1,
            b"GET /p HTTP/1.1\r\n\r\n",
        )],
    );
    // Asked anyway, the table has no decision: the proxy decides itself.
    contexts
        .context_for(proxied_key(), std::time::Duration::from_millis(1))
        .await;
    let counters = contexts.counters();
    assert_eq!((counters.ready, counters.decided_by_proxy), (0, 1));
}

#[tokio::test]
async fn proxied_request_client_span_is_the_parent_the_proxy_injects_proxy_first() {
    let contexts = std::sync::Arc::new(ProxyContexts::new());
    let mut c = correlator(100.0);
    c.share_with_proxy(contexts.clone(), RedirectScope::of_ports(vec![9090]));
    let injected = contexts
        .context_for(proxied_key(), std::time::Duration::ZERO)
        .await;
    let u = upstream_conn();
    let spans = run(
        &mut c,
        &[
            message(u, 11, Direction::Egress, 1, b"GET /p HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Ingress, 2, OK),
        ],
    );
    assert_eq!(
        (spans[0].trace_id, spans[0].span_id),
        (
            injected.traceparent.trace_id,
            injected.traceparent.parent_id
        )
    );
}

#[tokio::test]
async fn requests_to_ports_the_proxy_does_not_handle_are_not_shared() {
    let contexts = std::sync::Arc::new(ProxyContexts::new());
    let mut c = correlator(100.0);
    c.share_with_proxy(contexts.clone(), RedirectScope::of_ports(vec![80]));
    let u = upstream_conn();
    let spans = run(
        &mut c,
        &[
            message(u, 11, Direction::Egress, 1, b"GET /p HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Ingress, 2, OK),
        ],
    );
    let injected = contexts
        .context_for(proxied_key(), std::time::Duration::ZERO)
        .await;
    assert_ne!(spans[0].span_id, injected.traceparent.parent_id);
}

/// The server's read is delivered before its local client's write: the
/// server's trace will still change to the client's, so a call its thread
/// makes meanwhile gets no parent (it would point into another trace).
#[test]
fn a_call_made_before_the_local_client_is_seen_gets_no_parent() {
    let (c, s) = local_pair(50);
    let u = connection(
        52,
        SERVER_PID,
        Role::Client,
        "10.0.0.1:50000",
        "10.0.0.2:9090",
    );
    let spans = run(
        &mut correlator(100.0),
        &[
            CaptureEvent::Opened {
                connection: c,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            CaptureEvent::Opened {
                connection: s,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            message(s, 11, Direction::Ingress, 2, b"GET / HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Egress, 3, b"GET /back HTTP/1.1\r\n\r\n"),
            message(c, 7, Direction::Egress, 1, b"GET / HTTP/1.1\r\n\r\n"),
            message(u, 11, Direction::Ingress, 4, OK),
            message(s, 11, Direction::Egress, 5, OK),
            message(c, 7, Direction::Ingress, 6, OK),
        ],
    );
    let call = spans
        .iter()
        .find(|s| s.resource.service_name == "python3.11" && s.kind == SpanKind::Client)
        .unwrap();
    assert_eq!(call.parent_span_id, None);
    assert_eq!(decision(call), "none-trace-pending");
    let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client && s.span_id != call.span_id)
        .unwrap();
    assert_eq!(server.parent_span_id, Some(client.span_id));
}

#[tokio::test]
async fn the_proxy_injects_the_inbound_tracestate_with_the_parent() {
    let contexts = std::sync::Arc::new(ProxyContexts::new());
    let mut c = correlator(100.0);
    c.share_with_proxy(contexts.clone(), RedirectScope::of_ports(vec![9090]));
    let (s, u) = (server_conn(), upstream_conn());
    let mut spans = run(
        &mut c,
        &[
            message(
                s,
                11,
                Direction::Ingress,
                1,
                b"GET /in HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: congo=t61rcWkgMzE\r\ntracestate: rojo=00f067aa0ba902b7\r\n\r\n",
            ),
            message(u, 11, Direction::Egress, 2, b"GET /p HTTP/1.1\r\n\r\n"),
        ],
    );
    let injected = contexts
        .context_for(proxied_key(), std::time::Duration::from_millis(10))
        .await;
    assert_eq!(
        injected.tracestate, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        "both fields, in order"
    );
    spans.extend(run(
        &mut c,
        &[
            message(u, 11, Direction::Ingress, 3, OK),
            message(s, 11, Direction::Egress, 4, OK),
        ],
    ));
    let client = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
    assert_eq!(client.span_id, injected.traceparent.parent_id);
    assert_eq!(
        client.trace_state, injected.tracestate,
        "the span records it"
    );
}

/// An nginx-like forwarder on this node: it receives a traceparent and
/// sends it on unchanged to a server also on this node.
#[test]
fn a_forwarded_traceparent_gives_the_forwarder_a_span_of_its_own() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let received = SpanId([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
    let inbound = connection(1, NGINX_PID, Role::Server, "10.0.0.1:80", "10.0.0.9:40000");
    let upstream = connection(
        2,
        NGINX_PID,
        Role::Client,
        "10.0.0.1:50000",
        "10.0.0.1:9090",
    );
    let backend = connection(
        3,
        SERVER_PID,
        Role::Server,
        "10.0.0.1:9090",
        "10.0.0.1:50000",
    );
    let request = format!("GET /a HTTP/1.1\r\ntraceparent: {TP}\r\ntracestate: v=1\r\n\r\n");
    // The backend's side may be seen before or after the forwarder's call.
    for backend_first in [false, true] {
        let mut events = vec![
            CaptureEvent::Opened {
                connection: upstream,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            CaptureEvent::Opened {
                connection: backend,
                tid: 1,
                python_context: 0,
                process_name: ProcessName::default(),
            },
            message(inbound, 21, Direction::Ingress, 1, request.as_bytes()),
        ];
        let forwarded = message(upstream, 21, Direction::Egress, 2, request.as_bytes());
        let received_by_backend = message(backend, 31, Direction::Ingress, 3, request.as_bytes());
        if backend_first {
            events.extend([received_by_backend, forwarded]);
        } else {
            events.extend([forwarded, received_by_backend]);
        }
        events.extend([
            message(backend, 31, Direction::Egress, 4, OK),
            message(upstream, 21, Direction::Ingress, 5, OK),
            message(inbound, 21, Direction::Egress, 6, OK),
        ]);
        let spans = run(&mut correlator(100.0), &events);
        assert_eq!(spans.len(), 3, "{spans:#?}");
        let find = |pid: u32, kind: SpanKind| {
            spans
                .iter()
                .find(|s| {
                    s.kind == kind
                        && s.resource.attributes.iter().any(|a| {
                            a.key == "process.pid"
                                && a.value == crate::span::AttributeValue::Int(pid as i64)
                        })
                })
                .unwrap_or_else(|| panic!("no {kind:?} span of {pid}: {spans:#?}"))
        };
        let (nginx_server, nginx_client, backend_server) = (
            find(NGINX_PID, SpanKind::Server),
            find(NGINX_PID, SpanKind::Client),
            find(SERVER_PID, SpanKind::Server),
        );
        assert_eq!(nginx_server.parent_span_id, Some(received));
        assert_ne!(nginx_client.span_id, received, "an id of its own");
        assert_eq!(nginx_client.parent_span_id, Some(nginx_server.span_id));
        assert_eq!(
            nginx_client.attribute(PARENT_DECISION_ATTRIBUTE).as_deref(),
            Some("forwarded")
        );
        assert_eq!(nginx_client.trace_state, "v=1");
        assert_eq!(
            backend_server.parent_span_id,
            Some(nginx_client.span_id),
            "backend first: {backend_first}"
        );
        let ids: HashSet<SpanId> = spans.iter().map(|s| s.span_id).collect();
        assert_eq!(ids.len(), spans.len(), "no two spans share an id");
        assert!(spans.iter().all(|s| s.trace_id == nginx_server.trace_id));
    }
}

/// A traceparent the application chose itself (no inbound request brought
/// it) names the call's span, as before.
#[test]
fn a_traceparent_no_inbound_request_brought_is_the_calls_own() {
    let u = upstream_conn();
    let spans = run(
        &mut correlator(100.0),
        &[
            message(
                u,
                11,
                Direction::Egress,
                1,
                b"GET /p HTTP/1.1\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n",
            ),
            message(u, 11, Direction::Ingress, 2, OK),
        ],
    );
    assert_eq!(
        spans[0].span_id,
        SpanId([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
    );
    assert_eq!(
        spans[0].attribute(PARENT_DECISION_ATTRIBUTE).as_deref(),
        Some("wire")
    );
}

/// The forwarder's call reaches the server through something the agent
/// does not see (the proxy could not rewrite it in time): the server still
/// becomes the forwarder's call's child, by the traceparent it forwarded.
#[test]
fn a_server_receiving_a_forwarded_traceparent_is_the_forwarders_child() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let inbound = connection(1, NGINX_PID, Role::Server, "10.0.0.1:80", "10.0.0.9:40000");
    let upstream = connection(
        2,
        NGINX_PID,
        Role::Client,
        "10.0.0.1:50000",
        "10.0.0.7:9090",
    );
    // The backend's peer is the proxy's upstream socket, not nginx's.
    let backend = connection(
        3,
        SERVER_PID,
        Role::Server,
        "10.0.0.7:9090",
        "10.0.0.1:60000",
    );
    let request = format!("GET /a HTTP/1.1\r\ntraceparent: {TP}\r\n\r\n");
    let spans = run(
        &mut correlator(100.0),
        &[
            message(inbound, 21, Direction::Ingress, 1, request.as_bytes()),
            message(upstream, 21, Direction::Egress, 2, request.as_bytes()),
            message(backend, 31, Direction::Ingress, 3, request.as_bytes()),
            message(backend, 31, Direction::Egress, 4, OK),
            message(upstream, 21, Direction::Ingress, 5, OK),
            message(inbound, 21, Direction::Egress, 6, OK),
        ],
    );
    let forwarder = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client)
        .expect("nginx's call");
    let backend_server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server && s.span_id != forwarder.parent_span_id.unwrap())
        .expect("the backend's span");
    assert_eq!(backend_server.parent_span_id, Some(forwarder.span_id));
    assert_eq!(
        backend_server
            .attribute(PARENT_DECISION_ATTRIBUTE)
            .as_deref(),
        Some("via-forwarder")
    );
}
