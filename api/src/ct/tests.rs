//! Tests of the CT structures: the reference implementation's tree vectors, every proof of
//! every small tree (made and checked, and refused when changed), and the SCT and tree-head
//! encodings with a real signature.

use super::*;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

/// The leaves of the CT reference implementation's Merkle tree tests, and its roots.
fn vector_leaves() -> Vec<Vec<u8>> {
    vec![
        vec![],
        vec![0x00],
        vec![0x10],
        vec![0x20, 0x21],
        vec![0x30, 0x31],
        vec![0x40, 0x41, 0x42, 0x43],
        (0x50..0x58).collect(),
        (0x60..0x70).collect(),
    ]
}

const VECTOR_ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

fn hashes(n: usize) -> Vec<Hash> {
    (0..n)
        .map(|i| leaf_hash(&(i as u32).to_be_bytes()))
        .collect()
}

#[test]
fn ct_tree_roots_match_the_reference_vectors_and_the_frontier() {
    assert_eq!(
        hex::encode(empty_root()),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let leaves: Vec<Hash> = vector_leaves().iter().map(|l| leaf_hash(l)).collect();
    let mut f = Frontier::default();
    for (i, want) in VECTOR_ROOTS.iter().enumerate() {
        assert_eq!(hex::encode(root(&leaves[..=i])), *want, "size {}", i + 1);
        f.push(leaves[i]);
        assert_eq!(hex::encode(f.root()), *want, "frontier at size {}", i + 1);
        assert_eq!(f.size(), i as u64 + 1);
    }
    for n in 0..70 {
        let l = hashes(n);
        assert_eq!(Frontier::of(&l).root(), root(&l), "size {n}");
        // Kept as (size, hashes) and taken up again, it goes on to the same roots.
        let mut f = Frontier::of(&l[..n / 2]);
        f = Frontier::from_parts(f.size(), f.hashes().to_vec()).unwrap();
        for h in &l[n / 2..] {
            f.push(*h);
        }
        assert_eq!(f.root(), root(&l), "size {n}");
    }
    assert_eq!(
        Frontier::from_parts(3, vec![[0; 32]]),
        Err(CtError::Frontier { size: 3, count: 1 })
    );
}

#[test]
fn ct_inclusion_proofs_of_every_leaf_verify_and_changed_ones_do_not() {
    for n in 1..=33usize {
        let l = hashes(n);
        let r = root(&l);
        for i in 0..n as u64 {
            let p = inclusion_proof(i, &l).unwrap();
            verify_inclusion(&l[i as usize], i, n as u64, &p, &r).unwrap();
            // Another leaf, another index, a changed hash, a short or long proof: refused.
            let other = l[(i as usize + 1) % n];
            if n > 1 {
                assert!(verify_inclusion(&other, i, n as u64, &p, &r).is_err());
                assert!(
                    verify_inclusion(&l[i as usize], (i + 1) % n as u64, n as u64, &p, &r).is_err()
                );
            }
            for k in 0..p.len() {
                let mut bad = p.clone();
                bad[k][0] ^= 1;
                assert_eq!(
                    verify_inclusion(&l[i as usize], i, n as u64, &bad, &r),
                    Err(CtError::RootMismatch)
                );
            }
            if !p.is_empty() {
                assert_eq!(
                    verify_inclusion(&l[i as usize], i, n as u64, &p[1..], &r),
                    Err(CtError::ProofLength)
                );
            }
            let mut long = p.clone();
            long.push(r);
            assert_eq!(
                verify_inclusion(&l[i as usize], i, n as u64, &long, &r),
                Err(CtError::ProofLength)
            );
        }
        assert_eq!(
            inclusion_proof(n as u64, &l),
            Err(CtError::IndexOutOfRange {
                index: n as u64,
                size: n as u64
            })
        );
    }
}

#[test]
fn ct_consistency_proofs_between_every_pair_of_sizes_verify_and_changed_ones_do_not() {
    let all = hashes(33);
    for n in 1..=33usize {
        let l = &all[..n];
        let new_root = root(l);
        for m in 0..=n {
            let old_root = root(&l[..m]);
            let p = consistency_proof(m as u64, l).unwrap();
            verify_consistency(m as u64, n as u64, &old_root, &new_root, &p)
                .unwrap_or_else(|e| panic!("{m} -> {n}: {e}"));
            for k in 0..p.len() {
                let mut bad = p.clone();
                bad[k][31] ^= 0x80;
                assert!(
                    verify_consistency(m as u64, n as u64, &old_root, &new_root, &bad).is_err(),
                    "{m} -> {n}: hash {k} changed"
                );
            }
            if m > 0 && m < n {
                // A different older tree (one leaf changed) is not a prefix.
                let mut forked = l[..m].to_vec();
                forked[m - 1][0] ^= 1;
                assert!(
                    verify_consistency(m as u64, n as u64, &root(&forked), &new_root, &p).is_err()
                );
                assert_eq!(
                    verify_consistency(m as u64, n as u64, &old_root, &new_root, &[]),
                    Err(CtError::ProofLength)
                );
            }
        }
    }
    assert_eq!(
        consistency_proof(5, &all[..4]),
        Err(CtError::SizesOutOfOrder { old: 5, new: 4 })
    );
    let r = root(&all[..4]);
    assert_eq!(
        verify_consistency(4, 4, &r, &root(&all[..3]), &[]),
        Err(CtError::RootMismatch)
    );
}

fn key() -> (EcdsaKeyPair, Vec<u8>) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let k = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let spki = crate::keys::KeyInfo::EcP256(k.public_key().as_ref().to_vec())
        .to_spki_der()
        .unwrap();
    (k, spki)
}

