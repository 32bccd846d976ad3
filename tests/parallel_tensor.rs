//! Tensor parallel on the CPU backend held to tensor parallel 1 on every fixture: TP 2 and TP 4
//! give logits within 1e-5 of TP 1 (whole prompts, prefill in 7-token chunks, batched prompts)
//! and the same greedy tokens; each rank holds 1/N of every sharded weight; a failing rank fails
//! the step instead of hanging the others.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use burn::backend::Flex;
use burn::tensor::DType;
use inferflux::actors::executor::ModelExecutor;
use inferflux::actors::tp_ranks::{Rank, RankWorker};
use inferflux::kv::SeqId;
use inferflux::model::{KvStorage, Llama, ModelFiles, PagedKvCache, SequenceChunk};
use inferflux::parallel::{Communicator, LocalCommunicator};
use inferflux::sampling::SamplingParams;
use inferflux::scheduler::PlannedChunk;

type B = Flex;

#[path = "common/forward.rs"]
mod forward;
use forward::{argmax, block_table, logits_rows, NUM_PAGES, PAGE_SIZE};
#[path = "common/goldens.rs"]
mod goldens;
use goldens::{greedy_chunked, read_fixture, GoldenPrompt};

const FIXTURES: &[&str] = &[
    "tiny-llama",
    "tiny-llama-tied-bf16",
    "tiny-llama3",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
];
const TOLERANCE: f32 = 1e-5;

/// A fixture's files and its plain and chat goldens.
fn open(name: &str) -> (ModelFiles, Vec<GoldenPrompt>) {
    let (files, goldens) = read_fixture(name);
    let cases = goldens.prompts.into_iter().chain(goldens.chat).collect();
    (files, cases)
}

/// The `tp` ranks of `files`' model (one whole model for `tp = 1`).
fn load_ranks(files: &ModelFiles, tp: usize) -> Vec<Llama<B>> {
    let index = files.checkpoint.index().unwrap();
    let load =
        |comm| Llama::<B>::load_shard(&files.config, &index, &Default::default(), DType::F32, comm).unwrap();
    if tp == 1 {
        return vec![load(None)];
    }
    LocalCommunicator::group(tp, Some(Duration::from_secs(60)))
        .into_iter()
        .map(|c| load(Some(Arc::new(c) as Arc<dyn Communicator>)))
        .collect()
}

fn new_cache(model: &Llama<B>) -> PagedKvCache<B> {
    let c = model.config();
    PagedKvCache::new(
        c.num_layers,
        NUM_PAGES,
        PAGE_SIZE,
        model.kv_dim(),
        &Default::default(),
        DType::F32,
        KvStorage::Host,
    )
}

