//! `dtfed`: the command line. Bad config exits before any port is bound; SIGTERM drains.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dtfed::config::Config;
use dtfed::node::{Node, NodeOptions};

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
        /// Seconds to drain after SIGTERM before exiting.
        #[arg(long, default_value_t = 20)]
        grace: u64,
    },
    /// Run a region with embedded stand-ins for Kafka and Redis, and a chat page (default).
    Demo(dtfed::demo::DemoArgs),
    /// Check a config file and print every problem in it.
    CheckConfig { file: PathBuf },
    /// Make the federation CA and region certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Show a running daemon's links, mirror lag, fan-out lag and clients.
    Status {
        /// The daemon's admin address, e.g. http://127.0.0.1:9090
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
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
            Ok(_) => {
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
        match command {
            Command::Run { config, grace } => run(config, Duration::from_secs(grace)).await,
            Command::Demo(args) => dtfed::demo::run(args).await,
            Command::Status { admin, json } => dtfed::status::print(&admin, json).await,
            Command::CheckConfig { .. } | Command::Certs(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dtfed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: PathBuf, grace: Duration) -> anyhow::Result<()> {
    let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let node = Node::start(cfg, NodeOptions::default()).await?;
    println!(
        "listening client={} admin={}",
        node.client_addr, node.admin_addr
    );
    dtfed::signals::terminated()
        .await
        .context("waiting for signals")?;
    node.shutdown(grace).await;
    Ok(())
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
