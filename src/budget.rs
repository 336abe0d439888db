//! Spend controls per client (README "Spend controls"): a concurrency
//! limit, a request-rate bucket and a model-token bucket, each off unless
//! configured, and the counters `ProxyHandle::usage` reports. Budgets live
//! in this process's memory and start full when it starts.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::error::{Error, Limit, Refusal};

/// Per-client spend limits, each off (`None`) by default. A request over a
/// limit is answered 429 with its `keyhole-error` code and `retry-after`,
/// and nothing of it goes upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// At most this many requests in flight at once (`concurrency`).
    pub max_concurrent: Option<u32>,
    /// A bucket of this many requests, refilled continuously at this many
    /// per minute (`rate`). A refused request costs nothing.
    pub max_requests_per_minute: Option<u32>,
    /// A bucket of this many model tokens, refilled at this many per hour,
    /// charged after each response by the tokens it reported; new requests
    /// are refused while it is empty or below zero (`tokens`). The request
    /// that takes it below zero completes.
    pub max_tokens_per_hour: Option<u64>,
}

impl ClientLimits {
    /// Every limit given must be at least 1.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let zero = self.max_concurrent == Some(0)
            || self.max_requests_per_minute == Some(0)
            || self.max_tokens_per_hour == Some(0);
        if zero {
            return Err(Error::BadLimit("client limits", "each must be at least 1"));
        }
        Ok(())
    }

    /// Are model tokens counted (and `accept-encoding: identity` asked for)?
    pub(crate) fn counts_tokens(&self) -> bool {
        self.max_tokens_per_hour.is_some()
    }
}

/// What a client has used since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Usage {
    /// Requests admitted (forwarded, or refused after admission).
    pub requests: u64,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Model tokens the upstream reported as input (counted while the
    /// client has a token budget).
    pub tokens_in: u64,
    /// Model tokens the upstream reported as output.
    pub tokens_out: u64,
    /// Request payload bytes.
    pub bytes_in: u64,
    /// Response payload bytes.
    pub bytes_out: u64,
}

/// One client's limits, buckets and counters; shared by its requests.
#[derive(Debug)]
pub(crate) struct Budget {
    /// The client's name (`-` for the budget shared by unidentified requests).
    pub(crate) name: Arc<str>,
    pub(crate) limits: ClientLimits,
    /// One lock for the counters and the buckets, so admission checks and
    /// updates them at once.
    ledger: Mutex<Ledger>,
}

/// What a client has used, and its bucket levels as of `at` (both start
/// full).
#[derive(Debug)]
struct Ledger {
    used: Usage,
    requests: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Budget {
    /// A full budget for `name` under `limits`.
    pub(crate) fn new(name: Arc<str>, limits: ClientLimits) -> Budget {
        Budget {
            name,
            limits,
            ledger: Mutex::new(Ledger {
                used: Usage::default(),
                requests: f64::from(limits.max_requests_per_minute.unwrap_or(0)),
                tokens: limits.max_tokens_per_hour.map_or(0.0, tokens),
                at: None,
            }),
        }
    }

    /// The counters and buckets, locked.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one request or refuses it at no cost to the client. The
    /// admission holds a concurrency slot until it is dropped, however the
    /// request ends.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Admission, Refusal> {
        let mut ledger = self.ledger();
        // A clock read only for a bucket: without one, admission is a lock
        // and two counters.
        let limits = &self.limits;
        if limits.max_requests_per_minute.is_some() || limits.max_tokens_per_hour.is_some() {
            ledger.check(limits, Instant::now())?;
        }
        if (self.limits.max_concurrent).is_some_and(|max| ledger.used.in_flight >= max) {
            // Give back the request the rate bucket took (the level is
            // only read under a rate limit).
            ledger.requests += 1.0;
            return Err(Refusal::Limited(Limit::Concurrency, 1));
        }
        ledger.used.in_flight += 1;
        ledger.used.requests += 1;
        Ok(Admission(self.clone()))
    }

    /// What this client has used.
    pub(crate) fn usage(&self) -> Usage {
        self.ledger().used
    }

    /// Charges the model tokens a response reported.
    pub(crate) fn charge(&self, tokens_in: u64, tokens_out: u64) {
        let mut ledger = self.ledger();
        let used = &mut ledger.used;
        used.tokens_in = used.tokens_in.saturating_add(tokens_in);
        used.tokens_out = used.tokens_out.saturating_add(tokens_out);
        // The level is only read under a token limit.
        ledger.tokens -= tokens(tokens_in.saturating_add(tokens_out));
    }
}

