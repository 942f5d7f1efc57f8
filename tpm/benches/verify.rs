//! Quote and certify verification rate against raw signature verification with the same keys,
//! in one run: `cargo bench -p kame-tpm --bench verify` (needs swtpm and tpm2-tools). Evidence is
//! made on a fresh swtpm by tpm2-tools, then verified in a loop.

use criterion::{Criterion, criterion_group};
use kame_tpm::testing::SwTpm;
use kame_tpm::wire::attest::{PcrValues, verify_certify, verify_quote};
use kame_tpm::wire::{Public, Signature, alg};
use std::time::{Duration, Instant};

struct Evidence {
    ak: Public,
    quote: Vec<u8>,
    quote_sig: Vec<u8>,
    pcrs: PcrValues,
    nonce: Vec<u8>,
    key: Public,
    certify: Vec<u8>,
    certify_sig: Vec<u8>,
}

fn evidence(ak_alg: &str, scheme: &str) -> Evidence {
    let tpm = SwTpm::start().expect("swtpm");
    let t = |tool: &str, args: &[&str]| {
        tpm.tpm2(tool, args).expect(tool);
    };
    t(
        "tpm2_createek",
        &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    );
    t(
        "tpm2_createak",
        &[
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", ak_alg, "-g", "sha256", "-s", scheme, "-u",
            "ak.pub", "-n", "ak.name",
        ],
    );
    t(
        "tpm2_quote",
        &[
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,1,2,3,4,5,6,7",
            "-q",
            "0011223344556677",
            "-m",
            "q.msg",
            "-s",
            "q.sig",
            "-g",
            "sha256",
        ],
    );
    t(
        "tpm2_pcrread",
        &["sha256:0,1,2,3,4,5,6,7", "-o", "pcrs.bin"],
    );
    t(
        "tpm2_createprimary",
        &["-C", "o", "-g", "sha256", "-G", "ecc", "-c", "primary.ctx"],
    );
    t(
        "tpm2_create",
        &[
            "-C",
            "primary.ctx",
            "-G",
            "ecc256:ecdsa-sha256:null",
            "-u",
            "key.pub",
            "-r",
            "key.priv",
        ],
    );
    t(
        "tpm2_load",
        &[
            "-C",
            "primary.ctx",
            "-u",
            "key.pub",
            "-r",
            "key.priv",
            "-c",
            "key.ctx",
        ],
    );
    t(
        "tpm2_certify",
        &[
            "-c", "key.ctx", "-C", "ak.ctx", "-g", "sha256", "-o", "c.msg", "-s", "c.sig",
        ],
    );
    let values = tpm.read("pcrs.bin").unwrap();
    let mut pcrs = PcrValues::new();
    for i in 0..8u32 {
        pcrs.insert(
            (alg::SHA256, i),
            values[i as usize * 32..(i as usize + 1) * 32].to_vec(),
        );
    }
    Evidence {
        ak: Public::parse_tpm2b(&tpm.read("ak.pub").unwrap()).unwrap(),
        quote: tpm.read("q.msg").unwrap(),
        quote_sig: tpm.read("q.sig").unwrap(),
        pcrs,
        nonce: vec![0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77],
        key: Public::parse_tpm2b(&tpm.read("key.pub").unwrap()).unwrap(),
        certify: tpm.read("c.msg").unwrap(),
        certify_sig: tpm.read("c.sig").unwrap(),
    }
}

fn bench(c: &mut Criterion) {
    for (label, ak_alg, scheme) in [("rsa2048", "rsa", "rsassa"), ("p256", "ecc", "ecdsa")] {
        let e = evidence(ak_alg, scheme);
        let certify_nonce = [0x00u8, 0xff, 0x55, 0xaa];
        let sig = Signature::parse(&e.quote_sig).unwrap();
        let mut g = c.benchmark_group(label);
        g.bench_function("raw_signature_verify", |b| {
            b.iter(|| sig.verify(&e.ak, &e.quote).unwrap())
        });
        g.bench_function("verify_quote", |b| {
            b.iter(|| verify_quote(&e.ak, &e.quote, &e.quote_sig, &e.nonce, &e.pcrs).unwrap())
        });
        g.bench_function("verify_certify", |b| {
            b.iter(|| {
                verify_certify(&e.ak, &e.certify, &e.certify_sig, &e.key, &certify_nonce).unwrap()
            })
        });
        g.finish();
        // Interleaved loop for a direct ratio.
        let n = 2000;
        let (mut raw, mut q, mut cf) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..n {
            let t = Instant::now();
            sig.verify(&e.ak, &e.quote).unwrap();
            raw += t.elapsed();
            let t = Instant::now();
            verify_quote(&e.ak, &e.quote, &e.quote_sig, &e.nonce, &e.pcrs).unwrap();
            q += t.elapsed();
            let t = Instant::now();
            verify_certify(&e.ak, &e.certify, &e.certify_sig, &e.key, &certify_nonce).unwrap();
            cf += t.elapsed();
        }
        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!(
            "{label} interleaved x{n}: raw verify {:.0}/s, quote {:.0}/s ({:.3}), certify {:.0}/s ({:.3})",
            rate(raw),
            rate(q),
            rate(q) / rate(raw),
            rate(cf),
            rate(cf) / rate(raw)
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
