//! Divergence check: do the regions hold the same records of a room? `dtfed verify
//! --topology FILE --room R` asks every region of a topology file (the drill's, see
//! [`crate::drill::topology`]) what it holds of each origin's log for the room, takes per
//! origin the range every region holds (the common watermark), compares the regions'
//! digests of it and, where they differ, names the first differing origin offset.
//!
//! Where to start: [`run`] is the command, in order. [`digest`] defines the digest (count
//! and SHA-256 of (origin offset, value) in order), [`reader`] computes it from this
//! region's Kafka topics, [`endpoints`] serves it on the admin listener, and [`compare`]
//! groups the regions and bisects to the first difference. [`sampler`] is the daemons'
//! background check of their mirror partitions against the origins, over the region link.
//!
//! Exit codes: 0 every region agrees, 1 some region diverges, 2 the check could not run
//! (a region did not answer, a bad topology file, regions disagreeing on an origin's
//! partition count).

pub mod compare;
pub mod digest;
pub mod endpoints;
pub mod reader;
pub mod sampler;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::Context;
use async_trait::async_trait;
use dtfed_proto::RoomId;
use serde::Serialize;

use crate::drill::topology::Topology;
use crate::status::admin_request_within;
use compare::{compare_origin, DigestSource, OriginVerdict};
use digest::RoomDigest;
use endpoints::Watermarks;
use reader::DIGEST_TIMEOUT;

#[derive(Clone, Debug, clap::Args)]
pub struct VerifyArgs {
    /// The regions: their admin URLs and tokens (`dtfed demo --write-topology` writes one).
    #[arg(long)]
    pub topology: PathBuf,
    /// The room whose records are compared.
    #[arg(long)]
    pub room: String,
    /// Print the report as JSON too: its last line is one object.
    #[arg(long)]
    pub json: bool,
}

/// The whole report, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub room: String,
    pub regions: Vec<String>,
    pub origins: Vec<OriginVerdict>,
    pub diverged: bool,
}

/// Runs the check; `Ok(true)` when every region holds the same records of the room.
pub async fn run(args: VerifyArgs) -> anyhow::Result<bool> {
    let topo = Topology::load(&args.topology)?;
    let room = RoomId::parse(&args.room).map_err(|e| anyhow::anyhow!("--room: {e}"))?;
    let admins = AdminUrls::from_topology(&topo, &room)?;
    let report = check_room(&admins, &room).await?;
    print!("{}", render(&report));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(!report.diverged)
}

/// Asks every region for its watermarks, then compares every origin over the common range.
async fn check_room(admins: &AdminUrls, room: &RoomId) -> anyhow::Result<Report> {
    let mut held: BTreeMap<String, Watermarks> = BTreeMap::new();
    for region in admins.regions.keys() {
        let path = format!("/admin/rooms/{}/watermarks", room.as_str());
        let w: Watermarks = serde_json::from_value(admins.get(region, &path).await?)
            .with_context(|| format!("{region}: unexpected answer to {path}"))?;
        anyhow::ensure!(
            w.region == *region,
            "the admin URLs of {region} in the topology file reach a daemon of region {}",
            w.region
        );
        held.insert(region.clone(), w);
    }
    let origins: BTreeSet<String> = held
        .values()
        .flat_map(|w| w.origins.iter().map(|o| o.origin.clone()))
        .collect();
    let mut verdicts = Vec::new();
    for origin in &origins {
        let holders: Vec<_> = held
            .iter()
            .filter_map(|(r, w)| {
                w.origins
                    .iter()
                    .find(|o| o.origin == *origin)
                    .map(|o| (r.clone(), o))
            })
            .collect();
        let counts: BTreeSet<i32> = holders.iter().map(|(_, o)| o.partitions).collect();
        if counts.len() > 1 {
            let each: Vec<String> = holders
                .iter()
                .map(|(r, o)| format!("{r} {}", o.partitions))
                .collect();
            anyhow::bail!(
                "the regions disagree on the partition count of {origin} ({}): its records of \
                 the room are in different partitions (a mirror topic not grown to the \
                 origin's count yet: run again later)",
                each.join(", ")
            );
        }
        let from = holders.iter().map(|(_, o)| o.earliest).max().unwrap_or(0);
        let to = holders.iter().map(|(_, o)| o.end).min().unwrap_or(0);
        let regions: Vec<String> = holders.iter().map(|(r, _)| r.clone()).collect();
        let to = to.max(from);
        verdicts.push(compare_origin(admins, origin, &regions, from, to).await?);
    }
    Ok(Report {
        room: room.as_str().to_owned(),
        regions: admins.regions.keys().cloned().collect(),
        diverged: verdicts.iter().any(|v| !v.differ.is_empty()),
        origins: verdicts,
    })
}

