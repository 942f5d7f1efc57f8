//! `kame-server localauthority x509|jwt show|prepare|activate|taint|revoke` and
//! `kame-server upstreamauthority taint|revoke`: the LocalAuthority API on the admin socket,
//! printed as SPIRE's CLI prints it (plus taint and readiness). It only calls the API; every
//! check is the server's.

use super::{CliError, Common, Output, print};
use clap::{Args, Subcommand};
use kame_api::pb::localauthority as pb;
use pb::local_authority_client::LocalAuthorityClient;
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum LocalAuthorityCmd {
    /// The X.509 authority (the CA that signs X509-SVIDs).
    #[command(
        subcommand,
        after_help = "Example (the whole rotation):\n  kame-server localauthority x509 prepare\n  kame-server localauthority x509 activate --authority-id NEW\n  kame-server localauthority x509 taint --authority-id OLD\n  kame-server localauthority x509 revoke --authority-id OLD"
    )]
    X509(AuthorityCmd),
    /// The JWT authority (the key that signs JWT-SVIDs).
    #[command(
        subcommand,
        after_help = "Example (the whole rotation):\n  kame-server localauthority jwt prepare\n  kame-server localauthority jwt activate --authority-id NEW\n  kame-server localauthority jwt taint --authority-id OLD\n  kame-server localauthority jwt revoke --authority-id OLD"
    )]
    Jwt(AuthorityCmd),
}

