//! Secrets in what the agent reads about a process, redacted before it
//! becomes a resource attribute.
//!
//! The agent sees every process's arguments. They are left out of spans by
//! default (`processes.command_line: false`); when a user opts in, the
//! command line goes out with these values replaced by `REDACTED`:
//! - the value of a flag whose name says it is a secret (`--password x`,
//!   `--api-key=x`, `-token x`), see [`is_secret_name`];
//! - `NAME=value` arguments with such a name (`env DB_PASSWORD=x ...`);
//! - the value of a header argument for a secret header (`-H
//!   'Authorization: Bearer x'`, `Cookie: ...`): the headers `http.*`
//!   never records ([`SENSITIVE_HEADERS`]) and any with a secret name;
//! - the password of a URL's user info (`postgres://app:x@db/`), and the
//!   URL's secret query parameters (the same list as `url.query`'s);
//! - the value after curl-style credential flags (`-u user:x` keeps the
//!   user, `-b`/`--cookie`, `--oauth2-bearer`).
//!
//! The value of any `--name=value` flag is checked as an argument of its
//! own (`--url=https://u:x@h/?token=x`, `--header=Cookie: x`,
//! `--user=u:x`). The program's own argv[0] goes through the same rules (a
//! plain path comes out as it is), and an argument holding a command line
//! of its own (a `setproctitle` command line in one string, `sh -c '...'`)
//! is redacted word by word.
//!
//! Not recognizable, so not redacted: secrets glued to a short flag
//! (`mysql -pxyz`) or passed as a bare positional argument. That is why
//! the command line is opt-in.
//!
//! [`redact_name`] applies the rules that fit a single name to the other
//! text a process controls ([`super::process::ProcessInfo`]).

use super::attributes::{SENSITIVE_HEADERS, redact_query};

/// What replaces a secret.
pub const REDACTED: &str = "REDACTED";

/// Words that make a flag, variable or header name secret, matched
/// anywhere in the lower-cased name (`--db-password`, `GITHUB_TOKEN`,
/// `X-Api-Key`).
const SECRET_WORDS: &[&str] = &[
    "pass",
    "pwd",
    "secret",
    "token",
    "apikey",
    "api-key",
    "api_key",
    "accesskey",
    "access-key",
    "access_key",
    "private",
    "credential",
    "auth",
    "cookie",
    "session",
    "bearer",
    "jwt",
    "signature",
];

/// Whether a flag, variable or header name names a secret. A name whose
/// word (split at `-`, `_`, `.`) is exactly `key` counts too (`--key`,
/// `AWS_SECRET_KEY`), not one that merely contains it (`--keyboard`).
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| lower.contains(w))
        || lower.split(['-', '_', '.']).any(|word| word == "key")
}

/// Flags whose value is a credential whatever their name says (curl's,
/// mostly), as the next argument or after `=`: the value is redacted, a
/// `user:` prefix kept.
const CREDENTIAL_FLAGS: &[&str] = &["-u", "--user", "-U", "--proxy-user", "-b", "--cookie"];

/// Flags whose value is a header line (`Name: value`), as the next
/// argument or after `=` (wget's `--header=...`).
const HEADER_FLAGS: &[&str] = &["-H", "--header", "--proxy-header"];

/// The command line `arguments` with their secrets redacted, joined by
/// spaces; `secret_query_parameters` as for `url.query`.
///
/// Every argument goes through the same rules, the program's (argv[0])
/// too: a plain path comes out as it is, but a program that rewrote its
/// command line into one string (`setproctitle`, `worker --password=x`) or
/// an argument holding a whole command (`sh -c 'curl -u a:b ...'`) is
/// redacted word by word, see [`redact_words`].
pub fn redact_command_line<S: AsRef<str>>(
    arguments: &[S],
    secret_query_parameters: &[String],
) -> String {
    let mut out = Vec::with_capacity(arguments.len());
    // What the previous argument said about this one.
    let mut next_is = Next::Plain;
    for (i, argument) in arguments.iter().enumerate() {
        let redacted = redact_in_turn(argument.as_ref(), next_is, secret_query_parameters);
        // The program's name says nothing of its first argument.
        next_is = if i == 0 { Next::Plain } else { redacted.next };
        out.push(redacted.text);
    }
    out.join(" ")
}

/// A name a process gives itself (its executable's file name, its `comm`,
/// which it can set to anything) with the rules of one argument: a plain
/// name comes out as it is, `DB_PASSWORD=x`, `--token=x`, `Authorization:
/// x` or a URL's password do not.
pub fn redact_name(name: &str, secret_query_parameters: &[String]) -> String {
    redact_argument(name, secret_query_parameters).text
}

