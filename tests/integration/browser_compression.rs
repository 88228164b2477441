//! permessage-deflate and deltas in a real browser: headless Chromium (which offers
//! permessage-deflate on every WebSocket) runs the browser client against a gateway whose
//! `state:` namespace has `delta = true`, through a TCP proxy that cuts the connection in the
//! middle of the pushes. The page must hand its handler every payload byte for byte.

use std::net::SocketAddr;

use fantoccini::Client;

use crate::{
    browser::{credentials_site, output_dir, screenshot, wait_js, ChromeDriver},
    support::{Gateway, Proxy},
};

/// A pretty-printed state document (line breaks and indents outside strings, non-ASCII inside
/// them) in which `tick` moves one item's temperature and the tick itself.
fn document(tick: u64) -> String {
    let items: Vec<String> = (0..30u64)
        .map(|i| {
            let temp = if i == tick % 30 { 100 + tick } else { i * 2 };
            format!(
                "    {{\"id\": {i}, \"city\": \"Zürich — Straße {i}\", \"temp\": {temp}, \"mood\": \"😀\"}}"
            )
        })
        .collect();
    format!(
        "{{\n  \"tick\": {tick},\n  \"items\": [\n{}\n  ]\n}}",
        items.join(",\n")
    )
}

/// A page that records `[offset, raw]` for every push on `state:match`, the socket's
/// negotiated extensions at each open, and any delta the client could not apply.
async fn state_site(gw: &Gateway, socket_url: String) -> SocketAddr {
    let edge = gw.http;
    credentials_site(gw.client.clone(), &["state:match"], move |id| {
        format!(
            r#"<!doctype html><html><body data-socket-connection-id="{id}" data-socket-url="{socket_url}">
<h1>state</h1><pre id="log"></pre>
<script type="module">
import {{ connect }} from "http://{edge}/channelgate.js";
window.got = []; window.opens = []; window.extensions = []; window.bad = [];
const gate = connect({{ backoffInitial: 100, backoffMax: 300 }});
window.gate = gate;
gate.on("state:match", (payload, channel, offset, raw) => {{
  window.got.push([offset, raw]);
  document.getElementById("log").textContent = `${{offset}}: tick ${{payload.tick}}`;
}});
gate.addEventListener("open", (e) => {{
  window.opens.push(e.detail);
  window.extensions.push(gate.socket.extensions);
}});
gate.addEventListener("delta", (e) => window.bad.push(e.detail));
</script></body></html>"#
        )
    })
    .await
}

/// What the page's handler got, once it holds `n` pushes.
async fn got(page: &Client, n: usize) -> Vec<(u64, String)> {
    wait_js(page, &format!("return window.got?.length >= {n}")).await;
    let got = page.execute("return window.got", vec![]).await.unwrap();
    serde_json::from_value(got).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_takes_deflate_and_deltas_and_gets_every_payload_byte_for_byte_across_a_cut() {
    let out = output_dir("compression");
    let gw = Gateway::start_with(|c| {
        c.limits.namespaces = crate::compression::delta_namespace("state");
    })
    .await;
    let proxy = Proxy::start(gw.http).await;
    let site = state_site(&gw, format!("ws://{}/ws", proxy.addr)).await;
    let driver = ChromeDriver::start();
    let page = driver.browser(&out.join("profile")).await;
    page.goto(&format!("http://{site}/")).await.unwrap();
    wait_js(&page, "return window.opens?.length === 1").await;
    let extensions = page
        .execute("return window.extensions[0]", vec![])
        .await
        .unwrap();
    assert!(
        extensions
            .as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "Chromium negotiated {extensions}"
    );

    let documents: Vec<String> = (1..=60).map(document).collect();
    let expected = |n: usize| -> Vec<(u64, String)> {
        (1..=n as u64)
            .zip(documents.iter().cloned())
            .collect::<Vec<_>>()
    };
    for doc in &documents[..20] {
        gw.push("state:match", doc).await;
    }
    assert_eq!(got(&page, 20).await, expected(20), "byte for byte");
    let deltas_before_cut = gw.metric("channelgate_delta_frames_total").await;
    assert_eq!(
        deltas_before_cut, 19,
        "every push after the first as a delta"
    );

    // The connection is cut in the middle of the pushes: the page reconnects, recovers what it
    // missed (the first replayed push whole, then deltas) and goes on.
    let pushing = {
        let (client, documents) = (gw.client.clone(), documents.clone());
        tokio::spawn(async move {
            for doc in &documents[20..] {
                client.push(&["state:match"], doc).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    // Cut once the page is into the second batch.
    wait_js(&page, "return window.got.length >= 25").await;
    proxy.cut();
    pushing.await.unwrap();
    assert_eq!(
        got(&page, 60).await,
        expected(60),
        "every push once, in order, byte for byte"
    );
    let opens = page.execute("return window.opens", vec![]).await.unwrap();
    assert_eq!(opens[1]["recovered"], true, "{opens}");
    let bad = page.execute("return window.bad", vec![]).await.unwrap();
    assert_eq!(bad, serde_json::json!([]), "every delta applied");
    let deltas = gw.metric("channelgate_delta_frames_total").await;
    assert!(deltas >= 55, "{deltas} of 60 pushes went as deltas");

    // What the node handed the kernel against the frames it would have sent whole.
    let (wire, whole) = (
        gw.metric("channelgate_wire_bytes_total").await,
        gw.metric("channelgate_bytes_out_total").await,
    );
    println!("state documents to Chromium: {wire} B on the wire for {whole} B of frames");
    assert!(
        wire * 10 < whole,
        "{wire} B on the wire for {whole} B of frames"
    );

    // Chromium compresses what it sends: the node inflates it.
    let reply = page
        .execute_async(
            r#"const done = arguments[0];
               window.gate.send("ping", { pad: "x".repeat(4000) }).then((r) => done(r.status));"#,
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(reply, 200);
    screenshot(&page, &out.join("state.png")).await;
    page.close().await.unwrap();
}
