//! TPM 2.0 policy digests (TPM 2.0 Library Part 3, §23) needed to use endorsement keys: the
//! PolicySecret(TPM_RH_ENDORSEMENT) digest (EK "policy A") computed for any hash, and the
//! PolicyOR branch list that satisfies the high-range EK templates' "policy B". Pure
//! computation over bytes; it runs no policy session and holds no secret.

use super::{Error, Result, alg, hash};

/// TPM_CC_PolicySecret.
const CC_POLICY_SECRET: u32 = 0x0000_0151;
/// TPM_CC_PolicyOR.
const CC_POLICY_OR: u32 = 0x0000_0171;
/// TPM_RH_ENDORSEMENT: a permanent handle's name is the handle itself.
const RH_ENDORSEMENT: u32 = 0x4000_000B;

/// Policy C of the high-range EK templates, SHA-384: PolicyAuthorizeNV over the TCG's EK
/// policy NV index. Source: TCG EK Credential Profile for TPM Family 2.0, Level 0, Version 2.5
/// Revision 2, §B.6 (it cannot be computed without that NV index's public area).
pub const EK_POLICY_C_SHA384: [u8; 48] = [
    0xd6, 0x03, 0x2c, 0xe6, 0x1f, 0x2f, 0xb3, 0xc2, 0x40, 0xeb, 0x3c, 0xf6, 0xa3, 0x32, 0x37, 0xef,
    0x2b, 0x6a, 0x16, 0xf4, 0x29, 0x3c, 0x22, 0xb4, 0x55, 0xe2, 0x61, 0xcf, 0xfd, 0x21, 0x7a, 0xd5,
    0xb4, 0x94, 0x7c, 0x2d, 0x73, 0xe6, 0x30, 0x05, 0xee, 0xd2, 0xdc, 0x2b, 0x35, 0x93, 0xd1, 0x65,
];

/// Policy B of the high-range EK templates (H-3 ECC P-384, H-4 RSA-3072), SHA-384: the
/// authPolicy of those EKs. Source: TCG EK Credential Profile 2.5 r2, §B.4.
pub const EK_POLICY_B_SHA384: [u8; 48] = [
    0xb2, 0x6e, 0x7d, 0x28, 0xd1, 0x1a, 0x50, 0xbc, 0x53, 0xd8, 0x82, 0xbc, 0xf5, 0xfd, 0x3a, 0x1a,
    0x07, 0x41, 0x48, 0xbb, 0x35, 0xd3, 0xb4, 0xe4, 0xcb, 0x1c, 0x0a, 0xd9, 0xbd, 0xe4, 0x19, 0xca,
    0xcb, 0x47, 0xba, 0x09, 0x69, 0x96, 0x46, 0x15, 0x0f, 0x9f, 0xc0, 0x00, 0xf3, 0xf8, 0x0e, 0x12,
];

/// The policy digest after TPM2_PolicySecret(TPM_RH_ENDORSEMENT) with an empty policyRef from
/// a fresh session: the EK template's "policy A" for `hash_alg`.
pub fn policy_secret_endorsement(hash_alg: u16) -> Result<Vec<u8>> {
    let zero = vec![0u8; super::digest_len(hash_alg)?];
    let mut m = zero;
    m.extend_from_slice(&CC_POLICY_SECRET.to_be_bytes());
    m.extend_from_slice(&RH_ENDORSEMENT.to_be_bytes());
    let d = hash(hash_alg, &m)?;
    // PolicyUpdate hashes the policyRef (empty) in a second step.
    hash(hash_alg, &d)
}

/// The digest TPM2_PolicyOR sets: H(0…0 ‖ TPM_CC_PolicyOR ‖ branch₁ ‖ … ‖ branchₙ).
pub fn policy_or(hash_alg: u16, branches: &[&[u8]]) -> Result<Vec<u8>> {
    let n = super::digest_len(hash_alg)?;
    if branches.len() < 2 || branches.len() > 8 {
        return Err(Error::Invalid("PolicyOR takes 2 to 8 branches".into()));
    }
    let mut m = vec![0u8; n];
    m.extend_from_slice(&CC_POLICY_OR.to_be_bytes());
    for b in branches {
        if b.len() != n {
            return Err(Error::Invalid(
                "PolicyOR branch has the wrong length".into(),
            ));
        }
        m.extend_from_slice(b);
    }
    hash(hash_alg, &m)
}

/// TPM_CC_PolicyCommandCode, TPM_CC_PolicyAuthorizeNV, and the command codes the TCG DevID
/// policies name.
const CC_POLICY_COMMAND_CODE: u32 = 0x0000_016C;
const CC_POLICY_AUTHORIZE_NV: u32 = 0x0000_0192;
pub const CC_CERTIFY: u32 = 0x0000_0148;
pub const CC_ACTIVATE_CREDENTIAL: u32 = 0x0000_0147;

/// The key whose TCG DevID policy is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevIdKey {
    Iak,
    IDevId,
}

