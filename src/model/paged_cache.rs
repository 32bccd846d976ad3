//! The K/V page tensors of every layer, owned by the executor.
//!
//! Each layer holds K and V as `[num_pages * page_size, kv_heads * head_dim]`: row
//! `page * page_size + offset` is one token's slot. The KV-page manager decides which pages a
//! sequence owns; this type only writes and reads slots. Writes go in place (`slice_assign`
//! on a uniquely owned tensor), so a step never copies the cache.

use burn::prelude::*;
use burn::tensor::{DType, IndexingUpdateOp};

/// K/V of some pages, copied to host memory: one `(k, v)` per layer, `[pages * page_size,
/// kv_dim]` each, in the cache's dtype.
pub struct HostPages {
    pages: usize,
    layers: Vec<(TensorData, TensorData)>,
}

struct LayerCache<B: Backend> {
    k: Option<Tensor<B, 2>>,
    v: Option<Tensor<B, 2>>,
}

pub struct PagedKvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    page_size: usize,
    num_pages: usize,
    /// Write a step's K/V with one scatter per layer instead of one slice per run of slots.
    scatter_writes: bool,
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
            scatter_writes: false,
        }
    }

    /// Writes each layer's new K/V with one in-place scatter, whatever the number of sequences.
    /// Pays on a GPU, where each `slice_assign` is a kernel launch (decode writes one run per
    /// sequence); on the CPU backend a scatter copies the whole layer, so it stays off there.
    pub fn with_scatter_writes(mut self, on: bool) -> Self {
        self.scatter_writes = on;
        self
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Writes rows of `k` and `v` (`[n, kv_dim]`) into `slots` (`n` slot ids) of `layer`.
    ///
    /// Without scatter writes, consecutive slots are written as one `slice_assign` each: one per
    /// page touched, one per sequence in decode. Slots of one write are distinct.
    pub fn write(&mut self, layer: usize, slots: &[i32], k: Tensor<B, 2>, v: Tensor<B, 2>) {
        let device = self.scatter_writes.then(|| self.device());
        let cache = &mut self.layers[layer];
        let mut ck = cache.k.take().expect("layer cache present between writes");
        let mut cv = cache.v.take().expect("layer cache present between writes");
        if let Some(device) = device {
            let n = slots.len();
            let index = Tensor::<B, 2, Int>::from_data(TensorData::new(slots.to_vec(), [n, 1]), &device);
            cache.k = Some(ck.scatter_nd(index.clone(), k, IndexingUpdateOp::Assign));
            cache.v = Some(cv.scatter_nd(index, v, IndexingUpdateOp::Assign));
            return;
        }
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

    /// Slot ids of `pages`, in order.
    fn slots_of(&self, pages: &[u32]) -> Vec<i32> {
        let ps = self.page_size as i32;
        pages
            .iter()
            .flat_map(|&p| (0..ps).map(move |i| p as i32 * ps + i))
            .collect()
    }

    /// Copies every layer's K/V of `pages` to host memory (swap-out).
    pub fn read_pages(&self, pages: &[u32]) -> HostPages {
        let slots = self.slots_of(pages);
        let device = self.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(slots.clone(), [slots.len()]), &device);
        let layers = (0..self.layers.len())
            .map(|layer| {
                let (k, v) = self.gather(layer, index.clone());
                (k.into_data(), v.into_data())
            })
            .collect();
        HostPages {
            pages: pages.len(),
            layers,
        }
    }

    /// Writes K/V saved by `read_pages` into `pages` (swap-in); `pages` may be fewer than were
    /// saved only if the caller gave fewer, never more.
    pub fn write_pages(&mut self, pages: &[u32], host: HostPages) {
        debug_assert_eq!(
            pages.len(),
            host.pages,
            "swap-in into as many pages as were saved"
        );
        let slots = self.slots_of(pages);
        let device = self.device();
        for (layer, (k, v)) in host.layers.into_iter().enumerate() {
            let (kd, vd) = (k.dtype, v.dtype);
            let k = Tensor::<B, 2>::from_data(k, (&device, kd));
            let v = Tensor::<B, 2>::from_data(v, (&device, vd));
            self.write(layer, &slots, k, v);
        }
    }

    fn device(&self) -> B::Device {
        self.layers[0].k.as_ref().expect("layer cache present").device()
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
