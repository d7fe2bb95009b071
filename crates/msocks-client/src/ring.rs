//! The copy of the last bytes written into sockets, from which a RECONNECT's `data_write`
//! bytes are written again (paper III-C, "a circular buffer").

use std::collections::VecDeque;

/// Keeps the last `capacity` bytes pushed into it.
///
/// Memory grows with use up to the capacity instead of being reserved up front, because most
/// mobile streams receive far more than they send (the paper's observation) and a stream
/// that writes a little should not pay for a full socket buffer.
#[derive(Debug)]
pub(crate) struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl Ring {
    pub(crate) fn new(capacity: usize) -> Self {
        Ring {
            bytes: VecDeque::new(),
            capacity,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held: the last `len()` bytes written, at most the capacity.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Records bytes just written into a socket, forgetting the oldest beyond capacity.
    pub(crate) fn push(&mut self, data: &[u8]) {
        if data.len() >= self.capacity {
            self.bytes.clear();
            self.bytes
                .extend(data[data.len() - self.capacity..].iter().copied());
            return;
        }
        let excess = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..excess);
        self.bytes.extend(data.iter().copied());
    }

    /// A copy of the last `n` bytes, or `None` when fewer are held.
    pub(crate) fn last(&self, n: usize) -> Option<Vec<u8>> {
        let start = self.bytes.len().checked_sub(n)?;
        Some(self.bytes.range(start..).copied().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_capacity_bytes() {
        let mut r = Ring::new(5);
        r.push(b"ab");
        assert_eq!(r.last(2).as_deref(), Some(&b"ab"[..]));
        assert_eq!(r.last(3), None);
        r.push(b"cdef");
        assert_eq!(r.len(), 5);
        assert_eq!(r.last(5).as_deref(), Some(&b"bcdef"[..]));
        r.push(b"0123456789");
        assert_eq!(r.last(5).as_deref(), Some(&b"56789"[..]));
        assert_eq!(r.last(0).as_deref(), Some(&b""[..]));
        assert_eq!(r.last(6), None);
    }

    #[test]
    fn matches_a_naive_model() {
        let mut r = Ring::new(1000);
        let mut all = Vec::new();
        let mut x: u32 = 1;
        for round in 0..300u32 {
            // Deterministic pseudo-random chunk sizes, some larger than the capacity.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let len = (x >> 16) as usize % 1500;
            let chunk: Vec<u8> = (0..len).map(|i| (i as u32 ^ round) as u8).collect();
            r.push(&chunk);
            all.extend_from_slice(&chunk);
            let held = all.len().min(1000);
            assert_eq!(r.len(), held);
            assert_eq!(r.last(held).as_deref(), Some(&all[all.len() - held..]));
        }
    }
}
