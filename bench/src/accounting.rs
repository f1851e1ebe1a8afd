//! Delivery accounting: loss, duplicates and order, from what receivers saw.
//!
//! Every benchmark message carries its sender and the sender's counter `n`
//! for that room (0, 1, 2, …). Each receiving connection keeps one
//! [`Stream`] per (room, sender) and classifies every delivery:
//!
//! - `n` is the next one expected: in order;
//! - `n` is beyond it: in order too, but the ones skipped become *missing*
//!   (maybe late, maybe lost, maybe refused by the server);
//! - `n` is one of the missing: it arrived late, **out of order**;
//! - anything else below the next expected: a **duplicate**.
//!
//! Loss is then computed globally, once the run has drained: what should
//! have arrived (each accepted message times the connections joined to its
//! room) minus the distinct messages that did ([`Stream::unique`]). Messages
//! the server refused (`error` back to the sender) were never accepted, so
//! they are not expected anywhere: this is why a gap alone is not a loss.
//!
//! A room's `message` events must also reach each connection in increasing
//! `sequenceId` (PROTOCOL.md §2); [`SequenceCheck`] counts violations.

use std::collections::BTreeSet;

/// What one delivery was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The next expected, or beyond it (the skipped ones become missing).
    InOrder,
    /// One of the missing: it arrived after a later one.
    OutOfOrder,
    /// Already received.
    Duplicate,
}

/// What one receiver has seen of one sender's messages in one room.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    /// The lowest counter never seen and above every seen one.
    next: u64,
    /// Counters below `next` that have not arrived (yet).
    missing: BTreeSet<u64>,
}

impl Stream {
    /// Classifies the delivery of counter `n`.
    pub fn observe(&mut self, n: u64) -> Delivery {
        if n == self.next {
            self.next += 1;
            Delivery::InOrder
        } else if n > self.next {
            // A gap: remember what was skipped. Gaps are rare (refused
            // messages, real reordering), so a set of the holes is small.
            self.missing.extend(self.next..n);
            self.next = n + 1;
            Delivery::InOrder
        } else if self.missing.remove(&n) {
            Delivery::OutOfOrder
        } else {
            Delivery::Duplicate
        }
    }

    /// Distinct messages received.
    pub fn unique(&self) -> u64 {
        self.next - self.missing.len() as u64
    }
}

/// Checks that one connection gets a room's messages in increasing
/// `sequenceId`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SequenceCheck {
    last: u64,
}

impl SequenceCheck {
    /// Records `sequence_id`; false when it does not increase.
    pub fn observe(&mut self, sequence_id: u64) -> bool {
        let ok = sequence_id > self.last;
        self.last = self.last.max(sequence_id);
        ok
    }
}

/// Totals over a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    /// Deliveries expected: accepted messages × joined connections of
    /// their room.
    pub expected: u64,
    /// Distinct deliveries received.
    pub unique: u64,
    /// Deliveries received again.
    pub duplicates: u64,
    /// Deliveries that arrived after a later message of the same sender.
    pub out_of_order: u64,
    /// Deliveries whose `sequenceId` did not increase within the room.
    pub sequence_violations: u64,
}

impl Tally {
    /// Expected deliveries that never arrived (never negative: a delivery
    /// of a message the generator did not count as accepted, for example
    /// one the server stored although it answered with an error, is not
    /// a negative loss).
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.unique)
    }
}

/// Expected deliveries for a room: messages its senders got accepted times
/// the connections joined to it.
pub fn expected_deliveries(accepted: u64, joined_connections: u64) -> u64 {
    accepted * joined_connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_deliveries_count_once_each() {
        let mut s = Stream::default();
        for n in 0..5 {
            assert_eq!(s.observe(n), Delivery::InOrder);
        }
        assert_eq!(s.unique(), 5);
    }

    #[test]
    fn duplicates_are_recognised_whether_in_order_or_not() {
        let mut s = Stream::default();
        s.observe(0);
        s.observe(1);
        assert_eq!(s.observe(1), Delivery::Duplicate);
        assert_eq!(s.observe(0), Delivery::Duplicate);
        s.observe(4);
        assert_eq!(s.observe(2), Delivery::OutOfOrder);
        assert_eq!(s.observe(2), Delivery::Duplicate);
        assert_eq!(s.observe(4), Delivery::Duplicate);
        assert_eq!(s.unique(), 4);
    }

    #[test]
    fn late_arrivals_are_out_of_order_and_fill_their_hole() {
        let mut s = Stream::default();
        assert_eq!(s.observe(0), Delivery::InOrder);
        assert_eq!(s.observe(3), Delivery::InOrder);
        assert_eq!(s.unique(), 2);
        assert_eq!(s.observe(1), Delivery::OutOfOrder);
        assert_eq!(s.observe(2), Delivery::OutOfOrder);
        assert_eq!(s.unique(), 4);
        assert_eq!(s.observe(4), Delivery::InOrder);
    }

    #[test]
    fn a_hole_that_never_fills_is_a_loss_unless_it_was_refused() {
        // Sender sent 0..6; the server refused 2; 4 was lost in transit.
        let mut s = Stream::default();
        for n in [0, 1, 3, 5] {
            s.observe(n);
        }
        let accepted = 6 - 1;
        let tally = Tally {
            expected: expected_deliveries(accepted, 1),
            unique: s.unique(),
            ..Tally::default()
        };
        assert_eq!(tally.lost(), 1);
    }

    #[test]
    fn loss_is_never_negative() {
        let tally = Tally {
            expected: 3,
            unique: 4,
            ..Tally::default()
        };
        assert_eq!(tally.lost(), 0);
    }

    #[test]
    fn sequence_ids_must_increase_per_room() {
        let mut c = SequenceCheck::default();
        assert!(c.observe(1));
        assert!(c.observe(2));
        assert!(c.observe(5));
        assert!(!c.observe(4));
        assert!(!c.observe(5));
        assert!(c.observe(6));
    }
}
