//! SPIFFE federation (SPIFFE Federation standard, SPIRE's `server.federation` block): the
//! bundle endpoint that publishes this trust domain's bundle (`endpoint`), and the refresher
//! that keeps the bundles of the trust domains this one federates with (`refresher`). This
//! module reads the configuration; neither half touches the local CA.

use kame_api::conf::{ConfigError, Section, invalid};
use kame_api::{SpiffeId, TrustDomain};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod acme;
pub mod endpoint;
pub mod refresher;

/// SPIRE's default `refresh_hint` for the bundle endpoint.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(300);

/// `server.federation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederationConfig {
    pub bundle_endpoint: Option<EndpointConfig>,
    pub federates_with: Vec<Relationship>,
}

/// `federation.bundle_endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub address: IpAddr,
    pub port: u16,
    /// Published as `spiffe_refresh_hint`.
    pub refresh_hint: Duration,
    pub profile: EndpointProfile,
    /// A deprecated form SPIRE still accepts was used: logged at start.
    pub deprecation: Option<&'static str>,
}

/// How the bundle endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// The server's own X509-SVID (`spiffe://<td>/spire/server`).
    HttpsSpiffe,
    /// A Web PKI certificate from files, read again every `file_sync_interval`.
    HttpsWebFiles {
        cert_file_path: PathBuf,
        key_file_path: PathBuf,
        file_sync_interval: Duration,
    },
    /// A Web PKI certificate obtained and renewed through ACME.
    HttpsWebAcme(acme::AcmeConfig),
}

/// `federates_with "<td>" { … }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    pub trust_domain: TrustDomain,
    pub bundle_endpoint_url: String,
    pub profile: RelationshipProfile,
}

/// How a federated bundle endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelationshipProfile {
    /// Web PKI: the system's roots and the URL's host name.
    HttpsWeb,
    /// The endpoint's X509-SVID, which must be `endpoint_spiffe_id` and chain to the bundle
    /// held for that ID's trust domain.
    HttpsSpiffe { endpoint_spiffe_id: SpiffeId },
}

fn one_profile(sec: &mut Section, key: &str) -> Result<(String, Section), ConfigError> {
    let mut all = sec.labeled(key)?;
    match (all.pop(), all.is_empty()) {
        (Some(p), true) => Ok(p),
        (None, _) => Err(sec.missing(key)),
        (Some(_), false) => Err(invalid(&sec.key(key), "give exactly one profile")),
    }
}

fn endpoint(mut e: Section) -> Result<EndpointConfig, ConfigError> {
    let address = match e.string("address")? {
        None => "0.0.0.0"
            .parse()
            .map_err(|_| invalid(&e.key("address"), "bad default"))?,
        Some(s) => s
            .parse()
            .map_err(|_| invalid(&e.key("address"), format!("{s:?} is not an IP address")))?,
    };
    let port = match e.int("port")? {
        None => 443,
        Some(p) => u16::try_from(p)
            .map_err(|_| invalid(&e.key("port"), format!("{p} is not a port number")))?,
    };
    let refresh_hint = match e.duration("refresh_hint")? {
        None => DEFAULT_REFRESH_HINT,
        Some(d) if d.is_zero() => return Err(invalid(&e.key("refresh_hint"), "must be positive")),
        Some(d) => d,
    };
    // SPIRE's legacy form: `acme { }` right in the block (deprecated), or no profile at all
    // (https_spiffe, deprecated).
    let legacy = e.section("acme")?;
    let mut profiles = e.labeled("profile")?;
    if profiles.len() > 1 {
        return Err(invalid(&e.key("profile"), "give exactly one profile"));
    }
    let (profile, deprecation) = match (legacy, profiles.pop()) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                &e.key("acme"),
                "either bundle endpoint 'acme' or 'profile' can be set, but not both",
            ));
        }
        (Some(a), None) => (
            EndpointProfile::HttpsWebAcme(acme_block(a)?),
            Some(
                "ACME configuration within the bundle_endpoint is deprecated; use profile \"https_web\" { acme { … } }",
            ),
        ),
        (None, None) => (
            EndpointProfile::HttpsSpiffe,
            Some(
                "the bundle endpoint has no profile; using https_spiffe, as SPIRE does: configure a profile explicitly",
            ),
        ),
        (None, Some((name, p))) => (endpoint_profile(&e, &name, p)?, None),
    };
    e.finish()?;
    Ok(EndpointConfig {
        address,
        port,
        refresh_hint,
        profile,
        deprecation,
    })
}