/// The policy digest after TPM2_PolicyCommandCode(`code`) from `before`.
pub fn policy_command_code(hash_alg: u16, before: &[u8], code: u32) -> Result<Vec<u8>> {
    let mut m = before.to_vec();
    m.extend_from_slice(&CC_POLICY_COMMAND_CODE.to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    hash(hash_alg, &m)
}

/// The four PolicyOR branches of the TCG DevID key policy (TCG "TPM 2.0 Keys for Device
/// Identity and Attestation" v1.0 rev 12 §7.3.6.6, Table 19, and the policy NV indices of
/// §7.3.2): A = PolicySecret(endorsement); A then PolicyCommandCode(Certify); A then
/// PolicyCommandCode(ActivateCredential); PolicyAuthorizeNV over the key's policy NV index
/// (IDevID 0x01C90010/11/12, IAK 0x01C90018/19/1A for SHA-256/384/512; attributes 0x220F1008,
/// authPolicy A, dataSize = digest + 2). The index numbers and NV public area come from the
/// open implementations of the spec (go-tpm-tools `client/template.go`); the resulting
/// digests equal Table 19's values as keylime's implementation carries them, which the tests
/// check.
pub fn tcg_devid_policy_branches(key: DevIdKey, hash_alg: u16) -> Result<[Vec<u8>; 4]> {
    let n = super::digest_len(hash_alg)?;
    let a = policy_secret_endorsement(hash_alg)?;
    let certify = policy_command_code(hash_alg, &a, CC_CERTIFY)?;
    let activate = policy_command_code(hash_alg, &a, CC_ACTIVATE_CREDENTIAL)?;
    let offset = match hash_alg {
        alg::SHA256 => 0,
        alg::SHA384 => 1,
        alg::SHA512 => 2,
        _ => {
            return Err(Error::Invalid(
                "TCG DevID policies exist for SHA-256/384/512".into(),
            ));
        }
    };
    let index: u32 = match key {
        DevIdKey::IDevId => 0x01C9_0010,
        DevIdKey::Iak => 0x01C9_0018,
    } + offset;
    // TPMS_NV_PUBLIC of the policy index; its name is nameAlg ‖ H(TPMS_NV_PUBLIC).
    let mut nv = index.to_be_bytes().to_vec();
    nv.extend_from_slice(&hash_alg.to_be_bytes());
    nv.extend_from_slice(&0x220F_1008u32.to_be_bytes());
    nv.extend_from_slice(&(a.len() as u16).to_be_bytes());
    nv.extend_from_slice(&a);
    nv.extend_from_slice(&((n + 2) as u16).to_be_bytes());
    let mut name = hash_alg.to_be_bytes().to_vec();
    name.extend_from_slice(&hash(hash_alg, &nv)?);
    let mut m = vec![0u8; n];
    m.extend_from_slice(&CC_POLICY_AUTHORIZE_NV.to_be_bytes());
    m.extend_from_slice(&name);
    let nv_branch = hash(hash_alg, &m)?;
    Ok([a, certify, activate, nv_branch])
}

/// The authPolicy of a TCG DevID key (IAK or IDevID) for `hash_alg`: PolicyOR over
/// [`tcg_devid_policy_branches`].
pub fn tcg_devid_policy(key: DevIdKey, hash_alg: u16) -> Result<Vec<u8>> {
    let b = tcg_devid_policy_branches(key, hash_alg)?;
    policy_or(hash_alg, &[&b[0], &b[1], &b[2], &b[3]])
}

/// The PolicyOR branches that satisfy an EK whose authPolicy is the high-range "policy B" for
/// `name_alg`, after PolicySecret(endorsement) has set the session digest to policy A. `None`
/// when the EK's nameAlg has no high-range policy (low-range EKs need policy A alone).
pub fn ek_policy_b_branches(name_alg: u16) -> Result<Option<[Vec<u8>; 2]>> {
    match name_alg {
        alg::SHA384 => Ok(Some([
            policy_secret_endorsement(alg::SHA384)?,
            EK_POLICY_C_SHA384.to_vec(),
        ])),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_devid_policy_digests_match_table_19_sha256() {
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(tcg_devid_policy(DevIdKey::IDevId, alg::SHA256).unwrap()),
            "ad6b3a2284fd698a0710bf5cc1b9bdf15e2532e3f601fa4b93a6a8fa8de579ea"
        );
        assert_eq!(
            hex(tcg_devid_policy(DevIdKey::Iak, alg::SHA256).unwrap()),
            "5437182326e414fca797d5f174615a1641f61255797c3a2b22c21d120b2d1e07"
        );
    }

    #[test]
    fn ek_policy_a_sha256_is_the_l1_template_auth_policy() {
        // TCG EK Credential Profile, template L-1 authPolicy (also tpm_devid.md §1.9).
        let want = "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa";
        let got = policy_secret_endorsement(alg::SHA256).unwrap();
        let hexed: String = got.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hexed, want);
    }

    #[test]
    fn ek_policy_b_sha384_is_policy_or_of_computed_a_and_spec_c() {
        let [a, c] = ek_policy_b_branches(alg::SHA384).unwrap().unwrap();
        assert_eq!(
            policy_or(alg::SHA384, &[&a, &c]).unwrap(),
            EK_POLICY_B_SHA384
        );
        assert!(ek_policy_b_branches(alg::SHA256).unwrap().is_none());
    }

    #[test]
    fn policy_or_rejects_wrong_branch_count_and_length() {
        let a = [0u8; 48];
        assert!(policy_or(alg::SHA384, &[&a]).is_err());
        assert!(policy_or(alg::SHA384, &[&a, &a[..32]]).is_err());
    }
}
