-- Kame server datastore, version 1.
CREATE TABLE registered_entries (
    id TEXT PRIMARY KEY NOT NULL,
    unique_key TEXT NOT NULL UNIQUE,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    hint TEXT NOT NULL DEFAULT '',
    downstream INTEGER NOT NULL DEFAULT 0,
    revision_number INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX registered_entries_spiffe_id ON registered_entries(spiffe_id);
CREATE INDEX registered_entries_parent_id ON registered_entries(parent_id);

CREATE TABLE attested_nodes (
    spiffe_id TEXT PRIMARY KEY NOT NULL,
    data TEXT NOT NULL
);

CREATE TABLE join_tokens (
    token TEXT PRIMARY KEY NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE bundles (
    trust_domain TEXT PRIMARY KEY NOT NULL,
    data BLOB NOT NULL
);

CREATE TABLE ca_journals (
    server_id TEXT PRIMARY KEY NOT NULL,
    data BLOB NOT NULL,
    updated_at INTEGER NOT NULL
);
