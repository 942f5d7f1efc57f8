//! The KeyManager conformance suite: every backend runs [`run_all`] in its tests (the remote
//! backends against their real services). It checks the contract of the trait, not a backend's
//! internals: generation per key type, lookup, NotFound, replacement with a new fingerprint,
//! signatures that verify against the reported SPKI, fingerprint on every signature, and refusal
//! of unsupported signing options. It panics on the first violation (it is test code).

use crate::{Error, HashAlgorithm, KeyManager, KeyType, SignOpts, fingerprint};
use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};

fn verify_alg(kt: KeyType, opts: SignOpts) -> &'static dyn VerificationAlgorithm {
    match (kt, opts.hash, opts.pss) {
        (KeyType::EcP256, _, _) => &signature::ECDSA_P256_SHA256_ASN1,
        (KeyType::EcP384, _, _) => &signature::ECDSA_P384_SHA384_ASN1,
        (_, HashAlgorithm::Sha256, false) => &signature::RSA_PKCS1_2048_8192_SHA256,
        (_, HashAlgorithm::Sha384, false) => &signature::RSA_PKCS1_2048_8192_SHA384,
        (_, HashAlgorithm::Sha512, false) => &signature::RSA_PKCS1_2048_8192_SHA512,
        (_, HashAlgorithm::Sha256, true) => &signature::RSA_PSS_2048_8192_SHA256,
        (_, HashAlgorithm::Sha384, true) => &signature::RSA_PSS_2048_8192_SHA384,
        (_, HashAlgorithm::Sha512, true) => &signature::RSA_PSS_2048_8192_SHA512,
    }
}

/// Runs every conformance check against `km`. Key ids used start with `conformance-`.
pub async fn run_all(km: &dyn KeyManager) {
    run(km, Skip::default()).await;
}

/// Checks a service emulator cannot pass although the backend is right, each replaced by a
/// test of the request the backend builds. moto_server 5.2.5: it hashes a KMS DIGEST message
/// again (large messages), and signs RSASSA-PSS with the maximum salt length where KMS uses
/// the digest length.
#[derive(Debug, Clone, Copy, Default)]
pub struct Skip {
    pub large_messages: bool,
    pub rsa_pss: bool,
}

/// The conformance checks, less those `skip` names.
pub async fn run(km: &dyn KeyManager, skip: Skip) {
    generate_sign_verify(km, !skip.rsa_pss).await;
    unknown_key_is_not_found(km).await;
    regenerate_replaces_key(km).await;
    delete_key_disposes_only_the_named_instance(km).await;
    rejects_unsupported_sign_opts(km).await;
    rejects_invalid_key_ids(km).await;
    if !skip.large_messages {
        large_message_signs(km).await;
    }
}

pub async fn generate_sign_verify_every_key_type(km: &dyn KeyManager) {
    generate_sign_verify(km, true).await;
}

async fn generate_sign_verify(km: &dyn KeyManager, rsa_pss: bool) {
    for kt in KeyType::ALL {
        let id = format!("conformance-{kt}");
        let pk = km.generate_key(&id, kt).await.expect("generate_key");
        assert_eq!(pk.id, id);
        assert_eq!(pk.key_type, kt);
        assert_eq!(
            pk.fingerprint,
            fingerprint(&pk.spki_der),
            "fingerprint is SHA-256 of SPKI"
        );
        assert_eq!(km.public_key(&id).await.expect("public_key"), pk);
        let all = km.public_keys().await.expect("public_keys");
        assert!(all.contains(&pk), "public_keys lists {id}");
        let mut variants = vec![SignOpts::for_key(kt)];
        if kt.is_rsa() {
            variants.push(SignOpts {
                hash: HashAlgorithm::Sha384,
                pss: false,
            });
            if rsa_pss {
                variants.push(SignOpts {
                    hash: HashAlgorithm::Sha256,
                    pss: true,
                });
            }
        }
        for opts in variants {
            let msg = format!("message for {id} {opts:?}");
            let sig = km.sign(&id, msg.as_bytes(), opts).await.expect("sign");
            assert_eq!(sig.fingerprint, pk.fingerprint);
            UnparsedPublicKey::new(verify_alg(kt, opts), &pk.spki_der)
                .verify(msg.as_bytes(), &sig.bytes)
                .unwrap_or_else(|_| panic!("signature by {id} with {opts:?} verifies"));
            assert!(
                UnparsedPublicKey::new(verify_alg(kt, opts), &pk.spki_der)
                    .verify(b"another message", &sig.bytes)
                    .is_err(),
                "signature must not verify for another message"
            );
        }
    }
}

pub async fn unknown_key_is_not_found(km: &dyn KeyManager) {
    let id = "conformance-absent";
    assert!(matches!(km.public_key(id).await, Err(Error::NotFound(_))));
    assert!(matches!(
        km.sign(id, b"m", SignOpts::for_key(KeyType::EcP256)).await,
        Err(Error::NotFound(_))
    ));
}

