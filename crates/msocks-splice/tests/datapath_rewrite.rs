//! The C datapath against the Rust arithmetic, segment by segment: crafted
//! segments are run through the loaded program with `BPF_PROG_TEST_RUN`
//! (inside a testbed namespace, so its route lookups see the testbed's
//! routes), and what comes out is compared field by field with
//! `msocks_splice::mapping`, and its checksums are verified in full.
//!
//! The veth testbed cannot catch a checksum error (veth hands packets over
//! with CHECKSUM_PARTIAL and the receiver trusts them); here the packets
//! carry complete checksums, which the program must update exactly, as on
//! a real NIC. Option layouts include a timestamp at an odd offset.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

use std::net::{IpAddr, SocketAddr};

use msocks_splice::mapping::{ConnState, DirMap};
use msocks_splice::maps::{
    SpliceKey, SpliceVal, OPT_SACK, OPT_TS, STATE_ACTIVE, STATE_HOLD, TS_VALID,
};
use msocks_splice::Datapath;
use msocks_testbed::Testbed;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// A TCP segment to build.
#[derive(Debug, Clone)]
struct Seg {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: Vec<u8>,
    payload: Vec<u8>,
    ip_options: bool,
}

fn sum16(data: &[u8], mut acc: u64) -> u64 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        acc += u64::from(w);
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn pseudo(src: IpAddr, dst: IpAddr, len: usize) -> u64 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let acc = sum16(&s.octets(), 0);
            let acc = sum16(&d.octets(), acc);
            acc + 6 + len as u64
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let acc = sum16(&s.octets(), 0);
            let acc = sum16(&d.octets(), acc);
            acc + 6 + len as u64
        }
        _ => panic!("mixed families"),
    }
}

fn build(s: &Seg) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&s.src.port().to_be_bytes());
    tcp.extend_from_slice(&s.dst.port().to_be_bytes());
    tcp.extend_from_slice(&s.seq.to_be_bytes());
    tcp.extend_from_slice(&s.ack.to_be_bytes());
    assert_eq!(s.opts.len() % 4, 0);
    let doff = (20 + s.opts.len()) / 4;
    tcp.push((doff as u8) << 4);
    tcp.push(s.flags);
    tcp.extend_from_slice(&s.win.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(&s.opts);
    tcp.extend_from_slice(&s.payload);
    let c = !fold(sum16(&tcp, pseudo(s.src.ip(), s.dst.ip(), tcp.len())));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());

    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    match (s.src.ip(), s.dst.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let opt: &[u8] = if s.ip_options { &[1, 1, 1, 0] } else { &[] };
            let ihl = (20 + opt.len()) / 4;
            let total = 20 + opt.len() + tcp.len();
            let mut ip = vec![0x40 | ihl as u8, 0];
            ip.extend_from_slice(&(total as u16).to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
            ip.extend_from_slice(&a.octets());
            ip.extend_from_slice(&b.octets());
            ip.extend_from_slice(opt);
            let c = !fold(sum16(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[6, 64]);
            f.extend_from_slice(&a.octets());
            f.extend_from_slice(&b.octets());
        }
        _ => panic!("mixed families"),
    }
    f.extend_from_slice(&tcp);
    f
}

/// What came out, parsed, with both checksums verified.
#[derive(Debug)]
struct Out {
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    ack: u32,
    win: u16,
    flags: u8,
    opts: Vec<u8>,
    payload: Vec<u8>,
}

fn parse(f: &[u8]) -> Result<Out, String> {
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => {
            let ip = &f[14..];
            let ihl = usize::from(ip[0] & 0xf) * 4;
            if fold(sum16(&ip[..ihl], 0)) != 0xffff {
                return Err("bad IPv4 header checksum".into());
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let s: [u8; 4] = ip[12..16].try_into().map_err(|_| "short")?;
            let d: [u8; 4] = ip[16..20].try_into().map_err(|_| "short")?;
            (s.into(), d.into(), &ip[ihl..total])
        }
        0x86dd => {
            let ip = &f[14..];
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().map_err(|_| "short")?;
            let d: [u8; 16] = ip[24..40].try_into().map_err(|_| "short")?;
            (s.into(), d.into(), &ip[40..40 + len])
        }
        t => return Err(format!("ethertype {t:#x}")),
    };
    if fold(sum16(l4, pseudo(src, dst, l4.len()))) != 0xffff {
        return Err("bad TCP checksum".into());
    }
    let doff = usize::from(l4[12] >> 4) * 4;
    Ok(Out {
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
        ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
        win: u16::from_be_bytes([l4[14], l4[15]]),
        flags: l4[13],
        opts: l4[20..doff].to_vec(),
        payload: l4[doff..].to_vec(),
    })
}