/// What an argument makes of the one after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Plain,
    Secret,
    Credential,
    Header,
}

/// Where a redacted secret may go on when a command line is one string
/// split at spaces (in a list of arguments, each argument is whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunsOn {
    /// Nothing was redacted to the end of the word.
    No,
    /// The value was redacted to the end of the word: if it opened a
    /// quote, to its closing quote.
    InQuotes,
    /// A secret header's value (`Authorization: Bearer x`): to its closing
    /// quote, or unquoted, up to the next flag.
    ToNextFlag,
}

/// One argument (or word) redacted.
struct Redacted {
    text: String,
    next: Next,
    runs_on: RunsOn,
}

impl Redacted {
    fn new(text: String, next: Next, runs_on: RunsOn) -> Self {
        Self {
            text,
            next,
            runs_on,
        }
    }

    fn plain(argument: &str) -> Self {
        Self::new(argument.to_string(), Next::Plain, RunsOn::No)
    }
}

/// An argument, given what the one before it said of it.
fn redact_in_turn(argument: &str, this: Next, secret_query_parameters: &[String]) -> Redacted {
    match this {
        Next::Secret => Redacted::new(REDACTED.to_string(), Next::Plain, RunsOn::InQuotes),
        Next::Credential => {
            Redacted::new(redact_credential(argument), Next::Plain, RunsOn::InQuotes)
        }
        Next::Header => match redact_header(argument) {
            Some(header) => Redacted::new(header, Next::Plain, RunsOn::ToNextFlag),
            None => Redacted::plain(argument),
        },
        Next::Plain => redact_argument(argument, secret_query_parameters),
    }
}

/// One argument on its own: the redacted text, and what it says of the
/// next argument.
fn redact_argument(argument: &str, secret_query_parameters: &[String]) -> Redacted {
    if CREDENTIAL_FLAGS.contains(&argument) {
        return Redacted::new(argument.to_string(), Next::Credential, RunsOn::No);
    }
    if HEADER_FLAGS.contains(&argument) {
        return Redacted::new(argument.to_string(), Next::Header, RunsOn::No);
    }
    if let Some(flag) = argument.strip_prefix('-') {
        let flag = flag.trim_start_matches('-');
        // (A name with a space in it is not a flag's: `--password x
        // --port=1` in one string is words, below.)
        if let Some((name, value)) = flag
            .split_once('=')
            .filter(|(name, _)| !name.contains(char::is_whitespace))
        {
            // `--name=`, and the flag without its `=`.
            let prefix = &argument[..argument.len() - value.len()];
            let flag_only = &prefix[..prefix.len() - 1];
            let (value, runs_on) = if is_secret_name(name) {
                (REDACTED.to_string(), RunsOn::InQuotes)
            } else if CREDENTIAL_FLAGS.contains(&flag_only) {
                (redact_credential(value), RunsOn::InQuotes)
            } else if HEADER_FLAGS.contains(&flag_only) {
                match redact_header(value) {
                    Some(header) => (header, RunsOn::ToNextFlag),
                    None => (value.to_string(), RunsOn::No),
                }
            } else {
                // Whatever the flag, its value is checked as an argument
                // of its own (`--url=https://u:x@h/`, `--env=TOKEN=x`).
                redact_value(value, secret_query_parameters)
            };
            return Redacted::new(format!("{prefix}{value}"), Next::Plain, runs_on);
        }
        // A header glued to `-H` (`-HAuthorization: Bearer x`), a
        // `user:password` glued to `-u` or `-U`.
        if let Some(header) = argument
            .strip_prefix("-H")
            .filter(|h| !h.starts_with('-'))
            .and_then(redact_header)
        {
            return Redacted::new(format!("-H{header}"), Next::Plain, RunsOn::ToNextFlag);
        }
        if let Some(user) = ["-u", "-U"]
            .iter()
            .find_map(|f| argument.strip_prefix(f))
            .filter(|u| !u.starts_with('-') && u.contains(':'))
        {
            return Redacted::new(
                format!("{}{}", &argument[..2], redact_credential(user)),
                Next::Plain,
                RunsOn::InQuotes,
            );
        }
        if argument.contains(char::is_whitespace) {
            let text = redact_words(argument, secret_query_parameters);
            return Redacted::new(text, Next::Plain, RunsOn::No);
        }
        if is_secret_name(flag) {
            return Redacted::new(argument.to_string(), Next::Secret, RunsOn::No);
        }
        return Redacted::plain(argument);
    }
    let (text, runs_on) = redact_value(argument, secret_query_parameters);
    Redacted::new(text, Next::Plain, runs_on)
}

