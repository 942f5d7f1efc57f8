//! The `spire` UpstreamAuthority (SPIRE's nested topology): a downstream server obtains its CA
//! from the server above it. It takes an X509-SVID from a co-located agent's Workload API
//! (kept current by a background stream), dials the upstream server with it over mutual TLS,
//! authenticating the upstream as `spiffe://<trust domain>/spire/server` against the bundle
//! the Workload API gives, and calls SPIRE's server API: `SVID/NewDownstreamX509CA` for the
//! CA, `Bundle/GetBundle` for the roots (with their taint flags), `Bundle/PublishJWTAuthority`
//! for JWT keys, and `Bundle/GetBundle` every five seconds for the local bundle's changes.
//! The upstream authorizes it by a registration entry with `downstream = true`; the same
//! calls work against a SPIRE server. It keeps nothing on disk and holds no key but the SVID
//! the Workload API hands it.

use crate::{LocalBundle, MintedX509Ca, Updates, UpstreamAuthority, UpstreamError, no_updates};
use der::{Decode, Reader};
use kame_api::pb;
use kame_api::pb::types::JwtKey;
use kame_api::{SpiffeId, TrustDomain};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

pub const TYPE: &str = "spire";

/// How often the upstream's bundle is read for changes (SPIRE's `upstreamPollFreq`).
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How long a call waits for the Workload API's first X509-SVID.
pub const SVID_WAIT: Duration = Duration::from_secs(30);

/// SPIRE's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpireConfig {
    pub server_address: String,
    pub server_port: u16,
    pub workload_api_socket: PathBuf,
}

/// The X509-SVID this server presents upstream, and the bundle it verifies the upstream with.
#[derive(Clone)]
struct Svid {
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    bundle: Vec<Vec<u8>>,
}

type SharedRoots = Arc<std::sync::RwLock<Vec<Vec<u8>>>>;

struct Conn {
    /// The SVID leaf the channel presents (a new SVID makes a new channel).
    leaf: Vec<u8>,
    channel: Channel,
}

/// A downstream server's link to the server above it.
pub struct SpireUpstream {
    link: Arc<Link>,
}

/// What the calls share (also held by a bundle subscription).
struct Link {
    cfg: SpireConfig,
    server_id: SpiffeId,
    svid: tokio::sync::watch::Receiver<Option<Svid>>,
    roots: SharedRoots,
    conn: Mutex<Option<Conn>>,
    /// The Workload API follower, started at the first call.
    start: Mutex<Option<tokio::sync::watch::Sender<Option<Svid>>>>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for SpireUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpireUpstream")
            .field("cfg", &self.link.cfg)
            .finish_non_exhaustive()
    }
}

impl Drop for SpireUpstream {
    fn drop(&mut self) {
        if let Ok(mut w) = self.link.watcher.lock()
            && let Some(w) = w.take()
        {
            w.abort();
        }
    }
}

/// Certificates concatenated in DER (the Workload API's encoding), each checked to parse.
pub fn split_certs(mut b: &[u8]) -> Result<Vec<Vec<u8>>, der::Error> {
    let mut out = vec![];
    while !b.is_empty() {
        let mut r = der::SliceReader::new(b)?;
        x509_cert::Certificate::decode(&mut r)?;
        let n = u32::from(r.position()) as usize;
        out.push(b[..n].to_vec());
        b = &b[n..];
    }
    Ok(out)
}

fn svid_of(r: &pb::workload::X509svidResponse) -> Result<Svid, String> {
    let s = r
        .svids
        .first()
        .ok_or_else(|| "the Workload API answered with no X509-SVID".to_string())?;
    Ok(Svid {
        chain: split_certs(&s.x509_svid).map_err(|e| format!("x509_svid: {e}"))?,
        key_pkcs8: s.x509_svid_key.clone(),
        bundle: split_certs(&s.bundle).map_err(|e| format!("bundle: {e}"))?,
    })
}

