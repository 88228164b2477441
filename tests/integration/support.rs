//! The harness: `Gateway::start()` runs the real gateway (`channelgate::run`) in-process on
//! port 0, with a gRPC client and helpers that read like the scenario they drive.

#![allow(dead_code, unreachable_pub)]

use std::{future::Future, net::SocketAddr, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_tungstenite::{
    tungstenite::{
        client::IntoClientRequest,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    MaybeTlsStream, WebSocketStream,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use channelgate::{
    client::{self, Client},
    config::Config,
    pb::{self, control_client::ControlClient},
    Listeners,
};

/// How long any expected event may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Gateway {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The generated client, for tests that probe the wire (status codes, raw requests).
    pub control: ControlClient<Channel>,
    /// The typed client (`channelgate::client`), which the scenario helpers use.
    pub client: Client,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), channelgate::error::Error>>>,
}

/// Credentials as `IssueConnection` returns them.
#[derive(Debug, Clone)]
pub struct Creds {
    pub id: String,
    pub key: String,
    pub digest: String,
    pub expires_at_ms: u64,
}

impl From<pb::IssueConnectionResponse> for Creds {
    fn from(r: pb::IssueConnectionResponse) -> Self {
        client::Credentials::from(r).into()
    }
}

impl From<client::Credentials> for Creds {
    fn from(c: client::Credentials) -> Self {
        Self {
            id: c.connection_id,
            key: c.socket_key,
            digest: c.digest,
            expires_at_ms: c.expires_at_unix_ms,
        }
    }
}

const NO_CHANNELS: &[&str] = &[];

/// Issues credentials through the control plane at `grpc` (a node run as a process).
pub async fn issue_at(grpc: &str) -> Creds {
    Client::connect(format!("http://{grpc}"))
        .await
        .expect("control plane answers")
        .issue(None, NO_CHANNELS)
        .await
        .expect("IssueConnection")
        .into()
}

/// Connects a socket to the client plane at `http` (a node run as a process).
pub async fn connect_at(http: &str, creds: &Creds) -> Ws {
    let url = format!(
        "ws://{http}/ws?socket_connection_id={}&socket_key={}",
        creds.id, creds.key
    );
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("handshake accepted");
    Ws { ws }
}

/// Connects to the client plane at `http` with the `recover` parameter (see
/// [`Gateway::connect_recovering`]); on refusal returns the HTTP status.
pub async fn connect_recovering_at(http: &str, creds: &Creds, recover: &Value) -> Result<Ws, u16> {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("socket_connection_id", &creds.id)
        .append_pair("socket_key", &creds.key)
        .append_pair("recover", &recover.to_string())
        .finish();
    let request = format!("ws://{http}/ws?{query}")
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => Ok(Ws { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("handshake failed without an HTTP answer: {err}"),
    }
}

/// Namespace settings that keep presence for the channels of `namespace` (`namespace:*`).
pub fn keep_presence(namespace: &str) -> channelgate::config::Namespaces {
    let policy = channelgate::config::NamespacePolicy {
        presence: true,
        ..Default::default()
    };
    channelgate::config::Namespaces([(namespace.to_owned(), policy)].into())
}

pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        secret: Some("integration-test-secret-0123456789".into()),
        ..Config::default()
    }
}

