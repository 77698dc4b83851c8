//! Weight sources: HF safetensors checkpoints (memory-mapped, each rank reading only its slice)
//! and deterministic dummy weights. HF tensor names are used end to end.

use std::ops::Range;

use half::bf16;

/// Host-side tensor storage. bf16 on disk stays bf16; f16 and f32 become f32.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// Which part of a tensor to read. Rows and columns refer to the 2-D `[rows, cols]` layout of
/// HF Linear weights (`[out_features, in_features]`); a 1-D tensor only takes `Full` or `Rows`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    Full,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

/// Something that yields a rank's slices of named tensors.
pub trait WeightSource: Send + Sync {
    /// For banners and errors ("checkpoint /path", "dummy weights, seed 0").
    fn describe(&self) -> String;
    /// Reads `slice` of tensor `name`, whose full shape must be `shape`; a different shape on
    /// disk is an error naming the tensor, the file and both shapes.
    fn load(&self, name: &str, shape: &[usize], slice: Slice) -> crate::Result<HostTensor>;
    /// The stored bytes of `slice` when they are bf16 and one contiguous run of a memory map
    /// (`Full` or `Rows`), so a device can copy them with no host copy; None otherwise. Errors
    /// as `load`.
    fn mapped_bf16(&self, _name: &str, _shape: &[usize], _slice: &Slice) -> crate::Result<Option<&[u8]>> {
        Ok(None)
    }
    /// For generated weights: how tensor `name` is drawn, so a device can generate its slice in
    /// place. None for stored weights.
    fn generator(&self, _name: &str, _shape: &[usize]) -> Option<DummyGen> {
        None
    }
}

/// Element `i` (row-major index in the full tensor) of a dummy tensor is
/// `bf16(mean + a * (2 * uniform(key, i) - 1))`, computed in f32 in that order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DummyGen {
    pub key: u64,
    pub mean: f32,
    pub a: f32,
}

impl DummyGen {
    pub fn value(&self, i: u64) -> f32 {
        self.mean + self.a * (2.0 * crate::rng::uniform(self.key, i) - 1.0)
    }
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use safetensors::{tensor::TensorInfo, Dtype};

use crate::error::{Error, Result};
use crate::rng::{hash_str, mix64};

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// An HF safetensors checkpoint directory: every file memory-mapped, every header parsed and
/// checked at open, so `load` only copies (and converts) the requested slice.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    /// `model.safetensors` or `model.safetensors.index.json`, for errors.
    source: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    /// Index into `Checkpoint::files`.
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file, checked at open: inside it, numel * dtype size long.
    bytes: Range<usize>,
}

fn file_err(file: &Path, msg: String) -> Error {
    Error::Checkpoint {
        file: file.to_path_buf(),
        msg,
    }
}

fn tensor_err(file: &Path, tensor: &str, msg: String) -> Error {
    Error::Tensor {
        file: file.to_path_buf(),
        tensor: tensor.to_string(),
        msg,
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or else the shards listed in
    /// `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let (single, index) = (dir.join(SINGLE), dir.join(INDEX));
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            source: single.clone(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        if single.is_file() {
            let entries = ckpt.map_file(single)?;
            ckpt.tensors.extend(entries);
            return Ok(ckpt);
        }
        if !index.is_file() {
            let msg = match dir.is_dir() {
                true => format!("no {SINGLE} or {INDEX} in this directory"),
                false => "not a directory".to_string(),
            };
            return Err(file_err(dir, msg));
        }
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in read_weight_map(&index)? {
            by_file.entry(file).or_default().push(name);
        }
        for (file, names) in by_file {
            let path = dir.join(&file);
            if !path.is_file() {
                let first = &names[0];
                let msg = format!("weight_map names {file} (for '{first}'), which is not a file");
                return Err(file_err(&index, msg));
            }
            let mut entries: HashMap<_, _> = ckpt.map_file(path.clone())?.into_iter().collect();
            for name in names {
                let Some(entry) = entries.remove(&name) else {
                    let msg = format!("listed in {INDEX} for this file, but not in it");
                    return Err(tensor_err(&path, &name, msg));
                };
                ckpt.tensors.insert(name, entry);
            }
        }
        ckpt.source = index;
        Ok(ckpt)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// All tensor names, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn map_file(&mut self, path: PathBuf) -> Result<Vec<(String, Entry)>> {
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only and owned by `self`. Like every mmap-based loader we
        // require that checkpoint files are not truncated or rewritten while open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let entries = parse_header(&path, &map, self.files.len())?;
        self.files.push((path, map));
        Ok(entries)
    }
}

fn read_weight_map(index: &Path) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_slice(&text).map_err(|e| {
        file_err(
            index,
            format!("not a JSON index with a \"weight_map\" of names to files: {e}"),
        )
    })?;
    Ok(parsed.weight_map)
}

