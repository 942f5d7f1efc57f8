//! SPIRE's per-caller-IP rate limits on the server's TCP API (`server { ratelimit {
//! attestation = true  signing = true } }`, both on by default): AttestAgent at 1 per second,
//! X509-SVID signing (BatchNewX509SVID, RenewAgent) at 500 per second and JWT-SVID signing
//! (NewJWTSVID) at another 500 per second, each a token bucket whose burst is its rate. A call
//! takes as many tokens as it asks for signatures and waits for them, as Go's `rate.WaitN`
//! does, and gives them back if it goes away before its turn (a cancelled reservation); a call
//! larger than the burst, or one whose gRPC deadline would pass before its turn, is refused at
//! once with ResourceExhausted. Calls over the admin Unix socket are never
//! limited. Unlike SPIRE, a caller with no deadline waits at most [`MAX_WAIT`]: unbounded
//! reservations would let one address push its neighbours' turn (behind one NAT) hours away.
//!
//! Buckets are kept per IP in two generations swapped every minute, as SPIRE does, so an
//! address unseen for two minutes costs nothing. It holds no other state and does no I/O.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::Status;

/// SPIRE's `AttestLimitPerIP`.
pub const ATTEST_PER_SECOND: u32 = 1;
/// SPIRE's `SignLimitPerIP` (X.509 and JWT each).
pub const SIGN_PER_SECOND: u32 = 500;
/// The longest a call without a deadline waits for its turn.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often the generations of buckets are swapped.
const GENERATION: Duration = Duration::from_secs(60);

/// `server.ratelimit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub attestation: bool,
    pub signing: bool,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            attestation: true,
            signing: true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Buckets {
    current: HashMap<IpAddr, Bucket>,
    previous: HashMap<IpAddr, Bucket>,
    swapped: Instant,
}

/// One token bucket per caller IP.
#[derive(Debug)]
pub struct Limiter {
    name: &'static str,
    rate: f64,
    burst: usize,
    buckets: Mutex<Buckets>,
    waited: AtomicU64,
    waited_micros: AtomicU64,
    refused: AtomicU64,
}

