//! IP fragments: a datagram bigger than the path's MTU (DNS with EDNS0,
//! syslog, statsd, QUIC on small MTUs, Kubernetes' "large requests: udp"
//! check) travels as fragments, of which only the first carries ports.
//!
//! The first fragment is a packet of its flow like any other (translated,
//! dropped or rejected by conntrack and the services), and what became of
//! it is recorded under its datagram's key (addresses, protocol, IP id, as
//! it came): the addresses it left with, or a drop. The later fragments
//! read that and get the same addresses (and IPv4 checksum; the L4
//! checksum sits in the first fragment, whose update is the same as an
//! unfragmented packet's) and the same way out. Every first fragment is
//! recorded at ingress, a Service's or not, so a later fragment without a
//! record is one that came before its first.
//!
//! Such an early fragment is held, not lost: its frame is copied into a
//! stash slot of its datagram and dropped. When the first fragment comes,
//! after recording it, each held frame is written over the first
//! fragment's skb and cloned back into the same interface's ingress
//! (`bpf_clone_redirect`), where the program runs again on it and now finds
//! the record; then the first fragment's own bytes are put back. Bounds:
//! [`FRAG_STASH_PER_DATAGRAM`] held fragments per datagram, frames of at
//! most [`FRAG_STASH_BYTES`], [`defaults::FRAG_STASH_MAX`] held at once (an
//! LRU: under pressure the oldest held fragment goes), and a datagram whose
//! first fragment does not come within the kernel's reassembly time is
//! forgotten. A fragment beyond those bounds goes on untranslated, as every
//! fragment did before, counted in `frag_untranslated`.
//!
//! The node's own datagrams (a host endpoint's answers) leave in order, so
//! at egress a first fragment is recorded only when it was translated, and
//! a later fragment without a record simply goes on.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    cty::c_void,
    helpers::{
        bpf_clone_redirect, bpf_ktime_get_ns, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use proxy_common::{
    FRAG_FLAG_DROP, FRAG_FLAG_PENDING, FRAG_FLAG_REDIRECT, FRAG_STASH_BYTES,
    FRAG_STASH_PER_DATAGRAM, FragKey, FragValue, FragmentBytes, StashKey, stat,
};

use crate::fib::fib_redirect;
use crate::maps::{FRAG_BUF, FRAG_STASH, FRAGS, count};
use crate::packet::{ETH_HLEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, fragment, ptr_at};

/// How long a datagram's record holds: the kernel's default reassembly
/// time (`ipfrag_time`); its receiver gives up on later fragments anyway.
const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// What became of a datagram's first fragment.
pub enum First {
    /// It left with the addresses it now has; `redirect`: by FIB redirect.
    Forward {
        redirect: bool,
    },
    Drop,
}

#[inline(always)]
fn fresh(v: &FragValue, now: u64) -> bool {
    now.saturating_sub(v.created_ns) <= FRAG_TIMEOUT_NS
}

/// Records what became of the first fragment of `key` (the packet now
/// holds its translated headers) and sends on the fragments held for it.
/// `always`: record an untranslated one too (at ingress, where a later
/// fragment without a record is held). `false` when the skb could not be
/// given its own bytes back after lending its room: it must be dropped.
#[inline(never)]
pub fn first(ctx: &TcContext, key: &FragKey, outcome: First, always: bool) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    let Ok(ip) = ptr_at::<_, network_types::ip::Ipv4Hdr>(ctx, ETH_HLEN) else {
        return true;
    };
    let (saddr, daddr) = unsafe {
        (
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    let flags = match outcome {
        First::Drop => FRAG_FLAG_DROP,
        First::Forward { redirect: true } => FRAG_FLAG_REDIRECT,
        First::Forward { redirect: false } => 0,
    };
    if !always && flags == 0 && (saddr, daddr) == (key.saddr, key.daddr) {
        return true;
    }
    // The pending record's generation, when early fragments wait.
    let held = match unsafe { FRAGS.get(key) } {
        Some(v) if v.flags & FRAG_FLAG_PENDING != 0 && v.stashed != 0 && fresh(v, now) => {
            Some(v.created_ns as u32)
        }
        _ => None,
    };
    let record = FragValue {
        saddr,
        daddr,
        flags,
        stashed: 0,
        created_ns: now,
    };
    // Without a record the later fragments are held until they are
    // forgotten: nothing worse than before.
    let _ = FRAGS.insert(key, record, 0);
    match held {
        Some(generation) => replay(ctx, key, generation, flags & FRAG_FLAG_DROP != 0),
        None => true,
    }
}

/// Sends on the fragments stashed for `key` in `generation` (drops them for
/// a dropped datagram), the current skb lending them its room; whether it
/// has its own bytes back. Every slot is looked at: a slot claimed by a
/// racing CPU may lie past the record's hint.
#[inline(always)]
fn replay(ctx: &TcContext, key: &FragKey, generation: u32, dropped: bool) -> bool {
    let saved = !dropped && save(ctx);
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mut slot = 0;
    while slot < FRAG_STASH_PER_DATAGRAM {
        let skey = StashKey::new(*key, generation, slot);
        slot += 1;
        if !saved {
            // A first fragment too big to lend its room: those held are
            // lost (dropped ones are meant to be).
            if FRAG_STASH.remove(skey).is_ok() && !dropped {
                count(stat::FRAG_UNTRANSLATED);
            }
            continue;
        }
        let Some(frame) = FRAG_STASH.get_ptr(skey) else {
            continue;
        };
        if put(ctx, frame).is_err() {
            break;
        }
        // Whoever removes the slot sends the fragment: the one that held
        // it may be taking it back (see `hold`).
        if FRAG_STASH.remove(skey).is_ok()
            && unsafe { bpf_clone_redirect(ctx.skb.skb, ifindex, BPF_F_INGRESS as u64) } == 0
        {
            count(stat::FRAG_REPLAYED);
        }
    }
    !saved || FRAG_BUF.get_ptr(0).is_some_and(|buf| put(ctx, buf).is_ok())
}

/// `len` (already tested to be in 1..=[`FRAG_STASH_BYTES`]) in a form the
/// verifier can bound: the compiler folds a plain range test into one
/// unsigned comparison of `len - 1`, which the verifier cannot follow back
/// to `len`, so the value first goes through a register the compiler knows
/// nothing about, then is clamped (a no-op the verifier sees).
#[inline(always)]
fn bounded(len: u32) -> u32 {
    let mut len = len as u64;
    // SAFETY: a register moved to itself: the value comes out as it went
    // in. (An empty template would leave the kernel a line-info entry on
    // no instruction, which it refuses.)
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) len, options(pure, nomem, nostack)) };
    (len as u32).clamp(1, FRAG_STASH_BYTES as u32)
}

