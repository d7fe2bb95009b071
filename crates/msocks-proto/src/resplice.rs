//! The resplice arithmetic of RECONNECT (paper, sections III-B.3 to III-B.5), as pure
//! functions: from what the proxy knows about a session's two byte streams and the counters
//! the mobile node reports, where the proxy resumes and what the mobile node must salvage and
//! rewrite.
//!
//! Counters on the wire are absolute values in the client's counter spaces, which start at
//! the client's chosen origins and wrap modulo 2^64. Here everything is first turned into
//! offsets from the origin (`counter - origin`, wrapping), and offsets are plain byte counts
//! since the session began: no session moves 2^64 bytes, so offsets never wrap, while the
//! absolute counters may.
//!
//! Server-to-client ("down"): the proxy has sent `down_sent` bytes to the mobile node, and the
//! mobile node's TCP has acknowledged `down_acked` of them (`snd_una_C`). The application has
//! read `r`. If `down_acked > r`, the unread bytes sit in the old socket on the mobile node:
//! `data_salvage = down_acked - r`, and the proxy resumes at `down_acked` (Fig. 8). Otherwise
//! the application read bytes whose acknowledgment never reached the proxy: the proxy resumes
//! at `r`, so nothing is delivered twice (Fig. 9).
//!
//! Client-to-server ("up"): the proxy holds `up_received` bytes of what the application wrote
//! (for the kernel splice: what the server acknowledged, `snd_una_D`). The application wrote
//! `w`; the last `data_write = w - up_received` bytes are the hole (Fig. 10) the mobile node
//! writes again into the new connection.

use thiserror::Error;

use crate::mobility::ResumeCounters;

/// The most bytes a mobile node can be asked to drain from its old socket or to write again:
/// both are bounded by socket buffers, far below this. A larger value means the counters are
/// wrong, not that a socket holds gigabytes.
pub const MAX_RESPLICE_SPAN: u64 = (1 << 31) - 1;

/// What the proxy knows about a session when a RECONNECT arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPosition {
    /// The client's `read_origin` (where its `data_read` counter started).
    pub read_origin: u64,
    /// The client's `write_origin` (where its `data_written` counter started).
    pub write_origin: u64,
    /// Server-to-client bytes the proxy has sent to the mobile node (offset).
    pub down_sent: u64,
    /// Of those, the bytes the mobile node's TCP acknowledged (offset; `<= down_sent`).
    pub down_acked: u64,
    /// Client-to-server bytes the proxy holds for the server (offset).
    pub up_received: u64,
}

/// The outcome of a successful resplice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resplice {
    /// Offset of the first server-to-client byte to send on the new connection.
    pub resume_down_at: u64,
    /// What the reply tells the mobile node.
    pub counters: ResumeCounters,
}

/// Counters that cannot describe this session (reply 0x81; the session is left as it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RespliceError {
    /// `data_read` is ahead of every byte the proxy has sent.
    #[error("data_read is {read} bytes into the stream, but only {sent} were sent")]
    ReadBeyondSent {
        /// The reported offset.
        read: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// `data_read` is so far behind the acknowledged bytes that no socket could hold the gap.
    #[error("data_read is {0} bytes behind what the mobile node acknowledged")]
    SalvageTooLarge(u64),
    /// `data_written` is behind bytes the proxy already received from the client.
    #[error(
        "data_written is {written} bytes into the stream, but {received} were already received"
    )]
    WrittenBelowReceived {
        /// The reported offset.
        written: u64,
        /// Bytes received.
        received: u64,
    },
    /// `data_written` is so far ahead of what arrived that no socket could hold the hole.
    #[error("data_written is {0} bytes ahead of what the proxy received")]
    RewriteTooLarge(u64),
    /// The proxy's own position is inconsistent (acknowledged more than it sent).
    #[error("inconsistent session position: {acked} acknowledged of {sent} sent")]
    Inconsistent {
        /// Acknowledged offset.
        acked: u64,
        /// Sent offset.
        sent: u64,
    },
}

/// Offset of an absolute counter from its origin, modulo 2^64.
pub fn offset(counter: u64, origin: u64) -> u64 {
    counter.wrapping_sub(origin)
}

/// The absolute counter at `offset` from `origin`, modulo 2^64.
pub fn counter_at(origin: u64, offset: u64) -> u64 {
    origin.wrapping_add(offset)
}

/// Chooses the splice points for a RECONNECT reporting `data_read` and `data_written`.
pub fn resplice(
    pos: &SessionPosition,
    data_read: u64,
    data_written: u64,
) -> Result<Resplice, RespliceError> {
    if pos.down_acked > pos.down_sent {
        return Err(RespliceError::Inconsistent {
            acked: pos.down_acked,
            sent: pos.down_sent,
        });
    }
    let read = offset(data_read, pos.read_origin);
    if read > pos.down_sent {
        return Err(RespliceError::ReadBeyondSent {
            read,
            sent: pos.down_sent,
        });
    }
    let data_salvage = pos.down_acked - read.min(pos.down_acked);
    if data_salvage > MAX_RESPLICE_SPAN {
        return Err(RespliceError::SalvageTooLarge(data_salvage));
    }
    let written = offset(data_written, pos.write_origin);
    if written < pos.up_received {
        return Err(RespliceError::WrittenBelowReceived {
            written,
            received: pos.up_received,
        });
    }
    let data_write = written - pos.up_received;
    if data_write > MAX_RESPLICE_SPAN {
        return Err(RespliceError::RewriteTooLarge(data_write));
    }
    Ok(Resplice {
        resume_down_at: read.max(pos.down_acked),
        counters: ResumeCounters {
            data_write,
            data_salvage,
        },
    })
}

