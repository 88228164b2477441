//! `impl pb::control_server::Control`: decode the request (through `convert`), call the
//! registry, encode the answer. No logic of its own.

use futures_util::StreamExt;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};

use super::{
    convert,
    handle::{self, BoxStream},
};
use crate::{bus::Bus, handlers::Handlers, pb};

/// The Control service over a node's registry and handlers.
#[derive(Debug, Clone)]
pub struct ControlService {
    bus: Bus,
    handlers: Handlers,
    /// Ends the streaming calls when the node halts.
    halt: CancellationToken,
    /// Tracks the tasks the streaming calls spawn.
    tracker: TaskTracker,
}

impl ControlService {
    /// A service driving `bus` and `handlers`.
    pub fn new(
        bus: Bus,
        handlers: Handlers,
        halt: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            bus,
            handlers,
            halt,
            tracker,
        }
    }

    fn push(&self, request: &pb::PushRequest) -> Result<u64, Status> {
        let channels = convert::channels(&request.channels)?;
        Ok(self.bus.push(&channels, &request.json)?)
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn issue_connection(
        &self,
        request: Request<pb::IssueConnectionRequest>,
    ) -> Result<Response<pb::IssueConnectionResponse>, Status> {
        let r = request.get_ref();
        let ttl = convert::ttl(r.ttl_ms);
        // Checked before minting, so a bad channel leaves no credentials behind.
        let channels = convert::channels(&r.channels)?;
        let creds = self.bus.issue(ttl).await?;
        if !channels.is_empty() {
            self.bus.subscribe(&creds.digest, &channels).await?;
        }
        Ok(Response::new(creds.into()))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        let r = request.get_ref();
        let digest = convert::digest(&r.digest)?;
        let channels = convert::channels(&r.channels)?;
        let live = self.bus.subscribe(&digest, &channels).await?;
        Ok(Response::new(pb::SubscribeResponse { live }))
    }

    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        let r = request.get_ref();
        let digest = convert::digest(&r.digest)?;
        let channels = convert::channels(&r.channels)?;
        let live = self.bus.unsubscribe(&digest, &channels).await?;
        Ok(Response::new(pb::UnsubscribeResponse { live }))
    }

    async fn push(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let queued = self.push(request.get_ref())?;
        Ok(Response::new(pb::PushResponse { queued }))
    }

    async fn push_stream(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushStreamResponse>, Status> {
        let mut stream = request.into_inner();
        let (mut pushes, mut queued) = (0u64, 0u64);
        while let Some(push) = stream.next().await {
            let push = push?;
            queued += self.push(&push).map_err(|status| {
                Status::new(
                    status.code(),
                    format!("push {} of the stream: {}", pushes + 1, status.message()),
                )
            })?;
            pushes += 1;
            // Flow control: while the node's writers are far behind, take the next push a
            // little later (HTTP/2 then holds the publisher back) instead of queueing more.
            self.bus.registry().backlog().pace().await;
        }
        Ok(Response::new(pb::PushStreamResponse { pushes, queued }))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let r = request.get_ref();
        let digest = convert::digest(&r.digest)?;
        let channel = convert::channels(std::slice::from_ref(&r.channel))?.remove(0);
        let queued = self.bus.send(&digest, &channel, &r.json).await?;
        Ok(Response::new(pb::SendResponse { queued }))
    }

    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let r = request.into_inner();
        let digest = convert::digest(&r.digest)?;
        let close = convert::close(r.code, r.reason)?;
        let closed = self.bus.disconnect(&digest, close).await?;
        Ok(Response::new(pb::DisconnectResponse { closed }))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let r = request.get_ref();
        let only = convert::channels(&r.channels)?;
        Ok(Response::new(
            self.bus
                .registry()
                .stats(r.per_channel || !only.is_empty(), &only)
                .into(),
        ))
    }

    type ListenStream = BoxStream<pb::ListenEvent>;

    async fn listen(
        &self,
        request: Request<pb::ListenRequest>,
    ) -> Result<Response<Self::ListenStream>, Status> {
        let channels = convert::channels(&request.get_ref().channels)?;
        let listener = self.bus.listen(&channels).await?;
        Ok(Response::new(handle::listen(listener, self.halt.clone())))
    }

    type HandleStream = BoxStream<pb::ClientMessage>;

    async fn handle(
        &self,
        request: Request<Streaming<pb::HandleRequest>>,
    ) -> Result<Response<Self::HandleStream>, Status> {
        let stream = handle::handle(
            &self.handlers,
            request.into_inner(),
            self.halt.clone(),
            &self.tracker,
        )
        .await?;
        Ok(Response::new(stream))
    }
}
