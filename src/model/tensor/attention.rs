//! Attention of a ragged batch in a fixed number of tensor calls per layer, whatever the number of
//! sequences.
//!
//! The chunks of a call form at most two groups: single rows (decoding tokens) and longer chunks
//! (prompts), so that a long prompt does not pad every decoding row to its length. A group of `G`
//! chunks with at most `Q` rows and `T` visible positions each is computed padded: the queries are
//! gathered into `[G, heads, Q, head_dim]`, the group's cached keys and values are concatenated and
//! gathered into `[G, heads, T, head_dim]`, and one mask `[G, 1, Q, T]` hides the positions a row
//! may not see (later positions, another chunk's padding). Per group that is two concatenations,
//! three gathers, two batched matmuls, the mask and a softmax; one last gather puts the rows back
//! in order. The plan (gather indices and masks) depends only on the chunks' positions, so it is
//! built once per entry-point call and shared by all its layers.

use candle_core::{DType, Device, Tensor};

use crate::model::error::Result;

/// The gathers and masks of one call.
pub struct GatherPlan {
    groups: Vec<Group>,
    /// For each token row, its row in the groups' padded outputs; `None` when they are in order.
    order: Option<Tensor>,
}

struct Group {
    chunks: Vec<usize>,
    /// Rows per chunk (`Q`) and visible positions per chunk (`T`), after padding.
    rows: usize,
    keys: usize,
    /// `[G * Q]` rows of the call's queries; `None` when the group is the whole call, unpadded.
    queries: Option<Tensor>,
    /// `[G * T]` rows of the group's concatenated keys; `None` when there is nothing to pad.
    positions: Option<Tensor>,
    /// `[G, 1, Q, T]` float32: 0 where a row sees a position, -inf elsewhere.
    mask: Option<Tensor>,
}

impl GatherPlan {
    /// `spans[c]` = (first position, rows) of chunk `c`; its rows follow those of chunk `c - 1`.
    pub fn new(spans: &[(usize, usize)], device: &Device) -> Result<Self> {
        let mut first_row = Vec::with_capacity(spans.len());
        let mut tokens = 0;
        for &(_, len) in spans {
            first_row.push(tokens);
            tokens += len;
        }
        let (singles, longer): (Vec<usize>, Vec<usize>) = (0..spans.len()).partition(|&c| spans[c].1 == 1);
        let whole = spans.len() == 1;
        let mut order = vec![0u32; tokens];
        let mut groups = Vec::with_capacity(2);
        let mut base = 0;
        for chunks in [singles, longer].into_iter().filter(|g| !g.is_empty()) {
            let rows = chunks.iter().map(|&c| spans[c].1).max().unwrap_or(1);
            let keys = chunks.iter().map(|&c| spans[c].0 + spans[c].1).max().unwrap_or(1);
            let mut queries = Vec::with_capacity(chunks.len() * rows);
            let mut positions = Vec::with_capacity(chunks.len() * keys);
            let mut mask = Vec::with_capacity(chunks.len() * rows * keys);
            let mut offset = 0;
            let mut hidden = false;
            for (g, &c) in chunks.iter().enumerate() {
                let (start, len) = spans[c];
                let seen = start + len;
                for i in 0..rows {
                    // Padding rows repeat the chunk's last row (and are dropped at the end).
                    let row = i.min(len - 1);
                    queries.push((first_row[c] + row) as u32);
                    if i < len {
                        order[first_row[c] + i] = (base + g * rows + i) as u32;
                    }
                    for j in 0..keys {
                        let visible = j <= start + row;
                        hidden |= !visible;
                        mask.push(if visible { 0.0f32 } else { f32::NEG_INFINITY });
                    }
                }
                positions.extend((0..keys).map(|j| (offset + j.min(seen - 1)) as u32));
                offset += seen;
            }
            let count = chunks.len();
            groups.push(Group {
                rows,
                keys,
                queries: if whole { None } else { Some(Tensor::new(queries, device)?) },
                positions: if count == 1 { None } else { Some(Tensor::new(positions, device)?) },
                mask: if hidden { Some(Tensor::from_vec(mask, (count, 1, rows, keys), device)?) } else { None },
                chunks,
            });
            base += count * rows;
        }
        let in_order = order.iter().enumerate().all(|(i, &r)| r as usize == i) && base == tokens;
        Ok(Self { groups, order: if in_order { None } else { Some(Tensor::new(order, device)?) } })
    }
}

