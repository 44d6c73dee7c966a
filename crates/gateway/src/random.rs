//! The gateway's ids, request ids and trace ids, drawn from a per-thread
//! wyrand generator seeded from the thread's CSPRNG, and written out as
//! hex without a table or `fmt`.
//!
//! These ids must be unlikely to collide, not secret: nothing is
//! authorised by knowing one, and each is handed to whoever sent or
//! receives the request. wyrand takes one multiply per 64 bits; drawing
//! a request id's 16 bytes from the CSPRNG (ChaCha) and formatting them
//! with the uuid crate cost ~270 instructions per request
//! (`benches/gateway/instructions.sh`), the largest of the small items of
//! a proxied request.

use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = Cell::new(rand::RngCore::next_u64(&mut rand::rng()));
}

/// 64 random bits (wyrand: one multiply).
pub(crate) fn next() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    })
}

/// `x` as 16 lower-case hex digits, most significant first, without a
/// table: each nibble spread into a byte of its own, then made a digit.
pub(crate) fn hex(x: u64) -> [u8; 16] {
    fn spread(x: u32) -> u64 {
        let mut x = u64::from(x);
        x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    }
    fn digits(n: u64) -> u64 {
        // Nibbles of 10 and more get 'a' - '0' - 10 = 39 more.
        let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        n + 0x3030_3030_3030_3030 + letters * 39
    }
    // `spread` puts a u32's nibbles one to a byte, the most significant
    // in the most significant byte: read big-endian, they are in order.
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&digits(spread((x >> 32) as u32)).to_be_bytes());
    out[8..].copy_from_slice(&digits(spread(x as u32)).to_be_bytes());
    out
}

/// A random (version 4) UUID in its hyphenated lower-case form, as RFC
/// 9562 writes it: 122 random bits, the version and variant bits set.
pub(crate) fn uuid_v4() -> [u8; 36] {
    // Octet 6's high nibble is the version (4); octet 8's two high bits
    // the variant (10). `hi` holds octets 0–7, `lo` octets 8–15.
    let hi = (next() & !0xf000) | 0x4000;
    let lo = (next() & !(0xc0 << 56)) | (0x80 << 56);
    let (h, l) = (hex(hi), hex(lo));
    let mut out = *b"........-....-....-....-............";
    out[..8].copy_from_slice(&h[..8]);
    out[9..13].copy_from_slice(&h[8..12]);
    out[14..18].copy_from_slice(&h[12..]);
    out[19..23].copy_from_slice(&l[..4]);
    out[24..].copy_from_slice(&l[4..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_what_format_writes() {
        for x in [
            0u64,
            1,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            u64::MAX,
            0xa0a0_0505_f00f_9999,
        ] {
            assert_eq!(
                std::str::from_utf8(&hex(x)).unwrap_or_default(),
                format!("{x:016x}")
            );
        }
        for _ in 0..1000 {
            let x = next();
            assert_eq!(
                std::str::from_utf8(&hex(x)).unwrap_or_default(),
                format!("{x:016x}")
            );
        }
    }

    #[test]
    fn a_uuid_is_a_version_4_uuid_and_never_the_same() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let text = uuid_v4();
            let parsed = uuid::Uuid::try_parse_ascii(&text).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 4, "{parsed}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{parsed}");
            // Written as the uuid crate writes it: lower case, hyphenated.
            assert_eq!(parsed.hyphenated().to_string().as_bytes(), &text[..]);
            assert!(seen.insert(text), "a UUID twice");
        }
    }

    #[test]
    fn each_thread_draws_its_own_numbers() {
        let here: Vec<u64> = (0..4).map(|_| next()).collect();
        let there = std::thread::spawn(|| (0..4).map(|_| next()).collect::<Vec<u64>>())
            .join()
            .expect("the thread");
        assert_ne!(here, there);
    }
}
