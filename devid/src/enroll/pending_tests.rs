use super::*;
use crate::testing::{SoftCa, SoftDevice};
use std::sync::Arc;

fn now() -> u64 {
    unix_now()
}

/// Issue 19 item 8: one challenge per EK, `per_peer` per peer, and a full table makes
/// room at the expense of the peer holding the most.
#[test]
fn enroll_pending_challenges_one_per_ek_capped_per_peer_never_locked_out() {
    let ek_ca = Arc::new(SoftCa::root("O=Vendor, CN=EK CA"));
    let roots = vec![ek_ca.cert.clone()];
    let verified = |serial: &str| {
        let d = SoftDevice::under(ek_ca.clone(), serial);
        let bytes = d.sign_request(&d.idevid_request()).unwrap();
        (
            d,
            verify_idevid_request(&bytes, &roots, &[], now()).unwrap(),
        )
    };
    let limits = PendingLimits {
        total: 4,
        per_peer: 3,
    };
    let c = Challenges::with_limits(Duration::from_secs(60), limits);
    // The same EK again: the newer challenge replaces the older.
    let (d1, v) = verified("SN-1");
    let first = c.issue(v, "10.0.0.1").unwrap();
    let bytes = d1.sign_request(&d1.idevid_request()).unwrap();
    let again = verify_idevid_request(&bytes, &roots, &[], now()).unwrap();
    let second = c.issue(again, "10.0.0.1").unwrap();
    assert!(matches!(
        c.answer(&first.id, &[0; 32]),
        Err(EnrollError::UnknownChallenge)
    ));
    assert!(matches!(
        c.answer(&second.id, &[0; 32]),
        Err(EnrollError::WrongAnswer)
    ));
    // Three per peer.
    let oldest = c.issue(verified("SN-2").1, "10.0.0.1").unwrap();
    std::thread::sleep(Duration::from_millis(2));
    let younger = c.issue(verified("SN-3").1, "10.0.0.1").unwrap();
    c.issue(verified("SN-4").1, "10.0.0.1").unwrap();
    assert!(matches!(
        c.issue(verified("SN-5").1, "10.0.0.1"),
        Err(EnrollError::TooManyPending("from this address", 60))
    ));
    // Full (three of 10.0.0.1, one of 10.0.0.2): a third peer still gets in, and the
    // challenge that makes room is the oldest of the peer holding the most.
    let light = c.issue(verified("SN-6").1, "10.0.0.2").unwrap();
    let newcomer = c.issue(verified("SN-7").1, "10.0.0.3").unwrap();
    assert_eq!(c.table().entries.len(), 4);
    assert!(matches!(
        c.answer(&oldest.id, &[0; 32]),
        Err(EnrollError::UnknownChallenge)
    ));
    for live in [&younger, &light, &newcomer] {
        assert!(matches!(
            c.answer(&live.id, &[0; 32]),
            Err(EnrollError::WrongAnswer)
        ));
    }
}

#[test]
fn enroll_ldevid_nonces_are_stateless_single_use_and_expire() {
    let n = Nonces::new(Duration::from_secs(300)).unwrap();
    for _ in 0..10_000 {
        n.issue().unwrap();
    }
    assert!(n.spent_ids().is_empty(), "issuing keeps nothing");
    let (id, nonce) = n.issue().unwrap();
    assert_eq!(n.nonce(&id).unwrap(), nonce);
    n.spend(&id).unwrap();
    assert!(matches!(n.nonce(&id), Err(EnrollError::UnknownChallenge)));
    assert!(matches!(n.spend(&id), Err(EnrollError::UnknownChallenge)));
    // Another CA's id, a forged expiry, garbage: unknown.
    let other = Nonces::new(Duration::from_secs(300)).unwrap();
    let (oid, onc) = other.issue().unwrap();
    assert_ne!(
        n.nonce(&oid).unwrap(),
        onc,
        "only the issuing CA knows the nonce"
    );
    let far = format!("{}{:016x}", &oid[..32], unix_now() + 10_000);
    assert!(n.nonce(&far).is_err(), "an expiry beyond the TTL");
    let past = format!("{}{:016x}", &oid[..32], unix_now() - 1);
    assert!(n.nonce(&past).is_err(), "expired");
    for bad in [
        "",
        "zz",
        &"0".repeat(48),
        &"G".repeat(48),
        &"é".repeat(24),
        &"€".repeat(16),
    ] {
        assert!(n.nonce(bad).is_err(), "{bad:?}");
    }
}
