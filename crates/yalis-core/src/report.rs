//! Benchmark reports: summary statistics, append-only JSONL records, and plain-text tables.

use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    /// Percentiles interpolate linearly between closest ranks (numpy's default). Empty input
    /// gives n = 0 and NaN everywhere else.
    pub fn of(samples: &[f64]) -> Summary {
        let n = samples.len();
        if n == 0 {
            let nan = f64::NAN;
            return Summary {
                n,
                mean: nan,
                std: nan,
                min: nan,
                p50: nan,
                p90: nan,
                p99: nan,
                max: nan,
            };
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let pct = |q: f64| {
            let h = (n - 1) as f64 * q;
            let lo = h.floor() as usize;
            let hi = h.ceil() as usize;
            v[lo] + (h - lo as f64) * (v[hi] - v[lo])
        };
        Summary {
            n,
            mean,
            std: var.sqrt(),
            min: v[0],
            p50: pct(0.5),
            p90: pct(0.9),
            p99: pct(0.99),
            max: v[n - 1],
        }
    }
}

/// Appends `record` as one compact JSON line. Never truncates; parent directories are created.
/// The line goes out in a single write, so concurrent appenders do not interleave lines.
pub fn append_jsonl(path: &Path, record: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut line = serde_json::to_string(record).map_err(|e| Error::Invalid(format!("report record: {e}")))?;
    line.push('\n');
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| Error::io(path, e))
}

/// The current time as "YYYY-MM-DDTHH:MM:SSZ".
pub fn utc_now_rfc3339() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    rfc3339_from_unix(secs)
}

/// Seconds since the Unix epoch as "YYYY-MM-DDTHH:MM:SSZ" (Hinnant's civil-from-days).
pub fn rfc3339_from_unix(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Right-aligned columns separated by two spaces: the header row, a dashed rule, then `rows`
/// (missing cells are blank, extra cells are dropped). Each line ends in '\n'.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    fn cell(row: &[String], c: usize) -> &str {
        row.get(c).map_or("", String::as_str)
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            let cells = rows.iter().map(|r| cell(r, c).chars().count());
            cells.fold(headers[c].chars().count(), usize::max)
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells.zip(&widths).map(|(s, &w)| format!("{s:>w$}")).collect();
        padded.join("  ") + "\n"
    };
    let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
    let mut out = line(&mut headers.iter().copied());
    out += &line(&mut rule.iter().map(String::as_str));
    for row in rows {
        out += &line(&mut (0..headers.len()).map(|c| cell(row, c)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn summary_matches_numpy() {
        let s = Summary::of(&[50.0, 15.0, 40.0, 20.0, 35.0]);
        assert_eq!(s.n, 5);
        assert!(close(s.mean, 32.0));
        assert!(close(s.std, 166.0f64.sqrt()), "{s:?}");
        assert_eq!((s.min, s.max), (15.0, 50.0));
        assert!(close(s.p50, 35.0));
        assert!(close(s.p90, 46.0)); // rank 3.6: 40 + 0.6 * 10
        assert!(close(s.p99, 49.6));

        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Summary::of(&ten);
        assert!(close(s.mean, 5.5) && close(s.std, 8.25f64.sqrt()));
        assert!(close(s.p50, 5.5) && close(s.p90, 9.1) && close(s.p99, 9.91), "{s:?}");

        let one = Summary::of(&[3.0]);
        assert_eq!((one.p50, one.p99, one.std), (3.0, 3.0, 0.0));
    }

    #[test]
    fn summary_of_nothing_is_nan() {
        let s = Summary::of(&[]);
        assert_eq!(s.n, 0);
        let all = [s.mean, s.std, s.min, s.p50, s.p90, s.p99, s.max];
        assert!(all.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn append_keeps_earlier_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs/nested/bench.jsonl");
        append_jsonl(&path, &serde_json::json!({"run": 1, "tag": "a b"})).unwrap();
        append_jsonl(&path, &serde_json::json!({"run": 2})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"run\":1,\"tag\":\"a b\"}\n{\"run\":2}\n");
    }

    #[test]
    fn rfc3339_known_times() {
        assert_eq!(rfc3339_from_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_from_unix(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_from_unix(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_from_unix(1_795_250_100), "2026-11-21T08:35:00Z");
        assert_eq!(rfc3339_from_unix(4_102_444_799), "2099-12-31T23:59:59Z");
        let now = utc_now_rfc3339();
        assert_eq!(now.len(), 20);
        assert!(now.ends_with('Z') && now.as_bytes()[10] == b'T', "{now}");
    }

    #[test]
    fn table_is_right_aligned() {
        let rows = vec![
            vec!["1".to_string(), "12.50".to_string()],
            vec!["128".to_string(), "3.1".to_string()],
        ];
        let t = format_table(&["batch", "ms"], &rows);
        let want = "batch     ms\n-----  -----\n    1  12.50\n  128    3.1\n";
        assert_eq!(t, want);
    }
}
