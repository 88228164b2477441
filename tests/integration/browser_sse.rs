//! Server-Sent Events in a real browser (headless Chromium, as in `browser.rs`): the chat example
//! behind an nginx that does not pass `Upgrade`, where the browser client falls back to SSE and
//! POSTs on its own; and a page with a plain `EventSource` and no library, cut at a proxy and
//! moved to another node after its node was SIGKILLed, that gets every push of three channels
//! exactly once, in order, from its own `Last-Event-ID`.

use std::{net::SocketAddr, time::Duration};

use axum::{response::Html, routing::get, Router};
use serde_json::json;
use tokio::net::TcpListener;

use crate::{
    browser::{
        credentials_site, handshakes, output_dir, say, screenshot, wait_js, ChatRoom, ChromeDriver,
    },
    support::{Gateway, Proxy},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_works_over_sse_behind_a_proxy_that_does_not_pass_upgrade() {
    let out = output_dir("chat-sse");
    // Browsers -> a TCP proxy (to cut their connections) -> nginx without Upgrade -> the node.
    let room = ChatRoom::open(
        &out,
        true,
        "return window.gate?.state === 'open' && window.gate.transport === 'sse'",
    )
    .await;
    let ChatRoom {
        gw,
        proxy,
        ann,
        bob,
        ..
    } = &room;
    assert!(
        handshakes(gw, "not_upgrade").await >= 2,
        "the WebSocket was tried and refused"
    );
    // call-route and the typing action POSTed, pushes and the typing Send over the streams.
    room.talk("hello over sse").await;

    // The streams are cut while messages are pushed: both pages resume and recover them all.
    proxy.cut();
    for n in 1..=5 {
        let message = json!({"type":"message","id":format!("cut-{n}"),"name":"ops","text":format!("pushed during the cut {n}")});
        gw.push("chat:lobby", &message.to_string()).await;
    }
    for page in [&ann, &bob] {
        wait_js(
            page,
            "return window.chat.resumes >= 1 && window.gate.state === 'open' && log().includes('pushed during the cut 5')",
        )
        .await;
    }
    say(bob, "still here after the cut").await;
    for page in [&ann, &bob] {
        wait_js(page, "return log().includes('still here after the cut')").await;
        let chat = page.execute("return window.chat", vec![]).await.unwrap();
        assert_eq!(chat["messages"], 8, "every message once: {chat}");
    }
    screenshot(ann, &out.join("ann.png")).await;

    // A refresh: new credentials, positions and the transport that worked from
    // sessionStorage: straight to SSE, no WebSocket tried.
    let tried = handshakes(gw, "not_upgrade").await;
    ann.refresh().await.unwrap();
    wait_js(
        ann,
        "return window.gate?.state === 'open' && window.gate.transport === 'sse' && window.chat.opens === 1",
    )
    .await;
    assert_eq!(handshakes(gw, "not_upgrade").await, tried);
    say(ann, "after the refresh").await;
    for page in [&ann, &bob] {
        wait_js(page, "return log().includes('after the refresh')").await;
    }
    screenshot(bob, &out.join("bob.png")).await;
    room.close().await;
}

/// A site whose page opens a plain `EventSource` on `edge` (no library), for new credentials
/// subscribed to `a`, `b` and `c` minted through `client`; `window.got[channel]` holds the
/// payloads in arrival order, `window.ids` the ids seen.
async fn plain_site(client: channelgate::client::Client, edge: SocketAddr) -> SocketAddr {
    credentials_site(client, &["a", "b", "c"], move |id| {
        format!(
            r#"<!doctype html><html><body><pre id="log"></pre>
<script>
window.got = {{ a: [], b: [], c: [] }}; window.opens = 0; window.errors = 0; window.ids = [];
const stream = new EventSource("http://{edge}/sse?socket_connection_id={id}", {{ withCredentials: true }});
stream.onopen = () => (window.opens += 1);
stream.onerror = () => (window.errors += 1);
stream.onmessage = (event) => {{
  const frame = JSON.parse(event.data);
  if (event.lastEventId) window.ids.push(event.lastEventId);
  if (frame.offset !== undefined && frame.payload !== undefined) {{
    window.got[frame.channel].push(frame.payload);
    document.getElementById("log").textContent += `${{frame.channel}} ${{frame.payload}}\n`;
  }}
}};
</script></body></html>"#
        )
    })
    .await
}

/// Pushes `1..=n` to each of `a`, `b`, `c` in turn, 5 ms apart, through `client`.
fn push_all(client: channelgate::client::Client, n: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 1..=n {
            for channel in ["a", "b", "c"] {
                client.push(&[channel], &i.to_string()).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

/// The page has `1..=n` on every channel, each once and in order.
async fn every_push_once(page: &fantoccini::Client, n: u64) {
    wait_js(
        page,
        &format!("return ['a','b','c'].every((c) => window.got[c].length >= {n})"),
    )
    .await;
    let got = page.execute("return window.got", vec![]).await.unwrap();
    for channel in ["a", "b", "c"] {
        let seen: Vec<u64> = serde_json::from_value(got[channel].clone()).unwrap();
        assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "{channel}: {got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_event_source_gets_every_push_of_three_channels_once_across_a_cut() {
    let out = output_dir("plain-event-source");
    let gw = Gateway::start().await;
    let proxy = Proxy::start(gw.http).await;
    let site = plain_site(gw.client.clone(), proxy.addr).await;
    let driver = ChromeDriver::start();
    let page = driver.browser(&out.join("profile")).await;
    page.goto(&format!("http://{site}/")).await.unwrap();
    wait_js(&page, "return window.opens === 1 && window.ids.length >= 1").await;
    let pushing = push_all(gw.client.clone(), 40);
    wait_js(&page, "return window.got.c.length >= 10").await;
    proxy.cut();
    pushing.await.unwrap();
    every_push_once(&page, 40).await;
    let opens = page.execute("return window.opens", vec![]).await.unwrap();
    assert!(
        opens.as_u64() >= Some(2),
        "it reconnected on its own: {opens}"
    );
    screenshot(&page, &out.join("after-cut.png")).await;
    page.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_event_source_moves_to_another_node_when_its_node_is_killed() {
    let out = output_dir("plain-event-source-sigkill");
    let prefix = crate::cluster::unique_prefix("browser-sse-sigkill");
    let (mut doomed, http, _grpc) = crate::cluster::spawn_node(&prefix, &[]);
    let survivor = crate::cluster::node(crate::cluster::REDIS, &prefix).await;
    let balancer = Proxy::start(http.parse().unwrap()).await;
    let site = plain_site(survivor.client.clone(), balancer.addr).await;
    let driver = ChromeDriver::start();
    let page = driver.browser(&out.join("profile")).await;
    page.goto(&format!("http://{site}/")).await.unwrap();
    wait_js(&page, "return window.opens === 1 && window.ids.length >= 1").await;
    let pushing = push_all(survivor.client.clone(), 60);
    wait_js(&page, "return window.got.c.length >= 10").await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    balancer.retarget(survivor.http);
    balancer.cut();
    pushing.await.unwrap();
    every_push_once(&page, 60).await;
    screenshot(&page, &out.join("on-the-survivor.png")).await;
    page.close().await.unwrap();
}

/// Ten streams from one page to one origin: over HTTP/1.1 a browser opens at most six
/// connections per origin, so only HTTP/2 (TLS, ALPN `h2`) carries all ten at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_event_streams_from_one_page_share_one_http2_connection() {
    let out = output_dir("sse-h2");
    let pki = crate::support::TestPki::in_dir("browser-sse-h2");
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let gw = Gateway::start_with(move |c| (c.tls_cert, c.tls_key) = (Some(cert), Some(key))).await;
    let mut streams = String::new();
    for _ in 0..10 {
        let creds = gw.issue().await;
        gw.subscribe(&creds, &["ten"]).await;
        streams.push_str(&format!(
            "\"https://localhost:{}/sse?socket_connection_id={}&socket_key={}\",",
            gw.http.port(),
            creds.id,
            creds.key
        ));
    }
    let page = format!(
        r#"<!doctype html><html><body><script>
window.opened = 0; window.got = 0;
for (const url of [{streams}]) {{
  const stream = new EventSource(url);
  stream.onmessage = (event) => {{
    const frame = JSON.parse(event.data);
    if (frame.connected) window.opened += 1;
    if (frame.payload !== undefined) window.got += 1;
  }};
}}
</script></body></html>"#
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let site = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(move || std::future::ready(Html(page.clone()))));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let driver = ChromeDriver::start();
    let browser = driver
        .browser_with(&out.join("profile"), &["--ignore-certificate-errors"])
        .await;
    browser.goto(&format!("http://{site}/")).await.unwrap();
    wait_js(&browser, "return window.opened === 10").await;
    gw.push("ten", "1").await;
    wait_js(&browser, "return window.got === 10").await;
    browser.close().await.unwrap();
}
