//! The user-space pipeline alone, on recorded events: ring-buffer records
//! -> decode -> correlate (HTTP parsing, trace context, spans) -> OTLP
//! export requests encoded to protobuf straight from the spans
//! (`export::otlp_proto`, as the OTLP exporter does), the bytes an exporter
//! sends. (Until issue 13 the requests were the SDK's `SpanData` converted
//! by `opentelemetry_proto::transform` and encoded by prost.)
//!
//! `cargo xtask bench` runs it. It reports events per second on one core
//! (criterion's throughput) and, once before measuring, allocations per
//! event (counted by a wrapping global allocator). The same group times
//! decode and correlate alone (`decode_and_correlate_sampling_100` and
//! `_10`: spans built, none encoded), the correlation thread's share.
//!
//! A second group, `otlp_json`, takes the spans of the same records and
//! writes them as the OTLP/JSON file output does, in lines of 64 spans, in
//! each of the ways compared in docs/benchmarks.md: spans per second on one
//! core, and, printed before measuring, bytes and allocations per span.
//!
//! A third group, `otlp_proto`, does the same for the protobuf requests of
//! the OTLP exporter, in requests of 64 spans: the direct encoder against
//! the official conversion encoded by prost (what the exporter did before
//! issue 13).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use agent::capture::event::encode_record;
use agent::capture::{CaptureEvent, decode_record};
use agent::correlate::{Correlator, ProcessFilter, ProcessTable, SpanSettings};
use agent::export::otlp_json::write_json_line;
use agent::export::otlp_proto::ProtoEncoder;
use agent::sampling::Sampler;
use agent::span::Span;
// What `reference.rs` names as `crate::export` and `crate::span`.
use agent::{export, span};
use agent_common::{AF_INET, ConnTuple, Direction, EventHeader, EventKind, Role, Syscall};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;

/// The official conversion (SDK `SpanData` -> `opentelemetry_proto::transform`),
/// shared with the agent's unit tests.
#[path = "../src/export/reference.rs"]
mod reference;

use reference::export_request;

/// Counts allocations so the benchmark can report them per event.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const CONNECTIONS: u32 = 200;
const REQUESTS_PER_CONNECTION: u32 = 10;
/// Spans per export request, as the exporter batches them.
const BATCH: usize = 512;

/// A recorded workload: `CONNECTIONS` keep-alive connections between a
/// client and a server process on this node, both ends captured, each with
/// `REQUESTS_PER_CONNECTION` exchanges. Returns the records.
fn recorded_traffic() -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let request = b"GET /api/orders/12345?page=2 HTTP/1.1\r\nHost: orders:8080\r\nUser-Agent: bench/1.0\r\nAccept: */*\r\n\r\n";
    let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"orders\":[1,2,3],\"n\":3}  ";
    let mut ts = 1_000_000u64;
    for c in 0..CONNECTIONS {
        let client_port = 30_000 + c as u16;
        let client = tuple(client_port, 8080);
        let server = tuple(8080, client_port);
        let (client_id, server_id) = (2 * c as u64 + 1, 2 * c as u64 + 2);
        let mut push = |kind: EventKind,
                        id: u64,
                        pid: u32,
                        role: Role,
                        t: ConnTuple,
                        dir: Direction,
                        payload: &[u8]| {
            ts += 1_000;
            let header = EventHeader {
                timestamp_ns: ts,
                conn_id: id,
                pid,
                tid: pid + 1,
                fd: 7,
                message_len: payload.len() as u32,
                captured_len: payload.len() as u32,
                kind: kind as u8,
                direction: dir as u8,
                role: role as u8,
                syscall: Syscall::Read as u8,
                flags: 0,
                _pad: [0; 3],
                tuple: t,
                python_context: 0,
                python_context_copy: 0,
            };
            let mut record = Vec::new();
            encode_record(&header, payload, &mut record);
            records.push(record);
        };
        push(
            EventKind::Open,
            client_id,
            100,
            Role::Client,
            client,
            Direction::Egress,
            b"",
        );
        push(
            EventKind::Open,
            server_id,
            200,
            Role::Server,
            server,
            Direction::Egress,
            b"",
        );
        for _ in 0..REQUESTS_PER_CONNECTION {
            push(
                EventKind::Data,
                client_id,
                100,
                Role::Client,
                client,
                Direction::Egress,
                request,
            );
            push(
                EventKind::Data,
                server_id,
                200,
                Role::Server,
                server,
                Direction::Ingress,
                request,
            );
            push(
                EventKind::Data,
                server_id,
                200,
                Role::Server,
                server,
                Direction::Egress,
                response,
            );
            push(
                EventKind::Data,
                client_id,
                100,
                Role::Client,
                client,
                Direction::Ingress,
                response,
            );
        }
        push(
            EventKind::Close,
            client_id,
            100,
            Role::Client,
            client,
            Direction::Egress,
            b"",
        );
        push(
            EventKind::Close,
            server_id,
            200,
            Role::Server,
            server,
            Direction::Egress,
            b"",
        );
    }
    records
}