fn rd32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Option layouts: (bytes, offset of TS data or None, offset of SACK data, blocks).
fn layout(
    kind: u8,
    tsval: u32,
    tsecr: u32,
    edges: &[u32],
) -> (Vec<u8>, Option<usize>, Option<usize>) {
    let ts = |v: &mut Vec<u8>| {
        v.extend_from_slice(&[8, 10]);
        v.extend_from_slice(&tsval.to_be_bytes());
        v.extend_from_slice(&tsecr.to_be_bytes());
    };
    let sack = |v: &mut Vec<u8>| {
        v.extend_from_slice(&[5, (2 + 4 * edges.len()) as u8]);
        for e in edges {
            v.extend_from_slice(&e.to_be_bytes());
        }
    };
    let mut v = Vec::new();
    match kind {
        // NOP NOP TS: what Linux sends.
        0 => {
            v.extend_from_slice(&[1, 1]);
            ts(&mut v);
            (v, Some(4), None)
        }
        // NOP NOP TS NOP NOP SACK.
        1 => {
            v.extend_from_slice(&[1, 1]);
            ts(&mut v);
            v.extend_from_slice(&[1, 1]);
            sack(&mut v);
            (v, Some(4), Some(16))
        }
        // NOP TS NOP: timestamp data at an odd offset.
        2 => {
            v.push(1);
            ts(&mut v);
            v.push(1);
            (v, Some(3), None)
        }
        // NOP NOP SACK only.
        3 => {
            v.extend_from_slice(&[1, 1]);
            sack(&mut v);
            (v, None, Some(4))
        }
        // TS then SACK at an odd offset, padded with EOL.
        4 => {
            v.push(1);
            ts(&mut v);
            sack(&mut v);
            while v.len() % 4 != 0 {
                v.push(0);
            }
            (v, Some(3), Some(13))
        }
        _ => (v, None, None),
    }
}

#[derive(Debug, Clone)]
struct Case {
    v6: bool,
    a: ConnState,
    b: ConnState,
    seq_off: u32,
    ack_off: u32,
    win: u16,
    tsval: u32,
    tsecr: u32,
    preset_ts: Option<u32>,
    rev_ts: Option<u32>,
    layout: u8,
    edges: Vec<u32>,
    payload: Vec<u8>,
    fin: bool,
}

fn case() -> impl Strategy<Value = Case> {
    let conn = (any::<u32>(), any::<u32>(), 0u8..=14, 0u8..=14, any::<u32>()).prop_map(
        |(snd_nxt, rcv_nxt, snd_wscale, rcv_wscale, ts_offset)| ConnState {
            snd_nxt,
            rcv_nxt,
            snd_wscale,
            rcv_wscale,
            ts_offset,
        },
    );
    (
        (
            any::<bool>(),
            conn.clone(),
            conn,
            0u32..1 << 30,
            0u32..1 << 30,
            any::<u16>(),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
        ),
        (
            0u8..6,
            (1usize..=3).prop_flat_map(|n| proptest::collection::vec(any::<u32>(), 2 * n)),
        ),
        (
            proptest::collection::vec(any::<u8>(), 0..200),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (v6, a, b, seq_off, ack_off, win),
                (tsval, tsecr, preset_ts, rev_ts),
                (layout, edges),
                (payload, fin),
            )| {
                // A layout's SACK must fit in 40 option bytes with what precedes it.
                let max_blocks = match layout {
                    1 => 3,
                    4 => 2,
                    _ => 4,
                };
                let mut edges = edges;
                edges.truncate(2 * max_blocks);
                Case {
                    v6,
                    a,
                    b,
                    seq_off,
                    ack_off,
                    win,
                    tsval,
                    tsecr,
                    preset_ts,
                    rev_ts,
                    layout,
                    edges,
                    payload,
                    fin,
                }
            },
        )
}

