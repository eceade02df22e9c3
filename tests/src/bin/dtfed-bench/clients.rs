//! The bench's WebSocket clients: connecting them (bounded handshakes in flight), their message
//! bodies, and the open-loop publishers.

use super::*;

pub(crate) fn ws_config() -> WebSocketConfig {
    // Chat frames are small: tungstenite's 128 KiB default read buffer per connection would
    // make 10,000 idle clients cost 1.3 GB here.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
}

/// `ws://host:port/path?query` → (`host:port`, URL with `name=` added).
pub(crate) fn client_url(url: &str, name: &str) -> anyhow::Result<(String, String)> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("--url {url:?}: only ws:// URLs are supported"))?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.is_empty() || !host.contains(':') {
        bail!("--url {url:?}: needs host:port");
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok((host.to_owned(), format!("{url}{sep}name={name}")))
}

pub(crate) fn room_name(run_id: &str, r: usize) -> anyhow::Result<RoomId> {
    RoomId::parse(&format!("bench-{run_id}-{r}"))
        .map_err(|e| anyhow!("room name for run id {run_id:?}: {e}"))
}

/// What a connection does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Subscribes to its room and publishes in it (one region).
    Both,
    /// Only publishes (subscribers are in another region).
    Pub,
    /// Only subscribes.
    Sub,
}

impl Role {
    pub(crate) fn subscribes(self) -> bool {
        self != Role::Pub
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Both => "client",
            Role::Pub => "publisher",
            Role::Sub => "subscriber",
        }
    }

    /// `?name=` of connection `idx`.
    pub(crate) fn player(self, idx: usize) -> String {
        match self {
            Role::Sub => format!("bench-sub-{idx}"),
            Role::Both | Role::Pub => format!("bench-{idx}"),
        }
    }
}

/// Connects client `idx`; if its role subscribes, subscribes it to `room` and waits for
/// `synced`, else waits for the answer to a ping.
pub(crate) async fn connect_client(
    url: &str,
    idx: usize,
    room: &RoomId,
    role: Role,
) -> anyhow::Result<Ws> {
    let (host, full) = client_url(url, &role.player(idx))?;
    let tcp = TcpStream::connect(&host)
        .await
        .with_context(|| format!("TCP connect to {host}"))?;
    tcp.set_nodelay(true).context("TCP_NODELAY")?;
    let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(full, tcp, Some(ws_config()))
        .await
        .with_context(|| format!("WebSocket handshake with {url}"))?;
    let first = if role.subscribes() {
        ClientFrame::Sub {
            room: room.clone(),
            since: None,
        }
    } else {
        ClientFrame::Ping
    };
    ws.send(Message::Text(encode_client_frame(&first).into()))
        .await
        .context("sending sub")?;
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| anyhow!("connection closed before synced"))?
            .context("reading synced")?;
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(c) => bail!("server closed before synced: {c:?}"),
            _ => continue,
        };
        match decode_server_frame(&text) {
            Ok(ServerFrame::Synced { room: r, .. }) if &r == room && role.subscribes() => {
                return Ok(ws)
            }
            Ok(ServerFrame::Pong) if !role.subscribes() => return Ok(ws),
            Ok(ServerFrame::Error { code, message, .. }) => {
                bail!("server refused {first:?}: {}: {message}", code.as_str())
            }
            Ok(_) => {}
            Err(e) => bail!("undecodable frame while waiting for synced ({e}): {text:.200}"),
        }
    }
}

/// Connects `n` clients, at most `concurrency` handshakes at once. Every connection that
/// failed is reported; any failure closes the others and fails the run.
pub(crate) async fn connect_all(
    args: &Args,
    urls: &[String],
    role: Role,
    run_id: &str,
    n: usize,
) -> anyhow::Result<Vec<(usize, Ws)>> {
    if urls.is_empty() {
        bail!("give at least one --url ws://host:port/ws");
    }
    for u in urls {
        client_url(u, "x")?;
    }
    let rooms: Vec<RoomId> = (0..args.rooms)
        .map(|r| room_name(run_id, r))
        .collect::<anyhow::Result<_>>()?;
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let t0 = Instant::now();
    let mut results = futures::stream::iter(0..n)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let room = rooms[i % rooms.len()].clone();
            async move {
                let r = tokio::time::timeout(timeout, connect_client(&url, i, &room, role))
                    .await
                    .map_err(|_| anyhow!("no synced within {timeout:?}"))
                    .and_then(|r| r);
                (i, r)
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1));
    let mut ok = Vec::with_capacity(n);
    let mut failed: Vec<(usize, anyhow::Error)> = Vec::new();
    let mut last_progress = Instant::now();
    while let Some((i, r)) = results.next().await {
        match r {
            Ok(ws) => ok.push((i, ws)),
            Err(e) => failed.push((i, e)),
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            eprintln!(
                "dtfed-bench: connected {}/{n} {}s ({} failed)",
                ok.len(),
                role.name(),
                failed.len()
            );
        }
    }
    if !failed.is_empty() {
        let sample: Vec<String> = failed
            .iter()
            .take(5)
            .map(|(i, e)| format!("  {} {i}: {e:#}", role.name()))
            .collect();
        close_all(ok.into_iter().map(|(_, ws)| ws).collect()).await;
        bail!(
            "{} of {n} {}s could not connect and subscribe (first errors below); \
             check the server, its max_connections and `ulimit -n` on both sides\n{}",
            failed.len(),
            role.name(),
            sample.join("\n")
        );
    }
    eprintln!(
        "dtfed-bench: {n} {}s connected and ready in {:.1} s",
        role.name(),
        t0.elapsed().as_secs_f64()
    );
    ok.sort_by_key(|(i, _)| *i);
    Ok(ok)
}

