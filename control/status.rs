//! The one place where edge errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::BadChannel(_)
            | Error::NoChannels
            | Error::TooManyChannels { .. }
            | Error::BadDigest(_)
            | Error::BadJson(_)
            | Error::BadClose
            | Error::BadTtl { .. } => Code::InvalidArgument,
            Error::PayloadTooLarge { .. } => Code::ResourceExhausted,
            Error::UnknownDigest => Code::NotFound,
            Error::ShuttingDown | Error::ClusterUnavailable(_) => Code::Unavailable,
            Error::WeakSecret(_)
            | Error::BadUpstream(_)
            | Error::ClusterNeedsSecret
            | Error::Io { .. } => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}
