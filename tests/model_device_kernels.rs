//! The GPU server's kernels, all at once, held to transformers' numbers on the fixtures: the
//! model as `inferfluxd` serves it on CUDA (`ServingKernels::from_cuda`: weights `[out, in]`, K/V
//! in device pages, our GEMV for decode-sized products, RoPE and the K/V write fused, the norms
//! inside the GEMVs, paged attention, the argmax on the device), run on wgpu's Vulkan backend over
//! Mesa's lavapipe, a CPU driver, since CI has no GPU.
//!
//! The kernels' source and the adapters that launch them on burn's tensors are those CUDA runs;
//! the kernel tests (`src/model/kernels/`) check each kernel alone, this checks them wired into the
//! model. What only a GPU runs is cuBLAS (burn's matmul takes the prompt chunks here) and the
//! tensor-core GEMM: `scripts/gpu-check.sh` checks those.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::{DType, Tensor};
use cubecl_wgpu::{WgpuDevice, WgpuRuntime};
use inferflux::config::CudaConfig;
use inferflux::model::cuda_gemm::{Cube, GemmKernel};
use inferflux::model::llama::{NormProject, NormQkvWrite, QkvWrite};
use inferflux::model::serving_kernels::ServingKernels;
use inferflux::model::{KvStorage, Llama, PagedAttention};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

type B = Cube<WgpuRuntime>;

#[path = "common/forward.rs"]
mod forward;
#[path = "common/goldens.rs"]
mod goldens;
use goldens::{
    assert_close_within, greedy_batched, greedy_batched_by, prompt_logits, read_fixture, GoldenPrompt,
};
#[path = "common/executor_plans.rs"]
mod executor_plans;
use executor_plans::{greedy, held_steps, prompts, settings, with_tokens_known, STEPS};

/// wgpu's default device, set up on Vulkan (lavapipe where no GPU answers) once per process.
fn vulkan() -> WgpuDevice {
    static SETUP: OnceLock<()> = OnceLock::new();
    let device = WgpuDevice::DefaultDevice;
    SETUP.get_or_init(|| inferflux::model::kernels::set_up_vulkan(&device));
    device
}

/// What the server's defaults install on a GPU, but for cuBLAS (burn's matmul serves the products
/// our GEMV does not take, as when cuBLAS is missing), with `norm_gemv` as asked (off by default
/// until measured).
fn served_cuda(norm_gemv: bool) -> CudaConfig {
    CudaConfig {
        gemm: GemmKernel::Burn,
        fused_norm_gemv: norm_gemv,
        ..CudaConfig::default()
    }
}

/// Every warning logged while `f` runs on this thread: a kernel that refuses its input logs one
/// and falls back to burn's ops, which would otherwise pass unseen.
fn warnings_during<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    #[derive(Clone, Default)]
    struct Warnings(Arc<Mutex<Vec<String>>>);
    impl<S: tracing::Subscriber> Layer<S> for Warnings {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            if *event.metadata().level() <= tracing::Level::WARN {
                struct Fields(String);
                impl tracing::field::Visit for Fields {
                    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                        self.0.push_str(&format!(" {}={value:?}", field.name()));
                    }
                }
                let mut fields = Fields(String::new());
                event.record(&mut fields);
                self.0.lock().unwrap().push(fields.0);
            }
        }
    }
    let warnings = Warnings::default();
    let subscriber = tracing_subscriber::registry().with(warnings.clone());
    let out = tracing::subscriber::with_default(subscriber, f);
    let seen = warnings.0.lock().unwrap().clone();
    (out, seen)
}

/// How often the fused hooks served a call themselves (a hook that declines hands the call back
/// to burn's ops, as it does for prompt chunks above `gemv_max_rows`).
#[derive(Default)]
struct Served {
    norm_qkv_write: AtomicUsize,
    norm_project: AtomicUsize,
    gate_up_act: AtomicUsize,
    qkv_write: AtomicUsize,
    attention_queries: AtomicUsize,
}

