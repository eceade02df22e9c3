//! Smoke tests of the harness itself: real Kafka and Redis start, restart, and die with
//! their owner (on drop, on panic, when the test binary is SIGKILLed, at exit). They do
//! not need `dtfed`: the daemon wrapper is exercised with a stand-in (python3).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dtfed_tests::harness::{sys, util};
use dtfed_tests::{pid_alive, wait_pid_gone, DtfedProcess, KafkaBroker, RedisServer, WsClient};
use serde_json::json;

const GONE: Duration = Duration::from_secs(10);

fn cluster_id(broker: &KafkaBroker) -> String {
    std::fs::read_to_string(broker.dir().join("data/meta.properties"))
        .expect("meta.properties")
        .lines()
        .find_map(|l| l.strip_prefix("cluster.id=").map(str::to_string))
        .expect("cluster.id in meta.properties")
}

#[test]
fn kafka_and_redis_start_restart_and_die_on_drop() {
    let t = Instant::now();
    let (kafka, redis) = std::thread::scope(|s| {
        let k = s.spawn(KafkaBroker::start);
        let r = s.spawn(RedisServer::start);
        (k.join().unwrap(), r.join().unwrap())
    });
    let mut kafka = kafka.expect("start Kafka");
    let mut redis = redis.expect("start Redis");
    eprintln!("Kafka and Redis started in {:?}", t.elapsed());

    let kafka_addr = util::loopback(kafka.port());
    assert!(util::port_open(kafka_addr), "Kafka port not open");
    assert!(util::port_open(util::loopback(kafka.controller_port())));
    assert_eq!(kafka.bootstrap(), format!("127.0.0.1:{}", kafka.port()));
    assert!(
        dtfed_tests::harness::redis::ping(redis.port()),
        "Redis PING"
    );
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    let id = cluster_id(&kafka);

    // Graceful restart: same port, same data, new process.
    let pid1 = kafka.pid().unwrap();
    let t = Instant::now();
    kafka.restart().expect("restart Kafka");
    eprintln!("Kafka graceful restart took {:?}", t.elapsed());
    let pid2 = kafka.pid().unwrap();
    assert_ne!(pid1, pid2);
    assert!(!pid_alive(pid1), "old Kafka still alive");
    assert!(util::port_open(kafka_addr));
    assert_eq!(cluster_id(&kafka), id, "restart reformatted the storage");

    // Crash and restart.
    kafka.kill().unwrap();
    assert!(wait_pid_gone(pid2, GONE), "Kafka not dead after kill()");
    assert!(kafka.pid().is_none() && !kafka.is_running());
    let t = Instant::now();
    kafka.restart().expect("restart Kafka after SIGKILL");
    eprintln!("Kafka restart after SIGKILL took {:?}", t.elapsed());
    assert!(util::port_open(kafka_addr));
    assert_eq!(cluster_id(&kafka), id);

    let rpid1 = redis.pid().unwrap();
    redis.restart().expect("restart Redis");
    assert_ne!(redis.pid().unwrap(), rpid1);
    assert!(!pid_alive(rpid1));
    assert!(dtfed_tests::harness::redis::ping(redis.port()));
    redis.kill().unwrap();
    assert!(!dtfed_tests::harness::redis::ping(redis.port()));
    redis.restart().unwrap();
    assert!(dtfed_tests::harness::redis::ping(redis.port()));

    // Drop kills by PID and removes the directories.
    let (kpid, kdir) = (kafka.pid().unwrap(), kafka.dir().to_path_buf());
    let (rpid, rdir) = (redis.pid().unwrap(), redis.dir().to_path_buf());
    let t = Instant::now();
    drop(kafka);
    drop(redis);
    eprintln!("drop took {:?}", t.elapsed());
    assert!(
        wait_pid_gone(kpid, GONE),
        "Kafka pid {kpid} alive after drop"
    );
    assert!(
        wait_pid_gone(rpid, GONE),
        "Redis pid {rpid} alive after drop"
    );
    assert!(!kdir.exists() && !rdir.exists(), "directories not removed");
    assert!(!util::port_open(kafka_addr));
}