impl Gateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config();
        adjust(&mut config);
        let listeners = Listeners::bind(&config).await.expect("bind");
        let http = listeners.client.local_addr().unwrap();
        let grpc = listeners.grpc.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(channelgate::run(
            listeners,
            config,
            stop.clone().cancelled_owned(),
        ));
        let control = ControlClient::connect(format!("http://{grpc}"))
            .await
            .expect("control plane answers");
        let client = Client::connect(format!("http://{grpc}"))
            .await
            .expect("control plane answers");
        Self {
            http,
            grpc,
            control,
            client,
            stop,
            task: Some(task),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    pub fn control(&self) -> ControlClient<Channel> {
        self.control.clone()
    }

    pub async fn issue(&self) -> Creds {
        self.issue_ttl(0).await
    }

    pub async fn issue_ttl(&self, ttl_ms: u64) -> Creds {
        let ttl = (ttl_ms != 0).then(|| Duration::from_millis(ttl_ms));
        self.client
            .issue(ttl, NO_CHANNELS)
            .await
            .expect("IssueConnection")
            .into()
    }

    pub async fn subscribe(&self, creds: &Creds, channels: &[&str]) -> bool {
        self.client
            .subscribe(&creds.digest, channels)
            .await
            .expect("Subscribe")
    }

    pub async fn unsubscribe(&self, creds: &Creds, channels: &[&str]) {
        self.client
            .unsubscribe(&creds.digest, channels)
            .await
            .expect("Unsubscribe");
    }

    /// Pushes `json` to `channel`; returns how many sockets it was queued to.
    pub async fn push(&self, channel: &str, json: &str) -> u64 {
        self.client.push(&[channel], json).await.expect("Push")
    }

    pub async fn stats(&self) -> pb::StatsResponse {
        self.client.stats(false, NO_CHANNELS).await.expect("Stats")
    }

    /// Waits until the node reports `n` live sockets.
    pub async fn wait_for_connections(&self, n: u64) {
        wait_until(|| async { self.stats().await.connections == n }).await;
    }

    /// Issues credentials, subscribes them to `channels` and connects a socket.
    pub async fn subscriber(&self, channels: &[&str]) -> (Creds, Ws) {
        let creds = self.issue().await;
        if !channels.is_empty() {
            self.subscribe(&creds, channels).await;
        }
        let ws = self.connect(&creds).await;
        (creds, ws)
    }

    /// Connects with the key in the query string.
    pub async fn connect(&self, creds: &Creds) -> Ws {
        self.try_connect(creds).await.expect("handshake accepted")
    }

    /// Connects with credentials whose socket just dropped on another node: the handshake is
    /// refused (403, in use) until that node recorded the drop in Redis; retried until then.
    pub async fn connect_once_free(&self, creds: &Creds) -> Ws {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.try_connect(creds).await {
                    Ok(ws) => return ws,
                    Err(403) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(status) => panic!("handshake refused with {status}"),
                }
            }
        })
        .await
        .expect("the drop was recorded in time")
    }

    pub async fn try_connect(&self, creds: &Creds) -> Result<Ws, u16> {
        let url = format!(
            "{}?socket_connection_id={}&socket_key={}",
            self.ws_url(),
            creds.id,
            creds.key
        );
        self.connect_request(url.into_client_request().unwrap())
            .await
    }

    /// Connects asking for positions and recovery: `recover` is the handshake's `recover`
    /// parameter (`{}` for none yet), through the client plane at `via` (a proxy) or this
    /// node's.
    pub async fn connect_recovering(
        &self,
        creds: &Creds,
        recover: &Value,
        via: Option<SocketAddr>,
    ) -> Result<Ws, u16> {
        connect_recovering_at(&via.unwrap_or(self.http).to_string(), creds, recover).await
    }

    /// Runs a handshake; on refusal returns the HTTP status.
    pub async fn connect_request(
        &self,
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Ws, u16> {
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, response)) => {
                assert_eq!(response.status(), 101);
                Ok(Ws { ws })
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(err) => panic!("handshake failed without an HTTP answer: {err}"),
        }
    }

    /// Sends `request` as it is to the client plane and returns everything the node answers
    /// until it closes the connection (or PATIENCE).
    pub async fn raw_http(&self, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.http).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await;
        String::from_utf8_lossy(&response).into_owned()
    }

    /// Sends a raw HTTP/1.1 request to the client plane; returns the status and body.
    pub async fn http_get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.http).await.unwrap();
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.http
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
            .await
            .expect("HTTP answer in time")
            .unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Drains the node as a signal would, and waits for `run` to return.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("drained in time")
                .expect("run task")
                .expect("run returned Ok");
        }
    }

    /// Starts draining without waiting.
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The next event of a `Listen` stream, failing the test after [`PATIENCE`].
pub async fn next_event(events: &mut tonic::Streaming<pb::ListenEvent>) -> pb::ListenEvent {
    tokio::time::timeout(PATIENCE, events.message())
        .await
        .expect("a Listen event in time")
        .expect("the Listen stream is fine")
        .expect("the Listen stream goes on")
}

