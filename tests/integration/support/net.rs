//! Networks that fail on purpose: a TCP proxy that cuts or moves connections, and one that
//! stops forwarding bytes.

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

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
