//! Ranks as processes, end to end: `yalis` starting its own ranks, ranks started by hand through
//! RANK/WORLD_SIZE and --rank/--world-size, under mpirun where it exists; and jobs that lose a
//! rank (killed, aborted, hung) ending fast with a message naming it.
//!
//! Tokens must equal the single-rank run's and HF transformers' exactly; logits within 1e-4
//! (see tests/cli.rs for the tolerance).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TOL: f32 = 1e-4;
const YALIS: &str = env!("CARGO_BIN_EXE_yalis");

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn yalis() -> Command {
    let mut c = Command::new(YALIS);
    for v in [
        "YALIS_LOG",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "YALIS_SPAWNED",
        "SLURM_PROCID",
        "OMPI_COMM_WORLD_RANK",
    ] {
        c.env_remove(v);
    }
    c
}

struct Done {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Waits for `child` at most `limit` (then kills it and fails the test).
fn finish(mut child: Child, limit: Duration, t0: Instant) -> Done {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after {limit:?}; stderr:\n{}",
                e.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Done {
        code: status.code(),
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
        took: t0.elapsed(),
    }
}

fn run(cmd: &mut Command, limit: Duration) -> Done {
    let t0 = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, limit, t0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tensor `logits` of a safetensors file: shape and values.
fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), v)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            assert!(x.is_finite() && y.is_finite());
            (x - y).abs()
        })
        .fold(0.0, f32::max)
}

/// What a generate job left: stdout of the printing process, the generated ids per prompt,
/// the logits, the records.
struct Gen {
    stdout: String,
    ids: Vec<Vec<u32>>,
    shape: Vec<usize>,
    logits: Vec<f32>,
    records: Vec<Value>,
}

fn prompts(dir: &Path) -> Vec<String> {
    let j: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    serde_json::from_value(j["prompts"].clone()).unwrap()
}

fn generate_args(dir: &Path, out: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["generate", "--model", s(dir), "--max-new-tokens", "8", "--ignore-eos"]
        .map(String::from)
        .to_vec();
    for p in prompts(dir) {
        a.extend(["--prompt".into(), p]);
    }
    a.extend([
        "--output-json".into(),
        s(&out.join("gen.jsonl")).into(),
        "--logits-out".into(),
        s(&out.join("logits.safetensors")).into(),
    ]);
    a
}

