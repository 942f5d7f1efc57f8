//! tpm_devid refusals about PCRs and quotes (Kame's v2): a PCR policy that passes, then
//! refuses after an extend and reports a reboot; PCR values of the wrong length; a v1
//! downgrade that would skip the policy.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn tpm_devid_v2_pcr_policy_passes_refuses_after_extend_and_reports_reboot() {
    let mut tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let ek_ca = ek_cas(&tpm, devid.dir.path());
    // Policy: PCR 7 as it is now (a fresh TPM: zero); v1 agents refused.
    let mut o = opts(&tpm, &devid, &devid.ca, &ek_ca);
    o.agent_attestor = None;
    o.server_plugins = o.server_plugins.replace(
        "endorsement_ca_path",
        &format!(
            "require_quote = true\n            pcr_policy {{\n                sha256 = {{\n                    \"7\" = \"{}\"\n                }}\n            }}\n            endorsement_ca_path",
            "00".repeat(32)
        ),
    );
    let env = Env::start(o).await;
    let attempt = |tcti: String| {
        let devid_key = devid.key.clone();
        let leaf = devid.leaf_der.clone();
        move || {
            let mut d = Device::open(&tcti).unwrap();
            evidence(&mut d, vec![leaf], devid_key).unwrap()
        }
    };
    // 1. Matching PCRs: attested, with the PCR selector.
    let (req, s) = tokio::task::block_in_place(attempt(tpm.tcti.clone()));
    assert_eq!(req.version, Some(2));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let ch = kame_api::tpm_devid::ChallengeRequest::decode(&c).unwrap();
    assert_eq!((ch.version, ch.pcrs.clone()), (Some(2), vec![7]));
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    let id = finish(tx, rx, resp.encode()).await.unwrap();
    let node = env
        .server
        .as_ref()
        .unwrap()
        .ctx
        .ds
        .fetch_node(&id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        node.selectors
            .iter()
            .any(|s| s.value == format!("pcr:sha256:7:{}", "00".repeat(32))),
        "{:?}",
        node.selectors
    );
    assert_eq!(node.tpm_reboots, 0);
    let boot = node.tpm_boot.expect("clockInfo recorded");
    // 2. A v1 message (no Version) is refused: require_quote.
    let mut v1 = req.clone();
    v1.version = None;
    refused(
        begin(&env, v1.encode()).await.map(|_| ()),
        Code::PermissionDenied,
        "requires a PCR quote",
    );
    // 3. PCR 7 extended (e.g. Secure Boot state changed): refused, naming the PCR.
    tpm.tpm2(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "ab".repeat(32))],
    )
    .unwrap();
    let (req, s) = tokio::task::block_in_place(attempt(tpm.tcti.clone()));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::PermissionDenied,
        "PCR sha256:7 is",
    );
    // 4. Reboot (swtpm power cycle): PCRs are back to the policy, the reset is counted.
    tpm.restart().unwrap();
    let (req, s) = tokio::task::block_in_place(attempt(tpm.tcti.clone()));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
    let id2 = finish(tx, rx, resp.encode()).await.unwrap();
    assert_eq!(id2, id);
    let node = env
        .server
        .as_ref()
        .unwrap()
        .ctx
        .ds
        .fetch_node(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.tpm_reboots, 1, "reboot reported");
    assert!(node.tpm_boot.unwrap().0 > boot.0);
    env.stop().await;
}

/// A server with a `pcr_policy` of PCR 7 = zero (a fresh swtpm's value), no `require_quote`.
pub(super) async fn pcr7_policy_server(tpm: &SwTpm, devid: &common::devid::DevId) -> Env {
    let ek_ca = ek_cas(tpm, devid.dir.path());
    let mut o = opts(tpm, devid, &devid.ca, &ek_ca);
    o.agent_attestor = None;
    o.server_plugins = o.server_plugins.replace(
        "endorsement_ca_path",
        &format!(
            "pcr_policy {{\n                sha256 = {{\n                    \"7\" = \"{}\"\n                }}\n            }}\n            endorsement_ca_path",
            "00".repeat(32)
        ),
    );
    Env::start(o).await
}

/// Issue 19 item 2, on a real TPM: the node's PCR 7 is not the golden value, but PCR 23 is
/// (here both are zero at power-on; on a real machine PCR 23 is loaded by replaying a good
/// boot's event log). The agent quotes PCRs 1, 7 and 23 and claims PCR1 = R1‖R7, PCR7 = the
/// golden value and PCR23 = empty: the same bytes in the same order, so the same digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn tpm_devid_pcr_values_of_wrong_length_are_refused() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = pcr7_policy_server(&tpm, &devid).await;
    tpm.tpm2(
        "tpm2_pcrextend",
        &[&format!("7:sha256={}", "ab".repeat(32))],
    )
    .unwrap();
    let (req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    assert_eq!(req.version, Some(2));
    let (tx, rx, c) = begin(&env, req.encode()).await.unwrap();
    let mut ch = kame_api::tpm_devid::ChallengeRequest::decode(&c).unwrap();
    assert_eq!(ch.pcrs, vec![7]);
    ch.pcrs = vec![1, 7, 23];
    let mut resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &ch.encode()));
    let real: std::collections::BTreeMap<u32, Vec<u8>> = resp.pcr_values.iter().cloned().collect();
    assert_eq!(real[&23], vec![0; 32], "PCR 23 holds the golden value");
    assert_ne!(real[&7], vec![0; 32], "PCR 7 does not");
    resp.pcr_values = vec![
        (1, [real[&1].clone(), real[&7].clone()].concat()),
        (7, real[&23].clone()),
        (23, vec![]),
    ];
    refused(
        finish(tx, rx, resp.encode()).await,
        Code::PermissionDenied,
        "PCR sha256:1",
    );
    no_agents(&env).await;
    env.stop().await;
}

/// Issue 19 item 6: with a `pcr_policy` (and no `require_quote`), an agent that leaves out
/// `"Version": 2` is refused instead of attested without a quote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
pub(super) async fn tpm_devid_pcr_policy_is_not_skipped_by_a_v1_downgrade() {
    let tpm = SwTpm::start().unwrap();
    let devid = provision(&tpm, "node");
    let env = pcr7_policy_server(&tpm, &devid).await;
    let (mut req, s) = tokio::task::block_in_place(|| tpm_evidence(&tpm, &devid));
    req.version = None;
    let r = match begin(&env, req.encode()).await {
        Err(e) => Err(e),
        Ok((tx, rx, c)) => {
            let resp = tokio::task::block_in_place(|| tpm_answer(&tpm, &s, &c));
            finish(tx, rx, resp.encode()).await
        }
    };
    refused(r, Code::PermissionDenied, "requires a PCR quote");
    no_agents(&env).await;
    env.stop().await;
}
