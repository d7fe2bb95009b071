//! The 16-byte timestamped records both ends of the move benchmarks send, and the arrival
//! log that maps stream offsets to the time they were read.

use std::time::Instant;

/// Bytes per record: sequence number and send time (ns since the run's epoch), both u64 LE.
pub const RECORD: usize = 16;

/// Arrival log of one receiving side: `(stream offset after the read, time of the read)`,
/// plus the send stamps of the records parsed so far (index = sequence number).
#[derive(Default)]
pub struct Arrivals {
    /// `(stream offset after the read, time of the read)`, in order.
    pub reads: Vec<(u64, Instant)>,
    /// Send stamps of the records parsed so far (index = sequence number).
    pub stamps: Vec<u64>,
    /// First sequence error, if the records did not arrive exactly once and in order.
    pub error: Option<String>,
}

impl Arrivals {
    /// Logs a read of `data` at `at` and parses the records it completes.
    pub fn record(&mut self, pending: &mut Vec<u8>, data: &[u8], at: Instant) {
        let end = self.reads.last().map_or(0, |r| r.0) + data.len() as u64;
        self.reads.push((end, at));
        pending.extend_from_slice(data);
        let whole = pending.len() / RECORD * RECORD;
        for rec in pending[..whole].chunks_exact(RECORD) {
            let (seq, stamp) = parse_record(rec);
            if seq != self.stamps.len() as u64 && self.error.is_none() {
                self.error = Some(format!(
                    "record {seq} arrived where {} was due",
                    self.stamps.len()
                ));
            }
            self.stamps.push(stamp);
        }
        pending.drain(..whole);
    }

    /// When the byte at stream offset `offset` was read, if it has been.
    pub fn arrival_of(&self, offset: u64) -> Option<Instant> {
        let i = self.reads.partition_point(|r| r.0 <= offset);
        self.reads.get(i).map(|r| r.1)
    }
}

/// Sequence number and send stamp of a record.
pub fn parse_record(rec: &[u8]) -> (u64, u64) {
    let mut seq = [0u8; 8];
    let mut stamp = [0u8; 8];
    seq.copy_from_slice(&rec[..8]);
    stamp.copy_from_slice(&rec[8..RECORD]);
    (u64::from_le_bytes(seq), u64::from_le_bytes(stamp))
}

/// Record `seq`, stamped with the time since `epoch` in nanoseconds.
pub fn make_record(seq: u64, epoch: Instant) -> [u8; RECORD] {
    let mut rec = [0u8; RECORD];
    rec[..8].copy_from_slice(&seq.to_le_bytes());
    rec[8..].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
    rec
}