pub(crate) async fn close_all(conns: Vec<Ws>) {
    let closes = conns.into_iter().map(|mut ws| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), ws.close(None)).await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures::stream::iter(closes)
            .buffer_unordered(256)
            .collect::<Vec<()>>(),
    )
    .await;
}

// ------------------------------------------------------------------ /proc sampling

#[derive(Deserialize)]
pub(crate) struct BenchBody<'a> {
    pub(crate) run: &'a str,
    pub(crate) c: u32,
    pub(crate) s: u64,
    pub(crate) t: u64,
}

pub(crate) fn make_body(run_id: &str, client: usize, seq: u64, t: u64, size: usize) -> String {
    let head = format!(r#"{{"run":"{run_id}","c":{client},"s":{seq},"t":{t},"pad":""#);
    let pad = size.saturating_sub(head.len() + 2);
    let mut s = String::with_capacity(head.len() + pad + 2);
    s.push_str(&head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// How a publisher paces itself.
pub(crate) enum Pace {
    /// Open loop: one publish per `period`, first at `first_tick`.
    Rate {
        first_tick: tokio::time::Instant,
        period: Duration,
    },
    /// Closed loop: a permit per publish, given back by the reader on its ack or error.
    Window(Arc<Semaphore>),
}

/// Publishes until `pub_end`; returns the sink for the orderly close.
pub(crate) async fn publisher(
    shared: Arc<Shared>,
    mut sink: WsSink,
    idx: usize,
    room: RoomId,
    pace: Pace,
    body_bytes: usize,
) -> Option<WsSink> {
    let room_idx = idx % shared.subs_per_room.len();
    let subs = shared.subs_per_room[room_idx];
    let mut iv = match &pace {
        Pace::Rate { first_tick, period } => {
            let mut iv = tokio::time::interval_at(*first_tick, *period);
            iv.set_missed_tick_behavior(MissedTickBehavior::Burst);
            Some(iv)
        }
        Pace::Window(_) => None,
    };
    let mut seq: u64 = 0;
    loop {
        let end = shared.instant(shared.pub_end.load(Ordering::Relaxed));
        match (&mut iv, &pace) {
            (Some(iv), _) => {
                let scheduled = iv.tick().await;
                // `pub_end` may have moved while this task waited for its tick.
                let end = shared.instant(shared.pub_end.load(Ordering::Relaxed));
                if scheduled.into_std() >= end {
                    return Some(sink);
                }
                let lag = scheduled.elapsed();
                if lag > Duration::from_millis(5) {
                    inc(&shared.c.late_ticks);
                    shared
                        .c
                        .max_tick_lag_us
                        .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
                }
            }
            (None, Pace::Window(sem)) => {
                let deadline = tokio::time::Instant::from_std(end);
                match tokio::time::timeout_at(deadline, sem.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    Ok(Err(_)) | Err(_) => return Some(sink),
                }
                if Instant::now() >= end {
                    return Some(sink);
                }
            }
            (None, Pace::Rate { .. }) => return Some(sink),
        }
        seq += 1;
        let t = shared.now_ns();
        let body = make_body(&shared.run_id, idx, seq, t, body_bytes);
        let Ok(body) = Body::from_json(&body) else {
            shared.note("internal: generated body is not JSON".into());
            return Some(sink);
        };
        let frame = encode_client_frame(&ClientFrame::Pub {
            room: room.clone(),
            body,
            reference: Some(format!("{seq}:{t}")),
        });
        inc(&shared.c.sent);
        shared.c.last_sent_ns.fetch_max(t, Ordering::Relaxed);
        shared.c.expected.fetch_add(subs, Ordering::Relaxed);
        if let Some(tr) = &shared.tracker {
            tr.sent(idx, seq, t, subs);
        }
        if shared.in_window(t) {
            inc(&shared.c.sent_measured);
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            sink.send(Message::Text(frame.into())),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                inc(&shared.c.send_failures);
                if !shared.closing.load(Ordering::Relaxed) {
                    shared.note(format!("client {idx}: publish failed: {e}"));
                }
                return None;
            }
            Err(_) => {
                inc(&shared.c.send_failures);
                shared.note(format!(
                    "client {idx}: a publish write blocked 10 s (server not reading)"
                ));
                return None;
            }
        }
    }
}
