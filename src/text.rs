//! Byte-string compares for the request path. The names compared there (key prefix and
//! environment, deployment and scope names, path prefixes) are a few bytes long, and a call
//! into libc's `memcmp`, which `==` on slices becomes, cost more than the compare itself:
//! six calls were ~8% of a decision's instructions besides hashing.

/// `a == b`, with two overlapping word loads instead of a `memcmp` call for up to 16 bytes.
/// Not constant-time: for names, never for secrets.
#[inline]
pub fn short_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let w4 = |s: &[u8], at: usize| {
        s.get(at..at + 4)
            .and_then(|w| w.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let w8 = |s: &[u8], at: usize| {
        s.get(at..at + 8)
            .and_then(|w| w.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    match n {
        0 => true,
        // Positions 0, n/2 and n-1 cover every byte of 1 to 3.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        _ => a == b,
    }
}

/// `s.starts_with(prefix)` with [`short_eq`].
#[inline]
pub fn starts_with(s: &[u8], prefix: &[u8]) -> bool {
    s.get(..prefix.len())
        .is_some_and(|head| short_eq(head, prefix))
}

/// `s.strip_prefix(prefix)` with [`short_eq`].
#[inline]
pub fn strip_prefix<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    if starts_with(s.as_bytes(), prefix.as_bytes()) {
        // In bounds, and at a character boundary: the prefix is whole text that matched.
        s.get(prefix.len()..)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_slice_equality_for_every_length_and_difference() {
        for n in 0..=40usize {
            let a: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
            assert!(short_eq(&a, &a.clone()), "len {n}");
            // A difference in any one byte is seen.
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x01;
                assert!(!short_eq(&a, &b), "len {n}, byte {at}");
            }
            // Different lengths never match, even as prefixes of each other.
            let mut longer = a.clone();
            longer.push(0);
            assert!(!short_eq(&a, &longer) && !short_eq(&longer, &a), "len {n}");
        }
    }

    #[test]
    fn prefixes() {
        assert!(starts_with(b"kg_live_x", b"kg"));
        assert!(starts_with(b"kg", b"kg"));
        assert!(!starts_with(b"k", b"kg"));
        assert!(!starts_with(b"kx_live", b"kg"));
        assert!(starts_with(b"anything", b""));
        assert_eq!(strip_prefix("/items/42", "/items"), Some("/42"));
        assert_eq!(strip_prefix("/items", "/items"), Some(""));
        assert_eq!(strip_prefix("/item", "/items"), None);
        assert_eq!(strip_prefix("/ïtems", "/i"), None);
    }
}
