//! The detector against hand-checked edge cases, and against straightforward references on
//! random token streams: `tokenizers`' own `DecodeStream`, and "full decode, then cut at the
//! earliest stop".

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use tokenizers::Tokenizer;

use super::*;

const EOS: u32 = 2;

fn tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tiny-llama/tokenizer.json"
            );
            Arc::new(Tokenizer::from_file(path).unwrap())
        })
        .clone()
}

/// The byte-level token of one byte (GPT-2's byte-to-char table: printable Latin-1 maps to
/// itself, every other byte to U+0100 upwards in order).
fn byte_token(b: u8) -> u32 {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let c = if printable(b) {
        b as u32
    } else {
        256 + (0..b).filter(|&x| !printable(x)).count() as u32
    };
    let s = char::from_u32(c).unwrap().to_string();
    tokenizer().token_to_id(&s).expect("every byte has a token")
}

/// A piece of a token stream.
#[derive(Debug, Clone)]
enum Piece {
    /// The tokenizer's own encoding (merged BPE tokens).
    Text(&'static str),
    /// One token per UTF-8 byte, so characters split across tokens.
    Bytes(&'static str),
    /// Raw bytes, one token each (may be invalid UTF-8).
    Raw(&'static [u8]),
    Id(u32),
}
use Piece::{Bytes as B, Id, Raw, Text as T};

fn ids_of(pieces: &[Piece]) -> Vec<u32> {
    let tok = tokenizer();
    pieces
        .iter()
        .flat_map(|p| match p {
            Piece::Text(s) => tok.encode(*s, false).unwrap().get_ids().to_vec(),
            Piece::Bytes(s) => s.bytes().map(byte_token).collect(),
            Piece::Raw(b) => b.iter().copied().map(byte_token).collect(),
            Piece::Id(id) => vec![*id],
        })
        .collect()
}

/// Runs the detector over `ids`; returns every delta and how it ended.
fn detect(ids: &[u32], params: StopParams) -> (Vec<String>, Option<FinishReason>) {
    let mut det = StopDetector::new(tokenizer(), params);
    let mut deltas = Vec::new();
    for &id in ids {
        let d = det.push(id).unwrap();
        deltas.push(d.text);
        if d.finished.is_some() {
            assert!(det.is_finished());
            assert_eq!(det.push(id).unwrap(), Delta::default(), "nothing after the end");
            return (deltas, d.finished);
        }
    }
    (deltas, None)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct Case {
    name: &'static str,
    input: Vec<Piece>,
    stop: Vec<&'static str>,
    /// Applied to the default parameters: EOS 2, `max_tokens` = the stream's length.
    tweak: fn(&mut StopParams),
    text: &'static str,
    finish: FinishReason,
}

fn none(_: &mut StopParams) {}
fn include(p: &mut StopParams) {
    p.include_stop_str_in_output = true;
}

fn stop_str(s: &str) -> FinishReason {
    FinishReason::StopString(s.into())
}

fn cases() -> Vec<Case> {
    let bang = byte_token(b'!');
    let c = |name, input, stop, tweak, text, finish| Case {
        name,
        input,
        stop,
        tweak,
        text,
        finish,
    };
    use FinishReason::{Eos, Length};
    vec![
        c(
            "plain_text_no_stop",
            vec![T("Hello world")],
            vec![],
            none,
            "Hello world",
            Length,
        ),
        c(
            "multibyte_chars_split_over_byte_tokens",
            vec![B("Café ☕ au lait 🍰")],
            vec![],
            none,
            "Café ☕ au lait 🍰",
            Length,
        ),
        c(
            "mixed_bpe_and_bytes_decode_as_a_whole",
            vec![T("crème "), B("brûlée "), T("🍰")],
            vec![],
            none,
            "crème brûlée 🍰",
            Length,
        ),
        c(
            "leading_and_repeated_spaces_kept",
            vec![T("  two  spaces "), B(" x")],
            vec![],
            none,
            "  two  spaces  x",
            Length,
        ),
        c(
            "special_tokens_are_skipped",
            vec![T("a"), Id(1), Id(0), T("b")],
            vec![],
            none,
            "ab",
            Length,
        ),
        c(
            "overlapping_stops_longer_wins_at_same_start",
            vec![B("xxabcdef")],
            vec!["ab", "abc"],
            none,
            "xx",
            stop_str("abc"),
        ),
        c(
            "overlapping_stops_shorter_wins_when_longer_fails",
            vec![B("xxabd")],
            vec!["ab", "abc"],
            none,
            "xx",
            stop_str("ab"),
        ),
        c(
            "overlapping_stops_shorter_wins_at_end_of_stream",
            vec![B("xxab")],
            vec!["abc", "ab"],
            none,
            "xx",
            stop_str("ab"),
        ),
        c(
            "repeated_partial_match",
            vec![B("aab")],
            vec!["ab"],
            none,
            "a",
            stop_str("ab"),
        ),
        c(
            "repeated_partial_match_longer_stop",
            vec![B("aaabaab")],
            vec!["aab"],
            none,
            "a",
            stop_str("aab"),
        ),
        c(
            "earlier_start_completing_later_wins",
            vec![B("abcd")],
            vec!["bc", "abcd"],
            none,
            "",
            stop_str("abcd"),
        ),
        c(
            "earlier_start_failing_lets_later_match_win",
            vec![B("abce")],
            vec!["bc", "abcd"],
            none,
            "a",
            stop_str("bc"),
        ),
        c(
            "later_listed_stop_matching_earlier_wins",
            vec![T("the quick brown fox")],
            vec!["fox", "quick"],
            none,
            "the ",
            stop_str("quick"),
        ),
        c(
            "stop_at_the_very_first_token",
            vec![B("Hi there")],
            vec!["H"],
            none,
            "",
            stop_str("H"),
        ),
        c(
            "stop_equal_to_whole_output",
            vec![T("Hello world")],
            vec!["Hello world"],
            none,
            "",
            stop_str("Hello world"),
        ),
        c(
            "stop_never_matching_releases_held_tail_at_end",
            vec![T("Hello, my name")],
            vec!["name was"],
            none,
            "Hello, my name",
            Length,
        ),
        c(
            "partial_match_released_when_it_fails",
            vec![T("Hello, my name is Ada")],
            vec!["name was"],
            none,
            "Hello, my name is Ada",
            Length,
        ),
        c(
            "stop_completed_exactly_at_max_tokens",
            vec![B("abcd")],
            vec!["cd"],
            none,
            "ab",
            stop_str("cd"),
        ),
        c(
            "stop_spanning_four_tokens",
            vec![B("xyz stop")],
            vec!["z st"],
            none,
            "xy",
            stop_str("z st"),
        ),
        c(
            "stop_beginning_inside_a_split_emoji",
            vec![B("ab🍰x")],
            vec!["🍰x"],
            none,
            "ab",
            stop_str("🍰x"),
        ),
        c(
            "unicode_stop_e_acute_split_over_bytes",
            vec![B("café au lait")],
            vec!["é"],
            none,
            "caf",
            stop_str("é"),
        ),
        c(
            "unicode_stop_emoji_from_bpe",
            vec![T("cake 🍰 time")],
            vec!["🍰"],
            none,
            "cake ",
            stop_str("🍰"),
        ),
        c(
            "whitespace_stop",
            vec![T("Hello world")],
            vec![" "],
            none,
            "Hello",
            stop_str(" "),
        ),
        c(
            "newline_stop",
            vec![T("line one\nline two")],
            vec!["\n"],
            none,
            "line one",
            stop_str("\n"),
        ),
        c(
            "include_stop_str_in_output",
            vec![T("the quick brown fox jumps")],
            vec!["fox"],
            include,
            "the quick brown fox",
            stop_str("fox"),
        ),
        c(
            "include_with_overlapping_stops",
            vec![B("xxabcdef")],
            vec!["ab", "abc"],
            include,
            "xxabc",
            stop_str("abc"),
        ),
        c(
            "stop_token_id_non_special_text_not_emitted",
            vec![T("Hello"), B("!"), T(" more")],
            vec![],
            |p| p.stop_token_ids = vec![byte_token(b'!')],
            "Hello",
            FinishReason::StopToken(bang),
        ),
        c(
            "stop_token_id_text_included_on_request",
            vec![T("Hello"), B("!"), T(" more")],
            vec![],
            |p| {
                p.stop_token_ids = vec![byte_token(b'!')];
                p.include_stop_str_in_output = true
            },
            "Hello!",
            FinishReason::StopToken(bang),
        ),
        c(
            "stop_token_flushes_a_split_character_as_full_decode",
            vec![B("ab"), Raw(b"\xF0"), B("!")],
            vec![],
            |p| p.stop_token_ids = vec![byte_token(b'!')],
            "ab\u{FFFD}",
            FinishReason::StopToken(bang),
        ),
        c(
            "stop_string_held_for_longer_one_wins_over_stop_token",
            vec![B("xab!")],
            vec!["ab", "abc"],
            |p| p.stop_token_ids = vec![byte_token(b'!')],
            "x",
            stop_str("ab"),
        ),
        c(
            "eos_stops_with_null_stop_reason",
            vec![T("Hello"), Id(EOS), T(" more")],
            vec![],
            none,
            "Hello",
            Eos(EOS),
        ),
        c(
            "eos_from_a_list_of_eos_ids",
            vec![T("Hi"), B("!"), T("x")],
            vec![],
            |p| p.eos_token_ids = vec![EOS, byte_token(b'!')],
            "Hi",
            Eos(bang),
        ),
        c(
            "ignore_eos_generates_past_it",
            vec![T("Hello"), Id(EOS), T(" more")],
            vec![],
            |p| p.ignore_eos = true,
            "Hello more",
            Length,
        ),
        c(
            "ignore_eos_keeps_stop_token_ids",
            vec![T("a"), Id(EOS), B("b!c")],
            vec![],
            |p| {
                p.ignore_eos = true;
                p.stop_token_ids = vec![byte_token(b'!')]
            },
            "ab",
            FinishReason::StopToken(bang),
        ),
        c(
            "min_tokens_ignores_eos_before_it",
            vec![B("a"), Id(EOS), B("b"), Id(EOS), B("c")],
            vec![],
            |p| p.min_tokens = 3,
            "ab",
            Eos(EOS),
        ),
        c(
            "min_tokens_ignores_stop_token_and_keeps_its_text",
            vec![B("a!b!c")],
            vec![],
            |p| {
                p.min_tokens = 2;
                p.stop_token_ids = vec![byte_token(b'!')]
            },
            "a!b",
            FinishReason::StopToken(bang),
        ),
        c(
            "min_tokens_protects_text_from_stop_strings",
            vec![B("abab")],
            vec!["ab"],
            |p| p.min_tokens = 2,
            "ab",
            stop_str("ab"),
        ),
        c(
            "min_tokens_stop_straddling_protected_text_never_matches",
            vec![B("abcab")],
            vec!["bc"],
            |p| p.min_tokens = 2,
            "abcab",
            Length,
        ),
        c(
            "max_tokens_flushes_incomplete_utf8_as_replacement_char",
            vec![B("ab🍰")],
            vec![],
            |p| p.max_tokens = 4,
            "ab\u{FFFD}",
            Length,
        ),
        c(
            "stop_completed_by_the_final_flush_wins",
            vec![B("ab🍰")],
            vec!["b\u{FFFD}"],
            |p| p.max_tokens = 4,
            "a",
            stop_str("b\u{FFFD}"),
        ),
        c(
            "invalid_byte_in_the_middle_stays_a_replacement_char",
            vec![Raw(b"a\xFFb")],
            vec![],
            none,
            "a\u{FFFD}b",
            Length,
        ),
    ]
}

#[test]
fn stop_sequences_table_of_edge_cases() {
    let cases = cases();
    assert!(cases.len() >= 25);
    let mut failed = Vec::new();
    for case in &cases {
        let ids = ids_of(&case.input);
        let mut params = StopParams {
            stop: strings(&case.stop),
            eos_token_ids: vec![EOS],
            max_tokens: ids.len(),
            ..Default::default()
        };
        (case.tweak)(&mut params);
        let (deltas, finish) = detect(&ids, params);
        let text = deltas.concat();
        if text != case.text || finish.as_ref() != Some(&case.finish) {
            failed.push(format!(
                "{}: got {text:?} / {finish:?}, want {:?} / {:?} (deltas {deltas:?})",
                case.name, case.text, case.finish
            ));
        }
    }
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
}

#[test]
fn stop_sequences_partial_match_is_released_before_the_end() {
    let ids = ids_of(&[B("name is Ada")]);
    let params = StopParams {
        stop: strings(&["name was"]),
        max_tokens: 1000,
        ..Default::default()
    };
    let (deltas, finish) = detect(&ids, params);
    assert_eq!(finish, None);
    assert_eq!(
        deltas.concat(),
        "name is Ada",
        "held text comes out once it cannot match"
    );
}

// ---- Property tests -------------------------------------------------------------------------

/// Text pieces that make multi-byte characters, spaces and stop-like repeats common.
const ALPHABET: &[&str] = &[
    "a", "b", "ab", "c", " ", "  ", "\n", "é", "ü", "☕", "🍰", "the", " fox", "x", "é🍰",
];

fn text_strategy(max_parts: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(ALPHABET), 1..=max_parts).prop_map(|v| v.concat())
}

/// One piece of a random token stream: encoded text, text split into byte tokens, a random
/// byte token (often invalid UTF-8), or any id of the vocabulary (specials included).
#[derive(Debug, Clone)]
enum RandomPiece {
    Text(String),
    Bytes(String),
    Byte(u8),
    Id(u32),
}

fn stream_strategy() -> impl Strategy<Value = Vec<RandomPiece>> {
    let piece = prop_oneof![
        3 => text_strategy(4).prop_map(RandomPiece::Text),
        4 => text_strategy(3).prop_map(RandomPiece::Bytes),
        2 => any::<u8>().prop_map(RandomPiece::Byte),
        1 => (0u32..384).prop_map(RandomPiece::Id),
    ];
    prop::collection::vec(piece, 1..12)
}

fn random_ids(pieces: &[RandomPiece]) -> Vec<u32> {
    let tok = tokenizer();
    pieces
        .iter()
        .flat_map(|p| match p {
            RandomPiece::Text(s) => tok.encode(s.as_str(), false).unwrap().get_ids().to_vec(),
            RandomPiece::Bytes(s) => s.bytes().map(byte_token).collect(),
            RandomPiece::Byte(b) => vec![byte_token(*b)],
            RandomPiece::Id(id) => vec![*id],
        })
        .collect()
}

/// A stop string: a slice of the stream's own decode (char offsets, wrapped), or free text.
#[derive(Debug, Clone)]
enum StopSpec {
    Slice { start: usize, chars: usize },
    Free(String),
}

fn stop_strategy() -> impl Strategy<Value = StopSpec> {
    prop_oneof![
        3 => (0usize..64, 1usize..5).prop_map(|(start, chars)| StopSpec::Slice { start, chars }),
        2 => text_strategy(2).prop_map(StopSpec::Free),
    ]
}

fn resolve(spec: &StopSpec, text: &str) -> String {
    match spec {
        StopSpec::Free(s) => s.clone(),
        StopSpec::Slice { start, chars } => {
            let all: Vec<char> = text.chars().collect();
            if all.is_empty() {
                return "a".into();
            }
            let from = start % all.len();
            all[from..(from + chars).min(all.len())].iter().collect()
        }
    }
}

/// The non-streamed answer, computed from scratch: find the token that ends the sequence, decode
/// the kept tokens at once, cut at the earliest stop string (longer first on a tie) that starts
/// after the text `DecodeStream` released for the first `min_tokens` tokens.
fn reference(ids: &[u32], p: &StopParams) -> (String, FinishReason) {
    let tok = tokenizer();
    let limit = p.max_tokens.min(ids.len());
    let token_end = (p.min_tokens..limit).find_map(|k| {
        let id = ids[k];
        if p.stop_token_ids.contains(&id) {
            Some((k, FinishReason::StopToken(id)))
        } else if !p.ignore_eos && p.eos_token_ids.contains(&id) {
            Some((k, FinishReason::Eos(id)))
        } else {
            None
        }
    });
    let kept = match &token_end {
        Some((k, _)) if p.include_stop_str_in_output => &ids[..k + 1],
        Some((k, _)) => &ids[..*k],
        None => &ids[..limit],
    };
    let full = tok.decode(kept, true).unwrap();
    let mut stream = tok.decode_stream(true);
    let protected: usize = ids[..p.min_tokens.min(limit)]
        .iter()
        .filter_map(|&id| stream.step(id).unwrap())
        .map(|s| s.len())
        .sum();
    let protected = protected.min(full.len());
    let hit = p
        .stop
        .iter()
        .filter_map(|s| full[protected..].find(s.as_str()).map(|i| (protected + i, s)))
        .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())));
    match (hit, token_end) {
        (Some((i, s)), _) => {
            let end = if p.include_stop_str_in_output {
                i + s.len()
            } else {
                i
            };
            (full[..end].to_string(), FinishReason::StopString(s.clone()))
        }
        (None, Some((_, reason))) => (full, reason),
        (None, None) => (full, FinishReason::Length),
    }
}

