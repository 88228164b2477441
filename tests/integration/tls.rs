//! wss: the client plane over TLS, and a certificate reload on SIGHUP that keeps live sockets.

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_tungstenite::{client_async, tungstenite::client::IntoClientRequest};

use crate::support::{wait_until, Creds, Gateway, TestPki};

/// Opens a wss socket, trusting only `ca_pem`. `Err` when TLS or the handshake fails.
async fn wss_connect(
    gw: &Gateway,
    ca_pem: &[u8],
    creds: &Creds,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>, String>
{
    use rustls_pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(gw.http)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!(
        "wss://localhost:{}/ws?socket_connection_id={}&socket_key={}",
        gw.http.port(),
        creds.id,
        creds.key
    );
    let (ws, _) = client_async(url.into_client_request().unwrap(), tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn next_frame<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
) -> tokio_tungstenite::tungstenite::Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    tokio::time::timeout(crate::support::PATIENCE, ws.next())
        .await
        .expect("a frame in time")
        .expect("stream open")
        .expect("a valid frame")
}

#[tokio::test]
async fn wss_works_and_a_sighup_reload_keeps_live_sockets() {
    let first = TestPki::in_dir("wss-a");
    let second = TestPki::in_dir("wss-b");
    // The node reads its certificate from files that the reload will overwrite.
    let live = TestPki::in_dir("wss-live");
    std::fs::copy(first.path("server.pem"), live.path("server.pem")).unwrap();
    std::fs::copy(first.path("server.key"), live.path("server.key")).unwrap();
    let (cert, key) = (live.path("server.pem"), live.path("server.key"));
    let gw = Gateway::start_with(move |c| (c.tls_cert, c.tls_key) = (Some(cert), Some(key))).await;

    let creds = gw.issue().await;
    gw.subscribe(&creds, &["secure"]).await;
    let mut ws = wss_connect(&gw, &first.read("ca.pem"), &creds)
        .await
        .expect("wss with the first CA");
    gw.push("secure", "1").await;
    let frame = next_frame(&mut ws).await;
    assert_eq!(
        frame.to_text().unwrap(),
        r#"{"channel":"secure","offset":1,"payload":1}"#
    );

    // New certificate on disk, then SIGHUP: new handshakes see it.
    std::fs::copy(second.path("server.pem"), live.path("server.pem")).unwrap();
    std::fs::copy(second.path("server.key"), live.path("server.key")).unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until(|| async {
        let fresh = gw.issue().await;
        wss_connect(&gw, &second.read("ca.pem"), &fresh)
            .await
            .is_ok()
    })
    .await;
    let fresh = gw.issue().await;
    assert!(
        wss_connect(&gw, &first.read("ca.pem"), &fresh)
            .await
            .is_err(),
        "old certificate still served"
    );

    // The socket opened before the reload is still live.
    gw.push("secure", "2").await;
    let frame = next_frame(&mut ws).await;
    assert_eq!(
        frame.to_text().unwrap(),
        r#"{"channel":"secure","offset":2,"payload":2}"#
    );
}