struct Net {
    client: SocketAddr,
    px_c: SocketAddr,
    px_s: SocketAddr,
    server: SocketAddr,
    ifindex: u32,
}

fn nets(tb: &Testbed, v6: bool) -> Net {
    let (c, pc, ps, s): (IpAddr, IpAddr, IpAddr, IpAddr) = if v6 {
        (
            tb.mn_wired_ip6.into(),
            tb.px_wired_ip6.into(),
            tb.px_sv_ip6.into(),
            tb.sv_ip6.into(),
        )
    } else {
        (
            tb.mn_wired_ip.into(),
            tb.px_wired_ip.into(),
            tb.px_sv_ip.into(),
            tb.sv_ip.into(),
        )
    };
    let ifindex = tb
        .px
        .run_in(move || msocks_splice::loader::ifindex_of_addr(ps))
        .expect("setns")
        .expect("sv0 index");
    Net {
        client: SocketAddr::new(c, 40000),
        px_c: SocketAddr::new(pc, 1080),
        px_s: SocketAddr::new(ps, 50000),
        server: SocketAddr::new(s, 443),
        ifindex,
    }
}

fn active(
    map: &DirMap,
    from: SocketAddr,
    to: SocketAddr,
    out: &ConnState,
    ifindex: u32,
) -> SpliceVal {
    let words = |ip: IpAddr| SpliceKey::new(SocketAddr::new(ip, 0), SocketAddr::new(ip, 0)).saddr;
    SpliceVal {
        state: STATE_ACTIVE,
        opts: OPT_TS | OPT_SACK,
        new_saddr: words(from.ip()),
        new_daddr: words(to.ip()),
        new_sport: from.port().to_be(),
        new_dport: to.port().to_be(),
        seq_delta: map.seq_delta,
        ack_delta: map.ack_delta,
        splice_seq: map.splice_seq,
        wscale_in: map.wscale_in,
        wscale_out: map.wscale_out,
        out_tsoffset: out.ts_offset,
        out_ifindex: ifindex,
        ..SpliceVal::default()
    }
}