fn sign(k: &EcdsaKeyPair, msg: &[u8]) -> DigitallySigned {
    DigitallySigned {
        hash_alg: HASH_SHA256,
        sig_alg: SIG_ECDSA,
        signature: k.sign(&SystemRandom::new(), msg).unwrap().as_ref().to_vec(),
    }
}

#[test]
fn ct_sct_signs_the_rfc6962_struct_and_round_trips_through_the_extension() {
    let (k, spki) = key();
    let entry = Entry::Precert {
        issuer_key_hash: [7u8; 32],
        tbs: vec![0x30, 0x03, 0x02, 0x01, 0x01],
    };
    let ts = 1_700_000_000_123;
    let data = sct_signed_data(ts, &entry).unwrap();
    // version, signature type, timestamp, entry type, issuer key hash, u24 TBS, no extensions.
    let mut want = vec![0u8, 0];
    want.extend_from_slice(&ts.to_be_bytes());
    want.extend_from_slice(&[0, 1]);
    want.extend_from_slice(&[7u8; 32]);
    want.extend_from_slice(&[0, 0, 5, 0x30, 0x03, 0x02, 0x01, 0x01, 0, 0]);
    assert_eq!(data, want);
    let sct = Sct {
        log_id: log_id(&spki),
        timestamp: ts,
        signature: sign(&k, &data),
    };
    sct.verify(&spki, &entry).unwrap();
    let ext = sct_list_extension_value(std::slice::from_ref(&sct)).unwrap();
    assert_eq!(ext[0], 0x04, "a DER OCTET STRING");
    let back = parse_sct_list_extension(&ext).unwrap();
    assert_eq!(back, vec![sct.clone()]);
    // Another entry, another log, a changed signature: refused.
    let other = Entry::Precert {
        issuer_key_hash: [8u8; 32],
        tbs: vec![0x30, 0x03, 0x02, 0x01, 0x01],
    };
    assert_eq!(sct.verify(&spki, &other), Err(CtError::BadSignature));
    let (_, other_spki) = key();
    assert!(matches!(
        sct.verify(&other_spki, &entry),
        Err(CtError::WrongLog { .. })
    ));
    let mut bad = sct.clone();
    bad.timestamp += 1;
    assert_eq!(bad.verify(&spki, &entry), Err(CtError::BadSignature));
    let mut sha1 = sct.clone();
    sha1.signature.hash_alg = 2;
    assert_eq!(sha1.verify(&spki, &entry), Err(CtError::SignatureAlgorithm));
    // Truncated and padded encodings are refused.
    let enc = sct.encode().unwrap();
    assert_eq!(Sct::decode(&enc).unwrap(), sct);
    assert_eq!(
        Sct::decode(&enc[..enc.len() - 1]),
        Err(CtError::Truncated("SCT"))
    );
    let mut padded = enc.clone();
    padded.push(0);
    assert_eq!(Sct::decode(&padded), Err(CtError::TrailingBytes("SCT")));
    assert_eq!(
        parse_sct_list_extension(&[0x04, 0x01, 0x00]),
        Err(CtError::Truncated("SCT list"))
    );
    assert_eq!(
        parse_sct_list_extension(&[0x30, 0x00]),
        Err(CtError::ExtensionEncoding)
    );
}