fn tuple(local_port: u16, remote_port: u16) -> ConnTuple {
    let mut t = ConnTuple {
        family: AF_INET,
        local_port,
        remote_port,
        ..ConnTuple::default()
    };
    t.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    t.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    t
}

/// A correlator sampling `percentage` % (parent-based), with the default
/// span settings and no /proc to read.
fn correlator(percentage: f64) -> Correlator {
    let processes = ProcessTable::new("/nonexistent-proc", ProcessFilter::default());
    Correlator::new(
        Sampler::new(percentage, true).unwrap(),
        SpanSettings::default(),
        processes,
    )
}

/// Runs the records through the pipeline; returns the protobuf bytes produced.
fn pipeline(records: &[Vec<u8>]) -> usize {
    let mut correlator = correlator(100.0);
    let mut spans = Vec::with_capacity(BATCH * 2);
    let mut encoder = ProtoEncoder::new();
    let mut encoded = Vec::new();
    let mut bytes = 0;
    for record in records {
        let event: CaptureEvent = decode_record(record).expect("valid record");
        correlator.handle(&event, &mut spans);
        if spans.len() >= BATCH {
            encoded.clear();
            encoder.encode(&spans, &mut encoded);
            bytes += encoded.len();
            spans.clear();
        }
    }
    correlator.finish(&mut spans);
    encoded.clear();
    encoder.encode(&spans, &mut encoded);
    bytes + encoded.len()
}

/// Decode and correlate only (spans built, nothing encoded): what every
/// exchange costs before an output sees it. Returns the spans built.
fn correlate_only(records: &[Vec<u8>], percentage: f64) -> usize {
    let mut correlator = correlator(percentage);
    let mut spans = Vec::with_capacity(BATCH * 2);
    let mut built = 0;
    for record in records {
        let event: CaptureEvent = decode_record(record).expect("valid record");
        correlator.handle(&event, &mut spans);
        built += spans.len();
        spans.clear();
    }
    correlator.finish(&mut spans);
    built + spans.len()
}

/// Every span the records give, none encoded.
fn all_spans(records: &[Vec<u8>]) -> Vec<Span> {
    let mut correlator = correlator(100.0);
    let mut spans = Vec::new();
    for record in records {
        let event: CaptureEvent = decode_record(record).expect("valid record");
        correlator.handle(&event, &mut spans);
    }
    correlator.finish(&mut spans);
    spans
}

/// Spans per OTLP/JSON line, as the file output writes them
/// (`ExportSettings::max_batch_size`'s default).
const LINE: usize = 64;

/// One way of writing a line: appends the line of `spans` to `out`.
type Writer = fn(&[Span], &mut Vec<u8>);

/// The ways compared: the file output's direct writer; the official
/// conversion (`SpanData` -> `opentelemetry_proto::transform`) written by
/// `serde_json` with every default (the direct writer's reference); and, for
/// scale, the same conversion encoded to protobuf, as the OTLP exporter
/// sent it before issue 13 (see the `otlp_proto` group).
const WRITERS: [(&str, Writer); 3] = [
    ("direct_writer", |spans, out| write_json_line(spans, out)),
    ("official_serde_json", |spans, out| {
        serde_json::to_writer(out, &export_request(spans)).unwrap()
    }),
    ("official_protobuf", |spans, out| {
        export_request(spans).encode(out).unwrap()
    }),
];

/// Writes every line; returns the bytes written.
fn write_lines(spans: &[Span], writer: Writer, line: &mut Vec<u8>) -> usize {
    let mut bytes = 0;
    for chunk in spans.chunks(LINE) {
        line.clear();
        writer(chunk, line);
        line.push(b'\n');
        bytes += line.len();
    }
    bytes
}

