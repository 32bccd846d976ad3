//! Helpers of the tests that drive `Llama::forward` directly (`model_goldens`,
//! `parallel_tensor`): a page pool, interleaved block tables, logits rows and argmax.
//! Included with `#[path]`, not through `common`, so that HTTP tests do not carry it.
#![allow(dead_code)]

use burn::prelude::Backend;
use burn::tensor::Tensor;

pub const PAGE_SIZE: usize = 4;
pub const NUM_PAGES: usize = 1024;

/// Pages for sequence `seq`, interleaved with other sequences' so that tables are not contiguous.
pub fn block_table(seq: usize, n_seqs: usize, tokens: usize) -> Vec<u32> {
    (0..tokens.div_ceil(PAGE_SIZE))
        .map(|i| (NUM_PAGES - 1 - (i * n_seqs + seq)) as u32)
        .collect()
}

/// The rows of a `[rows, vocab]` logits tensor.
pub fn logits_rows<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [rows, cols] = t.dims();
    let v = t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    (0..rows).map(|r| v[r * cols..(r + 1) * cols].to_vec()).collect()
}

/// The first index of the maximum, as transformers' greedy picks it.
pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &x)| if x > best.1 { (i, x) } else { best },
        )
        .0 as u32
}
