//! Behind real proxies: Debian's HAProxy in front of a node with the PROXY protocol (v2), and
//! Debian's nginx with `X-Forwarded-For`. Clients connect to the proxy from their own loopback
//! addresses (127.0.0.2, 127.0.0.3, ...); the proxies reach the node from 127.0.0.1, the one
//! trusted proxy address. Every per-address limit applies to the client the proxy names, the
//! proxy's own health check is never locked out, and what an untrusted peer claims about
//! itself changes nothing.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::{tungstenite::client::IntoClientRequest, MaybeTlsStream};

use crate::support::{wait_until, Creds, Gateway, Ws, PATIENCE};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "channelgate-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A proxy process, killed (with its directory removed) on drop.
struct Process {
    child: Child,
    dir: PathBuf,
}

impl Process {
    fn spawn(command: &mut Command, dir: PathBuf) -> Self {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the proxy");
        Self { child, dir }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_listening(addr: SocketAddr) {
    wait_until(|| async move { TcpStream::connect(addr).await.is_ok() }).await;
}

/// HAProxy in TCP mode before `node`, sending it a PROXY v2 header per connection and checking
/// its `/readyz` every 100 ms (the check carries a PROXY header too); its statistics in CSV at
/// `stats`.
struct Haproxy {
    addr: SocketAddr,
    stats: SocketAddr,
    _process: Process,
}

impl Haproxy {
    async fn start(node: SocketAddr) -> Self {
        let bin = crate::setup::haproxy();
        let dir = temp_dir("haproxy");
        let (port, stats_port) = (free_port(), free_port());
        let config = format!(
            "global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout check 2s
frontend gateway
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    server node1 {node} send-proxy-v2 check inter 100ms fall 2 rise 1
listen stats
    mode http
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let process = Process::spawn(Command::new(bin).arg("-db").arg("-f").arg(&path), dir);
        let haproxy = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stats: SocketAddr::from(([127, 0, 0, 1], stats_port)),
            _process: process,
        };
        wait_listening(haproxy.addr).await;
        wait_listening(haproxy.stats).await;
        haproxy
    }

    /// The statistics row of the node behind it: column name -> value.
    async fn node_stats(&self) -> HashMap<String, String> {
        let (status, csv) = http_get(self.stats, [127, 0, 0, 1], "/stats;csv", &[]).await;
        assert_eq!(status, 200, "{csv}");
        let mut lines = csv.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_owned)
            .collect();
        let row = lines
            .find(|l| l.starts_with("nodes,node1,"))
            .expect("the node's row");
        header
            .into_iter()
            .zip(row.split(',').map(str::to_owned))
            .collect()
    }
}

/// nginx before `node`, passing WebSocket upgrades and appending the client to
/// `X-Forwarded-For`, as its documentation shows ([`Nginx::start`]), or a plain reverse proxy
/// that does not pass them, as many corporate proxies are ([`Nginx::without_upgrade`]).
pub(crate) struct Nginx {
    pub(crate) addr: SocketAddr,
    _process: Process,
}

impl Nginx {
    async fn start(node: SocketAddr) -> Self {
        Self::start_with(node, true).await
    }

    /// nginx that proxies HTTP to `node` without `Upgrade` (a WebSocket cannot get through;
    /// event streams and POSTs can).
    pub(crate) async fn without_upgrade(node: SocketAddr) -> Self {
        Self::start_with(node, false).await
    }

    async fn start_with(node: SocketAddr, upgrade: bool) -> Self {
        let upgrade = if upgrade {
            "proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;"
        } else {
            "proxy_set_header Connection \"\";"
        };
        let bin = crate::setup::nginx();
        let dir = temp_dir("nginx");
        let port = free_port();
        let d = dir.display();
        let config = format!(
            "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{node};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            {upgrade}
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 1h;
        }}
    }}
}}
"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).unwrap();
        let process = Process::spawn(
            Command::new(bin)
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&path),
            dir,
        );
        let nginx = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _process: process,
        };
        wait_listening(nginx.addr).await;
        nginx
    }
}

/// A TCP connection to `to` from the loopback address `source`.
async fn tcp_from(source: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    socket.connect(to).await
}