fn collect(out: &Path, stdout: String) -> Gen {
    let records: Vec<Value> = std::fs::read_to_string(out.join("gen.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids = records
        .iter()
        .map(|r| serde_json::from_value(r["generated_ids"].clone()).unwrap())
        .collect();
    let (shape, logits) = read_logits(&out.join("logits.safetensors"));
    Gen {
        stdout,
        ids,
        shape,
        logits,
        records,
    }
}

fn generate(dir: &Path, extra: &[&str]) -> Gen {
    let tmp = tempfile::tempdir().unwrap();
    let d = run(
        yalis().args(generate_args(dir, tmp.path())).args(extra),
        Duration::from_secs(120),
    );
    assert_eq!(d.code, Some(0), "{extra:?}: stderr:\n{}", d.stderr);
    collect(tmp.path(), d.stdout)
}

/// The same job as a single rank: ids, stdout, and the logits within the tolerance; also the
/// HF reference's greedy ids.
fn assert_same(name: &str, single: &Gen, multi: &Gen, what: &str) {
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap();
    let greedy: Vec<Vec<u32>> = serde_json::from_value(j["greedy_ids"].clone()).unwrap();
    assert_eq!(single.ids, greedy, "{name}: single rank vs transformers");
    assert_eq!(multi.ids, single.ids, "{name} {what}: ids");
    assert_eq!(multi.stdout, single.stdout, "{name} {what}: stdout");
    assert_eq!(multi.shape, single.shape, "{name} {what}: logits shape");
    let err = max_diff(&multi.logits, &single.logits);
    assert!(err <= TOL, "{name} {what}: max |logit diff| = {err}");
}

#[test]
fn self_started_2x2_matches_one_rank() {
    for name in ["gqa-llama3", "tied-odd"] {
        let dir = fixture(name);
        let single = generate(&dir, &[]);
        let multi = generate(&dir, &["--tp", "2", "--pp", "2"]);
        assert_same(name, &single, &multi, "tp=2 pp=2 processes");
        let ranks = multi.records[0]["layout"]["ranks"].as_array().unwrap();
        let pids: std::collections::BTreeSet<&str> = ranks.iter().map(|r| r["process"].as_str().unwrap()).collect();
        assert_eq!(pids.len(), 4, "four processes: {pids:?}");
        assert!(pids.iter().all(|p| p.starts_with("pid ")), "{pids:?}");
        assert_eq!(multi.records[0]["layout"]["allreduce"], "host (TCP)");
        let threads = generate(&dir, &["--tp", "2", "--pp", "2", "--ranks", "threads"]);
        assert_same(name, &single, &threads, "tp=2 pp=2 threads");
        assert!(threads.records[0]["layout"]["ranks"][3]["process"] == "thread 3");
    }
}

/// Pipelined decode (micro-batches flowing through the stages) across processes gives the one
/// rank's tokens and logits.
#[test]
fn pipelined_decode_across_processes_matches_one_rank() {
    for name in ["gqa-llama3", "tied-odd"] {
        let dir = fixture(name);
        let single = generate(&dir, &[]);
        for m in ["2", "3"] {
            let multi = generate(&dir, &["--tp", "2", "--pp", "2", "--pp-microbatches", m]);
            assert_same(
                name,
                &single,
                &multi,
                &format!("tp=2 pp=2 processes, {m} micro-batches"),
            );
            assert_eq!(multi.records[0]["layout"]["pp_microbatches"], m.parse::<u64>().unwrap());
        }
    }
}

/// Four ranks started by hand: two through RANK/WORLD_SIZE/MASTER_*, two through the flags.
#[test]
fn ranks_started_by_hand_match_one_rank() {
    let dir = fixture("gqa-llama3");
    let single = generate(&dir, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let t0 = Instant::now();
    let children: Vec<Child> = (0..4)
        .map(|r| {
            let mut c = yalis();
            c.args(generate_args(&dir, tmp.path()))
                .args(["--tp", "2", "--pp", "2"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if r < 2 {
                c.env("RANK", r.to_string())
                    .env("WORLD_SIZE", "4")
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port);
            } else {
                let r = r.to_string();
                c.args(["--rank", &r, "--world-size", "4", "--master-addr", "localhost"])
                    .args(["--master-port", &port]);
            }
            c.spawn().unwrap()
        })
        .collect();
    let done: Vec<Done> = children
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(120), t0))
        .collect();
    for (r, d) in done.iter().enumerate() {
        assert_eq!(d.code, Some(0), "rank {r}: stderr:\n{}", d.stderr);
        if r > 0 {
            assert_eq!(d.stdout, "", "rank {r} prints nothing");
        }
    }
    let multi = collect(tmp.path(), done[0].stdout.clone());
    assert_same("gqa-llama3", &single, &multi, "ranks by hand");
    assert_eq!(multi.records.len(), 3, "only rank 0 writes the records");
}

/// Open MPI's `mpirun -np N --oversubscribe` (and `--allow-run-as-root` where this runs as
/// root), with the variables that would name a launcher removed; `None` where the machine has no
/// mpirun or another MPI's (CI has none: MPI is not installed for these tests).
fn mpirun(np: usize) -> Option<Command> {
    let Ok(v) = Command::new("mpirun").arg("--version").output() else {
        println!("note: no mpirun on this machine; skipping");
        return None;
    };
    let text = String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr);
    if !text.contains("Open MPI") && !text.contains("Open RTE") {
        println!(
            "note: mpirun is not Open MPI ({}); skipping",
            text.lines().next().unwrap_or("")
        );
        return None;
    }
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe"]);
    let root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    if root {
        c.arg("--allow-run-as-root");
    }
    let plain = yalis();
    for (k, v) in plain.get_envs() {
        if v.is_none() {
            c.env_remove(k);
        }
    }
    Some(c)
}

/// The launcher each rank says it joined through (`YALIS_LOG=yalis=info`), in order of the lines.
fn joined_through(stderr: &str) -> Vec<String> {
    // Without the log's colours: ESC [ ... m.
    let mut plain = String::with_capacity(stderr.len());
    let mut chars = stderr.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    plain
        .lines()
        .filter(|l| l.contains("joined the job"))
        .filter_map(|l| l.split("launcher=").nth(1))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// Four ranks under mpirun: the same tokens, stdout and logits as one rank. With the `mpi`
/// feature they bootstrap through MPI, also where Open MPI's variables are hidden from them.
#[test]
fn under_mpirun() {
    let launcher = if cfg!(feature = "mpi") { "Mpi" } else { "OpenMpi" };
    for name in ["gqa-llama3", "tied-odd"] {
        let Some(mut cmd) = mpirun(4) else { return };
        let dir = fixture(name);
        let single = generate(&dir, &[]);
        let tmp = tempfile::tempdir().unwrap();
        cmd.arg(YALIS)
            .args(generate_args(&dir, tmp.path()))
            .args(["--tp", "2", "--pp", "2"])
            .env("YALIS_LOG", "yalis=info");
        let d = run(&mut cmd, Duration::from_secs(120));
        assert_eq!(d.code, Some(0), "stderr:\n{}", d.stderr);
        assert_eq!(joined_through(&d.stderr), [launcher; 4], "{}", d.stderr);
        let multi = collect(tmp.path(), d.stdout);
        assert_same(name, &single, &multi, "mpirun -np 4");
        assert_eq!(multi.records[0]["layout"]["allreduce"], "host (TCP)");
        assert_eq!(multi.records.len(), 3, "only rank 0 writes the records");
        if cfg!(feature = "mpi") {
            let Some(mut cmd) = mpirun(4) else { return };
            let tmp = tempfile::tempdir().unwrap();
            cmd.arg("env");
            for v in ["RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE"] {
                cmd.args(["-u", &format!("OMPI_COMM_WORLD_{v}")]);
            }
            cmd.arg(YALIS)
                .args(generate_args(&dir, tmp.path()))
                .args(["--tp", "2", "--pp", "2"])
                .env("YALIS_LOG", "yalis=info");
            let d = run(&mut cmd, Duration::from_secs(120));
            assert_eq!(d.code, Some(0), "stderr:\n{}", d.stderr);
            assert_eq!(joined_through(&d.stderr), ["Mpi"; 4], "{}", d.stderr);
            assert_same(name, &single, &collect(tmp.path(), d.stdout), "MPI bootstrap");
        }
    }
}

/// A rank of an mpirun job killed from outside: the job ends within seconds, with a message
/// naming the lost rank.
#[test]
fn a_killed_rank_ends_an_mpirun_job() {
    let Some(mut cmd) = mpirun(4) else { return };
    let t0 = Instant::now();
    cmd.arg(YALIS)
        .args(bench_2x2(&[]).get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut victim = None;
    let mut line = String::new();
    while victim.is_none() && out.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.trim_start().strip_prefix("rank   1 -> cpu (pid ") {
            victim = rest.split(')').next().map(str::to_string);
        }
        line.clear();
    }
    let Some(pid) = victim else {
        let _ = child.kill();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        panic!("the banner names no pid for rank 1; stderr:\n{err}");
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-9", &pid]).status().unwrap().success());
    let t_kill = Instant::now();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let mut err = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t_kill.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mpirun still running 30 s after the kill; stderr:\n{}",
                err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t_kill.elapsed();
    let err = err.join().unwrap();
    assert!(!status.success(), "{status:?}\n{err}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(t0.elapsed() < Duration::from_secs(90));
    // The survivors name the lost rank, unless mpirun ended them first; then mpirun does.
    let lost = format!("lost rank 1 on {} (pid {pid})", hostname());
    let by_mpirun = err.contains("process rank 1 with PID") && err.contains("signal 9");
    assert!(err.contains(&lost) || by_mpirun, "no {lost:?} in:\n{err}");
}

#[test]
fn layouts_must_match_the_launchers_world_size() {
    let dir = fixture("tied-odd");
    let port = free_port().to_string();
    let launched = |extra: &[&str]| {
        let mut c = yalis();
        c.args(["generate", "--model", s(&dir), "--prompt", "hi"])
            .args(extra)
            .env("RANK", "0")
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port);
        run(&mut c, Duration::from_secs(30))
    };
    let d = launched(&["--tp", "2", "--pp", "2"]);
    assert_eq!(d.code, Some(1));
    assert!(d.took < Duration::from_secs(10), "{:?}", d.took);
    for needle in ["rank 0 on", "TP 2 x PP 2 = 4 ranks", "started 2 processes"] {
        assert!(d.stderr.contains(needle), "no {needle:?} in:\n{}", d.stderr);
    }
    let d = launched(&["--tp", "2", "--ranks", "threads"]);
    assert!(
        d.code == Some(1) && d.stderr.contains("--ranks threads"),
        "{}",
        d.stderr
    );
    // The benchmark checks every layout of its lists first.
    let mut c = yalis();
    c.args(["--tp", "2,1", "--num-iters", "1"])
        .env("RANK", "1")
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", &port);
    let d = run(&mut c, Duration::from_secs(30));
    assert!(
        d.code == Some(1) && d.stderr.contains("rank 1 on") && d.stderr.contains("TP 1 x PP 1 = 1 ranks"),
        "{}",
        d.stderr
    );
}

fn bench_2x2(extra: &[&str]) -> Command {
    let mut c = yalis();
    c.args(["--tp", "2", "--pp", "2", "--batch-size", "1", "--input-len", "4"])
        .args(["--output-len", "64", "--num-iters-warmup", "0", "--num-iters", "100000"])
        .args(extra);
    c
}

#[test]
fn a_rank_that_dies_ends_the_job() {
    let d = run(
        bench_2x2(&[]).env("YALIS_TEST_DIE_AT_STEP", "2:200"),
        Duration::from_secs(60),
    );
    assert!(d.code.is_some_and(|c| c != 0), "{:?}\n{}", d.code, d.stderr);
    assert!(d.took < Duration::from_secs(15), "took {:?}", d.took);
    let last = d.stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("yalis: error: rank 2 of 4 (pid ") && last.contains("killed by signal 6 (SIGABRT)"),
        "{}",
        d.stderr
    );
    assert!(d.stderr.contains("lost rank 2 on"), "{}", d.stderr);
}

/// A rank killed from outside (SIGKILL), found through the banner's pids.
#[test]
fn a_killed_rank_ends_the_job() {
    let t0 = Instant::now();
    let mut child = bench_2x2(&[])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut victim = None;
    let mut line = String::new();
    while victim.is_none() && out.read_line(&mut line).unwrap() > 0 {
        // "  rank   1 -> cpu (pid 1234) on host: ..."
        if let Some(rest) = line.trim_start().strip_prefix("rank   1 -> cpu (pid ") {
            victim = rest.split(')').next().map(str::to_string);
        }
        line.clear();
    }
    let pid = victim.expect("the banner names rank 1's pid");
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(killed.success());
    let t_kill = Instant::now();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(
        t_kill.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t_kill.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert!(
        err.contains(&format!("rank 1 of 4 (pid {pid}, on ")) && err.contains("killed by signal 9 (SIGKILL)"),
        "{err}"
    );
    assert!(err.contains("lost rank 1 on "), "{err}");
}

#[test]
fn a_hung_rank_ends_the_job_after_the_timeout() {
    let d = run(
        bench_2x2(&["--comm-timeout", "2"]).env("YALIS_TEST_HANG_AT_STEP", "1:100"),
        Duration::from_secs(60),
    );
    assert_eq!(d.code, Some(1), "{}", d.stderr);
    assert!(d.took < Duration::from_secs(20), "took {:?}", d.took);
    assert!(
        d.stderr.contains("timed out after 2 s") && d.stderr.contains("waiting for rank 1 on"),
        "{}",
        d.stderr
    );
    assert!(d.stderr.contains("--comm-timeout"), "{}", d.stderr);
}

/// Ranks started by hand have no supervisor: the hung rank itself must go once the others have
/// given up on it.
#[test]
fn a_hung_rank_started_by_hand_exits_too() {
    let port = free_port().to_string();
    let t0 = Instant::now();
    let children: Vec<Child> = (0..2)
        .map(|r| {
            let mut c = yalis();
            c.args([
                "--tp",
                "2",
                "--batch-size",
                "1",
                "--input-len",
                "4",
                "--output-len",
                "64",
            ])
            .args(["--num-iters", "100000", "--comm-timeout", "2"])
            .env("YALIS_TEST_HANG_AT_STEP", "1:50")
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let done: Vec<Done> = children
        .into_iter()
        .map(|c| finish(c, Duration::from_secs(60), t0))
        .collect();
    assert_eq!(done[0].code, Some(1), "{}", done[0].stderr);
    assert!(done[0].stderr.contains("timed out after 2 s"), "{}", done[0].stderr);
    assert_eq!(done[1].code, Some(3), "{}", done[1].stderr);
    assert!(
        done[1].stderr.contains("still busy") && done[1].stderr.contains("timed out"),
        "{}",
        done[1].stderr
    );
    assert!(done[1].took < Duration::from_secs(20), "{:?}", done[1].took);
}
