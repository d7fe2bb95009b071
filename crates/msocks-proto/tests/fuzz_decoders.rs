//! A byte-level fuzzer, built on proptest, for every decoder of `msocks-proto`: Greeting,
//! MethodSelection, UserPassRequest, UserPassReply, Request, Reply (in each of the three
//! `ReplyContext`s), UdpHeader, TargetAddr, ConnectionId, MobilityOptions, ResumeCounters.
//!
//! Each decoder gets two kinds of input:
//! * arbitrary byte vectors of 0..600 bytes (half of them starting with up to three bytes
//!   drawn from the version, command and address-type values, so that they get past the
//!   first checks more often than 1 time in 256);
//! * valid encodings (mostly of the decoder's own message type, sometimes of any other) with
//!   random bit flips, overwrites, insertions, removals, truncations and appended bytes.
//!
//! For every input it checks that the decoder:
//! * does not panic;
//! * allocates at most `input.len() + 1024` bytes during the call (counted by the
//!   `#[global_allocator]` below, per thread);
//! * on `Ok(Some((value, n)))`: `0 < n <= input.len()`; `encode(value)` decodes to the same
//!   value with `n` equal to the encoding's length (canonical round trip); the encoding equals
//!   `input[..n]` except for reserved (RSV) bytes, which encode as zero; and every strict
//!   prefix of `input[..n]` decodes to `Ok(None)`;
//! * gives the same answer when more bytes are appended, whenever the answer was not
//!   `Ok(None)`: a complete message or an error never changes as more bytes arrive; and when
//!   the answer was `Ok(None)`, dropping the last byte gives `Ok(None)` too.
//!
//! Cases per test come from the `MSOCKS_FUZZ_CASES` environment variable, default 2000 so
//! that a normal `cargo test` stays quick. CI (and anyone hunting for bugs) runs longer, e.g.
//! `MSOCKS_FUZZ_CASES=200000 cargo test --release -p msocks-proto --test fuzz_decoders`.
//! A failing case is shrunk and its seed saved by proptest under
//! `tests/fuzz_decoders.proptest-regressions`; commit that file so the case is replayed.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;

use common::*;
use msocks_proto::{
    ConnectionId, Decoded, Greeting, MethodSelection, MobilityOptions, ProxyFrame, Reply,
    ReplyContext, Request, ResumeCounters, StandbyFrame, TargetAddr, UdpHeader, UserPassReply,
    UserPassRequest,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------------
// Allocation counting
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// Bytes requested from the allocator by this thread so far. `const`-initialised and
    /// without a destructor, so reading it never allocates and never registers a TLS
    /// destructor (either would recurse into the allocator).
    static ALLOCATED: Cell<usize> = const { Cell::new(0) };
}

/// Adds `bytes` to this thread's count. `try_with` rather than `with`: during thread
/// teardown the slot may be gone, and an allocator must not panic.
fn count(bytes: usize) {
    let _ = ALLOCATED.try_with(|c| c.set(c.get().saturating_add(bytes)));
}

/// `System`, plus a per-thread count of the bytes requested. Per thread, because libtest
/// runs the tests of this binary on several threads at once.
struct CountingAlloc;

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract, and returns `System`'s result unchanged; the only addition is
// `count`, which touches a plain thread-local `Cell<usize>` (no allocation, no panic, no
// re-entrancy into the allocator, no unwinding). The callers' obligations on `layout`, `ptr`
// and `new_size` are exactly `System`'s, and are passed on to it as they were received.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's guarantees about `layout` are forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` (every allocation here does) with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counts the whole new size, not just the growth: an over-estimate, which is the
        // safe direction for an upper-bound check.
        count(new_size);
        // SAFETY: as for `dealloc`; `new_size` is forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the number of bytes this thread allocated meanwhile.
fn allocated_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATED.with(Cell::get);
    let result = f();
    let after = ALLOCATED.with(Cell::get);
    (result, after - before)
}

