//! The WAN relay in front of real QUIC mTLS links and plain UDP.

mod common;

use std::time::{Duration, Instant};

use common::{endpoint, init_tracing, loopback, patient_endpoint};
use dtfed_regions::{
    FederationCa, LinkError, PeerConnection, RegionEndpoint, WanProfile, WanRelay,
};
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(60);

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut).await.expect("timed out")
}

/// `from` dials `to` (region `expected`) through `via`.
async fn link_via(
    from: &RegionEndpoint,
    to: &RegionEndpoint,
    via: &WanRelay,
    expected: &str,
) -> (PeerConnection, PeerConnection) {
    within(async {
        let (dialled, accepted) =
            tokio::join!(from.connect(via.local_addr(), expected), to.accept());
        (
            dialled.expect("dial through relay"),
            accepted
                .expect("endpoint open")
                .expect("accept through relay"),
        )
    })
    .await
}

/// One request/response on a new bi stream; returns the round-trip time.
async fn ping(a: &PeerConnection, b: &PeerConnection) -> Duration {
    let started = Instant::now();
    let (mut send, mut recv) = a.connection().open_bi().await.expect("open");
    send.write_all(b"ping").await.expect("write");
    send.finish().expect("finish");
    let (mut b_send, mut b_recv) = b.connection().accept_bi().await.expect("accept");
    assert_eq!(b_recv.read_to_end(16).await.expect("read"), b"ping");
    b_send.write_all(b"pong").await.expect("write");
    b_send.finish().expect("finish");
    assert_eq!(recv.read_to_end(16).await.expect("read"), b"pong");
    started.elapsed()
}

#[tokio::test]
async fn mtls_link_through_a_50ms_relay_has_a_100ms_rtt() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);
    let tokyo = endpoint(&ca, "tokyo", &["seoul"]);
    let relay = WanRelay::start(
        loopback(),
        tokyo.local_addr().expect("addr"),
        WanProfile::with_delay(Duration::from_millis(50)),
    )
    .await
    .expect("relay");

    let started = Instant::now();
    let (s2t, t_side) = link_via(&seoul, &tokyo, &relay, "tokyo").await;
    // Handshake (1 RTT) + the welcome (about half an RTT more).
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(s2t.region(), "tokyo");
    assert_eq!(t_side.region(), "seoul");
    assert!(
        s2t.rtt() >= Duration::from_millis(100),
        "rtt {:?}",
        s2t.rtt()
    );
    assert!(
        s2t.rtt() < Duration::from_millis(400),
        "rtt {:?}",
        s2t.rtt()
    );
    let rtt = within(ping(&s2t, &t_side)).await;
    assert!(rtt >= Duration::from_millis(100), "{rtt:?}");
    assert!(relay.forwarded() > 0);
    assert_eq!(relay.dropped(), 0);
}

#[tokio::test]
async fn cut_drops_datagrams_until_healed() {
    init_tracing();
    let upstream = UdpSocket::bind(loopback()).await.expect("bind");
    let relay = WanRelay::start(
        loopback(),
        upstream.local_addr().expect("addr"),
        WanProfile::with_delay(Duration::from_millis(5)),
    )
    .await
    .expect("relay");
    let client = UdpSocket::bind(loopback()).await.expect("bind");
    client.connect(relay.local_addr()).await.expect("connect");
    let mut buf = [0u8; 64];

    client.send(b"before").await.expect("send");
    let (n, relay_side) = within(upstream.recv_from(&mut buf)).await.expect("recv");
    assert_eq!(&buf[..n], b"before");

    relay.cut();
    client.send(b"during").await.expect("send");
    // Upstream's reply is cut too.
    upstream
        .send_to(b"reply during", relay_side)
        .await
        .expect("send");
    let upstream_got =
        tokio::time::timeout(Duration::from_millis(300), upstream.recv_from(&mut buf)).await;
    assert!(upstream_got.is_err(), "a datagram crossed the cut");
    let client_got = tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf)).await;
    assert!(client_got.is_err(), "a reply crossed the cut");
    assert_eq!(relay.stats().dropped_cut, 2);

    relay.heal();
    client.send(b"after").await.expect("send");
    let (n, _) = within(upstream.recv_from(&mut buf)).await.expect("recv");
    assert_eq!(&buf[..n], b"after");
    upstream
        .send_to(b"reply after", relay_side)
        .await
        .expect("send");
    let n = within(client.recv(&mut buf)).await.expect("recv");
    assert_eq!(&buf[..n], b"reply after");

    // Packets already in flight when the cut starts are lost as well.
    relay
        .set_profile(WanProfile::with_delay(Duration::from_millis(200)))
        .expect("profile");
    client.send(b"in flight").await.expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    relay.cut();
    tokio::time::sleep(Duration::from_millis(250)).await;
    relay.heal();
    let got = tokio::time::timeout(Duration::from_millis(100), upstream.recv_from(&mut buf)).await;
    assert!(got.is_err(), "an in-flight datagram survived the cut");
    assert_eq!(relay.stats().dropped_cut, 3);
}

