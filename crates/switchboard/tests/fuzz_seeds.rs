//! The fuzz targets of `fuzz/` on stable Rust: every seed input, then a few
//! thousand deterministic mutations of them, through the same harness
//! (`fuzz/src/harness.rs`) that `cargo +nightly fuzz run` drives. The
//! `frames` target reads through the session's own reader, fed from memory by
//! `session::reader::scripted` (the `fuzzing` feature, which this crate's
//! dev-dependency on itself turns on for its tests).

#[path = "../fuzz/src/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::PathBuf;

/// The seed inputs of one target, sorted by file name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "{target}: too few seeds");
    seeds
}

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One small random edit of `input`, in the style of libFuzzer's mutators.
fn mutate(rng: &mut Rng, input: &[u8], dictionary: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(out.len() + 1);
        let last = out.len().saturating_sub(1);
        match rng.below(6) {
            0 if !out.is_empty() => out[at.min(last)] ^= 1 << rng.below(8),
            1 if !out.is_empty() => out[at.min(last)] = rng.next() as u8,
            2 => out.insert(at, rng.next() as u8),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => out.truncate(at),
            _ => {
                let word = dictionary[rng.below(dictionary.len())];
                out.splice(at..at, word.iter().copied());
            }
        }
    }
    out
}

/// Runs `harness` on every seed and on `rounds` mutations of each.
fn run(target: &str, harness: fn(&[u8]), dictionary: &[&[u8]], rounds: usize) {
    let seeds = seeds(target);
    let mut rng = Rng(0x5EED_0000_0000_0001 ^ target.len() as u64);
    for (name, seed) in &seeds {
        harness(seed);
        for round in 0..rounds {
            let input = mutate(&mut rng, seed, dictionary);
            let result = std::panic::catch_unwind(|| harness(&input));
            assert!(result.is_ok(), "{target}: seed {name}, mutation {round} failed on {input:?}");
        }
    }
}

#[test]
fn frames_seeds_and_mutations() {
    run("frames", harness::frames, &[b"\x81", b"\x01", b"\x80", b"\x88\x02\x03\xe8", b"\x7f", b"\xff\xff"], 300);
}

#[test]
fn client_frame_seeds_and_mutations() {
    let dictionary: &[&[u8]] =
        &[b"\"type\"", b"\"welcome\"", b"\\u0065", b"{", b"}", b"[", b"]", b",", b":", b"\"", b"1e999", b"\\ud800"];
    run("client_frame", harness::client_frame, dictionary, 500);
}

#[test]
fn query_seeds_and_mutations() {
    let dictionary: &[&[u8]] =
        &[b"&", b"=", b"userID=", b"peerID=", b"token=", b"%3A", b"%00", b"+", b":pair:", b"switchboard", b"%"];
    run("query", harness::query, dictionary, 300);
}