/// A value that is not a flag, standalone or after a flag's `=`: a secret
/// header line, a URL's password and secret query parameters, a secret
/// `NAME=value`; text with spaces word by word.
fn redact_value(value: &str, secret_query_parameters: &[String]) -> (String, RunsOn) {
    if let Some(header) = redact_header(value) {
        return (header, RunsOn::ToNextFlag);
    }
    if value.contains(char::is_whitespace) {
        return (redact_words(value, secret_query_parameters), RunsOn::No);
    }
    if value.contains("://") {
        return (redact_url(value, secret_query_parameters), RunsOn::No);
    }
    if let Some((name, _)) = value.split_once('=')
        && is_variable_name(name)
        && is_secret_name(name)
    {
        return (format!("{name}={REDACTED}"), RunsOn::InQuotes);
    }
    (value.to_string(), RunsOn::No)
}

/// A credential flag's value: `user:password` keeps the user.
fn redact_credential(value: &str) -> String {
    match value.split_once(':') {
        Some((user, _)) => format!("{user}:{REDACTED}"),
        None => REDACTED.to_string(),
    }
}

/// Text holding a command line of its own (a program's whole command line
/// in its argv[0], a shell's `-c` script), redacted word by word with the
/// rules of [`redact_command_line`]; the spaces between words are kept.
///
/// The words of one argument are no longer told apart, so a secret value
/// goes on: one that opens a quote, to the word that closes it; an
/// unquoted secret header's value (`Authorization: Bearer x`), up to the
/// next word starting with `-`. The words it takes are left out: the
/// header already says `REDACTED`.
fn redact_words(text: &str, secret_query_parameters: &[String]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut next_is = Next::Plain;
    let mut skip = Skip::Nothing;
    let mut rest = text;
    loop {
        let word_start = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        let (space, after) = rest.split_at(word_start);
        let word_end = after.find(char::is_whitespace).unwrap_or(after.len());
        let (word, tail) = after.split_at(word_end);
        rest = tail;
        if word.is_empty() {
            out.push_str(space);
            return out;
        }
        match skip {
            Skip::ToQuote(quote) => {
                if word.contains(quote) {
                    skip = Skip::Nothing;
                }
                continue;
            }
            Skip::ToFlag if !word.trim_start_matches(QUOTES).starts_with('-') => continue,
            _ => skip = Skip::Nothing,
        }
        out.push_str(space);
        let unquoted = word.trim_start_matches(QUOTES);
        let redacted = redact_in_turn(unquoted, next_is, secret_query_parameters);
        next_is = redacted.next;
        out.push_str(&word[..word.len() - unquoted.len()]);
        out.push_str(&redacted.text);
        if redacted.runs_on == RunsOn::No {
            continue;
        }
        // A quote this word opens and does not close.
        let open = QUOTES
            .iter()
            .filter(|&&q| word.matches(q).count() % 2 == 1)
            .min_by_key(|&&q| word.find(q));
        match (open, redacted.runs_on) {
            (Some(&quote), _) => {
                out.push(quote);
                skip = Skip::ToQuote(quote);
            }
            (None, RunsOn::ToNextFlag) if !word.contains(QUOTES) => skip = Skip::ToFlag,
            _ => {}
        }
    }
}

/// Quotes a word of a command line in one string may open.
const QUOTES: [char; 2] = ['\'', '"'];

/// The words [`redact_words`] leaves out, as a secret runs on.
#[derive(Clone, Copy)]
enum Skip {
    Nothing,
    /// To the word closing this quote, that one included.
    ToQuote(char),
    /// To the next word starting with `-`, that one excluded.
    ToFlag,
}

/// Whether a header's value is a secret: the headers the HTTP attributes
/// never record ([`SENSITIVE_HEADERS`]), and any with a secret name
/// (`X-Api-Key`).
fn is_secret_header(name: &str) -> bool {
    SENSITIVE_HEADERS
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
        || is_secret_name(name)
}

/// `Name: value` with a secret header name, redacted; None when the
/// argument is not a secret header line.
fn redact_header(argument: &str) -> Option<String> {
    let (name, _) = argument.split_once(':')?;
    let is_header_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (is_header_name && is_secret_header(name)).then(|| format!("{name}: {REDACTED}"))
}

