//! Relaying through a third region (`docs/PROTOCOL.md`, "Relays"): three regions with
//! Kafka, Redis and a `dtfed` daemon each, every link through its own cuttable WAN relay,
//! every region serving relays. Only seoul ↔ tokyo is cut, under load: tokyo's players keep
//! receiving seoul's messages through frankfurt within seconds, tokyo's `/status` says
//! `via frankfurt` for seoul's partitions (and tokyo's players see seoul as live), and after
//! the heal it says `direct` again. At the end every tokyo player got every acknowledged
//! seoul message of its room exactly once, in order, with `prev` unbroken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dtfed_tests::harness::federation::{Region, ADMIN_TOKEN};
use dtfed_tests::harness::{Federation, FederationSpec, WsClient};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

const ROOMS: [&str; 4] = ["relay-a", "relay-b", "relay-c", "relay-d"];

/// One message as published (acked) in seoul or received in tokyo.
#[derive(Clone, Debug)]
struct Seen {
    room: String,
    offset: i64,
    prev: Option<i64>,
    at: Instant,
}

/// Tokyo's mirror tasks of seoul, from its `/status`: (partition, route, state).
fn seoul_routes(tokyo: &Region) -> Result<Vec<(i64, String, String)>> {
    routes_of(tokyo, "seoul")
}

