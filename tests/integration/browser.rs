//! The chat example (`examples/chat/`) in a real browser: headless Chromium driven over WebDriver
//! (chromedriver, fantoccini), two users on two pages, the gateway and the chat app in-process on
//! real sockets, and a TCP proxy between the browsers and the edge so the test can cut the
//! sockets without touching the pages. Screenshots go to `target/tmp/browser/`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them).

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use axum::{response::Html, routing::get, Router};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::{
    chat_app::{self, ChatConfig},
    support::{Gateway, Proxy, PATIENCE},
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The chat example (`examples/chat/`) in-process with a gateway that keeps its presence, two
/// users' Chromium pages (`ann`, `bob`) loaded from it and each showing both users, and a TCP
/// proxy between the browsers and the edge (`proxy.cut()` cuts their connections). With
/// `without_upgrade`, an nginx that does not pass `Upgrade` sits between the proxy and the node.
pub(crate) struct ChatRoom {
    pub(crate) gw: Gateway,
    pub(crate) proxy: Proxy,
    pub(crate) origin: String,
    pub(crate) ann: Client,
    pub(crate) bob: Client,
    stop: CancellationToken,
    app: tokio::task::JoinHandle<anyhow::Result<()>>,
    _nginx: Option<crate::proxies::Nginx>,
    _driver: ChromeDriver,
}

impl ChatRoom {
    /// Starts it all; `opened` is the script each page must satisfy once connected.
    pub(crate) async fn open(out: &Path, without_upgrade: bool, opened: &str) -> Self {
        // The chat app's address comes first: the gateway needs it as upstream and allowed
        // Origin.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let gw = Gateway::start_with(|c| {
            c.upstream = Some(origin.clone());
            c.allowed_origins = vec![origin.clone()];
            c.limits.namespaces = chat_presence();
        })
        .await;
        let nginx = match without_upgrade {
            true => Some(crate::proxies::Nginx::without_upgrade(gw.http).await),
            false => None,
        };
        let proxy = Proxy::start(nginx.as_ref().map_or(gw.http, |n| n.addr)).await;
        let stop = CancellationToken::new();
        let app = tokio::spawn(chat_app::serve(
            listener,
            ChatConfig {
                control: format!("http://{}", gw.grpc),
                token: None,
                gateway_url: Some(format!("ws://{}/ws", proxy.addr)),
                gateway_port: 0,
            },
            stop.clone(),
        ));
        let driver = ChromeDriver::start();
        let ann = driver.browser(&out.join("profile-ann")).await;
        let bob = driver.browser(&out.join("profile-bob")).await;
        ann.goto(&format!("{origin}/?name=ann")).await.unwrap();
        bob.goto(&format!("{origin}/?name=bob")).await.unwrap();
        for page in [&ann, &bob] {
            wait_js(page, opened).await;
        }
        // Presence: each page shows both users (the app's list, then join events).
        for page in [&ann, &bob] {
            both_here(page).await;
        }
        Self {
            gw,
            proxy,
            origin,
            ann,
            bob,
            stop,
            app,
            _nginx: nginx,
            _driver: driver,
        }
    }

    /// A message said on ann's page (call-route, then a push to the room) appears on both; bob
    /// typing (the `typing` action, served over a Handle stream) shows on ann's, then his
    /// message.
    pub(crate) async fn talk(&self, text: &str) {
        say(&self.ann, text).await;
        for page in [&self.ann, &self.bob] {
            wait_js(page, &format!("return log().includes('{text}')")).await;
        }
        let bob = &self.bob;
        let input = bob.find(Locator::Css("#text")).await.unwrap();
        input.send_keys("hi ann").await.unwrap();
        wait_js(
            &self.ann,
            "return document.getElementById('typing').textContent.includes('bob is typing')",
        )
        .await;
        bob.find(Locator::Css("#send"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_js(&self.ann, "return log().includes('hi ann')").await;
    }

    /// Closes the pages and stops the app.
    pub(crate) async fn close(self) {
        self.ann.close().await.unwrap();
        self.bob.close().await.unwrap();
        self.stop.cancel();
        self.app.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_in_a_real_browser() {
    let out = output_dir("chat");
    let room = ChatRoom::open(&out, false, "return window.gate?.state === 'open'").await;
    let ChatRoom {
        gw,
        proxy,
        origin: chat_origin,
        ann,
        bob,
        ..
    } = &room;
    room.talk("hello from ann").await;

    // Cut both sockets (not the pages): the client reconnects within the grace period, resumes
    // the same credentials and subscriptions, and the conversation goes on.
    proxy.cut();
    for page in [&ann, &bob] {
        wait_js(
            page,
            "return window.chat.resumes >= 1 && window.gate.state === 'open'",
        )
        .await;
    }
    say(bob, "still here after the cut").await;
    for page in [&ann, &bob] {
        wait_js(page, "return log().includes('still here after the cut')").await;
    }
    // Nothing was reloaded: one page load, the first open plus one resume each.
    for page in [&ann, &bob] {
        let chat = page.execute("return window.chat", vec![]).await.unwrap();
        assert_eq!(chat["opens"], 2, "{chat}");
        assert_eq!(chat["messages"], 3, "{chat}");
    }
    screenshot(ann, &out.join("ann.png")).await;
    screenshot(bob, &out.join("bob.png")).await;

    // A page from a foreign Origin is refused at the handshake, even with valid credentials: the
    // foreign site hands the browser the key cookie itself (cookies ignore ports, so the gateway
    // receives it), which leaves the Origin as the only thing wrong.
    let creds = gw.issue().await;
    let foreign = foreign_site(gw, &creds.id, &creds.key).await;
    let refused_before = handshakes(gw, "origin").await;
    bob.goto(&format!("http://{foreign}/")).await.unwrap();
    wait_js(bob, "return window.attempts >= 2").await;
    assert!(handshakes(gw, "origin").await >= refused_before + 2);
    let opens = bob.execute("return window.opens", vec![]).await.unwrap();
    assert_eq!(opens, 0, "a foreign page opened a socket");
    screenshot(bob, &out.join("foreign-origin.png")).await;
    // The credentials were fine: from the allowed Origin the same id and key connect.
    let mut request = format!(
        "{}?socket_connection_id={}&socket_key={}",
        gw.ws_url(),
        creds.id,
        creds.key
    )
    .into_client_request()
    .unwrap();
    request
        .headers_mut()
        .insert("origin", chat_origin.parse().unwrap());
    gw.connect_request(request)
        .await
        .expect("the same credentials from the allowed Origin");

    room.close().await;
    println!("screenshots in {}", out.display());
}

/// A page of the browser client that logs every push to `feed` (`window.got`: payloads in the
/// order its handler saw them, `window.opens`: each `open` event's detail). Every load gets new
/// credentials subscribed to `feed`, as an application's page route would mint them.
async fn feed_site(gw: &Gateway, socket_url: String) -> SocketAddr {
    feed_site_with(
        gw.client.clone(),
        gw.http,
        socket_url,
        "{ backoffInitial: 100, backoffMax: 300 }",
    )
    .await
}

/// [`feed_site`], minting through `client`, loading the client script from `edge`, and
/// connecting with the client `options` (a JavaScript object). `window.expired` counts
/// `expired` events.
async fn feed_site_with(
    client: channelgate::client::Client,
    edge: SocketAddr,
    socket_url: String,
    options: &'static str,
) -> SocketAddr {
    credentials_site(client, &["feed"], move |id| {
        format!(
            r#"<!doctype html><html><body data-socket-connection-id="{id}" data-socket-url="{socket_url}">
<h1>feed</h1><pre id="log"></pre>
<script type="module">
import {{ connect }} from "http://{edge}/channelgate.js";
window.got = []; window.opens = []; window.gaps = []; window.expired = 0;
const gate = connect({options});
window.gate = gate;
gate.on("feed", (payload, channel, offset) => {{
  window.got.push(payload);
  document.getElementById("log").textContent += `${{offset}}: ${{payload}}\n`;
}});
gate.addEventListener("open", (e) => window.opens.push(e.detail));
gate.addEventListener("gap", (e) => window.gaps.push(e.detail));
gate.addEventListener("expired", () => (window.expired += 1));
</script></body></html>"#
        )
    })
    .await
}

/// A site whose every page load mints new credentials subscribed to `channels` through
/// `client`, as an application's page route would, sets the key as a cookie and serves
/// `page(connection_id)`.
pub(crate) async fn credentials_site(
    client: channelgate::client::Client,
    channels: &'static [&'static str],
    page: impl Fn(&str) -> String + Clone + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/",
        get(move || {
            let (client, page) = (client.clone(), page.clone());
            async move {
                let creds = client.issue(None, channels).await.unwrap();
                let cookie = format!("socket_key={}; Path=/; SameSite=Lax", creds.socket_key);
                (
                    [(axum::http::header::SET_COOKIE, cookie)],
                    Html(page(&creds.connection_id)),
                )
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The page's `window.got` (payloads seen by its handler, in order) once it holds `n`.
async fn feed_after(page: &Client, n: usize) -> Vec<u64> {
    wait_js(page, &format!("return window.got?.length >= {n}")).await;
    let got = page.execute("return window.got", vec![]).await.unwrap();
    serde_json::from_value(got).unwrap()
}

/// Pushes `range` to `feed`, 5 ms apart.
async fn push_feed(gw: &Gateway, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        gw.push("feed", &n.to_string()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_gets_every_push_once_in_order_across_a_cut_and_a_refresh() {
    let out = output_dir("recovery");
    let gw = Gateway::start().await;
    let proxy = Proxy::start(gw.http).await;
    let site = feed_site(&gw, format!("ws://{}/ws", proxy.addr)).await;
    let driver = ChromeDriver::start();
    let page = driver.browser(&out.join("profile")).await;
    page.goto(&format!("http://{site}/")).await.unwrap();
    wait_js(&page, "return window.opens?.length === 1").await;

    // Pushes flow; the connection is cut in the middle of them; the page reconnects on its own
    // and recovers what it missed.
    push_feed(&gw, 1..=20).await;
    assert_eq!(feed_after(&page, 20).await, (1..=20).collect::<Vec<_>>());
    let pushing = {
        let client = gw.client.clone();
        tokio::spawn(async move {
            for n in 21..=60u64 {
                client.push(&["feed"], &n.to_string()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    proxy.cut();
    pushing.await.unwrap();
    assert_eq!(
        feed_after(&page, 60).await,
        (1..=60).collect::<Vec<_>>(),
        "every push once, in order"
    );
    let opens = page.execute("return window.opens", vec![]).await.unwrap();
    assert_eq!(
        opens[1],
        json!({"resumed": true, "recovered": true}),
        "{opens}"
    );
    screenshot(&page, &out.join("after-cut.png")).await;

    // The page goes away (its positions stay in sessionStorage), pushes go on, the page comes
    // back with new credentials and resumes from where it was.
    page.goto("about:blank").await.unwrap();
    push_feed(&gw, 61..=75).await;
    page.goto(&format!("http://{site}/")).await.unwrap();
    assert_eq!(
        feed_after(&page, 15).await,
        (61..=75).collect::<Vec<_>>(),
        "what it missed, from sessionStorage"
    );
    let opens = page.execute("return window.opens", vec![]).await.unwrap();
    assert_eq!(
        opens[0],
        json!({"resumed": false, "recovered": true}),
        "{opens}"
    );
    push_feed(&gw, 76..=76).await;
    assert_eq!(feed_after(&page, 16).await, (61..=76).collect::<Vec<_>>());
    let gaps = page.execute("return window.gaps", vec![]).await.unwrap();
    assert_eq!(gaps, json!([]));
    screenshot(&page, &out.join("after-refresh.png")).await;
    page.close().await.unwrap();
}

/// A page open for longer than the reconnect grace (the grace counts from a drop, not from
/// the page's first socket) resumes after a cut, and after its node drains (1001) behind a
/// load balancer that sends it to another node of the cluster. Grace is 2 s here (node and
/// client) so "longer than the grace" takes seconds, not minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_open_longer_than_the_grace_resumes_after_a_cut_and_a_drain() {
    const GRACE: Duration = Duration::from_secs(2);
    let out = output_dir("long-page");
    let prefix = crate::cluster::unique_prefix("long-page");
    let grace = |c: &mut channelgate::config::Config| c.limits.reconnect_grace = GRACE;
    let redis = crate::cluster::REDIS;
    let a = crate::cluster::node_with(redis, &prefix, grace).await;
    let b = crate::cluster::node_with(redis, &prefix, grace).await;
    let balancer = Proxy::start(a.http).await;
    let site = feed_site_with(
        b.client.clone(),
        balancer.addr,
        format!("ws://{}/ws", balancer.addr),
        "{ grace: 2000, backoffInitial: 100, backoffMax: 300 }",
    )
    .await;
    let driver = ChromeDriver::start();
    let page = driver.browser(&out.join("profile")).await;
    page.goto(&format!("http://{site}/")).await.unwrap();
    wait_js(&page, "return window.opens?.length === 1").await;
    b.push("feed", "1").await;
    assert_eq!(feed_after(&page, 1).await, [1]);

    // The page has been open for longer than the grace when its connection is cut.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    balancer.cut();
    resumed_and_receives(&page, &b, 2).await;

    // Again longer than the grace; then its node drains and the balancer sends it elsewhere.
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    balancer.retarget(b.http);
    a.begin_shutdown();
    resumed_and_receives(&page, &b, 3).await;
    let expired = page.execute("return window.expired", vec![]).await.unwrap();
    assert_eq!(expired, 0);
    screenshot(&page, &out.join("resumed.png")).await;
    page.close().await.unwrap();
}

/// Waits for the page's `n`th open (or an `expired`), which must be a resume that recovered
/// everything, then pushes `n` through `gw` and checks the page has seen `1..=n`.
async fn resumed_and_receives(page: &Client, gw: &Gateway, n: u64) {
    wait_js(
        page,
        &format!("return window.opens?.length === {n} || window.expired > 0"),
    )
    .await;
    let opens = page.execute("return window.opens", vec![]).await.unwrap();
    assert_eq!(
        opens[n as usize - 1],
        json!({"resumed": true, "recovered": true}),
        "{opens}"
    );
    gw.push("feed", &n.to_string()).await;
    assert_eq!(
        feed_after(page, n as usize).await,
        (1..=n).collect::<Vec<_>>()
    );
}

/// What `examples/chat/channelgate.toml` sets: presence for `chat:`, join and leave per user.
pub(crate) fn chat_presence() -> channelgate::config::Namespaces {
    let policy = channelgate::config::NamespacePolicy {
        presence: true,
        join_leave: channelgate::config::JoinLeave::User,
        ..Default::default()
    };
    channelgate::config::Namespaces([("chat".to_owned(), policy)].into())
}

/// Both users are shown as here on `page`.
pub(crate) async fn both_here(page: &Client) {
    wait_js(
        page,
        "return document.getElementById('online').textContent === 'here: ann, bob'",
    )
    .await;
}

/// Types `text` into the page's box and presses Send, as a user would.
pub(crate) async fn say(page: &Client, text: &str) {
    let input = page.find(Locator::Css("#text")).await.unwrap();
    input.send_keys(text).await.unwrap();
    page.find(Locator::Css("#send"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Polls `script` (with a `log()` helper: the page's message list as text) until it returns
/// true; fails with the page's state after PATIENCE.
pub(crate) async fn wait_js(page: &Client, script: &str) {
    let script =
        format!("const log = () => document.getElementById('log')?.innerText ?? ''; {script}");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match page.execute(&script, vec![]).await {
            Ok(Value::Bool(true)) => return,
            Ok(_) => {}
            Err(err) => panic!("script failed: {err}: {script}"),
        }
        if tokio::time::Instant::now() > deadline {
            let state = page
                .execute(
                    "return {gate: window.gate?.state, chat: window.chat, body: document.body.innerText}",
                    vec![],
                )
                .await;
            panic!("timed out waiting for `{script}`; page: {state:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn screenshot(page: &Client, path: &Path) {
    let png = page.screenshot().await.unwrap();
    std::fs::write(path, png).unwrap();
}

/// `channelgate_handshakes_total{result=...,transport="websocket"}` from the node's metrics.
pub(crate) async fn handshakes(gw: &Gateway, result: &str) -> u64 {
    gw.metric(&format!(
        "channelgate_handshakes_total{{result=\"{result}\",transport=\"websocket\"}}"
    ))
    .await
}

/// A site on another Origin that loads the client from the gateway and tries to connect with
/// `connection_id`, after setting the key cookie. It counts its attempts and opens in `window.attempts` / `window.opens`.
async fn foreign_site(gw: &Gateway, connection_id: &str, key: &str) -> SocketAddr {
    let page = format!(
        r#"<!doctype html><html><body data-socket-connection-id="{connection_id}" data-socket-url="ws://{edge}/ws">
<h1>Some other site</h1><p id="state">connecting</p>
<script type="module">
import {{ connect }} from "http://{edge}/channelgate.js";
window.attempts = 0; window.opens = 0;
const gate = connect({{ backoffInitial: 100, backoffMax: 200 }});
gate.addEventListener("close", () => (window.attempts += 1));
gate.addEventListener("open", () => (window.opens += 1));
gate.addEventListener("state", (e) => (document.getElementById("state").textContent =
  `socket ${{e.detail.state}} after ${{window.attempts}} refused attempts`));
</script></body></html>"#,
        edge = gw.http
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cookie = format!("socket_key={key}; Path=/; SameSite=Lax");
    let app = Router::new().route(
        "/",
        get(move || async move { ([(axum::http::header::SET_COOKIE, cookie)], Html(page)) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

pub(crate) fn output_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver on a free port; killed on drop.
pub(crate) struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    pub(crate) fn start() -> Self {
        crate::setup::chromium();
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: install Debian's chromium and chromium-driver (the test setup could not)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Its own process group, so dropping it also ends the browsers it started, even when
        // the test panics before closing its sessions.
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A new headless Chromium with its own empty profile (its own cookies: one user).
    pub(crate) async fn browser(&self, profile: &Path) -> Client {
        self.browser_with(profile, &[]).await
    }

    /// [`ChromeDriver::browser`] with more command-line switches (`extra`).
    pub(crate) async fn browser_with(&self, profile: &Path, extra: &[&str]) -> Client {
        let mut capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=800,600",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        if let Some(args) = capabilities["goog:chromeOptions"]["args"].as_array_mut() {
            args.extend(extra.iter().map(|a| json!(a)));
        }
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&self.url)
                .await
            {
                Ok(client) => return client,
                // chromedriver may not listen yet.
                Err(err) if tokio::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("no WebDriver session: {err}"),
            }
        }
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process under it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
