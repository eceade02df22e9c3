//! What an operator sees of one real `dtfed` daemon (real Kafka, real Redis): how it stops
//! (pre-stop window, one deadline, a second signal), who may read its admin endpoints, and
//! what its logs keep out.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dtfed_tests::harness::sys::send_signal;
use dtfed_tests::{ConfigBuilder, DtfedProcess, KafkaBroker, RedisServer, WsClient};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

/// SIGSTOPs a broker; SIGCONTs it when dropped (also when the test fails).
struct FrozenBroker<'a>(&'a KafkaBroker);

impl<'a> FrozenBroker<'a> {
    fn freeze(broker: &'a KafkaBroker) -> Result<Self> {
        let pid = broker.pid().context("the broker is not running")?;
        send_signal(pid as i32, libc::SIGSTOP).context("SIGSTOP the broker")?;
        Ok(FrozenBroker(broker))
    }
}

impl Drop for FrozenBroker<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.0.pid() {
            let _ = send_signal(pid as i32, libc::SIGCONT);
        }
    }
}

/// A daemon of its own broker (which the test freezes), on the shared Redis.
async fn daemon_on_own_broker(test: &str, args: &[&str]) -> Result<(KafkaBroker, DtfedProcess)> {
    let broker = tokio::task::spawn_blocking(KafkaBroker::start).await??;
    let cfg = ConfigBuilder::new(test, "seoul")
        .kafka(&broker.bootstrap())
        .redis(&RedisServer::shared()?.url())
        .partitions(1)
        .build();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let d = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        DtfedProcess::start_with_args(&cfg, &[], &args)
    })
    .await??;
    Ok((broker, d))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_ends_by_its_deadline_when_kafka_hangs() -> Result<()> {
    let (broker, mut d) = daemon_on_own_broker("drain-deadline", &["--grace", "4"]).await?;
    let mut c = WsClient::connect(&d.ws_url_as("ann")).await?;
    c.sub("hall", None, T).await?;
    c.publish("hall", json!({"text": "before"}), T).await?;

    // Kafka stops answering, with a publish in flight: every step of the drain would wait
    // for it (the session for the ack, the producer flush, the fan-out commit).
    let _frozen = FrozenBroker::freeze(&broker)?;
    c.send_json(&json!({"op": "pub", "room": "hall", "body": {"text": "stuck"}, "ref": "s"}))
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    d.signal(libc::SIGTERM)?;
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(15)))?;
    let took = t0.elapsed();
    let log = d.log_tail(30);
    assert!(
        status.is_some(),
        "still running 15 s after SIGTERM; log:\n{log}"
    );
    assert!(
        took <= Duration::from_millis(5_500),
        "--grace 4 took {took:?}; log:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() -> Result<()> {
    let (broker, mut d) = daemon_on_own_broker("second-signal", &["--grace", "60"]).await?;
    let mut c = WsClient::connect(&d.ws_url_as("ann")).await?;
    c.publish("hall", json!({"text": "before"}), T).await?;
    let _frozen = FrozenBroker::freeze(&broker)?;
    c.send_json(&json!({"op": "pub", "room": "hall", "body": {"text": "stuck"}, "ref": "s"}))
        .await?;
    d.signal(libc::SIGTERM)?;
    let first = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(2)))?;
    assert!(
        first.is_none(),
        "the drain of a stuck publish should still be running: {first:?}"
    );
    let t0 = Instant::now();
    d.signal(libc::SIGTERM)?;
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(10)))?;
    let log = d.log_tail(30);
    let status = status.with_context(|| format!("still running after a second SIGTERM:\n{log}"))?;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        !status.success(),
        "an unfinished drain must not exit 0: {status}"
    );
    assert!(log.contains("second stop signal"), "log:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_turns_unready_before_accepting_stops() -> Result<()> {
    let cfg = ConfigBuilder::shared("unready-window", "seoul")?
        .partitions(1)
        .build();
    let mut d = tokio::task::spawn_blocking(move || {
        DtfedProcess::start_with_args(&cfg, &[], &["--unready-delay", "3", "--grace", "15"])
    })
    .await??;
    let mut old = WsClient::connect(&d.ws_url_as("old")).await?;
    old.sub("hall", None, T).await?;

    let t0 = Instant::now();
    d.signal(libc::SIGTERM)?;
    // Within a moment the load balancer is told to stop sending players here ...
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let r = d.admin_get("/readyz", None)?;
        if r.status == 503 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "/readyz still {}", r.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... but a player it still sends gets in, and chat goes on.
    let mut late = WsClient::connect(&d.ws_url_as("late")).await?;
    late.sub("hall", None, T).await?;
    late.publish("hall", json!({"text": "still here"}), T)
        .await?;
    let got = old
        .recv_until(|f| f["op"] == "msg" && f["body"]["text"] == "still here", T)
        .await?;
    assert_eq!(got["room"], "hall");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "the window closed before the test could use it"
    );

    // After the window the daemon drains: players are told it is going away.
    let (code, _) = old.expect_close(Duration::from_secs(10)).await?;
    assert_eq!(code, 1001, "close code");
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "closed after {:?}, inside the pre-stop window",
        t0.elapsed()
    );
    let status = tokio::task::block_in_place(|| d.wait_exit(Duration::from_secs(15)))?
        .context("still running after the drain")?;
    assert!(status.success(), "{status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_status_and_metrics_but_not_probes() -> Result<()> {
    let token = "op-token-0123456789abcdef";
    let cfg = ConfigBuilder::shared("admin-token", "seoul")?
        .partitions(1)
        .admin_token(token)
        .build();
    let d = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg)).await??;
    for path in ["/status", "/metrics"] {
        let r = d.admin_get(path, None)?;
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        let r = d.admin_get(path, Some("wrong-token-0123456789"))?;
        assert_eq!(r.status, 401, "{path} with a wrong token: {}", r.body);
        let r = d.admin_get(path, Some(token))?;
        assert_eq!(r.status, 200, "{path} with the token: {}", r.body);
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(d.admin_get(path, None)?.status, 200, "{path} is a probe");
    }
    // A drain changes state: never without the token.
    let r = dtfed_tests::http_request(d.admin_addr(), "POST", "/drain", &[], b"")?;
    assert_eq!(r.status, 401, "POST /drain without a token: {}", r.body);
    assert!(d.is_running());

    // `dtfed status` says what to do, then works with the token.
    let bin = DtfedProcess::binary()?;
    let admin = d.admin_url();
    let out = std::process::Command::new(&bin)
        .args(["status", "--admin", &admin])
        .env_remove("DTFED_ADMIN_TOKEN")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no token: {err}");
    assert!(err.contains("DTFED_ADMIN_TOKEN"), "{err}");
    let out = std::process::Command::new(&bin)
        .args(["status", "--admin", &admin])
        .env("DTFED_ADMIN_TOKEN", token)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("seoul"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_stays_out_of_the_log() -> Result<()> {
    // The shared Redis has no password, so AUTH fails and the daemon reports the failed
    // connection at start-up: the report must not carry the password.
    let redis = RedisServer::shared()?;
    let url = redis
        .url()
        .replacen("redis://", "redis://:hunter2-secret@", 1);
    let cfg = ConfigBuilder::shared("redis-redact", "seoul")?
        .partitions(1)
        .redis(&url)
        .build();
    let err = tokio::task::spawn_blocking(move || DtfedProcess::start(&cfg))
        .await?
        .expect_err("Redis refuses the password");
    let text = format!("{err:#}");
    assert!(text.contains("Redis"), "the failure names Redis: {text}");
    assert!(
        !text.contains("hunter2-secret"),
        "password in the log: {text}"
    );
    assert!(text.contains(":***@"), "{text}");
    Ok(())
}