#[tokio::test]
async fn quic_delivers_1mb_intact_through_20_percent_loss() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let seoul = patient_endpoint(&ca, "seoul", &["tokyo"]);
    let tokyo = patient_endpoint(&ca, "tokyo", &["seoul"]);
    let relay = WanRelay::start(
        loopback(),
        tokyo.local_addr().expect("addr"),
        WanProfile {
            delay: Duration::from_millis(2),
            loss: 0.2,
            ..WanProfile::default()
        },
    )
    .await
    .expect("relay");

    let setup = Instant::now();
    let (s2t, t_side) = link_via(&seoul, &tokyo, &relay, "tokyo").await;
    let setup = setup.elapsed();
    let payload: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let started = Instant::now();
    let sender = {
        let payload = payload.clone();
        let conn = s2t.connection().clone();
        tokio::spawn(async move {
            let mut send = conn.open_uni().await.expect("open");
            send.write_all(&payload).await.expect("write");
            send.finish().expect("finish");
            send.stopped().await.expect("stopped");
        })
    };
    // Cubic at 20% loss crawls (a few seconds here, 20+ s under load): be patient.
    let transfer = async {
        let mut recv = t_side.connection().accept_uni().await.expect("accept");
        let got = recv.read_to_end(2_000_000).await.expect("read");
        sender.await.expect("sender");
        got
    };
    let got = tokio::time::timeout(Duration::from_secs(180), transfer)
        .await
        .expect("1 MB not delivered within 180 s");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "payload corrupted");
    let stats = relay.stats();
    assert!(stats.dropped_loss > 100, "{stats:?}");
    eprintln!(
        "link setup through 20% loss took {setup:?}, 1 MB took {:?}: {stats:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn link_survives_a_cut_shorter_than_the_idle_timeout() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let seoul = endpoint(&ca, "seoul", &["tokyo"]);
    let tokyo = endpoint(&ca, "tokyo", &["seoul"]);
    let relay = WanRelay::start(
        loopback(),
        tokyo.local_addr().expect("addr"),
        WanProfile::with_delay(Duration::from_millis(10)),
    )
    .await
    .expect("relay");
    let (s2t, t_side) = link_via(&seoul, &tokyo, &relay, "tokyo").await;

    relay.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.heal();
    within(ping(&s2t, &t_side)).await;
    assert!(
        relay.stats().dropped_cut > 0,
        "keep-alives should have hit the cut"
    );
}

#[tokio::test]
async fn dial_through_a_cut_link_times_out() {
    init_tracing();
    let ca = FederationCa::generate("test federation").expect("ca");
    let tuning = dtfed_regions::LinkTuning {
        handshake_timeout: Duration::from_millis(800),
        ..dtfed_regions::LinkTuning::default()
    };
    let seoul = RegionEndpoint::bind_with(
        loopback(),
        common::identity(&ca, "seoul"),
        common::peers(&["tokyo"]),
        tuning,
    )
    .expect("bind");
    let tokyo = endpoint(&ca, "tokyo", &["seoul"]);
    let relay = WanRelay::start(
        loopback(),
        tokyo.local_addr().expect("addr"),
        WanProfile::default(),
    )
    .await
    .expect("relay");
    relay.cut();
    let err = within(seoul.connect(relay.local_addr(), "tokyo"))
        .await
        .expect_err("cut");
    assert!(matches!(err, LinkError::Timeout { .. }), "{err:?}");
}