/// The allocation check would be vacuous if the allocator did not count: make sure it does.
#[test]
fn allocation_counter_counts() {
    let (v, n) = allocated_during(|| vec![0u8; 4096]);
    assert_eq!(v.len(), 4096);
    assert!(n >= 4096, "counted {n} bytes for a 4096-byte Vec");
    let ((), n) = allocated_during(|| ());
    assert_eq!(n, 0);
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

const DEFAULT_CASES: u32 = 2000;

/// Proptest configuration: `MSOCKS_FUZZ_CASES` cases (default [`DEFAULT_CASES`]).
fn config() -> ProptestConfig {
    let cases = match std::env::var("MSOCKS_FUZZ_CASES") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MSOCKS_FUZZ_CASES must be a number of cases, got {v:?}")),
        Err(std::env::VarError::NotPresent) => DEFAULT_CASES,
        Err(e) => panic!("MSOCKS_FUZZ_CASES: {e}"),
    };
    ProptestConfig::with_cases(cases)
}

// ---------------------------------------------------------------------------------------------
// Decoders under test
// ---------------------------------------------------------------------------------------------

/// A decoder, the matching encoder, and the offsets of the reserved bytes its decoder ignores
/// (and its encoder writes as zero).
struct Codec<T> {
    decode: fn(&[u8]) -> Decoded<T>,
    encode: fn(&T, &mut Vec<u8>),
    /// Offsets of the reserved bytes of the message at the front of the given encoding.
    reserved: fn(&[u8]) -> &'static [usize],
}

const GREETING: Codec<Greeting> = Codec {
    decode: Greeting::decode,
    encode: Greeting::encode,
    reserved: |_| &[],
};
const METHOD_SELECTION: Codec<MethodSelection> = Codec {
    decode: MethodSelection::decode,
    encode: MethodSelection::encode,
    reserved: |_| &[],
};
const USERPASS_REQUEST: Codec<UserPassRequest> = Codec {
    decode: UserPassRequest::decode,
    encode: UserPassRequest::encode,
    reserved: |_| &[],
};
const USERPASS_REPLY: Codec<UserPassReply> = Codec {
    decode: UserPassReply::decode,
    encode: UserPassReply::encode,
    reserved: |_| &[],
};
const REQUEST: Codec<Request> = Codec {
    decode: Request::decode,
    encode: Request::encode,
    reserved: |_| &[2],
};
const REPLY_PLAIN: Codec<Reply> = Codec {
    decode: |b| Reply::decode(b, ReplyContext::Plain),
    encode: Reply::encode,
    reserved: |_| &[2],
};
const REPLY_MOBILE_OPEN: Codec<Reply> = Codec {
    decode: |b| Reply::decode(b, ReplyContext::MobileOpen),
    encode: Reply::encode,
    reserved: |_| &[2],
};
const REPLY_RECONNECT: Codec<Reply> = Codec {
    decode: |b| Reply::decode(b, ReplyContext::Reconnect),
    encode: Reply::encode,
    reserved: |_| &[2],
};
/// A standby frame that is a request or reply (version byte first) has RSV at offset 2; a
/// probe has none.
fn frame_reserved(bytes: &[u8]) -> &'static [usize] {
    if bytes.first() == Some(&0x05) {
        &[2]
    } else {
        &[]
    }
}

const STANDBY_FRAME: Codec<StandbyFrame> = Codec {
    decode: StandbyFrame::decode,
    encode: StandbyFrame::encode,
    reserved: frame_reserved,
};
const PROXY_FRAME_RECONNECT: Codec<ProxyFrame> = Codec {
    decode: |b| ProxyFrame::decode(b, ReplyContext::Reconnect),
    encode: ProxyFrame::encode,
    reserved: frame_reserved,
};
const UDP_HEADER: Codec<UdpHeader> = Codec {
    decode: UdpHeader::decode,
    encode: UdpHeader::encode,
    reserved: |_| &[0, 1],
};
const TARGET_ADDR: Codec<TargetAddr> = Codec {
    decode: TargetAddr::decode,
    encode: TargetAddr::encode,
    reserved: |_| &[],
};
const CONNECTION_ID: Codec<ConnectionId> = Codec {
    decode: ConnectionId::decode,
    encode: ConnectionId::encode,
    reserved: |_| &[],
};
const MOBILITY_OPTIONS: Codec<MobilityOptions> = Codec {
    decode: MobilityOptions::decode,
    encode: MobilityOptions::encode,
    reserved: |_| &[],
};
const RESUME_COUNTERS: Codec<ResumeCounters> = Codec {
    decode: ResumeCounters::decode,
    encode: ResumeCounters::encode,
    reserved: |_| &[],
};

