//! The executor's split sampling held to the all-host path: a mixed batch (plain-greedy rows,
//! whose argmax is taken on the device, beside temperature, logprobs, bias, penalty and
//! `min_tokens` rows, sampled on the host) gives every token and logprob that
//! `sampling::sample` gives on the full logits of the same step, over a prefill and a decode
//! step, with one rank and with tensor parallel 2.

use std::sync::Arc;
use std::time::Duration;

use burn::backend::Flex;
use burn::tensor::DType;
use inferflux::actors::executor::{ModelExecutor, SampledToken};
use inferflux::actors::tp_ranks::{Rank, RankWorker};
use inferflux::kv::SeqId;
use inferflux::model::{KvStorage, Llama, ModelFiles, ModelSource, PagedKvCache, SequenceChunk};
use inferflux::parallel::{Communicator, LocalCommunicator};
use inferflux::sampling::{self, SamplingParams};
use inferflux::scheduler::PlannedChunk;

type B = Flex;

#[path = "common/forward.rs"]
mod forward;
use forward::{argmax, block_table, logits_rows, NUM_PAGES, PAGE_SIZE};
#[path = "common/executor_plans.rs"]
mod executor_plans;
use executor_plans::{greedy, held_steps, history, prompts, settings, with_tokens_known, STEPS};

fn files() -> ModelFiles {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    ModelFiles::open(&ModelSource::Dir(dir)).unwrap()
}

/// The `tp` ranks of the fixture model (one whole model for `tp = 1`).
fn load_ranks(files: &ModelFiles, tp: usize) -> (Vec<Llama<B>>, Vec<Arc<dyn Communicator>>) {
    let index = files.checkpoint.index().unwrap();
    let load =
        |comm| Llama::<B>::load_shard(&files.config, &index, &Default::default(), DType::F32, comm).unwrap();
    if tp == 1 {
        return (vec![load(None)], Vec::new());
    }
    let comms: Vec<Arc<dyn Communicator>> = LocalCommunicator::group(tp, Some(Duration::from_secs(60)))
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect();
    (comms.iter().map(|c| load(Some(c.clone()))).collect(), comms)
}

fn new_cache(model: &Llama<B>) -> PagedKvCache<B> {
    PagedKvCache::new(
        model.config().num_layers,
        NUM_PAGES,
        PAGE_SIZE,
        model.kv_dim(),
        &Default::default(),
        DType::F32,
        KvStorage::Host,
    )
}

/// Step `step` of sequence `i`: its whole prompt first, then one generated token at a time.
fn chunk(i: usize, n: usize, seq: &[u32], prompt_len: usize, step: usize) -> SequenceChunk {
    let start = if step == 0 { 0 } else { seq.len() - 1 };
    SequenceChunk {
        tokens: seq[start..].to_vec(),
        start_pos: start,
        block_table: block_table(i, n, prompt_len + STEPS),
        wants_logits: true,
    }
}

/// The all-host reference: the full logits of each step on one whole model, every row sampled
/// by `sampling::sample`. Returns each step's samples and the first step's argmax per row.
fn reference(model: &Llama<B>, prompts: &[Vec<u32>]) -> (Vec<Vec<SampledToken>>, Vec<u32>) {
    let n = prompts.len();
    let mut cache = new_cache(model);
    let mut seqs = prompts.to_vec();
    let mut steps = Vec::new();
    let mut params = Vec::new();
    let mut first_best = Vec::new();
    for step in 0..STEPS {
        let chunks: Vec<SequenceChunk> = (0..n)
            .map(|i| chunk(i, n, &seqs[i], prompts[i].len(), step))
            .collect();
        let rows = logits_rows(model.forward(&mut cache, &chunks));
        if step == 0 {
            first_best = rows.iter().map(|r| argmax(r)).collect();
            params = settings(&first_best);
        }
        let sampled: Vec<SampledToken> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let h = history(&seqs[i], prompts[i].len());
                let s = sampling::sample(row, &params[i], step, Some(&h));
                SampledToken {
                    seq: SeqId(i as u64),
                    token: s.token,
                    logprobs: s.logprobs,
                }
            })
            .collect();
        for (s, seq) in sampled.iter().zip(&mut seqs) {
            seq.push(s.token);
        }
        steps.push(sampled);
    }
    (steps, first_best)
}