/// A WebSocket through `to` from `source`, with `headers` added to the upgrade; the HTTP status
/// when refused (0 when the connection closed without one).
async fn ws_via(
    to: SocketAddr,
    source: [u8; 4],
    creds: &Creds,
    headers: &[(&'static str, &str)],
) -> Result<Ws, u16> {
    let mut request = format!(
        "ws://{to}/ws?socket_connection_id={}&socket_key={}",
        creds.id, creds.key
    )
    .into_client_request()
    .unwrap();
    for (name, value) in headers {
        request.headers_mut().append(*name, value.parse().unwrap());
    }
    let tcp = tcp_from(source, to).await.map_err(|_| 0u16)?;
    match tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("a handshake answer in time")
    {
        Ok((ws, _)) => Ok(Ws { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(_) => Err(0),
    }
}

/// `GET path` through `to` from `source`: the status and body (status 0: closed unanswered).
async fn http_get(
    to: SocketAddr,
    source: [u8; 4],
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let Ok(mut tcp) = tcp_from(source, to).await else {
        return (0, String::new());
    };
    // HTTP/1.0: a plain body, never chunked.
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: gateway\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer in time");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

/// A chunked body's content (HAProxy's statistics page is chunked whatever the request).
fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// `n` connections through `to` from `source` that send half a request head and stall.
async fn stall(to: SocketAddr, source: [u8; 4], n: usize) -> Vec<TcpStream> {
    let mut stalled = Vec::new();
    for _ in 0..n {
        if let Ok(mut tcp) = tcp_from(source, to).await {
            let _ = tcp
                .write_all(b"GET /ws?socket_connection_id=x HTTP/1.1\r\nHost: g")
                .await;
            stalled.push(tcp);
        }
    }
    stalled
}

/// A value of the node's metrics, read from 127.0.0.8 (not a trusted proxy: it needs no
/// PROXY header).
async fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let (_, metrics) = http_get(gw.http, [127, 0, 0, 8], "/metrics", &[]).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn trusted_loopback(c: &mut channelgate::config::Config) {
    c.trusted_proxies = Some(vec!["127.0.0.1".into()]);
    c.limits.max_connections_per_ip = 2;
}

/// Stalled clients behind HAProxy lock out neither other clients nor HAProxy's health check:
/// with the PROXY protocol, each is counted against its own address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_with_the_proxy_protocol_limits_hold_per_client() {
    let gw = Gateway::start_with(|c| {
        trusted_loopback(c);
        c.proxy_protocol = true;
    })
    .await;
    let haproxy = Haproxy::start(gw.http).await;
    wait_until(|| async { haproxy.node_stats().await["status"] == "UP" }).await;

    // 100 clients of 127.0.0.2 stall in their HTTP phase: 64 are held, the rest closed.
    let _stalled = stall(haproxy.addr, [127, 0, 0, 2], 100).await;
    let refused = "channelgate_refused_connections_total{reason=\"pending_per_ip\"} ";
    wait_until(|| async { metric(&gw, refused).await >= 36.0 }).await;
    let checks_before: u64 = haproxy.node_stats().await["chkdown"].parse().unwrap();

    // A client of 127.0.0.3 through the same proxy connects at once and gets a push.
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["room"]).await;
    let mut ws = ws_via(haproxy.addr, [127, 0, 0, 3], &creds, &[])
        .await
        .expect("a client at another address connects");
    gw.push("room", "1").await;
    assert_eq!(ws.recv_push().await.1, 1);
    // Probes through the proxy, and the proxy's own check, are answered all along.
    assert_eq!(
        http_get(haproxy.addr, [127, 0, 0, 3], "/readyz", &[])
            .await
            .0,
        200
    );
    let stats = haproxy.node_stats().await;
    assert_eq!(stats["status"], "UP", "{stats:?}");
    assert_eq!(stats["check_status"], "L7OK", "{stats:?}");
    let checks: u64 = stats["chkdown"].parse().unwrap();
    assert_eq!(
        checks, checks_before,
        "the node never went down for HAProxy"
    );

    // The per-address socket limit counts the client, not the proxy: two sockets of
    // 127.0.0.4, then 429; 127.0.0.5 is not affected.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            ws_via(haproxy.addr, [127, 0, 0, 4], &gw.issue().await, &[])
                .await
                .expect("within the per-address limit"),
        );
    }
    assert_eq!(
        ws_via(haproxy.addr, [127, 0, 0, 4], &gw.issue().await, &[])
            .await
            .err(),
        Some(429)
    );
    assert!(ws_via(haproxy.addr, [127, 0, 0, 5], &gw.issue().await, &[])
        .await
        .is_ok());
}

/// A PROXY header from a peer that is not a trusted proxy is refused, and changes nothing: the
/// peer stays itself for every limit.
#[tokio::test]
async fn a_proxy_header_from_an_untrusted_peer_is_refused() {
    let gw = Gateway::start_with(|c| {
        trusted_loopback(c);
        c.proxy_protocol = true;
    })
    .await;
    let creds = gw.issue().await;
    for header in [
        &b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 8080\r\n"[..],
        &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xcb\x00\x71\x09\x7f\x00\x00\x01\x9c\x40\x1f\x90"[..],
    ] {
        let mut tcp = tcp_from([127, 0, 0, 6], gw.http).await.unwrap();
        let request = format!(
            "GET /ws?socket_connection_id={}&socket_key={} HTTP/1.1\r\nHost: g\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            creds.id, creds.key
        );
        let mut bytes = header.to_vec();
        bytes.extend(request.as_bytes());
        tcp.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
            .await
            .expect("closed in time");
        assert!(
            !String::from_utf8_lossy(&answer).contains(" 101 "),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let refused = "channelgate_refused_connections_total{reason=\"proxy_untrusted\"} ";
    assert_eq!(metric(&gw, refused).await, 2.0);
    // The credentials were never used: the peer connects as itself.
    assert!(ws_via(gw.http, [127, 0, 0, 6], &creds, &[]).await.is_ok());
}

/// A trusted proxy's connection without a PROXY header is closed: guessing would let a client
/// that reached the node through it forge one.
#[tokio::test]
async fn a_trusted_proxys_connection_without_a_proxy_header_is_closed() {
    let gw = Gateway::start_with(|c| {
        trusted_loopback(c);
        c.proxy_protocol = true;
    })
    .await;
    let (status, _) = http_get(gw.http, [127, 0, 0, 1], "/healthz", &[]).await;
    assert_eq!(status, 0, "answered without a PROXY header");
    let refused = "channelgate_refused_connections_total{reason=\"proxy_header\"} ";
    wait_until(|| async { metric(&gw, refused).await == 1.0 }).await;
}

/// Behind nginx, which names clients in `X-Forwarded-For`: the per-address limits count each
/// client; a client's own `X-Forwarded-For` (forged left of what nginx appends) changes nothing,
/// and neither does one sent straight to the node by a peer that is not a trusted proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_with_x_forwarded_for_limits_hold_per_client() {
    let gw = Gateway::start_with(trusted_loopback).await;
    let nginx = Nginx::start(gw.http).await;

    // Stalled clients of 127.0.0.2 (nginx holds their unfinished heads) lock nobody out.
    let _stalled = stall(nginx.addr, [127, 0, 0, 2], 100).await;
    assert_eq!(
        http_get(nginx.addr, [127, 0, 0, 3], "/readyz", &[]).await.0,
        200
    );

    // Two sockets per address: 127.0.0.2's third is refused, even with a forged header; a
    // client of 127.0.0.3 through the same nginx connects at once.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(
            ws_via(nginx.addr, [127, 0, 0, 2], &gw.issue().await, &[])
                .await
                .expect("within the per-address limit"),
        );
    }
    let forged = [("x-forwarded-for", "127.0.0.9")];
    assert_eq!(
        ws_via(nginx.addr, [127, 0, 0, 2], &gw.issue().await, &forged)
            .await
            .err(),
        Some(429)
    );
    let creds = gw.issue().await;
    gw.subscribe(&creds, &["room"]).await;
    let mut ws = ws_via(nginx.addr, [127, 0, 0, 3], &creds, &[])
        .await
        .expect("a client at another address connects");
    gw.push("room", "2").await;
    assert_eq!(ws.recv_push().await.1, 2);

    // Straight to the node from 127.0.0.7 (not a trusted proxy): its header is ignored, it
    // is 127.0.0.7 for the limit whatever it claims.
    let mut direct = Vec::new();
    for claim in ["10.1.1.1", "10.2.2.2"] {
        direct.push(
            ws_via(
                gw.http,
                [127, 0, 0, 7],
                &gw.issue().await,
                &[("x-forwarded-for", claim)],
            )
            .await
            .expect("within the limit"),
        );
    }
    assert_eq!(
        ws_via(
            gw.http,
            [127, 0, 0, 7],
            &gw.issue().await,
            &[("x-forwarded-for", "10.3.3.3")]
        )
        .await
        .err(),
        Some(429)
    );
}
