//! Llama-family model config: HF `config.json` (Llama 2, 3, 3.1, 3.2) and the embedded presets.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// RoPE frequency scaling (`rope_scaling` or `rope_parameters` in HF configs).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The parts of an HF Llama config the engine uses. HF names kept.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// The presets compiled into the binary: (name, aliases, config.json text).
pub const PRESETS: &[(&str, &[&str], &str)] = &[
    ("tiny", &[], include_str!("../../../configs/models/tiny.json")),
    (
        "llama-3.1-8b",
        &["llama-8b", "llama3.1-8b"],
        include_str!("../../../configs/models/llama-3.1-8b.json"),
    ),
    (
        "llama-3.1-70b",
        &["llama-70b", "llama3.1-70b"],
        include_str!("../../../configs/models/llama-3.1-70b.json"),
    ),
    (
        "llama-3.1-405b",
        &["llama-405b", "llama3.1-405b"],
        include_str!("../../../configs/models/llama-3.1-405b.json"),
    ),
];

/// A `--model` argument resolved to a config, and to a checkpoint directory when it names one.
#[derive(Clone, Debug)]
pub struct ResolvedModel {
    /// Preset name, or the directory as given.
    pub name: String,
    pub config: ModelConfig,
    /// The checkpoint directory (None for a preset).
    pub dir: Option<PathBuf>,
}

impl ResolvedModel {
    /// `arg` is a preset name or alias, or a directory holding an HF `config.json`.
    pub fn resolve(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        if path.is_dir() {
            let file = path.join("config.json");
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
            let config = ModelConfig::from_json_str(&text, &file.display().to_string())?;
            return Ok(ResolvedModel {
                name: arg.to_string(),
                config,
                dir: Some(path.to_path_buf()),
            });
        }
        let key = arg.to_ascii_lowercase();
        for (name, aliases, text) in PRESETS {
            if *name == key || aliases.contains(&key.as_str()) {
                let config = ModelConfig::from_json_str(text, &format!("preset {name}"))?;
                return Ok(ResolvedModel {
                    name: name.to_string(),
                    config,
                    dir: None,
                });
            }
        }
        Err(Error::UnknownModel {
            name: arg.to_string(),
            presets: preset_names().join(", "),
        })
    }
}

/// Preset names with their aliases, for help and errors.
pub fn preset_names() -> Vec<String> {
    PRESETS
        .iter()
        .map(|(n, a, _)| {
            if a.is_empty() {
                n.to_string()
            } else {
                format!("{n} ({})", a.join(", "))
            }
        })
        .collect()
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a str,
}