fn acme_block(a: Section) -> Result<acme::AcmeConfig, ConfigError> {
    let domain_name = a.required("domain_name")?;
    match rustls::pki_types::ServerName::try_from(domain_name.as_str()) {
        Ok(rustls::pki_types::ServerName::DnsName(_))
            if !domain_name.ends_with('.') && !domain_name.contains('*') => {}
        _ => {
            return Err(invalid(
                &a.key("domain_name"),
                format!("{domain_name:?} is not a DNS name a certificate can be issued for"),
            ));
        }
    }
    let email = a.required("email")?;
    if email.contains(char::is_whitespace) || !email.contains('@') {
        return Err(invalid(
            &a.key("email"),
            format!("{email:?} is not an email address"),
        ));
    }
    let directory_url = a
        .nonempty("directory_url")?
        .unwrap_or_else(|| acme::DEFAULT_DIRECTORY_URL.to_string());
    if !directory_url.starts_with("https://") {
        return Err(invalid(
            &a.key("directory_url"),
            format!("{directory_url:?}: an ACME directory is served over https"),
        ));
    }
    let tos_accepted = a.take_bool("tos_accepted")?.unwrap_or(false);
    a.finish()?;
    Ok(acme::AcmeConfig {
        domain_name: domain_name.to_ascii_lowercase(),
        email,
        directory_url,
        tos_accepted,
    })
}

fn endpoint_profile(
    e: &Section,
    name: &str,
    mut p: Section,
) -> Result<EndpointProfile, ConfigError> {
    let profile = match name {
        "https_spiffe" => EndpointProfile::HttpsSpiffe,
        "https_web" => {
            let acme = p.section("acme")?;
            let file = p.section("serving_cert_file")?;
            match (acme, file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        &p.key("acme"),
                        "give acme or serving_cert_file, not both",
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        &e.key("profile"),
                        "malformed https_web profile configuration: 'acme' or 'serving_cert_file' is required",
                    ));
                }
                (Some(a), None) => EndpointProfile::HttpsWebAcme(acme_block(a)?),
                (None, Some(f)) => {
                    let cert_file_path = PathBuf::from(f.required("cert_file_path")?);
                    let key_file_path = PathBuf::from(f.required("key_file_path")?);
                    crate::catalog::files::readable(&f.key("cert_file_path"), &cert_file_path)?;
                    crate::catalog::files::readable(&f.key("key_file_path"), &key_file_path)?;
                    let file_sync_interval = f
                        .duration("file_sync_interval")?
                        .unwrap_or(Duration::from_secs(3600))
                        .max(Duration::from_secs(1));
                    f.finish()?;
                    EndpointProfile::HttpsWebFiles {
                        cert_file_path,
                        key_file_path,
                        file_sync_interval,
                    }
                }
            }
        }
        other => {
            return Err(invalid(
                &e.key("profile"),
                format!("unknown profile {other:?} (https_web, https_spiffe)"),
            ));
        }
    };
    p.finish()?;
    Ok(profile)
}

fn relationship(td: &str, mut r: Section, own: &TrustDomain) -> Result<Relationship, ConfigError> {
    let trust_domain = TrustDomain::parse(td)
        .map_err(|e| invalid(&r.key("trust_domain"), format!("{td:?}: {e}")))?;
    if &trust_domain == own {
        return Err(invalid(
            &r.key("trust_domain"),
            "a trust domain does not federate with itself",
        ));
    }
    let bundle_endpoint_url = r.required("bundle_endpoint_url")?;
    check_url(&bundle_endpoint_url).map_err(|m| invalid(&r.key("bundle_endpoint_url"), m))?;
    let (name, p) = one_profile(&mut r, "bundle_endpoint_profile")?;
    let profile = match name.as_str() {
        "https_web" => RelationshipProfile::HttpsWeb,
        "https_spiffe" => {
            let s = p.required("endpoint_spiffe_id")?;
            let endpoint_spiffe_id = SpiffeId::parse(&s)
                .map_err(|e| invalid(&p.key("endpoint_spiffe_id"), format!("{s:?}: {e}")))?;
            RelationshipProfile::HttpsSpiffe { endpoint_spiffe_id }
        }
        other => {
            return Err(invalid(
                &r.key("bundle_endpoint_profile"),
                format!("unknown profile {other:?} (https_web, https_spiffe)"),
            ));
        }
    };
    p.finish()?;
    r.finish()?;
    Ok(Relationship {
        trust_domain,
        bundle_endpoint_url,
        profile,
    })
}

