//! Stack node ids that are the same in every block: a node's id is a hash of
//! its parent's id and its frame name, so a stack (a leaf node) has one id
//! everywhere and merging blocks is a union of nodes and a GROUP BY on ids.

/// The id of the (virtual) root above every stack's first frame.
pub const ROOT: u64 = 0;

/// FNV-1a 64: stable across releases and platforms, unlike std's hasher.
pub fn node_id(parent: u64, name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in parent.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    // 0 is the root; a real node never takes it.
    if h == ROOT {
        1
    } else {
        h
    }
}

/// How many frames two stacks share from the root, found eight frames at a
/// time: sorted stacks mostly part near the leaf, after a long shared
/// prefix, which a frame-by-frame compare walks one step per frame.
pub fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    let n = a.len().min(b.len());
    let whole = a[..n]
        .chunks_exact(8)
        .zip(b[..n].chunks_exact(8))
        // As arrays the eight compare in a vector register, inline.
        .take_while(|(x, y)| <[u32; 8]>::try_from(*x).ok() == <[u32; 8]>::try_from(*y).ok())
        .count()
        * 8;
    whole
        + a[whole..n]
            .iter()
            .zip(&b[whole..n])
            .take_while(|(x, y)| x == y)
            .count()
}

/// The order of two stacks, as `Ord` for slices gives it, from their
/// [`shared_prefix`].
pub fn stack_order(a: &[u32], b: &[u32]) -> std::cmp::Ordering {
    let n = shared_prefix(a, b);
    a.get(n).cmp(&b.get(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_ordered_as_slices_order_them() {
        let base: Vec<u32> = (0..40).map(|i| i % 7).collect();
        let mut stacks: Vec<Vec<u32>> = vec![vec![], vec![0], base.clone()];
        for len in [1, 7, 8, 9, 16, 17, 39, 40] {
            stacks.push(base[..len].to_vec());
            for at in [0, len / 2, len - 1] {
                for delta in [-1i64, 1] {
                    let mut s = base[..len].to_vec();
                    s[at] = (i64::from(s[at]) + delta).max(0) as u32;
                    stacks.push(s);
                }
            }
        }
        for a in &stacks {
            for b in &stacks {
                assert_eq!(stack_order(a, b), a.cmp(b), "{a:?} vs {b:?}");
                let shared = a.iter().zip(b).take_while(|(x, y)| x == y).count();
                assert_eq!(shared_prefix(a, b), shared, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn ids_depend_on_the_whole_path() {
        let a = node_id(ROOT, "main");
        let b = node_id(a, "work");
        assert_ne!(a, b);
        assert_ne!(node_id(ROOT, "work"), b);
        assert_eq!(node_id(node_id(ROOT, "main"), "work"), b);
    }
}
