//! X509-SVID mint rate against the raw cryptography of the same path, measured in one run:
//! `cargo bench -p kame-server --bench mint`. Four measurements:
//! - `raw_sign`: the KeyManager signs a certificate-sized message with the CA key;
//! - `raw_verify`: aws-lc checks the CSR's signature with the public key as sent (SPKI DER),
//!   the one check a CSR needs;
//! - `mint_x509_svid`: the CA builds a leaf TBS for a public key and has the same key sign it;
//! - `mint_x509_svid_from_csr`: as above plus parsing and verifying the CSR (what an RPC does).
//!
//! The ratios printed at the end: mint rate / raw sign rate, and mint-from-CSR rate /
//! 1/(sign + verify), the physical limit of issuing from a CSR (goal >= 0.8 for both). Then
//! issuance with the transparency log off and on (SQLite), one at a time, in batches of 50
//! and 64 at once (`-- --transparency-only` runs just that).

use criterion::{Criterion, criterion_group};
use kame_keymanager::{KeyManager, SignOpts, memory::MemoryKeyManager};
use kame_server::ca::{Ca, CaSettings};
use kame_server::datastore::sqlite::SqliteStore;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Fixture {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    ca: Arc<Ca>,
    km: Arc<MemoryKeyManager>,
    spki: Vec<u8>,
    csr: Vec<u8>,
    /// The CSR's signed part and signature, for `raw_verify`.
    info: Vec<u8>,
    sig: Vec<u8>,
    tbs_sized: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ca, km) = ca_on(&rt, dir.path(), false);
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let wk = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let spki = wk.public_key().as_der().unwrap().as_ref().to_vec();
    let info = kame_api::csr::request_info(&spki, &["spiffe://example.org/w".into()], &[]).unwrap();
    let sig = wk
        .sign(&aws_lc_rs::rand::SystemRandom::new(), &info)
        .unwrap();
    let alg = kame_api::keys::KeyInfo::from_spki_der(&spki)
        .unwrap()
        .x509_signature_algorithm();
    let csr = kame_api::x509svid::assemble(&info, &alg, sig.as_ref()).unwrap();
    // A message the size of a real leaf TBS, so hashing costs the same in both measurements.
    let id = kame_api::SpiffeId::parse("spiffe://example.org/w").unwrap();
    let chain = rt
        .block_on(ca.sign_x509_svid(&spki, &id, &[], Duration::from_secs(3600)))
        .unwrap();
    let tbs_sized = vec![0x42u8; chain[0].len() - 80];
    Fixture {
        _dir: dir,
        rt,
        ca,
        km,
        spki,
        csr,
        info,
        sig: sig.as_ref().to_vec(),
        tbs_sized,
    }
}

fn bench(c: &mut Criterion) {
    let f = fixture();
    let id = kame_api::SpiffeId::parse("spiffe://example.org/w").unwrap();
    let key_id = "x509-CA-A";
    let opts = SignOpts::for_key(kame_keymanager::KeyType::EcP256);
    let mut g = c.benchmark_group("x509_svid");
    g.bench_function("raw_sign", |b| {
        b.iter(|| {
            f.rt.block_on(f.km.sign(key_id, &f.tbs_sized, opts))
                .unwrap()
        })
    });
    let verify = || {
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
            &f.spki,
        )
        .verify(&f.info, &f.sig)
        .unwrap()
    };
    g.bench_function("raw_verify", |b| b.iter(verify));
    g.bench_function("mint_x509_svid", |b| {
        b.iter(|| {
            f.rt.block_on(f.ca.sign_x509_svid(&f.spki, &id, &[], Duration::from_secs(3600)))
                .unwrap()
        })
    });
    g.bench_function("mint_x509_svid_from_csr", |b| {
        b.iter(|| {
            let csr = kame_api::csr::parse(&f.csr).unwrap();
            f.rt.block_on(f.ca.sign_x509_svid(&csr.spki_der, &id, &[], Duration::from_secs(3600)))
                .unwrap()
        })
    });
    g.finish();

    // The same three, interleaved in one timed loop, for a direct ratio.
    let n = 3000;
    let mut raw = Duration::ZERO;
    let mut raw_verify = Duration::ZERO;
    let mut mint = Duration::ZERO;
    let mut mint_csr = Duration::ZERO;
    for _ in 0..n {
        let t = Instant::now();
        f.rt.block_on(f.km.sign(key_id, &f.tbs_sized, opts))
            .unwrap();
        raw += t.elapsed();
        let t = Instant::now();
        verify();
        raw_verify += t.elapsed();
        let t = Instant::now();
        f.rt.block_on(f.ca.sign_x509_svid(&f.spki, &id, &[], Duration::from_secs(3600)))
            .unwrap();
        mint += t.elapsed();
        let t = Instant::now();
        let csr = kame_api::csr::parse(&f.csr).unwrap();
        f.rt.block_on(f.ca.sign_x509_svid(&csr.spki_der, &id, &[], Duration::from_secs(3600)))
            .unwrap();
        mint_csr += t.elapsed();
    }
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "interleaved x{n}: raw sign {:.0}/s, raw verify {:.0}/s, sign+verify {:.0}/s, mint {:.0}/s, mint+CSR {:.0}/s; mint/raw sign = {:.3}, mint+CSR/(sign+verify) = {:.3}",
        rate(raw),
        rate(raw_verify),
        rate(raw + raw_verify),
        rate(mint),
        rate(mint_csr),
        rate(mint) / rate(raw),
        rate(mint_csr) / rate(raw + raw_verify)
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}