/// A revoked authority's key: `delete_key` with a stale fingerprint touches nothing; with the
/// current one the key is gone (no signing, not listed), and a new key can take the id again.
pub async fn delete_key_disposes_only_the_named_instance(km: &dyn KeyManager) {
    let id = "conformance-delete";
    let first = km.generate_key(id, KeyType::EcP256).await.expect("first");
    let second = km.generate_key(id, KeyType::EcP256).await.expect("second");
    assert!(
        !km.delete_key(id, &first.fingerprint).await.expect("stale"),
        "a replaced instance is not the key under the id"
    );
    assert_eq!(
        km.public_key(id).await.expect("still there").fingerprint,
        second.fingerprint
    );
    assert!(
        km.delete_key(id, &second.fingerprint)
            .await
            .expect("delete")
    );
    assert!(matches!(km.public_key(id).await, Err(Error::NotFound(_))));
    assert!(
        km.sign(id, b"m", SignOpts::for_key(KeyType::EcP256))
            .await
            .is_err(),
        "a deleted key must not sign"
    );
    assert!(
        !km.public_keys()
            .await
            .expect("list")
            .iter()
            .any(|k| k.id == id)
    );
    assert!(!km.delete_key(id, &second.fingerprint).await.expect("again"));
    assert!(
        !km.delete_key("conformance-never", "00")
            .await
            .expect("none"),
        "no key under the id: nothing to do"
    );
    let third = km.generate_key(id, KeyType::EcP256).await.expect("again");
    assert_ne!(third.fingerprint, second.fingerprint);
}

pub async fn regenerate_replaces_key(km: &dyn KeyManager) {
    let id = "conformance-rotate";
    let first = km.generate_key(id, KeyType::EcP256).await.expect("first");
    let second = km.generate_key(id, KeyType::EcP384).await.expect("second");
    assert_ne!(first.fingerprint, second.fingerprint);
    assert_eq!(
        km.public_key(id).await.expect("get").fingerprint,
        second.fingerprint
    );
    let sig = km
        .sign(id, b"m", SignOpts::for_key(KeyType::EcP384))
        .await
        .expect("sign after replace");
    assert_eq!(sig.fingerprint, second.fingerprint);
    let same_id: Vec<_> = km
        .public_keys()
        .await
        .expect("list")
        .into_iter()
        .filter(|k| k.id == id)
        .collect();
    assert_eq!(same_id.len(), 1, "one key per id after replacement");
    // The checked helper refuses a signature from a key instance other than the expected one.
    let err = crate::sign_checked(km, &first, b"m", SignOpts::for_key(KeyType::EcP384))
        .await
        .expect_err("stale key instance must be refused");
    assert!(matches!(err, Error::FingerprintMismatch { .. }), "{err}");
}

pub async fn rejects_unsupported_sign_opts(km: &dyn KeyManager) {
    let id = "conformance-opts";
    km.generate_key(id, KeyType::EcP256).await.expect("gen");
    for opts in [
        SignOpts {
            hash: HashAlgorithm::Sha384,
            pss: false,
        },
        SignOpts {
            hash: HashAlgorithm::Sha256,
            pss: true,
        },
    ] {
        assert!(
            matches!(
                km.sign(id, b"m", opts).await,
                Err(Error::UnsupportedSignOpts { .. })
            ),
            "P-256 key must refuse {opts:?}"
        );
    }
}

pub async fn rejects_invalid_key_ids(km: &dyn KeyManager) {
    for id in ["", "has space", "new\nline"] {
        assert!(
            matches!(
                km.generate_key(id, KeyType::EcP256).await,
                Err(Error::InvalidKeyId(_))
            ),
            "id {id:?} must be refused"
        );
    }
}

pub async fn large_message_signs(km: &dyn KeyManager) {
    let id = "conformance-large";
    let pk = km.generate_key(id, KeyType::EcP256).await.expect("gen");
    let msg = vec![0x5au8; 64 * 1024];
    let sig = km
        .sign(id, &msg, SignOpts::for_key(KeyType::EcP256))
        .await
        .expect("sign 64 KiB");
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &pk.spki_der)
        .verify(&msg, &sig.bytes)
        .expect("large message signature verifies");
}

/// The crash-safe lifecycle of a remote backend: a key made under an intent can be adopted by
/// that intent (and no other), a replacement leaves no orphan, and adopting an intent whose key
/// is gone finds nothing.
pub async fn lifecycle(km: &dyn KeyManager) {
    let id = "conformance-lifecycle";
    let intent = "6f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f";
    let first = km
        .generate_key_with_intent(id, KeyType::EcP256, intent)
        .await
        .expect("generate with intent");
    let adopted = km
        .adopt(id, intent)
        .await
        .expect("adopt")
        .expect("found by its intent");
    assert_eq!(adopted.fingerprint, first.fingerprint);
    assert!(
        km.adopt(id, "00000000-0000-4000-8000-000000000000")
            .await
            .expect("adopt")
            .is_none(),
        "another intent finds nothing"
    );
    let second = km
        .generate_key_with_intent(id, KeyType::EcP256, "7f1c2d3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f")
        .await
        .expect("replace");
    assert_ne!(second.fingerprint, first.fingerprint);
    assert!(
        km.adopt(id, intent).await.expect("adopt").is_none(),
        "the replaced key is gone"
    );
    let orphans: Vec<_> = km
        .orphans()
        .await
        .expect("orphans")
        .into_iter()
        .filter(|o| o.key_id.as_deref() == Some(id))
        .collect();
    assert!(
        orphans.is_empty(),
        "no orphan after a replacement: {orphans:?}"
    );
    assert_eq!(
        km.public_key(id).await.expect("current").fingerprint,
        second.fingerprint
    );
    // The key a journal names is found by its fingerprint; a fingerprint nothing has is not.
    let sel = km
        .select(id, &second.fingerprint)
        .await
        .expect("select")
        .expect("the current key");
    assert_eq!(sel, second);
    assert!(
        km.select(id, &first.fingerprint)
            .await
            .expect("select")
            .is_none(),
        "the replaced key is gone"
    );
}