/// All the properties listed at the top of this file, for one decoder and one input.
fn check<T: PartialEq + Debug + Clone>(
    codec: &Codec<T>,
    input: &[u8],
    extra: &[u8],
) -> Result<(), TestCaseError> {
    let decode = codec.decode;

    let (result, allocated) = allocated_during(|| decode(input));
    prop_assert!(
        allocated <= input.len() + 1024,
        "decoding {} bytes allocated {} bytes",
        input.len(),
        allocated
    );

    match &result {
        Ok(Some((value, n))) => {
            let n = *n;
            prop_assert!(
                n > 0 && n <= input.len(),
                "consumed {} of {}",
                n,
                input.len()
            );

            // Canonical round trip.
            let mut bytes = Vec::new();
            (codec.encode)(value, &mut bytes);
            prop_assert_eq!(decode(&bytes), Ok(Some((value.clone(), bytes.len()))));

            // The encoding is the consumed input, with reserved bytes zeroed.
            let mut expected = input[..n].to_vec();
            for &i in (codec.reserved)(input) {
                if let Some(b) = expected.get_mut(i) {
                    *b = 0;
                }
            }
            prop_assert_eq!(bytes, expected);

            // A strict prefix of a complete message is incomplete.
            for k in 0..n {
                prop_assert_eq!(decode(&input[..k]), Ok(None), "prefix of {} bytes", k);
            }
        }
        Ok(None) => {
            if let Some(shorter) = input.len().checked_sub(1) {
                prop_assert_eq!(decode(&input[..shorter]), Ok(None));
            }
        }
        Err(_) => {}
    }

    // More bytes never change a complete message or an error.
    if !matches!(result, Ok(None)) {
        let mut longer = input.to_vec();
        longer.extend_from_slice(extra);
        prop_assert_eq!(decode(&longer), result);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Bytes the decoders look at first: versions, commands, address types, flags.
const INTERESTING: [u8; 11] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x80, 0x81, 0x82, 0x83, 0xff,
];

/// Arbitrary bytes, 0..600 of them; half start with up to three "interesting" bytes.
fn arbitrary_input() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..600),
        (
            vec(prop::sample::select(&INTERESTING[..]), 0..=3),
            vec(any::<u8>(), 0..597),
        )
            .prop_map(|(mut head, tail)| {
                head.extend(tail);
                head
            }),
    ]
    .boxed()
}

/// Bytes appended to check that complete messages and errors are stable.
fn extra_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 1..32)
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Overwrite(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Truncate(Index),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, bit)| Mutation::FlipBit(i, bit)),
        (
            any::<Index>(),
            prop_oneof![prop::sample::select(&INTERESTING[..]), any::<u8>()]
        )
            .prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        any::<Index>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..8).prop_map(Mutation::Append),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::FlipBit(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
            Mutation::Overwrite(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Mutation::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
            Mutation::Remove(i) if len > 0 => {
                bytes.remove(i.index(len));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
            Mutation::Append(tail) => bytes.extend_from_slice(tail),
            _ => {}
        }
    }
    bytes
}

