//! Behaviour every [`DataStore`] must have, run against SQLite and a real PostgreSQL cluster
//! (tests only).

#![allow(clippy::unwrap_used)]

use super::*;
use crate::entrycache::{EntryCache, NodeCache};
use kame_api::pb::types::{Bundle, JwtKey, X509Certificate};
use std::sync::Arc;

pub fn entry(id: &str, spiffe: &str) -> RegistrationEntry {
    RegistrationEntry {
        id: id.into(),
        spiffe_id: spiffe.into(),
        parent_id: "spiffe://td/spire/agent/x".into(),
        selectors: vec![Selector::new("unix", "uid:0")],
        created_at: 1,
        ..Default::default()
    }
}

/// Issue 19 item 4 at the datastore: a write computed before a ban cannot clear it;
/// eviction (deleting the node) lifts it.
pub async fn node_ban_holds_against_every_later_write_until_eviction(s: &dyn DataStore) {
    let id = "spiffe://td/spire/agent/x";
    let node = AttestedNode {
        spiffe_id: id.into(),
        serial_number: "01".into(),
        ..Default::default()
    };
    s.create_node(&node).await.unwrap();
    let renewed = s
        .modify_node(id, &|n: &mut AttestedNode| {
            n.new_serial_number = "02".into();
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        (
            renewed.serial_number.as_str(),
            renewed.new_serial_number.as_str()
        ),
        ("01", "02")
    );
    s.ban_node(id).await.unwrap();
    assert!(s.fetch_node(id).await.unwrap().unwrap().banned());
    // A write that would restore the serials (a renewal or re-attestation read before).
    let e = s
        .modify_node(id, &|n: &mut AttestedNode| {
            *n = node.clone();
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, DsError::Banned));
    assert!(s.fetch_node(id).await.unwrap().unwrap().banned());
    // An error from the closure persists nothing; a missing node is NotFound.
    assert!(matches!(
        s.modify_node("spiffe://td/spire/agent/none", &|_: &mut AttestedNode| Ok(
            ()
        ))
        .await,
        Err(DsError::NotFound(_))
    ));
    assert!(matches!(
        s.ban_node("spiffe://td/spire/agent/none").await,
        Err(DsError::NotFound(_))
    ));
    s.delete_node(id).await.unwrap();
    s.create_node(&node).await.unwrap();
    assert!(!s.fetch_node(id).await.unwrap().unwrap().banned());
    s.modify_node(id, &|_: &mut AttestedNode| Ok(()))
        .await
        .unwrap();
}

pub async fn entries_crud_and_duplicate_detection(s: &dyn DataStore) {
    s.create_entry(&entry("a", "spiffe://td/w")).await.unwrap();
    let dup = s
        .create_entry(&entry("b", "spiffe://td/w"))
        .await
        .unwrap_err();
    assert!(matches!(dup, DsError::AlreadyExists(_)));
    let mut other = entry("c", "spiffe://td/w");
    other.selectors.push(Selector::new("unix", "gid:0"));
    s.create_entry(&other).await.unwrap();
    assert_eq!(s.count_entries().await.unwrap(), 2);
    let mut upd = s.fetch_entry("a").await.unwrap().unwrap();
    upd.hint = "h".into();
    let upd = s.update_entry(&upd).await.unwrap();
    assert_eq!(upd.revision_number, 1);
    let filtered = s
        .list_entries(&EntryFilter {
            hint: Some("h".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);
    s.delete_entry("a").await.unwrap();
    assert!(matches!(
        s.delete_entry("a").await,
        Err(DsError::NotFound(_))
    ));
}

pub async fn join_token_is_single_use(s: &dyn DataStore) {
    s.create_join_token("t", 10).await.unwrap();
    assert!(matches!(
        s.create_join_token("t", 10).await,
        Err(DsError::AlreadyExists(_))
    ));
    assert_eq!(s.take_join_token("t").await.unwrap(), Some(10));
    assert_eq!(s.take_join_token("t").await.unwrap(), None);
}

pub async fn bundle_sequence_bumps_on_every_change_only(s: &dyn DataStore) {
    let mut b = Bundle {
        trust_domain: "td".into(),
        ..Default::default()
    };
    b.x509_authorities.push(X509Certificate {
        asn1: vec![1],
        tainted: false,
    });
    assert_eq!(s.append_bundle(&b).await.unwrap().sequence_number, 1);
    assert_eq!(
        s.append_bundle(&b).await.unwrap().sequence_number,
        1,
        "no change, no bump"
    );
    b.jwt_authorities.push(JwtKey {
        public_key: vec![2],
        key_id: "k".into(),
        expires_at: 5,
        tainted: false,
    });
    let b2 = s.append_bundle(&b).await.unwrap();
    assert_eq!(b2.sequence_number, 2);
    assert_eq!(b2.jwt_authorities.len(), 1);
    assert_eq!(s.update_bundle(&b2).await.unwrap().sequence_number, 3);
}

/// Every create, update and delete of an entry appends one event in commit order; the
/// entries an event range names are fetched as they are now; keyset paging sees every entry
/// once; pruning removes only old events.
pub async fn entry_events_follow_every_write_in_commit_order(s: &dyn DataStore) {
    assert_eq!(s.last_event(EventKind::Entry).await.unwrap(), 0);
    s.create_entry(&entry("a", "spiffe://td/a")).await.unwrap();
    s.create_entry(&entry("b", "spiffe://td/b")).await.unwrap();
    let mut a = s.fetch_entry("a").await.unwrap().unwrap();
    a.hint = "h".into();
    s.update_entry(&a).await.unwrap();
    s.delete_entry("b").await.unwrap();
    // Refused writes leave no event.
    assert!(s.create_entry(&entry("c", "spiffe://td/a")).await.is_err());
    assert!(s.delete_entry("b").await.is_err());
    let mut ghost = entry("zz", "spiffe://td/z");
    ghost.hint = "x".into();
    assert!(s.update_entry(&ghost).await.is_err());
    assert_eq!(s.last_event(EventKind::Entry).await.unwrap(), 4);
    let ev = s.list_events(EventKind::Entry, 0, 100).await.unwrap();
    let got: Vec<(i64, &str)> = ev.iter().map(|e| (e.id, e.key.as_str())).collect();
    assert_eq!(got, vec![(1, "a"), (2, "b"), (3, "a"), (4, "b")]);
    assert_eq!(
        s.list_events(EventKind::Entry, 2, 1).await.unwrap().len(),
        1
    );
    let changed = s.fetch_changed_entries(1, 4).await.unwrap();
    assert_eq!(changed.len(), 1, "b is gone; a is there once, as updated");
    assert_eq!(changed[0].hint, "h");
    for i in 0..5 {
        s.create_entry(&entry(&format!("p{i}"), &format!("spiffe://td/p{i}")))
            .await
            .unwrap();
    }
    let mut seen = vec![];
    let mut after = String::new();
    loop {
        let page = s.list_entries_after(&after, 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id.clone();
        seen.extend(page.into_iter().map(|e| e.id));
    }
    assert_eq!(seen, vec!["a", "p0", "p1", "p2", "p3", "p4"]);
    assert_eq!(s.prune_events(EventKind::Entry, 0).await.unwrap(), 0);
    let now = crate::ca::now_secs() as i64;
    assert_eq!(s.prune_events(EventKind::Entry, now + 1).await.unwrap(), 9);
    assert_eq!(
        s.last_event(EventKind::Entry).await.unwrap(),
        9,
        "the head survives pruning"
    );
}

/// Writers on two connections (or two servers) at once: the event ids are 1..=N with no
/// gap, each write once.
pub async fn concurrent_writers_leave_no_gap_in_entry_events(
    a: Arc<dyn DataStore>,
    b: Arc<dyn DataStore>,
) {
    let mut tasks = vec![];
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.create_entry(&entry(&format!("e{i:02}"), &format!("spiffe://td/w{i}")))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ev = a.list_events(EventKind::Entry, 0, 1000).await.unwrap();
    let ids: Vec<i64> = ev.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=40).collect::<Vec<i64>>());
    let mut names: Vec<&str> = ev.iter().map(|e| e.key.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 40);
}

/// Transparency log appends through two stores (two servers on one database) at once: one
/// log, numbered from 0 with no gaps or duplicates, every append's rows consecutive and where
/// its first number says; tree heads are kept per log key and size.
pub async fn transparency_log_appends_from_two_stores_form_one_gapless_log(
    a: Arc<dyn DataStore>,
    b: Arc<dyn DataStore>,
) {
    use crate::datastore::{LogRow, StoredTreeHead};
    let row = |i: usize, j: usize| {
        let input = format!("append {i} row {j}").into_bytes();
        LogRow {
            leaf_hash: kame_api::ct::leaf_hash(&input),
            leaf_input: input,
            extra: vec![j as u8],
        }
    };
    let mut tasks = vec![];
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let rows: Vec<LogRow> = (0..1 + i % 3).map(|j| row(i, j)).collect();
            let first = s.append_log_entries(&rows).await.unwrap();
            (i, first, rows.len())
        }));
    }
    let mut total = 0;
    let mut placed = vec![];
    for t in tasks {
        let (i, first, n) = t.await.unwrap();
        total += n;
        placed.push((i, first, n));
    }
    assert_eq!(a.log_size().await.unwrap(), total as u64);
    assert_eq!(b.log_size().await.unwrap(), total as u64);
    let stored = b.list_log_entries(0, total as u64 + 5).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (0..total as u64).collect::<Vec<_>>(),
        "no gaps, no duplicates"
    );
    for (i, first, n) in placed {
        for j in 0..n {
            let (seq, r) = &stored[first as usize + j];
            assert_eq!(*r, row(i, j), "append {i} row {j} at {seq}");
        }
        assert_eq!(
            a.find_log_leaf(&row(i, 0).leaf_hash).await.unwrap(),
            Some(first)
        );
    }
    let hashes = a.log_leaf_hashes(0, total as u64).await.unwrap();
    assert_eq!(
        hashes,
        stored.iter().map(|(_, r)| r.leaf_hash).collect::<Vec<_>>()
    );
    // With each leaf's timestamp: bytes 2..10 of its leaf input.
    let times = b.log_leaf_times(3, 9).await.unwrap();
    assert_eq!(
        times,
        stored[3..9]
            .iter()
            .map(|(_, r)| {
                let ts: [u8; 8] = r.leaf_input[2..10].try_into().unwrap();
                (r.leaf_hash, u64::from_be_bytes(ts))
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(a.find_log_leaf(&[0u8; 32]).await.unwrap(), None);
    // Tree heads: per log key; a second for the same key and size is ignored.
    let head = |log: u8, size: u64, sig: u8| StoredTreeHead {
        log_id: [log; 32],
        tree_size: size,
        timestamp: 1000 + size,
        root_hash: [size as u8; 32],
        signature: vec![sig],
    };
    a.put_tree_head(&head(1, 5, 1)).await.unwrap();
    b.put_tree_head(&head(1, 5, 2)).await.unwrap();
    b.put_tree_head(&head(1, 9, 1)).await.unwrap();
    a.put_tree_head(&head(2, 7, 1)).await.unwrap();
    assert_eq!(
        a.fetch_tree_head(&[1; 32], None).await.unwrap(),
        Some(head(1, 9, 1))
    );
    assert_eq!(
        a.fetch_tree_head(&[1; 32], Some(5)).await.unwrap(),
        Some(head(1, 5, 1))
    );
    assert_eq!(
        b.fetch_tree_head(&[2; 32], None).await.unwrap(),
        Some(head(2, 7, 1))
    );
    assert_eq!(b.fetch_tree_head(&[3; 32], None).await.unwrap(), None);
    // Log keys: what one server publishes the other lists; a key published again is kept.
    a.put_log_key(&[1; 32], b"key one").await.unwrap();
    b.put_log_key(&[2; 32], b"key two").await.unwrap();
    b.put_log_key(&[1; 32], b"another").await.unwrap();
    let mut keys = b.list_log_keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec![b"key one".to_vec(), b"key two".to_vec()]);
}

/// A cache on one store sees writes made through another once it refreshes; it survives
/// pruning past its cursor by reloading; `authorized` follows aliases and descendants.
pub async fn entry_cache_follows_writes_and_reloads_after_pruning(
    a: Arc<dyn DataStore>,
    b: Arc<dyn DataStore>,
) {
    let server = "spiffe://td/spire/server";
    let agent = "spiffe://td/spire/agent/x";
    let agent_sel = vec![Selector::new("tpm", "a"), Selector::new("tpm", "b")];
    let mut alias = entry("alias", "spiffe://td/node");
    alias.parent_id = server.into();
    alias.selectors = vec![Selector::new("tpm", "b")];
    a.create_entry(&alias).await.unwrap();
    let mut under_alias = entry("w1", "spiffe://td/w1");
    under_alias.parent_id = "spiffe://td/node".into();
    a.create_entry(&under_alias).await.unwrap();
    let cache = EntryCache::load(b.clone(), server.into()).await.unwrap();
    let ids = |c: &EntryCache| -> Vec<String> {
        c.authorized(agent, &agent_sel, 100)
            .iter()
            .map(|e| e.id.clone())
            .collect()
    };
    assert_eq!(ids(&cache), vec!["w1"]);
    // Written through the other store: seen after a refresh, not before.
    let mut direct = entry("w2", "spiffe://td/w2");
    direct.parent_id = agent.into();
    a.create_entry(&direct).await.unwrap();
    let mut nested = entry("w3", "spiffe://td/w3");
    nested.parent_id = "spiffe://td/w2".into();
    a.create_entry(&nested).await.unwrap();
    let mut expired = entry("w4", "spiffe://td/w4");
    expired.parent_id = agent.into();
    expired.expires_at = 50;
    a.create_entry(&expired).await.unwrap();
    let mut stranger = alias.clone();
    stranger.id = "alias2".into();
    stranger.selectors = vec![Selector::new("tpm", "b"), Selector::new("tpm", "z")];
    a.create_entry(&stranger).await.unwrap();
    assert_eq!(ids(&cache), vec!["w1"]);
    cache.refresh().await.unwrap();
    assert_eq!(ids(&cache), vec!["w1", "w2", "w3"]);
    a.delete_entry("w1").await.unwrap();
    // Pruned past the cache's cursor: it reloads and is right again.
    a.prune_events(EventKind::Entry, crate::ca::now_secs() as i64 + 1)
        .await
        .unwrap();
    a.delete_entry("w3").await.unwrap();
    cache.refresh().await.unwrap();
    assert_eq!(ids(&cache), vec!["w2"]);
    assert_eq!(cache.len(), 4);
}

/// Node writes (attest, renew, ban, evict) are events too; a node cache on another store
/// sees each after a refresh, and refused writes leave none.
pub async fn node_events_and_cache_follow_attest_renew_ban_evict(
    a: Arc<dyn DataStore>,
    b: Arc<dyn DataStore>,
) {
    let id = "spiffe://td/spire/agent/x";
    let node = AttestedNode {
        spiffe_id: id.into(),
        serial_number: "01".into(),
        ..Default::default()
    };
    a.create_node(&node).await.unwrap();
    let cache = NodeCache::load(b.clone()).await.unwrap();
    assert_eq!(cache.get(id).unwrap().serial_number, "01");
    a.modify_node(id, &|n: &mut AttestedNode| {
        n.serial_number = "02".into();
        Ok(())
    })
    .await
    .unwrap();
    assert!(a.create_node(&node).await.is_err());
    assert_eq!(
        cache.get(id).unwrap().serial_number,
        "01",
        "not yet refreshed"
    );
    cache.refresh().await.unwrap();
    assert_eq!(cache.get(id).unwrap().serial_number, "02");
    a.ban_node(id).await.unwrap();
    assert!(
        a.modify_node(id, &|_: &mut AttestedNode| Ok(()))
            .await
            .is_err()
    );
    cache.refresh().await.unwrap();
    assert!(cache.get(id).unwrap().banned());
    a.delete_node(id).await.unwrap();
    cache.refresh().await.unwrap();
    assert!(cache.get(id).is_none());
    assert_eq!(a.last_event(EventKind::Node).await.unwrap(), 4);
    let keys: Vec<String> = a
        .list_events(EventKind::Node, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, vec![id; 4]);
    assert_eq!(
        a.last_event(EventKind::Entry).await.unwrap(),
        0,
        "kinds apart"
    );
}

/// A bundle write is seen by the next read at once.
pub async fn bundle_reads_see_writes_at_once(s: &dyn DataStore) {
    let mut b = Bundle {
        trust_domain: "td".into(),
        ..Default::default()
    };
    b.x509_authorities.push(X509Certificate {
        asn1: vec![1],
        tainted: false,
    });
    s.append_bundle(&b).await.unwrap();
    assert_eq!(
        s.fetch_bundle("td").await.unwrap().unwrap().sequence_number,
        1
    );
    s.modify_bundle("td", &|b: &mut Bundle| {
        b.x509_authorities[0].tainted = true;
        Ok(true)
    })
    .await
    .unwrap();
    let got = s.fetch_bundle("td").await.unwrap().unwrap();
    assert!(got.x509_authorities[0].tainted);
    assert_eq!(got.sequence_number, 2);
    s.delete_bundle("td").await.unwrap();
    assert!(s.fetch_bundle("td").await.unwrap().is_none());
}

/// Federation relationships: created once, read back without their bundle, listed by trust
/// domain, updated and deleted; NotFound and AlreadyExists where they apply.
pub async fn federation_relationships_crud(s: &dyn DataStore) {
    use kame_api::pb::types::{
        FederationRelationship, HttpsWebProfile, HttpsspiffeProfile,
        federation_relationship::BundleEndpointProfile as P,
    };
    let web = FederationRelationship {
        trust_domain: "b.org".into(),
        bundle_endpoint_url: "https://b.org/bundle".into(),
        bundle_endpoint_profile: Some(P::HttpsWeb(HttpsWebProfile {})),
        trust_domain_bundle: Some(Bundle {
            trust_domain: "b.org".into(),
            ..Default::default()
        }),
    };
    let spiffe = FederationRelationship {
        trust_domain: "a.org".into(),
        bundle_endpoint_url: "https://a.org:8443/".into(),
        bundle_endpoint_profile: Some(P::HttpsSpiffe(HttpsspiffeProfile {
            endpoint_spiffe_id: "spiffe://a.org/spire/server".into(),
        })),
        trust_domain_bundle: None,
    };
    s.create_federation_relationship(&web).await.unwrap();
    s.create_federation_relationship(&spiffe).await.unwrap();
    assert!(matches!(
        s.create_federation_relationship(&web).await,
        Err(DsError::AlreadyExists(_))
    ));
    let got = s
        .fetch_federation_relationship("b.org")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.bundle_endpoint_url, web.bundle_endpoint_url);
    assert!(
        got.trust_domain_bundle.is_none(),
        "bundles are not stored here"
    );
    let tds: Vec<String> = s
        .list_federation_relationships()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.trust_domain)
        .collect();
    assert_eq!(tds, vec!["a.org".to_string(), "b.org".to_string()]);
    let mut moved = web.clone();
    moved.bundle_endpoint_url = "https://b.org/v2".into();
    s.update_federation_relationship(&moved).await.unwrap();
    assert_eq!(
        s.fetch_federation_relationship("b.org")
            .await
            .unwrap()
            .unwrap()
            .bundle_endpoint_url,
        "https://b.org/v2"
    );
    let mut absent = web.clone();
    absent.trust_domain = "c.org".into();
    assert!(matches!(
        s.update_federation_relationship(&absent).await,
        Err(DsError::NotFound(_))
    ));
    s.delete_federation_relationship("b.org").await.unwrap();
    assert!(matches!(
        s.delete_federation_relationship("b.org").await,
        Err(DsError::NotFound(_))
    ));
    assert!(
        s.fetch_federation_relationship("b.org")
            .await
            .unwrap()
            .is_none()
    );
}

