//! The HTTP/1.x relay of one connection: requests flow client -> upstream
//! with a traceparent added where missing, responses flow back unchanged.
//!
//! Both directions parse heads, one at a time, and walk bodies by their
//! framing, forwarding bytes as they come. The response direction is only
//! read, never changed, but it must be followed: it says when the
//! connection stops being HTTP (101 Switching Protocols, 2xx to CONNECT),
//! and a request's method (HEAD, CONNECT) says how its response is framed.
//! The request direction tells the response direction about each request
//! through a bounded queue, before writing the request's head upstream, so
//! a response can never arrive before its entry.
//!
//! Whenever either direction meets bytes it cannot follow, that direction
//! stops interpreting and copies the rest unchanged (fail open).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::body::{Body, Outcome};
use super::context::{ProxiedRequest, TraceContextSource};
use super::head::{
    AnsweredMethod, BodyFraming, HeadParse, ResponseKind, parse_request_head, parse_response_head,
    write_injected,
};
use super::stats::{Counter, ProxyStats};
use super::transport::{Filled, Inbound, Outbound, relay_opaque};

/// Requests forwarded but not yet answered that the response direction
/// keeps track of; a client pipelining more waits (back-pressure) until
/// responses catch up.
const MAX_UNANSWERED: usize = 128;

/// Partial heads up to this size are parsed again after every read.
const EAGER_PARSE_BYTES: usize = 2048;

/// Whether the bytes read since the buffer held `before` bytes can have
/// changed what a partial head parses to. A head ends, and nearly every
/// invalid one shows, at a line end; small buffers are parsed again anyway
/// (cheap), so bytes that are not HTTP are caught at once, and large ones
/// only on a new line, so a head trickling in byte by byte costs linear
/// rather than quadratic time.
fn worth_parsing(data: &[u8], before: usize) -> bool {
    data.len() <= EAGER_PARSE_BYTES || data.get(before..).is_some_and(|new| new.contains(&b'\n'))
}

/// A request forwarded upstream, as its response needs to know it.
struct Unanswered {
    method: AnsweredMethod,
    /// Set when the response decides whether the connection stays HTTP
    /// (CONNECT, Upgrade): the request direction waits on it.
    verdict: Option<oneshot::Sender<Verdict>>,
}

/// What the response to a CONNECT or Upgrade request decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The connection carries another protocol (or a tunnel) from now on.
    Switched,
    /// Refused or not asked: the next request head follows.
    StaysHttp,
}

/// What this connection's requests need besides bytes.
pub(crate) struct RequestContext<'a> {
    /// Refilled for each request that needs a context.
    pub request: ProxiedRequest,
    pub contexts: &'a dyn TraceContextSource,
    pub stats: &'a ProxyStats,
}

/// Relays one HTTP/1.x connection until both directions end. An error is
/// returned as soon as either direction fails; the caller then resets both
/// sockets.
pub(crate) async fn relay_http<CR, CW, UR, UW>(
    client_in: &mut Inbound<'_, CR>,
    client_out: &mut Outbound<'_, CW>,
    upstream_in: &mut Inbound<'_, UR>,
    upstream_out: &mut Outbound<'_, UW>,
    context: RequestContext<'_>,
) -> io::Result<()>
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
{
    let (unanswered_tx, unanswered_rx) = mpsc::channel(MAX_UNANSWERED);
    // Set once a response switched protocols, even one to a request that
    // did not ask to: no later client bytes are parsed as heads then.
    let switched = AtomicBool::new(false);
    let stats = context.stats;
    tokio::try_join!(
        forward_requests(client_in, upstream_out, unanswered_tx, &switched, context),
        forward_responses(upstream_in, client_out, unanswered_rx, &switched, stats),
    )?;
    Ok(())
}

/// How a body being forwarded ended.
enum BodyEnd {
    /// At its framing's end; a head follows.
    Done,
    /// The sender finished (and the receiver was half-closed).
    Closed,
    /// Bytes that are not the framing announced.
    Invalid,
}

