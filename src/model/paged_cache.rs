//! The K/V page tensors of every layer, owned by the executor.
//!
//! Each layer holds K and V as `[num_pages * page_size, kv_heads * head_dim]`: row
//! `page * page_size + offset` is one token's slot. The KV-page manager decides which pages a
//! sequence owns; this type only writes and reads slots. Writes go in place (`slice_assign`
//! on a uniquely owned tensor), so a step never copies the cache.

use burn::prelude::*;
use burn::tensor::DType;

struct LayerCache<B: Backend> {
    k: Option<Tensor<B, 2>>,
    v: Option<Tensor<B, 2>>,
}

pub struct PagedKvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    page_size: usize,
    num_pages: usize,
}

impl<B: Backend> PagedKvCache<B> {
    pub fn new(
        num_layers: usize,
        num_pages: usize,
        page_size: usize,
        kv_dim: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Self {
        let slots = num_pages * page_size;
        let zeros = || Some(Tensor::<B, 2>::zeros([slots, kv_dim], (device, dtype)));
        Self {
            layers: (0..num_layers)
                .map(|_| LayerCache {
                    k: zeros(),
                    v: zeros(),
                })
                .collect(),
            page_size,
            num_pages,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Writes rows of `k` and `v` (`[n, kv_dim]`) into `slots` (`n` slot ids) of `layer`.
    ///
    /// burn 0.21 has no overwriting `select_assign` on every backend, so consecutive slots are
    /// written as one `slice_assign` each: one per page touched, one per sequence in decode.
    pub fn write(&mut self, layer: usize, slots: &[i32], k: Tensor<B, 2>, v: Tensor<B, 2>) {
        let cache = &mut self.layers[layer];
        let mut ck = cache.k.take().expect("layer cache present between writes");
        let mut cv = cache.v.take().expect("layer cache present between writes");
        let width = k.dims()[1];
        let mut row = 0;
        while row < slots.len() {
            let mut end = row + 1;
            while end < slots.len() && slots[end] == slots[end - 1] + 1 {
                end += 1;
            }
            let first = slots[row] as usize;
            let dst = [first..first + (end - row), 0..width];
            ck = ck.slice_assign(dst.clone(), k.clone().slice([row..end, 0..width]));
            cv = cv.slice_assign(dst, v.clone().slice([row..end, 0..width]));
            row = end;
        }
        cache.k = Some(ck);
        cache.v = Some(cv);
    }

    /// Copies every layer's K/V of page `src` into page `dst` (copy-on-write of a shared page).
    pub fn copy_page(&mut self, src: u32, dst: u32) {
        let ps = self.page_size;
        let (src, dst) = (src as usize * ps, dst as usize * ps);
        for cache in &mut self.layers {
            for t in [&mut cache.k, &mut cache.v] {
                let whole = t.take().expect("layer cache present between writes");
                let width = whole.dims()[1];
                let rows = whole.clone().slice([src..src + ps, 0..width]);
                *t = Some(whole.slice_assign([dst..dst + ps, 0..width], rows));
            }
        }
    }

    /// Reads the K and V rows at `slots` of `layer`, in slot-list order: `[n, kv_dim]` each.
    pub fn gather(&self, layer: usize, slots: Tensor<B, 1, Int>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let cache = &self.layers[layer];
        let k = cache
            .k
            .as_ref()
            .expect("layer cache present")
            .clone()
            .select(0, slots.clone());
        let v = cache
            .v
            .as_ref()
            .expect("layer cache present")
            .clone()
            .select(0, slots);
        (k, v)
    }
}