fn check(dp: &mut Datapath, n4: &Net, n6: &Net, c: &Case) -> Result<(), TestCaseError> {
    let n = if c.v6 { n6 } else { n4 };
    let fwd = DirMap::new(&c.a, &c.b);
    let rev = DirMap::new(&c.b, &c.a);
    let k_fwd = SpliceKey::new(n.client, n.px_c);
    let k_rev = SpliceKey::new(n.server, n.px_s);
    let mut v_fwd = active(&fwd, n.px_s, n.server, &c.b, n.ifindex);
    v_fwd.tsval_delta = c.preset_ts.map_or(0, |d| TS_VALID | u64::from(d));
    let mut v_rev = active(&rev, n.px_c, n.client, &c.a, n.ifindex);
    v_rev.tsval_delta = c.rev_ts.map_or(0, |d| TS_VALID | u64::from(d));
    dp.set_entry(&k_fwd, &v_fwd)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    dp.set_entry(&k_rev, &v_rev)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;

    let (opts, ts_at, sack_at) = layout(c.layout, c.tsval, c.tsecr, &c.edges);
    let seq = c.a.rcv_nxt.wrapping_add(c.seq_off);
    let ack = c.a.snd_nxt.wrapping_add(c.ack_off);
    let seg = Seg {
        src: n.client,
        dst: n.px_c,
        seq,
        ack,
        flags: ACK | PSH | if c.fin { FIN } else { 0 },
        win: c.win,
        opts: opts.clone(),
        payload: c.payload.clone(),
        ip_options: false,
    };
    let (verdict, out) = dp
        .test_run(&build(&seg))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(verdict, TC_ACT_REDIRECT);
    let o = parse(&out).map_err(TestCaseError::fail)?;
    prop_assert_eq!(o.src, n.px_s);
    prop_assert_eq!(o.dst, n.server);
    prop_assert_eq!(o.seq, fwd.seq(seq));
    prop_assert_eq!(o.ack, fwd.ack(ack));
    prop_assert_eq!(o.win, fwd.window(c.win));
    prop_assert_eq!(&o.payload, &c.payload);
    prop_assert_eq!(o.opts.len(), opts.len());
    let after = dp
        .entry(&k_fwd)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    if let Some(at) = ts_at {
        prop_assert!(after.tsval_delta & TS_VALID != 0, "TS offset chosen");
        if let Some(d) = c.preset_ts {
            prop_assert_eq!(
                after.tsval_delta,
                TS_VALID | u64::from(d),
                "a chosen offset is kept"
            );
        }
        let d = after.tsval_delta as u32;
        prop_assert_eq!(rd32(&o.opts[at..]), c.tsval.wrapping_add(d));
        let ecr = c.rev_ts.map_or(0, |rd| c.tsecr.wrapping_sub(rd));
        prop_assert_eq!(rd32(&o.opts[at + 4..]), ecr);
    }
    if let Some(at) = sack_at {
        for (i, e) in c.edges.iter().enumerate() {
            prop_assert_eq!(rd32(&o.opts[at + 4 * i..]), fwd.ack(*e));
        }
    }
    if c.fin {
        prop_assert!(after.events & msocks_splice::maps::EV_FIN != 0);
        let end = fwd
            .seq(seq)
            .wrapping_add(c.payload.len() as u32)
            .wrapping_add(1);
        prop_assert_eq!(after.fin_end, end);
    }
    Ok(())
}

#[test]
fn datapath_rewrites_exactly_like_the_mapping_with_valid_checksums() {
    if !msocks_testbed::require_root(
        "datapath_rewrites_exactly_like_the_mapping_with_valid_checksums",
    ) {
        return;
    }
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let n4 = nets(&tb, false);
    let n6 = nets(&tb, true);
    let result = tb
        .px
        .run_in(|| {
            // The runner wants a `Fn`; the datapath's map calls need `&mut`.
            let dp = std::cell::RefCell::new(Datapath::load().expect("load"));
            let mut runner = TestRunner::new(Config {
                cases: 512,
                ..Config::default()
            });
            let r = runner.run(&case(), |c| check(&mut dp.borrow_mut(), &n4, &n6, &c));
            let mut dp = dp.into_inner();
            let fixed = fixed_verdicts(&mut dp, &n4)
                .and_then(|()| chopped(&mut dp, &n4))
                .and_then(|()| chopped(&mut dp, &n6));
            (r.map_err(|e| e.to_string()), fixed)
        })
        .expect("setns px");
    result.0.expect("property");
    result.1.expect("fixed cases");
}

