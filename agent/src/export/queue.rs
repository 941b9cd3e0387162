//! The queue between the correlation loop and one output's task: bounded in
//! spans, carried in batches.
//!
//! The loop hands over what it gathered in one message per hand-off, not one
//! per span: a message costs atomic operations on both threads (and, every
//! 32 messages, a block of the channel allocated on one and freed on the
//! other), which per span was most of the hand-off's cost. The bound is a
//! semaphore of spans, so a batch takes as many permits as it holds spans
//! and gives them back as the output takes them out.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::span::Span;

/// A queue of at most `capacity` spans (at least 1): its two ends.
pub(super) fn span_queue(capacity: usize) -> (SpanQueueSender, SpanQueueReceiver) {
    let room = Arc::new(Semaphore::new(capacity.clamp(1, Semaphore::MAX_PERMITS)));
    let (batches, receiver) = mpsc::unbounded_channel();
    (
        SpanQueueSender {
            batches,
            room: room.clone(),
        },
        SpanQueueReceiver {
            batches: receiver,
            room,
            carried: Vec::new().into_iter(),
        },
    )
}

/// The loop's end. Dropping it closes the queue once what it holds is taken.
#[derive(Debug)]
pub(super) struct SpanQueueSender {
    batches: mpsc::UnboundedSender<Vec<Span>>,
    /// Permits for the spans the queue still has room for.
    room: Arc<Semaphore>,
}

impl SpanQueueSender {
    /// Queues as many of `spans` as there is room for, without waiting, and
    /// drops the rest (the newest). Returns how many were dropped: those
    /// past the room, or all when the output's task is gone.
    pub(super) fn try_send(&self, mut spans: Vec<Span>) -> usize {
        let offered = spans.len();
        if offered == 0 {
            return 0;
        }
        let fits = offered.min(self.room.available_permits());
        if fits == 0 {
            return offered;
        }
        let taken = u32::try_from(fits)
            .ok()
            .and_then(|n| self.room.try_acquire_many(n).ok());
        let Some(permits) = taken else {
            // Another sender took the room first: nothing is queued.
            return offered;
        };
        permits.forget();
        spans.truncate(fits);
        match self.batches.send(spans) {
            Ok(()) => offered - fits,
            Err(_) => offered,
        }
    }

    /// Queues `span`, waiting for room; returns false (the span dropped)
    /// only when the output's task is gone.
    pub(super) async fn send(&self, span: Span) -> bool {
        let permit = tokio::select! {
            permit = self.room.acquire() => permit,
            () = self.batches.closed() => return false,
        };
        match permit {
            Ok(permit) => permit.forget(),
            Err(_) => return false,
        }
        self.batches.send(vec![span]).is_ok()
    }
}

/// The output task's end.
#[derive(Debug)]
pub(super) struct SpanQueueReceiver {
    batches: mpsc::UnboundedReceiver<Vec<Span>>,
    room: Arc<Semaphore>,
    /// The rest of a batch larger than what the output asked for.
    carried: std::vec::IntoIter<Span>,
}

impl SpanQueueReceiver {
    /// Moves up to `limit` spans (at least 1) into `out`: what is here,
    /// waiting for a first batch when nothing is. Returns how many came; 0
    /// only once the queue is closed and empty. Cancel-safe: a batch is
    /// taken only by the same poll that moves its spans.
    pub(super) async fn recv_many(&mut self, out: &mut Vec<Span>, limit: usize) -> usize {
        let limit = limit.max(1);
        if self.carried.len() == 0 {
            match self.batches.recv().await {
                Some(batch) => self.carried = batch.into_iter(),
                None => return 0,
            }
        }
        let moved = self.take_carried(out, limit);
        moved + self.try_recv_many(out, limit - moved)
    }

    /// Moves up to `limit` spans that are already here into `out`, without
    /// waiting; returns how many.
    pub(super) fn try_recv_many(&mut self, out: &mut Vec<Span>, limit: usize) -> usize {
        let mut moved = 0;
        while moved < limit {
            if self.carried.len() == 0 {
                match self.batches.try_recv() {
                    Ok(batch) => self.carried = batch.into_iter(),
                    Err(_) => break,
                }
            }
            moved += self.take_carried(out, limit - moved);
        }
        moved
    }

    fn take_carried(&mut self, out: &mut Vec<Span>, limit: usize) -> usize {
        let before = out.len();
        out.extend(self.carried.by_ref().take(limit));
        let moved = out.len() - before;
        self.room.add_permits(moved);
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::{resource, span};

    fn spans(ids: std::ops::Range<u8>) -> Vec<Span> {
        let resource = resource("svc");
        ids.map(|id| span(1, id, &resource)).collect()
    }

    fn ids(spans: &[Span]) -> Vec<u8> {
        spans.iter().map(|s| s.span_id.0[0]).collect()
    }

    #[tokio::test]
    async fn batches_are_bounded_in_spans_and_taken_in_pieces_in_order() {
        let (sender, mut receiver) = span_queue(5);
        // Room for 5: the 2 newest of 7 are dropped.
        assert_eq!(sender.try_send(spans(0..7)), 2);
        assert_eq!(sender.try_send(spans(7..8)), 1, "full");
        assert_eq!(sender.try_send(Vec::new()), 0);
        let mut out = Vec::new();
        assert_eq!(receiver.recv_many(&mut out, 2).await, 2);
        // Taking spans out gives their room back.
        assert_eq!(sender.try_send(spans(10..13)), 1);
        assert_eq!(receiver.try_recv_many(&mut out, 64), 5);
        assert_eq!(ids(&out), [0, 1, 2, 3, 4, 10, 11]);
        assert_eq!(receiver.try_recv_many(&mut out, 64), 0);
        assert!(sender.send(spans(20..21).remove(0)).await);
        drop(sender);
        assert_eq!(receiver.recv_many(&mut out, 64).await, 1);
        assert_eq!(
            receiver.recv_many(&mut out, 64).await,
            0,
            "closed and empty"
        );
        assert_eq!(ids(&out), [0, 1, 2, 3, 4, 10, 11, 20]);
    }

    #[tokio::test]
    async fn sends_fail_once_the_output_is_gone() {
        let (sender, receiver) = span_queue(1);
        assert_eq!(sender.try_send(spans(0..1)), 0);
        drop(receiver);
        assert_eq!(sender.try_send(spans(1..2)), 1, "no room, and no task");
        // Waiting for room that will never come ends with the task.
        assert!(!sender.send(spans(2..3).remove(0)).await);
    }
}
