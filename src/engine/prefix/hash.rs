//! Content addresses of a prompt: a hash chain over its tokens (`link p` commits to tokens
//! `0..=p`), from which come the noise seed of each position's initial state and the keys of its
//! cached blocks.

use sha2::{Digest, Sha256};

use crate::model::PREFIX_BLOCK_TOKENS;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// The hash chain of a prompt's tokens.
#[derive(Debug, Clone)]
pub struct PromptChain {
    links: Vec<Digest32>,
}

impl PromptChain {
    pub fn new(tokens: &[u32]) -> Self {
        let mut links = Vec::with_capacity(tokens.len());
        let mut last: Digest32 = Sha256::digest(b"huginn prompt chain v1").into();
        for &token in tokens {
            let mut h = Sha256::new();
            h.update(last);
            h.update(token.to_le_bytes());
            last = h.finalize().into();
            links.push(last);
        }
        Self { links }
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// The seeds of the initial states of positions `range` (each a function of the prompt up to
    /// and including its position, never of the request).
    pub fn noise_seeds(&self, range: std::ops::Range<usize>) -> Vec<u64> {
        self.links[range].iter().map(|link| u64::from_le_bytes(link[..8].try_into().unwrap_or([0; 8]))).collect()
    }

    /// The keys of the prompt's complete blocks under `prefill` (block `b`: positions
    /// `16b..16b + 16`).
    pub fn block_keys(&self, prefill: &PrefillKey) -> Vec<Digest32> {
        self.links
            .chunks_exact(PREFIX_BLOCK_TOKENS)
            .map(|block| {
                let mut h = Sha256::new();
                h.update(prefill.0);
                h.update(block[PREFIX_BLOCK_TOKENS - 1]);
                h.finalize().into()
            })
            .collect()
    }
}

/// Everything a prompt's K/V depends on besides its tokens: the model (its configuration, weights
/// dtype and kernels), the steps its prefill runs, the initial state's scale and, under the exit
/// gate, the threshold (each prompt row's coda reads its exit loop's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillKey(Digest32);

impl PrefillKey {
    /// `model` identifies the weights and kernels (see [`model_fingerprint`]).
    pub fn new(model: &Digest32, steps: usize, init_scale: f64, gate_threshold: Option<f64>) -> Self {
        let mut h = Sha256::new();
        h.update(b"huginn prefill v1");
        h.update(model);
        h.update((steps as u64).to_le_bytes());
        h.update(init_scale.to_bits().to_le_bytes());
        match gate_threshold {
            Some(q) => {
                h.update([1]);
                h.update(q.to_bits().to_le_bytes());
            }
            None => h.update([0]),
        }
        Self(h.finalize().into())
    }
}

/// A digest of what a model computes with: its configuration, the weights' dtype and the kernels.
/// A cache belongs to one worker's replica, so this only guards against mixing models by mistake.
pub fn model_fingerprint(config_json: &str, dtype: &str, backend: &str) -> Digest32 {
    let mut h = Sha256::new();
    for part in [config_json, dtype, backend] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_depends_on_every_token_before_it_and_on_nothing_after() {
        let a = PromptChain::new(&[1, 2, 3, 4]);
        let b = PromptChain::new(&[1, 2, 3, 5]);
        let c = PromptChain::new(&[9, 2, 3, 4]);
        assert_eq!(a.links[..3], b.links[..3], "same tokens so far, same links");
        assert_ne!(a.links[3], b.links[3]);
        assert!(a.links.iter().zip(&c.links).all(|(x, y)| x != y), "a different first token changes every link");
        assert_eq!(a.noise_seeds(0..3), b.noise_seeds(0..3));
        assert_ne!(a.noise_seeds(3..4), b.noise_seeds(3..4));
    }

    #[test]
    fn block_keys_cover_complete_blocks_and_depend_on_the_prefill() {
        let tokens: Vec<u32> = (0..40).collect();
        let chain = PromptChain::new(&tokens);
        let model = model_fingerprint("{}", "f32", "cpu");
        let key = PrefillKey::new(&model, 8, 1.0, None);
        let keys = chain.block_keys(&key);
        assert_eq!(keys.len(), 2, "40 tokens hold two complete blocks of 16");
        let longer = PromptChain::new(&(0..48).collect::<Vec<_>>()).block_keys(&key);
        assert_eq!(keys[..], longer[..2], "a longer prompt with the same beginning has the same first keys");
        for other in [
            PrefillKey::new(&model, 4, 1.0, None),
            PrefillKey::new(&model, 8, 0.0, None),
            PrefillKey::new(&model, 8, 1.0, Some(0.5)),
            PrefillKey::new(&model_fingerprint("{}", "bf16", "cpu"), 8, 1.0, None),
        ] {
            assert_ne!(chain.block_keys(&other)[0], keys[0]);
        }
    }
}