/// Forwards `body`'s bytes from `from` to `to` as they arrive.
async fn forward_body<R, W>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
    mut body: Body,
) -> io::Result<BodyEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if from.data().is_empty() && from.fill().await? == Filled::Eof {
            to.shutdown().await?;
            return Ok(BodyEnd::Closed);
        }
        let progress = body.feed(from.data());
        if progress.consumed > 0 {
            to.write_all(&from.data()[..progress.consumed]).await?;
            from.consume(progress.consumed);
        }
        match progress.outcome {
            Outcome::More => {}
            Outcome::Done => return Ok(BodyEnd::Done),
            Outcome::Invalid => return Ok(BodyEnd::Invalid),
        }
    }
}

/// Why a direction stops reading heads.
enum Stop {
    /// The sender finished (and the receiver was half-closed).
    Closed,
    /// Copy the rest unchanged. `fallback`: because of bytes the proxy
    /// could not follow (counted), not because the protocol says so.
    Opaque { fallback: bool },
}

/// Forwards a message: its head (as received, or `rewritten`), then the
/// body the head announced, as it arrives. The head goes out in one write
/// together with the body bytes already read behind it, so a small message
/// costs one system call, not two. `None` when the next head follows.
async fn forward_message<R, W>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
    head_len: usize,
    rewritten: Option<&[u8]>,
    framing: BodyFraming,
) -> io::Result<Option<Stop>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut body, stop) = match framing {
        BodyFraming::None => (None, None),
        BodyFraming::Length(length) => (Body::with_length(length), None),
        BodyFraming::Chunked => (Some(Body::chunked()), None),
        BodyFraming::UntilClose => (None, Some(Stop::Opaque { fallback: false })),
        BodyFraming::Unframeable => (None, Some(Stop::Opaque { fallback: true })),
    };
    let buffered = from.data().get(head_len..).unwrap_or_default();
    let progress = body.as_mut().map(|body| body.feed(buffered));
    let body_len = progress.map_or(0, |p| p.consumed);
    match rewritten {
        None => to.write_all(&from.data()[..head_len + body_len]).await?,
        Some(head) => {
            let body_bytes = &from.data()[head_len..head_len + body_len];
            to.write_all_pair(head, body_bytes).await?;
        }
    }
    from.consume(head_len + body_len);
    if stop.is_some() {
        return Ok(stop);
    }
    let (Some(body), Some(progress)) = (body, progress) else {
        return Ok(None);
    };
    Ok(match progress.outcome {
        Outcome::Done => None,
        Outcome::Invalid => Some(Stop::Opaque { fallback: true }),
        Outcome::More => match forward_body(from, to, body).await? {
            BodyEnd::Done => None,
            BodyEnd::Closed => Some(Stop::Closed),
            BodyEnd::Invalid => Some(Stop::Opaque { fallback: true }),
        },
    })
}

/// Finishes a direction that stopped interpreting: counts a fallback and
/// copies the rest unchanged.
async fn finish_opaque<R, W>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
    fallback: bool,
    stats: &ProxyStats,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if fallback {
        stats.add(Counter::Fallbacks);
    }
    relay_opaque(from, to).await
}

/// What waiting for the next head of a direction gave.
enum NextHead<T> {
    /// A complete head at the start of the buffer.
    Head(T),
    /// The direction is over: its sender finished (passed on as a
    /// half-close), or the rest was copied unchanged.
    Finished,
}