/// The fused ops and the paged attention of `kernels` where they are on, counting into `served`
/// the calls they serve.
fn counted(kernels: &mut ServingKernels<B>, served: &Arc<Served>) {
    if let Some(inner) = kernels.paged_attention.take() {
        let s = served.clone();
        kernels.paged_attention = Some(Arc::new(move |a: PagedAttention<B>| {
            s.attention_queries.fetch_add(a.q.dims()[0], Ordering::Relaxed);
            inner(a)
        }));
    }
    let Some(fused) = kernels.fused.as_mut() else {
        return;
    };
    if let Some(inner) = fused.norm_qkv_write.take() {
        let s = served.clone();
        fused.norm_qkv_write = Some(Arc::new(move |a: NormQkvWrite<B>| {
            let out = inner(a);
            if out.is_ok() {
                s.norm_qkv_write.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    if let Some(inner) = fused.norm_project.take() {
        let s = served.clone();
        fused.norm_project = Some(Arc::new(move |a: NormProject<B>| {
            let out = inner(a);
            if out.is_some() {
                s.norm_project.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    if let Some(inner) = fused.gate_up_act.take() {
        let s = served.clone();
        fused.gate_up_act = Some(Arc::new(move |h: Tensor<B, 2>, w: Tensor<B, 2>| {
            let out = inner(h, w);
            if out.is_some() {
                s.gate_up_act.fetch_add(1, Ordering::Relaxed);
            }
            out
        }));
    }
    if let Some(inner) = fused.qkv_write.take() {
        let s = served.clone();
        fused.qkv_write = Some(Arc::new(move |a: QkvWrite<B>| {
            s.qkv_write.fetch_add(1, Ordering::Relaxed);
            inner(a)
        }));
    }
}

/// `name`'s model in `dtype` with `cuda`'s kernels installed, and the kernels (their device
/// sampling hooks are the executor's).
fn served_model(
    name: &str,
    (cuda, dtype): (&CudaConfig, DType),
    served: &Arc<Served>,
) -> (Llama<B>, ServingKernels<B>) {
    let (files, _) = read_fixture(name);
    let mut kernels = ServingKernels::<B>::from_cuda(cuda, &files.config);
    counted(&mut kernels, served);
    let index = files.checkpoint.index().unwrap();
    let model =
        Llama::<B>::load_shard_in(&files.config, &index, (&vulkan(), dtype), None, kernels.layout).unwrap();
    (kernels.install(model), kernels)
}

/// Holds `name`, served with `cuda`'s kernels in f32, to transformers: each prompt's last logits
/// (one chunk), and the greedy tokens of every prompt at once, prefilled in 7-token chunks and
/// decoded in steps of five rows, each token chosen by the device's argmax. Returns what the
/// fused hooks served and the warnings logged.
fn check_served(name: &str, cuda: &CudaConfig) -> (Arc<Served>, Vec<String>) {
    check_served_in(name, cuda, DType::F32)
}

/// [`check_served`] in `dtype`. In half precision the logits are held within 0.05 of
/// transformers' f32 ones (f16 rounds the fixtures' activations to about 1e-3 of their size).
fn check_served_in(name: &str, cuda: &CudaConfig, dtype: DType) -> (Arc<Served>, Vec<String>) {
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 0.05 };
    let served = Arc::new(Served::default());
    let (model, kernels) = served_model(name, (cuda, dtype), &served);
    let argmax = kernels
        .device_sampling
        .argmax
        .clone()
        .expect("device argmax is on");
    let (_, goldens) = read_fixture(name);
    let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().chain(&goldens.chat).collect();
    let ((), warnings) = warnings_during(|| {
        for p in &cases {
            // The GPU sums in other orders than transformers' CPU run; in f32 the logits stay within
            // the CPU path's bound all the same.
            let logits = prompt_logits(&model, KvStorage::Device, p);
            let what = format!("{name} {dtype:?} {:?}", p.input_ids);
            assert_close_within(&logits, &p.last_logits, tolerance, &what);
        }
        let on_device = |logits: Tensor<B, 2>| -> Vec<u32> {
            let ids = argmax(logits).expect("the argmax kernel runs");
            let ids = ids.into_data().to_vec::<i32>().unwrap();
            ids.into_iter().map(|id| id as u32).collect()
        };
        let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
        assert_eq!(
            greedy_batched_by(&model, &cases, 7, KvStorage::Device, on_device),
            want,
            "{name} {dtype:?}: greedy, 7-token chunks, device argmax"
        );
    });
    (served, warnings)
}

/// The server's GPU defaults, whose decode steps run every layer on our GEMV, the fused RoPE and
/// K/V write and the paged attention, and the gate/up GEMV with its activation.
#[test]
fn model_device_kernels_as_served_match_transformers() {
    for name in [
        "tiny-llama",
        "tiny-llama3",
        "tiny-mistral",
        "tiny-llama-tied-bf16",
    ] {
        let (served, warnings) = check_served(name, &served_cuda(false));
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert!(
            served.qkv_write.load(Ordering::Relaxed) > 0,
            "{name}: the fused K/V write ran"
        );
        assert!(
            served.gate_up_act.load(Ordering::Relaxed) > 0,
            "{name}: the gate/up GEMV ran"
        );
        assert!(
            served.attention_queries.load(Ordering::Relaxed) > 0,
            "{name}: paged attention ran"
        );
        assert_eq!(
            served.norm_qkv_write.load(Ordering::Relaxed),
            0,
            "{name}: norm-GEMV is off"
        );
    }
}

/// `[cuda] fused_norm_gemv`: a decode layer in five launches (norm, q/k/v GEMV, RoPE and K/V
/// write in one; attention; o; norm and gate/up with the activation in one; down).
#[test]
fn model_device_kernels_norms_in_the_gemvs_match_transformers() {
    for name in ["tiny-llama", "tiny-mistral"] {
        let (served, warnings) = check_served(name, &served_cuda(true));
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert!(
            served.norm_qkv_write.load(Ordering::Relaxed) > 0,
            "{name}: the normed q/k/v GEMV ran"
        );
        assert!(
            served.norm_project.load(Ordering::Relaxed) > 0,
            "{name}: the normed gate/up GEMV ran"
        );
    }
}

/// Half precision, as a GPU serves a checkpoint: the kernels' 2-byte paths (eight elements to a
/// 16-byte vector where f32 has four), with the norms in the GEMVs and without.
#[test]
fn model_device_kernels_in_half_precision_match_transformers() {
    for norm_gemv in [false, true] {
        let (served, warnings) = check_served_in("tiny-llama", &served_cuda(norm_gemv), DType::F16);
        assert!(warnings.is_empty(), "norm-GEMV {norm_gemv}: {warnings:?}");
        let fused_write = match norm_gemv {
            true => served.norm_qkv_write.load(Ordering::Relaxed),
            false => served.qkv_write.load(Ordering::Relaxed),
        };
        assert!(fused_write > 0, "norm-GEMV {norm_gemv}: the fused K/V write ran");
    }
}

/// Models whose attention input cannot be one launch (q/k/v biases, q/k norms: the normed
/// GEMV's RoPE epilogue has neither) keep the norm and the product apart from the fused write,
/// and still match.
#[test]
fn model_device_kernels_with_biases_and_qk_norms_match_transformers() {
    for name in ["tiny-qwen2", "tiny-qwen3"] {
        let (served, warnings) = check_served(name, &served_cuda(true));
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        assert!(
            served.attention_queries.load(Ordering::Relaxed) > 0,
            "{name}: paged attention ran"
        );
    }
}

/// The device path of the CPU's reference: with no hook at all the same backend gives the same
/// greedy tokens (so a failure above is the kernels', not wgpu's).
#[test]
fn model_device_kernels_burn_alone_on_vulkan_matches_transformers() {
    let (files, goldens) = read_fixture("tiny-llama");
    let index = files.checkpoint.index().unwrap();
    let model = Llama::<B>::load(&files.config, &index, &vulkan(), DType::F32).unwrap();
    let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|p| p.greedy_ids.clone()).collect();
    assert_eq!(greedy_batched(&model, &cases, 7, KvStorage::Device), want);
}

/// `[cuda] device_sampling` through the executor: the argmax, the draws (top-k, top-p and min-p
/// cuts too), the logprobs and the logit edits (bias, penalties, `min_tokens`) by the kernels,
/// with the steps overlapped as the scheduler runs them on a GPU (each step fed from the held
/// step's ids on the device, the penalised rows' edits naming the fed token), give the tokens and
/// logprobs of the kernels' host references (`model::draw::*_on_host`) with every token known.
#[test]
fn sampling_kernels_through_the_executor_match_their_host_references() {
    use inferflux::actors::executor::{ModelExecutor, SampledToken};
    use inferflux::model::draw::{draw_on_host, edit_on_host, logprobs_on_host, DeviceSampling};
    use inferflux::sampling::SamplingParams;
    let cuda = CudaConfig {
        device_sampling: true,
        ..served_cuda(true)
    };
    let (model, kernels) = served_model("tiny-llama", (&cuda, DType::F32), &Arc::default());
    let references = DeviceSampling::<B> {
        argmax: None,
        draw: Some(Arc::new(draw_on_host)),
        logprobs: Some(Arc::new(logprobs_on_host)),
        edit: Some(Arc::new(edit_on_host)),
    };
    let executor = |sampling: &DeviceSampling<B>| {
        let cache = goldens::new_cache(&model, KvStorage::Device);
        ModelExecutor::new(model.clone(), cache).with_device_sampling(sampling.clone())
    };
    let prompts = prompts(14);
    let first = with_tokens_known(executor(&references), &prompts, &vec![greedy(); 14]);
    let best: Vec<u32> = first[0].iter().map(|s| s.token).collect();
    let mut params = settings(&best);
    params.extend([
        SamplingParams {
            temperature: 1.0,
            top_k: 7,
            top_p: 0.9,
            seed: 5,
            logprobs: Some(4),
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.9,
            min_p: 0.2,
            seed: 11,
            presence_penalty: 1.5,
            ..Default::default()
        },
        // Rows whose next token hangs on the fed one: the bias makes the first argmax the pick
        // again, unless the penalty (out of the API's range, to outweigh the bias) sees it.
        SamplingParams {
            logit_bias: Arc::from([(best[12], 50.0)]),
            presence_penalty: 100.0,
            ..greedy()
        },
        SamplingParams {
            logit_bias: Arc::from([(best[13], 50.0)]),
            repetition_penalty: 100.0,
            ..greedy()
        },
    ]);
    let want = with_tokens_known(executor(&references), &prompts, &params);
    let mut on_device = executor(&kernels.device_sampling);
    let (got, warnings) = warnings_during(|| held_steps(&mut on_device, &prompts, &params));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        on_device.steps_fed_on_device(),
        STEPS as u64,
        "every later step fed on the device"
    );
    let tokens = |steps: &[Vec<SampledToken>]| -> Vec<Vec<u32>> {
        steps
            .iter()
            .map(|s| s.iter().map(|t| t.token).collect())
            .collect()
    };
    assert_eq!(
        tokens(&got),
        tokens(&want),
        "tokens: kernels against their host references"
    );
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        for (row, (a, b)) in g.iter().zip(w).enumerate() {
            match (&a.logprobs, &b.logprobs) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    let top_ids = |l: &inferflux::sampling::SampledLogprobs| -> Vec<u32> {
                        l.top.iter().map(|t| t.0).collect()
                    };
                    assert!((x.logprob - y.logprob).abs() < 1e-5, "step {step} row {row}");
                    assert_eq!(top_ids(x), top_ids(y), "step {step} row {row}");
                }
                _ => panic!("step {step} row {row}: logprobs on one side only"),
            }
        }
    }
    // The draws and edits moved rows off their greedy tokens, so the comparison covers them.
    assert_ne!(want[0][6].token, best[6], "the bias moved row 6");
    for row in [12, 13] {
        assert_eq!(want[0][row].token, best[row]);
        assert_ne!(
            want[1][row].token, best[row],
            "row {row}: the penalty saw the fed token"
        );
    }
    assert!(
        (2..4).chain(10..12).any(|row| want[0][row].token != best[row]),
        "a draw left the argmax"
    );
}

/// What an operator may turn off, one kernel family at a time (gpu-check's bisection
/// configurations): each way still matches, and nothing refuses.
#[test]
fn model_device_kernels_with_a_family_off_match_transformers() {
    use inferflux::model::cuda_attention::AttentionKernel;
    let configs = [
        (
            "burn's attention",
            CudaConfig {
                attention: AttentionKernel::Burn,
                ..served_cuda(true)
            },
        ),
        (
            "no fused ops",
            CudaConfig {
                fused_ops: false,
                ..served_cuda(false)
            },
        ),
        (
            "no fused K/V write or gate/up",
            CudaConfig {
                fused_kv_write: false,
                fused_gate_up: false,
                ..served_cuda(true)
            },
        ),
        (
            "burn's GEMMs",
            CudaConfig {
                gemv: GemmKernel::Burn,
                ..served_cuda(false)
            },
        ),
    ];
    for (what, cuda) in configs {
        let (served, warnings) = check_served("tiny-llama", &cuda);
        assert!(warnings.is_empty(), "{what}: {warnings:?}");
        let attended = served.attention_queries.load(Ordering::Relaxed) > 0;
        assert_eq!(
            attended,
            cuda.attention == AttentionKernel::Paged,
            "{what}: paged attention"
        );
    }
}

/// A step the paged kernel refuses (here, caches whose rows are not contiguous: every other
/// column block of a wider tensor) runs burn's gather on the inputs the kernel hands back, with a
/// warning, and gives what the gather gives on the step's own inputs: the kernel keeps no copies
/// of them against a refusal, so the hand-back must rebuild each one as it came.
#[test]
fn model_device_kernels_a_refused_paged_attention_falls_back_to_the_gather() {
    use burn::tensor::{Distribution, Int, TensorData};
    let device = vulkan();
    let (heads, kv_heads, head_dim, page_size, pages) = (4, 2, 8, 4, 8);
    let kv_dim = kv_heads * head_dim;
    let slots = pages * page_size;
    let wide = Tensor::<B, 2>::random([slots, 2 * kv_dim], Distribution::Normal(0.0, 1.0), &device);
    let ints = |v: Vec<i32>, shape: Vec<usize>| {
        Tensor::<B, 1, Int>::from_data(TensorData::new(v, [shape.iter().product::<usize>()]), &device)
    };
    let step = PagedAttention::<B> {
        q: Tensor::random([3, heads, head_dim], Distribution::Normal(0.0, 1.0), &device),
        k_cache: wide.clone().slice([0..slots, 0..kv_dim]),
        v_cache: wide.slice([0..slots, kv_dim..2 * kv_dim]),
        block_tables: ints(vec![3, 1, 0, 5, 6, 2], vec![6]).reshape([2, 3]),
        query_seq: ints(vec![0, 1, 1], vec![3]),
        ctx_begin: ints(vec![0, 0, 2], vec![3]),
        ctx_end: ints(vec![7, 3, 10], vec![3]),
        page_size,
        kv_heads,
        scale: (head_dim as f32).powf(-0.5),
    };
    let gathered = inferflux::model::llama::gathered_paged_attention(step.clone());
    let attend = inferflux::model::cuda_attention::paged::<WgpuRuntime>(false);
    let (served, warnings) = warnings_during(|| attend(step));
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("paged attention refused a step")),
        "the kernel took caches with padded rows: {warnings:?}"
    );
    let (want, got) = (
        gathered.into_data().to_vec::<f32>().unwrap(),
        served.into_data().to_vec::<f32>().unwrap(),
    );
    assert_eq!(got.len(), 3 * heads * head_dim);
    assert_close_within(&got, &want, 1e-6, "the gather on the handed-back inputs");
}

/// The fused RMSNorms hand their inputs back with a refusal, as they took them in (a transposed
/// view made contiguous), and burn's ops then run on those: here rows past one grid row of
/// cubes, which the kernel refuses.
#[test]
fn model_device_kernels_a_refused_norm_falls_back_on_its_handed_back_inputs() {
    use burn::tensor::Distribution;
    use inferflux::model::llama;
    let device = vulkan();
    let rows = inferflux::model::kernels::MAX_CUBES_PER_DIM as usize + 1;
    let normal = Distribution::Normal(0.0, 1.0);
    // `[rows, 4]` as a transposed view: the kernel's input is a contiguous copy of it.
    let x = Tensor::<B, 2>::random([4, rows], normal, &device).transpose();
    let delta = Tensor::<B, 2>::random([rows, 4], normal, &device);
    let w = Tensor::<B, 1>::random([4], normal, &device);
    let ops = inferflux::model::cuda_fused::fused_ops::<WgpuRuntime>(&served_cuda(false));
    let values = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
    let (served, warnings) = warnings_during(|| {
        let normed = (ops.rms_norm)(x.clone(), w.clone(), 1e-5);
        let (sum, sum_normed) = (ops.add_rms_norm)(x.clone(), delta.clone(), w.clone(), 1e-5);
        [normed, sum, sum_normed].map(values)
    });
    assert!(
        warnings.iter().any(|w| w.contains("a fused kernel refused")),
        "the kernel took {rows} rows: {warnings:?}"
    );
    let (sum, sum_normed) = llama::add_rms_norm(x.clone(), delta, w.clone(), 1e-5);
    let want = [llama::rms_norm(x, w, 1e-5), sum, sum_normed].map(values);
    for (what, (got, want)) in ["rms_norm", "x + delta", "add_rms_norm"]
        .iter()
        .zip(served.iter().zip(&want))
    {
        assert_eq!(got.len(), rows * 4, "{what}");
        assert_close_within(got, want, 1e-6, &format!("{what} on the handed-back inputs"));
    }
}

/// The projection hook keeps no copies of its operands against a refusal: our GEMMs hand them
/// back (`x` made contiguous) and burn's matmul runs on those. Here the GEMV refuses an `[in, out]`
/// weight (it reads `[out, in]` rows), and the tensor-core GEMM an f32 one; an `[out, in]` weight
/// at decode rows is the GEMV's own product, with no refusal.
#[test]
fn model_device_kernels_a_refused_projection_falls_back_on_its_handed_back_operands() {
    use burn::tensor::Distribution;
    use inferflux::model::cuda_gemm::{projector, GemmChoice};
    let device = vulkan();
    let project = projector::<WgpuRuntime>(GemmChoice {
        small: GemmKernel::Gemv,
        large: GemmKernel::Skinny,
        small_max_rows: 8,
    });
    let normal = Distribution::Normal(0.0, 1.0);
    let values = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
    // `[rows, 32]` as a transposed view: the GEMMs' `x` is a contiguous copy of it.
    let x = |rows| Tensor::<B, 2>::random([32, rows], normal, &device).transpose();
    let in_out = Tensor::<B, 2>::random([32, 48], normal, &device);
    let out_in = Tensor::<B, 2>::random([48, 32], normal, &device).transpose();
    for (what, x, w, refused) in [
        ("the GEMV, an [in, out] weight", x(3), in_out.clone(), true),
        ("the tensor-core GEMM, f32", x(20), out_in.clone(), true),
        ("the GEMV, an [out, in] weight", x(3), out_in, false),
    ] {
        let (got, warnings) = warnings_during(|| values(project(x.clone(), w.clone())));
        let refusals = warnings
            .iter()
            .filter(|w| w.contains("GEMM kernel refused"))
            .count();
        assert_eq!(refusals, refused as usize, "{what}: {warnings:?}");
        let want = values(x.matmul(w));
        assert_eq!(got.len(), want.len(), "{what}");
        assert_close_within(&got, &want, 1e-5, what);
    }
}

/// `[cuda] carve_outputs`: our kernels write their outputs into views of one block rather than
/// allocations of their own. The views start on 512-byte boundaries one after another, an output
/// over 1 MiB gets its own allocation, and every decode step's outputs are views, yet the logits
/// of every step are bit for bit those of outputs allocated one by one. (Carving is switched off
/// for the whole process while the second run lasts: the other tests here then allocate, with the
/// same results.)
#[test]
fn model_device_kernels_carved_outputs_change_no_logit() {
    use inferflux::model::output_blocks::{self, counts};
    let device = vulkan();
    let client = <WgpuRuntime as cubecl::Runtime>::client(&device);
    let before = counts();
    let views: Vec<_> = [3 * 256, 4, 2 << 20, 8]
        .map(|len| output_blocks::empty(&client, &device, [len].into(), DType::F32))
        .into_iter()
        .map(|t| {
            (
                t.handle.offset_start.unwrap_or(0),
                t.handle.size_in_used(),
                t.handle.size(),
            )
        })
        .collect();
    let first = views[0].0;
    assert_eq!(first % 512, 0);
    let block = output_blocks::BLOCK_BYTES;
    assert_eq!(
        views,
        [
            (first, 3072, block),
            (first + 3072, 16, block),
            (0, 8 << 20, 8 << 20),
            (first + 3072 + 512, 32, block)
        ],
        "views one after another on 512-byte boundaries; 8 MiB of f32 on its own"
    );
    assert_eq!(counts().carved - before.carved, 3);

    let served = Arc::new(Served::default());
    let (model, _) = served_model("tiny-llama", (&served_cuda(false), DType::F32), &served);
    let (_, goldens) = read_fixture("tiny-llama");
    let cases: Vec<&GoldenPrompt> = goldens.prompts.iter().collect();
    // Every step's logits, bit for bit, and what this thread carved meanwhile.
    let run = || {
        let mut logits = Vec::new();
        let before = counts();
        let tokens = greedy_batched_by(&model, &cases, 7, KvStorage::Device, |l| {
            let rows = l.into_data().to_vec::<f32>().unwrap();
            let vocab = rows.len() / cases.len().max(1);
            let ids = rows
                .chunks(vocab)
                .map(|r| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as u32)
                .collect();
            logits.push(rows.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            ids
        });
        let after = counts();
        (
            tokens,
            logits,
            (after.carved - before.carved, after.blocks - before.blocks),
        )
    };
    let (tokens, carved_logits, (carved, blocks)) = run();
    output_blocks::set_carving(false);
    let (apart_tokens, apart_logits, carved_apart) = run();
    output_blocks::set_carving(true);
    assert_eq!(
        carved_apart,
        (0, 0),
        "carving off: every output allocated on its own"
    );
    // The fixture's outputs are a few KiB: the block in use at the start, and one more at most.
    assert!(blocks <= 1, "{blocks} blocks for {carved} outputs");
    // A decode step at batch 5 launches 8 kernels of ours per layer and the lm_head GEMV.
    let steps = carved_logits.len() as u64;
    assert!(carved >= steps * 9, "{carved} outputs carved in {steps} steps");
    assert_eq!(tokens, apart_tokens);
    assert!(
        carved_logits == apart_logits,
        "the logits of a step differ with carved outputs"
    );
}
