//! `dtfed-wan-relay`: a UDP relay that adds WAN conditions between two QUIC endpoints, for
//! local multi-region setups and ops drills (the test machines have no `tc netem`). See
//! `dtfed_regions::relay` for the semantics.
//!
//! ```text
//! dtfed-wan-relay --listen 127.0.0.1:7201 --upstream 127.0.0.1:7101 \
//!     --delay-ms 35 --jitter-ms 5 --loss 0.01
//! ```
//!
//! Prints `listening <addr> upstream <addr>` on stdout once up (so scripts can use
//! `--listen 127.0.0.1:0`), then reads commands from stdin, one a line:
//! `cut`, `heal`, `delay MS`, `jitter MS`, `loss P`, `reorder P`, `duplicate P`,
//! `limit N`, `stats`, `profile`, `help`, `quit`. Each is answered with one line on
//! stdout (`ok ...` or `error ...`). When stdin closes, the relay keeps running until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use dtfed_regions::{WanProfile, WanRelay};
use std::io::BufRead;

use tokio::sync::mpsc;

const USAGE: &str = "\
usage: dtfed-wan-relay --listen ADDR --upstream ADDR [--delay-ms MS] [--jitter-ms MS]
                       [--loss P] [--reorder P] [--duplicate P] [--limit PACKETS]

Relays UDP datagrams from clients at ADDR to the upstream, adding one-way delay (each
direction), jitter, loss, reordering and duplication. Commands on stdin: cut, heal,
delay MS, jitter MS, loss P, reorder P, duplicate P, limit N, stats, profile, help, quit.";

struct Args {
    listen: SocketAddr,
    upstream: SocketAddr,
    profile: WanProfile,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut profile = WanProfile::default();
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(parse(&flag, &value)?),
            "--upstream" => upstream = Some(parse(&flag, &value)?),
            other => apply(&mut profile, other.trim_start_matches("--"), &value)?,
        }
    }
    profile.validate().map_err(|e| e.to_string())?;
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        upstream: upstream.ok_or("--upstream is required")?,
        profile,
    })
}

fn parse<T: std::str::FromStr>(what: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{what}: cannot parse `{value}`"))
}

/// Applies one `name value` setting (a flag without `--`, or a stdin command).
fn apply(profile: &mut WanProfile, name: &str, value: &str) -> Result<(), String> {
    let ms = |v: &str| parse::<u64>(name, v).map(Duration::from_millis);
    match name {
        "delay-ms" | "delay" => profile.delay = ms(value)?,
        "jitter-ms" | "jitter" => profile.jitter = ms(value)?,
        "loss" => profile.loss = parse(name, value)?,
        "reorder" => profile.reorder = parse(name, value)?,
        "duplicate" => profile.duplicate = parse(name, value)?,
        "limit" => profile.limit = parse(name, value)?,
        other => return Err(format!("unknown setting `{other}`")),
    }
    Ok(())
}

fn describe(profile: &WanProfile) -> String {
    format!(
        "delay {} jitter {} loss {} reorder {} duplicate {} limit {}",
        profile.delay.as_millis(),
        profile.jitter.as_millis(),
        profile.loss,
        profile.reorder,
        profile.duplicate,
        profile.limit
    )
}

/// Runs one stdin command; `None` means quit.
fn command(relay: &WanRelay, line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    let Some(verb) = words.next() else {
        return Some(String::new());
    };
    let arg = words.next();
    let reply = match (verb, arg) {
        ("quit" | "exit", _) => return None,
        ("cut", None) => {
            relay.cut();
            "ok cut".to_owned()
        }
        ("heal", None) => {
            relay.heal();
            "ok healed".to_owned()
        }
        ("stats", None) => {
            let s = relay.stats();
            format!(
                "ok forwarded {} dropped {} loss {} cut {} overflow {} error {} duplicated {} clients {}",
                s.forwarded,
                s.dropped,
                s.dropped_loss,
                s.dropped_cut,
                s.dropped_overflow,
                s.dropped_error,
                s.duplicated,
                s.clients
            )
        }
        ("profile", None) => format!(
            "ok {}{}",
            describe(&relay.profile()),
            if relay.is_cut() { " (cut)" } else { "" }
        ),
        ("help", _) => format!("ok {}", USAGE.lines().last().unwrap_or_default()),
        (name, Some(value)) => {
            let mut profile = relay.profile();
            match apply(&mut profile, name, value)
                .and_then(|()| relay.set_profile(profile).map_err(|e| e.to_string()))
            {
                Ok(()) => format!("ok {}", describe(&profile)),
                Err(e) => format!("error {e}"),
            }
        }
        (other, None) => format!("error unknown command `{other}` (try help)"),
    };
    Some(reply)
}

/// Lines of stdin, read on a plain thread: tokio's stdin reads on a blocking-pool thread
/// that the runtime would wait for at exit, so a relay with an idle terminal could not stop.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("dtfed-wan-relay: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let relay = match WanRelay::start(args.listen, args.upstream, args.profile).await {
        Ok(relay) => relay,
        Err(e) => {
            eprintln!("dtfed-wan-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "listening {} upstream {}",
        relay.local_addr(),
        args.upstream
    );

    let mut lines = stdin_lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            () = stop_signal() => break,
            line = lines.recv(), if stdin_open => match line {
                Some(line) => match command(&relay, &line) {
                    Some(reply) if reply.is_empty() => {}
                    Some(reply) => println!("{reply}"),
                    None => break,
                },
                // EOF (e.g. started with </dev/null): keep relaying until a signal.
                None => stdin_open = false,
            },
        }
    }
    tracing::info!("relay stopping");
    relay.shutdown().await;
    tracing::info!("relay stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse_args(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parses_flags() {
        let a = args(
            "--listen 127.0.0.1:7201 --upstream 127.0.0.1:7101 --delay-ms 35 --jitter-ms 5 --loss 0.01",
        )
        .expect("args");
        assert_eq!(a.listen.port(), 7201);
        assert_eq!(a.upstream.port(), 7101);
        assert_eq!(a.profile.delay, Duration::from_millis(35));
        assert_eq!(a.profile.jitter, Duration::from_millis(5));
        assert_eq!(a.profile.loss, 0.01);
        assert!(args("--listen 127.0.0.1:1").is_err());
        assert!(args("--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --loss 2").is_err());
        assert!(args("--listen 127.0.0.1:1 --upstream 127.0.0.1:2 --bogus 1").is_err());
        assert!(args("--listen").is_err());
    }

    #[tokio::test]
    async fn commands() {
        let relay = WanRelay::start(
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:9".parse().expect("addr"),
            WanProfile::default(),
        )
        .await
        .expect("relay");
        assert_eq!(command(&relay, "cut").as_deref(), Some("ok cut"));
        assert!(relay.is_cut());
        assert_eq!(command(&relay, "heal").as_deref(), Some("ok healed"));
        assert!(!relay.is_cut());
        let reply = command(&relay, "delay 270").expect("reply");
        assert!(reply.starts_with("ok delay 270"), "{reply}");
        assert_eq!(relay.profile().delay, Duration::from_millis(270));
        let reply = command(&relay, "loss 7").expect("reply");
        assert!(reply.starts_with("error"), "{reply}");
        assert!(command(&relay, "stats")
            .expect("reply")
            .starts_with("ok forwarded 0"));
        assert!(command(&relay, "frobnicate")
            .expect("reply")
            .starts_with("error"));
        assert_eq!(command(&relay, "quit"), None);
    }
}