/// Reads until `parse` finds a complete head at the start of `from`'s
/// buffer. What cannot become one (invalid bytes, a head over the limit, a
/// head cut short by a close) is copied unchanged with the rest of the
/// direction, as is everything once `switched` is set (another protocol
/// took over the connection).
async fn next_head<R, W, T>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
    stats: &ProxyStats,
    switched: Option<&AtomicBool>,
    mut parse: impl FnMut(&[u8]) -> HeadParse<T>,
) -> io::Result<NextHead<T>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut worth = true;
    loop {
        if switched.is_some_and(|s| s.load(Ordering::Acquire)) {
            relay_opaque(from, to).await?;
            return Ok(NextHead::Finished);
        }
        if worth || from.is_full() {
            match parse(from.data()) {
                HeadParse::Complete(info) => return Ok(NextHead::Head(info)),
                HeadParse::Partial if !from.is_full() => {}
                HeadParse::Invalid | HeadParse::Partial => {
                    finish_opaque(from, to, true, stats).await?;
                    return Ok(NextHead::Finished);
                }
            }
        }
        let before = from.data().len();
        let filled = from.fill().await?;
        worth = worth_parsing(from.data(), before);
        if filled == Filled::Eof {
            if from.data().is_empty() {
                to.shutdown().await?;
            } else {
                // A head cut short by the close: forwarded as it is.
                finish_opaque(from, to, true, stats).await?;
            }
            return Ok(NextHead::Finished);
        }
    }
}

async fn forward_requests<R, W>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
    unanswered: mpsc::Sender<Unanswered>,
    switched: &AtomicBool,
    mut context: RequestContext<'_>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stats = context.stats;
    // The rewritten head; reused so that requests cost no allocation once
    // it has grown to the connection's head size.
    let mut rewritten = Vec::new();
    let mut index = 0u64;
    loop {
        let info = match next_head(from, to, stats, Some(switched), parse_request_head).await? {
            NextHead::Head(info) => info,
            NextHead::Finished => return Ok(()),
        };
        let head = &from.data()[..info.len];
        let (verdict_tx, verdict_rx) = if info.may_switch_protocols() {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let method = AnsweredMethod::of(head.get(info.method.clone()).unwrap_or_default());
        // Fails only when the response direction stopped interpreting; the
        // dropped verdict sender then makes a waiting request go opaque.
        let _ = unanswered
            .send(Unanswered {
                method,
                verdict: verdict_tx,
            })
            .await;
        let request = &mut context.request;
        request.index = index;
        request.method.clear();
        request.method.push_str(info.method(head));
        request.target.clear();
        request.target.push_str(info.target(head));
        let (propagated, counter) = match info.received_traceparent {
            None => (
                Some(context.contexts.context_for(request).await),
                Counter::RequestsInjected,
            ),
            Some(received) => match context
                .contexts
                .forwarded_context_for(request, received)
                .await
            {
                Some(reparented) => (Some(reparented), Counter::RequestsReparented),
                None => (None, Counter::RequestsUnchanged),
            },
        };
        let injected = match propagated {
            Some(propagated) => {
                rewritten.clear();
                if !write_injected(head, &info, &propagated, &mut rewritten) {
                    return finish_opaque(from, to, true, stats).await;
                }
                Some(rewritten.as_slice())
            }
            None => None,
        };
        stats.add(counter);
        index += 1;
        match forward_message(from, to, info.len, injected, info.framing).await? {
            None => {}
            Some(Stop::Closed) => return Ok(()),
            Some(Stop::Opaque { fallback }) => {
                return finish_opaque(from, to, fallback, stats).await;
            }
        }
        if let Some(verdict) = verdict_rx {
            // Client bytes after CONNECT or Upgrade are not parsed until the
            // response says what they are; they wait in the socket.
            match verdict.await {
                Ok(Verdict::StaysHttp) => {}
                Ok(Verdict::Switched) => return relay_opaque(from, to).await,
                Err(_) => return finish_opaque(from, to, true, stats).await,
            }
        }
    }
}

