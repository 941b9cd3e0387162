//! Nothing secret leaves the node: a real curl carrying secrets in its
//! headers, its URL, its command line and its environment, and a real
//! Python client with secrets in `--name=value` flags and in an argv[0]
//! rewritten into a whole command line, traced by the real agent, exported
//! as OTLP/JSON. No secret appears anywhere in what the agent writes, with
//! the default configuration and with the command line opted in.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::*;

/// Every secret the test plants; none may appear in the output.
const SECRETS: &[&str] = &[
    "BEARERSEKRIT1",
    "COOKIESEKRIT2",
    "USERSEKRIT3",
    "QUERYSEKRIT4",
    "ENVSEKRIT5",
    "FLAGSEKRIT6",
    "PROCTITLESEKRIT7",
    "URLSEKRIT8",
    "HEADERSEKRIT9",
    "COOKIESEKRIT10",
    "DBSEKRIT11",
];

/// The Python client: two requests to the URL of its `--url=` flag, 250 ms
/// apart (it lives long enough for the agent to read its command line).
const CLIENT: &str = "import http.client, sys, time, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1].split('=', 1)[1])
for _ in range(2):
    c = http.client.HTTPConnection(url.hostname, url.port)
    c.request('GET', url.path + '?' + url.query)
    c.getresponse().read()
    c.close()
    time.sleep(0.25)
";

/// Runs the agent with `extra` flags, sends one curl full of secrets to a
/// local server, and returns everything the agent wrote to its span file.
fn traced_output(extra: &[&str]) -> String {
    let port = free_port();
    let _server = start_http_server(port);
    let file = std::env::temp_dir().join(format!(
        "agent-secrets-{}-{}.jsonl",
        std::process::id(),
        extra.len()
    ));
    let _ = std::fs::remove_file(&file);
    let mut args = vec![format!("--output-file={}", file.display())];
    args.extend(extra.iter().map(|a| a.to_string()));
    let (agent, err) = start_agent(&args);
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_line(&err, deadline, |l| l.contains("tracing HTTP")).expect("the agent starts");

    let url = format!("http://127.0.0.1:{port}/secrets?token=QUERYSEKRIT4&page=2");
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-o", "/dev/null"])
        .args(["-H", "Authorization: Bearer BEARERSEKRIT1"])
        .args(["-H", "Cookie: session=COOKIESEKRIT2"])
        .args(["-u", "alice:USERSEKRIT3"])
        .args(["--oauth2-bearer", "FLAGSEKRIT6"])
        // Twice, 250 ms apart: curl lives long enough for the agent to
        // read its command line while it runs.
        .args(["--rate", "4/s"])
        .args([&url, &url])
        .env("API_TOKEN", "ENVSEKRIT5")
        .status()
        .unwrap();
    assert!(status.success());

    // Secrets in `--name=value` flags, and in argv[0] holding a whole
    // command line (as setproctitle leaves it).
    let status = Command::new("/usr/bin/python3")
        .arg0("worker --password=PROCTITLESEKRIT7 --port=1")
        .args(["-c", CLIENT])
        .arg(format!(
            "--url=http://app:URLSEKRIT8@127.0.0.1:{port}/secrets?token=QUERYSEKRIT4&page=2"
        ))
        .arg("--header=Authorization: Bearer HEADERSEKRIT9")
        .arg("--header=Cookie: c=COOKIESEKRIT10")
        .arg("--database-url=postgres://app:DBSEKRIT11@db/orders")
        .status()
        .unwrap();
    assert!(status.success());

    // The eight spans written (the file output flushes per batch).
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let spans = text.matches("\"GET /secrets\"").count();
        if spans >= 8 || Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(agent);
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        text.matches("\"GET /secrets\"").count(),
        8,
        "curl's and python's CLIENT spans and the server's SERVER spans:\n{text}"
    );
    text
}

/// The value of the string attribute `key` wherever it appears.
fn string_values(text: &str, key: &str) -> Vec<String> {
    let mut values = Vec::new();
    for line in text.lines() {
        let json: serde_json::Value = serde_json::from_str(line).unwrap();
        collect(&json, key, &mut values);
    }
    values
}

fn collect(json: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match json {
        serde_json::Value::Object(map) => {
            if map.get("key").and_then(|k| k.as_str()) == Some(key)
                && let Some(v) = map["value"]["stringValue"].as_str()
            {
                out.push(v.to_string());
            }
            map.values().for_each(|v| collect(v, key, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, key, out)),
        _ => {}
    }
}

#[test]
fn no_secret_leaves_the_agent_by_default_or_with_the_command_line() {
    if !privileged() {
        return;
    }
    let _agent = one_agent_at_a_time();

    let default = traced_output(&[]);
    for secret in SECRETS {
        assert!(!default.contains(secret), "{secret} exported:\n{default}");
    }
    assert_eq!(
        string_values(&default, "process.command_line"),
        Vec::<String>::new(),
        "no command line by default"
    );
    assert_eq!(
        string_values(&default, "url.query"),
        ["token=REDACTED&page=2"; 8]
    );

    let opted_in = traced_output(&["--command-line"]);
    for secret in SECRETS {
        assert!(!opted_in.contains(secret), "{secret} exported:\n{opted_in}");
    }
    let lines = string_values(&opted_in, "process.command_line");
    let curl = lines
        .iter()
        .find(|l| l.starts_with("curl "))
        .unwrap_or_else(|| panic!("curl's command line: {lines:?}"));
    for kept in [
        "-H Authorization: REDACTED",
        "-H Cookie: REDACTED",
        "--oauth2-bearer REDACTED",
        "/secrets?token=REDACTED&page=2",
    ] {
        assert!(curl.contains(kept), "{kept} in {curl}");
    }
    // curl blanks `-u`'s value in its own argv once it has read it; either
    // way what follows `-u` is redacted.
    let after_user = curl.split(" -u ").nth(1).unwrap_or_default();
    assert!(
        after_user.starts_with("REDACTED") || after_user.starts_with("alice:REDACTED"),
        "{curl}"
    );
    let worker = lines
        .iter()
        .find(|l| l.starts_with("worker "))
        .unwrap_or_else(|| panic!("the Python client's command line: {lines:?}"));
    for kept in [
        "worker --password=REDACTED --port=1 -c ",
        " --url=http://app:REDACTED@127.0.0.1:",
        "/secrets?token=REDACTED&page=2 ",
        " --header=Authorization: REDACTED --header=Cookie: REDACTED ",
        " --database-url=postgres://app:REDACTED@db/orders",
    ] {
        assert!(worker.contains(kept), "{kept} in {worker}");
    }
}
