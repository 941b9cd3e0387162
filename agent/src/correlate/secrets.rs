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
//!   'Authorization: Bearer x'`, `Cookie: ...`);
//! - the password of a URL's user info (`postgres://app:x@db/`), and the
//!   URL's secret query parameters (the same list as `url.query`'s);
//! - the value after curl-style credential flags (`-u user:x` keeps the
//!   user, `-b`/`--cookie`, `--oauth2-bearer`).
//!
//! Not recognizable, so not redacted: secrets glued to a short flag
//! (`mysql -pxyz`) or passed as a bare positional argument. That is why
//! the command line is opt-in.

use super::attributes::redact_query;

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

/// Flags whose next argument is a credential whatever their name says
/// (curl's, mostly): the value is redacted, a `user:` prefix kept.
const CREDENTIAL_FLAGS: &[&str] = &["-u", "--user", "-U", "--proxy-user", "-b", "--cookie"];

/// Flags whose next argument is a header line (`Name: value`).
const HEADER_FLAGS: &[&str] = &["-H", "--header", "--proxy-header"];

/// The command line `arguments` with their secrets redacted, joined by
/// spaces; `secret_query_parameters` as for `url.query`.
pub fn redact_command_line<S: AsRef<str>>(
    arguments: &[S],
    secret_query_parameters: &[String],
) -> String {
    let mut out = Vec::with_capacity(arguments.len());
    // What the previous argument said about this one.
    let mut next_is = Next::Plain;
    for (i, argument) in arguments.iter().enumerate() {
        let argument = argument.as_ref();
        let this = std::mem::replace(&mut next_is, Next::Plain);
        // The program itself is never a secret.
        if i == 0 {
            out.push(argument.to_string());
            continue;
        }
        let redacted = match this {
            Next::Secret => REDACTED.to_string(),
            Next::Credential => match argument.split_once(':') {
                Some((user, _)) => format!("{user}:{REDACTED}"),
                None => REDACTED.to_string(),
            },
            Next::Header => redact_header(argument).unwrap_or_else(|| argument.to_string()),
            Next::Plain => {
                let (redacted, next) = redact_argument(argument, secret_query_parameters);
                next_is = next;
                redacted
            }
        };
        out.push(redacted);
    }
    out.join(" ")
}

/// What an argument makes of the one after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Plain,
    Secret,
    Credential,
    Header,
}

/// One argument on its own: the redacted text, and what it says of the
/// next argument.
fn redact_argument(argument: &str, secret_query_parameters: &[String]) -> (String, Next) {
    if CREDENTIAL_FLAGS.contains(&argument) {
        return (argument.to_string(), Next::Credential);
    }
    if HEADER_FLAGS.contains(&argument) {
        return (argument.to_string(), Next::Header);
    }
    if let Some(flag) = argument.strip_prefix('-') {
        let flag = flag.trim_start_matches('-');
        return match flag.split_once('=') {
            Some((name, _)) if is_secret_name(name) => (
                format!(
                    "{}={REDACTED}",
                    &argument[..argument.len() - flag.len() + name.len()]
                ),
                Next::Plain,
            ),
            Some(_) => (argument.to_string(), Next::Plain),
            None if is_secret_name(flag) => (argument.to_string(), Next::Secret),
            None => (argument.to_string(), Next::Plain),
        };
    }
    if argument.contains("://") {
        return (redact_url(argument, secret_query_parameters), Next::Plain);
    }
    if let Some(header) = redact_header(argument) {
        return (header, Next::Plain);
    }
    if let Some((name, _)) = argument.split_once('=')
        && is_variable_name(name)
        && is_secret_name(name)
    {
        return (format!("{name}={REDACTED}"), Next::Plain);
    }
    (argument.to_string(), Next::Plain)
}

/// `Name: value` with a secret header name, redacted; None when the
/// argument is not a secret header line.
fn redact_header(argument: &str) -> Option<String> {
    let (name, _) = argument.split_once(':')?;
    let is_header_name = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (is_header_name && is_secret_name(name)).then(|| format!("{name}: {REDACTED}"))
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
        // The program is never redacted, whatever its name.
        assert_eq!(
            redact(&["token-service", "--port", "1"]),
            "token-service --port 1"
        );
        assert_eq!(redact(&[]), "");
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