/// The same steps through `ModelExecutor::run_step`, as the scheduler plans them (history only
/// for penalised rows).
fn through_executor(
    mut executor: ModelExecutor<B>,
    prompts: &[Vec<u32>],
    params: &[SamplingParams],
) -> Vec<Vec<SampledToken>> {
    let n = prompts.len();
    let mut seqs = prompts.to_vec();
    let mut steps = Vec::new();
    for step in 0..STEPS {
        let host = (0..n)
            .filter(|&i| sampling::needs_host_logits(&params[i], step))
            .count();
        assert!(
            host > 0 && host < n,
            "step {step} mixes device and host rows ({host} of {n} on the host)"
        );
        let plan: Vec<PlannedChunk> = (0..n)
            .map(|i| {
                let c = chunk(i, n, &seqs[i], prompts[i].len(), step);
                PlannedChunk {
                    seq: SeqId(i as u64),
                    tokens: c.tokens,
                    start_pos: c.start_pos,
                    block_table: c.block_table,
                    wants_logits: true,
                    fed_back: false,
                    sampling: params[i].clone(),
                    generated_index: step,
                    history: params[i]
                        .has_penalties()
                        .then(|| history(&seqs[i], prompts[i].len())),
                    page_copies: Vec::new(),
                    swap_in: false,
                }
            })
            .collect();
        let sampled = executor.run_step(None, plan).unwrap();
        for (s, seq) in sampled.iter().zip(&mut seqs) {
            seq.push(s.token);
        }
        steps.push(sampled);
    }
    steps
}

/// One rank's executor over ten sequences, with the all-host path's steps, the first rows'
/// argmax and the sequences' settings.
struct OneRank {
    executor: ModelExecutor<B>,
    prompts: Vec<Vec<u32>>,
    want: Vec<Vec<SampledToken>>,
    best: Vec<u32>,
    params: Vec<SamplingParams>,
}

fn one_rank() -> OneRank {
    let (mut models, _) = load_ranks(&files(), 1);
    let model = models.remove(0);
    let prompts = prompts(10);
    let (want, best) = reference(&model, &prompts);
    let params = settings(&best);
    let cache = new_cache(&model);
    OneRank {
        executor: ModelExecutor::new(model, cache),
        prompts,
        want,
        best,
        params,
    }
}

#[test]
fn sampling_on_the_device_matches_the_all_host_path() {
    let OneRank {
        executor,
        prompts,
        want,
        best,
        params,
    } = one_rank();
    let got = through_executor(executor, &prompts, &params);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "step {step}: executor against the all-host path");
    }
    // The bias and min_tokens rows really moved off the argmax at index 0.
    assert_ne!(want[0][6].token, best[6]);
    assert_ne!(want[0][9].token, best[9]);
    assert!(want[0][4].logprobs.is_some() && want[0][0].logprobs.is_none());
}

#[test]
fn sampling_logprobs_and_logit_edits_on_the_device_match_the_all_host_path() {
    use inferflux::model::draw::{
        edit_on_host, logprobs_on_host, DeviceEditFn, DeviceLogprobsFn, DeviceSampling,
    };
    let OneRank {
        executor,
        prompts,
        want,
        params,
        ..
    } = one_rank();
    // The host reference as the logprobs hook: the greedy logprobs row (4) gets its token from
    // the argmax and its logprobs from the hook; without a draw hook, the temperature ones stay
    // on the host.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let hook: DeviceLogprobsFn<B> = Arc::new(move |logits, ids, rows, top| {
        counted.fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
        logprobs_on_host(logits, ids, rows, top)
    });
    // And as the edit hook: the greedy rows with bias, penalties or `min_tokens` (6 to 9) are
    // chosen from edited copies on the "device" (row 9 only while its mask is on, at step 0).
    let edited = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let edited_count = edited.clone();
    let edit: DeviceEditFn<B> = Arc::new(move |logits, rows, fed| {
        edited_count.fetch_add(rows.len(), std::sync::atomic::Ordering::Relaxed);
        edit_on_host(logits, rows, fed)
    });
    let executor = executor.with_device_sampling(DeviceSampling {
        logprobs: Some(hook),
        edit: Some(edit),
        ..DeviceSampling::default()
    });
    let got = through_executor(executor, &prompts, &params);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g, w,
            "step {step}: executor with device logprobs and edits against the all-host path"
        );
    }
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::Relaxed),
        STEPS,
        "row 4 once per step"
    );
    // Step 0: bias (6), repetition (7) and the mask (9); step 1: bias, repetition, and the
    // presence/frequency penalty of row 8's first generated token.
    assert_eq!(edited.load(std::sync::atomic::Ordering::Relaxed), 6);
}