impl Limiter {
    pub fn new(name: &'static str, per_second: u32) -> Self {
        Limiter {
            name,
            rate: f64::from(per_second),
            burst: per_second as usize,
            buckets: Mutex::new(Buckets {
                current: HashMap::new(),
                previous: HashMap::new(),
                swapped: Instant::now(),
            }),
            waited: AtomicU64::new(0),
            waited_micros: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn refuse(&self, msg: String) -> Status {
        self.refused.fetch_add(1, Ordering::Relaxed);
        Status::resource_exhausted(msg)
    }

    /// Reserves `n` tokens for `ip` at `now`: how long the caller must wait for them, or a
    /// refusal (nothing reserved) when `n` exceeds the burst or the wait would end after
    /// `deadline`.
    fn reserve(
        &self,
        ip: IpAddr,
        n: usize,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<Duration, Status> {
        if n > self.burst {
            return Err(self.refuse(format!("rate ({n}) exceeds burst size ({})", self.burst)));
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(b.swapped) >= GENERATION {
            b.previous = std::mem::take(&mut b.current);
            b.swapped = now;
        }
        let bucket = match b.current.get(&ip).copied() {
            Some(x) => x,
            None => b.previous.remove(&ip).unwrap_or(Bucket {
                tokens: self.burst as f64,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        let tokens = (bucket.tokens + elapsed * self.rate).min(self.burst as f64) - n as f64;
        let wait = if tokens < 0.0 {
            Duration::from_secs_f64(-tokens / self.rate)
        } else {
            Duration::ZERO
        };
        let limit = deadline.map_or(now + MAX_WAIT, |d| d.min(now + MAX_WAIT));
        if now + wait > limit {
            // Refused: the bucket stays as it was (a debt carried over from the previous
            // generation is not forgiven).
            b.current.insert(ip, bucket);
            drop(b);
            return Err(self.refuse(format!(
                "{} rate limit: this address may make {} per second; the call's deadline (or {}s) comes before its turn",
                self.name,
                self.burst,
                MAX_WAIT.as_secs()
            )));
        }
        b.current.insert(
            ip,
            Bucket {
                tokens,
                at: now.max(bucket.at),
            },
        );
        Ok(wait)
    }

    /// Gives back `n` tokens reserved for `ip` by a caller that left before its turn (as
    /// `rate.Reservation.Cancel`): its reservation must not hold back the callers after it.
    fn refund(&self, ip: IpAddr, n: usize) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let burst = self.burst as f64;
        let Buckets {
            current, previous, ..
        } = &mut *b;
        if let Some(bucket) = current.get_mut(&ip).or_else(|| previous.get_mut(&ip)) {
            bucket.tokens = (bucket.tokens + n as f64).min(burst);
        }
    }

    /// Takes `n` tokens for `ip`, waiting for them (see the module docs). A call dropped while
    /// it waits gives its tokens back.
    pub async fn take(
        &self,
        ip: IpAddr,
        n: usize,
        deadline: Option<Instant>,
    ) -> Result<(), Status> {
        let wait = self.reserve(ip, n, Instant::now(), deadline)?;
        if !wait.is_zero() {
            self.waited.fetch_add(1, Ordering::Relaxed);
            self.waited_micros
                .fetch_add(wait.as_micros() as u64, Ordering::Relaxed);
            tracing::debug!(limit = self.name, %ip, wait_ms = wait.as_millis() as u64, "rate limited: waiting");
            let mut pending = Refund {
                limiter: self,
                ip,
                n,
                waiting: true,
            };
            tokio::time::sleep(wait).await;
            pending.waiting = false;
        }
        Ok(())
    }
}

/// A reservation whose caller is still waiting: refunded if dropped so.
struct Refund<'a> {
    limiter: &'a Limiter,
    ip: IpAddr,
    n: usize,
    waiting: bool,
}

impl Drop for Refund<'_> {
    fn drop(&mut self) {
        if self.waiting {
            self.limiter.refund(self.ip, self.n);
        }
    }
}

/// The server's limiters; a disabled one is None.
#[derive(Debug)]
pub struct Limits {
    pub attestation: Option<Limiter>,
    pub x509_signing: Option<Limiter>,
    pub jwt_signing: Option<Limiter>,
}

/// The caller's deadline from the `grpc-timeout` header (gRPC over HTTP/2: up to 8 digits
/// and a unit, H M S m u n), if it sent one.
fn deadline<T>(req: &tonic::Request<T>) -> Option<Instant> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

impl Limits {
    pub fn new(cfg: RateLimitConfig) -> Self {
        Limits {
            attestation: cfg
                .attestation
                .then(|| Limiter::new("attestation", ATTEST_PER_SECOND)),
            x509_signing: cfg
                .signing
                .then(|| Limiter::new("signing", SIGN_PER_SECOND)),
            jwt_signing: cfg
                .signing
                .then(|| Limiter::new("jwt_signing", SIGN_PER_SECOND)),
        }
    }

    /// Applies `limiter` (if enabled) to `req` for `n` units: TCP callers only.
    pub async fn limit<T>(
        limiter: &Option<Limiter>,
        req: &tonic::Request<T>,
        n: usize,
    ) -> Result<(), Status> {
        let (Some(l), Some(addr)) = (limiter, req.remote_addr()) else {
            return Ok(());
        };
        l.take(addr.ip(), n, deadline(req)).await
    }

    /// Counters in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP kame_ratelimit_waited_total Calls that waited for a rate limit.\n\
             # TYPE kame_ratelimit_waited_total counter\n",
        );
        let all = [&self.attestation, &self.x509_signing, &self.jwt_signing];
        for l in all.iter().copied().flatten() {
            out.push_str(&format!(
                "kame_ratelimit_waited_total{{limit=\"{}\"}} {}\n",
                l.name,
                l.waited.load(Ordering::Relaxed)
            ));
        }
        out.push_str(
            "# HELP kame_ratelimit_wait_seconds_total Time callers spent waiting for a rate limit.\n\
             # TYPE kame_ratelimit_wait_seconds_total counter\n",
        );
        for l in all.iter().copied().flatten() {
            out.push_str(&format!(
                "kame_ratelimit_wait_seconds_total{{limit=\"{}\"}} {:.6}\n",
                l.name,
                l.waited_micros.load(Ordering::Relaxed) as f64 / 1e6
            ));
        }
        out.push_str(
            "# HELP kame_ratelimit_refused_total Calls refused by a rate limit (ResourceExhausted).\n\
             # TYPE kame_ratelimit_refused_total counter\n",
        );
        for l in all.iter().copied().flatten() {
            out.push_str(&format!(
                "kame_ratelimit_refused_total{{limit=\"{}\"}} {}\n",
                l.name,
                l.refused.load(Ordering::Relaxed)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn ratelimit_bucket_waits_like_go_rate_wait_n() {
        let l = Limiter::new("signing", 500);
        let t0 = Instant::now();
        assert_eq!(l.reserve(IP, 500, t0, None).unwrap(), Duration::ZERO);
        // Empty: 250 more are 0.5 s away; reserved, so the next 250 wait a full second.
        let w = l.reserve(IP, 250, t0, None).unwrap();
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        let w = l.reserve(IP, 250, t0, None).unwrap();
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
        // Two seconds on, the debt is paid and 500 tokens are back (burst caps the refill).
        let t2 = t0 + Duration::from_secs(3);
        assert_eq!(l.reserve(IP, 500, t2, None).unwrap(), Duration::ZERO);
        // More than the burst: refused, whatever the bucket holds.
        let e = l
            .reserve(IP, 501, t2 + Duration::from_secs(10), None)
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(e.message(), "rate (501) exceeds burst size (500)");
        // Another address has its own bucket.
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(l.reserve(other, 500, t2, None).unwrap(), Duration::ZERO);
    }

    #[test]
    fn ratelimit_deadline_before_the_turn_is_refused_and_reserves_nothing() {
        let l = Limiter::new("attestation", 1);
        let t0 = Instant::now();
        l.reserve(IP, 1, t0, None).unwrap();
        let e = l
            .reserve(IP, 1, t0, Some(t0 + Duration::from_millis(500)))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        // Nothing was reserved by the refusal: the next caller waits one second, not two.
        let w = l.reserve(IP, 1, t0, None).unwrap();
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6, "{w:?}");
        // Without a deadline the wait is capped at MAX_WAIT.
        for _ in 0..59 {
            l.reserve(IP, 1, t0, None).unwrap();
        }
        assert!(l.reserve(IP, 1, t0, None).is_err(), "a 60 s wait");
        assert_eq!(l.refused.load(Ordering::Relaxed), 2);
    }

    /// Callers that reset their streams while they wait (their futures dropped) leave no debt
    /// behind for the callers after them; a refusal keeps the debt it found.
    #[tokio::test]
    async fn ratelimit_a_caller_that_leaves_gives_its_tokens_back() {
        let l = Limiter::new("attestation", 1);
        l.take(IP, 1, None).await.unwrap();
        for _ in 0..30 {
            let r = tokio::time::timeout(Duration::from_millis(5), l.take(IP, 1, None)).await;
            assert!(r.is_err(), "it had to wait");
        }
        let w = l.reserve(IP, 1, Instant::now(), None).unwrap();
        assert!(
            w <= Duration::from_secs(1),
            "{w:?}: the leavers' debt was kept"
        );
        // A bucket found in the previous generation and refused is kept, debt and all.
        let l = Limiter::new("attestation", 1);
        // 50 s of debt just before the generations swap; the swap comes with the next call.
        let t0 = Instant::now() + GENERATION - Duration::from_secs(1);
        for _ in 0..50 {
            l.reserve(IP, 1, t0, None).unwrap();
        }
        let t1 = t0 + Duration::from_secs(2);
        assert!(l.reserve(IP, 1, t1, Some(t1)).is_err());
        let w = l.reserve(IP, 1, t1, None).unwrap();
        assert!(w > Duration::ZERO, "the debt was forgiven");
    }

    #[test]
    fn ratelimit_generations_forget_idle_addresses() {
        let l = Limiter::new("attestation", 1);
        let t0 = Instant::now();
        l.reserve(IP, 1, t0, None).unwrap();
        let t1 = t0 + GENERATION;
        l.reserve("192.0.2.1".parse().unwrap(), 1, t1, None)
            .unwrap();
        let t2 = t1 + GENERATION;
        l.reserve("192.0.2.2".parse().unwrap(), 1, t2, None)
            .unwrap();
        let b = l.buckets.lock().unwrap();
        assert!(!b.current.contains_key(&IP) && !b.previous.contains_key(&IP));
        assert_eq!(b.current.len() + b.previous.len(), 2);
    }

    #[test]
    fn ratelimit_reads_grpc_timeout() {
        let mut r = tonic::Request::new(());
        assert!(deadline(&r).is_none());
        r.set_timeout(Duration::from_millis(1500));
        let d = deadline(&r).unwrap();
        let left = d.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_millis(1500) && left > Duration::from_millis(1000));
        r.metadata_mut()
            .insert("grpc-timeout", "99999999999S".parse().unwrap());
        assert!(deadline(&r).is_none(), "more than 8 digits");
    }
}
