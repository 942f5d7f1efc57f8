use super::*;
use crate::conformance;

async fn open(hsm: &crate::testing::SoftHsm, server_id: &str) -> Pkcs11KeyManager {
    Pkcs11KeyManager::open(Pkcs11Config {
        module_path: hsm.module.clone(),
        token_label: hsm.token_label.clone(),
        user_pin: hsm.pin.as_str().into(),
        server_id: server_id.into(),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn pkcs11_passes_keymanager_conformance_on_softhsm2() {
    let Some(hsm) = crate::testing::SoftHsm::child(
        "pkcs11::tests::pkcs11_passes_keymanager_conformance_on_softhsm2",
    ) else {
        return;
    };
    let km = open(&hsm, "server-a").await;
    conformance::run_all(&km).await;
    conformance::lifecycle(&km).await;
    // Keys are non-extractable and sensitive, and another server's keys are not ours.
    let other = open(&hsm, "server-b").await;
    assert!(other.public_keys().await.unwrap().is_empty());
    // A reopened backend finds the same keys.
    let again = open(&hsm, "server-a").await;
    let mut a = km.public_keys().await.unwrap();
    let mut b = again.public_keys().await.unwrap();
    a.sort_by(|x, y| x.id.cmp(&y.id));
    b.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(a, b);
    // After replacements, exactly one instance per key id is left.
    let inst = km.instances().await.unwrap();
    let mut ids: Vec<_> = inst.iter().map(|i| i.key_id.clone()).collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "one instance per key: {inst:?}");
    assert!(inst.iter().all(|i| i.current));
}

#[tokio::test]
async fn pkcs11_keys_are_sensitive_and_not_extractable() {
    let Some(hsm) = crate::testing::SoftHsm::child(
        "pkcs11::tests::pkcs11_keys_are_sensitive_and_not_extractable",
    ) else {
        return;
    };
    let km = open(&hsm, "server-x").await;
    km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let e = km.entry("x509-CA-A").unwrap();
    let attrs = km
        .blocking(move |inner| {
            inner.with_session(|s| {
                s.get_attributes(
                    e.private,
                    &[AttributeType::Sensitive, AttributeType::Extractable],
                )
                .map_err(p11("get"))
            })
        })
        .await
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)), "{attrs:?}");
    assert!(attrs.contains(&Attribute::Extractable(false)), "{attrs:?}");
}

/// The token forgets the login (an HSM restart logs every application out): the next
/// signature logs in again and goes through, and so does one over a session that the
/// token closed.
#[tokio::test]
async fn pkcs11_logs_in_again_after_the_token_forgets_the_login() {
    let Some(hsm) = crate::testing::SoftHsm::child(
        "pkcs11::tests::pkcs11_logs_in_again_after_the_token_forgets_the_login",
    ) else {
        return;
    };
    let km = open(&hsm, "server-r").await;
    let pk = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let opts = SignOpts::for_key(KeyType::EcP256);
    km.sign("x509-CA-A", b"before", opts).await.unwrap();
    async fn logout(km: &Pkcs11KeyManager) {
        km.blocking(|inner| inner.with_session(|s| s.logout().map_err(p11("C_Logout"))))
            .await
            .unwrap();
    }
    logout(&km).await;
    // Logged out, the private key is out of reach of every session.
    let e = km
        .blocking(|inner| {
            inner.with_session(|s| {
                s.find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                    .map_err(p11("find"))
            })
        })
        .await
        .unwrap();
    assert!(e.is_empty(), "logged out: no private key is visible");
    let sig = km.sign("x509-CA-A", b"after", opts).await.unwrap();
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &pk.spki_der,
    )
    .verify(b"after", &sig.bytes)
    .unwrap();
    // Again, with the pooled sessions closed under it as well: a fresh one logs in.
    logout(&km).await;
    km.blocking(|inner| {
        if let Ok(mut pool) = inner.sessions.lock() {
            for s in pool.drain(..) {
                let _ = s.close();
            }
        }
        Ok(())
    })
    .await
    .unwrap();
    km.sign("x509-CA-A", b"again", opts).await.unwrap();

    // The PIN changed on the token (and the HSM forgot the login): the first login with
    // the old PIN fails, and no further login is tried, so the token cannot lock the PIN.
    km.blocking(|inner| {
        inner.with_session(|s| {
            let old = AuthPin::new(inner.pin.expose().into());
            let new = AuthPin::new("rotated-pin".into());
            s.set_pin(&old, &new).map_err(p11("C_SetPIN"))?;
            s.logout().map_err(p11("C_Logout"))
        })
    })
    .await
    .unwrap();
    for _ in 0..2 {
        let e = km
            .sign("x509-CA-A", b"refused", opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused the user PIN"), "{e}");
        assert!(!e.contains(&hsm.pin), "{e}");
    }
    assert!(
        km.inner
            .pin_refused
            .load(std::sync::atomic::Ordering::SeqCst)
    );
}

#[tokio::test]
async fn pkcs11_wrong_pin_and_unknown_token_are_config_errors() {
    let Some(hsm) = crate::testing::SoftHsm::child(
        "pkcs11::tests::pkcs11_wrong_pin_and_unknown_token_are_config_errors",
    ) else {
        return;
    };
    let cfg = |label: &str, pin: &str| Pkcs11Config {
        module_path: hsm.module.clone(),
        token_label: label.into(),
        user_pin: pin.into(),
        server_id: "s".into(),
    };
    let e = Pkcs11KeyManager::open(cfg("no-such-token", &hsm.pin))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no token labelled"), "{e}");
    let e = Pkcs11KeyManager::open(cfg(&hsm.token_label, "0000"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("login") && !e.contains("0000"), "{e}");
    let mut c = cfg(&hsm.token_label, &hsm.pin);
    c.module_path = "/nonexistent/libpkcs11.so".into();
    let e = Pkcs11KeyManager::open(c).await.unwrap_err().to_string();
    assert!(e.contains("module_path"), "{e}");
}