/// Follows the Workload API's X509-SVID stream, reconnecting after a pause when it ends.
async fn watch_svids(
    socket: PathBuf,
    tx: tokio::sync::watch::Sender<Option<Svid>>,
    roots: SharedRoots,
) {
    let mut pause = Duration::from_millis(500);
    loop {
        let r = async {
            let ch = kame_api::channel::unix(&socket)
                .await
                .map_err(|e| e.to_string())?;
            let mut stream =
                pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch)
                    .fetch_x509svid(kame_api::channel::with_workload_header(
                        pb::workload::X509svidRequest {},
                    ))
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner();
            while let Some(m) = stream
                .message()
                .await
                .map_err(|s| s.message().to_string())?
            {
                match svid_of(&m) {
                    Ok(s) => {
                        if let Ok(mut r) = roots.write() {
                            *r = s.bundle.clone();
                        }
                        let _ = tx.send(Some(s));
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a Workload API update"),
                }
            }
            Ok::<(), String>(())
        }
        .await;
        if tx.is_closed() {
            return;
        }
        if let Err(e) = r {
            tracing::warn!(
                socket = %socket.display(),
                error = %e,
                retry_in = ?pause,
                "cannot get an X509-SVID from the Workload API"
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

fn status_err(what: &str, s: tonic::Status) -> UpstreamError {
    use tonic::Code as C;
    let m = format!("{what}: {} ({:?})", s.message(), s.code());
    match s.code() {
        C::Unavailable | C::DeadlineExceeded | C::ResourceExhausted | C::Aborted => {
            UpstreamError::Unavailable(m)
        }
        _ => UpstreamError::Refused(m),
    }
}

fn roots_of(b: &pb::types::Bundle) -> Vec<pb::types::X509Certificate> {
    b.x509_authorities.clone()
}

impl SpireUpstream {
    /// Nothing is contacted until the first call (the Workload API, then the upstream).
    pub fn new(cfg: SpireConfig, trust_domain: &TrustDomain) -> Result<Self, UpstreamError> {
        let server_id = SpiffeId::parse(&format!("spiffe://{}/spire/server", trust_domain))
            .map_err(|e| UpstreamError::Refused(e.to_string()))?;
        let (tx, rx) = tokio::sync::watch::channel(None);
        Ok(SpireUpstream {
            link: Arc::new(Link {
                cfg,
                server_id,
                svid: rx,
                roots: Default::default(),
                conn: Mutex::new(None),
                start: Mutex::new(Some(tx)),
                watcher: Mutex::new(None),
            }),
        })
    }
}

impl Link {
    async fn current_svid(&self) -> Result<Svid, UpstreamError> {
        let tx = self.start.lock().ok().and_then(|mut t| t.take());
        if let Some(tx) = tx {
            let h = tokio::spawn(watch_svids(
                self.cfg.workload_api_socket.clone(),
                tx,
                self.roots.clone(),
            ));
            if let Ok(mut w) = self.watcher.lock() {
                *w = Some(h);
            }
        }
        let mut rx = self.svid.clone();
        let got = tokio::time::timeout(SVID_WAIT, rx.wait_for(|s| s.is_some())).await;
        match got {
            Ok(Ok(s)) => s.clone().ok_or_else(|| {
                UpstreamError::Unavailable("no X509-SVID from the Workload API".into())
            }),
            _ => Err(UpstreamError::Unavailable(format!(
                "no X509-SVID from the Workload API at {} within {SVID_WAIT:?}",
                self.cfg.workload_api_socket.display()
            ))),
        }
    }

    /// A channel to the upstream presenting the current SVID (made anew when it rotated).
    async fn channel(&self) -> Result<Channel, UpstreamError> {
        let svid = self.current_svid().await?;
        let leaf = svid.chain.first().cloned().unwrap_or_default();
        if let Ok(c) = self.conn.lock()
            && let Some(c) = c.as_ref()
            && c.leaf == leaf
        {
            return Ok(c.channel.clone());
        }
        let channel = kame_api::channel::connect(
            &self.cfg.server_address,
            self.cfg.server_port,
            &self.server_id,
            self.roots.clone(),
            Some((svid.chain.clone(), svid.key_pkcs8.clone())),
        )
        .await
        .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        if let Ok(mut c) = self.conn.lock() {
            *c = Some(Conn {
                leaf,
                channel: channel.clone(),
            });
        }
        Ok(channel)
    }

    async fn get_bundle(&self) -> Result<pb::types::Bundle, UpstreamError> {
        let ch = self.channel().await?;
        pb::bundle::bundle_client::BundleClient::new(ch)
            .get_bundle(pb::bundle::GetBundleRequest { output_mask: None })
            .await
            .map(|r| r.into_inner())
            .map_err(|s| status_err("Bundle/GetBundle", s))
    }
}

#[async_trait::async_trait]
impl UpstreamAuthority for SpireUpstream {
    async fn mint_x509_ca(
        &self,
        csr: &[u8],
        preferred_ttl: Duration,
    ) -> Result<(MintedX509Ca, Updates<Vec<Vec<u8>>>), UpstreamError> {
        let ch = self.link.channel().await?;
        let r = pb::svid::svid_client::SvidClient::new(ch)
            .new_downstream_x509ca(pb::svid::NewDownstreamX509caRequest {
                csr: csr.to_vec(),
                preferred_ttl: i32::try_from(preferred_ttl.as_secs()).unwrap_or(i32::MAX),
            })
            .await
            .map_err(|s| status_err("SVID/NewDownstreamX509CA", s))?
            .into_inner();
        if r.ca_cert_chain.is_empty() {
            return Err(UpstreamError::BadAnswer(
                "NewDownstreamX509CA returned no certificate".into(),
            ));
        }
        // SPIRE's plugin: the roots (and their taint flags) from the upstream's bundle.
        let bundle = self.link.get_bundle().await?;
        let upstream_roots = roots_of(&bundle).into_iter().map(|c| c.asn1).collect();
        Ok((
            MintedX509Ca {
                chain: r.ca_cert_chain,
                upstream_roots,
            },
            no_updates(),
        ))
    }

    async fn publish_jwt_key(&self, key: JwtKey) -> Result<Vec<JwtKey>, UpstreamError> {
        let ch = self.link.channel().await?;
        pb::bundle::bundle_client::BundleClient::new(ch)
            .publish_jwt_authority(pb::bundle::PublishJwtAuthorityRequest {
                jwt_authority: Some(key),
            })
            .await
            .map(|r| r.into_inner().jwt_authorities)
            .map_err(|s| status_err("Bundle/PublishJWTAuthority", s))
    }

    /// The upstream's bundle now, then whenever a poll every [`POLL_INTERVAL`] finds its
    /// X.509 roots or JWT keys changed. A failed poll is logged and the next one tries again;
    /// the stream does not end.
    async fn subscribe_to_local_bundle(&self) -> Result<Updates<LocalBundle>, UpstreamError> {
        let first = self.link.get_bundle().await?;
        let first = LocalBundle {
            x509_roots: roots_of(&first),
            jwt_keys: first.jwt_authorities,
        };
        let this = self.link.clone();
        let stream = futures::stream::unfold(
            (this, Some(first.clone()), first),
            |(this, pending, last)| async move {
                if let Some(p) = pending {
                    return Some((Ok(p), (this, None, last)));
                }
                loop {
                    tokio::time::sleep(POLL_INTERVAL).await;
                    match this.get_bundle().await {
                        Ok(b) => {
                            let now = LocalBundle {
                                x509_roots: roots_of(&b),
                                jwt_keys: b.jwt_authorities,
                            };
                            if now != last {
                                return Some((Ok(now.clone()), (this, None, now)));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the upstream bundle"),
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }
}
