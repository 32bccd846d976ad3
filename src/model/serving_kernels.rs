//! The kernels a model is served with: how its projection weights are kept and multiplied, how
//! decodes attend, which operations run fused, and which tokens the device chooses.
//!
//! [`ServingKernels::from_cuda`] is the one place that turns the `[cuda]` keys into hooks. The
//! server installs its result on CUDA; the tests install the same result on wgpu's Vulkan
//! backend (tests/model_device_kernels.rs), so what they check is what a GPU serves.

use burn::prelude::Backend;

use super::cuda_attention::{self, AttentionKernel};
use super::cuda_gemm::{self, Cube, GemmChoice, KernelRuntime};
use super::draw::DeviceSampling;
use super::step_indices::{self, IndexViewFn};
use super::{
    cuda_fused, cuda_sample, FusedOps, Llama, LlamaConfig, PagedAttentionFn, ProjectFn, WeightLayout,
};
use crate::config::CudaConfig;

/// A model's kernels: burn's ops on `[in, out]` weights by default. The CPU backend takes its
/// few-row products through `model::cpu_gemm`, and RoPE, RMSNorm and the activation through
/// `model::cpu_fused`; a GPU takes what [`ServingKernels::from_cuda`] gives.
pub struct ServingKernels<B: Backend> {
    pub layout: WeightLayout,
    pub project: Option<ProjectFn<B>>,
    pub paged_attention: Option<PagedAttentionFn<B>>,
    pub fused: Option<FusedOps<B>>,
    /// Views of one upload of a step's integer arrays (a cubecl runtime's buffer at an offset).
    pub index_view: Option<IndexViewFn<B>>,
    /// Chooses greedy rows' tokens (`[cuda] device_argmax`) and draws, edits and logprobs
    /// (`[cuda] device_sampling`) on the device: the executor's, not the model's.
    pub device_sampling: DeviceSampling<B>,
}

impl<B: Backend> Default for ServingKernels<B> {
    fn default() -> Self {
        Self {
            layout: WeightLayout::InOut,
            project: None,
            paged_attention: None,
            fused: None,
            index_view: None,
            device_sampling: DeviceSampling::default(),
        }
    }
}

impl<B: Backend> ServingKernels<B> {
    /// Whether any kernel hook is set: without one, burn's own ops serve everything (on CUDA,
    /// burn's fusion backend can then serve). The index view is not counted: it is cubecl's,
    /// and the fusion backend serves without it (one upload per index array).
    pub fn has_hooks(&self) -> bool {
        let s = &self.device_sampling;
        self.project.is_some()
            || self.paged_attention.is_some()
            || self.fused.is_some()
            || s.argmax.is_some()
            || s.draw.is_some()
            || s.logprobs.is_some()
            || s.edit.is_some()
    }

    /// `model` with these kernels' model hooks (the device sampling hooks go to the executor).
    pub fn install(&self, model: Llama<B>) -> Llama<B> {
        model
            .with_projection(self.project.clone())
            .with_paged_attention(self.paged_attention.clone())
            .with_fused_ops(self.fused.clone())
            .with_index_view(self.index_view.clone())
    }
}

impl<R: KernelRuntime> ServingKernels<Cube<R>> {
    /// The kernels `cuda` asks for, on runtime `R`, for `config`'s model. The paged attention
    /// kernel is left out, with a warning, for a model it cannot run.
    pub fn from_cuda(cuda: &CudaConfig, config: &LlamaConfig) -> Self {
        let choice: GemmChoice = cuda.gemm_choice();
        let paged = cuda.attention == AttentionKernel::Paged;
        let paged_attention = match paged.then(|| cuda_attention::supports(config)) {
            Some(Ok(())) => Some(cuda_attention::paged::<R>(cuda.split_attention)),
            Some(Err(why)) => {
                tracing::warn!(%why, "the paged attention kernel cannot run this model: burn's gather serves decodes");
                None
            }
            None => None,
        };
        Self {
            layout: cuda.weight_layout,
            project: (!choice.is_burn_only()).then(|| cuda_gemm::projector::<R>(choice)),
            paged_attention,
            fused: cuda.fused_ops.then(|| cuda_fused::fused_ops::<R>(cuda)),
            index_view: Some(step_indices::cube_view::<R>()),
            device_sampling: DeviceSampling {
                argmax: cuda.device_argmax.then(cuda_sample::device_argmax::<R>),
                draw: cuda.device_sampling.then(cuda_sample::device_draw::<R>),
                logprobs: cuda.device_sampling.then(cuda_sample::device_logprobs::<R>),
                edit: cuda.device_sampling.then(cuda_sample::device_edit::<R>),
            },
        }
    }
}