fn bench_otlp_json(c: &mut Criterion, records: &[Vec<u8>]) {
    let spans = all_spans(records);
    let mut line = Vec::new();
    for (name, writer) in WRITERS {
        write_lines(&spans, writer, &mut line);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let bytes = write_lines(&spans, writer, &mut line);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "otlp_json/{name}: {} spans, {bytes} bytes, {:.1} bytes and {:.2} allocations per span",
            spans.len(),
            bytes as f64 / spans.len() as f64,
            allocations as f64 / spans.len() as f64,
        );
    }
    let mut group = c.benchmark_group("otlp_json");
    group.throughput(Throughput::Elements(spans.len() as u64));
    for (name, writer) in WRITERS {
        group.bench_function(name, |b| b.iter(|| write_lines(&spans, writer, &mut line)));
    }
    group.finish();
}

/// Spans per encoded batch, as the exporter encodes them
/// (`ExportSettings::max_batch_size`'s default; a request carries the
/// batches of up to `max_request_spans`, each encoded in turn).
const REQUEST: usize = 64;

/// One way of encoding a request: appends the request of `spans` to `out`.
type EncodeRef<'a> = &'a mut dyn FnMut(&[Span], &mut Vec<u8>);

/// Encodes every request of `spans` with `encode`; returns the bytes.
fn encode_requests(
    spans: &[Span],
    encode: &mut dyn FnMut(&[Span], &mut Vec<u8>),
    out: &mut Vec<u8>,
) -> usize {
    let mut bytes = 0;
    for chunk in spans.chunks(REQUEST) {
        out.clear();
        encode(chunk, out);
        bytes += out.len();
    }
    bytes
}

/// The OTLP exporter's protobuf requests: the direct encoder (one encoder
/// and one buffer reused, as the exporter keeps them) against the official
/// conversion encoded by prost.
fn bench_otlp_proto(c: &mut Criterion, records: &[Vec<u8>]) {
    let spans = all_spans(records);
    let mut encoder = ProtoEncoder::new();
    let mut direct = |spans: &[Span], out: &mut Vec<u8>| encoder.encode(spans, out);
    let mut official =
        |spans: &[Span], out: &mut Vec<u8>| export_request(spans).encode(out).unwrap();
    let mut ways: [(&str, EncodeRef); 2] = [
        ("direct_encoder", &mut direct),
        ("official_protobuf", &mut official),
    ];
    let mut out = Vec::new();
    for (name, encode) in &mut ways {
        encode_requests(&spans, *encode, &mut out);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let bytes = encode_requests(&spans, *encode, &mut out);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "otlp_proto/{name}: {} spans, {bytes} bytes, {:.1} bytes and {:.2} allocations per span",
            spans.len(),
            bytes as f64 / spans.len() as f64,
            allocations as f64 / spans.len() as f64,
        );
    }
    let mut group = c.benchmark_group("otlp_proto");
    group.throughput(Throughput::Elements(spans.len() as u64));
    for (name, encode) in &mut ways {
        group.bench_function(*name, |b| {
            b.iter(|| encode_requests(&spans, *encode, &mut out))
        });
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    let records = recorded_traffic();
    for percentage in [100.0, 10.0] {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let built = correlate_only(&records, percentage);
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "pipeline: decode and correlate only, sampling {percentage}%: {built} spans built, \
             {:.2} allocations per event",
            allocations as f64 / records.len() as f64,
        );
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let bytes = pipeline(&records);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let spans = (CONNECTIONS * REQUESTS_PER_CONNECTION * 2) as f64;
    println!(
        "pipeline: {} events, {:.0} spans, {bytes} protobuf bytes; {:.2} allocations per event, {:.1} per span",
        records.len(),
        spans,
        allocations as f64 / records.len() as f64,
        allocations as f64 / spans
    );
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.bench_function("records_to_otlp_batches", |b| b.iter(|| pipeline(&records)));
    for percentage in [100.0, 10.0] {
        group.bench_function(format!("decode_and_correlate_sampling_{percentage}"), |b| {
            b.iter(|| correlate_only(&records, percentage))
        });
    }
    group.finish();
    bench_otlp_json(c, &records);
    bench_otlp_proto(c, &records);
}

criterion_group!(benches, bench);
criterion_main!(benches);