/// The report for an operator.
fn render(r: &Report) -> String {
    let mut out = format!(
        "room {}: {} regions ({})\n",
        r.room,
        r.regions.len(),
        r.regions.join(", ")
    );
    for v in &r.origins {
        out.push_str(&format!(
            "origin {}: origin offsets [{}, {}), {} records of the room; same in {}\n",
            v.origin,
            v.from,
            v.to,
            v.count,
            v.agree.join(", ")
        ));
        for d in &v.differ {
            out.push_str(&format!(
                "  DIVERGED: {} differs from {} at origin offset {} of {} (it holds {} records \
                 of the room in the range, {} holds {})\n",
                d.region,
                d.reference,
                d.first_differing_offset,
                v.origin,
                d.count,
                d.reference,
                d.reference_count
            ));
        }
    }
    out.push_str(if r.diverged {
        "verdict: DIVERGED\n"
    } else {
        "verdict: every region holds the same records\n"
    });
    out
}

/// Every region's admin URLs and token, asked over plain HTTP.
struct AdminUrls {
    room: RoomId,
    regions: BTreeMap<String, (Vec<String>, Option<String>)>,
}

impl AdminUrls {
    fn from_topology(topo: &Topology, room: &RoomId) -> anyhow::Result<AdminUrls> {
        let mut regions = BTreeMap::new();
        for r in &topo.regions {
            anyhow::ensure!(
                !r.admin.is_empty(),
                "region {} has no admin URL in the topology file",
                r.name
            );
            regions.insert(r.name.clone(), (r.admin.clone(), r.token()));
        }
        Ok(AdminUrls {
            room: room.clone(),
            regions,
        })
    }

    /// GET `path` from the first daemon of `region` that answers.
    async fn get(&self, region: &str, path: &str) -> anyhow::Result<serde_json::Value> {
        let (urls, token) = self
            .regions
            .get(region)
            .with_context(|| format!("no region {region} in the topology"))?;
        let mut errors = Vec::new();
        for url in urls {
            // The daemon gives up on a read at DIGEST_TIMEOUT and says so.
            let within = DIGEST_TIMEOUT + std::time::Duration::from_secs(5);
            match admin_request_within(url, "GET", path, token.as_deref(), within).await {
                Ok((200, body)) => {
                    return serde_json::from_str(&body)
                        .with_context(|| format!("{region} ({url}): {path} is not JSON"));
                }
                Ok((status, body)) => errors.push(format!("{url}: HTTP {status}: {}", body.trim())),
                Err(e) => errors.push(format!("{url}: {e:#}")),
            }
        }
        anyhow::bail!("{region}: GET {path} failed: {}", errors.join("; "))
    }
}

#[async_trait]
impl DigestSource for AdminUrls {
    async fn digest(
        &self,
        region: &str,
        origin: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<RoomDigest> {
        let path = format!(
            "/admin/rooms/{}/digest?origin={origin}&from={from}&to={to}",
            self.room.as_str()
        );
        serde_json::from_value(self.get(region, &path).await?)
            .with_context(|| format!("{region}: unexpected answer to {path}"))
    }
}