impl Ledger {
    /// Refills both buckets to `now`, then takes one request if the token
    /// bucket is above zero and the request bucket holds one.
    fn check(&mut self, limits: &ClientLimits, now: Instant) -> Result<(), Refusal> {
        let elapsed = self.at.map_or(0.0, |at| (now - at).as_secs_f64());
        self.at = Some(now);
        if let Some(max) = limits.max_tokens_per_hour {
            let (max, rate) = (tokens(max), tokens(max) / 3600.0);
            self.tokens = (self.tokens + elapsed * rate).min(max);
            if self.tokens <= 0.0 {
                // Whole seconds until the level is above zero again.
                let wait = seconds(-self.tokens / rate + 1.0);
                return Err(Refusal::Limited(Limit::Tokens, wait));
            }
        }
        if let Some(max) = limits.max_requests_per_minute {
            let (max, rate) = (f64::from(max), f64::from(max) / 60.0);
            self.requests = (self.requests + elapsed * rate).min(max);
            if self.requests < 1.0 {
                // Rounded up, less what floating point adds to an exact wait.
                let wait = ((1.0 - self.requests) / rate - 1e-9).ceil();
                return Err(Refusal::Limited(Limit::Rate, seconds(wait)));
            }
            self.requests -= 1.0;
        }
        Ok(())
    }
}

/// A token count as a bucket level.
// Exact below 2^53 tokens, which no budget comes near.
#[allow(clippy::cast_precision_loss)]
fn tokens(count: u64) -> f64 {
    count as f64
}

/// A wait in whole seconds for `retry-after`, at least 1.
// `as` saturates (a negative wait becomes 0, NaN too), then at least 1.
#[allow(clippy::cast_sign_loss)]
fn seconds(wait: f64) -> u32 {
    (wait.floor() as u32).max(1)
}

/// An admitted request: holds its client's concurrency slot until dropped.
pub(crate) struct Admission(Arc<Budget>);

impl Admission {
    /// The client's budget.
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.0
    }

    /// Counts the payload bytes the request moved.
    pub(crate) fn finish(&self, bytes_in: u64, bytes_out: u64) {
        let used = &mut self.0.ledger().used;
        used.bytes_in = used.bytes_in.saturating_add(bytes_in);
        used.bytes_out = used.bytes_out.saturating_add(bytes_out);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.ledger().used.in_flight -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(concurrent: Option<u32>, rpm: Option<u32>, tph: Option<u64>) -> ClientLimits {
        ClientLimits {
            max_concurrent: concurrent,
            max_requests_per_minute: rpm,
            max_tokens_per_hour: tph,
        }
    }

    #[test]
    fn concurrency_slot_is_freed_on_drop() {
        let budget = Arc::new(Budget::new("a".into(), limits(Some(2), None, None)));
        let first = budget.admit().unwrap();
        let _second = budget.admit().unwrap();
        assert_eq!(
            budget.admit().err(),
            Some(Refusal::Limited(Limit::Concurrency, 1))
        );
        drop(first);
        assert!(budget.admit().is_ok());
        assert_eq!(budget.usage().requests, 3);
    }

    #[test]
    fn rate_bucket_refills_continuously_and_refusals_cost_nothing() {
        let mut buckets = Ledger {
            used: Usage::default(),
            requests: 2.0,
            tokens: 0.0,
            at: None,
        };
        let rpm = limits(None, Some(2), None);
        let t0 = Instant::now();
        assert!(buckets.check(&rpm, t0).is_ok());
        assert!(buckets.check(&rpm, t0).is_ok());
        // Empty: one request comes back every 30 s.
        assert_eq!(
            buckets.check(&rpm, t0),
            Err(Refusal::Limited(Limit::Rate, 30))
        );
        assert_eq!(
            buckets.check(&rpm, t0 + Duration::from_secs(20)),
            Err(Refusal::Limited(Limit::Rate, 10))
        );
        assert!(buckets.check(&rpm, t0 + Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn tokens_below_zero_refuse_until_above_zero() {
        let budget = Arc::new(Budget::new("a".into(), limits(None, None, Some(3600))));
        let admission = budget.admit().unwrap();
        // The request that crosses the line completes; the next is refused.
        admission.budget().charge(3000, 1000);
        drop(admission);
        match budget.admit() {
            Err(Refusal::Limited(Limit::Tokens, wait)) => assert!((400..=401).contains(&wait)),
            other => panic!("expected a tokens refusal, got {:?}", other.err()),
        }
        let usage = budget.usage();
        assert_eq!(
            (usage.tokens_in, usage.tokens_out, usage.in_flight),
            (3000, 1000, 0)
        );
        let mut buckets = Ledger {
            used: Usage::default(),
            requests: 0.0,
            tokens: -400.0,
            at: Some(Instant::now()),
        };
        let later = Instant::now() + Duration::from_secs(401);
        assert!(buckets.check(&budget.limits, later).is_ok());
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(limits(Some(0), None, None).validate().is_err());
        assert!(limits(None, None, Some(0)).validate().is_err());
        assert!(limits(Some(1), Some(1), Some(1)).validate().is_ok());
    }
}