/// Polls `condition` until it holds, failing the test after [`PATIENCE`].
pub async fn wait_until<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A WebSocket client.
pub struct Ws {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// The next message that is not a ping or pong.
    pub async fn next_message(&mut self) -> Option<Message> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(m)) => return Some(m),
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("a message in time")
    }

    /// The next text frame, parsed.
    pub async fn recv_json(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(t)) => serde_json::from_str(&t).expect("JSON text frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next frame's payload, for a push: `(channel, payload)`.
    pub async fn recv_push(&mut self) -> (String, Value) {
        let v = self.recv_json().await;
        assert!(v.get("id").is_none(), "expected a push, got a reply: {v}");
        (
            v["channel"].as_str().unwrap().to_owned(),
            v["payload"].clone(),
        )
    }

    /// The first frame of a socket that asked for positions: `{"connected":{..}}`'s inside.
    pub async fn connected(&mut self) -> Value {
        let v = self.recv_json().await;
        assert!(
            v.get("connected").is_some(),
            "expected the connected frame, got {v}"
        );
        v["connected"].clone()
    }

    /// The next push: `(offset, payload)`; panics on anything else.
    pub async fn recv_offset(&mut self) -> (u64, Value) {
        let v = self.recv_json().await;
        let offset = v["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("expected a push with an offset, got {v}"));
        (offset, v["payload"].clone())
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends a client message and returns the reply.
    pub async fn request(&mut self, message: Value) -> Value {
        self.send_text(&message.to_string()).await;
        self.recv_json().await
    }

    /// Reads until the server's close frame, skipping anything before it, and completes the
    /// closing handshake as a browser would.
    pub async fn expect_close(&mut self) -> CloseFrame {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        // Polling on sends tungstenite's reply and sees the end of the stream.
                        while let Some(Ok(_)) = self.ws.next().await {}
                        return frame;
                    }
                    Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                    Some(Ok(_)) => continue,
                    other => panic!("stream ended without a close frame: {other:?}"),
                }
            }
        })
        .await
        .expect("a close frame in time")
    }

    /// Closes cleanly (close frame, then wait for the server's).
    pub async fn close(self) {
        self.close_with(1000).await;
    }

    /// Closes cleanly with `code`.
    pub async fn close_with(mut self, code: u16) {
        self.ws
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: "bye".into(),
            }))
            .await
            .expect("close");
        while let Some(Ok(_)) = self.ws.next().await {}
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_unclean(self) {
        drop(self.ws);
    }
}

pub fn code(frame: &CloseFrame) -> u16 {
    u16::from(frame.code)
}

