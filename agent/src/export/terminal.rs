//! The terminal view: one block per finished trace, its spans as an indented
//! tree with a timing bar each.
//!
//! [`render_trace`] is pure text layout; [`TraceBuffer`] decides when a trace
//! is finished. Spans carry no "trace complete" marker (the agent sees only
//! the processes on this node), so a trace counts as finished once none of
//! its spans arrived for a while.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::time::{Duration, Instant};

use crate::span::{Span, SpanId, SpanStatus, TraceId};

/// Narrowest layout [`render_trace`] produces; below it the columns would
/// not fit, so lines come out wider than asked instead.
const MIN_WIDTH: usize = 40;

/// Renders one trace as text: a header line, then one line per span, each
/// ending with a newline. At width 60:
///
/// ```text
/// trace 4bf92f3577b34da6a3ce929d0e0e4736  2 spans  10.0ms
///   frontend: GET /cart  OK      10.0ms |████████████████████|
///     cart: GET /items   ERROR    4.0ms |    ████████        |
/// ```
///
/// Spans are ordered as a tree by parent id; a span whose parent is not
/// among `spans` is a root. Siblings are ordered by start time. The bar of
/// each span covers its share of the trace's time range (earliest start to
/// latest end). `width` is the line width in characters (at least 40 is
/// used). An empty slice renders as an empty string.
pub fn render_trace(spans: &[Span], width: usize) -> String {
    let Some(first) = spans.first() else {
        return String::new();
    };
    let width = width.max(MIN_WIDTH);
    let bar_width = (width / 3).clamp(10, 60);
    // "  " + label + " " + status(5) + " " + duration(8) + " |" + bar + "|"
    let label_width = width - (2 + 1 + 5 + 1 + 8 + 2 + bar_width + 1);

    let trace_start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let trace_end = spans
        .iter()
        .map(|s| s.end_unix_nano.max(s.start_unix_nano))
        .max()
        .unwrap_or(trace_start);
    let range = trace_end - trace_start;

    let mut out = String::new();
    let count = spans.len();
    let _ = writeln!(
        out,
        "trace {}  {count} span{}  {}",
        first.trace_id.to_hex(),
        if count == 1 { "" } else { "s" },
        human_duration(range)
    );
    for (index, depth) in tree_order(spans) {
        let span = &spans[index];
        let service = match span.resource.service_name.as_str() {
            "" => "?",
            name => name,
        };
        let indent = "  ".repeat(depth);
        let label = fit(&format!("{indent}{service}: {}", span.name), label_width);
        let status = match span.status {
            SpanStatus::Unset => "OK",
            SpanStatus::Error(_) => "ERROR",
        };
        let duration = human_duration(span.end_unix_nano.saturating_sub(span.start_unix_nano));
        let bar = timing_bar(span, trace_start, range, bar_width);
        let _ = writeln!(out, "  {label} {status:<5} {duration:>8} |{bar}|");
    }
    out
}

/// `(index into spans, depth)` in display order: depth-first from the
/// roots, siblings by start time. Every span appears exactly once, even
/// when parent ids form a cycle (such spans are shown as roots).
fn tree_order(spans: &[Span]) -> Vec<(usize, usize)> {
    let by_start = |a: &usize, b: &usize| {
        (spans[*a].start_unix_nano, *a).cmp(&(spans[*b].start_unix_nano, *b))
    };
    // First span with a given id wins; a duplicate id is still shown, just
    // not as anyone's parent.
    let mut index_of: HashMap<SpanId, usize> = HashMap::with_capacity(spans.len());
    for (i, span) in spans.iter().enumerate() {
        index_of.entry(span.span_id).or_insert(i);
    }
    let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        match span.parent_span_id.and_then(|p| index_of.get(&p)) {
            Some(&parent) if parent != i => children.entry(parent).or_default().push(i),
            _ => roots.push(i),
        }
    }
    roots.sort_by(by_start);
    for list in children.values_mut() {
        list.sort_by(by_start);
    }

    let mut order = Vec::with_capacity(spans.len());
    let mut visited = vec![false; spans.len()];
    for &root in &roots {
        visit_subtree(root, &children, &mut visited, &mut order);
    }
    // Spans only reachable through a parent cycle.
    let mut rest: Vec<usize> = (0..spans.len()).filter(|&i| !visited[i]).collect();
    rest.sort_by(by_start);
    for i in rest {
        visit_subtree(i, &children, &mut visited, &mut order);
    }
    order
}