/// The segments the datapath must not forward, and the HOLD state.
fn fixed_verdicts(dp: &mut Datapath, n: &Net) -> Result<(), String> {
    let a = ConnState {
        snd_nxt: 1000,
        rcv_nxt: 5000,
        snd_wscale: 7,
        rcv_wscale: 7,
        ts_offset: 0,
    };
    let b = ConnState {
        snd_nxt: 9000,
        rcv_nxt: 3000,
        snd_wscale: 7,
        rcv_wscale: 7,
        ts_offset: 0,
    };
    let fwd = DirMap::new(&a, &b);
    let key = SpliceKey::new(n.client, n.px_c);
    let val = active(&fwd, n.px_s, n.server, &b, n.ifindex);
    dp.set_entry(&key, &val).map_err(|e| e.to_string())?;
    let base = Seg {
        src: n.client,
        dst: n.px_c,
        seq: 5000,
        ack: 1000,
        flags: ACK,
        win: 100,
        opts: vec![],
        payload: vec![1, 2, 3],
        ip_options: false,
    };
    let run = |dp: &mut Datapath, s: &Seg| {
        dp.test_run(&build(s))
            .map(|r| r.0)
            .map_err(|e| e.to_string())
    };
    let expect = |what: &str, got: i32, want: i32| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: verdict {got}, expected {want}"))
        }
    };
    expect("ordinary segment", run(dp, &base)?, TC_ACT_REDIRECT)?;
    expect(
        "SYN",
        run(
            dp,
            &Seg {
                flags: SYN,
                ..base.clone()
            },
        )?,
        TC_ACT_SHOT,
    )?;
    // IPv4 options are removed: the segment goes on with a 20-byte
    // header and valid checksums.
    let with_opts = Seg {
        ip_options: true,
        ..base.clone()
    };
    let (verdict, out) = dp.test_run(&build(&with_opts)).map_err(|e| e.to_string())?;
    expect("IPv4 options", verdict, TC_ACT_REDIRECT)?;
    if out[14] != 0x45 {
        return Err(format!(
            "IPv4 options: header byte {:#x} after stripping",
            out[14]
        ));
    }
    let o = parse(&out)?;
    if o.payload != base.payload || o.seq != fwd.seq(base.seq) || o.dst != n.server {
        return Err(format!("IPv4 options: rewritten wrong: {o:?}"));
    }
    expect(
        "FIN below the splice point",
        run(
            dp,
            &Seg {
                seq: 4990,
                flags: ACK | FIN,
                ..base.clone()
            },
        )?,
        TC_ACT_SHOT,
    )?;
    expect(
        "pure ACK below the splice point",
        run(
            dp,
            &Seg {
                seq: 4990,
                payload: vec![],
                ..base.clone()
            },
        )?,
        TC_ACT_REDIRECT,
    )?;
    let bad_opts = Seg {
        opts: vec![8, 10, 0, 0],
        ..base.clone()
    };
    expect(
        "truncated timestamp option",
        run(dp, &bad_opts)?,
        TC_ACT_SHOT,
    )?;
    let other = Seg {
        src: SocketAddr::new(n.client.ip(), 40001),
        ..base.clone()
    };
    expect("a segment of no splice", run(dp, &other)?, TC_ACT_UNSPEC)?;
    let hold = SpliceVal {
        state: STATE_HOLD,
        ..SpliceVal::default()
    };
    dp.set_entry(&key, &hold).map_err(|e| e.to_string())?;
    // HOLD: a data segment goes up to the socket as a bare ACK, unchanged
    // otherwise (same addresses and numbers), with valid checksums.
    let (verdict, out) = dp.test_run(&build(&base)).map_err(|e| e.to_string())?;
    expect("HOLD: data", verdict, TC_ACT_OK)?;
    let o = parse(&out).map_err(|e| format!("HOLD: data: {e}"))?;
    if !o.payload.is_empty() || o.seq != base.seq || o.ack != base.ack || o.dst != base.dst {
        return Err(format!("HOLD: data: passed up as {o:?}"));
    }
    // HOLD: a FIN goes up without its FIN flag (and without its payload), so
    // that the ACK it carries reaches the socket and the FIN does not; the
    // sender sends the FIN again, as nobody acknowledged it.
    for payload in [vec![], vec![1, 2, 3]] {
        let fin = Seg {
            flags: ACK | FIN | PSH,
            payload: payload.clone(),
            ..base.clone()
        };
        let what = format!("HOLD: FIN with {} payload bytes", payload.len());
        let (verdict, out) = dp.test_run(&build(&fin)).map_err(|e| e.to_string())?;
        expect(&what, verdict, TC_ACT_OK)?;
        let o = parse(&out).map_err(|e| format!("{what}: {e}"))?;
        if o.flags != ACK | PSH
            || !o.payload.is_empty()
            || o.seq != base.seq
            || o.ack != base.ack
            || o.dst != base.dst
        {
            return Err(format!("{what}: passed up as {o:?}"));
        }
    }
    expect(
        "HOLD: pure ACK",
        run(
            dp,
            &Seg {
                payload: vec![],
                ..base.clone()
            },
        )?,
        TC_ACT_OK,
    )?;
    // ARMED (a moved splice waiting for the client's ACK of the reply): a FIN
    // that carries that ACK starts the splice, and goes up as an ACK itself.
    let armed = SpliceVal {
        arm_ack: base.ack,
        ..active(&fwd, n.px_s, n.server, &b, n.ifindex)
    };
    let armed = SpliceVal {
        state: msocks_splice::maps::STATE_ARMED,
        ..armed
    };
    dp.set_entry(&key, &armed).map_err(|e| e.to_string())?;
    let fin = Seg {
        flags: ACK | FIN,
        payload: vec![],
        ..base.clone()
    };
    let (verdict, out) = dp.test_run(&build(&fin)).map_err(|e| e.to_string())?;
    expect("ARMED: FIN acknowledging the reply", verdict, TC_ACT_OK)?;
    let o = parse(&out).map_err(|e| format!("ARMED: FIN: {e}"))?;
    if o.flags != ACK || o.seq != base.seq || o.dst != base.dst {
        return Err(format!("ARMED: FIN: passed up as {o:?}"));
    }
    let state = dp.entry(&key).map_err(|e| e.to_string())?.state;
    if state != STATE_ACTIVE {
        return Err(format!("ARMED: FIN: state {state} after, expected ACTIVE"));
    }
    // ACTIVE now: the FIN's retransmission crosses the splice.
    expect("ARMED, then the FIN again", run(dp, &fin)?, TC_ACT_REDIRECT)?;

    // DROP (a splice being moved): nothing passes, not even a pure ACK.
    let dropping = SpliceVal {
        state: msocks_splice::maps::STATE_DROP,
        ..SpliceVal::default()
    };
    dp.set_entry(&key, &dropping).map_err(|e| e.to_string())?;
    let pure = Seg {
        payload: vec![],
        ..base.clone()
    };
    expect("DROP: pure ACK", run(dp, &pure)?, TC_ACT_SHOT)?;
    expect("DROP: data", run(dp, &base)?, TC_ACT_SHOT)?;
    Ok(())
}

