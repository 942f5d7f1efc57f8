//! A client generated from SPIRE's own protos (spire-api-sdk, not Kame's) manages entries and
//! reads the bundle over Kame's admin socket: wire compatibility of packages, method paths,
//! field numbers, and per-entry statuses. A Python grpcio client (gRPC C-core, which sends the
//! socket path as `:authority`) built at run time from the same protos does the same.

use kame_tests::spire_sdk::spire::api::server::bundle::v1 as bundlev1;
use kame_tests::spire_sdk::spire::api::server::entry::v1 as entryv1;
use kame_tests::spire_sdk::spire::api::types;
use std::path::Path;
use tonic::transport::{Channel, Endpoint};

async fn connect(socket: &Path) -> Channel {
    let p = socket.to_path_buf();
    Endpoint::from_static("http://spire-client.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

fn config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{d}/api.sock"
    trust_domain = "example.org"
    data_dir = "{d}/data"
    log_level = "WARN"
}}
plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{d}/data/datastore.sqlite3"
        }}
    }}
    KeyManager "memory" {{}}
    NodeAttestor "join_token" {{}}
}}
"#
    )
}

fn sid(td: &str, path: &str) -> Option<types::Spiffeid> {
    Some(types::Spiffeid {
        trust_domain: td.into(),
        path: path.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_sdk_client_creates_gets_lists_deletes_entries_and_reads_bundle() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let port = kame_keymanager::testing::free_port();
    let cfg = kame_server::config::Config::parse(&config(dir.path(), port), false).unwrap();
    let server = kame_server::run::start(cfg).await.unwrap();
    let ch = connect(&dir.path().join("api.sock")).await;
    let mut entries = entryv1::entry_client::EntryClient::new(ch.clone());

    let entry = types::Entry {
        spiffe_id: sid("example.org", "/spire-client/workload"),
        parent_id: sid("example.org", "/spire/agent/join_token/abc"),
        selectors: vec![types::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        dns_names: vec!["workload.example.org".into()],
        x509_svid_ttl: 600,
        hint: "primary".into(),
        ..Default::default()
    };
    let malformed = types::Entry {
        spiffe_id: sid("example.org", "/bad//path"),
        ..entry.clone()
    };
    let resp = entries
        .batch_create_entry(entryv1::BatchCreateEntryRequest {
            entries: vec![entry.clone(), entry.clone(), malformed],
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results.len(), 3);
    let created = resp.results[0].entry.clone().unwrap();
    assert_eq!(
        resp.results[0].status.as_ref().unwrap().code,
        tonic::Code::Ok as i32
    );
    assert_eq!(created.spiffe_id, entry.spiffe_id);
    assert_eq!(created.x509_svid_ttl, 600);
    assert_eq!(created.hint, "primary");
    assert_eq!(
        resp.results[1].status.as_ref().unwrap().code,
        tonic::Code::AlreadyExists as i32
    );
    assert_eq!(resp.results[1].entry.as_ref().unwrap().id, created.id);
    assert_eq!(
        resp.results[2].status.as_ref().unwrap().code,
        tonic::Code::InvalidArgument as i32
    );

    let got = entries
        .get_entry(entryv1::GetEntryRequest {
            id: created.id.clone(),
            output_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.dns_names, vec!["workload.example.org".to_string()]);
    assert_eq!(got.selectors, entry.selectors);

    let listed = entries
        .list_entries(entryv1::ListEntriesRequest {
            filter: Some(entryv1::list_entries_request::Filter {
                by_selectors: Some(types::SelectorMatch {
                    selectors: entry.selectors.clone(),
                    r#match: types::selector_match::MatchBehavior::MatchExact as i32,
                }),
                ..Default::default()
            }),
            output_mask: None,
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(listed.entries[0].id, created.id);

    let bundle = bundlev1::bundle_client::BundleClient::new(ch.clone())
        .get_bundle(bundlev1::GetBundleRequest { output_mask: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(bundle.x509_authorities.len(), 1);
    assert_eq!(bundle.jwt_authorities.len(), 1);
    assert!(bundle.sequence_number >= 1);

    let del = entries
        .batch_delete_entry(entryv1::BatchDeleteEntryRequest {
            ids: vec![created.id.clone(), created.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        del.results[0].status.as_ref().unwrap().code,
        tonic::Code::Ok as i32
    );
    assert_eq!(
        del.results[1].status.as_ref().unwrap().code,
        tonic::Code::NotFound as i32
    );
    let e = entries
        .get_entry(entryv1::GetEntryRequest {
            id: created.id,
            output_mask: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let n = entries
        .count_entries(entryv1::CountEntriesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(n, 0);
    server.stop().await;
}

/// gRPC C-core on the admin socket: Python's grpcio, its messages built from SPIRE's protos
/// (the descriptor set), creates an entry, lists it and reads the bundle; a bad entry gets
/// its per-entry InvalidArgument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_sdk_python_grpcio_client_on_the_admin_socket() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let port = kame_keymanager::testing::free_port();
    let cfg = kame_server::config::Config::parse(&config(dir.path(), port), false).unwrap();
    let server = kame_server::run::start(cfg).await.unwrap();
    let fds = dir.path().join("spire.fds");
    std::fs::write(&fds, kame_tests::SPIRE_SDK_FDS).unwrap();
    let script = r#"
import sys, grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
fds = descriptor_pb2.FileDescriptorSet.FromString(open(sys.argv[1], 'rb').read())
pool = descriptor_pool.DescriptorPool()
for f in fds.file:
    pool.Add(f)
def cls(name):
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
E = 'spire.api.server.entry.v1.'
ch = grpc.insecure_channel('unix:' + sys.argv[2])
def call(method, req, resp):
    return ch.unary_unary(method, request_serializer=cls(req).SerializeToString,
                          response_deserializer=cls(resp).FromString)
Entry = cls('spire.api.types.Entry')
good = Entry(spiffe_id={'trust_domain': 'example.org', 'path': '/py/workload'},
             parent_id={'trust_domain': 'example.org', 'path': '/spire/agent/x'},
             selectors=[{'type': 'unix', 'value': 'uid:1000'}], x509_svid_ttl=300)
bad = Entry(spiffe_id={'trust_domain': 'example.org', 'path': 'no-slash'},
            parent_id={'trust_domain': 'example.org', 'path': '/spire/agent/x'},
            selectors=[{'type': 'unix', 'value': 'uid:1000'}])
created = call('/spire.api.server.entry.v1.Entry/BatchCreateEntry', E + 'BatchCreateEntryRequest',
               E + 'BatchCreateEntryResponse')(cls(E + 'BatchCreateEntryRequest')(entries=[good, bad]), timeout=10)
print('create', created.results[0].status.code, created.results[1].status.code)
listed = call('/spire.api.server.entry.v1.Entry/ListEntries', E + 'ListEntriesRequest',
              E + 'ListEntriesResponse')(cls(E + 'ListEntriesRequest')(), timeout=10)
print('list', ' '.join(e.spiffe_id.path for e in listed.entries), listed.entries[0].x509_svid_ttl)
B = 'spire.api.server.bundle.v1.'
bundle = call('/spire.api.server.bundle.v1.Bundle/GetBundle', B + 'GetBundleRequest',
              'spire.api.types.Bundle')(cls(B + 'GetBundleRequest')(), timeout=10)
print('bundle', bundle.trust_domain, len(bundle.x509_authorities))
"#;
    let o = tokio::process::Command::new(kame_keymanager::testing::venv_tool("python"))
        .arg("-c")
        .arg(script)
        .arg(&fds)
        .arg(dir.path().join("api.sock"))
        .output()
        .await
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec![
            "create 0 3",
            "list /py/workload 300",
            "bundle example.org 1"
        ],
        "{out}"
    );
    server.stop().await;
}