fn is_variable_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A URL with its user info's password and its secret query parameters
/// redacted.
fn redact_url(url: &str, secret_query_parameters: &[String]) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The authority ends at the first `/`, `?` or `#`.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_more) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:{REDACTED}@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let (before_fragment, fragment) = match path_and_more.split_once('#') {
        Some((before, fragment)) => (before, Some(fragment)),
        None => (path_and_more, None),
    };
    let path_and_query = match before_fragment.split_once('?') {
        Some((path, query)) => format!("{path}?{}", redact_query(query, secret_query_parameters)),
        None => before_fragment.to_string(),
    };
    let mut out = format!("{scheme}://{authority}{path_and_query}");
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Vec<String> {
        vec!["token".into(), "sig".into()]
    }

    fn redact(args: &[&str]) -> String {
        redact_command_line(args, &params())
    }

    #[test]
    fn curl_with_a_bearer_token_a_user_and_a_token_in_the_url() {
        let line = redact(&[
            "curl",
            "-H",
            "Authorization: Bearer sekrit",
            "-H",
            "Accept: text/plain",
            "-u",
            "alice:hunter2",
            "-b",
            "session=abc",
            "http://bob:pw@127.0.0.1:8080/a?token=t0k&page=2#top",
        ]);
        assert_eq!(
            line,
            "curl -H Authorization: REDACTED -H Accept: text/plain -u alice:REDACTED -b REDACTED \
             http://bob:REDACTED@127.0.0.1:8080/a?token=REDACTED&page=2#top"
        );
        for secret in ["sekrit", "hunter2", "abc", "pw@", "t0k"] {
            assert!(!line.contains(secret), "{secret} in {line}");
        }
    }

    #[test]
    fn secret_flags_in_both_forms_and_variables() {
        assert_eq!(
            redact(&[
                "app",
                "--db-password",
                "p1",
                "--api-key=k2",
                "-token",
                "t3",
                "--key",
                "k4",
                "--keyboard",
                "us",
                "--port=8080",
                "GITHUB_TOKEN=t5",
                "MODE=fast",
            ]),
            "app --db-password REDACTED --api-key=REDACTED -token REDACTED --key REDACTED \
             --keyboard us --port=8080 GITHUB_TOKEN=REDACTED MODE=fast"
        );
    }

    #[test]
    fn connection_strings_and_plain_arguments() {
        assert_eq!(
            redact(&[
                "psql",
                "postgres://app:s3cret@db:5432/orders?sslmode=require"
            ]),
            "psql postgres://app:REDACTED@db:5432/orders?sslmode=require"
        );
        assert_eq!(
            redact(&["python3", "-m", "http.server", "8000"]),
            "python3 -m http.server 8000"
        );
        // A secret flag at the end has nothing to redact.
        assert_eq!(redact(&["app", "--password"]), "app --password");
        // A plain program name stays, whatever its name.
        assert_eq!(
            redact(&["token-service", "--port", "1"]),
            "token-service --port 1"
        );
        assert_eq!(redact(&[]), "");
    }

    #[test]
    fn the_value_after_a_plain_flags_equals_sign_is_checked_as_an_argument() {
        assert_eq!(
            redact(&["app", "--url=https://u:pw1@h/a?token=t2&page=2"]),
            "app --url=https://u:REDACTED@h/a?token=REDACTED&page=2"
        );
        assert_eq!(
            redact(&["app", "--database-url=postgres://app:pw3@db:5432/orders"]),
            "app --database-url=postgres://app:REDACTED@db:5432/orders"
        );
        assert_eq!(
            redact(&["curl", "--proxy=http://u:pw4@proxy:3128", "http://h/"]),
            "curl --proxy=http://u:REDACTED@proxy:3128 http://h/"
        );
        assert_eq!(
            redact(&[
                "wget",
                "--header=Authorization: Bearer b5",
                "--header=Cookie: a=c6",
                "--header=Accept: text/plain",
                "--proxy-header=Proxy-Authorization: Basic p7",
            ]),
            "wget --header=Authorization: REDACTED --header=Cookie: REDACTED \
             --header=Accept: text/plain --proxy-header=Proxy-Authorization: REDACTED"
        );
        // A value that is itself a header line or a secret variable.
        assert_eq!(
            redact(&[
                "app",
                "--extra=X-Api-Key: k8",
                "--env=DB_PASSWORD=p9",
                "--mode=a=b"
            ]),
            "app --extra=X-Api-Key: REDACTED --env=DB_PASSWORD=REDACTED --mode=a=b"
        );
        // Credential flags in `=` form, and glued to their short flag.
        assert_eq!(
            redact(&[
                "curl",
                "--user=alice:u10",
                "--proxy-user=bob:u11",
                "-ucarol:u12",
                "-HAuthorization: Bearer b13",
                "-Help",
            ]),
            "curl --user=alice:REDACTED --proxy-user=bob:REDACTED -ucarol:REDACTED \
             -HAuthorization: REDACTED -Help"
        );
        // Plain values stay readable.
        assert_eq!(
            redact(&[
                "app",
                "--port=8080",
                "--url=http://h:80/a?page=1",
                "--mode=fast"
            ]),
            "app --port=8080 --url=http://h:80/a?page=1 --mode=fast"
        );
    }

    #[test]
    fn every_header_the_http_attributes_never_record_is_a_secret_argument() {
        for name in SENSITIVE_HEADERS {
            for form in [name.to_string(), name.to_ascii_uppercase()] {
                assert_eq!(
                    redact(&["curl", "-H", &format!("{form}: s3cret")]),
                    format!("curl -H {form}: REDACTED")
                );
                assert_eq!(
                    redact(&["wget", &format!("--header={form}: s3cret")]),
                    format!("wget --header={form}: REDACTED")
                );
            }
        }
    }

    #[test]
    fn a_command_line_in_one_string_is_redacted_word_by_word() {
        // setproctitle: the whole command line in argv[0].
        assert_eq!(
            redact(&["worker --password=p1 --port=1"]),
            "worker --password=REDACTED --port=1"
        );
        assert_eq!(
            redact(&["worker --password p2 --url=https://u:p3@h/?sig=s4 -v"]),
            "worker --password REDACTED --url=https://u:REDACTED@h/?sig=REDACTED -v"
        );
        // One argument holding words, after a plain argv[0].
        assert_eq!(
            redact(&["python3", "worker --api-key k5  DB_PASSWORD=p6"]),
            "python3 worker --api-key REDACTED  DB_PASSWORD=REDACTED"
        );
        // A header's value runs to the next flag unquoted, to its closing
        // quote quoted.
        assert_eq!(
            redact(&["curl -H Authorization: Bearer b7 -s http://h/"]),
            "curl -H Authorization: REDACTED -s http://h/"
        );
        assert_eq!(
            redact(&[
                "sh",
                "-c",
                "curl -H 'Authorization: Bearer b8' -u 'al:p 9' http://h/ && env TOKEN=\"t 10\" app"
            ]),
            "sh -c curl -H 'Authorization: REDACTED' -u 'al:REDACTED' http://h/ \
             && env TOKEN=REDACTED\" app"
        );
        assert_eq!(
            redact(&["wget --header=Cookie: a=c11; b=c12"]),
            "wget --header=Cookie: REDACTED"
        );
        // A name with a space is no flag: its words are.
        assert_eq!(
            redact(&["app", "--password p13 --port=1"]),
            "app --password REDACTED --port=1"
        );
        // Plain ones are kept as they are, spaces included.
        for plain in [
            "nginx: worker process",
            "postgres: app orders 10.0.0.1(5432) idle",
            "/usr/bin/python3",
            "-bash",
            "token-service",
        ] {
            assert_eq!(redact(&[plain, "-v"]), format!("{plain} -v"));
        }
    }

    #[test]
    fn text_that_is_not_ascii_is_cut_at_characters() {
        assert_eq!(
            redact(&["é -Hé:x", "-uü:p1", "--ü=x://ü:p2@h", "'ü", "Ä=\"b ü\""]),
            "é -Hé:x -uü:REDACTED --ü=x://ü:REDACTED@h 'ü Ä=\"b ü\""
        );
        assert_eq!(
            redact(&["sh", "-c", "x --token 'ü ü\u{a0}ü' é"]),
            "sh -c x --token 'REDACTED' é"
        );
    }

    #[test]
    fn a_name_gets_the_rules_of_one_argument() {
        let name = |n: &str| redact_name(n, &params());
        for plain in [
            "curl",
            "python3.11",
            "token-service",
            "kworker/0:1",
            "-bash",
        ] {
            assert_eq!(name(plain), plain);
        }
        assert_eq!(name("DB_PASSWORD=p1"), "DB_PASSWORD=REDACTED");
        assert_eq!(name("--token=t2"), "--token=REDACTED");
        assert_eq!(name("Authorization:b3"), "Authorization: REDACTED");
        assert_eq!(name("w://u:p4@h"), "w://u:REDACTED@h");
        assert_eq!(name("worker token=t5"), "worker token=REDACTED");
    }

    #[test]
    fn secret_names() {
        for name in [
            "password",
            "DB_PASSWD",
            "client-secret",
            "X-Api-Key",
            "Proxy-Authorization",
            "Cookie",
            "AWS_SECRET_ACCESS_KEY",
            "key",
            "ssh.key",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in ["port", "keyboard", "monkey", "host", "user", "Accept"] {
            assert!(!is_secret_name(name), "{name}");
        }
    }
}