#[test]
fn ct_leaves_round_trip_and_tree_heads_sign_the_rfc6962_struct() {
    for entry in [
        Entry::X509(vec![1, 2, 3]),
        Entry::Precert {
            issuer_key_hash: [1u8; 32],
            tbs: vec![4; 300],
        },
        Entry::Kame {
            kind: EntryType::JwtSvid,
            body: b"e30.e30".to_vec(),
        },
        Entry::Kame {
            kind: EntryType::Authority,
            body: b"{}".to_vec(),
        },
        Entry::Kame {
            kind: EntryType::Attestation,
            body: b"{}".to_vec(),
        },
    ] {
        let leaf = Leaf {
            timestamp: 42,
            entry,
        };
        let enc = leaf.encode().unwrap();
        assert_eq!(&enc[..2], &[0, 0], "v1, timestamped_entry");
        assert_eq!(Leaf::decode(&enc).unwrap(), leaf);
        assert_eq!(leaf.hash().unwrap(), leaf_hash(&enc));
        for cut in 0..enc.len() {
            assert!(Leaf::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
    }
    let mut unknown = Leaf {
        timestamp: 1,
        entry: Entry::X509(vec![1]),
    }
    .encode()
    .unwrap();
    unknown[10] = 0x7f;
    assert!(matches!(
        Leaf::decode(&unknown),
        Err(CtError::Unsupported { .. })
    ));

    let (k, spki) = key();
    let head = TreeHead {
        tree_size: 8,
        timestamp: 1_700_000_000_000,
        root_hash: [9u8; 32],
    };
    let data = head.signed_data();
    assert_eq!(data.len(), 50);
    assert_eq!(&data[..2], &[0, 1], "v1, tree_hash");
    let sth = SignedTreeHead {
        signature: sign(&k, &data),
        head: head.clone(),
    };
    sth.verify(&spki).unwrap();
    let sig = sth.signature_bytes().unwrap();
    assert_eq!(
        SignedTreeHead::decode_signature(&sig).unwrap(),
        sth.signature
    );
    let mut moved = sth.clone();
    moved.head.tree_size = 9;
    assert_eq!(moved.verify(&spki), Err(CtError::BadSignature));
}

/// A JWT-SVID's SCT: logged over the signing input without the claim, carried in the
/// `kame_scts` claim, checked by taking the claim off byte for byte; anything else refused.
#[test]
fn ct_jwt_svid_sct_claim_round_trips_and_binds_the_logged_claims() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64U;
    let (k, spki) = key();
    let header = B64U.encode(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
    let claims = r#"{"aud":"db","exp":1700000600,"iat":1700000000,"sub":"spiffe://td/w"}"#;
    let input = format!("{header}.{}", B64U.encode(claims));
    let ts = 1_700_000_000_500;
    let sct = Sct {
        log_id: log_id(&spki),
        timestamp: ts,
        signature: sign(&k, &sct_signed_data(ts, &jwt_entry(&input)).unwrap()),
    };
    let with = jwt_input_with_scts(&input, std::slice::from_ref(&sct)).unwrap();
    let (h, p) = with.split_once('.').unwrap();
    assert_eq!(h, header, "the header is untouched (JWT-02)");
    let payload = String::from_utf8(B64U.decode(p).unwrap()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(v["sub"], "spiffe://td/w");
    assert!(v[JWT_SCT_CLAIM].is_string(), "{payload}");
    let token = format!("{with}.c2ln");
    let (scts, logged) = jwt_logged_input(&token).unwrap();
    assert_eq!((scts, logged.as_str()), (vec![sct.clone()], input.as_str()));
    assert_eq!(
        check_jwt_sct(&token, std::slice::from_ref(&spki)).unwrap(),
        sct
    );
    // Without the claim, from an unknown log, with a claim changed: refused.
    assert_eq!(
        check_jwt_sct(&format!("{input}.c2ln"), std::slice::from_ref(&spki)),
        Err(CtError::NoSct)
    );
    let (_, other) = key();
    assert!(matches!(
        check_jwt_sct(&token, &[other]),
        Err(CtError::UnknownLog(_))
    ));
    let forged = payload.replace("spiffe://td/w", "spiffe://td/x");
    let forged = format!("{header}.{}.c2ln", B64U.encode(forged));
    assert_eq!(
        check_jwt_sct(&forged, std::slice::from_ref(&spki)),
        Err(CtError::BadSignature)
    );
    // The claim moved away from the end is not the logged form.
    let moved = format!(
        "{{\"{JWT_SCT_CLAIM}\":{},{}",
        v[JWT_SCT_CLAIM],
        &claims[1..]
    );
    let moved = format!("{header}.{}.c2ln", B64U.encode(moved));
    assert!(matches!(
        check_jwt_sct(&moved, std::slice::from_ref(&spki)),
        Err(CtError::Jwt(_))
    ));
    // An empty claims object gets the claim as its only member, and back.
    let empty = format!("{header}.{}", B64U.encode("{}"));
    let with = jwt_input_with_scts(&empty, std::slice::from_ref(&sct)).unwrap();
    assert_eq!(jwt_logged_input(&with).unwrap().1, empty);
    assert!(matches!(
        jwt_input_with_scts(&format!("{header}.{}", B64U.encode("[1]")), &[sct]),
        Err(CtError::Jwt(_))
    ));
}