/// Appends `start` and its not yet visited descendants, depth-first.
/// Iterative, so a deep chain of spans cannot overflow the stack.
fn visit_subtree(
    start: usize,
    children: &HashMap<usize, Vec<usize>>,
    visited: &mut [bool],
    order: &mut Vec<(usize, usize)>,
) {
    let mut stack = vec![(start, 0usize)];
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        order.push((i, depth));
        if let Some(list) = children.get(&i) {
            stack.extend(list.iter().rev().map(|&c| (c, depth + 1)));
        }
    }
}

/// `text` cut or padded to exactly `width` characters; a cut ends in `…`.
fn fit(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width {
        let mut s = String::with_capacity(text.len() + width - count);
        s.push_str(text);
        s.extend(std::iter::repeat_n(' ', width - count));
        s
    } else {
        let mut s: String = text.chars().take(width.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// The span's cells of a bar `width` cells wide over `range` ns from
/// `trace_start`: at least one cell, so even a very short span shows.
fn timing_bar(span: &Span, trace_start: u64, range: u64, width: usize) -> String {
    let (first, last) = if range == 0 {
        (0, width)
    } else {
        let offset = |t: u64| -> u128 { u128::from(t.saturating_sub(trace_start).min(range)) };
        let scale = |t: u64, round_up: bool| -> usize {
            let numerator = offset(t) * width as u128;
            let denominator = u128::from(range);
            let cells = if round_up {
                numerator.div_ceil(denominator)
            } else {
                numerator / denominator
            };
            cells as usize
        };
        let first = scale(span.start_unix_nano, false).min(width - 1);
        let last = scale(span.end_unix_nano.max(span.start_unix_nano), true).max(first + 1);
        (first, last.min(width))
    };
    let mut bar = String::with_capacity(width * 3);
    for cell in 0..width {
        bar.push(if (first..last).contains(&cell) {
            '█'
        } else {
            ' '
        });
    }
    bar
}

/// A duration in the largest unit that keeps it readable: `850ns`,
/// `12.3µs`, `4.0ms`, `1.25s`, `2m05s`.
pub fn human_duration(ns: u64) -> String {
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    // Tenths of the unit, rounded; move up a unit when rounding reaches 1000.
    for (unit, suffix) in [(1_000u64, "µs"), (1_000_000, "ms")] {
        let tenths = (u128::from(ns) * 10 + u128::from(unit / 2)) / u128::from(unit);
        if tenths < 10_000 {
            return format!("{}.{}{suffix}", tenths / 10, tenths % 10);
        }
    }
    let hundredths = (u128::from(ns) + 5_000_000) / 10_000_000;
    if hundredths < 6_000 {
        return format!("{}.{:02}s", hundredths / 100, hundredths % 100);
    }
    let seconds = (u128::from(ns) + 500_000_000) / 1_000_000_000;
    format!("{}m{:02}s", seconds / 60, seconds % 60)
}

/// Collects spans by trace until each trace is finished, in bounded memory.
///
/// A trace is finished when no span of it arrived for the idle time. When
/// the buffer holds its maximum number of traces, the oldest (first seen) is
/// flushed early to make room; a trace that reaches the maximum number of
/// spans is flushed at once (a client reusing one traceparent forever would
/// otherwise never go idle). Flushed early, a trace's later spans start a
/// new block.
#[derive(Debug)]
pub struct TraceBuffer {
    idle: Duration,
    max_traces: usize,
    max_spans_per_trace: usize,
    traces: HashMap<TraceId, PendingTrace>,
    /// Arrival order: sequence number of a trace's first span -> trace.
    order: BTreeMap<u64, TraceId>,
    next_seq: u64,
}

#[derive(Debug)]
struct PendingTrace {
    seq: u64,
    last_seen: Instant,
    spans: Vec<Span>,
}

impl TraceBuffer {
    /// A buffer finishing traces after `idle` without spans, holding at most
    /// `max_traces` traces (at least 1) of at most `max_spans_per_trace`
    /// spans (at least 2).
    pub fn new(idle: Duration, max_traces: usize, max_spans_per_trace: usize) -> Self {
        Self {
            idle,
            max_traces: max_traces.max(1),
            max_spans_per_trace: max_spans_per_trace.max(2),
            traces: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Adds a span seen at `now`. Returns a trace flushed early, if adding
    /// it filled the buffer or the span's trace: the caller shows it like a
    /// finished one.
    pub fn push(&mut self, span: Span, now: Instant) -> Option<Vec<Span>> {
        if let Some(trace) = self.traces.get_mut(&span.trace_id) {
            trace.last_seen = now;
            trace.spans.push(span);
            if trace.spans.len() >= self.max_spans_per_trace {
                let id = trace.spans[0].trace_id;
                return self.remove(&id);
            }
            return None;
        }
        let evicted = if self.traces.len() >= self.max_traces {
            let oldest = self.order.first_key_value().map(|(_, id)| *id);
            oldest.and_then(|id| self.remove(&id))
        } else {
            None
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, span.trace_id);
        self.traces.insert(
            span.trace_id,
            PendingTrace {
                seq,
                last_seen: now,
                spans: vec![span],
            },
        );
        evicted
    }

    /// Removes and returns the traces idle at `now`, oldest first.
    pub fn take_idle(&mut self, now: Instant) -> Vec<Vec<Span>> {
        let idle: Vec<TraceId> = self
            .order
            .values()
            .filter(|id| {
                self.traces
                    .get(id)
                    .is_some_and(|t| now.saturating_duration_since(t.last_seen) >= self.idle)
            })
            .copied()
            .collect();
        idle.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Removes and returns every trace, oldest first (at shutdown).
    pub fn take_all(&mut self) -> Vec<Vec<Span>> {
        let ids: Vec<TraceId> = self.order.values().copied().collect();
        ids.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Traces held.
    pub fn len(&self) -> usize {
        self.traces.len()
    }

    /// Whether no trace is held.
    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }

    fn remove(&mut self, id: &TraceId) -> Option<Vec<Span>> {
        let trace = self.traces.remove(id)?;
        self.order.remove(&trace.seq);
        Some(trace.spans)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::span::{Resource, SpanKind, Text};

    const T0: u64 = 1_700_000_000_000_000_000;

    fn resource(name: &str) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: name.to_string(),
            attributes: vec![],
        })
    }

    fn span(
        trace: u8,
        id: u8,
        parent: Option<u8>,
        service: &Arc<Resource>,
        name: &str,
        start_ms: u64,
        end_ms: u64,
    ) -> Span {
        Span {
            trace_id: TraceId([trace; 16]),
            span_id: SpanId([id; 8]),
            parent_span_id: parent.map(|p| SpanId([p; 8])),
            trace_state: String::new(),
            flags: 1,
            name: Text::copy(name),
            kind: SpanKind::Server,
            start_unix_nano: T0 + start_ms * 1_000_000,
            end_unix_nano: T0 + end_ms * 1_000_000,
            attributes: vec![],
            status: SpanStatus::Unset,
            resource: service.clone(),
        }
    }

    #[test]
    fn renders_a_tree_with_proportional_bars() {
        let frontend = resource("frontend");
        let cart = resource("cart");
        let mut failing = span(0xab, 3, Some(2), &cart, "GET /items/{id}", 4, 8);
        failing.status = SpanStatus::Error("500".into());
        // Out of order on purpose: the tree comes from parent ids and start
        // times, not from arrival order.
        let spans = vec![
            failing,
            span(0xab, 2, Some(1), &frontend, "GET", 2, 9),
            span(0xab, 1, None, &frontend, "GET /cart", 0, 10),
            span(0xab, 4, Some(1), &frontend, "GET", 9, 10),
        ];
        let expected = "\
trace abababababababababababababababab  4 spans  10.0ms
  frontend: GET /cart                OK      10.0ms |██████████████████████████|
    frontend: GET                    OK       7.0ms |     ███████████████████  |
      cart: GET /items/{id}          ERROR    4.0ms |          ███████████     |
    frontend: GET                    OK       1.0ms |                       ███|
";
        assert_eq!(render_trace(&spans, 80), expected);
    }

    #[test]
    fn a_span_whose_parent_is_elsewhere_is_a_root() {
        let server = resource("users");
        let spans = vec![
            span(7, 2, Some(9), &server, "GET /users/{id}", 0, 2),
            span(7, 3, Some(2), &server, "SELECT", 1, 2),
        ];
        let expected = "\
trace 07070707070707070707070707070707  2 spans  2.0ms
  users: GET /users/{id}  OK       2.0ms |█████████████████████|
    users: SELECT         OK       1.0ms |          ███████████|
";
        assert_eq!(render_trace(&spans, 64), expected);
    }

    #[test]
    fn long_labels_are_cut_and_tiny_spans_still_show() {
        let server = resource("a-service-with-a-really-long-name");
        let spans = vec![
            span(
                1,
                1,
                None,
                &server,
                "GET /a/very/long/path/that/does/not/fit",
                0,
                1000,
            ),
            // 1 ms of 1 s: less than a cell, drawn as one.
            span(1, 2, Some(1), &server, "GET", 500, 501),
        ];
        let expected = "\
trace 01010101010101010101010101010101  2 spans  1.00s
  a-service-wit… OK       1.00s |████████████████|
    a-service-w… OK       1.0ms |        █       |
";
        assert_eq!(render_trace(&spans, 50), expected);
    }

    #[test]
    fn a_single_instant_span_fills_the_bar() {
        let server = resource("s");
        let spans = vec![span(1, 1, None, &server, "GET", 5, 5)];
        let expected = "\
trace 01010101010101010101010101010101  1 span  0ns
  s: GET  OK         0ns |█████████████|
";
        assert_eq!(render_trace(&spans, 40), expected);
    }

    #[test]
    fn bad_input_renders_without_panicking() {
        let server = resource("");
        // End before start, a self-parent, a two-span cycle, a duplicate id.
        let mut backwards = span(1, 1, Some(1), &server, "x", 5, 3);
        backwards.end_unix_nano = backwards.start_unix_nano - 1;
        let spans = vec![
            backwards,
            span(1, 2, Some(3), &server, "y", 0, 1),
            span(1, 3, Some(2), &server, "z", 0, 1),
            span(1, 3, None, &server, "dup", 0, 1),
        ];
        let text = render_trace(&spans, 0);
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.contains("?: x"), "{text}");
        assert_eq!(render_trace(&[], 80), "");
    }

    #[test]
    fn durations_use_human_units() {
        assert_eq!(human_duration(0), "0ns");
        assert_eq!(human_duration(999), "999ns");
        assert_eq!(human_duration(1_000), "1.0µs");
        assert_eq!(human_duration(12_345), "12.3µs");
        assert_eq!(human_duration(999_949), "999.9µs");
        assert_eq!(human_duration(999_950), "1.0ms");
        assert_eq!(human_duration(4_000_000), "4.0ms");
        assert_eq!(human_duration(1_250_000_000), "1.25s");
        assert_eq!(human_duration(59_994_999_999), "59.99s");
        assert_eq!(human_duration(125_000_000_000), "2m05s");
        assert_eq!(human_duration(u64::MAX), "307445734m34s");
    }

    #[test]
    fn buffer_yields_a_trace_after_its_idle_time() {
        let server = resource("s");
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut buffer = TraceBuffer::new(ms(100), 10, 100);
        assert!(
            buffer
                .push(span(1, 1, None, &server, "a", 0, 1), start)
                .is_none()
        );
        assert!(
            buffer
                .push(span(2, 1, None, &server, "b", 0, 1), start + ms(10))
                .is_none()
        );
        assert!(
            buffer
                .push(span(1, 2, Some(1), &server, "c", 0, 1), start + ms(60))
                .is_none()
        );
        assert!(buffer.take_idle(start + ms(99)).is_empty());
        // Trace 2 went quiet at 10 ms, trace 1 at 60 ms.
        let done = buffer.take_idle(start + ms(110));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0][0].name, "b");
        let done = buffer.take_idle(start + ms(160));
        assert_eq!(done.len(), 1);
        let names: Vec<&str> = done[0].iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_full_buffer_flushes_its_oldest_trace() {
        let server = resource("s");
        let now = Instant::now();
        let mut buffer = TraceBuffer::new(Duration::from_secs(5), 2, 100);
        assert!(
            buffer
                .push(span(1, 1, None, &server, "a", 0, 1), now)
                .is_none()
        );
        assert!(
            buffer
                .push(span(2, 1, None, &server, "b", 0, 1), now)
                .is_none()
        );
        // More spans of trace 1 do not make it any younger.
        assert!(
            buffer
                .push(span(1, 2, None, &server, "a2", 0, 1), now)
                .is_none()
        );
        let flushed = buffer
            .push(span(3, 1, None, &server, "c", 0, 1), now)
            .unwrap();
        assert_eq!(flushed.len(), 2);
        assert_eq!(flushed[0].trace_id, TraceId([1; 16]));
        assert_eq!(buffer.len(), 2);
        let rest = buffer.take_all();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0][0].name, "b");
        assert_eq!(rest[1][0].name, "c");
    }

    #[test]
    fn a_trace_reaching_the_span_limit_is_flushed() {
        let server = resource("s");
        let now = Instant::now();
        let mut buffer = TraceBuffer::new(Duration::from_secs(5), 10, 3);
        assert!(
            buffer
                .push(span(1, 1, None, &server, "a", 0, 1), now)
                .is_none()
        );
        assert!(
            buffer
                .push(span(1, 2, None, &server, "b", 0, 1), now)
                .is_none()
        );
        let flushed = buffer
            .push(span(1, 3, None, &server, "c", 0, 1), now)
            .unwrap();
        assert_eq!(flushed.len(), 3);
        assert!(buffer.is_empty());
        assert!(
            buffer
                .push(span(1, 4, None, &server, "d", 0, 1), now)
                .is_none()
        );
        assert_eq!(buffer.len(), 1);
    }
}
