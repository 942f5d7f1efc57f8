//! tpm_devid interoperability with Go (`tpm_devid.md` §3.3 #13): every message passes through
//! a Go program (`tests/go/spire_devid_json`, standard library only) that decodes it into
//! SPIRE's struct shapes with `encoding/json` and encodes it again — what a Go agent or server
//! reads from Kame and writes back. The Go output must equal Kame's bytes, and the Go-written
//! messages must carry a real swtpm attestation through a Kame server.

mod common;

use common::devid::provision;
use common::driver::{begin, finish, server, tpm_answer};
use kame_tpm::device::Device;
use kame_tpm::testing::SwTpm;
use std::path::PathBuf;

fn go_tool() -> PathBuf {
    common::go::program("spire_devid_json")
}

/// The message as Go decodes and re-encodes it.
fn through_go(kind: &str, json: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new(go_tool())
        .arg(kind)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(json).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "Go refused the {kind}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_devid_spire_gap_13_go_encoding_json_interop_both_ways() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "go-interop");
    // Message 1 as SPIRE's agent builds it: Go writes exactly Kame's bytes.
    let (spire_req, spire_session) = tokio::task::block_in_place(|| {
        let mut d = Device::open(&tpm.tcti).unwrap();
        kame_agent::tpm_devid::evidence_spire(
            &mut d,
            vec![devid.leaf_der.clone()],
            devid.key.clone(),
        )
        .unwrap()
    });
    let ours = spire_req.encode();
    let go_msg1 = through_go("AttestationRequest", &ours);
    assert_eq!(
        String::from_utf8_lossy(&go_msg1),
        String::from_utf8_lossy(&ours),
        "message 1 is encoded as Go encodes it"
    );
    // Kame's v2 message 1: a Go server ignores the extension fields and sees SPIRE's message.
    let (v2_req, _) = tokio::task::block_in_place(|| {
        let mut d = Device::open(&tpm.tcti).unwrap();
        kame_agent::tpm_devid::evidence(&mut d, vec![devid.leaf_der.clone()], devid.key.clone())
            .unwrap()
    });
    assert_eq!(v2_req.version, Some(2));
    let mut as_go_sees_it = v2_req.clone();
    as_go_sees_it.version = None;
    as_go_sees_it.ek_cert_chain.clear();
    assert_eq!(
        through_go("AttestationRequest", &v2_req.encode()),
        as_go_sees_it.encode()
    );
    // A whole attestation with every message written by Go, on a default and a compat_mode
    // server: message 1 from Go, the server's challenge read by Go (and equal to what Go
    // writes), the answer from Go.
    for compat in [false, true] {
        let env = server(&tpm, &devid, compat).await;
        let (tx, rx, challenge) = begin(&env, go_msg1.clone()).await.unwrap();
        let go_challenge = through_go("ChallengeRequest", &challenge);
        assert_eq!(
            String::from_utf8_lossy(&go_challenge),
            String::from_utf8_lossy(&challenge),
            "the v1 challenge is encoded as Go encodes it"
        );
        let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &spire_session, &go_challenge));
        let go_resp = through_go("ChallengeResponse", &resp.encode());
        assert_eq!(
            go_resp,
            resp.encode(),
            "message 3 is encoded as Go encodes it"
        );
        let id = finish(tx, rx, go_resp).await.unwrap();
        assert!(id.contains("/spire/agent/tpm_devid/"), "{id}");
        env.stop().await;
    }
}

/// Go's decoder rules that Kame follows on input (`tpm_devid.md` §1.1): field names match
/// case-insensitively, unknown fields are ignored, `null` is an absent value. The same inputs
/// go through Go and through Kame, and both read the same message.
#[test]
fn tpm_devid_spire_gap_12_field_case_and_extra_fields_read_as_go_reads_them() {
    use kame_api::tpm_devid::{AttestationRequest, ChallengeResponse};
    let inputs: [&[u8]; 3] = [
        br#"{"devidcert":["AAE="],"DEVIDPUB":"AAI=","ekCert":null,"Unknown":{"x":[1,2]},"AKPub":"AAM="}"#,
        br#"{"DevIDCert":["AAE=","AAI="],"CertifiedDevID":"/1RDRw==","certificationsignature":"ABQ="}"#,
        br#"{}"#,
    ];
    for input in inputs {
        let go = through_go("AttestationRequest", input);
        let ours = AttestationRequest::decode(input).unwrap();
        assert_eq!(
            AttestationRequest::decode(&go).unwrap(),
            ours,
            "{}",
            String::from_utf8_lossy(input)
        );
        // And Kame writes what Go wrote.
        assert_eq!(
            String::from_utf8_lossy(&ours.encode()),
            String::from_utf8_lossy(&go)
        );
    }
    let resp: &[u8] = br#"{"devid":"AQID","credactivation":"BAUG","extra":true}"#;
    let go = through_go("ChallengeResponse", resp);
    assert_eq!(
        ChallengeResponse::decode(&go).unwrap(),
        ChallengeResponse::decode(resp).unwrap()
    );
    assert_eq!(ChallengeResponse::decode(resp).unwrap().encode(), go);
}