/// Segments whose payload starts below the splice point leave as bare ACKs
/// with their mapped sequence number, whatever the payload's length (odd
/// lengths included) and whether it reaches above the splice point, with
/// valid checksums and length fields.
fn chopped(dp: &mut Datapath, n: &Net) -> Result<(), String> {
    let a = ConnState {
        snd_nxt: 1000,
        rcv_nxt: 5000,
        snd_wscale: 7,
        rcv_wscale: 7,
        ts_offset: 0,
    };
    let b = ConnState {
        snd_nxt: 9000,
        rcv_nxt: 3000,
        snd_wscale: 7,
        rcv_wscale: 7,
        ts_offset: 0,
    };
    let fwd = DirMap::new(&a, &b);
    let key = SpliceKey::new(n.client, n.px_c);
    let val = active(&fwd, n.px_s, n.server, &b, n.ifindex);
    dp.set_entry(&key, &val).map_err(|e| e.to_string())?;
    for (seq, len, with_ts) in [
        (4990u32, 3usize, false),
        (4990, 10, true),
        (4990, 11, false),
        (4000, 1001, true),
        (4999, 1448, false),
        (4990, 2999, true),
    ] {
        let (opts, _, _) = layout(if with_ts { 0 } else { 9 }, 5, 6, &[]);
        let seg = Seg {
            src: n.client,
            dst: n.px_c,
            seq,
            ack: 1200,
            flags: ACK | PSH,
            win: 100,
            opts,
            payload: (0..len).map(|i| (i * 7 + 3) as u8).collect(),
            ip_options: false,
        };
        let (verdict, out) = dp.test_run(&build(&seg)).map_err(|e| e.to_string())?;
        if verdict != TC_ACT_REDIRECT {
            return Err(format!("chop seq {seq} len {len}: verdict {verdict}"));
        }
        let o = parse(&out).map_err(|e| format!("chop seq {seq} len {len}: {e}"))?;
        if !o.payload.is_empty() || o.seq != fwd.seq(seq) || o.ack != fwd.ack(1200) {
            return Err(format!("chop seq {seq} len {len}: {o:?}"));
        }
    }
    Ok(())
}