impl Fields<'_> {
    fn err(&self, msg: String) -> Error {
        Error::Config {
            path: self.path.to_string(),
            msg,
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(format!("'{key}' must be a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(format!("missing required field '{key}'")))
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("'{key}' must be a number, found {v}"))),
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("'{key}' must be true or false, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Parses an HF `config.json`. `path` names the source in errors.
    pub fn from_json_str(text: &str, path: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: path.to_string(),
            msg: "expected a JSON object at the top level".into(),
        })?;
        Self::from_fields(&Fields { obj, path })
    }

    fn from_fields(f: &Fields) -> Result<Self> {
        if let Some(mt) = f.obj.get("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                return Err(f.err(format!(
                    "model_type '{mt}' is not supported: yalis runs the Llama family (model_type 'llama')"
                )));
            }
        }
        if let Some(act) = f.obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(f.err(format!("hidden_act '{act}' is not supported (Llama uses 'silu')")));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if f.bool_opt(key)? == Some(true) {
                return Err(f.err(format!("'{key}: true' is not supported: Llama layers have no bias")));
            }
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match f.usize_opt("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 && hidden_size.is_multiple_of(num_attention_heads) => {
                hidden_size / num_attention_heads
            }
            None => {
                return Err(f.err(format!(
                    "no 'head_dim' and hidden_size={hidden_size} is not a multiple of num_attention_heads={num_attention_heads}"
                )))
            }
        };

        // rope_theta sits at the top level (Llama 2/3 configs) or inside rope_parameters
        // (transformers 5); rope_scaling is the older name of rope_parameters.
        let rope_obj = ["rope_parameters", "rope_scaling"]
            .iter()
            .find_map(|k| f.obj.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)));
        let mut rope_theta = f.f64_opt("rope_theta")?;
        let rope_scaling = match rope_obj {
            None => RopeScaling::Default,
            Some((key, v)) => {
                let o = v
                    .as_object()
                    .ok_or_else(|| f.err(format!("'{key}' must be an object, found {v}")))?;
                let sub_path = format!("{}: {key}", f.path);
                let sub = Fields {
                    obj: o,
                    path: &sub_path,
                };
                if let Some(t) = sub.f64_opt("rope_theta")? {
                    rope_theta = Some(t);
                }
                let ty = o
                    .get("rope_type")
                    .or_else(|| o.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match ty {
                    "default" => RopeScaling::Default,
                    "llama3" => {
                        let need = |k: &str| {
                            sub.f64_opt(k)?
                                .ok_or_else(|| sub.err(format!("rope_type llama3 needs '{k}'")))
                        };
                        RopeScaling::Llama3 {
                            factor: need("factor")?,
                            low_freq_factor: need("low_freq_factor")?,
                            high_freq_factor: need("high_freq_factor")?,
                            original_max_position_embeddings: sub
                                .usize_opt("original_max_position_embeddings")?
                                .ok_or_else(|| {
                                    sub.err("rope_type llama3 needs 'original_max_position_embeddings'".into())
                                })?,
                        }
                    }
                    other => {
                        return Err(sub.err(format!(
                            "rope_type '{other}' is not supported (supported: default, llama3)"
                        )))
                    }
                }
            }
        };

        let eos_token_ids = match f.obj.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| f.err(format!("'eos_token_id' entries must be integers, found {x}")))
                })
                .collect::<Result<_>>()?,
            Some(v) => vec![v
                .as_u64()
                .ok_or_else(|| f.err(format!("'eos_token_id' must be an integer or a list, found {v}")))?
                as u32],
        };

        let cfg = ModelConfig {
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10000.0),
            rope_scaling,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            bos_token_id: f.usize_opt("bos_token_id")?.map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate().map_err(|m| f.err(m))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(format!("'{k}' must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads={} is not a multiple of num_key_value_heads={}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim={} must be even for RoPE", self.head_dim));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 || self.rope_theta.is_nan() || self.rope_theta <= 0.0
        {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        if let Some(b) = self.bos_token_id {
            if b as usize >= self.vocab_size {
                return Err(format!("bos_token_id={b} is outside vocab_size={}", self.vocab_size));
            }
        }
        Ok(())
    }

    /// Total parameter count (embedding, layers, final norm, LM head unless tied).
    pub fn num_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim) as u64;
        let kv = (self.num_key_value_heads * self.head_dim) as u64;
        let i = self.intermediate_size as u64;
        let v = self.vocab_size as u64;
        let layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u64 * layer + h + head
    }

    /// RoPE inverse frequencies, [head_dim / 2], with the configured scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let inv = 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64);
                match self.rope_scaling {
                    RopeScaling::Default => inv,
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => {
                        let old = original_max_position_embeddings as f64;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / inv;
                        if wavelen < high_wavelen {
                            inv
                        } else if wavelen > low_wavelen {
                            inv / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_with_published_dimensions() {
        let m = ResolvedModel::resolve("llama-405b").unwrap();
        assert_eq!(m.name, "llama-3.1-405b");
        let c = &m.config;
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
            (16384, 126, 128)
        );
        assert_eq!((c.num_key_value_heads, c.head_dim, c.vocab_size), (8, 128, 128256));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        // Llama 3.1 405B has about 405.8e9 parameters.
        let p = c.num_params() as f64 / 1e9;
        assert!((p - 405.8).abs() < 1.0, "{p}");
        let p8 = ResolvedModel::resolve("llama-8b").unwrap().config.num_params() as f64 / 1e9;
        assert!((p8 - 8.03).abs() < 0.05, "{p8}");
        let p70 = ResolvedModel::resolve("LLAMA-3.1-70B").unwrap().config.num_params() as f64 / 1e9;
        assert!((p70 - 70.55).abs() < 0.1, "{p70}");
        ResolvedModel::resolve("tiny").unwrap();
    }

    #[test]
    fn unknown_model_lists_presets() {
        let e = ResolvedModel::resolve("llama-7q").unwrap_err().to_string();
        assert!(
            e.contains("llama-7q") && e.contains("llama-3.1-405b") && e.contains("tiny"),
            "{e}"
        );
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 100"#;

    fn parse(extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&format!("{{{BASE}{extra}}}"), "test")
    }

    #[test]
    fn rope_forms() {
        let c = parse("").unwrap();
        assert_eq!((c.rope_theta, c.num_key_value_heads, c.head_dim), (10000.0, 4, 16));
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        let old = parse(
            r#", "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        let new = parse(
            r#", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(new.rope_theta, 500000.0);
        let legacy = parse(r#", "rope_scaling": {"type": "default"}"#).unwrap();
        assert_eq!(legacy.rope_scaling, RopeScaling::Default);
        let e = parse(r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
        let e = parse(r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#).unwrap_err();
        assert!(e.to_string().contains("low_freq_factor"), "{e}");
    }

    #[test]
    fn llama3_inv_freq_matches_hf_formula() {
        // Values from HF's _compute_llama3_parameters for head_dim 128, theta 5e5, factor 8.
        let c = ResolvedModel::resolve("llama-8b").unwrap().config;
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert!((f[0] - 1.0).abs() < 1e-12); // high frequency: unscaled
        let unscaled_last = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((f[63] - unscaled_last / 8.0).abs() < 1e-15); // low frequency: divided by factor
    }

    #[test]
    fn eos_one_or_many_and_bad_fields() {
        assert_eq!(parse(r#", "eos_token_id": 7"#).unwrap().eos_token_ids, vec![7]);
        assert_eq!(parse(r#", "eos_token_id": [7, 9]"#).unwrap().eos_token_ids, vec![7, 9]);
        assert!(parse(r#", "eos_token_id": null"#).unwrap().eos_token_ids.is_empty());
        let e = parse(r#", "eos_token_id": "x""#).unwrap_err().to_string();
        assert!(e.contains("eos_token_id"), "{e}");
        let e = parse(r#", "num_key_value_heads": 3"#).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads=3"), "{e}");
        let e = parse(r#", "model_type": "mistral""#).unwrap_err().to_string();
        assert!(e.contains("mistral"), "{e}");
        let e = ModelConfig::from_json_str("{\"hidden_size\": 64, \"num_attention_heads\": 4}", "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg.json") && e.contains("intermediate_size"), "{e}");
        let e = ModelConfig::from_json_str("[1,", "cfg.json").unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = parse(r#", "hidden_size": -1"#);
        assert!(e.is_err());
    }
}
