//! `otlp-receiver [GRPC_ADDR [HTTP_ADDR]]`: the tests' OTLP receiver as a
//! process of its own, counting spans without keeping them, for the
//! overhead benchmark's OTLP/gRPC row (its CPU is not the agent's). Prints
//! `otlp-receiver: listening on GRPC HTTP` when ready; on SIGTERM or
//! SIGINT prints `otlp-receiver: N spans` and exits.

use std::net::SocketAddr;

use tests::otlp_receiver::OtlpReceiver;

fn main() {
    if let Err(e) = run() {
        eprintln!("otlp-receiver: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut address = |default: &str| -> Result<SocketAddr, Box<dyn std::error::Error>> {
        let text = args.next().unwrap_or_else(|| default.to_string());
        text.parse()
            .map_err(|e| format!("{text:?} is not an address (IP:PORT): {e}").into())
    };
    let grpc = address("127.0.0.1:4317")?;
    let http = address("127.0.0.1:4318")?;
    let receiver = OtlpReceiver::start_counting(grpc, http)?;
    println!(
        "otlp-receiver: listening on {} {}",
        receiver.grpc_addr(),
        receiver.http_addr()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        Ok::<(), std::io::Error>(())
    })?;
    println!("otlp-receiver: {} spans", receiver.span_count());
    Ok(())
}
