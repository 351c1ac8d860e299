//! The access token cache: one token per official account, shared by the account's sender
//! threads.
//!
//! The contract:
//! - a token is reused until 10% of its life (at most 5 minutes) is left, then renewed, so a
//!   request never carries a token about to expire (WeChat's tokens live 7,200 s);
//! - when several threads need a token at once, **one** fetches it and the others wait for that
//!   fetch and share its result, token or error: WeChat limits token requests per day, and each
//!   new token starts the old one's end;
//! - a token WeChat called invalid (errcodes 40001, 40014, 42001) is dropped with
//!   [`TokenCache::invalidate`], only if it is still the current one, so ten threads failing with
//!   the same stale token cause one refetch;
//! - a failed fetch is remembered for `failure_hold`, so a wrong secret does not become a
//!   request to WeChat per reply.
//!
//! Time comes from the caller (`now`), so the rules are unit-tested without waiting.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Renewal starts when this fraction (1/N) of a token's life is left...
const RENEW_FRACTION: u32 = 10;
/// ...or this much time, whichever is less.
const RENEW_MARGIN_MAX: Duration = Duration::from_secs(300);

/// A token as the token API returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub value: Arc<str>,
    pub expires_in: Duration,
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// WeChat refused the credentials or the caller (wrong AppSecret 40125 / 40001, unknown
    /// AppID 40013, server IP not on the account's allow list 40164, ...): retrying will not help.
    Refused { errcode: i64, errmsg: String },
    /// Busy (-1), 5xx, timeout, connection refused, an answer that is not WeChat's: worth a retry.
    Transient(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Refused { errcode, errmsg } => {
                write!(f, "token refused: errcode {errcode} {errmsg}")
            }
            TokenError::Transient(why) => write!(f, "token not available: {why}"),
        }
    }
}

pub struct TokenCache {
    state: Mutex<State>,
    fetched: Condvar,
    failure_hold: Duration,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    /// A fetch is under way (by the thread that set it).
    fetching: bool,
    /// Counts finished fetches, so a waiter can tell that the one it waited for ended.
    fetches: u64,
    failure: Option<(TokenError, Instant)>,
}

struct Cached {
    value: Arc<str>,
    renew_at: Instant,
}

impl TokenCache {
    pub fn new(failure_hold: Duration) -> TokenCache {
        TokenCache {
            state: Mutex::new(State::default()),
            fetched: Condvar::new(),
            failure_hold,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left the state consistent (every
        // update is one assignment), so the poison can be ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current token, or a fresh one from `fetch` (called by at most one thread at a time;
    /// the others wait for its result).
    pub fn get(
        &self,
        now: Instant,
        fetch: impl FnOnce() -> Result<AccessToken, TokenError>,
    ) -> Result<Arc<str>, TokenError> {
        let mut state = self.lock();
        let mut waited_for = None;
        loop {
            if let Some(cached) = &state.current {
                if now < cached.renew_at || waited_for.is_some_and(|n| state.fetches > n) {
                    return Ok(Arc::clone(&cached.value));
                }
            }
            if let Some((error, until)) = &state.failure {
                if now < *until || waited_for.is_some_and(|n| state.fetches > n) {
                    return Err(error.clone());
                }
            }
            if !state.fetching {
                break;
            }
            waited_for = Some(state.fetches);
            state = self
                .fetched
                .wait_while(state, |s| s.fetching)
                .unwrap_or_else(|e| e.into_inner());
        }
        state.fetching = true;
        drop(state);

        // Resets `fetching` and wakes the waiters even if `fetch` panics.
        struct Done<'a>(&'a TokenCache);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock();
                state.fetching = false;
                state.fetches += 1;
                self.0.fetched.notify_all();
            }
        }
        let done = Done(self);
        let result = fetch();
        let mut state = self.lock();
        match &result {
            Ok(token) => {
                let margin = (token.expires_in / RENEW_FRACTION).min(RENEW_MARGIN_MAX);
                state.current = Some(Cached {
                    value: Arc::clone(&token.value),
                    renew_at: now + token.expires_in - margin,
                });
                state.failure = None;
            }
            Err(error) => {
                state.current = None;
                state.failure = Some((error.clone(), now + self.failure_hold));
            }
        }
        drop(state);
        drop(done);
        result.map(|token| token.value)
    }

