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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_depend_on_the_whole_path() {
        let a = node_id(ROOT, "main");
        let b = node_id(a, "work");
        assert_ne!(a, b);
        assert_ne!(node_id(ROOT, "work"), b);
        assert_eq!(node_id(node_id(ROOT, "main"), "work"), b);
    }
}
