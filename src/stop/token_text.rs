//! One token as a client sees it in `logprobs`: its text decoded on its own, and its own bytes.
//!
//! The text is `tokenizer.decode(&[id], false)` (lossy where the token is part of a UTF-8
//! character), so `"Ġhello"` reads `" hello"` as OpenAI shows it. A SentencePiece decoder strips
//! the space of a leading `▁` (it assumes the token starts the text); it is put back, since the
//! token stands in the middle of the completion. The bytes are the UTF-8 of that text unless the
//! decode lost something (U+FFFD): then a byte-fallback token `<0xE2>` is its one byte, and a
//! byte-level BPE token is mapped back through GPT-2's byte-to-char table.

use tokenizers::Tokenizer;

/// `(text, bytes)` of token `id`.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let raw = tokenizer.id_to_token(id);
    let mut text = tokenizer.decode(&[id], false).unwrap_or_default();
    if raw.as_deref().is_some_and(|r| r.starts_with('\u{2581}')) && !text.starts_with(' ') {
        text.insert(0, ' ');
    }
    if !text.contains('\u{FFFD}') {
        let bytes = text.as_bytes().to_vec();
        return (text, bytes);
    }
    let bytes = raw
        .as_deref()
        .and_then(|r| byte_fallback(r).map(|b| vec![b]).or_else(|| byte_level(r)))
        .unwrap_or_else(|| text.as_bytes().to_vec());
    (text, bytes)
}

/// The byte of a SentencePiece byte-fallback token, `<0xHH>`.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The bytes of a byte-level BPE token, if every char of it is in GPT-2's byte alphabet:
/// printable Latin-1 stands for itself, every other byte for U+0100 upwards in order.
fn byte_level(token: &str) -> Option<Vec<u8>> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    token
        .chars()
        .map(|c| match u32::from(c) {
            c @ 0..=255 if printable(c as u8) => Some(c as u8),
            c @ 256..=511 => (0..=255u8).filter(|&b| !printable(b)).nth(c as usize - 256),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama/tokenizer.json"
        );
        Tokenizer::from_file(path).unwrap()
    }

    #[test]
    fn sampling_byte_level_tokens_read_as_openai_shows_them() {
        let t = fixture();
        let id = |s: &str| t.token_to_id(s).unwrap();
        assert_eq!(token_text(&t, id("Ġthe")), (" the".to_string(), b" the".to_vec()));
        assert_eq!(token_text(&t, id("he")), ("he".to_string(), b"he".to_vec()));
        assert_eq!(
            token_text(&t, 2),
            ("</s>".to_string(), b"</s>".to_vec()),
            "special tokens are shown"
        );
        // "aÃ": `a` and the first byte of a two-byte character.
        let (text, bytes) = token_text(&t, id("aÃ"));
        assert_eq!(text, "a\u{FFFD}");
        assert_eq!(bytes, vec![b'a', 0xC3]);
        // Every single-byte token gives back its byte.
        for b in 0..=255u8 {
            let token: String = byte_level_char(b).into();
            if let Some(i) = t.token_to_id(&token) {
                assert_eq!(token_text(&t, i).1, vec![b], "byte {b:#x}");
            }
        }
    }

    fn byte_level_char(b: u8) -> char {
        (0..=511u32)
            .filter_map(char::from_u32)
            .find(|c| byte_level(&c.to_string()) == Some(vec![b]))
            .unwrap()
    }

    /// A SentencePiece-style tokenizer (Llama 2's decoder chain, byte fallback) built inline.
    #[test]
    fn sampling_sentencepiece_tokens_keep_their_space_and_fallback_byte() {
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null, "pre_tokenizer": null, "post_processor": null,
          "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
          "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": {"<unk>": 0, "<0xE2>": 1, "▁hello": 2, "lo": 3}, "merges": []}
        }"#;
        let t: Tokenizer = json.parse().unwrap();
        assert_eq!(token_text(&t, 2), (" hello".to_string(), b" hello".to_vec()));
        assert_eq!(token_text(&t, 3), ("lo".to_string(), b"lo".to_vec()));
        assert_eq!(token_text(&t, 1).1, vec![0xE2]);
    }
}