#[test]
fn a_panicking_test_still_kills_its_servers() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let redis = RedisServer::start().unwrap();
        tx.send(redis.pid().unwrap()).unwrap();
        panic!("deliberate panic with a running Redis");
    })
    .join();
    assert!(result.is_err());
    let pid = rx.recv().unwrap();
    assert!(
        wait_pid_gone(pid, GONE),
        "Redis pid {pid} survived the panic"
    );
}

#[test]
fn children_outlive_the_thread_that_started_them() {
    // PDEATHSIG fires when the forking *thread* exits; the harness forks from a
    // long-lived thread, so a server started in a short-lived thread keeps running.
    let redis = std::thread::spawn(|| RedisServer::start().unwrap())
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        redis.is_running(),
        "Redis died with the thread that started it"
    );
    assert!(dtfed_tests::harness::redis::ping(redis.port()));
}

#[test]
fn shared_servers_are_started_once() {
    let k1 = KafkaBroker::shared().unwrap();
    let k2 = KafkaBroker::shared().unwrap();
    assert_eq!(k1.port(), k2.port());
    assert!(k1.is_running());
    let r1 = RedisServer::shared().unwrap();
    assert_eq!(r1.port(), RedisServer::shared().unwrap().port());
    assert!(dtfed_tests::harness::redis::ping(r1.port()));
}

/// Runs this test binary again, only `helper`, with `DTFED_HARNESS_HELPER=<mode>`, and
/// returns the PIDs and directories it reports.
fn run_helper(mode: &str) -> (sys::ChildProc, Vec<(u32, PathBuf)>) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "helper",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("DTFED_HARNESS_HELPER", mode)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = sys::spawn(cmd, "harness helper").unwrap();
    let stdout = child.take_stdout().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints "test helper ... " before the test's own output.
            if let Some(rest) = line.find("HELPER ").map(|i| &line[i + "HELPER ".len()..]) {
                let servers: Vec<(u32, PathBuf)> = rest
                    .split_whitespace()
                    .map(|kv| {
                        let (pid, dir) = kv.split_once('=').unwrap();
                        (pid.parse().unwrap(), PathBuf::from(dir))
                    })
                    .collect();
                let _ = tx.send(servers);
            }
        }
    });
    let servers = rx
        .recv_timeout(Duration::from_secs(200))
        .expect("the helper did not report its servers");
    (child, servers)
}

#[test]
fn children_die_when_the_test_binary_is_sigkilled() {
    let (mut helper, servers) = run_helper("hang");
    assert_eq!(servers.len(), 2);
    for (pid, _) in &servers {
        assert!(pid_alive(*pid));
    }
    // No Drop, no atexit: only PDEATHSIG can kill them now.
    helper.kill().unwrap();
    for (pid, dir) in &servers {
        assert!(
            wait_pid_gone(*pid, GONE),
            "pid {pid} survived the SIGKILLed test binary"
        );
        util::remove_test_dir(dir);
    }
}

#[test]
fn shared_servers_are_killed_and_removed_at_exit() {
    let (mut helper, servers) = run_helper("exit");
    let status = helper.wait_timeout(Duration::from_secs(60)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "helper failed: {status:?}"
    );
    for (pid, dir) in &servers {
        assert!(
            wait_pid_gone(*pid, GONE),
            "shared server pid {pid} survived exit"
        );
        assert!(!dir.exists(), "{} not removed at exit", dir.display());
    }
}

/// Not a test on its own: the other half of the two tests above.
#[test]
#[ignore = "helper process for other tests"]
fn helper() {
    let Ok(mode) = std::env::var("DTFED_HARNESS_HELPER") else {
        return;
    };
    match mode.as_str() {
        "hang" => {
            let kafka = KafkaBroker::start().unwrap();
            let redis = RedisServer::start().unwrap();
            println!(
                "HELPER {}={} {}={}",
                kafka.pid().unwrap(),
                kafka.dir().display(),
                redis.pid().unwrap(),
                redis.dir().display()
            );
            std::thread::sleep(Duration::from_secs(300));
        }
        "exit" => {
            let redis = RedisServer::shared().unwrap();
            println!("HELPER {}={}", redis.pid().unwrap(), redis.dir().display());
        }
        other => panic!("unknown helper mode {other}"),
    }
}

