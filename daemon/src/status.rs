//! `dtfed status`: reads a running daemon's `/status` and prints it for an operator.

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Fetches `<admin>/status` and prints it (as a table, or raw JSON). `token` is the
/// daemon's `admin.token`, needed when it has one.
pub async fn print(admin: &str, token: Option<&str>, raw: bool) -> anyhow::Result<()> {
    let status = fetch(admin, "/status", token).await?;
    if raw {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print!("{}", render(&status));
    Ok(())
}

/// GET `path` from the admin listener at `admin` (`http://host:port`), as JSON, with
/// `token` as the bearer token when given.
pub async fn fetch(admin: &str, path: &str, token: Option<&str>) -> anyhow::Result<Value> {
    let (status, body) = admin_request(admin, "GET", path, token).await?;
    if status == 401 {
        bail!("{path}: the daemon has an admin.token: give it with --token or DTFED_ADMIN_TOKEN");
    }
    if status != 200 {
        bail!("{path}: HTTP {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{path} is not JSON"))
}

/// One request to the admin listener at `admin` (`http://host:port`, plain HTTP), with
/// `token` as the bearer token when given: the status code and the body.
pub async fn admin_request(
    admin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    admin_request_within(
        admin,
        method,
        path,
        token,
        std::time::Duration::from_secs(5),
    )
    .await
}

/// [`admin_request`] waiting up to `answer_within` for the answer (a digest takes longer).
pub async fn admin_request_within(
    admin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    answer_within: std::time::Duration,
) -> anyhow::Result<(u16, String)> {
    let hostport = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if hostport.contains('/') || admin.starts_with("https://") {
        bail!("admin URLs are http://host:port (the admin listener is plain HTTP), not {admin:?}");
    }
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(&hostport),
    )
    .await
    .with_context(|| format!("connecting to {hostport}: timed out"))?
    .with_context(|| format!("connecting to {hostport}"))?;
    let auth = token
        .filter(|t| !t.is_empty())
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(answer_within, stream.read_to_end(&mut buf))
        .await
        .with_context(|| {
            format!("{method} {path} on {hostport}: no answer within {answer_within:?}")
        })??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("malformed HTTP status line {:?}", head.lines().next()))?;
    Ok((status, body.to_owned()))
}

fn render(s: &Value) -> String {
    let mut out = String::new();
    let str_of = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    out.push_str(&format!(
        "region {}  node {}  clients {}  rooms {}{}\n",
        str_of(&s["region"]),
        str_of(&s["node"]),
        str_of(&s["clients"]),
        str_of(&s["rooms"]),
        if s["draining"] == Value::Bool(true) {
            "  DRAINING"
        } else {
            ""
        }
    ));
    if let Some(links) = s["links"].as_array() {
        out.push_str("\nlinks\n  peer            state        rtt_ms  addr\n");
        for l in links {
            out.push_str(&format!(
                "  {:<15} {:<12} {:>6}  {}\n",
                str_of(&l["region"]),
                str_of(&l["state"]),
                str_of(&l["rtt_ms"]),
                str_of(&l["addr"])
            ));
        }
    }
    if let Some(tasks) = s["mirror"].as_array() {
        out.push_str("\nmirror (origin partition: mirrored / origin end, lag, route)\n");
        for t in tasks {
            out.push_str(&format!(
                "  {:<12} p{:<3} {:>10} / {:<10} lag {} records, {} s  {}  {}\n",
                str_of(&t["origin"]),
                str_of(&t["partition"]),
                str_of(&t["mirrored_offset"]),
                str_of(&t["origin_high_watermark"]),
                str_of(&t["lag_records"]),
                str_of(&t["lag_seconds"]),
                str_of(&t["route"]),
                str_of(&t["state"])
            ));
        }
    }
    out.push_str("\nfan-out (owned partitions)\n");
    match s["fanout"]["partitions"].as_array() {
        Some(ps) if !ps.is_empty() => {
            for p in ps {
                let lag = p["high_watermark"]
                    .as_i64()
                    .zip(p["position"].as_i64())
                    .map(|(h, q)| (h - q).max(0));
                out.push_str(&format!(
                    "  {:<40} p{:<3} position {:<10} end {:<10} lag {}\n",
                    str_of(&p["topic"]),
                    str_of(&p["partition"]),
                    str_of(&p["position"]),
                    str_of(&p["high_watermark"]),
                    lag.map_or("-".into(), |l| l.to_string())
                ));
            }
        }
        _ => out.push_str("  none\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_links_mirror_and_fanout() {
        let s = json!({
            "region": "seoul", "node": "seoul-1", "clients": 3, "rooms": 2, "draining": false,
            "links": [{"region": "tokyo", "state": "connected", "rtt_ms": 71, "addr": "127.0.0.1:7001"}],
            "mirror": [{"origin": "tokyo", "partition": 0, "mirrored_offset": 41, "origin_high_watermark": 42,
                        "lag_records": 0, "lag_seconds": 0, "route": "via frankfurt", "state": "streaming"}],
            "fanout": {"joined": true, "partitions": [{"topic": "dtfed.local", "partition": 1, "position": 10, "high_watermark": 12}]}
        });
        let text = render(&s);
        assert!(text.contains("tokyo"), "{text}");
        assert!(text.contains("rtt_ms"), "{text}");
        assert!(text.contains("lag 2"), "{text}");
        assert!(text.contains("via frankfurt  streaming"), "{text}");
    }
}
