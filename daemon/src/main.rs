//! `dtfed`: the command line. Bad config exits before any port is bound; SIGTERM drains.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dtfed::config::Config;
use dtfed::node::{Node, NodeOptions};
use dtfed::signals::StopSignals;

#[derive(Parser)]
#[command(
    name = "dtfed",
    version,
    about = "Multi-region message federation for game chat"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run one daemon of one region.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Seconds from SIGTERM to exit, pre-stop window included: the drain gets what
        /// is left, and the daemon exits when it is up even if the drain is not done. A
        /// second SIGTERM or SIGINT exits at once.
        #[arg(long, default_value_t = 20, env = "DTFED_GRACE_SECS")]
        grace: u64,
        /// Seconds after SIGTERM during which `/readyz` answers 503 while the daemon
        /// still accepts and serves players, so load balancers stop sending them here
        /// before it stops accepting (Kubernetes: a few seconds; must be below --grace).
        #[arg(long, default_value_t = 0, env = "DTFED_UNREADY_SECS")]
        unready_delay: u64,
    },
    /// Run a region with embedded stand-ins for Kafka and Redis, and a chat page (default).
    Demo(dtfed::demo::DemoArgs),
    /// Check a config file and print every problem in it.
    CheckConfig { file: PathBuf },
    /// Make the federation CA and region certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// A failover drill: canary players, a fault, a per-room loss/duplicate/order verdict.
    Drill(dtfed::drill::DrillArgs),
    /// Check that every region holds the same records of a room (exit 1 if not, 2 if the
    /// check could not run).
    Verify(dtfed::verify::VerifyArgs),
    /// Show a running daemon's links, mirror lag, fan-out lag and clients.
    Status {
        /// The daemon's admin address, e.g. http://127.0.0.1:9090
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's admin.token, when it has one.
        #[arg(long, env = "DTFED_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make the federation CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Make a region's key and certificate, signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        region: String,
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let command = cli
        .command
        .unwrap_or(Command::Demo(dtfed::demo::DemoArgs::default()));
    if let Command::CheckConfig { file } = &command {
        return match Config::load(file) {
            Ok(cfg) => {
                for w in cfg.warnings() {
                    eprintln!("{}: warning: {w}", file.display());
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errs) => {
                for e in errs.0 {
                    eprintln!("{e}");
                }
                ExitCode::from(2)
            }
        };
    }
    if let Command::Certs(certs) = &command {
        let written = match certs {
            CertsCommand::Init { dir, force } => dtfed_regions::certs_init(dir, *force),
            CertsCommand::Issue { dir, region, force } => {
                dtfed_regions::certs_issue(dir, region, *force)
            }
        };
        return match written {
            Ok(paths) => {
                println!("wrote {} and {}", paths.cert.display(), paths.key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dtfed certs: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dtfed: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if let Command::Drill(args) = command {
            // A verdict of loss, duplicates or reorders exits 1; a drill that could not run, 2.
            return match dtfed::drill::run(args).await {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => Ok(ExitCode::from(1)),
                Err(e) => {
                    eprintln!("dtfed drill: {e:#}");
                    Ok(ExitCode::from(2))
                }
            };
        }
        if let Command::Verify(args) = command {
            // Regions that diverge exit 1; a check that could not run, 2.
            return match dtfed::verify::run(args).await {
                Ok(true) => Ok(ExitCode::SUCCESS),
                Ok(false) => Ok(ExitCode::from(1)),
                Err(e) => {
                    eprintln!("dtfed verify: {e:#}");
                    Ok(ExitCode::from(2))
                }
            };
        }
        match command {
            Command::Run {
                config,
                grace,
                unready_delay,
            } => {
                run(
                    config,
                    Duration::from_secs(grace),
                    Duration::from_secs(unready_delay),
                )
                .await
            }
            Command::Demo(args) => dtfed::demo::run(args).await,
            Command::Status { admin, json, token } => {
                dtfed::status::print(&admin, token.as_deref(), json).await
            }
            Command::CheckConfig { .. }
            | Command::Certs(_)
            | Command::Drill(_)
            | Command::Verify(_) => Ok(()),
        }
        .map(|()| ExitCode::SUCCESS)
    });
    // A drain cut short by its deadline can leave blocking work behind (a producer flush
    // or a consumer close against a Kafka that does not answer): not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dtfed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: PathBuf, grace: Duration, unready: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(
        unready < grace,
        "--unready-delay ({} s) must be shorter than --grace ({} s)",
        unready.as_secs(),
        grace.as_secs()
    );
    let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    let mut signals = StopSignals::install().context("installing signal handlers")?;
    let node = Node::start(
        cfg,
        NodeOptions {
            drain_endpoint: true,
            ..NodeOptions::default()
        },
    )
    .await?;
    println!(
        "listening client={} admin={}",
        node.client_addr, node.admin_addr
    );
    let sig = tokio::select! {
        sig = signals.next() => sig,
        () = node.drain_requested() => "POST /drain",
    };
    // From here the stop has one deadline; a second signal ends it at once.
    let hard_stop = tokio::time::Instant::now() + grace;
    tracing::info!(
        cause = sig,
        unready_secs = unready.as_secs(),
        grace_secs = grace.as_secs(),
        "stopping: not ready, then draining"
    );
    node.mark_unready();
    let stop = async {
        tokio::time::sleep(unready).await;
        node.shutdown(grace.saturating_sub(unready)).await;
    };
    tokio::select! {
        () = stop => Ok(()),
        sig = signals.next() => {
            tracing::warn!(signal = sig, "second stop signal: exiting without finishing the drain");
            std::process::exit(1);
        }
        () = tokio::time::sleep_until(hard_stop + Duration::from_secs(1)) => {
            tracing::error!(grace_secs = grace.as_secs(), "the drain did not finish within --grace: exiting");
            std::process::exit(1);
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DTFED_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,librdkafka=warn,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