/// The valid encoding of a value of any message type.
fn any_valid_encoding() -> BoxedStrategy<Vec<u8>> {
    fn enc<T: Debug + 'static>(
        s: BoxedStrategy<T>,
        encode: fn(&T, &mut Vec<u8>),
    ) -> BoxedStrategy<Vec<u8>> {
        s.prop_map(move |v| encoded(|o| encode(&v, o))).boxed()
    }
    prop_oneof![
        enc(greeting(), Greeting::encode),
        enc(method_selection(), MethodSelection::encode),
        enc(userpass_request(), UserPassRequest::encode),
        enc(userpass_reply(), UserPassReply::encode),
        enc(request(), Request::encode),
        enc(reply(ReplyContext::Plain), Reply::encode),
        enc(reply(ReplyContext::MobileOpen), Reply::encode),
        enc(reply(ReplyContext::Reconnect), Reply::encode),
        enc(standby_frame(), StandbyFrame::encode),
        enc(proxy_frame(ReplyContext::Reconnect), ProxyFrame::encode),
        enc(udp_header(), UdpHeader::encode),
        enc(target_addr(), TargetAddr::encode),
        enc(connection_id(), ConnectionId::encode),
        enc(mobility_options(), MobilityOptions::encode),
        enc(resume_counters(), ResumeCounters::encode),
    ]
    .boxed()
}

/// Mutated valid encodings: three times in four of the decoder's own type (`own`), else of
/// any type; zero to seven mutations each.
fn mutated<T: Debug + 'static>(
    own: BoxedStrategy<T>,
    encode: fn(&T, &mut Vec<u8>),
) -> BoxedStrategy<Vec<u8>> {
    let own = own.prop_map(move |v| encoded(|o| encode(&v, o)));
    (
        prop_oneof![3 => own, 1 => any_valid_encoding()],
        vec(mutation(), 0..8),
    )
        .prop_map(|(bytes, mutations)| apply(bytes, &mutations))
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// The fuzz tests: one module per decoder, two tests each
// ---------------------------------------------------------------------------------------------

macro_rules! fuzz_decoder {
    ($name:ident, $codec:expr, $own:expr) => {
        mod $name {
            use super::*;

            proptest! {
                #![proptest_config(config())]

                #[test]
                fn arbitrary_bytes(input in arbitrary_input(), extra in extra_bytes()) {
                    check(&$codec, &input, &extra)?;
                }

                #[test]
                fn mutated_encodings(
                    input in mutated($own, $codec.encode),
                    extra in extra_bytes(),
                ) {
                    check(&$codec, &input, &extra)?;
                }
            }
        }
    };
}

fuzz_decoder!(greeting_decoder, GREETING, greeting());
fuzz_decoder!(
    method_selection_decoder,
    METHOD_SELECTION,
    method_selection()
);
fuzz_decoder!(
    userpass_request_decoder,
    USERPASS_REQUEST,
    userpass_request()
);
fuzz_decoder!(userpass_reply_decoder, USERPASS_REPLY, userpass_reply());
fuzz_decoder!(request_decoder, REQUEST, request());
fuzz_decoder!(reply_plain_decoder, REPLY_PLAIN, reply(ReplyContext::Plain));
fuzz_decoder!(
    reply_mobile_open_decoder,
    REPLY_MOBILE_OPEN,
    reply(ReplyContext::MobileOpen)
);
fuzz_decoder!(
    reply_reconnect_decoder,
    REPLY_RECONNECT,
    reply(ReplyContext::Reconnect)
);
fuzz_decoder!(standby_frame_decoder, STANDBY_FRAME, standby_frame());
fuzz_decoder!(
    proxy_frame_decoder,
    PROXY_FRAME_RECONNECT,
    proxy_frame(ReplyContext::Reconnect)
);
fuzz_decoder!(udp_header_decoder, UDP_HEADER, udp_header());
fuzz_decoder!(target_addr_decoder, TARGET_ADDR, target_addr());
fuzz_decoder!(connection_id_decoder, CONNECTION_ID, connection_id());
fuzz_decoder!(
    mobility_options_decoder,
    MOBILITY_OPTIONS,
    mobility_options()
);
fuzz_decoder!(resume_counters_decoder, RESUME_COUNTERS, resume_counters());