/// For a client that receives urgent data out of band (paper, section III-B.6): its
/// `data_read` counts only the bytes it read in band, while urgent bytes still occupy stream
/// positions. Given the sorted stream offsets of the urgent bytes the proxy sent, returns the
/// stream offset reached after `inband` in-band bytes. An urgent byte right at that offset is
/// not counted as read: it is sent again (as urgent) rather than risk losing it.
pub fn stream_offset_of_inband(inband: u64, urgent: &[u64]) -> u64 {
    let mut offset = inband;
    for &u in urgent {
        if u < offset {
            offset += 1;
        } else {
            break;
        }
    }
    offset
}

/// The in-band bytes among the stream offsets `start..end` (urgent bytes excluded), given the
/// sorted stream offsets of the urgent bytes: how a salvage span is expressed to a client
/// that reads urgent data out of band.
pub fn inband_bytes_in(start: u64, end: u64, urgent: &[u64]) -> u64 {
    let lo = urgent.partition_point(|&u| u < start);
    let hi = urgent.partition_point(|&u| u < end);
    end.saturating_sub(start) - (hi - lo) as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn out_of_band_counting() {
        // "abc" "!"(urgent at 3) "def" "?"(urgent at 7) "gh"
        let urgent = [3, 7];
        assert_eq!(stream_offset_of_inband(0, &urgent), 0);
        assert_eq!(stream_offset_of_inband(3, &urgent), 3);
        assert_eq!(stream_offset_of_inband(4, &urgent), 5); // read "abcd": past the "!"
        assert_eq!(stream_offset_of_inband(6, &urgent), 7);
        assert_eq!(stream_offset_of_inband(8, &urgent), 10);
        assert_eq!(inband_bytes_in(3, 10, &urgent), 5);
        assert_eq!(inband_bytes_in(4, 7, &urgent), 3);
        assert_eq!(inband_bytes_in(0, 0, &urgent), 0);
        assert_eq!(stream_offset_of_inband(5, &[]), 5);
    }

    use super::*;

    fn pos(sent: u64, acked: u64, received: u64) -> SessionPosition {
        SessionPosition {
            read_origin: 0,
            write_origin: 0,
            down_sent: sent,
            down_acked: acked,
            up_received: received,
        }
    }

    #[test]
    fn slow_reader_salvages_fig8() {
        let r = resplice(&pos(1000, 800, 0), 500, 0).unwrap();
        assert_eq!(r.counters.data_salvage, 300);
        assert_eq!(r.resume_down_at, 800);
    }

    #[test]
    fn fast_reader_resumes_at_data_read_fig9() {
        let r = resplice(&pos(1000, 600, 0), 900, 0).unwrap();
        assert_eq!(r.counters.data_salvage, 0);
        assert_eq!(r.resume_down_at, 900);
    }

    #[test]
    fn hole_is_rewritten_fig10() {
        let r = resplice(&pos(0, 0, 4000), 0, 4096).unwrap();
        assert_eq!(r.counters.data_write, 96);
    }

    #[test]
    fn impossible_counters() {
        assert!(matches!(
            resplice(&pos(10, 10, 0), 11, 0),
            Err(RespliceError::ReadBeyondSent { .. })
        ));
        assert!(matches!(
            resplice(&pos(0, 0, 10), 0, 9),
            Err(RespliceError::WrittenBelowReceived { .. })
        ));
        assert!(matches!(
            resplice(&pos(0, 0, 0), 0, 1 << 40),
            Err(RespliceError::RewriteTooLarge(_))
        ));
        assert!(matches!(
            resplice(&pos(1 << 40, 1 << 40, 0), 0, 0),
            Err(RespliceError::SalvageTooLarge(_))
        ));
        assert!(matches!(
            resplice(&pos(5, 6, 0), 0, 0),
            Err(RespliceError::Inconsistent { .. })
        ));
    }

    #[test]
    fn counters_wrap_around_2_pow_64() {
        let origin = u64::MAX - 99; // 100 bytes before the wrap
        let p = SessionPosition {
            read_origin: origin,
            write_origin: origin,
            down_sent: 300,
            down_acked: 250,
            up_received: 150,
        };
        // The application read 200 bytes and wrote 180: both counters have wrapped.
        let r = resplice(&p, counter_at(origin, 200), counter_at(origin, 180)).unwrap();
        assert_eq!(
            r.counters,
            ResumeCounters {
                data_write: 30,
                data_salvage: 50
            }
        );
        assert_eq!(r.resume_down_at, 250);
        // A counter "before" the origin is read as 2^64 - n bytes in, which is beyond sent.
        assert!(resplice(&p, origin.wrapping_sub(1), counter_at(origin, 150)).is_err());
    }
}
