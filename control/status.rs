//! The one place where edge errors become gRPC statuses.

use tonic::{Code, Status};

use edge::{error::Error, gateway::MemberError};

/// The gRPC status of an edge error.
pub(crate) fn status(err: Error) -> Status {
    let code = match &err {
        Error::BadChannel(_)
        | Error::NoChannels
        | Error::TooManyChannels { .. }
        | Error::BadDigest(_)
        | Error::BadJson(_)
        | Error::BadClose
        | Error::BadIdempotencyKey { .. }
        | Error::BadUser { .. }
        | Error::BadUserInfo { .. }
        | Error::DigestOrUser
        | Error::BadTtl { .. } => Code::InvalidArgument,
        Error::PayloadTooLarge { .. } | Error::TooManyIdempotencyKeys { .. } => {
            Code::ResourceExhausted
        }
        Error::EpochChanged { .. } | Error::PresenceOff => Code::FailedPrecondition,
        Error::UnknownDigest => Code::NotFound,
        Error::ShuttingDown | Error::Unavailable(_) => Code::Unavailable,
    };
    Status::new(code, err.to_string())
}

/// The gRPC status of a `Handle` stream's mistake.
pub(crate) fn member(err: MemberError) -> Status {
    Status::invalid_argument(err.to_string())
}
