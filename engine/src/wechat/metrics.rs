//! The WeChat channel's counters, for `/metrics` (Prometheus text format).
//!
//! Written from any shard (callbacks) and from the sender's threads (replies), so they are
//! atomics bumped with relaxed adds: these paths are per WeChat message, far below the
//! WebSocket path's rates.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::sender::Reason;

/// Why a callback was refused; each is a label value of `chinwag_wechat_callbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownAccount,
    Method,
    TooLarge,
    Signature,
    Xml,
    Cipher,
    /// The customer directory could not record a new customer (disk full, I/O error).
    Directory,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::UnknownAccount,
        Refusal::Method,
        Refusal::TooLarge,
        Refusal::Signature,
        Refusal::Xml,
        Refusal::Cipher,
        Refusal::Directory,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::UnknownAccount => "unknown_account",
            Refusal::Method => "method",
            Refusal::TooLarge => "too_large",
            Refusal::Signature => "signature",
            Refusal::Xml => "xml",
            Refusal::Cipher => "cipher",
            Refusal::Directory => "directory",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    verified: AtomicU64,
    accepted: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    delivered: AtomicU64,
    undelivered: [AtomicU64; Reason::ALL.len()],
}

impl Metrics {
    pub fn verified(&self) {
        self.verified.fetch_add(1, Relaxed);
    }

    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub fn refused(&self, refusal: Refusal) {
        let index = Refusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .expect("ALL lists every Refusal");
        self.refused[index].fetch_add(1, Relaxed);
    }

    pub fn delivered(&self) {
        self.delivered.fetch_add(1, Relaxed);
    }

    pub fn undelivered(&self, reason: Reason) {
        let index = Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("Reason::ALL lists every Reason");
        self.undelivered[index].fetch_add(1, Relaxed);
    }

    pub fn refused_count(&self, refusal: Refusal) -> u64 {
        let index = Refusal::ALL
            .iter()
            .position(|r| *r == refusal)
            .expect("ALL lists every Refusal");
        self.refused[index].load(Relaxed)
    }

    pub fn accepted_count(&self) -> u64 {
        self.accepted.load(Relaxed)
    }

    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = "chinwag_wechat_callbacks_total";
        let _ = writeln!(
            out,
            "# HELP {name} WeChat callbacks, by result: url_check, accepted, or the refusal.\n# TYPE {name} counter"
        );
        let _ = writeln!(
            out,
            "{name}{{result=\"url_check\"}} {}",
            self.verified.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "{name}{{result=\"accepted\"}} {}",
            self.accepted.load(Relaxed)
        );
        for (refusal, count) in Refusal::ALL.iter().zip(&self.refused) {
            let _ = writeln!(
                out,
                "{name}{{result=\"{}\"}} {}",
                refusal.label(),
                count.load(Relaxed)
            );
        }
        let name = "chinwag_wechat_replies_total";
        let _ = writeln!(
            out,
            "# HELP {name} Agents' replies to WeChat customers, by result: delivered or why not.\n# TYPE {name} counter"
        );
        let _ = writeln!(
            out,
            "{name}{{result=\"delivered\"}} {}",
            self.delivered.load(Relaxed)
        );
        for (reason, count) in Reason::ALL.iter().zip(&self.undelivered) {
            let _ = writeln!(
                out,
                "{name}{{result=\"{}\"}} {}",
                reason.code(),
                count.load(Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_label() {
        let metrics = Metrics::default();
        metrics.accepted();
        metrics.refused(Refusal::Cipher);
        metrics.refused(Refusal::Cipher);
        metrics.undelivered(Reason::ReplyWindowClosed);
        let mut out = String::new();
        metrics.render(&mut out);
        assert!(
            out.contains("chinwag_wechat_callbacks_total{result=\"accepted\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("chinwag_wechat_callbacks_total{result=\"cipher\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("chinwag_wechat_replies_total{result=\"wechat_window_closed\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("chinwag_wechat_replies_total{result=\"wechat_stopped\"} 0\n"),
            "{out}"
        );
        assert_eq!(out.matches("# TYPE").count(), 2);
    }
}
