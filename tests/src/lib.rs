//! # dtfed-tests: integration tests with real processes
//!
//! The harness starts real servers as child processes and stops them by PID, also when a
//! test panics:
//!
//! | type | what | key methods |
//! | --- | --- | --- |
//! | [`KafkaBroker`] | Kafka 4.3.1, single node KRaft, via `deploy/kafka.sh run` | `start()`, `shared()`, `bootstrap()`, `stop()`, `kill()`, `restart()`, `pid()`, `log_tail(n)` |
//! | [`RedisServer`] | `redis-server`, no persistence, via `deploy/redis.sh run` | `start()`, `start_persistent()`, `shared()`, `url()`, `stop()`, `kill()`, `restart()`, `pid()` |
//! | [`DtfedProcess`] | `dtfed run --config <file>` | `start(toml)`, `start_with_env(toml, env)`, `ws_url()`, `ws_url_as(name)`, `admin_url()`, `admin_get(path, token)`, `pid()`, `kill9()`, `terminate()`, `restart()`, `log_tail(n)` |
//! | [`ConfigBuilder`] | the daemon's TOML, with per-test unique topic, group, key prefix | `new(test, region)`, `shared(test, region)`, `for_region(r)`, `node()`, `kafka()`, `redis()`, `set(section, key, v)`, `merge_toml()`, `build()` |
//! | [`WsClient`] | protocol-v1 client (async, tokio-tungstenite, `TCP_NODELAY`) | `connect(url)`, `send_json()`, `send_text()`, `recv_json(t)`, `recv_until(pred, t)`, `expect_close(t)`, `expect_silence(d)`, `sub()`, `publish()`, `ping()` |
//! | [`http_get`] | blocking HTTP/1.1 GET for the admin endpoints | |
//!
//! Process control ([`KafkaBroker`], [`RedisServer`], [`DtfedProcess`]) is blocking
//! (`std`): call it before the async part of a test, or from `spawn_blocking`. Start-up
//! takes ~1.5 s for Kafka (after a one-off fetch from Maven Central: run
//! `deploy/kafka.sh fetch`, which `deploy/test.sh` does), ~50 ms for Redis.
//!
//! ## Sharing
//!
//! [`KafkaBroker::shared`] and [`RedisServer::shared`] are one broker and one Redis per
//! test binary, started by the first test that asks and killed at exit; tests stay apart
//! through [`ConfigBuilder`]'s unique names. A test that stops, kills or restarts a server
//! starts its own with `start()`.
//!
//! ## No leaked processes
//!
//! - Every child runs in its own process group with `PR_SET_PDEATHSIG = SIGKILL`, forked
//!   from one long-lived spawner thread ([`harness::sys`]): if the test binary dies, even
//!   by SIGKILL, the kernel kills its children.
//! - `Drop` SIGKILLs the process group and reaps the child; then removes the temporary
//!   directory (under `$DTFED_TEST_TMP`, default `<tmp>/dtfed-tests`; set
//!   `DTFED_KEEP_TEST_DIRS=1` to keep them). If the test is panicking, the tail of the
//!   server's log is printed first.
//! - Shared servers are killed by an `atexit` hook; directories left by a killed test
//!   binary are swept by the next run.
//!
//! ## Environment
//!
//! - `DTFED_BIN`: the `dtfed` binary (default: `target/<profile>/dtfed` next to the test
//!   binary; `cargo build -p dtfed` makes it).
//! - `DTFED_CACHE`: where `deploy/kafka.sh` keeps Kafka (default `~/.cache/dtfed`).
//!
//! ## Example
//!
//! ```no_run
//! use std::time::Duration;
//! use dtfed_tests::{ConfigBuilder, DtfedProcess, WsClient};
//! use serde_json::json;
//!
//! # async fn example() -> anyhow::Result<()> {
//! let cfg = ConfigBuilder::shared("resume_after_crash", "seoul")?;
//! let mut d1 = DtfedProcess::start(&cfg.clone().node("seoul-1").build())?;
//! let d2 = DtfedProcess::start(&cfg.clone().node("seoul-2").build())?;
//!
//! let t = Duration::from_secs(10);
//! let mut alice = WsClient::connect(&d1.ws_url_as("alice")).await?;
//! let mut bob = WsClient::connect(&d2.ws_url_as("bob")).await?;
//! bob.sub("room-1", None, t).await?;
//! let ack = alice.publish("room-1", json!({"text": "hi"}), t).await?;
//! let msg = bob.recv_until(|f| f["op"] == "msg", t).await?;
//! assert_eq!(msg["offset"], ack["offset"]);
//! d1.kill9()?;
//! # Ok(()) }
//! ```

pub mod harness;

pub use harness::{
    free_port, http_get, http_request, pid_alive, wait_pid_gone, ConfigBuilder, DtfedProcess,
    HttpResponse, KafkaBroker, RedisServer, Subscribed, TestDir, WsClient,
};