/// Parses a safetensors header (u64 LE length, then JSON) and checks that each tensor's
/// `data_offsets` lie in the file, fit its dtype and shape, and overlap no other tensor.
fn parse_header(path: &Path, bytes: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let Some(len_prefix) = bytes.get(..8) else {
        let msg = format!("{} bytes, too short for a safetensors header", bytes.len());
        return Err(file_err(path, msg));
    };
    let header_len = u64::from_le_bytes(len_prefix.try_into().unwrap_or_default());
    let Some(data_start) = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= bytes.len())
    else {
        let n = bytes.len();
        let msg = format!("header length {header_len} is larger than the file ({n} bytes)");
        return Err(file_err(path, msg));
    };
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| file_err(path, format!("header is not a JSON object: {e}")))?;
    let data_len = bytes.len() - data_start;
    let mut entries = Vec::with_capacity(header.len());
    header.remove("__metadata__");
    for (name, value) in header {
        let bad = |msg: String| tensor_err(path, &name, msg);
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| bad(format!("bad header entry: {e}")))?;
        let ((begin, end), dtype, shape) = (info.data_offsets, info.dtype, &info.shape);
        if begin > end {
            return Err(bad(format!("data_offsets [{begin}, {end}] decrease")));
        }
        if end > data_len {
            let msg = format!("data_offsets [{begin}, {end}] run past the {data_len} data bytes");
            return Err(bad(msg + " (truncated file?)"));
        }
        let bits = product(shape).and_then(|n| n.checked_mul(dtype.bitsize()));
        if bits.is_none() || bits != (end - begin).checked_mul(8) {
            let n = end - begin;
            let msg = format!("data_offsets [{begin}, {end}]: {n} bytes, not {dtype} {shape:?}");
            return Err(bad(msg));
        }
        let bytes = data_start + begin..data_start + end;
        entries.push((
            name,
            Entry {
                file,
                dtype,
                shape: info.shape,
                bytes,
            },
        ));
    }
    entries.sort_by_key(|(_, e)| (e.bytes.start, e.bytes.end));
    for pair in entries.windows(2) {
        let ((a, ea), (b, eb)) = (&pair[0], &pair[1]);
        if ea.bytes.end > eb.bytes.start {
            let msg = format!("data overlaps that of tensor '{a}'");
            return Err(tensor_err(path, b, msg));
        }
    }
    Ok(entries)
}

fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// The shape of `slice` of a `shape` tensor and the row-major element ranges it covers.
fn slice_ranges(shape: &[usize], slice: &Slice) -> Result<(Vec<usize>, Vec<Range<usize>>), String> {
    let (Some(numel), Some(row_len)) = (product(shape), product(shape.get(1..).unwrap_or(&[]))) else {
        return Err(format!("shape {shape:?} has too many elements"));
    };
    let check = |r: &Range<usize>, n: usize, what: &str| match r.start <= r.end && r.end <= n {
        true => Ok(()),
        false => Err(format!("{what} {r:?} out of range for shape {shape:?}")),
    };
    match slice {
        Slice::Full => {
            let all = 0..numel;
            Ok((shape.to_vec(), vec![all]))
        }
        Slice::Rows(r) if !shape.is_empty() => {
            check(r, shape[0], "rows")?;
            let out = [&[r.len()], &shape[1..]].concat();
            let rows = r.start * row_len..r.end * row_len;
            Ok((out, vec![rows]))
        }
        Slice::Cols(c) if shape.len() == 2 => {
            check(c, shape[1], "columns")?;
            let ranges = (0..shape[0]).map(|i| i * row_len + c.start..i * row_len + c.end);
            Ok((vec![shape[0], c.len()], ranges.collect()))
        }
        _ => {
            let msg = format!("cannot take {slice:?} of a tensor of shape {shape:?}");
            Err(msg)
        }
    }
}