    /// Forgets `token` if it is still the current one (WeChat said it is invalid or expired).
    pub fn invalidate(&self, token: &str) {
        let mut state = self.lock();
        if state.current.as_ref().is_some_and(|c| &*c.value == token) {
            state.current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn token(value: &str, expires_in_s: u64) -> Result<AccessToken, TokenError> {
        Ok(AccessToken {
            value: value.into(),
            expires_in: Duration::from_secs(expires_in_s),
        })
    }

    #[test]
    fn reuses_a_token_until_shortly_before_expiry() {
        let cache = TokenCache::new(Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(&*cache.get(t0, || token("A", 7200)).unwrap(), "A");
        let later = t0 + Duration::from_secs(6899);
        assert_eq!(
            &*cache.get(later, || panic!("fetched too early")).unwrap(),
            "A"
        );
        // 7,200 s minus the 300 s margin: renewed.
        let renew = t0 + Duration::from_secs(6900);
        assert_eq!(&*cache.get(renew, || token("B", 7200)).unwrap(), "B");
    }

    #[test]
    fn short_lived_tokens_renew_at_ninety_percent() {
        let cache = TokenCache::new(Duration::ZERO);
        let t0 = Instant::now();
        cache.get(t0, || token("A", 100)).unwrap();
        assert_eq!(
            &*cache
                .get(t0 + Duration::from_secs(89), || token("B", 100))
                .unwrap(),
            "A"
        );
        assert_eq!(
            &*cache
                .get(t0 + Duration::from_secs(90), || token("B", 100))
                .unwrap(),
            "B"
        );
    }

    #[test]
    fn invalidate_drops_only_the_current_token() {
        let cache = TokenCache::new(Duration::ZERO);
        let t0 = Instant::now();
        cache.get(t0, || token("A", 7200)).unwrap();
        cache.invalidate("stale");
        assert_eq!(&*cache.get(t0, || panic!("refetched")).unwrap(), "A");
        cache.invalidate("A");
        assert_eq!(&*cache.get(t0, || token("B", 7200)).unwrap(), "B");
    }

    #[test]
    fn failures_are_held_then_retried() {
        let cache = TokenCache::new(Duration::from_secs(2));
        let t0 = Instant::now();
        let refused = TokenError::Refused {
            errcode: 40125,
            errmsg: "invalid appsecret".into(),
        };
        let r = refused.clone();
        assert_eq!(cache.get(t0, move || Err(r)).unwrap_err(), refused);
        assert_eq!(
            cache
                .get(t0 + Duration::from_secs(1), || panic!("refetched"))
                .unwrap_err(),
            refused
        );
        assert_eq!(
            &*cache
                .get(t0 + Duration::from_secs(2), || token("A", 7200))
                .unwrap(),
            "A"
        );
    }

    #[test]
    fn many_threads_share_one_fetch() {
        let cache = Arc::new(TokenCache::new(Duration::ZERO));
        let fetches = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, fetches, start) = (cache.clone(), fetches.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    cache
                        .get(Instant::now(), || {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            // Long enough that the other threads arrive while it runs.
                            std::thread::sleep(Duration::from_millis(100));
                            token("A", 7200)
                        })
                        .unwrap()
                })
            })
            .collect();
        for thread in threads {
            assert_eq!(&*thread.join().unwrap(), "A");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn waiters_share_a_failed_fetch_too() {
        let cache = Arc::new(TokenCache::new(Duration::ZERO));
        let fetches = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (cache, fetches, start) = (cache.clone(), fetches.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    cache.get(Instant::now(), || {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        Err(TokenError::Transient("busy".into()))
                    })
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().unwrap().is_err());
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_panicking_fetch_does_not_wedge_the_cache() {
        let cache = TokenCache::new(Duration::ZERO);
        let t0 = Instant::now();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = cache.get(t0, || panic!("boom"));
        }));
        assert!(caught.is_err());
        assert_eq!(&*cache.get(t0, || token("A", 7200)).unwrap(), "A");
    }
}
