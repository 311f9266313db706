//! The prefix cache of one worker: blocks of a prompt's K/V at every step of its prefill (see
//! `model::cache::prefix`), keyed by a hash chain over the tokens and everything else the K/V
//! depends on ([`PrefillKey`]), so that a prompt whose beginning was prefilled before skips that
//! part and computes exactly what a cold prefill computes.
//!
//! A block is reference-counted: the cache holds one `Arc`, and every sequence prefilling from it
//! holds another until its prefill ends; a block some sequence holds is never evicted. Unused
//! blocks go least recently used first, a chain from its end (a lookup touches a chain's blocks so
//! that its last is the oldest), within the budget `engine.prefix_cache_bytes`. The scheduler counts
//! the cache's bytes in the worker's K/V accounting (`engine.max_kv_bytes`).

pub mod hash;

use std::collections::HashMap;
use std::sync::Arc;

use metrics::{counter, gauge};

pub use hash::{Digest32, PrefillKey, PromptChain, model_fingerprint};

use crate::metrics as m;
use crate::model::PrefixBlock;

struct Entry {
    block: Arc<PrefixBlock>,
    /// When it was last used (a logical clock).
    used: u64,
}

pub struct PrefixCache {
    budget: usize,
    bytes: usize,
    blocks: HashMap<Digest32, Entry>,
    clock: u64,
    worker: Arc<str>,
}

impl PrefixCache {
    /// A cache of at most `budget` bytes (`None` for 0: caching off).
    pub fn new(budget: usize, worker: Arc<str>) -> Option<Self> {
        (budget > 0).then(|| {
            let cache = Self { budget, bytes: 0, blocks: HashMap::new(), clock: 0, worker };
            cache.publish();
            cache
        })
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes of the blocks held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes of the blocks a running sequence holds (which cannot be evicted).
    pub fn pinned_bytes(&self) -> usize {
        self.blocks.values().filter(|e| Arc::strong_count(&e.block) > 1).map(|e| e.block.bytes()).sum()
    }

    fn publish(&self) {
        gauge!(m::PREFIX_BYTES, "worker" => self.worker.to_string()).set(self.bytes as f64);
    }

    /// The cached blocks of `keys` from the first, as far as they run without a gap; they count
    /// as used now, the last of the run least recently.
    pub fn lookup(&mut self, keys: &[Digest32]) -> Vec<Arc<PrefixBlock>> {
        let found: Vec<Arc<PrefixBlock>> =
            keys.iter().map_while(|key| self.blocks.get(key).map(|e| e.block.clone())).collect();
        self.touch(&keys[..found.len()]);
        found
    }

    fn touch(&mut self, keys: &[Digest32]) {
        for key in keys.iter().rev() {
            self.clock += 1;
            if let Some(entry) = self.blocks.get_mut(key) {
                entry.used = self.clock;
            }
        }
    }

    /// Evicts unused blocks, least recently used first, until the cache holds at most `limit`
    /// bytes; false when the blocks in use alone exceed it.
    pub fn shrink_to(&mut self, limit: usize) -> bool {
        let mut evicted = 0u64;
        if self.bytes > limit {
            let mut unused: Vec<(u64, Digest32)> = self
                .blocks
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.block) == 1)
                .map(|(key, e)| (e.used, *key))
                .collect();
            unused.sort_unstable();
            for (_, key) in unused {
                if self.bytes <= limit {
                    break;
                }
                if let Some(entry) = self.blocks.remove(&key) {
                    self.bytes -= entry.block.bytes();
                    evicted += 1;
                }
            }
        }
        if evicted > 0 {
            counter!(m::PREFIX_EVICTIONS, "worker" => self.worker.to_string()).increment(evicted);
            self.publish();
        }
        self.bytes <= limit
    }

    /// Adds the blocks of a prompt (`keys[i]` is block `i`'s key), in order, those not yet held,
    /// while the cache stays within `limit` bytes (and its budget), evicting unused blocks for
    /// room; a block that does not fit ends the insertion (the later ones would be unreachable).
    /// Returns how many were added.
    pub fn insert(&mut self, keys: &[Digest32], blocks: Vec<(usize, PrefixBlock)>, limit: usize) -> usize {
        let limit = limit.min(self.budget);
        let mut added = 0;
        let mut end = 0;
        // The chain's blocks are held while it grows, so that room for a later block is never
        // made by evicting an earlier one.
        let mut held: Vec<Arc<PrefixBlock>> = keys
            .iter()
            .take(blocks.first().map_or(0, |(index, _)| *index))
            .map_while(|key| self.blocks.get(key).map(|e| e.block.clone()))
            .collect();
        for (index, block) in blocks {
            let Some(&key) = keys.get(index) else { break };
            if let Some(entry) = self.blocks.get(&key) {
                held.push(entry.block.clone());
                end = index + 1;
                continue;
            }
            let size = block.bytes();
            if size > limit || !self.shrink_to(limit - size) {
                break;
            }
            self.bytes += size;
            let block = Arc::new(block);
            held.push(block.clone());
            self.blocks.insert(key, Entry { block, used: 0 });
            added += 1;
            end = index + 1;
        }
        drop(held);
        self.touch(&keys[..end]);
        self.publish();
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> Digest32 {
        [i; 32]
    }

    fn blocks(range: std::ops::Range<usize>) -> Vec<(usize, PrefixBlock)> {
        range.map(|i| (i, PrefixBlock::sized(100))).collect()
    }

    #[test]
    fn a_block_in_use_is_never_evicted() {
        let mut cache = PrefixCache::new(1000, "w".into()).unwrap();
        let chain: Vec<Digest32> = (0..4).map(key).collect();
        assert_eq!(cache.insert(&chain, blocks(0..4), 1000), 4);
        let held = cache.lookup(&chain[..2]);
        assert_eq!((held.len(), cache.pinned_bytes()), (2, 200));
        // Asked for nothing, it keeps the two blocks a prefill holds.
        assert!(!cache.shrink_to(0));
        assert_eq!((cache.bytes(), cache.len()), (200, 2));
        assert_eq!(cache.lookup(&chain).len(), 2, "the held blocks are still found");
        drop(held);
        assert!(cache.shrink_to(0));
        assert!(cache.is_empty());
    }

    #[test]
    fn eviction_takes_the_least_recently_used_chain_from_its_end() {
        let mut cache = PrefixCache::new(600, "w".into()).unwrap();
        let a: Vec<Digest32> = (0..3).map(key).collect();
        let b: Vec<Digest32> = (10..13).map(key).collect();
        cache.insert(&a, blocks(0..3), 600);
        cache.insert(&b, blocks(0..3), 600);
        drop(cache.lookup(&a));
        // Room for one more block: b's last goes, and b's beginning stays reachable.
        assert!(cache.shrink_to(500));
        assert_eq!(cache.lookup(&a).len(), 3);
        assert_eq!(cache.lookup(&b).len(), 2);
        // A new chain's insertion evicts unused blocks but stops where the limit would break.
        let c: Vec<Digest32> = (20..26).map(key).collect();
        let held = cache.lookup(&a);
        assert_eq!(cache.insert(&c, blocks(0..6), 600), 3);
        assert_eq!(cache.bytes(), 600);
        assert_eq!(cache.lookup(&a).len(), 3, "a block in use was evicted");
        drop(held);
    }

    #[test]
    fn a_zero_budget_turns_the_cache_off() {
        assert!(PrefixCache::new(0, "w".into()).is_none());
    }
}
