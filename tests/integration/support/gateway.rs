//! The node under test: `Gateway::start()` runs the real gateway (`channelgate::run`)
//! in-process on port 0, with a gRPC client and helpers that read like the scenario they drive;
//! credentials, and clients of a node run as a process.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tokio::{net::TcpStream, task::JoinHandle};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use channelgate::{
    client::{self, Client},
    config::Config,
    pb::{self, control_client::ControlClient},
    Listeners,
};

use super::{wait_until, Ws, PATIENCE};

pub struct Gateway {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    /// The generated client, for tests that probe the wire (status codes, raw requests).
    pub control: ControlClient<Channel>,
    /// The typed client (`channelgate::client`), which the scenario helpers use.
    pub client: Client,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), channelgate::error::RunError>>>,
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

    /// The value of the node's metric line that starts with `name` (labels included, if
    /// given); 0 when there is none.
    pub async fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.http_get("/metrics", &[]).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
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