async fn forward_responses<R, W>(
    from: &mut Inbound<'_, R>,
    to: &mut Outbound<'_, W>,
    mut unanswered: mpsc::Receiver<Unanswered>,
    switched: &AtomicBool,
    stats: &ProxyStats,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // The request being answered; kept across interim (1xx) responses.
    let mut answering: Option<Unanswered> = None;
    loop {
        let parse = |data: &[u8]| {
            if answering.is_none() && !data.is_empty() {
                // Queued before its head went upstream, so present by now;
                // absent only for a response nobody asked for (a 408
                // before closing, say), framed as an answer to GET.
                answering = unanswered.try_recv().ok();
            }
            let method = answering
                .as_ref()
                .map_or_else(Default::default, |u| u.method);
            parse_response_head(data, method)
        };
        let info = match next_head(from, to, stats, None, parse).await? {
            NextHead::Head(info) => info,
            NextHead::Finished => return Ok(()),
        };
        let verdict = match info.kind {
            ResponseKind::Interim => None,
            ResponseKind::Switch => Some(Verdict::Switched),
            ResponseKind::Final(_) => Some(Verdict::StaysHttp),
        };
        if let Some(verdict) = verdict {
            if verdict == Verdict::Switched {
                switched.store(true, Ordering::Release);
            }
            if let Some(sender) = answering.take().and_then(|u| u.verdict) {
                let _ = sender.send(verdict);
            }
        }
        let framing = match info.kind {
            ResponseKind::Interim => BodyFraming::None,
            ResponseKind::Switch => {
                forward_message(from, to, info.len, None, BodyFraming::None).await?;
                return relay_opaque(from, to).await;
            }
            ResponseKind::Final(framing) => framing,
        };
        match forward_message(from, to, info.len, None, framing).await? {
            None => {}
            Some(Stop::Closed) => return Ok(()),
            Some(Stop::Opaque { fallback }) => {
                return finish_opaque(from, to, fallback, stats).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::time::Duration;

    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::proxy::stats::ProxyCounters;
    use crate::proxy::transport::Activity;
    use crate::tracecontext::{PropagatedContext, SpanId, TraceId, TraceParent};

    const INJECTED: &str = "00-abababababababababababababababab-cdcdcdcdcdcdcdcd-03";
    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    struct Fixed;

    impl TraceContextSource for Fixed {
        fn context_for<'a>(
            &'a self,
            _request: &'a ProxiedRequest,
        ) -> Pin<Box<dyn Future<Output = PropagatedContext> + Send + 'a>> {
            Box::pin(std::future::ready(PropagatedContext::without_state(
                TraceParent {
                    trace_id: TraceId([0xab; 16]),
                    parent_id: SpanId([0xcd; 8]),
                    flags: 0x03,
                },
            )))
        }
    }

    /// Starts the relay between two in-memory pipes of `buffer` bytes each;
    /// returns the client's end, the server's end, and the relay's task.
    fn start_relay(
        buffer: usize,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<ProxyCounters>,
    ) {
        let (client, proxy_client) = tokio::io::duplex(buffer);
        let (proxy_upstream, upstream) = tokio::io::duplex(buffer);
        let relay = tokio::spawn(async move {
            let stats = ProxyStats::default();
            let activity = Activity::new();
            let (client_read, client_write) = tokio::io::split(proxy_client);
            let (upstream_read, upstream_write) = tokio::io::split(proxy_upstream);
            let mut client_in = Inbound::new(client_read, 4096, &activity);
            let mut client_out = Outbound::new(client_write, &activity);
            let mut upstream_in = Inbound::new(upstream_read, 4096, &activity);
            let mut upstream_out = Outbound::new(upstream_write, &activity);
            let address: SocketAddr = ([127, 0, 0, 1], 1).into();
            let context = RequestContext {
                request: ProxiedRequest {
                    client: address,
                    original_destination: address,
                    index: 0,
                    method: String::new(),
                    target: String::new(),
                },
                contexts: &Fixed,
                stats: &stats,
            };
            relay_http(
                &mut client_in,
                &mut client_out,
                &mut upstream_in,
                &mut upstream_out,
                context,
            )
            .await
            .expect("relay");
            stats.snapshot()
        });
        (client, upstream, relay)
    }

    /// Runs the relay between an in-memory client and server. The client
    /// writes `requests` piece by piece and half-closes; the server runs
    /// `server` on what it receives. Returns what the server received, what
    /// the client received and the counters.
    async fn relay_with<S, F>(
        requests: Vec<Vec<u8>>,
        buffer: usize,
        server: S,
    ) -> (Vec<u8>, Vec<u8>, ProxyCounters)
    where
        S: FnOnce(DuplexStream) -> F,
        F: Future<Output = Vec<u8>> + Send + 'static,
    {
        let (client, upstream, relay) = start_relay(buffer);
        let server = tokio::spawn(server(upstream));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            for piece in requests {
                client_write.write_all(&piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client_write.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        client_read.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        let counters = relay.await.unwrap();
        let upstream_received = server.await.unwrap();
        (upstream_received, received, counters)
    }

    #[test]
    fn a_client_that_does_not_read_holds_the_server_back() {
        run(async {
            let (mut client, mut upstream, relay) = start_relay(1024);
            client
                .write_all(b"GET /big HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let body = vec![7u8; 1 << 20];
            let response = [
                b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n".as_slice(),
                &body,
            ]
            .concat();
            let total = response.len();
            let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counted = Arc::clone(&written);
            let server = tokio::spawn(async move {
                for piece in response.chunks(512) {
                    upstream.write_all(piece).await.unwrap();
                    counted.fetch_add(piece.len(), Ordering::Relaxed);
                }
                upstream.shutdown().await.unwrap();
                upstream
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Two pipes of 1 KiB and one relay buffer of at most 4 KiB:
            // nothing else may hold the server's bytes.
            let in_flight = written.load(Ordering::Relaxed);
            assert!(in_flight <= 1024 + 4096 + 1024 + 512, "{in_flight}");
            client.shutdown().await.unwrap();
            let mut received = Vec::new();
            client.read_to_end(&mut received).await.unwrap();
            assert_eq!(received.len(), total);
            drop(server.await.unwrap());
            assert_eq!(relay.await.unwrap().requests_injected, 1);
        });
    }

    /// A server that reads everything, while sending `responses` in full.
    fn sends(
        responses: Vec<u8>,
    ) -> impl FnOnce(DuplexStream) -> Pin<Box<dyn Future<Output = Vec<u8>> + Send>> {
        move |upstream| {
            Box::pin(async move {
                let (mut read, mut write) = tokio::io::split(upstream);
                let writer = tokio::spawn(async move {
                    // The client may be gone already; that is its business.
                    let _ = write.write_all(&responses).await;
                    let _ = write.shutdown().await;
                });
                let mut received = Vec::new();
                read.read_to_end(&mut received).await.unwrap();
                writer.await.unwrap();
                received
            })
        }
    }

    fn run<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(20), future)
                    .await
                    .expect("relay finishes")
            })
    }

    fn injected_line() -> String {
        format!("traceparent: {INJECTED}\r\n")
    }

    #[test]
    fn pipelined_requests_with_bodies_each_get_a_traceparent() {
        let input = format!(
            "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\
             POST /2 HTTP/1.1\r\nContent-Length: 20\r\n\r\nGET /x HTTP/1.1\r\n\r\n\
             PUT /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nGET \r\n0\r\nT: 1\r\n\r\n\
             GET /4 HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n"
        );
        let pieces = input.as_bytes().chunks(7).map(<[u8]>::to_vec).collect();
        let (upstream, client, counters) = run(relay_with(pieces, 64, sends(Vec::new())));
        let expected = format!(
            "GET /1 HTTP/1.1\r\nHost: a\r\n{line}\r\n\
             POST /2 HTTP/1.1\r\nContent-Length: 20\r\n{line}\r\nGET /x HTTP/1.1\r\n\r\n\
             PUT /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n{line}\r\n4\r\nGET \r\n0\r\nT: 1\r\n\r\n\
             GET /4 HTTP/1.1\r\ntraceparent: {VALID}\r\n\r\n",
            line = injected_line()
        );
        assert_eq!(String::from_utf8(upstream).unwrap(), expected);
        assert!(client.is_empty());
        assert_eq!(counters.requests_injected, 3);
        assert_eq!(counters.requests_unchanged, 1);
        assert_eq!(counters.fallbacks, 0);
    }

    #[test]
    fn heads_and_bodies_read_together_go_out_together_and_intact() {
        // One read holds every head and body: each rewritten head goes out
        // with the body bytes behind it in the same write.
        let input = format!(
            "POST /1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
             PUT /2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
             POST /3 HTTP/1.1\r\ntraceparent: {VALID}\r\nContent-Length: 2\r\n\r\nok\
             PUT /4 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /5 HTTP/1.1\r\n\r\n"
        );
        let (upstream, _, counters) = run(relay_with(
            vec![input.as_bytes().to_vec()],
            8192,
            sends(Vec::new()),
        ));
        // The last body's framing is invalid: from there on, bytes pass
        // unchanged and nothing more is injected.
        let expected = format!(
            "POST /1 HTTP/1.1\r\nContent-Length: 5\r\n{line}\r\nhello\
             PUT /2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n{line}\r\n3\r\nabc\r\n0\r\n\r\n\
             POST /3 HTTP/1.1\r\ntraceparent: {VALID}\r\nContent-Length: 2\r\n\r\nok\
             PUT /4 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n{line}\r\nzz\r\nGET /5 HTTP/1.1\r\n\r\n",
            line = injected_line()
        );
        assert_eq!(String::from_utf8(upstream).unwrap(), expected);
        assert_eq!(counters.requests_injected, 3);
        assert_eq!(counters.requests_unchanged, 1);
        assert_eq!(counters.fallbacks, 1);
    }

    #[test]
    fn a_large_head_arriving_byte_by_byte_is_injected() {
        let head = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\nX-End: 1\r\n\r\n",
            "v".repeat(3500)
        );
        let pieces = head.bytes().map(|b| vec![b]).collect();
        let (upstream, _, counters) = run(relay_with(pieces, 16, sends(Vec::new())));
        let expected = format!("{}{}\r\n", &head[..head.len() - 2], injected_line());
        assert_eq!(String::from_utf8(upstream).unwrap(), expected);
        assert_eq!(counters.requests_injected, 1);
    }

    #[test]
    fn a_head_over_the_limit_passes_unchanged() {
        // The relay under test reads heads of at most 4096 bytes.
        let head = format!(
            "GET / HTTP/1.1\r\nX-Big: {}\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "v".repeat(5000)
        );
        let pieces = head.as_bytes().chunks(100).map(<[u8]>::to_vec).collect();
        let (upstream, _, counters) = run(relay_with(pieces, 64, sends(Vec::new())));
        assert_eq!(upstream, head.as_bytes());
        assert_eq!((counters.requests_injected, counters.fallbacks), (0, 1));
    }

    /// A server that answers each request head as it arrives: a 101 to an
    /// Upgrade request (then echoes), a 426 refusal to `/refuse`, 200 with
    /// a body otherwise; a HEAD gets a Content-Length it does not send.
    async fn answering_server(upstream: DuplexStream) -> Vec<u8> {
        let (mut read, mut write) = tokio::io::split(upstream);
        let mut received = Vec::new();
        let mut answered = 0;
        let mut chunk = [0; 1024];
        loop {
            let heads: Vec<String> = String::from_utf8_lossy(&received)
                .split("\r\n\r\n")
                .map(str::to_owned)
                .collect();
            while answered + 1 < heads.len() {
                let head = &heads[answered];
                answered += 1;
                if head.contains("/refuse") {
                    write
                        .write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
                        .await
                        .unwrap();
                } else if head.contains("Upgrade:") {
                    write
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
                        .await
                        .unwrap();
                    let already = heads[answered..].join("\r\n\r\n");
                    write.write_all(already.as_bytes()).await.unwrap();
                    loop {
                        let n = read.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            write.shutdown().await.unwrap();
                            return received;
                        }
                        received.extend_from_slice(&chunk[..n]);
                        write.write_all(&chunk[..n]).await.unwrap();
                    }
                } else if head.starts_with("HEAD") {
                    write
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
                        .await
                        .unwrap();
                } else {
                    write
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .unwrap();
                }
            }
            let n = read.read(&mut chunk).await.unwrap();
            if n == 0 {
                write.shutdown().await.unwrap();
                return received;
            }
            received.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn refused_upgrade_stays_http_and_accepted_upgrade_goes_opaque() {
        let requests = vec![
            b"HEAD /h HTTP/1.1\r\n\r\n".to_vec(),
            b"GET /refuse HTTP/1.1\r\nUpgrade: x\r\n\r\n".to_vec(),
            b"GET /after HTTP/1.1\r\n\r\n".to_vec(),
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n".to_vec(),
            // After the switch: not a request any more, passed as is.
            b"GET /tunnelled HTTP/1.1\r\n\r\n".to_vec(),
        ];
        let (upstream, client, counters) = run(relay_with(requests, 1024, |upstream| {
            Box::pin(answering_server(upstream))
        }));
        let upstream = String::from_utf8(upstream).unwrap();
        let line = injected_line();
        assert_eq!(
            upstream,
            format!(
                "HEAD /h HTTP/1.1\r\n{line}\r\nGET /refuse HTTP/1.1\r\nUpgrade: x\r\n{line}\r\n\
                 GET /after HTTP/1.1\r\n{line}\r\n\
                 GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n{line}\r\n\
                 GET /tunnelled HTTP/1.1\r\n\r\n"
            )
        );
        let client = String::from_utf8(client).unwrap();
        assert!(
            client.ends_with("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nGET /tunnelled HTTP/1.1\r\n\r\n"),
            "{client}"
        );
        assert_eq!(counters.requests_injected, 4);
        assert_eq!(counters.fallbacks, 0);
    }

    /// Requests of many shapes, some broken, none mentioning trace context.
    fn random_stream(rng: &mut StdRng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rng.random_range(1..12) {
            match rng.random_range(0..9) {
                0 => out.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
                1 => {
                    let body: Vec<u8> = (0..rng.random_range(0..300))
                        .map(|_| rng.random())
                        .collect();
                    out.extend_from_slice(
                        format!("POST /p HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len())
                            .as_bytes(),
                    );
                    out.extend_from_slice(&body);
                }
                2 => out.extend_from_slice(
                    b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                ),
                3 => out.extend_from_slice(b"GET /f HTTP/1.1\r\nX: a\r\n  b\r\n\r\n"),
                4 => out.extend_from_slice(b"GET /bad HTTP/1.1\r\nBad Header\r\n\r\n"),
                5 => out.extend_from_slice(b"\r\n"),
                6 => out.extend((0..rng.random_range(0..40)).map(|_| rng.random::<u8>())),
                7 => out.extend_from_slice(
                    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                ),
                _ => out.extend_from_slice(b"GET /lf HTTP/1.1\nA: b\n\n"),
            }
        }
        out
    }

    #[test]
    fn no_byte_is_lost_or_reordered_whatever_the_input() {
        let mut rng = StdRng::seed_from_u64(0xfa11);
        let (mut injected, mut fallbacks) = (0, 0);
        for round in 0..300 {
            let input = random_stream(&mut rng);
            let responses: Vec<u8> = if rng.random() {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 204 No\r\n\r\n".to_vec()
            } else {
                (0..rng.random_range(0..100))
                    .map(|_| rng.random())
                    .collect()
            };
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(50));
                pieces.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let buffer = rng.random_range(1..256);
            let (upstream, client, counters) =
                run(relay_with(pieces, buffer, sends(responses.clone())));
            injected += counters.requests_injected;
            fallbacks += counters.fallbacks;
            // Responses pass unchanged, always.
            assert_eq!(client, responses, "round {round}");
            // Requests are the input plus injected lines, nothing else.
            let text = String::from_utf8_lossy(&upstream).into_owned();
            let stripped = text
                .replace(&injected_line(), "")
                .replace(&format!("traceparent: {INJECTED}\n"), "");
            assert_eq!(
                stripped,
                String::from_utf8_lossy(&input),
                "round {round}: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        // Both paths were taken, many times.
        assert!(injected > 300 && fallbacks > 30, "{injected} {fallbacks}");
    }
}
