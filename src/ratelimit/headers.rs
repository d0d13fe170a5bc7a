//! The rate-limit response headers (SPEC section 3) for the limit with the least remaining.

use super::bucket::{ceil_secs, BucketStatus};

/// What the client is told about one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Index of the limit in [`super::RateLimiter::limits`].
    pub limit: usize,
    pub status: BucketStatus,
}

impl Report {
    /// The report to show of two: the least remaining; on a tie, the longer wait until full.
    pub fn tighter(a: Option<Report>, b: Option<Report>) -> Option<Report> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let key = |r: &Report| (r.status.remaining, u64::MAX - r.status.full_in_ms);
                Some(if key(&b) < key(&a) { b } else { a })
            }
            (a, None) => a,
            (None, b) => b,
        }
    }
}

/// Header values, ready to set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitHeaders {
    /// `ratelimit-policy: "<name>";q=<capacity>;w=<refill_period_s>`
    pub policy: String,
    /// `ratelimit: "<name>";r=<remaining>;t=<seconds until full>`
    pub ratelimit: String,
    pub x_limit: String,
    pub x_remaining: String,
    /// Unix seconds at which the bucket is full again.
    pub x_reset: String,
    /// Whole seconds, rounded up, on a 429 only.
    pub retry_after: Option<String>,
}

impl RateLimitHeaders {
    /// `name` is the limit's name (validated: no quotes or backslashes).
    pub fn new(name: &str, status: &BucketStatus, now_ms: u64, retry_after_s: Option<u64>) -> Self {
        let full_in_s = ceil_secs(status.full_in_ms);
        RateLimitHeaders {
            policy: format!(
                "\"{name}\";q={};w={}",
                status.capacity, status.refill_period_s
            ),
            ratelimit: format!("\"{name}\";r={};t={full_in_s}", status.remaining),
            x_limit: status.capacity.to_string(),
            x_remaining: status.remaining.to_string(),
            x_reset: ceil_secs(now_ms.saturating_add(status.full_in_ms)).to_string(),
            retry_after: retry_after_s.map(|s| s.to_string()),
        }
    }

    /// (name, value) pairs in the order of [`Self::pairs`], the values moved out.
    pub fn into_pairs(self) -> impl Iterator<Item = (&'static str, String)> {
        [
            ("ratelimit-policy", self.policy),
            ("ratelimit", self.ratelimit),
            ("x-ratelimit-limit", self.x_limit),
            ("x-ratelimit-remaining", self.x_remaining),
            ("x-ratelimit-reset", self.x_reset),
        ]
        .into_iter()
        .chain(self.retry_after.map(|v| ("retry-after", v)))
    }

    /// (name, value) pairs in a fixed order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("ratelimit-policy", self.policy.as_str()),
            ("ratelimit", self.ratelimit.as_str()),
            ("x-ratelimit-limit", self.x_limit.as_str()),
            ("x-ratelimit-remaining", self.x_remaining.as_str()),
            ("x-ratelimit-reset", self.x_reset.as_str()),
        ]
        .into_iter()
        .chain(self.retry_after.as_deref().map(|v| ("retry-after", v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(remaining: u64, full_in_ms: u64) -> BucketStatus {
        BucketStatus {
            capacity: 5,
            refill_period_s: 60,
            remaining,
            full_in_ms,
        }
    }

    #[test]
    fn headers_follow_the_spec_format() {
        let h = RateLimitHeaders::new("login-per-ip", &st(3, 24_000), 1_700_000_000_500, None);
        assert_eq!(h.policy, "\"login-per-ip\";q=5;w=60");
        assert_eq!(h.ratelimit, "\"login-per-ip\";r=3;t=24");
        assert_eq!(h.x_limit, "5");
        assert_eq!(h.x_remaining, "3");
        assert_eq!(h.x_reset, "1700000025");
        assert_eq!(h.pairs().count(), 5);
        let h = RateLimitHeaders::new("l", &st(0, 1), 1_000, Some(1));
        assert_eq!(h.ratelimit, "\"l\";r=0;t=1");
        assert_eq!(h.x_reset, "2");
        assert!(h.pairs().any(|(k, v)| k == "retry-after" && v == "1"));
        let borrowed: Vec<(&str, String)> = h.pairs().map(|(k, v)| (k, v.to_string())).collect();
        assert_eq!(h.into_pairs().collect::<Vec<_>>(), borrowed);
        let h = RateLimitHeaders::new("l", &st(5, 0), u64::MAX, None);
        assert_eq!(h.ratelimit, "\"l\";r=5;t=0");
    }

    #[test]
    fn the_least_remaining_wins() {
        let a = Report {
            limit: 0,
            status: st(3, 1000),
        };
        let b = Report {
            limit: 1,
            status: st(2, 10),
        };
        let c = Report {
            limit: 2,
            status: st(2, 5000),
        };
        assert_eq!(Report::tighter(Some(a), Some(b)), Some(b));
        assert_eq!(
            Report::tighter(Some(b), Some(c)),
            Some(c),
            "tie: longer wait"
        );
        assert_eq!(Report::tighter(None, Some(a)), Some(a));
        assert_eq!(Report::tighter(Some(a), None), Some(a));
        assert_eq!(Report::tighter(None, None), None);
    }
}
