//! The control plane's accepted connections, bounded: at most `grpc-max-connections` at once.
//! A connection past the bound is closed as soon as it is accepted (counted in
//! `channelgate_refused_connections_total{reason="grpc_connections"}` and logged), so a client
//! retries or goes to another node instead of waiting in the kernel's backlog; each accepted
//! one holds its permit until it closes.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use edge::Gateway;

/// An accepted control-plane connection and its share of the bound.
#[derive(Debug)]
pub(crate) struct Bounded {
    io: TcpStream,
    /// Given back when the connection closes (the server drops its IO then).
    _permit: OwnedSemaphorePermit,
}

/// `incoming`, with connections past `max` at once closed on arrival.
pub(crate) fn bounded(
    incoming: TcpIncoming,
    max: usize,
    gateway: Gateway,
) -> impl Stream<Item = io::Result<Bounded>> {
    let permits = Arc::new(Semaphore::new(max));
    incoming.filter_map(move |accepted| {
        let result = match accepted {
            Ok(io) => match permits.clone().try_acquire_owned() {
                Ok(permit) => Some(Ok(Bounded {
                    io,
                    _permit: permit,
                })),
                Err(_) => {
                    gateway.count_refused_connection("grpc_connections");
                    tracing::warn!(
                        peer = ?io.peer_addr().ok(),
                        max,
                        "control-plane connection refused: grpc-max-connections reached"
                    );
                    None
                }
            },
            Err(err) => Some(Err(err)),
        };
        std::future::ready(result)
    })
}

impl Connected for Bounded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    /// No, on purpose: h2 then copies every frame under 1 KiB into its write buffer instead of
    /// chaining payloads of 256 bytes and more as separate slices, and a chained payload ends
    /// the batch. A unary reply is HEADERS, one DATA frame of at least 512 bytes (padded,
    /// [`pad`](crate::pad)) and trailers: chained, they took two `writev` calls per call (the
    /// trailers alone in the second); copied, they go out in one write. Larger payloads are
    /// still written from their own buffer.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
