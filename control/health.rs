//! The standard gRPC health service (`grpc.health.v1.Health`), answered from the node's one
//! readiness, the same that `/readyz` answers: `SERVING` when the node takes traffic,
//! `NOT_SERVING` before it is ready, while it drains, while Redis is unreachable or stalled.
//!
//! `Check` reads the readiness at the call, so a probe and `/readyz` never disagree; `Watch`
//! sends the status at once and again at every change, until the node halts. The services
//! known are `""` (the whole server) and `channelgate.v1.Control`; any other is `NOT_FOUND`
//! for `Check` and `SERVICE_UNKNOWN` for `Watch`, as the health protocol says.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_server::Health, HealthCheckRequest,
    HealthCheckResponse,
};

/// The services whose health the node reports.
const SERVICES: &[&str] = &["", "channelgate.v1.Control"];

/// `grpc.health.v1.Health`, from the gateway's readiness.
#[derive(Debug)]
pub(crate) struct HealthService {
    gateway: edge::Gateway,
}

impl HealthService {
    pub(crate) fn new(gateway: edge::Gateway) -> Self {
        Self { gateway }
    }
}

fn response(ready: &Result<(), edge::error::NotReady>) -> HealthCheckResponse {
    let status = match ready {
        Ok(()) => ServingStatus::Serving,
        Err(_) => ServingStatus::NotServing,
    };
    HealthCheckResponse {
        status: status as i32,
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = &request.get_ref().service;
        if !SERVICES.contains(&service.as_str()) {
            return Err(Status::not_found(format!("unknown service {service:?}")));
        }
        Ok(Response::new(response(&self.gateway.readiness())))
    }

    type WatchStream = StatusStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let halted = self.gateway.halted();
        if !SERVICES.contains(&request.get_ref().service.as_str()) {
            let unknown = HealthCheckResponse {
                status: ServingStatus::ServiceUnknown as i32,
            };
            // Sent once; the call stays open until the node halts, as the protocol asks.
            let stream = futures_util::stream::once(async move { Ok(unknown) })
                .chain(futures_util::stream::pending())
                .take_until(halted);
            return Ok(Response::new(Box::pin(stream)));
        }
        // The status now, then one message per change of status (a changed reason alone is
        // no new message).
        let mut last = None;
        let stream = WatchStream::new(self.gateway.readiness_changes())
            .filter_map(move |ready| {
                let status = response(&ready);
                let new = last != Some(status.status);
                last = Some(status.status);
                std::future::ready(new.then_some(Ok(status)))
            })
            .take_until(halted);
        Ok(Response::new(Box::pin(stream)))
    }
}