/// A small application upstream for `call-route`, on a real socket:
/// * `/echo` (any method): JSON of what arrived (method, path, query, headers, body);
/// * `/text`: `text/plain` "hello";
/// * `/redirect`: 302 to `/elsewhere`;
/// * `/missing`: 404 with a JSON body;
/// * `/slow`: answers after 5 s;
/// * `/hold`: answers when the returned `Notify` is notified (one permit per request).
pub struct Upstream {
    pub addr: SocketAddr,
    pub release: std::sync::Arc<tokio::sync::Semaphore>,
    pub held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

pub async fn spawn_upstream() -> Upstream {
    use http_body_util::{BodyExt, Full};
    use hyper::{server::conn::http1, service::service_fn, Response};
    use hyper_util::rt::TokioIo;
    use std::sync::{atomic::Ordering, Arc};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (release2, held2) = (release.clone(), held.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (release, held) = (release2.clone(), held2.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (release, held) = (release.clone(), held.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let header = |name: &str| {
                            parts
                                .headers
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_owned())
                        };
                        let json = |status: u16, v: Value| {
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json; charset=utf-8")
                                .header("x-upstream", "yes")
                                .body(Full::new(bytes::Bytes::from(v.to_string())))
                                .unwrap()
                        };
                        let response = match parts.uri.path() {
                            "/echo" => json(
                                200,
                                serde_json::json!({
                                    "method": parts.method.as_str(),
                                    "path": parts.uri.path(),
                                    "query": parts.uri.query(),
                                    "cookie": header("cookie"),
                                    "connection_id": header("x-socket-connection-id"),
                                    "digest": header("x-socket-digest"),
                                    "content_type": header("content-type"),
                                    "body": String::from_utf8_lossy(&body),
                                }),
                            ),
                            "/text" => Response::builder()
                                .header("content-type", "text/plain")
                                .body(Full::new(bytes::Bytes::from_static(b"hello")))
                                .unwrap(),
                            "/redirect" => Response::builder()
                                .status(302)
                                .header("location", "/elsewhere")
                                .body(Full::new(bytes::Bytes::new()))
                                .unwrap(),
                            "/missing" => json(404, serde_json::json!({"error": "no such thing"})),
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(5)).await;
                                json(200, serde_json::json!("late"))
                            }
                            "/hold" => {
                                held.fetch_add(1, Ordering::SeqCst);
                                release.acquire().await.unwrap().forget();
                                json(200, serde_json::json!("released"))
                            }
                            _ => json(500, serde_json::json!("unknown test route")),
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        release,
        held,
    }
}

/// Runs the real binary as `channelgate serve` on port 0 with `extra` arguments; returns the
/// process and the client-plane and control-plane addresses it logged.
pub fn spawn_binary(extra: &[&str]) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_channelgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--grpc-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(extra)
        .env("CHANNELGATE_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start channelgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep reading to the end: a closed pipe would make the node's later log writes fail.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut http, mut grpc) = (None, None);
    while http.is_none() || grpc.is_none() {
        let line = rx
            .recv_timeout(PATIENCE)
            .expect("the node logs its addresses");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let message = v["fields"]["message"].as_str().unwrap_or("");
        let addr = v["fields"]["addr"].as_str().map(str::to_owned);
        if message.starts_with("client plane listening") {
            http = addr;
        } else if message.starts_with("control plane listening") {
            grpc = addr;
        }
    }
    (child, http.unwrap(), grpc.unwrap())
}

/// A test CA and certificates it signs.
pub struct TestPki {
    pub dir: std::path::PathBuf,
}

impl TestPki {
    pub fn new() -> Self {
        Self::in_dir(&format!("{}", std::process::id()))
    }

    /// A fresh CA in its own directory (`tag` keeps directories apart), with `server` and
    /// `client` certificates.
    pub fn in_dir(tag: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = std::env::temp_dir().join(format!(
            "channelgate-pki-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
            ),
            ("client", vec!["app".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy to `target` whose open connections `cut` closes (no WebSocket close frame: to
/// both ends it looks like the network failed); `retarget` sends new connections elsewhere, as
/// a load balancer does when a node leaves.
pub struct Proxy {
    pub addr: SocketAddr,
    generation: std::sync::Arc<parking_lot::Mutex<CancellationToken>>,
    target: std::sync::Arc<parking_lot::Mutex<SocketAddr>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = std::sync::Arc::new(parking_lot::Mutex::new(CancellationToken::new()));
        let target = std::sync::Arc::new(parking_lot::Mutex::new(target));
        let (current, to) = (generation.clone(), target.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let cut = current.lock().clone();
                let target = *to.lock();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            generation,
            target,
        }
    }

    pub fn cut(&self) {
        let old = std::mem::replace(&mut *self.generation.lock(), CancellationToken::new());
        old.cancel();
    }

    /// New connections go to `target` from now on; open ones stay where they are.
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock() = target;
    }
}

/// A TCP proxy to `target` that can stop forwarding bytes (both ways) while the connections
/// stay open, as a network that drops packets does, and start again.
pub struct Valve {
    pub addr: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
}

impl Valve {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, watch) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(Self::pipe(ri, wo, watch.clone()));
                tokio::spawn(Self::pipe(ro, wi, watch.clone()));
            }
        });
        Self { addr, open }
    }

    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut open: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // Hold what came while closed; pass it on when open again.
            if open.wait_for(|open| *open).await.is_err() {
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// Stops (`false`) or resumes (`true`) forwarding.
    pub fn set_open(&self, open: bool) {
        let _ = self.open.send(open);
    }
}
