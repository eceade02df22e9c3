//! The demo chat page in a real browser: two federated regions (each its own Kafka, Redis
//! and daemon with `client.chat_page` on, mirroring over QUIC with mutual TLS), Debian's
//! `chromium` driven by `puppeteer-core` from `tests/node/jsclient/chat_browser.mjs`. A page
//! per region joins one room and sends; each must see the other region's message with its
//! origin. Then the link tokyo pulls seoul over is cut (a WAN relay): tokyo's page must say
//! "seoul: link down since …, messages may arrive late", and stop saying so after the heal
//! (the replication watermark, `wm` frames). The browser runs in its own process group: the script writes its PID first, and
//! [`BrowserGuard`] kills that group when the test ends, however it ends.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dtfed_tests::harness::sys;
use dtfed_tests::harness::util::{loopback, repo_root};
use dtfed_tests::harness::{
    http_get, pid_alive, Federation, FederationSpec, NodeScript, RunningNode, TestDir,
};

/// Kills the browser's process group (its PID, from the script) on drop.
struct BrowserGuard {
    pid_file: PathBuf,
}

impl Drop for BrowserGuard {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.pid_file) else {
            return;
        };
        // The whole group, even when its leader is gone: its renderers may not be (ESRCH
        // when everything already exited, as it does when the script closes the browser).
        if let Ok(pid) = text.trim().parse::<i32>() {
            if pid > 1 {
                let _ = sys::send_signal(-pid, libc::SIGKILL);
            }
        }
    }
}

/// The `chromium` on the PATH (deploy/test.sh installs Debian's).
fn chromium() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|p| Path::new(p).is_file())
        .context("no chromium on the PATH: deploy/test.sh installs it (apt-get install chromium)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_pages_of_two_regions_show_each_others_messages_with_their_origin() -> Result<()> {
    let chromium = chromium()?;
    let mut spec = FederationSpec::new("chat-browser", &["seoul", "tokyo"], 1);
    spec.extra_config = "[client]\nchat_page = true\n".into();
    spec.relayed = true;
    let fed = Federation::start(spec).await?;
    let control = TestDir::new("chat-browser-control")?;
    let _browser = BrowserGuard {
        pid_file: control.path().join("browser.pid"),
    };
    let (a, b) = (&fed.regions[0], &fed.regions[1]);

    // The page's library is clients/js itself, served as JavaScript; nothing else is.
    let addr = loopback(a.ports[0].client);
    for file in [
        "index.js",
        "client.js",
        "cursor.js",
        "reconnect.js",
        "stores.js",
    ] {
        let served = http_get(addr, &format!("/dtfed-client/{file}"), None)?;
        let source = std::fs::read_to_string(repo_root().join("clients/js/src").join(file))?;
        anyhow::ensure!(served.status == 200, "{file}: {}", served.status);
        anyhow::ensure!(
            served
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/javascript")),
            "{file}: content-type {:?}",
            served.header("content-type")
        );
        anyhow::ensure!(served.body == source, "{file} is not clients/js/src/{file}");
    }
    for path in ["/dtfed-client/package.json", "/dtfed-client/..%2Fchat.html"] {
        let r = http_get(addr, path, None)?;
        anyhow::ensure!(r.status == 404, "{path}: {}", r.status);
    }

    let node = NodeScript::new("jsclient", "chat_browser.mjs")
        .env("PAGE_A", format!("http://127.0.0.1:{}/", a.ports[0].client))
        .env("PAGE_B", format!("http://127.0.0.1:{}/", b.ports[0].client))
        .env("REGION_A", &a.name)
        .env("REGION_B", &b.name)
        .env("ROOM", "table-browser")
        .env("CHROMIUM", chromium.display().to_string())
        .env("CONTROL_DIR", control.path().display().to_string())
        .deadline(Duration::from_secs(150))
        .start()?;
    // The script asks for the cut and the heal of the link B pulls A over.
    let relay = &fed.relays[&(b.name.clone(), a.name.clone())];
    let steps = async {
        wait_control(control.path(), "cut", &node, Duration::from_secs(90)).await?;
        relay.cut();
        std::fs::write(control.path().join("was-cut"), "")?;
        wait_control(control.path(), "heal", &node, Duration::from_secs(60)).await?;
        relay.heal();
        std::fs::write(control.path().join("was-healed"), "")?;
        anyhow::Ok(())
    }
    .await;
    if steps.is_err() {
        let _ = sys::send_signal(node.pid() as i32, libc::SIGKILL);
    }
    let out = tokio::task::spawn_blocking(move || node.finish()).await??;
    if let Err(e) = steps {
        bail!(
            "{e:#}\n--- script stdout\n{}\n--- stderr\n{}",
            out.stdout,
            out.stderr
        );
    }
    println!("--- script stdout\n{}", out.stdout);
    out.ensure_success()?;
    anyhow::ensure!(
        out.stdout
            .lines()
            .last()
            .unwrap_or_default()
            .contains(" ok: "),
        "no ok line:\n{}",
        out.stdout
    );
    Ok(())
}

/// Waits until the script writes `name` in `dir` (or exits, or `timeout` passes).
async fn wait_control(dir: &Path, name: &str, node: &RunningNode, timeout: Duration) -> Result<()> {
    let end = Instant::now() + timeout;
    while !dir.join(name).exists() {
        if !pid_alive(node.pid()) {
            bail!("the script exited before writing {name}");
        }
        if Instant::now() > end {
            bail!("the script did not write {name} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