/// Decodes elements `ranges` of `bytes`, `N` little-endian bytes each, at any alignment.
fn decode<const N: usize, T>(bytes: &[u8], ranges: &[Range<usize>], f: fn([u8; N]) -> T) -> Vec<T> {
    let mut out = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum());
    for r in ranges {
        let chunks = bytes[r.start * N..r.end * N].chunks_exact(N);
        out.extend(chunks.map(|b| f(b.try_into().unwrap_or([0; N]))));
    }
    out
}

impl WeightSource for Checkpoint {
    fn describe(&self) -> String {
        format!("checkpoint {}", self.dir.display())
    }

    fn load(&self, name: &str, shape: &[usize], slice: Slice) -> Result<HostTensor> {
        let entry = self.entry(name, shape)?;
        let (path, map) = &self.files[entry.file];
        let err = |msg: String| tensor_err(path, name, msg);
        let (shape, ranges) = slice_ranges(shape, &slice).map_err(err)?;
        let bytes = &map[entry.bytes.clone()];
        let data = match entry.dtype {
            Dtype::BF16 => HostData::Bf16(decode(bytes, &ranges, bf16::from_le_bytes)),
            Dtype::F16 => HostData::F32(decode(bytes, &ranges, |b| f16::from_le_bytes(b).into())),
            Dtype::F32 => HostData::F32(decode(bytes, &ranges, f32::from_le_bytes)),
            other => {
                let msg = format!("dtype {other} is not supported (BF16, F16, F32)");
                return Err(err(msg));
            }
        };
        Ok(HostTensor { shape, data })
    }

    fn mapped_bf16(&self, name: &str, shape: &[usize], slice: &Slice) -> Result<Option<&[u8]>> {
        let entry = self.entry(name, shape)?;
        if entry.dtype != Dtype::BF16 || matches!(slice, Slice::Cols(_)) {
            return Ok(None);
        }
        let (path, map) = &self.files[entry.file];
        let (_, ranges) = slice_ranges(shape, slice).map_err(|m| tensor_err(path, name, m))?;
        let bytes = &map[entry.bytes.clone()];
        Ok(Some(&bytes[ranges[0].start * 2..ranges[0].end * 2]))
    }
}

impl Checkpoint {
    /// The entry of `name`, checked to have `shape`.
    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let Some(entry) = self.tensors.get(name) else {
            let msg = format!("not found among its {} tensors", self.tensors.len());
            return Err(tensor_err(&self.source, name, msg));
        };
        if entry.shape != shape {
            let (path, on_disk) = (&self.files[entry.file].0, &entry.shape);
            return Err(tensor_err(
                path,
                name,
                format!("shape {on_disk:?} in the file, expected {shape:?}"),
            ));
        }
        Ok(entry)
    }
}

/// Deterministic bf16 weights at a realistic scale, uniform per element from
/// `(seed, name, global index)`, so every slice agrees with the full tensor: norm weights
/// 1 ± std 0.05, `model.embed_tokens.weight` std 1, any other std 1/sqrt(last dim), which is
/// 1/sqrt(in_features) for a Linear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DummyWeights {
    pub seed: u64,
}

impl DummyWeights {
    pub fn new(seed: u64) -> Self {
        DummyWeights { seed }
    }
}

impl WeightSource for DummyWeights {
    fn describe(&self) -> String {
        format!("dummy weights (seed {})", self.seed)
    }

    fn generator(&self, name: &str, shape: &[usize]) -> Option<DummyGen> {
        let in_features = shape.last().copied().unwrap_or(1).max(1) as f32;
        let (mean, std) = match name {
            _ if name.ends_with("norm.weight") => (1.0, 0.05),
            "model.embed_tokens.weight" => (0.0, 1.0),
            _ => (0.0, 1.0 / in_features.sqrt()),
        };
        // Uniform on [mean - a, mean + a] has std a / sqrt(3).
        let a = std * 3f32.sqrt();
        Some(DummyGen {
            key: mix64(self.seed ^ mix64(hash_str(name))),
            mean,
            a,
        })
    }