#[derive(Debug, Clone)]
struct Flags {
    include: bool,
    ignore_eos: bool,
    /// Indices into the stream whose ids become `stop_token_ids` (wrapped).
    stop_token_picks: Vec<usize>,
    min_tokens: usize,
    /// Fraction of the stream's length, in 1..=100.
    max_tokens_pct: usize,
}

fn flags_strategy() -> impl Strategy<Value = Flags> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(0usize..64, 0..3),
        prop_oneof![3 => Just(0usize), 1 => 0usize..6],
        prop_oneof![2 => Just(100usize), 1 => 1usize..=100],
    )
        .prop_map(
            |(include, ignore_eos, stop_token_picks, min_tokens, max_tokens_pct)| Flags {
                include,
                ignore_eos,
                stop_token_picks,
                min_tokens,
                max_tokens_pct,
            },
        )
}

fn params_for(ids: &[u32], stops: &[StopSpec], f: &Flags) -> StopParams {
    let full = tokenizer().decode(ids, true).unwrap();
    let max_tokens = (ids.len() * f.max_tokens_pct).div_ceil(100).max(1);
    StopParams {
        stop: stops
            .iter()
            .map(|s| resolve(s, &full))
            .filter(|s| !s.is_empty())
            .collect(),
        stop_token_ids: f.stop_token_picks.iter().map(|i| ids[i % ids.len()]).collect(),
        eos_token_ids: vec![EOS],
        ignore_eos: f.ignore_eos,
        min_tokens: f.min_tokens.min(max_tokens),
        max_tokens,
        include_stop_str_in_output: f.include,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Streamed deltas equal the reference; no delta is invalid or leaks a stop string.
    #[test]
    fn stop_sequences_stream_equals_full_decode_cut_at_first_stop(
        pieces in stream_strategy(),
        stops in prop::collection::vec(stop_strategy(), 0..=4),
        flags in flags_strategy(),
    ) {
        let ids = random_ids(&pieces);
        prop_assume!(!ids.is_empty());
        let params = params_for(&ids, &stops, &flags);
        let (want_text, want_finish) = reference(&ids, &params);
        let (deltas, finish) = detect(&ids, params.clone());
        let got = deltas.concat();
        prop_assert_eq!(&got, &want_text, "params {:?}", params);
        prop_assert_eq!(finish.as_ref(), Some(&want_finish));
        let replacement = |s: &str| s.matches('\u{FFFD}').count();
        prop_assert_eq!(replacement(&got), replacement(&want_text), "no spurious U+FFFD");
        if !params.include_stop_str_in_output {
            let tok = tokenizer();
            let mut stream = tok.decode_stream(true);
            let protected: usize = ids[..params.min_tokens]
                .iter()
                .filter_map(|&id| stream.step(id).unwrap())
                .map(|s| s.len())
                .sum();
            let tail = &got[protected.min(got.len())..];
            for s in &params.stop {
                prop_assert!(!tail.contains(s.as_str()), "stop {:?} leaked into {:?}", s, got);
            }
        }
    }

    /// Without a flush, the decoder's deltas are exactly `tokenizers`' `DecodeStream`'s; with
    /// the flush they add up to the full decode.
    #[test]
    fn stop_sequences_decoder_matches_tokenizers_decode_stream(pieces in stream_strategy()) {
        let tok = tokenizer();
        let ids = random_ids(&pieces);
        let mut ours = IncrementalDecoder::new(tok.clone());
        let mut theirs = tok.decode_stream(true);
        let mut all = String::new();
        for &id in &ids {
            let a = ours.step(id).unwrap();
            let b = theirs.step(id).unwrap();
            prop_assert_eq!(&a, &b, "token {}", id);
            if let Some(a) = a {
                prop_assert!(!a.ends_with('\u{FFFD}'), "a held character is never half sent");
                all.push_str(&a);
            }
        }
        all.push_str(&ours.flush().unwrap());
        prop_assert_eq!(all, tok.decode(&ids, true).unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// The matcher alone: however the text is split, the answer is the whole-text search.
    #[test]
    fn stop_sequences_matcher_is_split_independent(
        text in text_strategy(12),
        cuts in prop::collection::vec(0usize..64, 0..8),
        stops in prop::collection::vec(text_strategy(2), 1..=4),
        include_stop in any::<bool>(),
    ) {
        let mut bounds: Vec<usize> = cuts
            .iter()
            .map(|c| c % (text.len() + 1))
            .filter(|&c| text.is_char_boundary(c))
            .collect();
        bounds.extend([0, text.len()]);
        bounds.sort();
        bounds.dedup();
        let mut m = StopMatcher::new(stops.clone(), include_stop);
        let mut got = String::new();
        let mut hit = None;
        for (n, w) in bounds.windows(2).enumerate() {
            let last = n + 2 == bounds.len();
            match m.push(&text[w[0]..w[1]], false, last) {
                Scan::Release(t) => got.push_str(&t),
                Scan::Stop { text, stop } => {
                    got.push_str(&text);
                    hit = Some(stop);
                    break;
                }
            }
        }
        let want = stops
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, s)| (*i, std::cmp::Reverse(s.len())));
        match want {
            Some((i, s)) => {
                let end = if include_stop { i + s.len() } else { i };
                prop_assert_eq!(&got, &text[..end]);
                prop_assert_eq!(hit.as_ref(), Some(s));
            }
            None => {
                prop_assert_eq!(&got, &text);
                prop_assert_eq!(hit, None);
            }
        }
    }
}
