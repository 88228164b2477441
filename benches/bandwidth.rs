//! The `bandwidth` scenario: what permessage-deflate and deltas save on the wire, and what they
//! cost the node, for two kinds of payload.
//!
//! * a state document (a game's or dashboard's state, about 20 KB of JSON: 150 units of ten
//!   fields) of which each push moves four fields and a tick;
//! * chat messages (about 200 bytes: id, room, user, text of 5 to 25 words, time).
//!
//! For each, four modes one after the other, on fresh sockets and a fresh channel: plain,
//! deflate (the sockets offer permessage-deflate), delta (they ask with `delta=1`, on a `delta:`
//! channel), delta + deflate. Pushes are unary `Push` calls, kept at most [`AHEAD`] ahead of the
//! slowest socket so no outbound queue overflows. Reported per mode: bytes the sockets read per
//! delivery (frame headers included), the node's CPU time per delivery (user + system, over
//! the pushes and their delivery), and whether the socket that checks (the first) rebuilt
//! every payload byte for byte.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use futures_util::{stream, StreamExt};
use rand::{rngs::StdRng, Rng, SeedableRng};

use channelgate::{
    edge::fossil,
    pb::{self, control_client::ControlClient},
};

use crate::{
    cpu_us, issue,
    raw_ws::{RawWs, Read},
    tcp_from, ws_of, ws_path, Args,
};

/// Pushes the pusher may be ahead of the slowest socket.
const AHEAD: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Mode {
    name: &'static str,
    deflate: bool,
    delta: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "plain",
        deflate: false,
        delta: false,
    },
    Mode {
        name: "deflate",
        deflate: true,
        delta: false,
    },
    Mode {
        name: "delta",
        deflate: false,
        delta: true,
    },
    Mode {
        name: "delta+deflate",
        deflate: true,
        delta: true,
    },
];

/// `n` successive states of one match: 150 units; each push moves four fields and the tick.
fn state_documents(n: usize) -> Vec<String> {
    const KINDS: [&str; 4] = ["tank", "scout", "medic", "drone"];
    let mut rng = StdRng::seed_from_u64(7);
    let mut units: Vec<[i64; 5]> = (0..150)
        .map(|_| {
            [
                rng.random_range(0..2000),
                rng.random_range(0..2000),
                100,
                rng.random_range(0..60),
                0,
            ]
        })
        .collect();
    (0..n)
        .map(|tick| {
            for _ in 0..4 {
                let unit = rng.random_range(0..units.len());
                let field = rng.random_range(0..4);
                units[unit][field] += rng.random_range(-40..40);
                units[unit][4] = i64::from(units[unit][0] % 3 != 0);
            }
            let list: Vec<String> = units
                .iter()
                .enumerate()
                .map(|(i, [x, y, hp, ammo, moving])| {
                    format!(
                        r#"{{"id":{i},"name":"unit-{i:03}","kind":"{}","team":"{}","x":{x},"y":{y},"hp":{hp},"ammo":{ammo},"status":"{}","target":null}}"#,
                        KINDS[i % 4],
                        if i % 2 == 0 { "red" } else { "blue" },
                        if *moving == 1 { "moving" } else { "idle" },
                    )
                })
                .collect();
            format!(
                r#"{{"match":"m-2026-12-06","map":"harbour","tick":{tick},"clock":"{:02}:{:02}","units":[{}]}}"#,
                tick / 60,
                tick % 60,
                list.join(",")
            )
        })
        .collect()
}

/// `n` chat messages of a lobby.
fn chat_messages(n: usize) -> Vec<String> {
    const WORDS: [&str; 24] = [
        "the", "match", "starts", "in", "five", "minutes", "who", "is", "on", "red", "team",
        "ready", "anyone", "seen", "the", "harbour", "map", "yet", "lag", "today", "gg", "nice",
        "shot", "again",
    ];
    let mut rng = StdRng::seed_from_u64(11);
    (0..n)
        .map(|i| {
            let words = rng.random_range(5..25);
            let text: Vec<&str> = (0..words)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            format!(
                r#"{{"id":{},"room":"lobby","user":"player-{}","text":"{}","sent_at":{}}}"#,
                100_000 + i,
                rng.random_range(1..40),
                text.join(" "),
                1_765_000_000_000u64 + i as u64 * 1_237
            )
        })
        .collect()
}

/// One mode's figures.
struct Row {
    doc: &'static str,
    mode: Mode,
    deliveries: u64,
    wire: u64,
    cpu_us: u64,
    verified: bool,
}