    fn load(&self, name: &str, shape: &[usize], slice: Slice) -> Result<HostTensor> {
        let gen = self
            .generator(name, shape)
            .expect("dummy weights generate every tensor");
        let (shape, ranges) = slice_ranges(shape, &slice)
            .map_err(|msg| Error::Invalid(format!("{}: tensor '{name}': {msg}", self.describe())))?;
        let mut data = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum());
        for r in ranges {
            data.extend(r.map(|i| bf16::from_f32(gen.value(i as u64))));
        }
        let data = HostData::Bf16(data);
        Ok(HostTensor { shape, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use safetensors::tensor::TensorView;

    /// A safetensors file of `(name, dtype, shape, values)`, values encoded in `dtype`.
    fn st_file(tensors: &[(&str, Dtype, &[usize], &[f32])]) -> Vec<u8> {
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| encode(t.1, t.3)).collect();
        let mut views = Vec::new();
        for ((name, dtype, shape, _), b) in tensors.iter().zip(&bytes) {
            views.push((*name, TensorView::new(*dtype, shape.to_vec(), b).unwrap()));
        }
        safetensors::serialize(views, None).unwrap()
    }

    fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
        let one = |x: f32| match dtype {
            Dtype::BF16 => bf16::from_f32(x).to_le_bytes().to_vec(),
            Dtype::F16 => f16::from_f32(x).to_le_bytes().to_vec(),
            Dtype::F32 => x.to_le_bytes().to_vec(),
            _ => (x as i64).to_le_bytes().to_vec(),
        };
        v.iter().flat_map(|&x| one(x)).collect()
    }