/// A stand-in daemon: prints the `listening` line, answers HTTP 200 on the admin port,
/// exits 0 on SIGTERM.
const FAKE_DTFED: &str = r#"#!/usr/bin/env python3
import os, signal, socket, sys
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s
client, admin = listener(), listener()
print("config", sys.argv[1:], os.environ.get("FAKE_ENV"), file=sys.stderr, flush=True)
print("starting", flush=True)
print("listening client=127.0.0.1:%d admin=127.0.0.1:%d" % (client.getsockname()[1], admin.getsockname()[1]), flush=True)
signal.signal(signal.SIGTERM, lambda *a: (print("draining", flush=True), os._exit(0)))
while True:
    c, _ = admin.accept()
    c.recv(4096)
    body = b"ready\n"
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
"#;

#[test]
fn dtfed_process_with_a_stand_in_daemon() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: python3 is not installed (needed for the stand-in daemon)");
        return;
    }
    let dir = util::TestDir::new("fake-dtfed").unwrap();
    let bin = dir.path().join("fake-dtfed");
    std::fs::write(&bin, FAKE_DTFED).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let config = "region = \"x\"\n";
    let mut d = DtfedProcess::start_binary(&bin, config, &[("FAKE_ENV", "yes")]).unwrap();
    assert!(d.ws_url().starts_with("ws://127.0.0.1:") && d.ws_url().ends_with("/ws"));
    assert!(d.ws_url_as("alice").ends_with("/ws?name=alice"));
    let r = d.admin_get("/readyz", None).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    assert_eq!(std::fs::read_to_string(d.config_path()).unwrap(), config);
    let log = d.log();
    assert!(
        log.contains("listening client=") && log.contains("'--config'") && log.contains("yes"),
        "{log}"
    );

    let status = d.terminate().unwrap();
    assert!(status.success());
    assert!(d.log_tail(1).contains("draining"));
    assert!(d.try_pid().is_none());

    d.restart().unwrap();
    let pid = d.pid();
    d.kill9().unwrap();
    assert!(!pid_alive(pid));
    d.restart().unwrap();
    let pid = d.pid();
    drop(d);
    assert!(wait_pid_gone(pid, GONE));

    // A daemon that dies at start-up: the error says so.
    let err = DtfedProcess::start_binary(std::path::Path::new("/bin/false"), config, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("without printing") || err.contains("exited"),
        "{err}"
    );
}

#[tokio::test]
async fn ws_client_keeps_skipped_frames_and_reports_close() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let server = tokio::spawn(async move {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
        use tokio_tungstenite::tungstenite::Message;
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        for n in 1..=3 {
            ws.send(Message::text(json!({"op": "msg", "n": n}).to_string()))
                .await
                .unwrap();
        }
        while let Some(Ok(m)) = ws.next().await {
            let v: serde_json::Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
            if v["op"] == "ping" {
                ws.send(Message::text(r#"{"op":"pong"}"#)).await.unwrap();
                ws.send(Message::text(r#"{"op":"msg","n":4}"#))
                    .await
                    .unwrap();
                ws.close(Some(CloseFrame {
                    code: CloseCode::Library(4000),
                    reason: "bye".into(),
                }))
                .await
                .unwrap();
                break;
            }
        }
    });
    let t = Duration::from_secs(5);
    let mut c = WsClient::connect(&format!("ws://{addr}/ws?name=a"))
        .await
        .unwrap();
    let two = c.recv_until(|f| f["n"] == 2, t).await.unwrap();
    assert_eq!(two["n"], 2);
    assert_eq!(c.backlog().len(), 1);
    c.ping(t).await.unwrap();
    assert_eq!(c.recv_json(t).await.unwrap()["n"], 1);
    assert_eq!(c.recv_json(t).await.unwrap()["n"], 3);
    let (code, reason) = c.expect_close(t).await.unwrap();
    assert_eq!((code, reason.as_str()), (4000, "bye"));
    assert_eq!(c.drain_backlog(), vec![json!({"op": "msg", "n": 4})]);
    assert!(c
        .recv_json(t)
        .await
        .unwrap_err()
        .to_string()
        .contains("4000"));
    server.await.unwrap();
}
