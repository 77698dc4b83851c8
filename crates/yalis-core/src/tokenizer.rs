//! Text <-> token ids: an HF `tokenizer.json`, or a byte-level fallback for presets that ship no
//! tokenizer (dummy weights).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Ids below this are reserved in the byte tokenizer: 0 BOS, 1 EOS, 2 pad; byte `b` is `b + 3`.
const BYTE_OFFSET: u32 = 3;

pub enum TextTokenizer {
    Hf {
        inner: Box<tokenizers::Tokenizer>,
        path: PathBuf,
        bos: Option<u32>,
    },
    Bytes {
        bos: Option<u32>,
        eos: Option<u32>,
    },
}

impl TextTokenizer {
    /// Loads an HF `tokenizer.json`. `bos` is the model's `bos_token_id`: it is prepended when
    /// the tokenizer's post-processor does not add it (the Llama rule).
    pub fn from_file(path: &Path, bos: Option<u32>) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            msg: format!("not a valid tokenizer.json: {e}"),
        })?;
        Ok(TextTokenizer::Hf {
            inner: Box::new(inner),
            path: path.to_path_buf(),
            bos,
        })
    }

    /// The byte-level fallback: 256 byte ids after 3 reserved ones.
    pub fn bytes(bos: Option<u32>, eos: Option<u32>) -> Self {
        TextTokenizer::Bytes { bos, eos }
    }

    /// Token ids of `text`, with the tokenizer's own special tokens and BOS exactly once.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let (mut ids, bos) = match self {
            TextTokenizer::Hf { inner, bos, .. } => {
                let enc = inner.encode(text, true).map_err(|e| self.err("encode", e))?;
                (enc.get_ids().to_vec(), *bos)
            }
            TextTokenizer::Bytes { bos, .. } => {
                let ids = text.bytes().map(|b| b as u32 + BYTE_OFFSET).collect();
                (ids, *bos)
            }
        };
        if let Some(bos) = bos {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, skipping special tokens; invalid UTF-8 and unknown ids become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            TextTokenizer::Hf { inner, .. } => inner.decode(ids, true).map_err(|e| self.err("decode", e)),
            TextTokenizer::Bytes { .. } => {
                let mut bytes = Vec::with_capacity(ids.len());
                for &id in ids {
                    match id.checked_sub(BYTE_OFFSET) {
                        None => {}
                        Some(b @ 0..=255) => bytes.push(b as u8),
                        Some(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// Number of ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
            TextTokenizer::Bytes { .. } => (256 + BYTE_OFFSET) as usize,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TextTokenizer::Hf { path, bos, .. } => format!(
                "HF tokenizer {} (vocab {}, bos {bos:?})",
                path.display(),
                self.vocab_size()
            ),
            TextTokenizer::Bytes { bos, eos } => format!(
                "byte-level fallback (vocab {}, bos {bos:?}, eos {eos:?})",
                self.vocab_size()
            ),
        }
    }

    fn err(&self, op: &str, e: impl std::fmt::Display) -> Error {
        let path = match self {
            TextTokenizer::Hf { path, .. } => path.clone(),
            TextTokenizer::Bytes { .. } => PathBuf::from("<bytes>"),
        };
        Error::Tokenizer {
            path,
            msg: format!("{op}: {e}"),
        }
    }
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/");

    #[derive(serde::Deserialize)]
    struct Reference {
        prompts: Vec<String>,
        input_ids: Vec<Vec<u32>>,
    }

    fn fixture(name: &str) -> (TextTokenizer, Reference) {
        let dir = Path::new(FIXTURES).join(name);
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), Some(0)).unwrap();
        let text = std::fs::read_to_string(dir.join("reference.json")).unwrap();
        (tok, serde_json::from_str(&text).unwrap())
    }

    fn check_fixture(name: &str, post_processor_adds_bos: bool) {
        let (tok, reference) = fixture(name);
        assert!(!reference.prompts.is_empty());
        for (prompt, expected) in reference.prompts.iter().zip(&reference.input_ids) {
            let TextTokenizer::Hf { inner, .. } = &tok else {
                unreachable!()
            };
            let raw = inner.encode(prompt.as_str(), true).unwrap();
            assert_eq!(raw.get_ids().first() == Some(&0), post_processor_adds_bos);

            let ids = tok.encode(prompt).unwrap();
            assert_eq!(&ids, expected, "{name}: {prompt:?}");
            assert_ne!(ids.get(1), Some(&0), "{name}: BOS doubled");
            assert_eq!(tok.decode(&ids[1..]).unwrap(), *prompt);
            assert_eq!(tok.decode(&ids).unwrap(), *prompt, "BOS is skipped");
        }
        assert!(tok.describe().contains("tokenizer.json"));
    }

    #[test]
    fn gqa_llama3_post_processor_adds_bos() {
        check_fixture("gqa-llama3", true);
    }

    #[test]
    fn tied_odd_engine_adds_bos() {
        check_fixture("tied-odd", false);
    }

    #[test]
    fn no_bos_when_not_asked() {
        let dir = Path::new(FIXTURES).join("tied-odd");
        let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), None).unwrap();
        assert_ne!(tok.encode("Hello").unwrap()[0], 0);
        assert_eq!(tok.vocab_size(), 300);
    }

    #[test]
    fn bytes_round_trip() {
        let tok = TextTokenizer::bytes(Some(0), Some(1));
        let text = "héllo, wörld ✓ 🦀";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids[0], 0);
        assert_eq!(ids.len(), 1 + text.len());
        assert_eq!(ids[1], b'h' as u32 + 3);
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.decode(&[0, 1, 2, 300, b'a' as u32 + 3]).unwrap(), "\u{FFFD}a");
        assert_eq!(tok.vocab_size(), 259);
        assert_eq!(TextTokenizer::bytes(None, None).encode("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn missing_or_malformed_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let err = TextTokenizer::from_file(&missing, None).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");

        let bad = dir.path().join("tokenizer.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let err = TextTokenizer::from_file(&bad, None).unwrap_err();
        assert!(matches!(err, Error::Tokenizer { .. }));
        assert!(err.to_string().contains(&bad.display().to_string()), "{err}");
    }
}