/// `region`'s mirror tasks of `origin`, from its `/status`: (partition, route, state).
fn routes_of(region: &Region, origin: &str) -> Result<Vec<(i64, String, String)>> {
    let status: Value = region.daemons[0]
        .admin_get("/status", Some(ADMIN_TOKEN))?
        .json()?;
    let tasks = status["mirror"].as_array().context("mirror in /status")?;
    Ok(tasks
        .iter()
        .filter(|t| t["origin"] == origin)
        .map(|t| {
            (
                t["partition"].as_i64().unwrap_or(-1),
                t["route"].as_str().unwrap_or("").to_owned(),
                t["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect())
}

/// Waits until every one of tokyo's `partitions` tasks of seoul streams on `route`;
/// returns how long it took.
async fn wait_routes(
    tokyo: &Region,
    partitions: usize,
    route: &str,
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let routes = tokio::task::block_in_place(|| seoul_routes(tokyo))?;
        if routes.len() == partitions
            && routes
                .iter()
                .all(|(_, r, state)| r == route && state == "streaming")
        {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "tokyo's tasks of seoul not all streaming {route} within {limit:?}: {routes:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes to the rooms in turn, every `every`, until `stop` says so.
async fn publish(
    mut bard: WsClient,
    every: Duration,
    stop: watch::Receiver<bool>,
    acked: Arc<Mutex<Vec<Seen>>>,
) -> Result<usize> {
    let mut n = 0usize;
    while !*stop.borrow() {
        let room = ROOMS[n % ROOMS.len()];
        let ack = bard
            .publish(room, json!({"n": n}), Duration::from_secs(10))
            .await?;
        let offset = ack["offset"].as_i64().context("offset in ack")?;
        acked.lock().expect("acked").push(Seen {
            room: room.to_owned(),
            offset,
            prev: None,
            at: Instant::now(),
        });
        n += 1;
        tokio::time::sleep(every).await;
    }
    Ok(n)
}

/// Collects seoul's messages of `room` until `done` names how many to expect and they are
/// all in (or `limit` passes).
async fn read(
    mut player: WsClient,
    room: &'static str,
    mut done: watch::Receiver<Option<HashMap<String, usize>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    limit: Duration,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut got = 0usize;
    loop {
        let expected = done.borrow_and_update().as_ref().map(|m| m[room]);
        if expected.is_some_and(|e| got >= e) || Instant::now() >= deadline {
            return Ok(());
        }
        match player
            .recv_until(
                |f| f["op"] == "msg" && f["room"] == room,
                Duration::from_millis(500),
            )
            .await
        {
            Ok(f) => {
                if f["origin"] != "seoul" {
                    continue;
                }
                got += 1;
                seen.lock().expect("seen").push(Seen {
                    room: room.to_owned(),
                    offset: f["offset"].as_i64().context("offset in msg")?,
                    prev: f["prev"].as_i64(),
                    at: Instant::now(),
                });
            }
            Err(e) if e.to_string().contains("closed") => return Err(e),
            Err(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_is_bridged_by_a_third_region_then_heals_back_to_direct() -> Result<()> {
    let mut spec = FederationSpec::new("relay-cut", &["seoul", "tokyo", "frankfurt"], 1);
    spec.relayed = true;
    spec.relaying = true;
    let partitions = spec.partitions as usize;
    let fed = Federation::start(spec).await?;
    let (seoul, tokyo) = (fed.region("seoul"), fed.region("tokyo"));
    wait_routes(tokyo, partitions, "direct", Duration::from_secs(60)).await?;

    let acked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = watch::channel(None);
    let mut readers = Vec::new();
    for room in ROOMS {
        let mut player = WsClient::connect(&tokyo.ws(0, &format!("reader-{room}"))).await?;
        player.sub(room, None, Duration::from_secs(20)).await?;
        readers.push(tokio::spawn(read(
            player,
            room,
            done_rx.clone(),
            seen.clone(),
            Duration::from_secs(240),
        )));
    }
    let bard = WsClient::connect(&seoul.ws(0, "bard")).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let publisher = tokio::spawn(publish(
        bard,
        Duration::from_millis(25),
        stop_rx,
        acked.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Cut seoul ↔ tokyo, both ways; frankfurt's links stay up.
    let cut_links = [("tokyo", "seoul"), ("seoul", "tokyo")];
    for (receiver, origin) in cut_links {
        fed.relays[&(receiver.to_owned(), origin.to_owned())].cut();
    }
    let cut_at = Instant::now();
    let rerouted = wait_routes(tokyo, partitions, "via frankfurt", Duration::from_secs(30)).await?;
    eprintln!("tokyo pulls seoul via frankfurt {rerouted:?} after the cut");
    // Long enough for QUIC's idle timeout (10 s) to close the cut link: the way back is a
    // fresh dial, not a connection that merely woke up.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let routes = tokio::task::block_in_place(|| seoul_routes(tokyo))?;
    assert!(
        routes.iter().all(|(_, r, _)| r == "via frankfurt"),
        "still relayed before the heal: {routes:?}"
    );
    // Players see it as it is: seoul is live in tokyo (through the relay), not a cut link.
    let mut looker = WsClient::connect(&tokyo.ws(0, "looker")).await?;
    let synced = looker
        .sub(ROOMS[0], None, Duration::from_secs(20))
        .await?
        .synced;
    assert_eq!(
        synced["origins"]["seoul"]["live"], true,
        "seoul's replication watermark in tokyo while relayed: {synced}"
    );
    // Dashboards see it too.
    let metrics = tokyo.daemons[0]
        .admin_get("/metrics", Some(ADMIN_TOKEN))?
        .body;
    let relayed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("dtfed_mirror_relayed{") && l.contains("origin=\"seoul\""))
        .collect();
    assert!(
        relayed.len() == partitions && relayed.iter().all(|l| l.ends_with(" 1")),
        "{relayed:?}"
    );
    // The other way too: seoul pulls tokyo's partitions through frankfurt.
    let reverse = tokio::task::block_in_place(|| routes_of(seoul, "tokyo"))?;
    assert!(
        reverse.len() == partitions
            && reverse
                .iter()
                .all(|(_, r, s)| r == "via frankfurt" && s == "streaming"),
        "seoul's tasks of tokyo during the cut: {reverse:?}"
    );
    let heal_at = Instant::now();
    for (receiver, origin) in cut_links {
        fed.relays[&(receiver.to_owned(), origin.to_owned())].heal();
    }
    let back = wait_routes(tokyo, partitions, "direct", Duration::from_secs(30)).await?;
    eprintln!("tokyo pulls seoul directly again {back:?} after the heal");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true)?;
    let published = publisher.await??;

    let acked = acked.lock().expect("acked").clone();
    let mut expected: HashMap<String, usize> = HashMap::new();
    for a in &acked {
        *expected.entry(a.room.clone()).or_default() += 1;
    }
    done_tx.send(Some(expected))?;
    for r in readers {
        r.await??;
    }
    let seen = seen.lock().expect("seen").clone();
    assert!(
        fed.relays[&("tokyo".to_owned(), "seoul".to_owned())].dropped() > 0,
        "the cut dropped packets"
    );

    // Through the cut: what was published while seoul ↔ tokyo was cut reached tokyo while
    // it was still cut, the first of it within seconds.
    let arrival: HashMap<(String, i64), Instant> = seen
        .iter()
        .map(|s| ((s.room.clone(), s.offset), s.at))
        .collect();
    let during: Vec<&Seen> = acked
        .iter()
        .filter(|a| a.at > cut_at && a.at + Duration::from_secs(3) < heal_at)
        .collect();
    assert!(
        during.len() > 200,
        "only {} published during the cut",
        during.len()
    );
    let first = during[0];
    let first_arrival = arrival
        .get(&(first.room.clone(), first.offset))
        .context("the first message after the cut never arrived")?;
    let first_delay = first_arrival.duration_since(cut_at);
    eprintln!("first message published after the cut arrived {first_delay:?} after the cut");
    assert!(
        first_delay < Duration::from_secs(8),
        "the first message after the cut arrived {first_delay:?} after it"
    );
    for a in &during {
        let at = arrival
            .get(&(a.room.clone(), a.offset))
            .with_context(|| format!("{} offset {} never arrived", a.room, a.offset))?;
        assert!(
            *at < heal_at,
            "{} offset {} (published during the cut) arrived only after the heal",
            a.room,
            a.offset
        );
    }

    // The end: every acked message exactly once, in order, prev unbroken.
    for room in ROOMS {
        let sent: Vec<i64> = acked
            .iter()
            .filter(|a| a.room == room)
            .map(|a| a.offset)
            .collect();
        let got: Vec<&Seen> = seen.iter().filter(|s| s.room == room).collect();
        let offsets: Vec<i64> = got.iter().map(|s| s.offset).collect();
        assert_eq!(
            offsets,
            sent,
            "{room}: tokyo's player got {} messages for {} acked (lost, duplicated or reordered)",
            offsets.len(),
            sent.len()
        );
        for pair in got.windows(2) {
            assert_eq!(
                pair[1].prev,
                Some(pair[0].offset),
                "{room}: prev of {} is not {}",
                pair[1].offset,
                pair[0].offset
            );
        }
    }
    let status: Value = tokyo.daemons[0]
        .admin_get("/status", Some(ADMIN_TOKEN))?
        .json()?;
    let switches: u64 = status["mirror"]
        .as_array()
        .context("mirror in /status")?
        .iter()
        .filter(|t| t["origin"] == "seoul")
        .filter_map(|t| t["route_switches"].as_u64())
        .sum();
    assert!(
        switches >= 2 * partitions as u64,
        "every partition switched to the relay and back: {switches} switches"
    );
    eprintln!("published {published}, {} during the cut", during.len());
    Ok(())
}
