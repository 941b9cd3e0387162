//! The soak: the `agent` binary under a fixed rate of requests to nginx for
//! `SOAK_SECONDS` (120 in CI; `cargo xtask soak` runs 600), exporting to a
//! real OTLP receiver that is down for the middle half of the run. It must
//! end with flat memory, no leaked file descriptors, and counters that add
//! up: every request one span (nginx's SERVER span), every span exported
//! or dropped by reason, and what was exported received.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tests::agent_process::{AgentProcess, Metrics};
use tests::otlp_receiver::OtlpReceiver;
use tests::{ScratchDir, free_port, privileged, start_nginx};

/// Requests per second.
const RATE: u64 = 100;

/// Run length when `SOAK_SECONDS` is not set: CI's short soak.
const DEFAULT_SECONDS: u64 = 120;

/// One request on its own connection; whether it was answered.
fn request(port: u16, i: u64) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let head = format!("GET /soak-{i} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    stream.write_all(head.as_bytes()).is_ok()
        && stream.read_to_end(&mut answer).is_ok()
        && answer.starts_with(b"HTTP/1.1 200")
}

/// The numbers that must add up, from `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Accounts {
    spans: u64,
    exported: u64,
    dropped_after_retries: u64,
    dropped_queue_full: u64,
    capture_dropped: u64,
}

fn accounts(m: &Metrics) -> Accounts {
    Accounts {
        spans: m.get("agent_spans_total").unwrap_or(0),
        exported: m.sum("agent_export_spans_total", &["result=\"exported\""]),
        dropped_after_retries: m.sum(
            "agent_export_spans_total",
            &["result=\"dropped_after_retries\""],
        ),
        dropped_queue_full: m.sum(
            "agent_export_spans_total",
            &["result=\"dropped_queue_full\""],
        ),
        capture_dropped: m.sum("agent_capture_dropped_total", &[]),
    }
}

#[test]
fn soak_at_a_fixed_rate_with_the_collector_down_in_the_middle() {
    if !privileged() {
        return;
    }
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);
    let run = Duration::from_secs(seconds);
    let dir = ScratchDir::new("soak");
    let port = free_port();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    dir.write("www/index.html", b"soak\n");
    // Every path answers 200 with the same file.
    let _nginx = start_nginx(
        &dir,
        port,
        1,
        "default_type text/plain;\n  access_log off;\n  error_page 404 =200 /index.html;",
    );
    let collector: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let start_collector = || {
        OtlpReceiver::start_at(collector, "127.0.0.1:0".parse().unwrap())
            .expect("the collector's port")
    };
    let endpoint = format!("--exporter-endpoint=http://{collector}");
    let metrics_port = free_port();
    let mut receiver = Some(start_collector());
    let agent = AgentProcess::start(&[&endpoint, "--include-process", "nginx"], metrics_port);
    let fds_at_start = agent.open_fds();

    let started = Instant::now();
    let mut sent = 0u64;
    let mut answered = 0u64;
    let mut received_before = 0usize;
    let mut rss_series: Vec<(u64, u64)> = Vec::new();
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < run {
        let at = started.elapsed();
        // Up for the first quarter, down for the middle half, up again.
        let down = at >= run / 4 && at < run * 3 / 4;
        if down && let Some(up) = receiver.take() {
            received_before = up.span_count();
            drop(up);
        }
        if !down && receiver.is_none() {
            receiver = Some(start_collector());
        }
        if at >= next_sample {
            rss_series.push((at.as_secs(), agent.rss_kib()));
            next_sample += Duration::from_secs(5);
        }
        // The fixed rate: request `sent` is due at sent / RATE seconds.
        let due = Duration::from_micros(sent * 1_000_000 / RATE);
        if at < due {
            std::thread::sleep(due - at);
        }
        if request(port, sent) {
            answered += 1;
        }
        sent += 1;
    }
    let receiver = receiver.expect("up at the end");

    // Every request is one span; every span is exported or dropped by
    // reason, once retries end.
    let settled = (0..600).find_map(|_| {
        let a = accounts(&agent.metrics());
        let out = a.exported + a.dropped_after_retries + a.dropped_queue_full;
        if a.spans >= answered && a.spans == out {
            return Some(a);
        }
        std::thread::sleep(Duration::from_millis(200));
        None
    });
    let fds_at_end = agent.open_fds();
    let rss_end = agent.rss_kib();
    let a = settled.unwrap_or_else(|| {
        panic!(
            "the counters do not add up after 2 minutes: {:?}, {answered} requests answered\n{}",
            accounts(&agent.metrics()),
            agent.metrics().0
        )
    });
    let received = received_before + receiver.span_count();
    println!(
        "soak {seconds} s at {RATE}/s: {sent} requests, {answered} answered; {} spans: {} exported, \
         {} dropped after retries, {} dropped queue full; capture drops {}; collector received {received}; \
         fds {fds_at_start} -> {fds_at_end}; RSS KiB over time {rss_series:?}, at the end {rss_end}",
        a.spans, a.exported, a.dropped_after_retries, a.dropped_queue_full, a.capture_dropped
    );
    assert_eq!(answered, sent, "nginx answered every request");
    assert_eq!(a.capture_dropped, 0, "no capture drop at this rate");
    assert_eq!(a.spans, answered, "one span per request");
    assert!(
        received as u64 >= a.exported,
        "what the agent counts exported, the collector has ({received} < {})",
        a.exported
    );
    assert!(
        fds_at_end <= fds_at_start + 8,
        "file descriptors leak: {fds_at_start} -> {fds_at_end}"
    );
    // Flat: the peak after the outage is no higher than the peak during it
    // plus slack (the export queue is bounded, so it fills and stays).
    let peak = |from: u64, to: u64| {
        rss_series
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0)
    };
    let during = peak(seconds / 4, seconds * 3 / 4);
    let after = peak(seconds * 3 / 4, seconds + 1).max(rss_end);
    assert!(
        after <= during + 16 * 1024,
        "RSS grows after the outage: {during} KiB during, {after} KiB after"
    );
    assert!(after < 120 * 1024, "RSS bounded: {after} KiB");
    // Flat over the run: once the backlog is exported or dropped, the end
    // is within a bound of the warm-up (the largest sample of the second
    // eighth, 15-30 s in CI's run: after start-up, whose allocations and
    // the ring buffer's mapping are in it, and before the outage). On the
    // host the end was 0.1 MiB above it (55,736 -> 55,828 KiB on f980c1e,
    // the full export queue of the outage included); in the 10-minute
    // soak on 9cdb2ac it stayed within 12 KiB of it for 570 s, then
    // stepped up once by 6.9 MiB (54,136 -> 61,160 KiB, 120 s after the
    // outage, flat after it: an allocator's step, not a growth per
    // request). The bound, 12 MiB, leaves room for such a step and for
    // what may stay resident without a leak: the allocator keeping the
    // pages of the full export queue (4,096 spans) and of the batches
    // retried during the outage. A leak of 1.3 KiB per request (9,000 to
    // 10,500 requests after the warm-up in CI) goes past it, and of 300
    // bytes in `cargo xtask soak` (45,000 or more).
    let warm = peak(seconds / 8, seconds / 4);
    assert!(
        warm > 0,
        "no RSS sample in the warm-up (SOAK_SECONDS of 40 or more): {rss_series:?}"
    );
    assert!(
        rss_end <= warm + 12 * 1024,
        "RSS grows over the run: {warm} KiB after the warm-up, {rss_end} KiB at the end"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}
