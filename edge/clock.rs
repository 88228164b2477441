//! The node's two clocks, both read through tokio's time so that a test on paused time
//! (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`) moves every deadline the
//! node keeps: credential expiry, the reconnect grace, idle sockets, presence leave delays,
//! history ages, idempotency windows and the rate buckets.
//!
//! * [`now_ms`] is Unix time in milliseconds: what crosses the node (credential expiry, grace
//!   deadlines and timestamps kept in Redis). On a running clock it is the system's; on paused
//!   time it is the system's at the pause plus what the test advanced.
//! * [`monotonic_ms`] never goes back: what stays in the node (when a socket was last heard).
//! * Instants are `tokio::time::Instant`.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The current Unix time in milliseconds (see the module's docs for paused time).
pub(crate) fn now_ms() -> u64 {
    // Read tokio's clock first: on a running clock the system's monotonic one is then at or
    // after it, and the skew below is under a millisecond.
    let tokio_now = Instant::now().into_std();
    let real = std::time::Instant::now();
    let system = SystemTime::now();
    let wall = if tokio_now >= real {
        system.checked_add(tokio_now.duration_since(real))
    } else {
        system.checked_sub(real.duration_since(tokio_now))
    };
    wall.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on a monotonic clock that starts with the process.
pub(crate) fn monotonic_ms() -> u64 {
    static EPOCH: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    Instant::now()
        .into_std()
        .saturating_duration_since(*EPOCH)
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_both_clocks_by_what_was_advanced_and_no_more() {
        let (wall, mono) = (now_ms(), monotonic_ms());
        tokio::time::advance(Duration::from_secs(3600)).await;
        let (wall2, mono2) = (now_ms(), monotonic_ms());
        // Two readings, each truncated to milliseconds: a boundary may fall between them.
        assert!(
            (3_599_999..3_600_050).contains(&(wall2 - wall)),
            "{}",
            wall2 - wall
        );
        assert!(
            (3_599_999..3_600_050).contains(&(mono2 - mono)),
            "{}",
            mono2 - mono
        );
    }

    #[test]
    fn a_running_clock_is_the_systems() {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        assert!(now_ms().abs_diff(system) < 50);
    }
}
