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

    /// The gateway it drives.
    pub(crate) fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Submits one push of a request; the ticket resolves to its outcome.
    async fn submit(&self, request: &pb::PushRequest) -> Result<edge::gateway::PushTicket, Status> {
        let channels = convert::channels(&request.channels)?;
        let key = convert::idempotency_key(&request.idempotency_key);
        self.gateway
            .submit(&channels, &request.json, key)
            .await
            .map_err(status)
    }
}

/// Pushes of one `PushStream` submitted and not yet resolved: a publisher keeps this many in
/// flight (one round trip to Redis covers many in cluster mode).
const PUSH_STREAM_IN_FLIGHT: usize = 256;

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn issue_connection(
        &self,
        request: Request<pb::IssueConnectionRequest>,
    ) -> Result<Response<pb::IssueConnectionResponse>, Status> {
        let r = request.get_ref();
        // Checked before minting, so a bad channel leaves no credentials behind.
        let channels = convert::channels(&r.channels)?;
        let user = convert::user(&r.user, &r.info_json)?;
        let creds = self
            .gateway
            .issue(convert::ttl(r.ttl_ms), &channels, user.as_ref())
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
        let pushed = self
            .submit(request.get_ref())
            .await?
            .await
            .map_err(status)?;
        Ok(Response::new(pushed.into()))
    }

    async fn push_stream(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushStreamResponse>, Status> {
        let mut stream = request.into_inner();
        let mut summary = convert::StreamSummary::default();
        let mut in_flight = std::collections::VecDeque::new();
        let failed = |n: u64, status: Status| {
            Status::new(
                status.code(),
                format!("push {n} of the stream: {}", status.message()),
            )
        };
        while let Some(push) = stream.next().await {
            let push = push?;
            let n = summary.pushes + in_flight.len() as u64 + 1;
            in_flight.push_back(self.submit(&push).await.map_err(|s| failed(n, s))?);
            if in_flight.len() >= PUSH_STREAM_IN_FLIGHT {
                if let Some(ticket) = in_flight.pop_front() {
                    let n = summary.pushes + 1;
                    summary.add(ticket.await.map_err(|e| failed(n, status(e)))?);
                }
            }
            // Flow control: while the node's writers are far behind, take the next push a
            // little later (HTTP/2 then holds the publisher back) instead of queueing more.
            self.gateway.pace().await;
        }
        while let Some(ticket) = in_flight.pop_front() {
            let n = summary.pushes + 1;
            summary.add(ticket.await.map_err(|e| failed(n, status(e)))?);
        }
        Ok(Response::new(summary.into()))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let r = request.into_inner();
        let channel = convert::channel(&r.channel)?;
        let page = self
            .gateway
            .history(&channel, convert::history_query(&r))
            .await
            .map_err(status)?;
        Ok(Response::new(convert::history_page(page)))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let r = request.get_ref();
        let channel = convert::channel(&r.channel)?;
        if convert::addresses_user(&r.digest, &r.user)? {
            let connections = self
                .gateway
                .send_user(&r.user, &channel, &r.json)
                .await
                .map_err(status)?;
            return Ok(Response::new(pb::SendResponse {
                queued: connections > 0,
                connections,
            }));
        }
        let digest = convert::digest(&r.digest)?;
        let queued = self
            .gateway
            .send(&digest, &channel, &r.json)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::SendResponse {
            queued,
            connections: u64::from(queued),
        }))
    }

    async fn disconnect(
        &self,
        request: Request<pb::DisconnectRequest>,
    ) -> Result<Response<pb::DisconnectResponse>, Status> {
        let r = request.into_inner();
        let close = convert::close(r.code, r.reason)?;
        if convert::addresses_user(&r.digest, &r.user)? {
            let connections = self
                .gateway
                .disconnect_user(&r.user, close)
                .await
                .map_err(status)?;
            return Ok(Response::new(pb::DisconnectResponse {
                closed: connections > 0,
                connections,
            }));
        }
        let digest = convert::digest(&r.digest)?;
        let closed = self
            .gateway
            .disconnect(&digest, close)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DisconnectResponse {
            closed,
            connections: u64::from(closed),
        }))
    }

    async fn presence(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceResponse>, Status> {
        let channel = convert::channel(&request.get_ref().channel)?;
        let members = self.gateway.presence(&channel).await.map_err(status)?;
        Ok(Response::new(pb::PresenceResponse {
            members: members.into_iter().map(convert::member).collect(),
        }))
    }

    async fn presence_stats(
        &self,
        request: Request<pb::PresenceRequest>,
    ) -> Result<Response<pb::PresenceStatsResponse>, Status> {
        let channel = convert::channel(&request.get_ref().channel)?;
        let (connections, users) = self
            .gateway
            .presence_stats(&channel)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PresenceStatsResponse {
            connections,
            users,
        }))
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
        let r = request.get_ref();
        let channels = convert::channels(&r.channels)?;
        let since = convert::since(&r.since)?;
        let wants = convert::wants(r)?;
        let listener = self
            .gateway
            .listen(&channels, &since, wants)
            .await
            .map_err(status)?;
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
