//! Who waits for which reload: reload requests that come while one runs are coalesced into
//! one more after it, and each requester hears the outcome of the reload that covered it.

use super::ReloadOutcome;

/// Who waits for which reload: requests that come while one runs are coalesced into the next.
#[derive(Default)]
pub struct ReloadQueue {
    running: bool,
    replies: Vec<tokio::sync::oneshot::Sender<serde_json::Value>>,
    next: Option<Vec<tokio::sync::oneshot::Sender<serde_json::Value>>>,
}

impl ReloadQueue {
    /// Asks for a reload; true when one should start now.
    pub fn ask(&mut self, reply: Option<tokio::sync::oneshot::Sender<serde_json::Value>>) -> bool {
        if self.running {
            if self.next.is_none() {
                tracing::info!("a reload is under way: one more follows it");
            }
            self.next.get_or_insert_default().extend(reply);
            return false;
        }
        self.running = true;
        self.replies.extend(reply);
        true
    }

    /// The reload under way ended; true when the next one should start now.
    pub fn done(&mut self, outcome: &ReloadOutcome) -> bool {
        let reply = outcome.to_json();
        for waiter in self.replies.drain(..) {
            let _ = waiter.send(reply.clone());
        }
        match self.next.take() {
            Some(next) => {
                self.replies = next;
                true
            }
            None => {
                self.running = false;
                false
            }
        }
    }

    /// A drain has begun: nobody gets a reload any more.
    pub fn refuse_all(&mut self) {
        let reply = refused();
        for waiter in self
            .replies
            .drain(..)
            .chain(self.next.take().into_iter().flatten())
        {
            let _ = waiter.send(reply.clone());
        }
        self.running = false;
    }
}

pub fn refused() -> serde_json::Value {
    refused_because("a drain has begun: nginx is shutting down")
}

pub fn refused_because(reason: &str) -> serde_json::Value {
    serde_json::json!({"event": "reload", "outcome": "refused", "reason": reason})
}