/// Runs `work` on every rank, each on its own thread with its own cache, and returns what each
/// rank's `work` returned.
fn on_ranks<T: Send + 'static>(
    models: Vec<Llama<B>>,
    work: impl Fn(&Llama<B>, &mut PagedKvCache<B>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let work = Arc::new(work);
    let threads: Vec<_> = models
        .into_iter()
        .map(|m| {
            let work = work.clone();
            std::thread::spawn(move || {
                let mut cache = new_cache(&m);
                work(&m, &mut cache)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// What one run produced: every logits row it computed, and each prompt's greedy tokens.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    logits: Vec<Vec<f32>>,
    greedy: Vec<Vec<u32>>,
}

/// Each prompt alone, whole: its last-position logits.
fn whole_prompts(prompts: Vec<Vec<u32>>) -> impl Fn(&Llama<B>, &mut PagedKvCache<B>) -> Run + Send + Sync {
    move |model, _| {
        let mut logits = Vec::new();
        for p in &prompts {
            let mut cache = new_cache(model);
            let chunk = SequenceChunk {
                tokens: p.clone(),
                start_pos: 0,
                block_table: block_table(0, 1, p.len()),
                wants_logits: true,
            };
            logits.extend(logits_rows(model.forward(&mut cache, &[chunk])));
        }
        Run {
            logits,
            greedy: Vec::new(),
        }
    }
}

/// Every prompt at once, prefilled in chunks of `chunk` tokens, then `steps` batched greedy
/// decode steps.
fn batched_greedy(
    prompts: Vec<Vec<u32>>,
    steps: usize,
    chunk: usize,
) -> impl Fn(&Llama<B>, &mut PagedKvCache<B>) -> Run + Send + Sync {
    move |model, cache| {
        let mut logits = Vec::new();
        let greedy = greedy_chunked(model, cache, &prompts, (steps, chunk), |step| {
            let rows = logits_rows(step);
            let picked = rows.iter().map(|r| argmax(r)).collect();
            logits.extend(rows);
            picked
        });
        Run { logits, greedy }
    }
}

fn assert_close(name: &str, what: &str, got: &Run, want: &Run) {
    assert_eq!(got.logits.len(), want.logits.len(), "{name} {what}: rows");
    let worst = got
        .logits
        .iter()
        .zip(&want.logits)
        .flat_map(|(a, b)| {
            assert_eq!(a.len(), b.len(), "{name} {what}: vocab");
            a.iter().zip(b).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0f32, f32::max);
    assert!(worst <= TOLERANCE, "{name} {what}: max |logit - TP 1| = {worst}");
    assert_eq!(got.greedy, want.greedy, "{name} {what}: greedy tokens");
}

/// One scenario on TP 1, 2 and 4: every rank of a group returns the same bits (the logits are
/// all-gathered), and TP 2/4 are within the tolerance of TP 1.
fn check_scenario<W>(name: &str, what: &str, files: &ModelFiles, make: impl Fn() -> W) -> Run
where
    W: Fn(&Llama<B>, &mut PagedKvCache<B>) -> Run + Send + Sync + 'static,
{
    let reference = on_ranks(load_ranks(files, 1), make()).remove(0);
    for tp in [2, 4] {
        let runs = on_ranks(load_ranks(files, tp), make());
        for (rank, r) in runs.iter().enumerate() {
            assert_eq!(
                r, &runs[0],
                "{name} {what} TP {tp}: rank {rank} differs from rank 0"
            );
        }
        assert_close(name, &format!("{what} TP {tp}"), &runs[0], &reference);
    }
    reference
}

#[test]
fn parallel_tp2_tp4_logits_match_tp1_on_every_fixture() {
    for &name in FIXTURES {
        let (files, cases) = open(name);
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.input_ids.clone()).collect();
        let steps = cases[0].greedy_ids.len();
        check_scenario(name, "whole prompts", &files, || whole_prompts(prompts.clone()));
        let chunked = check_scenario(name, "chunked prefill (7)", &files, || {
            batched_greedy(prompts.clone(), steps, 7)
        });
        let batched = check_scenario(name, "batched", &files, || {
            batched_greedy(prompts.clone(), steps, usize::MAX)
        });
        // And TP 1 itself still gives transformers' tokens.
        let want: Vec<Vec<u32>> = cases.iter().map(|c| c.greedy_ids.clone()).collect();
        assert_eq!(chunked.greedy, want, "{name}: greedy tokens");
        assert_eq!(batched.greedy, want, "{name}: greedy tokens");
    }
}

#[test]
fn parallel_each_rank_holds_its_share_of_the_weights() {
    for &name in FIXTURES {
        let (files, _) = open(name);
        let c = files.config.clone();
        let whole: BTreeMap<&str, usize> = load_ranks(&files, 1)[0].weight_elements();
        for tp in [2, 4] {
            let ranks = load_ranks(&files, tp);
            let padded_vocab = c.vocab_size.div_ceil(tp) * tp;
            for (r, model) in ranks.iter().enumerate() {
                let held = model.weight_elements();
                assert_eq!(held.keys().collect::<Vec<_>>(), whole.keys().collect::<Vec<_>>());
                let what = |k: &str| format!("{name} TP {tp} rank {r}: {k}");
                for k in ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_bias"] {
                    if let Some(&w) = whole.get(k) {
                        assert_eq!(held[k] * tp, w, "{}", what(k));
                    }
                }
                // The vocabulary padded to a multiple of the ranks, split evenly.
                for k in ["embed", "lm_head"] {
                    assert_eq!(held[k] * tp, padded_vocab * c.hidden_size, "{}", what(k));
                }
                // KV heads: 1/N while there are enough of them, else one replicated KV head each.
                let kv_share = tp.min(c.num_kv_heads);
                for k in ["k_proj", "v_proj", "kv_bias"] {
                    if let Some(&w) = whole.get(k) {
                        assert_eq!(held[k] * kv_share, w, "{}", what(k));
                    }
                }
                assert_eq!(
                    held["norms"],
                    whole["norms"],
                    "{}: norms are replicated",
                    what("norms")
                );
                assert_eq!(
                    model.kv_dim() * kv_share,
                    c.num_kv_heads * c.head_dim,
                    "{}: the KV cache holds this rank's heads only",
                    what("kv cache")
                );
            }
        }
    }
}

fn plan(seq: u64, tokens: Vec<u32>, pages: Vec<u32>) -> PlannedChunk {
    PlannedChunk {
        seq: SeqId(seq),
        tokens,
        start_pos: 0,
        block_table: pages,
        wants_logits: true,
        fed_back: false,
        sampling: SamplingParams::default(),
        generated_index: 0,
        history: None,
        page_copies: Vec::new(),
        swap_in: false,
    }
}

#[test]
fn parallel_failing_rank_fails_the_step_without_hanging() {
    let (files, cases) = open("tiny-llama");
    let index = files.checkpoint.index().unwrap();
    // No timeout: only the poisoning can release rank 0.
    let comms: Vec<Arc<dyn Communicator>> = LocalCommunicator::group(2, None)
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    let load = |r: usize| {
        Llama::<B>::load_shard(
            &files.config,
            &index,
            &Default::default(),
            DType::F32,
            Some(comms[r].clone()),
        )
        .unwrap()
    };
    let (m0, m1) = (load(0), load(1));
    let (layers, kv_dim) = (files.config.num_layers, m0.kv_dim());
    let cache = |pages| {
        PagedKvCache::<B>::new(
            layers,
            pages,
            PAGE_SIZE,
            kv_dim,
            &Default::default(),
            DType::F32,
            KvStorage::Host,
        )
    };
    // Rank 1 has 4 pages where rank 0 has 64: a step on page 40 fails on rank 1 only.
    let rank0 = Rank::new(m0, cache(64));
    let worker = RankWorker::spawn(1, Rank::new(m1, cache(4)), comms[1].clone()).unwrap();
    let mut executor = ModelExecutor::tensor_parallel(rank0, vec![worker], comms[0].clone());
    let prompt = cases[0].input_ids[..4].to_vec();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let failed = executor.run_step(None, vec![plan(1, prompt.clone(), vec![40])]);
        // The group recovers: the next step, within both ranks' pages, runs.
        let next = executor.run_step(None, vec![plan(2, prompt, vec![1])]);
        tx.send((failed, next)).unwrap();
    });
    let (failed, next) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a failing rank must not hang the step");
    let err = failed.unwrap_err().to_string();
    assert!(err.contains("rank 1"), "the error names the failed rank: {err}");
    let sampled = next.unwrap();
    assert_eq!(sampled.len(), 1);
    assert_eq!(sampled[0].seq, SeqId(2));
}
