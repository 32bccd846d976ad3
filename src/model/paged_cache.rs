//! The K/V pages of every layer, owned by the executor.
//!
//! Each layer holds K and V as `[num_pages * page_size, kv_heads * head_dim]`: row
//! `page * page_size + offset` is one token's slot. The KV-page manager decides which pages a
//! sequence owns; this type only writes and reads slots. A step's cost must not grow with the
//! pool, so where the rows live depends on the backend (see [`KvStorage`]).

use burn::prelude::*;
use burn::tensor::{DType, IndexingUpdateOp};

use super::cpu_gemm::Kernel;
use super::host_attention::{self, ChunkQueries, HostLayer};
use super::step_indices::int_tensor;

/// Where the cache keeps its rows, chosen for what writes in place on the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStorage {
    /// Device tensors, each step's new rows written by one in-place scatter per layer (GPU
    /// backends: one kernel, whatever the number of sequences).
    Device,
    /// Plain f32 vectors in host memory (the CPU backend, whose `slice_assign` and `scatter`
    /// copy the whole tensor): a write copies its rows, a read builds a tensor of the rows read.
    Host,
}

/// K/V of some pages, copied to host memory: one `(k, v)` per layer, `[pages * page_size,
/// kv_dim]` each, in the cache's dtype.
pub struct HostPages {
    pages: usize,
    layers: Vec<(TensorData, TensorData)>,
}

/// Slots a step reads, built once per step and used by every layer.
pub struct SlotIndex<B: Backend> {
    ids: Vec<i32>,
    /// The ids on the device (device storage only).
    tensor: Option<Tensor<B, 1, Int>>,
}

impl<B: Backend> SlotIndex<B> {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Slots a step writes, built once per step and used by every layer: on the device, one upload
/// of the ids instead of one per layer.
pub struct WriteSlots<B: Backend> {
    ids: Vec<i32>,
    /// `[n, 1]` on the device (device storage only), as `scatter_nd` takes them.
    tensor: Option<Tensor<B, 2, Int>>,
}

enum LayerCache<B: Backend> {
    /// `None` only while a write holds the tensor.
    Device {
        k: Option<Tensor<B, 2>>,
        v: Option<Tensor<B, 2>>,
    },
    Host {
        k: Vec<f32>,
        v: Vec<f32>,
    },
}

pub struct PagedKvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    page_size: usize,
    num_pages: usize,
    kv_dim: usize,
    device: B::Device,
}

impl<B: Backend> PagedKvCache<B> {
    /// A zeroed pool of `num_pages` pages of `page_size` slots per layer. Host storage holds f32
    /// only: another dtype stays on the device.
    pub fn new(
        num_layers: usize,
        num_pages: usize,
        page_size: usize,
        kv_dim: usize,
        device: &B::Device,
        dtype: DType,
        storage: KvStorage,
    ) -> Self {
        let slots = num_pages * page_size;
        let layers = (0..num_layers)
            .map(|_| match storage {
                KvStorage::Host if dtype == DType::F32 => LayerCache::Host {
                    k: vec![0.0; slots * kv_dim],
                    v: vec![0.0; slots * kv_dim],
                },
                _ => LayerCache::Device {
                    k: Some(Tensor::zeros([slots, kv_dim], (device, dtype))),
                    v: Some(Tensor::zeros([slots, kv_dim], (device, dtype))),
                },
            })
            .collect();
        Self {
            layers,
            page_size,
            num_pages,
            kv_dim,
            device: device.clone(),
        }
    }

