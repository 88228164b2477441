//! Rate limits: a token bucket, used per socket (client messages: [`MessageLimit`]) and per
//! client address (handshakes).

use tokio::time::Instant;

/// `rate` tokens per second, holding at most `burst`. A rate of 0 allows everything.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The bucket's burst size.
    pub(crate) fn burst(&self) -> f64 {
        self.burst
    }

    /// When the bucket was last used.
    pub(crate) fn last_used(&self) -> Instant {
        self.at
    }
}

/// The per-socket message limit: a token bucket, and a count of refusals in a row (a
/// burst's worth of them closes the socket).
#[derive(Debug)]
pub(crate) struct MessageLimit {
    bucket: TokenBucket,
    refused_in_a_row: u32,
}

/// What a message gets of its socket's limit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// It goes on.
    Allowed,
    /// A 429 reply.
    Refused,
    /// A burst's worth of refusals in a row: the socket is closed.
    Abusive,
}

impl MessageLimit {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            bucket: TokenBucket::new(rate, burst, Instant::now()),
            refused_in_a_row: 0,
        }
    }

    pub(crate) fn take(&mut self, now: Instant) -> Take {
        if self.bucket.take(now) {
            self.refused_in_a_row = 0;
            return Take::Allowed;
        }
        self.refused_in_a_row += 1;
        if f64::from(self.refused_in_a_row) >= self.bucket.burst() {
            Take::Abusive
        } else {
            Take::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10, 3, start);
        assert!((0..3).all(|_| b.take(start)));
        assert!(!b.take(start));
        assert!(b.take(start + Duration::from_millis(100)));
        assert!(!b.take(start + Duration::from_millis(100)));
        let mut open = TokenBucket::new(0, 0, start);
        assert!((0..1000).all(|_| open.take(start)));
    }

    #[test]
    fn refusals_in_a_row_close_an_abuser_and_a_token_resets_the_streak() {
        let mut limit = MessageLimit::new(10, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limit.take(start), Take::Allowed);
        }
        assert_eq!(limit.take(start), Take::Refused);
        assert_eq!(limit.take(start), Take::Refused);
        let later = start + Duration::from_millis(100);
        assert_eq!(limit.take(later), Take::Allowed);
        assert_eq!(limit.take(later), Take::Refused);
        assert_eq!(limit.take(later), Take::Refused);
        assert_eq!(limit.take(later), Take::Abusive);
    }
}