/// A bundle endpoint URL: `https://host[:port][/path]`, no user info, query or fragment.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url:?} is not an https URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if authority.contains('@') || url.contains('?') || url.contains('#') {
        return Err(format!(
            "{url:?}: user info, query and fragment are not allowed"
        ));
    }
    Ok(())
}

/// Reads `server.federation`.
pub fn parse(server: &mut Section, own: &TrustDomain) -> Result<FederationConfig, ConfigError> {
    let Some(mut f) = server.section("federation")? else {
        return Ok(FederationConfig::default());
    };
    let bundle_endpoint = f.section("bundle_endpoint")?.map(endpoint).transpose()?;
    let mut federates_with: Vec<Relationship> = vec![];
    for (td, r) in f.labeled("federates_with")? {
        let rel = relationship(&td, r, own)?;
        if federates_with
            .iter()
            .any(|x| x.trust_domain == rel.trust_domain)
        {
            return Err(invalid(
                &f.key("federates_with"),
                format!("{} is given more than once", rel.trust_domain),
            ));
        }
        federates_with.push(rel);
    }
    f.finish()?;
    Ok(FederationConfig {
        bundle_endpoint,
        federates_with,
    })
}

impl Relationship {
    /// A relationship from the TrustDomain API's message, checked as the configuration is
    /// (`own` is this server's trust domain); the message's bundle is not part of it.
    pub fn from_proto(
        r: &kame_api::pb::types::FederationRelationship,
        own: &TrustDomain,
    ) -> Result<Relationship, String> {
        use kame_api::pb::types::federation_relationship::BundleEndpointProfile as P;
        let trust_domain =
            TrustDomain::parse(&r.trust_domain).map_err(|e| format!("trust_domain: {e}"))?;
        if &trust_domain == own {
            return Err("trust_domain: a trust domain does not federate with itself".into());
        }
        check_url(&r.bundle_endpoint_url).map_err(|m| format!("bundle_endpoint_url: {m}"))?;
        let profile = match &r.bundle_endpoint_profile {
            None => return Err("bundle_endpoint_profile: missing".into()),
            Some(P::HttpsWeb(_)) => RelationshipProfile::HttpsWeb,
            Some(P::HttpsSpiffe(p)) => RelationshipProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::parse(&p.endpoint_spiffe_id)
                    .map_err(|e| format!("endpoint_spiffe_id: {e}"))?,
            },
        };
        Ok(Relationship {
            trust_domain,
            bundle_endpoint_url: r.bundle_endpoint_url.clone(),
            profile,
        })
    }

    /// The TrustDomain API's message (without a bundle).
    pub fn to_proto(&self) -> kame_api::pb::types::FederationRelationship {
        use kame_api::pb::types::federation_relationship::BundleEndpointProfile as P;
        use kame_api::pb::types::{HttpsWebProfile, HttpsspiffeProfile};
        kame_api::pb::types::FederationRelationship {
            trust_domain: self.trust_domain.as_str().to_string(),
            bundle_endpoint_url: self.bundle_endpoint_url.clone(),
            bundle_endpoint_profile: Some(match &self.profile {
                RelationshipProfile::HttpsWeb => P::HttpsWeb(HttpsWebProfile {}),
                RelationshipProfile::HttpsSpiffe { endpoint_spiffe_id } => {
                    P::HttpsSpiffe(HttpsspiffeProfile {
                        endpoint_spiffe_id: endpoint_spiffe_id.to_string(),
                    })
                }
            }),
            trust_domain_bundle: None,
        }
    }
}
