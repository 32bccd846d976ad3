//! The small integer arrays a forward step needs on the device (positions, K/V write slots, the
//! paged attention's block tables and bounds, token ids, row orders), uploaded together.
//!
//! Each upload is a copy into a staging buffer, an allocation and a host-to-device copy. A
//! decode step on the paged path took six or seven of them (docs/Performance.md). With an
//! [`IndexViewFn`], a backend that can view part of a buffer without a copy gets them all in
//! one upload, each array a view at an aligned offset; without one (the CPU, burn's fusion
//! backend), each array is uploaded on its own, as before.

use std::ops::Range;
use std::sync::Arc;

use burn::prelude::Backend;
use burn::tensor::{Int, Shape, Tensor, TensorData};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::cuda_gemm::Cube;

/// `values[range]` of a 1-D upload, as a tensor of its own, without a copy. The range starts at
/// a multiple of [`StepIndices::ALIGN`] values.
pub type IndexViewFn<B> = Arc<dyn Fn(Tensor<B, 1, Int>, Range<usize>) -> Tensor<B, 1, Int> + Send + Sync>;

/// One array pushed into [`StepIndices`]: what [`UploadedIndices::get`] takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexId(usize);

/// The step's integer arrays, collected before any is uploaded.
#[derive(Default)]
pub struct StepIndices {
    arrays: Vec<Vec<i32>>,
}

impl StepIndices {
    /// Where each array starts in the one upload, in values: 512 bytes, the offset at which
    /// cubecl's CUDA runtime binds part of a buffer (its memory alignment) and a multiple of
    /// wgpu's storage-buffer offset alignment (256 bytes at most).
    pub const ALIGN: usize = 128;

    pub fn push(&mut self, values: Vec<i32>) -> IndexId {
        self.arrays.push(values);
        IndexId(self.arrays.len() - 1)
    }

    /// Every array on `device`: in one upload with `view` when two or more are not empty, each
    /// on its own otherwise. An empty array is always its own (empty) tensor, since a view of no
    /// bytes is not a binding wgpu accepts.
    pub fn upload<B: Backend>(self, device: &B::Device, view: Option<&IndexViewFn<B>>) -> UploadedIndices<B> {
        let filled = self.arrays.iter().filter(|a| !a.is_empty()).count();
        let (Some(view), 2..) = (view, filled) else {
            return UploadedIndices {
                uploads: self.arrays.len(),
                tensors: self.arrays.into_iter().map(|a| int_tensor(a, device)).collect(),
            };
        };
        let mut packed = Vec::with_capacity(
            self.arrays
                .iter()
                .map(|a| a.len().next_multiple_of(Self::ALIGN))
                .sum(),
        );
        let mut ranges = Vec::with_capacity(self.arrays.len());
        for a in &self.arrays {
            let start = packed.len();
            packed.extend_from_slice(a);
            ranges.push(start..packed.len());
            packed.resize(packed.len().next_multiple_of(Self::ALIGN), 0);
        }
        let all = int_tensor(packed, device);
        let tensors = ranges
            .into_iter()
            .map(|r| match r.is_empty() {
                true => int_tensor(Vec::new(), device),
                false => view(all.clone(), r),
            })
            .collect();
        UploadedIndices {
            uploads: 1 + self.arrays.len() - filled,
            tensors,
        }
    }
}

/// The step's integer arrays on the device, by the [`IndexId`] each was pushed as.
pub struct UploadedIndices<B: Backend> {
    tensors: Vec<Tensor<B, 1, Int>>,
    uploads: usize,
}

impl<B: Backend> UploadedIndices<B> {
    pub fn get(&self, id: IndexId) -> Tensor<B, 1, Int> {
        self.tensors[id.0].clone()
    }

    /// How many uploads the arrays took.
    pub fn uploads(&self) -> usize {
        self.uploads
    }
}

/// A 1-D upload, contiguous on every backend; reshape it for more dimensions. (cubecl uploads a
/// 2-D tensor with its rows padded to an alignment, which the CUDA kernels' adapters then copy
/// to contiguous on every use: the block tables cost a copy per layer per step that way.)
pub(crate) fn int_tensor<B: Backend>(values: Vec<i32>, device: &B::Device) -> Tensor<B, 1, Int> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// A view by burn's own `slice`: on any backend, and without a copy where the backend slices
/// so (Flex always; cubecl only when both ends fall on its memory alignment, else a copy).
pub fn slice_view<B: Backend>() -> IndexViewFn<B> {
    Arc::new(|all: Tensor<B, 1, Int>, range: Range<usize>| all.slice(range))
}

/// A view on a cubecl runtime: the upload's buffer from the range's first byte, `range.len()`
/// values long, whatever the end's alignment. (burn's `slice` would copy a range whose end is
/// not on the memory alignment, which is almost every range here: a launch for an upload.)
pub fn cube_view<R: CubeRuntime>() -> IndexViewFn<Cube<R>> {
    Arc::new(|all: Tensor<Cube<R>, 1, Int>, range: Range<usize>| {
        let t: CubeTensor<R> = all.into_primitive();
        let (size, total) = (t.dtype.size(), t.meta.shape()[0]);
        let start = (range.start * size) as u64;
        let align = t.client.properties().memory.alignment;
        if !t.is_contiguous() || !start.is_multiple_of(align) || range.end > total {
            return Tensor::from_primitive(t).slice(range);
        }
        let end = ((total - range.end) * size) as u64;
        let handle = t.handle.clone().offset_start(start).offset_end(end);
        Tensor::from_primitive(CubeTensor::new_contiguous(
            t.client,
            t.device,
            Shape::new([range.len()]),
            handle,
            t.dtype,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Cpu = burn::backend::Flex;

    fn values(t: Tensor<Cpu, 1, Int>) -> Vec<i64> {
        t.into_data().iter::<i64>().collect()
    }

    /// Arrays of awkward lengths (one past the alignment, empty, a single value) come back as
    /// pushed, in one upload with a view and one each without.
    #[test]
    fn paged_kv_step_indices_come_back_as_pushed() {
        let arrays: Vec<Vec<i32>> = vec![
            (0..StepIndices::ALIGN as i32 + 1).collect(),
            Vec::new(),
            vec![-7],
            (100..140).rev().collect(),
        ];
        let device = Default::default();
        for view in [None, Some(slice_view::<Cpu>())] {
            let mut ix = StepIndices::default();
            let ids: Vec<IndexId> = arrays.iter().map(|a| ix.push(a.clone())).collect();
            let up = ix.upload::<Cpu>(&device, view.as_ref());
            for (id, a) in ids.iter().zip(&arrays) {
                let want: Vec<i64> = a.iter().map(|&v| v as i64).collect();
                assert_eq!(values(up.get(*id)), want, "array {id:?}, view {}", view.is_some());
            }
            // With a view: one upload for the three arrays with values, one for the empty one.
            assert_eq!(up.uploads(), if view.is_some() { 2 } else { 4 });
        }
    }

    /// A lone array is uploaded as it is, view or not: packing it would only pad it.
    #[test]
    fn paged_kv_step_indices_upload_a_lone_array_as_it_is() {
        let mut ix = StepIndices::default();
        let id = ix.push(vec![3, 1, 2]);
        let up = ix.upload::<Cpu>(&Default::default(), Some(&slice_view::<Cpu>()));
        assert_eq!(up.uploads(), 1);
        assert_eq!(up.get(id).dims(), [3]);
    }
}