    pub fn storage(&self) -> KvStorage {
        match self.layers.first() {
            Some(LayerCache::Host { .. }) => KvStorage::Host,
            _ => KvStorage::Device,
        }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// The slots `ids` as this cache reads them (uploaded once, for device storage).
    pub fn slot_index(&self, ids: Vec<i32>) -> SlotIndex<B> {
        let tensor = (self.storage() == KvStorage::Device)
            .then(|| Tensor::from_data(TensorData::new(ids.clone(), [ids.len()]), &self.device));
        SlotIndex { ids, tensor }
    }

    /// The slots `ids` (distinct) as [`write`](Self::write) takes them.
    pub fn write_slots(&self, ids: Vec<i32>) -> WriteSlots<B> {
        let uploaded = (self.storage() == KvStorage::Device).then(|| int_tensor(ids.clone(), &self.device));
        self.write_slots_uploaded(ids, uploaded)
    }

    /// [`Self::write_slots`] with the ids already on the device, flat (`uploaded`: device
    /// storage only), as a step uploads them with its other integer arrays.
    pub fn write_slots_uploaded(&self, ids: Vec<i32>, uploaded: Option<Tensor<B, 1, Int>>) -> WriteSlots<B> {
        debug_assert_eq!(uploaded.is_some(), self.storage() == KvStorage::Device);
        let n = ids.len();
        // Viewed as `[n, 1]`: a 2-D upload may pad its rows on the GPU.
        let tensor = uploaded.map(|t| t.reshape([n, 1]));
        WriteSlots { ids, tensor }
    }

    /// Writes rows of `k` and `v` (`[n, kv_dim]`) into the `n` slots of `slots` of `layer`.
    pub fn write(&mut self, layer: usize, slots: &WriteSlots<B>, k: Tensor<B, 2>, v: Tensor<B, 2>) {
        let kv_dim = self.kv_dim;
        match &mut self.layers[layer] {
            LayerCache::Device { k: ck, v: cv } => {
                let index = slots.tensor.clone().expect("write slots made by this cache");
                let old_k = ck.take().expect("layer cache present between writes");
                let old_v = cv.take().expect("layer cache present between writes");
                *ck = Some(old_k.scatter_nd(index.clone(), k, IndexingUpdateOp::Assign));
                *cv = Some(old_v.scatter_nd(index, v, IndexingUpdateOp::Assign));
            }
            LayerCache::Host { k: hk, v: hv } => {
                for (store, rows) in [(hk, k), (hv, v)] {
                    let rows = rows.into_data().convert::<f32>();
                    let rows = rows.as_slice::<f32>().expect("f32 rows");
                    for (i, &slot) in slots.ids.iter().enumerate() {
                        let dst = slot as usize * kv_dim;
                        store[dst..dst + kv_dim].copy_from_slice(&rows[i * kv_dim..(i + 1) * kv_dim]);
                    }
                }
            }
        }
    }

    /// Device storage: hands `layer`'s K and V caches and the slot index (`[n, 1]`) to `write`,
    /// which stores the step's rows and returns the caches to keep. `false` (and `write` not
    /// called) for host storage.
    pub fn write_device(
        &mut self,
        layer: usize,
        slots: &WriteSlots<B>,
        write: impl FnOnce(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2, Int>) -> (Tensor<B, 2>, Tensor<B, 2>),
    ) -> bool {
        let LayerCache::Device { k: ck, v: cv } = &mut self.layers[layer] else {
            return false;
        };
        let index = slots.tensor.clone().expect("write slots made by this cache");
        let old_k = ck.take().expect("layer cache present between writes");
        let old_v = cv.take().expect("layer cache present between writes");
        let (k, v) = write(old_k, old_v, index);
        *ck = Some(k);
        *cv = Some(v);
        true
    }

    /// Copies every layer's K/V of page `src` into page `dst` (copy-on-write of a shared page).
    pub fn copy_page(&mut self, src: u32, dst: u32) {
        let ps = self.page_size;
        let (src, dst) = (src as usize * ps, dst as usize * ps);
        let width = self.kv_dim;
        for cache in &mut self.layers {
            match cache {
                LayerCache::Device { k, v } => {
                    for t in [k, v] {
                        let whole = t.take().expect("layer cache present between writes");
                        let rows = whole.clone().slice([src..src + ps, 0..width]);
                        *t = Some(whole.slice_assign([dst..dst + ps, 0..width], rows));
                    }
                }
                LayerCache::Host { k, v } => {
                    for store in [k, v] {
                        store.copy_within(src * width..(src + ps) * width, dst * width);
                    }
                }
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
        let index = self.slot_index(self.slots_of(pages));
        let layers = (0..self.layers.len())
            .map(|layer| {
                let (k, v) = self.gather(layer, &index);
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
        let slots = self.write_slots(self.slots_of(pages));
        for (layer, (k, v)) in host.layers.into_iter().enumerate() {
            let (kd, vd) = (k.dtype, v.dtype);
            let k = Tensor::<B, 2>::from_data(k, (&self.device, kd));
            let v = Tensor::<B, 2>::from_data(v, (&self.device, vd));
            self.write(layer, &slots, k, v);
        }
    }

    /// The whole K and V tensors of `layer` (`[slots, kv_dim]`, shared, not copied), for a
    /// kernel that reads pages in place; `None` for host storage.
    pub fn device_layer(&self, layer: usize) -> Option<(Tensor<B, 2>, Tensor<B, 2>)> {
        match &self.layers[layer] {
            LayerCache::Device { k, v } => Some((k.clone()?, v.clone()?)),
            LayerCache::Host { .. } => None,
        }
    }

    /// Host storage: softmax attention of single-token decodes over their contexts, read in place
    /// from `layer`'s rows (no gather, no padding, no mask). `q` is `[n, heads, head_dim]`,
    /// `contexts[i]` query `i`'s slots in position order; query head `h` reads KV head
    /// `h / (heads / kv_heads)`. Returns `[n, heads * head_dim]`. `None` for device storage.
    pub fn attend_decodes(
        &self,
        layer: usize,
        q: &[f32],
        contexts: &[Vec<i32>],
        heads_dims: [usize; 2],
        scale: f32,
    ) -> Option<Vec<f32>> {
        let rows = self.host_layer(layer)?;
        Some(host_attention::attend_decodes(
            Kernel::best(),
            rows,
            q,
            contexts,
            heads_dims,
            scale,
        ))
    }

    /// Host storage: a prompt chunk's softmax attention over its context, read in place from
    /// `layer`'s rows (see [`host_attention::attend_chunk`]). `None` for device storage.
    pub fn attend_chunk(
        &self,
        layer: usize,
        chunk: &ChunkQueries,
        heads_dims: [usize; 2],
        scale: f32,
    ) -> Option<Vec<f32>> {
        let rows = self.host_layer(layer)?;
        Some(host_attention::attend_chunk(
            Kernel::best(),
            rows,
            chunk,
            heads_dims,
            scale,
        ))
    }

    /// `layer`'s K and V rows for the host kernels; `None` for device storage.
    fn host_layer(&self, layer: usize) -> Option<HostLayer<'_>> {
        match &self.layers[layer] {
            LayerCache::Host { k, v } => Some(HostLayer {
                k,
                v,
                kv_dim: self.kv_dim,
            }),
            LayerCache::Device { .. } => None,
        }
    }

    /// Reads the K and V rows at `slots` of `layer`, in slot-list order: `[n, kv_dim]` each.
    pub fn gather(&self, layer: usize, slots: &SlotIndex<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        match &self.layers[layer] {
            LayerCache::Device { k, v } => {
                let index = slots.tensor.clone().expect("slot index made by this cache");
                let read = |t: &Option<Tensor<B, 2>>| {
                    t.as_ref()
                        .expect("layer cache present")
                        .clone()
                        .select(0, index.clone())
                };
                (read(k), read(v))
            }
            LayerCache::Host { k, v } => {
                let w = self.kv_dim;
                let read = |store: &[f32]| {
                    let mut rows = Vec::with_capacity(slots.len() * w);
                    for &slot in &slots.ids {
                        let at = slot as usize * w;
                        rows.extend_from_slice(&store[at..at + w]);
                    }
                    Tensor::from_data(
                        TensorData::new(rows, [slots.len(), w]),
                        (&self.device, DType::F32),
                    )
                };
                (read(k), read(v))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    /// The host kernels (tested in `host_attention`) have no rows to read on device storage.
    #[test]
    fn paged_kv_device_storage_has_no_host_rows_to_attend() {
        let device = Default::default();
        let cache = PagedKvCache::<Flex>::new(1, 1, 16, 64, &device, DType::F32, KvStorage::Device);
        assert!(cache
            .attend_decodes(0, &[0.0; 64], &[vec![0]], [1, 64], 1.0)
            .is_none());
        let chunk = ChunkQueries {
            q: &[0.0; 64],
            slots: &[0],
            first_query: 0,
            first_position: 0,
            window: None,
        };
        assert!(cache.attend_chunk(0, &chunk, [1, 64], 1.0).is_none());
        let host = PagedKvCache::<Flex>::new(1, 1, 16, 64, &device, DType::F32, KvStorage::Host);
        assert!(host.attend_chunk(0, &chunk, [1, 64], 1.0).is_some());
    }
}