#[test]
fn sampling_on_the_device_with_tensor_parallel_matches_one_rank() {
    let files = files();
    let prompts = prompts(10);
    let (whole, _) = load_ranks(&files, 1);
    let (want, best) = reference(&whole[0], &prompts);
    let params = settings(&best);
    let (models, comms) = load_ranks(&files, 2);
    let mut models = models.into_iter();
    let m0 = models.next().unwrap();
    let m1 = models.next().unwrap();
    let (cache0, cache1) = (new_cache(&m0), new_cache(&m1));
    let worker = RankWorker::spawn(1, Rank::new(m1, cache1), comms[1].clone()).unwrap();
    let executor = ModelExecutor::tensor_parallel(Rank::new(m0, cache0), vec![worker], comms[0].clone());
    let got = through_executor(executor, &prompts, &params);
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        for (a, b) in g.iter().zip(w) {
            assert_eq!((a.seq, a.token), (b.seq, b.token), "step {step}");
            match (&a.logprobs, &b.logprobs) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    assert!(
                        (x.logprob - y.logprob).abs() < 1e-4,
                        "step {step} seq {:?}",
                        a.seq
                    );
                    let ids = |l: &sampling::SampledLogprobs| l.top.iter().map(|t| t.0).collect::<Vec<_>>();
                    assert_eq!(ids(x), ids(y), "step {step} seq {:?}", a.seq);
                }
                _ => panic!("step {step} seq {:?}: logprobs present on one side only", a.seq),
            }
        }
        assert_eq!(g.len(), w.len());
    }
}

/// Async scheduling: a decode planned before the previous step returned carries `FED_BACK`,
/// and the executor puts in the token that step sampled (and appends it to the penalties'
/// history). The tokens must be those of planning with the token known, through the actor's
/// mailbox; a step that does not follow the last one that ran is refused.
#[test]
fn sampling_fed_back_tokens_match_planning_with_the_tokens_known() {
    use inferflux::actors::executor::{spawn_executor, ExecuteStep, ReadHeldStep};
    use inferflux::scheduler::FED_BACK;
    let OneRank {
        executor,
        prompts,
        best,
        mut params,
        ..
    } = one_rank();
    // A row whose second token hangs on the history: the bias makes the first argmax the pick
    // again, unless the presence penalty sees it in the history (out of the API's range, so
    // that it outweighs the bias).
    params[8] = SamplingParams {
        logit_bias: Arc::from([(best[8], 50.0)]),
        presence_penalty: 100.0,
        ..greedy()
    };
    let want = through_executor(one_rank().executor, &prompts, &params);
    assert_eq!(want[0][8].token, best[8]);
    assert_ne!(want[1][8].token, best[8], "the penalty saw the first token");
    let n = prompts.len();
    let plan = |step: usize| -> Vec<PlannedChunk> {
        (0..n)
            .map(|i| {
                let c = chunk(i, n, &prompts[i], prompts[i].len(), 0);
                let (tokens, start_pos) = match step {
                    0 => (c.tokens, 0),
                    _ => (vec![FED_BACK], prompts[i].len()),
                };
                PlannedChunk {
                    seq: SeqId(i as u64),
                    tokens,
                    start_pos,
                    block_table: c.block_table,
                    wants_logits: true,
                    fed_back: step > 0,
                    sampling: params[i].clone(),
                    generated_index: step,
                    // Planned before step 0's tokens were known: the prompt only.
                    history: params[i]
                        .has_penalties()
                        .then(|| history(&prompts[i], prompts[i].len())),
                    page_copies: Vec::new(),
                    swap_in: false,
                }
            })
            .collect()
    };
    assert!(params.iter().filter(|p| p.has_penalties()).count() >= 2);
    // Without and with the executor holding each step until the next one is queued: the host
    // samples the temperature and penalised rows (no draw or edit hook here), so it reads the
    // held step first.
    for (read_later, executor) in [(false, executor), (true, one_rank().executor)] {
        let slot = std::sync::Mutex::new(Some(executor));
        let (got, refused) = actix::System::new().block_on(async move {
            let addrs = spawn_executor(move || slot.lock().unwrap().take().unwrap());
            let step = |step: u64, follows: Option<u64>, plan: Vec<PlannedChunk>| {
                addrs.step.send(ExecuteStep {
                    step,
                    follows,
                    read_later,
                    swap_out: None,
                    plan,
                })
            };
            // Both queued before either returns, as the scheduler does.
            let (first, second) = (step(1, None, plan(0)), step(2, Some(1), plan(1)));
            let (first, second) = (first.await.unwrap(), second.await.unwrap());
            if read_later {
                addrs.read_held.send(ReadHeldStep).await.unwrap();
            }
            let got = vec![first.reply().await.unwrap(), second.reply().await.unwrap()];
            let refused = step(4, Some(3), plan(1)).await.unwrap().reply().await;
            (got, refused)
        });
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g, w,
                "read later {read_later}, step {step}: fed back against the tokens known"
            );
        }
        let err = refused.expect_err("step 3 never ran").to_string();
        assert!(err.contains("step 3"), "{err}");
    }
}

