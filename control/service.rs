//! `impl pb::control_server::Control`: decode the request (through `convert`), call the
//! [`Gateway`], encode the answer. No logic of its own.

use edge::Gateway;
use futures_util::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    convert,
    handle::{self, BoxStream},
    pb,
    status::status,
};

/// The Control service over a node's [`Gateway`].
#[derive(Debug, Clone)]
pub(crate) struct ControlService {
    gateway: Gateway,
}

impl ControlService {
    /// A service driving `gateway`.
    pub(crate) fn new(gateway: Gateway) -> Self {
        Self { gateway }
    }

    fn push(&self, request: &pb::PushRequest) -> Result<u64, Status> {
        let channels = convert::channels(&request.channels)?;
        self.gateway.push(&channels, &request.json).map_err(status)
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn issue_connection(
        &self,
        request: Request<pb::IssueConnectionRequest>,
    ) -> Result<Response<pb::IssueConnectionResponse>, Status> {
        let r = request.get_ref();
        // Checked before minting, so a bad channel leaves no credentials behind.
        let channels = convert::channels(&r.channels)?;
        let creds = self
            .gateway
            .issue(convert::ttl(r.ttl_ms), &channels)
            .await
            .map_err(status)?;
        Ok(Response::new(creds.into()))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        let r = request.get_ref();
        let digest = convert::digest(&r.digest)?;
        let channels = convert::channels(&r.channels)?;
        let live = self
            .gateway
            .subscribe(&digest, &channels)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SubscribeResponse { live }))
    }

    async fn unsubscribe(
        &self,
        request: Request<pb::UnsubscribeRequest>,
    ) -> Result<Response<pb::UnsubscribeResponse>, Status> {
        let r = request.get_ref();
        let digest = convert::digest(&r.digest)?;
        let channels = convert::channels(&r.channels)?;
        let live = self
            .gateway
            .unsubscribe(&digest, &channels)
            .await
            .map_err(status)?;
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
            self.gateway.pace().await;
        }
        Ok(Response::new(pb::PushStreamResponse { pushes, queued }))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let r = request.get_ref();
        let digest = convert::digest(&r.digest)?;
        let channel = convert::channel(&r.channel)?;
        let queued = self
            .gateway
            .send(&digest, &channel, &r.json)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SendResponse { queued }))
    }

    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let r = request.into_inner();
        let digest = convert::digest(&r.digest)?;
        let close = convert::close(r.code, r.reason)?;
        let closed = self
            .gateway
            .disconnect(&digest, close)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DisconnectResponse { closed }))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let r = request.get_ref();
        let only = convert::channels(&r.channels)?;
        Ok(Response::new(
            self.gateway
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
        let listener = self.gateway.listen(&channels).await.map_err(status)?;
        Ok(Response::new(handle::listen(listener, &self.gateway)))
    }

    type HandleStream = BoxStream<pb::ClientMessage>;

    async fn handle(
        &self,
        request: Request<Streaming<pb::HandleRequest>>,
    ) -> Result<Response<Self::HandleStream>, Status> {
        let stream = handle::handle(&self.gateway, request.into_inner()).await?;
        Ok(Response::new(stream))
    }
}