/// A CA on `rt` with a SQLite datastore in `dir` and, with `log`, the transparency log.
fn ca_on(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    log: bool,
) -> (Arc<Ca>, Arc<MemoryKeyManager>) {
    rt.block_on(async {
        let memory = Arc::new(MemoryKeyManager::new());
        let km = memory.clone() as Arc<dyn KeyManager>;
        let ds: Arc<dyn kame_server::datastore::DataStore> = Arc::new(
            SqliteStore::open(dir.join("ds.sqlite3").to_str().unwrap())
                .await
                .unwrap(),
        );
        let transparency = if log {
            Some(
                kame_server::transparency::TransparencyLog::open(
                    ds.clone(),
                    km.clone(),
                    kame_server::transparency::Settings::default(),
                )
                .await
                .unwrap(),
            )
        } else {
            None
        };
        Ca::start(
            CaSettings {
                trust_domain: kame_api::TrustDomain::parse("example.org").unwrap(),
                server_id: "bench".into(),
                ca_ttl: Duration::from_secs(86400),
                ca_key_type: kame_keymanager::KeyType::EcP256,
                jwt_key_type: kame_keymanager::KeyType::EcP256,
                ca_subject_dn: "C=US, O=SPIFFE".into(),
                jwt_issuer: None,
                signing_mode: kame_server::ca::SigningMode::Direct,
                upstream: None,
                transparency,
            },
            km,
            ds,
        )
        .await
        .map(|ca| (ca, memory))
        .unwrap()
    })
}

/// Issuance with the transparency log off and on, in one run: one mint at a time (each
/// waits for its own append), batches of 50 minted together (one agent's BatchNewX509SVID
/// calls), and 64 at once on two worker threads (appends share transactions), as many
/// agents' calls arrive.
fn transparency_ratio() {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let wk = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let spki = Arc::new(wk.public_key().as_der().unwrap().as_ref().to_vec());
    let id = kame_api::SpiffeId::parse("spiffe://example.org/w").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rates = vec![];
    for log in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = ca_on(&rt, dir.path(), log);
        let one = 500;
        let t = Instant::now();
        for _ in 0..one {
            rt.block_on(ca.sign_x509_svid(&spki, &id, &[], Duration::from_secs(3600)))
                .unwrap();
        }
        let seq = one as f64 / t.elapsed().as_secs_f64();
        let (tasks, each) = (64, 150);
        let t = Instant::now();
        rt.block_on(async {
            let mut js = vec![];
            for _ in 0..tasks {
                let (ca, spki, id) = (ca.clone(), spki.clone(), id.clone());
                js.push(tokio::spawn(async move {
                    for _ in 0..each {
                        ca.sign_x509_svid(&spki, &id, &[], Duration::from_secs(3600))
                            .await
                            .unwrap();
                    }
                }));
            }
            for j in js {
                j.await.unwrap();
            }
        });
        let conc = (tasks * each) as f64 / t.elapsed().as_secs_f64();
        // One agent's BatchNewX509SVID calls, one after the other: 50 SVIDs each, minted
        // together as the server mints a batch.
        let (batches, size) = (40, 50);
        let t = Instant::now();
        rt.block_on(async {
            for _ in 0..batches {
                futures::future::join_all(
                    (0..size)
                        .map(|_| ca.sign_x509_svid(&spki, &id, &[], Duration::from_secs(3600))),
                )
                .await
                .into_iter()
                .for_each(|r| {
                    r.unwrap();
                });
            }
        });
        let batch = (batches * size) as f64 / t.elapsed().as_secs_f64();
        rates.push((seq, conc, batch));
    }
    println!(
        "transparency log: one at a time {:.0}/s off, {:.0}/s on ({:.3}); batches of 50 {:.0}/s off, {:.0}/s on ({:.3}); 64 at once {:.0}/s off, {:.0}/s on ({:.3})",
        rates[0].0,
        rates[1].0,
        rates[1].0 / rates[0].0,
        rates[0].2,
        rates[1].2,
        rates[1].2 / rates[0].2,
        rates[0].1,
        rates[1].1,
        rates[1].1 / rates[0].1
    );
}

fn main() {
    if std::env::args().any(|a| a == "--transparency-only") {
        transparency_ratio();
        return;
    }
    benches();
    transparency_ratio();
    Criterion::default().configure_from_args().final_summary();
}