/// Overlapped steps: a step queued with `read_later` is read back only once the next one is
/// queued behind it (or on `ReadHeldStep`), and the next one's fed-back inputs come from its ids
/// still on the device. Three steps so fed give the tokens of planning with them known; with a
/// row the host samples (a seeded temperature row on the CPU), the executor reads the held step
/// first and feeds from the host, with the same tokens. Penalised rows are fed on the device
/// too: their histories lack the fed token, which their edits then name, resolved by the edit
/// hook where the "device" edits the row and by the host where it samples the row.
#[test]
fn sampling_held_steps_feed_the_next_one_on_the_device() {
    use inferflux::model::draw::{edit_on_host, DeviceEditFn, DeviceSampling};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let OneRank { prompts, best, .. } = one_rank();
    let n = prompts.len();
    let all_greedy = vec![greedy(); n];
    let mut one_drawn = all_greedy.clone();
    one_drawn[3] = SamplingParams {
        temperature: 0.8,
        seed: 3,
        ..Default::default()
    };
    // Rows whose next token hangs on the one before: a bias makes the first argmax the pick
    // again, unless a penalty (out of the API's range, to outweigh the bias) sees it.
    let mut penalised = all_greedy.clone();
    let biased = |i: usize| SamplingParams {
        logit_bias: Arc::from([(best[i], 50.0)]),
        ..greedy()
    };
    penalised[1] = SamplingParams {
        presence_penalty: 100.0,
        ..biased(1)
    };
    penalised[2] = SamplingParams {
        repetition_penalty: 100.0,
        ..biased(2)
    };
    penalised[4] = SamplingParams {
        frequency_penalty: 40.0,
        repetition_penalty: 1.5,
        ..biased(4)
    };
    // The edit hook: always (every step fed on the device), or only at step 0, so that step 1
    // samples its penalised rows on the host with the fed tokens, and step 2 is fed from the
    // host.
    let edit_hook = |calls_allowed: usize| {
        let calls = AtomicUsize::new(0);
        let hook: DeviceEditFn<B> =
            Arc::new(
                move |logits, rows, fed| match calls.fetch_add(1, Ordering::Relaxed) < calls_allowed {
                    true => edit_on_host(logits, rows, fed),
                    false => Err("the edit kernel is gone".into()),
                },
            );
        DeviceSampling {
            edit: Some(hook),
            ..DeviceSampling::default()
        }
    };
    let configs = [
        (all_greedy, None, STEPS as u64),
        (one_drawn, None, 0),
        (penalised.clone(), Some(edit_hook(usize::MAX)), STEPS as u64),
        (penalised.clone(), Some(edit_hook(1)), 1),
    ];
    for (config, (params, hooks, fed_on_device)) in configs.into_iter().enumerate() {
        let want = with_tokens_known(one_rank().executor, &prompts, &params);
        let mut executor = one_rank().executor;
        if let Some(hooks) = hooks {
            executor = executor.with_device_sampling(hooks);
        }
        let got = held_steps(&mut executor, &prompts, &params);
        assert_eq!(got, want, "config {config}, fed on the device: {fed_on_device}");
        assert_eq!(executor.steps_fed_on_device(), fed_on_device, "config {config}");
        // Different tokens each step, or the feed could be right by chance.
        assert!(want[1] != want[2]);
    }
    // The penalties saw the fed tokens: the biased rows moved off their first pick.
    let want = with_tokens_known(one_rank().executor, &prompts, &penalised);
    for row in [1, 2, 4] {
        assert_eq!(want[0][row].token, best[row]);
        assert_ne!(want[1][row].token, best[row], "row {row}");
    }
}