/// Copies the whole frame into the per-CPU buffer.
#[inline(always)]
fn save(ctx: &TcContext) -> bool {
    let Some(buf) = FRAG_BUF.get_ptr_mut(0) else {
        return false;
    };
    let len = ctx.len();
    if len as usize > FRAG_STASH_BYTES || len == 0 {
        return false;
    }
    let len = bounded(len);
    unsafe {
        (*buf).len = len;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            0,
            (*buf).bytes.as_mut_ptr() as *mut c_void,
            len,
        ) == 0
    }
}

/// Makes the skb's frame `frame`.
#[inline(always)]
fn put(ctx: &TcContext, frame: *const FragmentBytes) -> Result<(), ()> {
    let len = unsafe { (*frame).len };
    if len as usize > FRAG_STASH_BYTES || len == 0 {
        return Err(());
    }
    let len = bounded(len);
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, len, 0) != 0
            || bpf_skb_store_bytes(
                ctx.skb.skb,
                0,
                (*frame).bytes.as_ptr() as *const c_void,
                len,
                BPF_F_RECOMPUTE_CSUM as u64,
            ) != 0
        {
            return Err(());
        }
    }
    Ok(())
}

/// A later fragment: translated like its datagram's first fragment,
/// dropped with it, or (`hold_early`, at ingress) held until its first
/// comes.
#[inline(never)]
pub fn later(ctx: &TcContext, hold_early: bool) -> i32 {
    let Some((key, false)) = fragment(ctx) else {
        return TC_ACT_OK;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(v) = unsafe { FRAGS.get(key) }
        && v.flags & FRAG_FLAG_PENDING == 0
        && fresh(v, now)
    {
        return follow(ctx, &key, v);
    }
    if !hold_early {
        return TC_ACT_OK;
    }
    hold(ctx, &key, now)
}

/// Stashes an early fragment of `key` and drops it; passes it when it
/// cannot be held.
#[inline(always)]
fn hold(ctx: &TcContext, key: &FragKey, now: u64) -> i32 {
    let pending = FragValue {
        saddr: key.saddr,
        daddr: key.daddr,
        flags: FRAG_FLAG_PENDING,
        stashed: 0,
        created_ns: now,
    };
    let record = match FRAGS.get_ptr_mut(key) {
        Some(v) if unsafe { fresh(&*v, now) } => v,
        stale => {
            // A stale record goes; a new one raced in by another CPU stays.
            let flags = if stale.is_some() {
                0
            } else {
                BPF_NOEXIST as u64
            };
            let _ = FRAGS.insert(key, pending, flags);
            match FRAGS.get_ptr_mut(key) {
                Some(v) => v,
                None => return untranslated(),
            }
        }
    };
    if unsafe { (*record).flags } & FRAG_FLAG_PENDING == 0 {
        // Its first fragment came meanwhile.
        return follow(ctx, key, unsafe { &*record });
    }
    let Some(buf) = FRAG_BUF.get_ptr(0) else {
        return untranslated();
    };
    if !save(ctx) {
        return untranslated();
    }
    // A slot is claimed by inserting into it, so fragments of one datagram
    // coming in on several CPUs at once never share one.
    let generation = unsafe { (*record).created_ns } as u32;
    let mut slot = unsafe { (*record).stashed };
    let skey = loop {
        if slot >= FRAG_STASH_PER_DATAGRAM {
            return untranslated();
        }
        let skey = StashKey::new(*key, generation, slot);
        // By reference: the value is 9 KiB, more than the whole stack.
        #[allow(clippy::needless_borrows_for_generic_args)]
        let stored = FRAG_STASH.insert(skey, unsafe { &*buf }, BPF_NOEXIST as u64);
        if stored.is_ok() {
            break skey;
        }
        slot += 1;
    };
    unsafe {
        if (*record).stashed <= slot {
            (*record).stashed = slot + 1;
        }
    }
    count(stat::FRAG_STASHED);
    // The first fragment may have come on another CPU after this one
    // found its datagram pending, and replayed the stash before this slot
    // was in it: then this one is taken back and sent on here.
    if let Some(v) = unsafe { FRAGS.get(key) }
        && v.flags & FRAG_FLAG_PENDING == 0
        && FRAG_STASH.remove(skey).is_ok()
    {
        return follow(ctx, key, v);
    }
    TC_ACT_SHOT
}

#[inline(always)]
fn untranslated() -> i32 {
    count(stat::FRAG_UNTRANSLATED);
    TC_ACT_OK
}

/// Gives a later fragment of `key` what its first fragment got.
#[inline(always)]
fn follow(ctx: &TcContext, key: &FragKey, v: &FragValue) -> i32 {
    if v.flags & FRAG_FLAG_DROP != 0 {
        return TC_ACT_SHOT;
    }
    let (saddr, daddr, redirect) = (v.saddr, v.daddr, v.flags & FRAG_FLAG_REDIRECT != 0);
    for (off, old, new) in [
        (IP_SRC_OFF, key.saddr, saddr),
        (IP_DST_OFF, key.daddr, daddr),
    ] {
        if old != new
            && (ctx
                .l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)
                .is_err()
                || ctx.store(off, &new, 0).is_err())
        {
            return TC_ACT_SHOT;
        }
    }
    if (saddr, daddr) != (key.saddr, key.daddr) {
        count(stat::FRAGMENTS);
    }
    if redirect {
        fib_redirect(ctx)
    } else {
        TC_ACT_OK
    }
}