    /// A file from a header text and data bytes, for headers `serialize` would refuse.
    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let len = (header.len() as u64).to_le_bytes();
        [&len[..], header.as_bytes(), data].concat()
    }

    /// Rows `rows`, columns `cols` of a row-major matrix with `n` columns.
    fn part<T: Copy>(v: &[T], n: usize, rows: Range<usize>, cols: Range<usize>) -> Vec<T> {
        let row = |r: usize| v[r * n + cols.start..r * n + cols.end].to_vec();
        rows.flat_map(row).collect()
    }

    fn f32s(shape: &[usize], v: Vec<f32>) -> HostTensor {
        let data = HostData::F32(v);
        HostTensor {
            shape: shape.to_vec(),
            data,
        }
    }

    fn bf16_bits(t: HostTensor) -> Vec<u16> {
        match t.data {
            HostData::Bf16(v) => v.iter().map(|x| x.to_bits()).collect(),
            other => panic!("bf16 must stay bf16, got {other:?}"),
        }
    }

    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        dir
    }

    fn open_err(dir: &Path) -> String {
        Checkpoint::open(dir).unwrap_err().to_string()
    }

    fn load_err(src: &dyn WeightSource, name: &str, shape: &[usize], slice: Slice) -> String {
        src.load(name, shape, slice).unwrap_err().to_string()
    }

    /// 12 values in [-1.5, 2.57], most of them rounded by bf16 and f16.
    fn values() -> Vec<f32> {
        (0..12).map(|i| i as f32 * 0.37 - 1.5).collect()
    }

    fn mixed_file() -> Vec<u8> {
        let v = values();
        st_file(&[
            ("w32", Dtype::F32, &[3, 4], &v),
            ("w16", Dtype::BF16, &[3, 4], &v),
            ("h16", Dtype::F16, &[3, 4], &v),
            ("norm.weight", Dtype::F32, &[4], &v[..4]),
            ("ids", Dtype::I64, &[2], &[0.0, 1.0]),
        ])
    }

    fn sharded_dir() -> tempfile::TempDir {
        let a = st_file(&[("a.weight", Dtype::BF16, &[3, 4], &values())]);
        let c = st_file(&[("c.weight", Dtype::F32, &[4, 3], &values())]);
        let index = r#"{"metadata": {"total_size": 72},
            "weight_map": {"a.weight": "m-1.safetensors", "c.weight": "m-2.safetensors"}}"#;
        let (m1, m2) = ("m-1.safetensors", "m-2.safetensors");
        dir_with(&[(INDEX, index.as_bytes()), (m1, &a), (m2, &c)])
    }

    #[test]
    fn single_file_slices_in_every_dtype() {
        let dir = dir_with(&[(SINGLE, &mixed_file())]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let names = ["h16", "ids", "norm.weight", "w16", "w32"];
        assert_eq!(
            (ckpt.tensor_names(), ckpt.dir()),
            (names.map(String::from).into(), dir.path())
        );
        let slices = [(Slice::Full, 0..3, 0..4), (Slice::Rows(1..3), 1..3, 0..4)];
        for (slice, rows, cols) in slices.into_iter().chain([(Slice::Cols(1..3), 0..3, 1..3)]) {
            let want = part(&values(), 4, rows.clone(), cols.clone());
            let shape = [rows.len(), cols.len()];
            let load = |name| ckpt.load(name, &[3, 4], slice.clone()).unwrap();
            assert_eq!(load("w32"), f32s(&shape, want.clone()));
            let w16 = load("w16");
            assert_eq!(w16.shape, shape);
            let want16: Vec<u16> = want.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
            assert_eq!(bf16_bits(w16), want16);
            let h16 = want.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
            assert_eq!(load("h16"), f32s(&shape, h16));
        }
        let norm = ckpt.load("norm.weight", &[4], Slice::Rows(1..3)).unwrap();
        assert_eq!(norm, f32s(&[2], values()[1..3].into()));
        let empty = ckpt.load("w32", &[3, 4], Slice::Rows(2..2)).unwrap();
        assert_eq!(empty, f32s(&[0, 4], vec![]));
    }

    #[test]
    fn sharded_checkpoint_reads_each_shard() {
        let dir = sharded_dir();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.tensor_names(), ["a.weight", "c.weight"]);
        let a = ckpt.load("a.weight", &[3, 4], Slice::Cols(3..4)).unwrap();
        let want = [3, 7, 11].map(|i| bf16::from_f32(values()[i]).to_bits());
        assert_eq!((a.shape.clone(), bf16_bits(a)), (vec![3, 1], want.into()));
        let c = ckpt.load("c.weight", &[4, 3], Slice::Rows(3..4)).unwrap();
        assert_eq!(c, f32s(&[1, 3], values()[9..].into()));
        let name = "model.layers.3.mlp.up_proj.weight";
        let msg = load_err(&ckpt, name, &[3, 4], Slice::Full);
        assert!(msg.contains(&format!("'{name}'")) && msg.contains(INDEX), "{msg}");
    }

    #[test]
    fn load_errors_name_tensor_and_file() {
        let dir = dir_with(&[(SINGLE, &mixed_file())]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let file = dir.path().join(SINGLE).display().to_string();
        let check = |name: &str, shape: &[usize], slice, want: &str| {
            let msg = load_err(&ckpt, name, shape, slice);
            let named = msg.contains(&format!("'{name}'")) && msg.contains(&file);
            assert!(named && msg.contains(want), "{msg}\nwanted: {want}");
        };
        check("missing.weight", &[3, 4], Slice::Full, "not found");
        check("w32", &[4, 3], Slice::Full, "[3, 4] in the file, expected [4, 3]");
        check("w32", &[3, 4], Slice::Rows(2..4), "rows 2..4 out of range");
        check("w32", &[3, 4], Slice::Cols(3..5), "columns 3..5 out of range");
        check("w32", &[3, 4], Slice::Cols(Range { start: 3, end: 2 }), "3..2");
        check("norm.weight", &[4], Slice::Cols(0..1), "cannot take Cols(0..1)");
        check("ids", &[2], Slice::Full, "dtype I64 is not supported");
    }

    #[test]
    fn open_errors_name_the_file() {
        let empty = tempfile::tempdir().unwrap();
        let msg = open_err(empty.path());
        assert!(msg.contains("no model.safetensors or model.safetensors.index.json"));
        let msg = open_err(&empty.path().join("nope"));
        assert!(msg.contains("nope: not a directory"), "{msg}");
        let check = |bytes: &[u8], want: &str| {
            let msg = open_err(dir_with(&[(SINGLE, bytes)]).path());
            assert!(msg.contains(SINGLE) && msg.contains(want), "{msg}\nwanted: {want}");
        };
        let good = mixed_file();
        let cut = &good[..good.len() - 4];
        check(cut, "'h16': data_offsets [104, 128] run past the 124");
        check(&good[..5], "5 bytes, too short");
        let mut long = good.clone();
        long[..8].copy_from_slice(&(good.len() as u64 - 7).to_le_bytes());
        check(&long, "is larger than the file");
        check(&raw("{\"x\": [", &[]), "header is not a JSON object");
        let header = |x: &str| format!(r#"{{"x": {x}}}"#);
        let with_x = |x, want| check(&raw(&header(x), &[0; 48]), want);
        with_x(
            r#"{"dtype":"F32", "shape":[2, 3], "data_offsets":[0, 20]}"#,
            "[0, 20]: 20",
        );
        with_x(r#"{"dtype":"F32", "shape":[2, 3], "data_offsets":[24, 0]}"#, "decrease");
        with_x(
            r#"{"dtype":"Q7", "shape":[2, 3], "data_offsets":[0, 24]}"#,
            "'x': bad header",
        );
        let two = r#"{"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]},
                      "y": {"dtype": "F32", "shape": [6], "data_offsets": [20, 44]}}"#;
        check(&raw(two, &[0; 48]), "'y': data overlaps that of tensor 'x'");

        let dir = sharded_dir();
        std::fs::remove_file(dir.path().join("m-2.safetensors")).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains(INDEX) && msg.contains("m-2.safetensors (for 'c.weight')"),
            "{msg}"
        );
        let index = dir.path().join(INDEX);
        std::fs::write(&index, r#"{"weight_map": {"b.weight": "m-1.safetensors"}}"#).unwrap();
        let msg = open_err(dir.path());
        assert!(
            msg.contains("m-1.safetensors: tensor 'b.weight': listed in model."),
            "{msg}"
        );
        std::fs::write(&index, r#"{"weights": {}}"#).unwrap();
        let msg = open_err(dir.path());
        assert!(msg.contains(INDEX) && msg.contains("weight_map"), "{msg}");
    }

    /// Opens `dir` and loads every tensor in several ways; only a panic fails.
    fn open_and_load_all(dir: &Path) {
        let Ok(ckpt) = Checkpoint::open(dir) else {
            return;
        };
        for name in ckpt.tensor_names() {
            for shape in [&[3, 4][..], &[4, 3], &[4], &[2]] {
                for slice in [Slice::Full, Slice::Rows(0..1), Slice::Cols(1..2)] {
                    let _ = ckpt.load(&name, shape, slice);
                }
            }
        }
    }

    #[test]
    fn fuzzed_files_and_indexes_never_panic() {
        let good = mixed_file();
        let n = good.len();
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let digits: Vec<usize> = (8..header_end).filter(|&i| good[i].is_ascii_digit()).collect();
        let (single, sharded) = (tempfile::tempdir().unwrap(), sharded_dir());
        let index = std::fs::read(sharded.path().join(INDEX)).unwrap();
        let tokens = r#"{ } [ ] : , "weight_map" "a.weight" "m-1.safetensors" "" "/" 1e999"#;
        let tokens: Vec<&str> = tokens.split(' ').collect();
        let mut rng = Rng::new(42, 0);
        let mut below = |n: usize| (rng.next_u64() % n.max(1) as u64) as usize;
        for i in 0..5000 {
            let mut bytes = good.clone();
            match i % 5 {
                0 => (0..1 + below(4)).for_each(|_| bytes[below(header_end)] ^= 1 << below(8)),
                // Still valid JSON, with other shapes and offsets.
                1 => (0..1 + below(2)).for_each(|_| {
                    bytes[digits[below(digits.len())]] = b'0' + below(10) as u8;
                }),
                2 => bytes.truncate(below(n)),
                3 => {
                    let len = below(if i % 2 == 0 { usize::MAX } else { n + 16 });
                    bytes[..8].copy_from_slice(&(len as u64).to_le_bytes());
                }
                _ => {
                    let mut text = index.clone();
                    if i % 2 == 0 {
                        let mut token = || tokens[below(tokens.len())].bytes();
                        text = (0..24).flat_map(|_| token()).collect();
                    } else {
                        for _ in 0..1 + below(3) {
                            text[below(index.len())] = b"{}[]:,\"0a"[below(9)];
                        }
                    }
                    std::fs::write(sharded.path().join(INDEX), text).unwrap();
                    open_and_load_all(sharded.path());
                    continue;
                }
            }
            std::fs::write(single.path().join(SINGLE), &bytes).unwrap();
            open_and_load_all(single.path());
        }
    }

    #[test]
    fn dummy_slices_match_the_full_tensor() {
        let w = DummyWeights::new(7);
        assert_eq!(w.describe(), "dummy weights (seed 7)");
        let load = |seed, name, shape: &[usize], slice| {
            let t = DummyWeights::new(seed).load(name, shape, slice).unwrap();
            (t.shape.clone(), t.to_f32())
        };
        let name = "model.layers.0.mlp.up_proj.weight";
        let (_, full) = load(7, name, &[6, 10], Slice::Full);
        let rows = load(7, name, &[6, 10], Slice::Rows(2..5));
        assert_eq!(rows, (vec![3, 10], part(&full, 10, 2..5, 0..10)));
        let cols = load(7, name, &[6, 10], Slice::Cols(3..7));
        assert_eq!(cols, (vec![6, 4], part(&full, 10, 0..6, 3..7)));
        let (_, norm) = load(7, "model.norm.weight", &[8], Slice::Full);
        let (_, tail) = load(7, "model.norm.weight", &[8], Slice::Rows(5..8));
        assert_eq!(tail, norm[5..]);
        assert_ne!(load(8, name, &[6, 10], Slice::Full).1, full);
        let msg = load_err(&w, name, &[6, 10], Slice::Rows(4..7));
        assert!(msg.contains("rows 4..7 out of range") && msg.contains(name), "{msg}");
    }

    #[test]
    fn dummy_weights_have_realistic_scale() {
        let check = |name: &str, shape: &[usize], want_mean: f64, want_std: f64| {
            let v = DummyWeights::new(1).load(name, shape, Slice::Full).unwrap().to_f32();
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
            let (mean_err, std_err) = ((mean - want_mean) / want_std, var.sqrt() / want_std - 1.0);
            assert!(mean_err.abs() < 0.02 && std_err.abs() < 0.02, "{name}: {mean} {var}");
        };
        check("o_proj.weight", &[256, 1024], 0.0, 1.0 / 32.0);
        check("model.embed_tokens.weight", &[100, 100], 0.0, 1.0);
        check("input_layernorm.weight", &[4096], 1.0, 0.05);
    }

    /// Checks dtype and shape of each tensor of a fixture, and that Rows and Cols slices agree
    /// with Full.
    fn check_fixture(dir: &str, tensors: &[(&str, &[usize])], is_bf16: bool) -> Checkpoint {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let ckpt = Checkpoint::open(&Path::new(fixtures).join(dir)).unwrap();
        for &(name, shape) in tensors {
            let full = ckpt.load(name, shape, Slice::Full).unwrap();
            let got = (&full.shape[..], matches!(full.data, HostData::Bf16(_)));
            assert_eq!(got, (shape, is_bf16), "{name}");
            let v = full.to_f32();
            assert!(v.iter().any(|&x| x != 0.0) && v.iter().all(|x| x.is_finite()));
            let load = |slice| ckpt.load(name, shape, slice).unwrap().to_f32();
            let (rows, n) = (shape[0], shape.get(1).copied().unwrap_or(1));
            let r = rows / 4..rows / 2;
            assert_eq!(load(Slice::Rows(r.clone())), part(&v, n, r, 0..n), "{name}");
            if shape.len() == 2 {
                assert_eq!(load(Slice::Cols(n / 2..n)), part(&v, n, 0..rows, n / 2..n));
            }
        }
        ckpt
    }

    #[test]
    fn hf_fixtures_load() {
        let gqa = [
            ("model.embed_tokens.weight", &[384, 64][..]),
            ("model.layers.0.self_attn.q_proj.weight", &[64, 64]),
            ("model.layers.0.self_attn.k_proj.weight", &[32, 64]),
            ("model.layers.1.self_attn.v_proj.weight", &[32, 64]),
            ("model.layers.2.mlp.down_proj.weight", &[64, 160]),
            ("model.layers.2.input_layernorm.weight", &[64]),
            ("lm_head.weight", &[384, 64]),
        ];
        let gqa = check_fixture("gqa-llama3", &gqa, true);
        assert_eq!(gqa.tensor_names().len(), 3 + 3 * 9);
        let tied = [
            ("model.embed_tokens.weight", &[333, 72][..]),
            ("model.layers.0.self_attn.k_proj.weight", &[72, 72]),
            ("model.layers.1.mlp.gate_proj.weight", &[200, 72]),
            ("model.norm.weight", &[72]),
        ];
        let tied = check_fixture("tied-odd", &tied, false);
        assert_eq!(tied.tensor_names().len(), 2 + 2 * 9);
        let msg = load_err(&tied, "lm_head.weight", &[333, 72], Slice::Full);
        assert!(msg.contains("'lm_head.weight': not found"), "{msg}");
    }
}
