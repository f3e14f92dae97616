//! Per-connection rate limiting: one token bucket for `join`, `send`, `direct`,
//! `history`, `presence` and `typing`, which frames that fail to parse also draw
//! from, and `ping` and `leave` at a tenth of a token (never refused, but a flood
//! of them is persistent abuse).
//!
//! Owns: the bucket arithmetic and the "still over the limit after 5 s of refusals"
//! rule. Must not: send anything; the session turns a [`Verdict`] into replies.

use std::time::{Duration, Instant};

/// How long a connection may keep being refused before it is closed with 4029.
pub const PERSISTENT_ABUSE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Refused,
    /// Refused, and refusals have gone on for [`PERSISTENT_ABUSE`]: close the connection.
    Close,
}

/// A token bucket: `rate` tokens per second, holding at most `2 x rate`, starting full.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// When the current episode of refusals began. An episode lasts while refusals
    /// keep coming less than [`EPISODE_GAP`] apart; allowed commands in between (the
    /// tokens that trickle in) do not end it, or a steady flooder would never be closed.
    refusing_since: Option<Instant>,
    last_refusal: Option<Instant>,
}

/// A pause this long without refusals ends an abuse episode.
pub const EPISODE_GAP: Duration = Duration::from_secs(1);

impl TokenBucket {
    pub fn new(rate_per_sec: u32, now: Instant) -> Self {
        let rate = f64::from(rate_per_sec.max(1));
        TokenBucket {
            rate,
            burst: 2.0 * rate,
            tokens: 2.0 * rate,
            last: now,
            refusing_since: None,
            last_refusal: None,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        self.check_cost(now, 1.0)
    }

    /// Take `tokens` for something already done (a large reply): the bucket may
    /// go into debt down to minus its burst, and refuses until it is paid back.
    pub fn charge(&mut self, now: Instant, tokens: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens =
            ((self.tokens + elapsed * self.rate).min(self.burst) - tokens).max(-self.burst);
    }

    /// [`TokenBucket::check`] for something that costs `cost` tokens (a fraction
    /// for the frames the protocol does not limit, so that only a flood of them
    /// empties the bucket).
    pub fn check_cost(&mut self, now: Instant, cost: f64) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            return Verdict::Allowed;
        }
        let episode_over = self
            .last_refusal
            .is_none_or(|last| now.saturating_duration_since(last) >= EPISODE_GAP);
        if episode_over {
            self.refusing_since = Some(now);
        }
        self.last_refusal = Some(now);
        let since = self.refusing_since.unwrap_or(now);
        if now.saturating_duration_since(since) >= PERSISTENT_ABUSE {
            Verdict::Close
        } else {
            Verdict::Refused
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenth_of_a_token_allows_ten_times_as_many() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, t0);
        for _ in 0..100 {
            assert_eq!(b.check_cost(t0, 0.1), Verdict::Allowed);
        }
        assert_eq!(b.check_cost(t0, 0.1), Verdict::Refused);
    }

    #[test]
    fn a_charge_puts_the_bucket_in_debt_until_it_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        b.charge(t0, 25.0); // 20 - 25 = -5
        assert_eq!(b.check(t0 + Duration::from_millis(500)), Verdict::Refused);
        assert_eq!(b.check(t0 + Duration::from_millis(610)), Verdict::Allowed);
    }

    #[test]
    fn a_charge_never_puts_the_bucket_deeper_than_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        b.charge(t0, 1000.0); // floor: -20
        assert_eq!(b.check(t0 + Duration::from_millis(2050)), Verdict::Refused);
        assert_eq!(b.check(t0 + Duration::from_millis(2110)), Verdict::Allowed);
    }

    #[test]
    fn bucket_starts_full_with_twice_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, t0);
        for _ in 0..10 {
            assert_eq!(b.check(t0), Verdict::Allowed);
        }
        assert_eq!(b.check(t0), Verdict::Refused);
    }

    #[test]
    fn bucket_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        for _ in 0..20 {
            b.check(t0);
        }
        assert_eq!(b.check(t0), Verdict::Refused);
        assert_eq!(b.check(t0 + Duration::from_millis(110)), Verdict::Allowed);
    }

    #[test]
    fn a_steady_flood_is_closed_after_five_seconds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, t0);
        let mut t = t0;
        let mut closed_at = None;
        for _ in 0..1000 {
            t += Duration::from_millis(10);
            if b.check(t) == Verdict::Close {
                closed_at = Some(t);
                break;
            }
        }
        let closed_at = closed_at.expect("a flood at 100/s against 1/s must be closed");
        let after = closed_at - t0;
        assert!(after >= Duration::from_secs(5) && after < Duration::from_secs(6));
    }

    #[test]
    fn a_pause_ends_the_abuse_episode() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1, t0);
        b.check(t0);
        b.check(t0);
        assert_eq!(b.check(t0), Verdict::Refused);
        // 4.5 s of occasional refusals, then a 2 s pause, then refusals again: no close.
        let mut t = t0;
        for _ in 0..9 {
            t += Duration::from_millis(500);
            b.check(t);
            b.check(t);
        }
        t += Duration::from_secs(2);
        for _ in 0..4 {
            b.check(t);
        }
        assert_eq!(b.check(t + Duration::from_millis(100)), Verdict::Refused);
    }
}