/// `q`: `[tokens, heads, head_dim]`, already scaled; `cached[c]`: chunk `c`'s keys and values up
/// to its last position, `[positions, kv_heads, head_dim]` (with fewer key/value heads than query
/// heads, query head `h` reads head `h / (heads / kv_heads)`). Returns `[tokens, heads * head_dim]`.
pub fn attend(q: &Tensor, cached: &[(Tensor, Tensor)], plan: &GatherPlan) -> Result<Tensor> {
    let (_, heads, head_dim) = q.dims3()?;
    let kv_heads = match cached.first() {
        Some((k, _)) => k.dim(1)?,
        None => heads,
    };
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(crate::model::ModelError::InvalidArgument(format!(
            "{kv_heads} key/value heads do not divide {heads} query heads"
        )));
    }
    let per_group = heads / kv_heads;
    let dtype = q.dtype();
    let q = q.contiguous()?;
    let mut outputs = Vec::with_capacity(plan.groups.len());
    for group in &plan.groups {
        let count = group.chunks.len();
        let gather = |pick: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
            let parts: Vec<&Tensor> = group.chunks.iter().map(|&c| pick(&cached[c])).collect();
            let all = if parts.len() == 1 { parts[0].clone() } else { Tensor::cat(&parts, 0)? };
            let all = match &group.positions {
                Some(index) => all.index_select(index, 0)?,
                None => all,
            };
            // [G * T, kv_heads, hd] -> [G, kv_heads, T, hd], each head repeated for its query group
            // (head h = kv * per_group + g): [G, heads, T, hd].
            let all = all.to_dtype(dtype)?.reshape((count, group.keys, kv_heads, head_dim))?.transpose(1, 2)?;
            let all = if per_group == 1 {
                all
            } else {
                let shape = (count, kv_heads, per_group, group.keys, head_dim);
                all.unsqueeze(2)?.expand(shape)?.reshape((count, heads, group.keys, head_dim))?
            };
            Ok(all.contiguous()?)
        };
        let (keys, values) = (gather(|kv| &kv.0)?, gather(|kv| &kv.1)?);
        let queries = match &group.queries {
            Some(index) => q.index_select(index, 0)?,
            None => q.clone(),
        };
        let queries = queries.reshape((count, group.rows, heads, head_dim))?.transpose(1, 2)?.contiguous()?;
        let scores = queries.matmul(&keys.t()?)?.to_dtype(DType::F32)?; // [G, heads, Q, T]
        let scores = match &group.mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&values)?; // [G, heads, Q, hd]
        outputs.push(out.transpose(1, 2)?.reshape((count * group.rows, heads * head_dim))?);
    }
    let all = if outputs.len() == 1 { outputs.swap_remove(0) } else { Tensor::cat(&outputs, 0)? };
    Ok(match &plan.order {
        Some(index) => all.index_select(index, 0)?,
        None => all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: each chunk alone, each row over its causal prefix, with plain loops.
    fn reference(q: &Tensor, spans: &[(usize, usize)], cached: &[(Tensor, Tensor)]) -> Vec<Vec<f32>> {
        let q = q.to_dtype(DType::F32).unwrap();
        let mut out = Vec::new();
        let mut row = 0;
        for (&(start, len), (k, v)) in spans.iter().zip(cached) {
            for i in 0..len {
                let seen = start + i + 1;
                let qi = q.get(row + i).unwrap().unsqueeze(1).unwrap(); // [heads, 1, hd]
                let k = k.narrow(0, 0, seen).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
                let v = v.narrow(0, 0, seen).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
                let scores = qi.matmul(&k.t().unwrap()).unwrap();
                let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                out.push(probs.matmul(&v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            row += len;
        }
        out
    }

    #[test]
    fn grouped_query_heads_read_their_group_s_key_value_head() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd) = (4, 2, 8);
        let spans = [(3, 1), (0, 5)];
        let tokens: usize = spans.iter().map(|s| s.1).sum();
        let q = Tensor::randn(0f32, 1.0, (tokens, heads, hd), &dev).unwrap();
        let grouped = |n: usize| Tensor::randn(0f32, 1.0, (n, kv_heads, hd), &dev).unwrap();
        let cached: Vec<(Tensor, Tensor)> =
            spans.iter().map(|&(start, len)| (grouped(start + len), grouped(start + len))).collect();
        // The same keys and values, one copy per query head (heads 0, 1 read 0; heads 2, 3 read 1).
        let copies = Tensor::new(&[0u32, 0, 1, 1], &dev).unwrap();
        let repeat = |t: &Tensor| t.index_select(&copies, 1).unwrap();
        let full: Vec<(Tensor, Tensor)> = cached.iter().map(|(k, v)| (repeat(k), repeat(v))).collect();
        let plan = GatherPlan::new(&spans, &dev).unwrap();
        let gqa = attend(&q, &cached, &plan).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(gqa, attend(&q, &full, &plan).unwrap().to_vec2::<f32>().unwrap());
        let three: Vec<(Tensor, Tensor)> = spans
            .iter()
            .map(|&(s, l)| {
                (repeat(&grouped(s + l)).narrow(1, 0, 3).unwrap(), repeat(&grouped(s + l)).narrow(1, 0, 3).unwrap())
            })
            .collect();
        assert!(attend(&q, &three, &plan).is_err(), "3 key/value heads do not divide 4");
    }

    #[test]
    fn a_ragged_batch_matches_each_chunk_alone() {
        let dev = Device::Cpu;
        let (heads, hd) = (4, 8);
        // Decode rows and prompt chunks mixed, in an order that interleaves the two groups.
        let spans = [(5, 1), (0, 6), (2, 1), (3, 4), (0, 1), (9, 1)];
        let tokens: usize = spans.iter().map(|s| s.1).sum();
        let q = Tensor::randn(0f32, 1.0, (tokens, heads, hd), &dev).unwrap();
        let cached: Vec<(Tensor, Tensor)> = spans
            .iter()
            .map(|&(start, len)| {
                // A buffer with spare capacity, viewed up to the chunk's last position.
                let buffer = || Tensor::randn(0f32, 1.0, (start + len + 3, heads, hd), &dev).unwrap();
                (buffer().narrow(0, 0, start + len).unwrap(), buffer().narrow(0, 0, start + len).unwrap())
            })
            .collect();
        let plan = GatherPlan::new(&spans, &dev).unwrap();
        assert_eq!(plan.groups.len(), 2, "decode rows and prompt chunks");
        let got = attend(&q, &cached, &plan).unwrap().to_vec2::<f32>().unwrap();
        let want = reference(&q, &spans, &cached);
        assert_eq!(got.len(), want.len());
        for (r, (a, b)) in got.iter().zip(&want).enumerate() {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-5, "row {r}: {diff}");
        }
        // One chunk alone (no gathers) agrees too.
        for c in [0, 1] {
            let row: usize = spans[..c].iter().map(|s| s.1).sum();
            let alone = GatherPlan::new(&spans[c..=c], &dev).unwrap();
            let q_c = q.narrow(0, row, spans[c].1).unwrap();
            let out = attend(&q_c, &cached[c..=c], &alone).unwrap().to_vec2::<f32>().unwrap();
            for (i, a) in out.iter().enumerate() {
                let diff = a.iter().zip(&want[row + i]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(diff < 1e-5, "chunk {c} row {i}: {diff}");
            }
        }
    }
}