pub(crate) async fn run(args: &Args) -> anyhow::Result<()> {
    let pid = args
        .pid
        .context("--pid: the node's CPU per delivery is half the point")?;
    if args.transport != "websocket" {
        bail!("bandwidth measures WebSockets (permessage-deflate is theirs)");
    }
    let control = ControlClient::connect(args.control.clone()).await?;
    let documents = [
        ("state", state_documents(args.pushes)),
        ("chat", chat_messages(args.pushes)),
    ];
    let average = |docs: &[String]| docs.iter().map(String::len).sum::<usize>() / docs.len().max(1);
    println!(
        "scenario bandwidth: {} sockets per mode, {} pushes each; state document {} B, chat message {} B on average",
        args.sockets,
        args.pushes,
        average(&documents[0].1),
        average(&documents[1].1)
    );
    let run_id = std::process::id();
    let mut rows = Vec::new();
    for (doc, payloads) in &documents {
        for mode in MODES {
            let namespace = if mode.delta { "delta" } else { "plain" };
            let channel = format!("{namespace}:{doc}-{}-{run_id}", mode.name);
            rows.push(phase(args, &control, pid, &channel, doc, mode, payloads).await?);
        }
    }
    println!(
        "{:<6} {:<14} {:>12} {:>11} {:>22} {:>9}",
        "doc", "mode", "B/delivery", "% of plain", "node CPU us/delivery", "verified"
    );
    let mut json = Vec::new();
    for row in &rows {
        let plain = rows
            .iter()
            .find(|r| r.doc == row.doc && r.mode.name == "plain")
            .map_or(1.0, |r| r.wire as f64 / r.deliveries as f64);
        let per = row.wire as f64 / row.deliveries as f64;
        let cpu = row.cpu_us as f64 / row.deliveries as f64;
        println!(
            "{:<6} {:<14} {:>12.0} {:>10.1}% {:>22.3} {:>9}",
            row.doc,
            row.mode.name,
            per,
            100.0 * per / plain,
            cpu,
            if row.verified { "yes" } else { "NO" }
        );
        json.push(serde_json::json!({
            "doc": row.doc, "mode": row.mode.name, "bytes_per_delivery": per,
            "percent_of_plain": 100.0 * per / plain, "node_cpu_us_per_delivery": cpu,
            "deliveries": row.deliveries, "verified": row.verified,
        }));
    }
    println!(
        "{}",
        serde_json::json!({"scenario": "bandwidth", "rows": json})
    );
    if rows.iter().any(|r| !r.verified) {
        bail!("a payload was not rebuilt byte for byte");
    }
    Ok(())
}

/// One mode on one kind of payload: fresh sockets on a fresh channel, every payload pushed,
/// every socket's bytes counted.
async fn phase(
    args: &Args,
    control: &ControlClient<tonic::transport::Channel>,
    pid: u32,
    channel: &str,
    doc: &'static str,
    mode: Mode,
    payloads: &[String],
) -> anyhow::Result<Row> {
    let opened: Vec<anyhow::Result<RawWs>> = stream::iter(0..args.sockets)
        .map(|i| {
            let mut control = control.clone();
            async move {
                let creds = issue(&mut control, channel).await?;
                let mut path = ws_path(&creds);
                if mode.delta {
                    path.push_str("&delta=1");
                }
                let ws = RawWs::open(
                    tcp_from(args, i).await?,
                    &ws_of(args, i)?.to_string(),
                    &path,
                    false,
                    mode.deflate,
                )
                .await?;
                if ws.deflate != mode.deflate {
                    bail!(
                        "permessage-deflate: offered {}, taken {}",
                        mode.deflate,
                        ws.deflate
                    );
                }
                Ok(ws)
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let sockets: Vec<RawWs> = opened.into_iter().collect::<anyhow::Result<_>>()?;
    let expected = Arc::new(payloads.to_vec());
    // received[k]: sockets that got push k.
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..payloads.len()).map(|_| AtomicU64::new(0)).collect());
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            let (expected, received) = (expected.clone(), received.clone());
            tokio::spawn(async move {
                let mut count = 0usize;
                let mut base: Option<Vec<u8>> = None;
                let mut verified = true;
                while count < expected.len() {
                    // Returns as soon as the last push is in: nothing more will come.
                    let read = ws
                        .read_until(|text| {
                            if i == 0 {
                                verified &= check(text, &expected[count], &mut base);
                            }
                            received[count].fetch_add(1, Ordering::Relaxed);
                            count += 1;
                            count == expected.len()
                        })
                        .await?;
                    if matches!(read, Read::Closed) {
                        bail!("the node closed socket {i} after {count} pushes");
                    }
                }
                Ok::<_, anyhow::Error>((ws.wire, verified))
            })
        })
        .collect();
    let sockets = args.sockets as u64;
    let started = Instant::now();
    let cpu_before = cpu_us(pid)?;
    let mut push = control.clone();
    for (k, payload) in payloads.iter().enumerate() {
        if k >= AHEAD {
            let behind = &received[k - AHEAD];
            while behind.load(Ordering::Relaxed) < sockets {
                if started.elapsed() > Duration::from_secs(120) {
                    bail!("sockets stopped receiving ({doc}, {})", mode.name);
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        push.push(pb::PushRequest {
            channels: vec![channel.to_owned()],
            json: payload.clone(),
            ..Default::default()
        })
        .await?;
    }
    let (mut wire, mut verified) = (0, true);
    for reader in readers {
        let (bytes, ok) = reader.await??;
        wire += bytes;
        verified &= ok;
    }
    let cpu_after = cpu_us(pid)?;
    Ok(Row {
        doc,
        mode,
        deliveries: sockets * payloads.len() as u64,
        wire,
        cpu_us: cpu_after - cpu_before,
        verified,
    })
}

/// Whether the frame `text` carries `expected` byte for byte: whole, or as a delta against the
/// payload before (`base`, then replaced by this one).
fn check(text: &[u8], expected: &str, base: &mut Option<Vec<u8>>) -> bool {
    let Ok(frame) = serde_json::from_slice::<serde_json::Value>(text) else {
        return false;
    };
    let payload = match frame.get("delta").and_then(|d| d.as_str()) {
        Some(delta) => match base
            .as_deref()
            .map(|b| fossil::apply(b, delta.as_bytes(), 1 << 24))
        {
            Some(Ok(bytes)) => bytes,
            _ => return false,
        },
        None => {
            let text = String::from_utf8_lossy(text);
            let Some(at) = text.find(r#","payload":"#) else {
                return false;
            };
            text.as_bytes()[at + 11..text.len() - 1].to_vec()
        }
    };
    let ok = payload == expected.as_bytes();
    *base = Some(payload);
    ok
}