#[derive(Debug, Subcommand)]
pub enum AuthorityCmd {
    /// Shows the active, prepared and old authorities, with taint and readiness.
    Show {
        #[command(flatten)]
        common: Common,
    },
    /// Prepares a new authority and publishes it in the bundle.
    Prepare {
        /// Replace an authority that is already prepared.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Activates the prepared authority.
    Activate(IdArgs),
    /// Taints an old authority: agents and servers re-issue what it signed.
    Taint(IdArgs),
    /// Revokes a tainted authority: it leaves the bundle and its key is destroyed.
    Revoke {
        #[command(flatten)]
        id: IdArgs,
        /// Revoke although agents still hold SVIDs under it.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// The authority ID (X.509: the CA's subject key ID in hex; JWT: the key ID).
    #[arg(long)]
    pub authority_id: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Subcommand)]
pub enum UpstreamAuthorityCmd {
    /// Taints the upstream authority that signed the old local authority.
    Taint(SkidArgs),
    /// Revokes the upstream authority that signed the old local authority.
    Revoke(RevokeSkidArgs),
}

#[derive(Debug, Args)]
pub struct RevokeSkidArgs {
    #[command(flatten)]
    pub skid: SkidArgs,
    /// Revoke even while agents seen recently still hold SVIDs under it (Kame's).
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct SkidArgs {
    /// The upstream authority's subject key ID (hex).
    #[arg(long)]
    pub subject_key_id: String,
    #[command(flatten)]
    pub common: Common,
}

use kame_api::timefmt::utc;

fn state_json(s: &pb::AuthorityState) -> Value {
    json!({
        "authority_id": s.authority_id,
        "expires_at": s.expires_at,
        "upstream_authority_subject_key_id": s.upstream_authority_subject_key_id,
        "tainted": s.tainted,
        "agents_holding": s.agents_holding,
    })
}

fn state_pretty(title: &str, s: Option<&pb::AuthorityState>, x509: bool) -> String {
    let mut out = format!("{title}:\n");
    match s {
        None => {
            let t = title.split_whitespace().next().unwrap_or(title);
            out += &format!("  No {t} authority found\n");
        }
        Some(s) => {
            out += &format!("  Authority ID: {}\n", s.authority_id);
            out += &format!("  Expires at: {}\n", utc(s.expires_at));
            if x509 {
                out += &format!(
                    "  Upstream authority Subject Key ID: {}\n",
                    s.upstream_authority_subject_key_id
                );
            }
            if s.tainted {
                out += "  Tainted: true\n";
                out += &format!(
                    "  Agents still holding SVIDs under it: {}\n",
                    s.agents_holding
                );
            }
        }
    }
    out
}

fn show(
    out: Output,
    kind: &str,
    x509: bool,
    active: Option<&pb::AuthorityState>,
    prepared: Option<&pb::AuthorityState>,
    old: Option<&pb::AuthorityState>,
    older: &[pb::AuthorityState],
) {
    let j = json!({
        "active": active.map(state_json),
        "prepared": prepared.map(state_json),
        "old": old.map(state_json),
        "older": older.iter().map(state_json).collect::<Vec<_>>(),
    });
    let mut p = state_pretty(&format!("Active {kind} authority"), active, x509);
    p += "\n";
    p += &state_pretty(&format!("Prepared {kind} authority"), prepared, x509);
    p += "\n";
    p += &state_pretty(&format!("Old {kind} authority"), old, x509);
    for o in older {
        p += "\n";
        p += &state_pretty(&format!("Older {kind} authority"), Some(o), x509);
    }
    print(out, j, p);
}

fn one(out: Output, title: &str, s: Option<&pb::AuthorityState>, x509: bool) {
    print(
        out,
        s.map(state_json).unwrap_or(Value::Null),
        state_pretty(title, s, x509),
    );
}

pub async fn localauthority(cmd: LocalAuthorityCmd) -> Result<(), CliError> {
    match cmd {
        LocalAuthorityCmd::X509(c) => x509(c).await,
        LocalAuthorityCmd::Jwt(c) => jwt(c).await,
    }
}

async fn client(
    common: &Common,
) -> Result<LocalAuthorityClient<tonic::transport::Channel>, CliError> {
    Ok(LocalAuthorityClient::new(common.connect().await?))
}

async fn x509(cmd: AuthorityCmd) -> Result<(), CliError> {
    let k = "X.509";
    match cmd {
        AuthorityCmd::Show { common } => {
            let r = client(&common)
                .await?
                .get_x509_authority_state(pb::GetX509AuthorityStateRequest {})
                .await?
                .into_inner();
            show(
                common.output,
                k,
                true,
                r.active.as_ref(),
                r.prepared.as_ref(),
                r.old.as_ref(),
                &r.older,
            );
        }
        AuthorityCmd::Prepare { force, common } => {
            let r = client(&common)
                .await?
                .prepare_x509_authority(pb::PrepareX509AuthorityRequest { force })
                .await?
                .into_inner();
            one(
                common.output,
                "Prepared X.509 authority",
                r.prepared_authority.as_ref(),
                true,
            );
        }
        AuthorityCmd::Activate(a) => {
            let r = client(&a.common)
                .await?
                .activate_x509_authority(pb::ActivateX509AuthorityRequest {
                    authority_id: a.authority_id,
                })
                .await?
                .into_inner();
            one(
                a.common.output,
                "Activated X.509 authority",
                r.activated_authority.as_ref(),
                true,
            );
        }
        AuthorityCmd::Taint(a) => {
            let r = client(&a.common)
                .await?
                .taint_x509_authority(pb::TaintX509AuthorityRequest {
                    authority_id: a.authority_id,
                })
                .await?
                .into_inner();
            one(
                a.common.output,
                "Tainted X.509 authority",
                r.tainted_authority.as_ref(),
                true,
            );
        }
        AuthorityCmd::Revoke { id, force } => {
            let r = client(&id.common)
                .await?
                .revoke_x509_authority(pb::RevokeX509AuthorityRequest {
                    authority_id: id.authority_id,
                    force,
                })
                .await?
                .into_inner();
            one(
                id.common.output,
                "Revoked X.509 authority",
                r.revoked_authority.as_ref(),
                true,
            );
        }
    }
    Ok(())
}

async fn jwt(cmd: AuthorityCmd) -> Result<(), CliError> {
    let k = "JWT";
    match cmd {
        AuthorityCmd::Show { common } => {
            let r = client(&common)
                .await?
                .get_jwt_authority_state(pb::GetJwtAuthorityStateRequest {})
                .await?
                .into_inner();
            show(
                common.output,
                k,
                false,
                r.active.as_ref(),
                r.prepared.as_ref(),
                r.old.as_ref(),
                &r.older,
            );
        }
        AuthorityCmd::Prepare { force, common } => {
            let r = client(&common)
                .await?
                .prepare_jwt_authority(pb::PrepareJwtAuthorityRequest { force })
                .await?
                .into_inner();
            one(
                common.output,
                "Prepared JWT authority",
                r.prepared_authority.as_ref(),
                false,
            );
        }
        AuthorityCmd::Activate(a) => {
            let r = client(&a.common)
                .await?
                .activate_jwt_authority(pb::ActivateJwtAuthorityRequest {
                    authority_id: a.authority_id,
                })
                .await?
                .into_inner();
            one(
                a.common.output,
                "Activated JWT authority",
                r.activated_authority.as_ref(),
                false,
            );
        }
        AuthorityCmd::Taint(a) => {
            let r = client(&a.common)
                .await?
                .taint_jwt_authority(pb::TaintJwtAuthorityRequest {
                    authority_id: a.authority_id,
                })
                .await?
                .into_inner();
            one(
                a.common.output,
                "Tainted JWT authority",
                r.tainted_authority.as_ref(),
                false,
            );
        }
        AuthorityCmd::Revoke { id, force } => {
            let r = client(&id.common)
                .await?
                .revoke_jwt_authority(pb::RevokeJwtAuthorityRequest {
                    authority_id: id.authority_id,
                    force,
                })
                .await?
                .into_inner();
            one(
                id.common.output,
                "Revoked JWT authority",
                r.revoked_authority.as_ref(),
                false,
            );
        }
    }
    Ok(())
}

pub async fn upstreamauthority(cmd: UpstreamAuthorityCmd) -> Result<(), CliError> {
    match cmd {
        UpstreamAuthorityCmd::Taint(a) => {
            let r = client(&a.common)
                .await?
                .taint_x509_upstream_authority(pb::TaintX509UpstreamAuthorityRequest {
                    subject_key_id: a.subject_key_id,
                })
                .await?
                .into_inner();
            print(
                a.common.output,
                json!({"upstream_authority_subject_key_id": r.upstream_authority_subject_key_id}),
                format!(
                    "Tainted X.509 upstream authority:\n  Subject Key ID: {}\n",
                    r.upstream_authority_subject_key_id
                ),
            );
        }
        UpstreamAuthorityCmd::Revoke(RevokeSkidArgs { skid: a, force }) => {
            let r = client(&a.common)
                .await?
                .revoke_x509_upstream_authority(pb::RevokeX509UpstreamAuthorityRequest {
                    subject_key_id: a.subject_key_id,
                    force,
                })
                .await?
                .into_inner();
            print(
                a.common.output,
                json!({"upstream_authority_subject_key_id": r.upstream_authority_subject_key_id}),
                format!(
                    "Revoked X.509 upstream authority:\n  Subject Key ID: {}\n",
                    r.upstream_authority_subject_key_id
                ),
            );
        }
    }
    Ok(())
}