/// Break-glass records: lines stored per agent in order, the last one and the latest `limit`
/// read back, a sequence number stored twice refused with nothing of that batch kept.
pub async fn break_glass_records_append_in_order_and_refuse_duplicates(s: &dyn DataStore) {
    use crate::datastore::BreakGlassRow;
    let row = |seq: u64, kind: &str| BreakGlassRow {
        seq,
        time: 1_000 + seq,
        kind: kind.into(),
        line: format!("{{\"line\":{seq}}}"),
    };
    let a = "spiffe://example.org/spire/agent/a";
    assert_eq!(s.last_break_glass(a).await.unwrap(), None);
    s.append_break_glass(a, &[row(1, "open"), row(2, "deliver")])
        .await
        .unwrap();
    s.append_break_glass("spiffe://example.org/spire/agent/b", &[row(1, "open")])
        .await
        .unwrap();
    assert_eq!(
        s.last_break_glass(a).await.unwrap(),
        Some(row(2, "deliver"))
    );
    let e = s
        .append_break_glass(a, &[row(3, "deliver"), row(2, "close")])
        .await
        .unwrap_err();
    assert!(matches!(e, DsError::AlreadyExists(_)), "{e:?}");
    assert_eq!(
        s.last_break_glass(a).await.unwrap(),
        Some(row(2, "deliver"))
    );
    s.append_break_glass(a, &[row(3, "close")]).await.unwrap();
    assert_eq!(
        s.list_break_glass(a, 2).await.unwrap(),
        vec![row(2, "deliver"), row(3, "close")]
    );
    assert_eq!(s.list_break_glass(a, 100).await.unwrap().len(), 3);
}
